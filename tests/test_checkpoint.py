"""Checkpoint readers: HF folders, GGUF files (dequantization included) and random weights."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from kiln.runtime.checkpoint import (
    CheckpointError,
    GGUFReader,
    RandomReader,
    builtin_gguf_path,
    expected_shapes,
    model_config_from_hf,
    open_checkpoint,
)
from kiln.runtime.config import ModelConfig
from kiln.runtime.presets import PRESETS, resolve_preset

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def _hf_config(kind: str):
    t = transformers
    if kind == "llama":
        return t.LlamaConfig(**SMALL, max_position_embeddings=16384, rope_parameters=dict(LLAMA3_ROPE))
    if kind == "mistral":
        return t.MistralConfig(**SMALL, sliding_window=32)
    if kind == "qwen2":
        return t.Qwen2Config(**SMALL, tie_word_embeddings=True)
    if kind == "qwen3":
        return t.Qwen3Config(**SMALL, head_dim=32)
    if kind == "mixtral":
        return t.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)
    return t.Qwen3MoeConfig(**SMALL, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True)


def _kiln_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict in kiln naming: fused in-memory experts split per expert."""
    out = {}
    for name, t in model.state_dict().items():
        m = re.match(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$", name)
        if not m:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{m.group(1)}{e}.gate_proj.weight"] = gate
                out[f"{m.group(1)}{e}.up_proj.weight"] = up
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_hf_folder_matches_transformers(kind, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(kind))
    model.save_pretrained(tmp_path)
    reader = open_checkpoint(str(tmp_path))
    cfg = reader.config
    assert cfg.architecture == kind
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == 256
    assert cfg.head_dim == {"qwen3": 32}.get(kind, 16)
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind in ("qwen3", "qwen3_moe"))
    assert cfg.tie_word_embeddings == (kind == "qwen2")
    assert cfg.sliding_window == (32 if kind == "mistral" else None)
    if kind == "llama":
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is not None
        assert (cfg.rope_scaling.factor, cfg.rope_scaling.high_freq_factor) == (8.0, 4.0)
    else:
        assert cfg.rope_scaling is None
    if kind in ("mixtral", "qwen3_moe"):
        assert (cfg.num_experts, cfg.num_experts_per_tok) == (4, 2)
        assert cfg.moe_intermediate_size == (128 if kind == "mixtral" else 32)
        assert cfg.norm_topk_prob
    else:
        assert not cfg.is_moe
    want = _kiln_state_dict(model)
    assert set(reader.names()) == set(want) == set(expected_shapes(cfg))
    for name in reader.names():
        assert reader.shape(name) == tuple(want[name].shape), name
        assert torch.equal(reader.get(name), want[name]), name


def test_hf_sharded_with_index(tmp_path):
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config("mixtral"))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    reader = open_checkpoint(str(tmp_path))
    want = _kiln_state_dict(model)
    assert reader.names() == list(expected_shapes(reader.config))
    for name in reader.names():
        assert torch.equal(reader.get(name), want[name]), name


def test_model_config_from_hf_variants():
    base = dict(SMALL, model_type="llama")
    old = model_config_from_hf(dict(base, rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 32.0},
                                    eos_token_id=[7, 9], head_dim=32))
    assert old.rope_theta == 5e5 and old.rope_scaling.factor == 32.0
    assert old.eos_token_id == [7, 9] and old.head_dim == 32
    new = model_config_from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1234.0}))
    assert new.rope_theta == 1234.0 and new.rope_scaling is None and new.head_dim == 16
    qwen2 = model_config_from_hf(dict(SMALL, model_type="qwen2", use_sliding_window=False, sliding_window=64))
    assert qwen2.attention_bias and qwen2.sliding_window is None
    with pytest.raises(CheckpointError, match="unsupported model_type"):
        model_config_from_hf(dict(SMALL, model_type="gpt2"))
    with pytest.raises(CheckpointError, match="rope scaling"):
        model_config_from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))


# ----------------------------------------------------------------------------- built-in GGUF


@pytest.fixture(scope="module")
def builtin():
    path = builtin_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return open_checkpoint("smollm2-135m-instruct"), model


def test_builtin_gguf_weights_match_transformers(builtin):
    reader, model = builtin
    sd = model.state_dict()
    assert reader.config.tie_word_embeddings and "lm_head.weight" not in reader.names()
    assert set(reader.names()) == set(sd) - {"lm_head.weight"}
    for name in reader.names():
        got = reader.get(name)
        assert got.dtype == torch.float32
        assert reader.shape(name) == tuple(got.shape)
        assert torch.equal(got, sd[name]), name


def test_builtin_gguf_config(builtin):
    reader, model = builtin
    cfg, hf = reader.config, model.config
    assert cfg.architecture == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == hf.hidden_size // hf.num_attention_heads
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.eos_token_id == [2] and cfg.bos_token_id == 1


def test_builtin_gguf_tokenizer(builtin, tmp_path):
    reader, _ = builtin
    path = builtin_gguf_path()
    info = reader.save_tokenizer(str(tmp_path / "tokenizer"))
    assert info.path == "tokenizer" and info.eos_token_ids == [2] and info.bos_token_id == 1
    assert info.add_bos_token is False and "<|im_start|>" in info.chat_template
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in ["Hello world", "  spaces\tand\nnewlines ", "Ünïcödé 日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text


# ----------------------------------------------------------------------------- dequantization


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, object]]):
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_kquant_blocks(qtype, rows: int, blocks: int, rng) -> np.ndarray:
    """Random K-quant blocks with finite, small f16 super-block scales (gguf cannot quantize these)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(rows, blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d and dmin lead the block
        raw[..., 0:4] = scales.reshape(rows, blocks, 4)
    else:  # Q6_K: d ends the block
        raw[..., -2:] = scales[..., :2]
    return raw.reshape(rows, blocks * type_size)


@pytest.mark.parametrize("qname", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_gguf_dequantization(qname, tmp_path):
    from gguf import quants

    T = gguf.GGMLQuantizationType
    qtype = T[qname]
    rng = np.random.default_rng(0)
    orig = rng.standard_normal((8, 512)).astype(np.float32)
    try:
        data = quants.quantize(orig, qtype)
        exact = True
    except NotImplementedError:
        data = _random_kquant_blocks(qtype, 8, 2, rng)
        exact = False
    _write_gguf(tmp_path / "q.gguf", {"x.weight": (data, qtype)})
    raw = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors[0]
    assert raw.tensor_type == qtype

    class Probe(GGUFReader):
        def __init__(self, path):
            self._r = gguf.GGUFReader(path, "r")
            self._tensors = {t.name: t for t in self._r.tensors}

    got = Probe(str(tmp_path / "q.gguf"))._dequant("x.weight")
    ref = quants.dequantize(raw.data, qtype)
    assert got.shape == (8, 512) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert np.isfinite(got).all()
    if exact:
        tol = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2}.get(qname, 0.5)
        assert np.abs(got - orig).max() <= tol


def test_gguf_moe_file_splits_experts_and_unpermutes(tmp_path):
    """A hand-written llama-arch MoE GGUF: stacked experts split per expert, q/k rows un-permuted."""
    from gguf import quants

    T = gguf.GGMLQuantizationType
    cfg = PRESETS["tiny-moe"].model_copy(update={"vocab_size": 256, "num_hidden_layers": 1})
    rand = RandomReader(cfg, seed=3)
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "llama")
    for key, val in [("block_count", 1), ("context_length", 2048), ("embedding_length", 64),
                     ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                     ("expert_count", 4), ("expert_used_count", 2)]:
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.rope.freq_base", 1e6)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 256)

    def permute(t, heads):  # what llama.cpp's converter does to q and k
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    g = lambda n: rand.get(n).numpy()  # noqa: E731
    p = "model.layers.0."
    plain = {"token_embd.weight": g("model.embed_tokens.weight"), "output_norm.weight": g("model.norm.weight"),
             "output.weight": g("lm_head.weight"), "blk.0.attn_norm.weight": g(p + "input_layernorm.weight"),
             "blk.0.ffn_norm.weight": g(p + "post_attention_layernorm.weight"),
             "blk.0.attn_q.weight": permute(g(p + "self_attn.q_proj.weight"), 4),
             "blk.0.attn_k.weight": permute(g(p + "self_attn.k_proj.weight"), 2),
             "blk.0.attn_v.weight": g(p + "self_attn.v_proj.weight"),
             "blk.0.attn_output.weight": g(p + "self_attn.o_proj.weight"),
             "blk.0.ffn_gate_inp.weight": g(p + "mlp.gate.weight")}
    for gname, kname in [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")]:
        plain[f"blk.0.ffn_{gname}_exps.weight"] = np.stack([g(f"{p}mlp.experts.{e}.{kname}.weight") for e in range(4)])
    for name, arr in plain.items():
        w.add_tensor(name, quants.quantize(arr, T.F16), raw_dtype=T.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = open_checkpoint(str(tmp_path / "moe.gguf"))
    assert reader.config.architecture == "mixtral" and reader.config.num_experts == 4
    assert reader.names() == rand.names()
    for name in reader.names():
        assert reader.shape(name) == rand.shape(name)
        torch.testing.assert_close(reader.get(name), rand.get(name).half().float(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(tmp_path / "nope"))
    assert "does not exist" in _one_line(ei) and "smollm2-135m-instruct" in _one_line(ei)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint("no-such-model", random_weights=True)
    assert "tiny-llama" in _one_line(ei)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(tmp_path))
    assert "config.json" in _one_line(ei)
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint("tiny-llama")
    assert "random_weights" in _one_line(ei)
    with pytest.raises(ValueError, match="known presets"):
        resolve_preset("llama-9")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(str(tmp_path / "f.bin"))
    _one_line(ei)


# ----------------------------------------------------------------------------- random weights


def test_random_reader_deterministic_and_shaped():
    a = open_checkpoint("tiny-qwen3", random_weights=True, seed=5)
    b = open_checkpoint("tiny-qwen3", random_weights=True, seed=5)
    c = open_checkpoint("tiny-qwen3", random_weights=True, seed=6)
    assert a.config == PRESETS["tiny-qwen3"]
    assert a.names() == list(expected_shapes(a.config))
    for name in a.names():
        x = a.get(name)
        assert tuple(x.shape) == a.shape(name) and x.dtype == torch.float32
        assert torch.equal(x, b.get(name))
        assert torch.equal(x, a.get(name))
        if name.endswith("norm.weight"):
            assert torch.equal(x, torch.ones_like(x))
        else:
            assert not torch.equal(x, c.get(name))
            assert 0.01 < x.std().item() < 0.03
    k = a.get("model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (2 * 32, 64)
    assert not torch.equal(a.get("model.layers.0.self_attn.q_proj.weight")[:64], k)


def test_random_reader_huge_model_is_lazy():
    r = open_checkpoint("llama-3.1-405b", random_weights=True, dtype="bfloat16")
    cfg = r.config
    assert cfg.rope_scaling.factor == 8.0 and cfg.vocab_size == 128256
    total = sum(int(np.prod(r.shape(n))) for n in r.names())
    assert total == cfg.num_parameters() and total > 400e9
    norm = r.get("model.layers.125.input_layernorm.weight")
    assert norm.dtype == torch.bfloat16 and norm.shape == (16384,)
    v = r.get("model.layers.3.self_attn.v_proj.weight")
    assert v.shape == (1024, 16384) and v.dtype == torch.bfloat16


def test_presets_published_shapes():
    q = resolve_preset("qwen3-30b-a3b")
    assert (q.num_hidden_layers, q.hidden_size, q.num_attention_heads, q.num_key_value_heads, q.head_dim) == (
        48, 2048, 32, 4, 128)
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size, q.vocab_size) == (128, 8, 768, 151936)
    assert q.qk_norm
    assert 29e9 < q.num_parameters() < 32e9
    assert 7.9e9 < resolve_preset("llama-3-8b").num_parameters() < 8.1e9
    l31 = resolve_preset("llama-3.1-8b")  # llama-3-8b's weights with Llama 3.1's 128k rope scaling
    assert l31.num_parameters() == resolve_preset("llama-3-8b").num_parameters()
    assert l31.max_position_embeddings == 131072 and l31.rope_scaling.factor == 8.0
    assert 69e9 < resolve_preset("llama-3-70b").num_parameters() < 72e9
    assert 46e9 < resolve_preset("mixtral-8x7b").num_parameters() < 47.5e9
    for name in ("tiny-llama", "tiny-moe", "tiny-qwen3"):
        assert PRESETS[name].vocab_size >= 49152


def test_random_reader_tokenizers(tmp_path):
    info = open_checkpoint("tiny-llama", random_weights=True).save_tokenizer(str(tmp_path / "tok"))
    assert info.eos_token_ids == [2] and info.chat_template
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) <= 49152
    small = RandomReader(ModelConfig(vocab_size=300, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    small.save_tokenizer(str(tmp_path / "byte"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "byte"))
    ids = tok("héllo 🙂")["input_ids"]
    assert max(ids) < 256 and tok.decode(ids) == "héllo 🙂"


def test_random_weights_from_hf_config(tmp_path):
    _hf_config("qwen3_moe").save_pretrained(tmp_path)
    r = open_checkpoint(str(tmp_path), random_weights=True, seed=1)
    assert isinstance(r, RandomReader) and r.config.architecture == "qwen3_moe"
    r2 = open_checkpoint(str(tmp_path / "config.json"), random_weights=True, seed=1)
    assert r2.config == r.config
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert r.shape(name) == (64, 32) and torch.equal(r.get(name), r2.get(name))


def test_hf_tokenizer_files_and_fallback(tmp_path):
    cfg = transformers.LlamaConfig(**dict(SMALL, vocab_size=49152), eos_token_id=2, bos_token_id=1)
    folder = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    reader = open_checkpoint(str(folder))
    open_checkpoint("tiny-llama", random_weights=True).save_tokenizer(str(tmp_path / "smol"))
    for f in os.listdir(tmp_path / "smol"):
        (folder / f).write_bytes((tmp_path / "smol" / f).read_bytes())
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 7], "bos_token_id": 1}')
    info = reader.save_tokenizer(str(tmp_path / "out" / "tokenizer"))
    assert info.eos_token_ids == [2, 7] and info.bos_token_id == 1 and info.chat_template
    assert os.path.isfile(tmp_path / "out" / "tokenizer" / "generation_config.json")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert tok("Hello world")["input_ids"] == [19556, 905]
    transformers.AutoModelForCausalLM.from_config(_hf_config("qwen3")).save_pretrained(tmp_path / "bare")
    info = open_checkpoint(str(tmp_path / "bare")).save_tokenizer(str(tmp_path / "bare_tok"))
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bare_tok")).decode([104, 105]) == "hi"


def test_first_layers_engine_equals_transformers_cut_to_those_layers(small_checkpoint, tmp_path):
    """``kiln build --num-layers 2`` of a 4-layer model: the engine's greedy tokens are those of
    transformers' own model loaded with its first two layers (what a draft that exits early
    computes); out-of-range counts are refused with one line."""
    import transformers

    from kiln.runtime.builder import BuildError, build_engine
    from kiln.runtime.config import BuildConfig
    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    out = build_engine(small_checkpoint, str(tmp_path / "first2"), BuildConfig(dtype="float32", max_seq_len=256),
                       device_class="cpu", progress=False, num_layers=2)
    llm = LLM(out)
    assert llm.engine.config.model.num_hidden_layers == 2
    assert "first 2 of 4 layers" in llm.engine.config.source
    hf = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoint, num_hidden_layers=2).eval()
    full = transformers.AutoModelForCausalLM.from_pretrained(small_checkpoint).eval()
    prompt = [5, 77, 901, 12, 1500, 33]
    got = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref_full = full.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == ref[0, len(prompt):].tolist()
    assert got != ref_full[0, len(prompt):].tolist()  # two layers are another model than four
    for n in (0, 5):
        with pytest.raises(BuildError, match="--num-layers must be in 1..4"):
            build_engine(small_checkpoint, str(tmp_path / f"bad{n}"), BuildConfig(dtype="float32", max_seq_len=256),
                         device_class="cpu", progress=False, num_layers=n)
