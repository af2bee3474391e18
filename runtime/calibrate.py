"""Build-time calibration for quantized engines: activation ranges, KV ranges and AWQ scales.

``calibrate`` runs a checkpoint over a calibration text one decoder layer at a time: the
sequences are embedded, then each layer is built alone (tensor-parallel size 1, in the given
dtype), loaded from the reader, run over every sequence and dropped before the next one is
read. Memory therefore holds one layer plus the calibration activations (the hidden state of
every calibration token and, for AWQ, a few hundred sampled input rows per projection), which
is what lets a 70B model calibrate on one GPU.

Each layer records:

* ``input_amax``: the largest ``|x|`` entering each of its four projections (the static FP8
  activation scales, ``kiln.kernels.quant.fp8_input_scale``);
* ``kv_amax``: the largest ``|k|`` (after the qk norm and rotary, as written to the cache) and
  ``|v|`` (the FP8 KV cache scales);
* with ``awq``, the activation-aware scales of Lin et al. (2023) for each group of projections
  that share an input, and optionally the per-group clipping of the scaled weights;
* with ``gptq``, each projection's E4M3 weight rounded by ``gptq_fp8`` against the second
  moment of its inputs on the calibration text (Frantar et al., 2022), kept for the build.

Every layer is fed the outputs of the previous layer computed in full precision with the
original weights (neither the scales nor any quantization are applied on the way), as in the
AWQ reference. Folding the scales (``apply_awq_scales``) leaves the full-precision model
unchanged, so these are also the inputs of the folded model, divided by the scales.

The AWQ scale groups and where their scales ``s`` are folded (the projection's columns are
multiplied by ``s``, and the tensor before it is divided by ``s``):

========================== =============================== ===================================
key                        projections (columns * s)        divided by s
========================== =============================== ===================================
``model.layers.{i}.qkv``   q_proj, k_proj, v_proj           input_layernorm.weight
``model.layers.{i}.o``     o_proj                           v_proj rows (and v_proj.bias)
``model.layers.{i}.gate_up`` gate_proj, up_proj             post_attention_layernorm.weight
``model.layers.{i}.down``  down_proj                        up_proj rows
========================== =============================== ===================================

Under grouped-query attention one value channel feeds the o_proj columns of every query head of
its group, so the ``o`` scales are tied across the heads of a group: channel ``d`` of every head
in kv group ``j`` shares one scale, and v_proj row ``j * head_dim + d`` is divided by it. MoE
layers get ``qkv`` and ``o`` only (experts stay 16-bit).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kiln.kernels.activation import silu_and_mul_ref
from kiln.kernels.attention import AttentionMetadata, paged_attention, rotary_write_kv
from kiln.kernels.gemv import linear
from kiln.kernels.norm import rms_norm
from kiln.kernels.quant import dequantize_int4, int4_group_params, pack_int4, quantize_fp8_rows, to_fp8
from kiln.kernels.rotary import cos_sin_cache
from kiln.parallel.mapping import Mapping
from kiln.parallel.partition import ReadOnce, rank_slice
from kiln.runtime.config import ModelConfig
from kiln.runtime.model import DecoderLayer, LocalComm, LocalShape

Fetch = Callable[[str], torch.Tensor]

BUILTIN_TEXT = "calibration.txt"
"""The calibration text shipped in ``kiln/runtime/data``."""

PROJECTIONS = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}
"""AWQ group -> the engine projection whose input it captures."""

SCALE_GRID = 20
"""Exponents ``alpha = i / 20`` tried by the scale search (alpha 0 is round-to-nearest)."""
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5
"""The clip search tries ``1 - i / 20`` of each group's largest magnitude, down to 0.55."""
BLOCK_SIZE = 16
GPTQ_DAMP, GPTQ_BLOCK = 0.01, 128
"""GPTQ: the fraction of the mean Hessian diagonal added to it, and the columns rounded per block."""
GPTQ_PARTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
"""Capture group -> the checkpoint projections that read its input (rounded together, rows stacked)."""

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Calibration:
    """What ``calibrate`` measured. Scales and clip values are float32 CPU tensors."""

    input_amax: dict[str, float] = field(default_factory=dict)
    """Engine projection prefix (``model.layers.3.self_attn.qkv_proj``) -> largest |input|."""
    kv_amax: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Layer index -> (largest |key| after rotary, largest |value|)."""
    awq_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    """``model.layers.{i}.{qkv,o,gate_up,down}`` -> per-input-channel scales [K]."""
    awq_clip: dict[str, torch.Tensor] = field(default_factory=dict)
    """HF weight name -> [N, K/G] largest magnitude kept per int4 group of the *folded* weight
    (see ``clip_int4_params``); v_proj, o_proj, gate_proj, up_proj and down_proj (q/k unclipped)."""
    awq_loss: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Scale group -> (output error of round-to-nearest, of the chosen scales) on the sampled rows."""
    fp8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Checkpoint projection (``model.layers.3.self_attn.q_proj``) -> its GPTQ-rounded (weight
    [N, K] float8_e4m3fn, weight_scale [N] float32), on the CPU."""
    int4_weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Checkpoint projection -> its AWQ-folded, clipped and GPTQ-rounded (qweight [N, K/2] uint8,
    scales [N, K/G], qzeros [N, K/G] uint8), on the CPU."""
    gptq_loss: dict[str, tuple[float, float]] = field(default_factory=dict)
    """``model.layers.{i}.{group}`` -> (output error of round-to-nearest, of GPTQ) on the calibration
    inputs (for int4: of the AWQ-folded weights with the clipped group parameters, on x / s)."""
    group_size: int = 128
    num_tokens: int = 0
    num_sequences: int = 0
    text: str = ""
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# The calibration text
# ----------------------------------------------------------------------------------------------


def calibration_text(text: str | os.PathLike | None = None) -> tuple[str, str]:
    """(name, content) of the calibration text: the shipped one for ``None``, a file for a path
    (a ``PathLike``, or a one-line string naming an existing file), else ``text`` itself."""
    if text is None:
        res = importlib.resources.files("kiln.runtime") / "data" / BUILTIN_TEXT
        return f"kiln:{BUILTIN_TEXT}", res.read_text(encoding="utf-8")
    if isinstance(text, os.PathLike) or ("\n" not in text and os.path.isfile(os.path.expanduser(text))):
        path = os.path.expanduser(os.fspath(text))
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    return "<text>", str(text)


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer starts every encoding with it, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [int(bos)] if probe and probe[0] == bos else []


def calibration_token_ids(tokenizer, text: str | os.PathLike | None = None, num_sequences: int = 8,
                          seq_len: int = 512) -> list[list[int]]:
    """The calibration text tokenized once and cut, in order, into at most ``num_sequences``
    sequences of ``seq_len`` tokens (each led by the BOS token where the tokenizer adds one).
    A text too short for ``num_sequences`` gives fewer; one shorter than ``seq_len`` gives one
    shorter sequence. ``tokenizer`` is a Hugging Face tokenizer (``encode``, ``bos_token_id``)."""
    if num_sequences < 1 or seq_len < 2:
        raise ValueError(f"need num_sequences >= 1 and seq_len >= 2, got {num_sequences} and {seq_len}")
    _, content = calibration_text(text)
    ids = [int(t) for t in tokenizer.encode(content, add_special_tokens=False)]
    if not ids:
        raise ValueError("the calibration text has no tokens")
    prefix = _bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    chunks = [ids[i : i + body] for i in range(0, max(len(ids) - body, 0) + 1, body)]
    return [prefix + c for c in chunks[:num_sequences]]


# ----------------------------------------------------------------------------------------------
# One layer at a time
# ----------------------------------------------------------------------------------------------


def prefill_metadata(num_tokens: int, device, sliding_window: int | None = None,
                     block_size: int = BLOCK_SIZE) -> AttentionMetadata:
    """Attention metadata of one sequence prefilled whole into blocks 0, 1, ... of its own cache."""
    nblk = -(-num_tokens // block_size)
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(nblk, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.arange(num_tokens, dtype=torch.long, device=device),
        query_lens_cpu=[num_tokens],
        seq_lens_cpu=[num_tokens],
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
        sliding_window=sliding_window,
    )


def embed(get: Fetch, sequences: Sequence[Sequence[int]], device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The embeddings [len, hidden] of each sequence, in ``dtype`` on ``device``."""
    table = get("model.embed_tokens.weight")
    out = [F.embedding(torch.tensor(list(s), dtype=torch.long, device=table.device), table) for s in sequences]
    return [e.to(device=device, dtype=dtype) for e in out]


def load_layer(get: Fetch, cfg: ModelConfig, index: int, device, dtype: torch.dtype) -> DecoderLayer:
    """Decoder layer ``index`` alone (tp=1, unquantized), its tensors cut by ``rank_slice``."""
    mapping = Mapping()
    layer = DecoderLayer(cfg, LocalShape.of(cfg, mapping), dtype, device)
    fetch = ReadOnce(get)
    for name, p in layer.named_parameters():
        src = rank_slice(f"model.layers.{index}.{name}", fetch, cfg, mapping)
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"tensor model.layers.{index}.{name} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
        p.data.copy_(src.to(dtype))
    fetch.clear()
    return layer


class LayerCapture:
    """What one layer's forward records: the largest |input| of each projection and |k|, |v|, and
    for AWQ each projection input's per-channel sum of |x| and its rows at ``rows[j]`` of
    sequence ``j`` (float32)."""

    def __init__(self, rows: list[torch.Tensor] | None = None, second_moment: bool = False):
        self.rows = rows
        self.second_moment = second_moment
        self.hess: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.k_amax = self.v_amax = None

    @staticmethod
    def _max(old, x: torch.Tensor) -> torch.Tensor:
        m = x.abs().amax().float()
        return m if old is None else torch.maximum(old, m)

    def input(self, group: str, seq: int, x: torch.Tensor) -> None:
        self.amax[group] = self._max(self.amax.get(group), x)
        if self.second_moment:
            xf = x.float()
            gram = xf.t() @ xf
            self.hess[group] = gram if group not in self.hess else self.hess[group] + gram
            if self.rows is None:
                self.count[group] = self.count.get(group, 0) + x.shape[0]
        if self.rows is None:
            return
        xf = x.float()
        s = xf.abs().sum(0)
        self.abs_sum[group] = s if group not in self.abs_sum else self.abs_sum[group] + s
        self.count[group] = self.count.get(group, 0) + x.shape[0]
        self.samples.setdefault(group, []).append(xf.index_select(0, self.rows[seq]))

    def kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_amax, self.v_amax = self._max(self.k_amax, k), self._max(self.v_amax, v)

    def mean_abs(self, group: str) -> torch.Tensor:
        return self.abs_sum[group] / self.count[group]

    def second(self, group: str) -> torch.Tensor:
        """The inputs' second moment ``mean_t x_t x_t^T`` [K, K] (float32)."""
        return self.hess[group] / self.count[group]

    def sample(self, group: str) -> torch.Tensor:
        return torch.cat(self.samples[group])


def run_layer(layer: DecoderLayer, cfg: ModelConfig, hidden: list[torch.Tensor], rope_cache: torch.Tensor,
              capture: LayerCapture | None = None) -> list[torch.Tensor]:
    """Runs ``layer`` over each sequence's hidden state [len, hidden] (replaced in place by the
    layer's output: the residual stream after the MLP, Hugging Face's ``hidden_states[i + 1]``)
    and records projection inputs and the rotated keys and values into ``capture``. The steps
    are the model's own (``Attention.forward``, ``MLP.forward``) spelled out, with the fused
    gate/up activation computed apart so that down_proj's input is seen."""
    attn, eps = layer.self_attn, layer.eps
    qkv_bias = getattr(attn.qkv_proj, "bias", None)
    for j, h in enumerate(hidden):
        t, dev = h.shape[0], h.device
        meta = prefill_metadata(t, dev, cfg.sliding_window)
        positions = torch.arange(t, device=dev)
        x = rms_norm(h, layer.input_layernorm.weight, eps)
        qkv = linear(x, attn.qkv_proj.weight, qkv_bias)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k, v = q.reshape(t, attn.nh, attn.d), k.reshape(t, attn.nkv, attn.d), v.reshape(t, attn.nkv, attn.d)
        if attn.qk_norm:
            q = rms_norm(q, attn.q_norm.weight, attn.eps)
            k = rms_norm(k, attn.k_norm.weight, attn.eps)
        shape = (meta.block_tables.shape[1], BLOCK_SIZE, attn.nkv, attn.d)
        k_cache = torch.zeros(shape, dtype=h.dtype, device=dev)
        v_cache = torch.zeros(shape, dtype=h.dtype, device=dev)
        q = rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, attn.scale).reshape(t, attn.q_size)
        if capture is not None:
            capture.input("qkv", j, x)
            capture.kv(k_cache.flatten(0, 1)[:t], v_cache.flatten(0, 1)[:t])
            capture.input("o", j, o)
        del k_cache, v_cache
        h = h + linear(o, attn.o_proj.weight)
        x = rms_norm(h, layer.post_attention_layernorm.weight, eps)
        if cfg.is_moe:
            h = h + layer.mlp(x, LocalComm())
        else:
            a = silu_and_mul_ref(linear(x, layer.mlp.gate_up_proj.weight))
            if capture is not None:
                capture.input("gate_up", j, x)
                capture.input("down", j, a)
            h = h + linear(a, layer.mlp.down_proj.weight)
        hidden[j] = h
    return hidden


# ----------------------------------------------------------------------------------------------
# AWQ: the scale search and the clip search
# ----------------------------------------------------------------------------------------------


def tied_o_mean(x_mean: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """o_proj's per-column mean |x| averaged over the query heads that share a kv head (the
    identity without grouped-query attention), so the scales derived from it can be folded
    into v_proj's rows."""
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    g = cfg.num_attention_heads // nkv
    if g == 1:
        return x_mean
    return x_mean.view(nkv, g, d).mean(1, keepdim=True).expand(nkv, g, d).reshape(-1)


def v_row_scales(s_o: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The v_proj row divisors [kv_size] of (tied) o scales [q_size]."""
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    return s_o.view(nkv, -1, d)[:, 0].reshape(-1)


def fake_quant(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16,
               scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """``kiln.kernels.quant.fake_quant_int4`` (with ``scales``/``zeros``: the round trip through
    ``quantize_int4(w, ..., scales, zeros)``), the same float32 operations in the same order but
    on [N, K/G, G] views, without expanding the group parameters or packing nibbles: the
    searches call it dozens of times per projection."""
    if scales is None or zeros is None:
        scales, zeros = int4_group_params(w, group_size, scale_dtype)
    n, k = w.shape
    sc = scales.float()[..., None]
    z = zeros.float()[..., None]
    q = torch.round(w.float().view(n, k // group_size, group_size) / sc + z).clamp_(0, 15)
    return ((q - z) * sc).view(n, k)


def search_scales(x: torch.Tensor, x_mean: torch.Tensor, w: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype = torch.float16, grid: int = SCALE_GRID) -> tuple[torch.Tensor, float, float]:
    """AWQ's scale search for one group of projections sharing the input ``x`` [T, K] (float32;
    ``w`` [N, K] is their weights stacked): for ``alpha`` in ``0, 1/grid, ...``, the scales
    ``s = x_mean ** alpha`` normalized by ``sqrt(max(s) * min(s))``, and the error
    ``|| (x / s) @ fake_quant(w * s).T - x @ w.T ||^2``. Returns (best s [K], its error, the
    error of round-to-nearest, alpha 0); ties keep the smaller alpha, so never worse than RTN."""
    base = x_mean.float().clamp(min=1e-4)
    best_s = torch.ones_like(base)
    best = rtn = None
    for i in range(grid):
        s = base.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quant(w * s, group_size, scale_dtype)
        err = float((x @ (wq / s - w).t()).square().sum())  # (x / s) @ wq.T - x @ w.T
        if rtn is None:
            rtn = best = err
            best_s = s
        elif err < best:
            best, best_s = err, s
    return best_s, best, rtn


def clip_int4_params(w: torch.Tensor, clip: torch.Tensor | None, group_size: int,
                     scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4 group parameters (scales, zeros) of w [N, K] whose groups are clamped to
    ``[-clip, clip]`` first (clip [N, K/G]; ``inf`` or ``None`` clips nothing). Quantize with
    ``quantize_int4(w, group_size, scale_dtype, scales=..., zeros=...)``: values outside the
    clipped range saturate at 0 or 15."""
    if clip is None:
        return int4_group_params(w, group_size, scale_dtype)
    n, k = w.shape
    c = clip.float().to(w.device)[..., None]
    wc = torch.clamp(w.float().view(n, k // group_size, group_size), min=-c, max=c)
    return int4_group_params(wc.reshape(n, k), group_size, scale_dtype)


def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16,
                grid: int = CLIP_GRID, max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """AWQ's clip search for one weight w [N, K] with inputs x [T, K]: for each int4 group the
    fraction ``1 - i / grid`` (down to ``1 - max_shrink``) of its largest magnitude that
    minimizes that group's share of the output error, ``sum_t (x_g . (q_g - w_g))^2``. Returns
    the clip values [N, K/G] (the unclipped group maximum where clipping does not help)."""
    n, k = w.shape
    ng = k // group_size
    xg = x.view(x.shape[0], ng, group_size).transpose(0, 1)
    gram = xg.transpose(1, 2) @ xg  # [ng, G, G]: sum_t (x_g . d)^2 = d^T (x_g^T x_g) d
    amax = w.view(n, ng, group_size).abs().amax(-1)
    best_err = torch.full((n, ng), float("inf"), device=w.device)
    best = amax.clone()
    for i in range(int(grid * max_shrink)):
        c = amax * (1 - i / grid)
        scales, zeros = clip_int4_params(w, c, group_size, scale_dtype)
        wq = fake_quant(w, group_size, scale_dtype, scales, zeros)
        d = (wq - w).view(n, ng, group_size).transpose(0, 1)  # [ng, N, G]
        err = ((d @ gram) * d).sum(-1).t()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, c, best)
    return best


def _search_layer(layer: DecoderLayer, cfg: ModelConfig, index: int, cap: LayerCapture, group_size: int,
                  scale_dtype: torch.dtype, clip: bool, calib: Calibration) -> None:
    """The scale (and clip) searches of one layer, stored into ``calib``."""
    p = f"model.layers.{index}"
    attn = layer.self_attn
    weights = {"qkv": attn.qkv_proj.weight, "o": attn.o_proj.weight}
    if not cfg.is_moe:
        weights.update(gate_up=layer.mlp.gate_up_proj.weight, down=layer.mlp.down_proj.weight)
    s: dict[str, torch.Tensor] = {}
    xs: dict[str, torch.Tensor] = {}
    for g, w in weights.items():
        x, mean = cap.sample(g), cap.mean_abs(g)
        if g == "o":
            mean = tied_o_mean(mean, cfg)
        s[g], best, rtn = search_scales(x, mean, w.float(), group_size, scale_dtype)
        xs[g] = x
        calib.awq_scales[f"{p}.{g}"] = s[g].cpu()
        calib.awq_loss[f"{p}.{g}"] = (rtn, best)
    if not clip:
        return
    q, kv = attn.q_size, attn.kv_size
    v = weights["qkv"].float()[q + kv :] * s["qkv"] / v_row_scales(s["o"], cfg)[:, None]
    folded = {"self_attn.v_proj": ("qkv", v), "self_attn.o_proj": ("o", weights["o"].float() * s["o"])}
    if not cfg.is_moe:
        gu = weights["gate_up"].float() * s["gate_up"]
        inter = gu.shape[0] // 2
        folded["mlp.gate_proj"] = ("gate_up", gu[:inter])
        folded["mlp.up_proj"] = ("gate_up", gu[inter:] / s["down"][:, None])
        folded["mlp.down_proj"] = ("down", weights["down"].float() * s["down"])
    for name, (g, w) in folded.items():
        calib.awq_clip[f"{p}.{name}.weight"] = search_clip(xs[g] / s[g], w, group_size, scale_dtype).cpu()


# ----------------------------------------------------------------------------------------------
# GPTQ rounding of FP8 weights
# ----------------------------------------------------------------------------------------------


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of ``(h + damp * mean(diag h) * I)^-1`` (float32), damping ten
    times more until the matrix factors."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean = float(torch.diag(h).mean())
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return u
        damp *= 10
    raise ValueError("GPTQ: the inputs' second moment does not factor even with heavy damping")


def _gptq(w: torch.Tensor, h: torch.Tensor, round_col: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
          code_dtype: torch.dtype, damp: float, block: int, act_order: bool) -> torch.Tensor:
    """GPTQ's loop over the columns of ``w`` [N, K]: ``round_col(col [N], j)`` gives column j's
    codes and their dequantized values, the rounding error goes onto the columns not yet rounded
    through the upper Cholesky factor of the damped inverse of ``h``, in blocks of ``block``
    columns (the lazy batch update). Returns the codes [N, K] in the original column order."""
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"GPTQ: second moment of shape {tuple(h.shape)} for a weight of {k} columns")
    h = h.to(device=w.device, dtype=torch.float32)
    order = (torch.argsort(torch.diag(h), descending=True, stable=True) if act_order
             else torch.arange(k, device=w.device))
    h = h[order][:, order].clone()
    dead = torch.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    u = _upper_inverse_factor(h, damp)
    wt = w.float()[:, order].t().contiguous()  # column order[i] of w is row i here, updated in place
    cols = order.tolist()
    out = torch.empty((k, n), dtype=code_dtype, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]
        err = torch.empty((i2 - i1, n), device=w.device)
        for i in range(i2 - i1):
            col = w1[i]
            code, deq = round_col(col, cols[i1 + i])
            out[i1 + i] = code
            torch.div(col - deq, u1[i, i], out=err[i])
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(u1[i, i + 1 :], err[i], alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    codes = torch.empty_like(out)
    codes[order] = out
    return codes.t().contiguous()


def gptq_fp8(w: torch.Tensor, h: torch.Tensor, damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK,
             act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 weight of ``w`` [N, K] rounded column by column with each column's rounding
    error spread onto the columns not yet rounded, through the inverse of the inputs' second
    moment ``h`` [K, K] (Frantar et al., 2022): what is made small is the output error
    ``(w - w_q) @ x`` on those inputs rather than each weight's own error. Rows keep the scale of
    round-to-nearest (``quantize_fp8_rows``: the row's largest magnitude / 448), and values pushed
    past it saturate. With ``act_order`` the columns are rounded in order of decreasing input
    energy (the diagonal of ``h``), so the largest inputs' columns are rounded first and the
    error lands on columns whose inputs are small; the per-row scales make the order free at
    run time (the result is stored in the original column order). Inputs never seen (a zero
    diagonal) pass no error on; with a diagonal ``h`` nothing is passed on and the result is
    round-to-nearest. Returns (weight [N, K] float8_e4m3fn, weight_scale [N] float32) on ``w``'s
    device."""
    _, scale = quantize_fp8_rows(w)

    def round_col(col, j):
        code = to_fp8(col, scale)
        return code, code.float() * scale

    return _gptq(w, h, round_col, torch.float8_e4m3fn, damp, block, act_order), scale


def gptq_int4(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK, act_order: bool = True) -> torch.Tensor:
    """GPTQ (as ``gptq_fp8``) onto asymmetric int4 groups whose parameters are fixed beforehand:
    ``scales`` / ``zeros`` [N, K/G] (round-to-nearest's, or a clip search's), so the columns may
    be rounded in activation order while every group keeps one scale and zero point and no
    input permutation is needed at run time. Values are ``round(w / scale + zero)`` clamped to
    0..15 and stand for ``(q - zero) * scale``, ``quantize_int4``'s arithmetic. Returns the codes
    [N, K] uint8 (``kiln.kernels.quant.pack_int4`` packs them)."""
    n, k = w.shape
    if k % group_size or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"GPTQ int4: group parameters of shape {tuple(scales.shape)} for a weight {tuple(w.shape)} "
                         f"in groups of {group_size}")
    sc = scales.float().to(w.device).t().contiguous()  # [K/G, N]
    z = zeros.float().to(w.device).t().contiguous()

    def round_col(col, j):
        g = j // group_size
        code = torch.round(col / sc[g] + z[g]).clamp_(0, 15)
        return code, (code - z[g]) * sc[g]

    return _gptq(w, h, round_col, torch.float32, damp, block, act_order).to(torch.uint8)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """``mean_t ||(w - wq) @ x_t||^2`` for inputs of second moment ``h``: trace(d h d^T)."""
    d = (w.float() - wq.float()).to(h.device)
    return float(((d @ h.float()) * d).sum())


def _gptq_layer(get: Fetch, cfg: ModelConfig, index: int, cap: LayerCapture, device, calib: Calibration,
                fmt: str, group_size: int = 128, scale_dtype: torch.dtype = torch.float32) -> None:
    """GPTQ rounds every projection of layer ``index`` whose input ``cap`` recorded, each group of
    projections sharing an input rounded together (rows stacked), into ``calib``.

    ``fmt="fp8"``: the checkpoint's own weights to E4M3 (``gptq_fp8``), into ``fp8_weights``.
    ``fmt="int4"``, after the AWQ scale search of the layer: every folded weight (the tensor the
    build quantizes) onto its round-to-nearest groups (unclipped: the clip search picks ranges for
    plain rounding, and GPTQ's error feedback does better with the whole range), against the
    second moment of its folded input ``x / s`` (``gptq_int4``), into ``int4_weights``."""
    p = f"model.layers.{index}"
    fetch = apply_awq_scales(get, cfg, calib) if fmt == "int4" else get
    for g, names in GPTQ_PARTS.items():
        if g not in cap.hess:
            continue
        h = cap.second(g)
        s = calib.awq_scales.get(f"{p}.{g}") if fmt == "int4" else None
        if s is not None:
            sd = s.to(device=h.device, dtype=torch.float32)
            h = h / sd[:, None] / sd[None, :]
        parts = [fetch(f"{p}.{n}.weight").to(device=device, dtype=torch.float32) for n in names]
        w = torch.cat(parts)
        if fmt == "fp8":
            wq, scale = gptq_fp8(w, h)
            rtn_w, _ = quantize_fp8_rows(w)
            rtn, deq = rtn_w.float() * scale[:, None], wq.float() * scale[:, None]
            tensors = (wq, scale)
        else:
            scales, zeros = int4_group_params(w, group_size, scale_dtype)
            qweight = pack_int4(gptq_int4(w, h, scales, zeros, group_size))
            rtn = fake_quant(w, group_size, scale_dtype, scales, zeros)
            deq = dequantize_int4(qweight, scales, zeros, group_size)
            tensors = (qweight, scales, zeros)
        calib.gptq_loss[f"{p}.{g}"] = (output_error(w, rtn, h), output_error(w, deq, h))
        into = calib.fp8_weights if fmt == "fp8" else calib.int4_weights
        start = 0
        for n, part in zip(names, parts):
            rows = slice(start, start + part.shape[0])
            into[f"{p}.{n}"] = tuple(t[rows].cpu() for t in tensors)
            start += part.shape[0]


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def _sample_rows(lengths: list[int], count: int, seed: int, device) -> list[torch.Tensor]:
    """``count`` token rows drawn without replacement over all sequences (all of them when there
    are no more), as each sequence's sorted local row indices."""
    total = sum(lengths)
    pick = torch.arange(total) if total <= count else torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
    pick, _ = pick.sort()
    out, start = [], 0
    for n in lengths:
        mine = pick[(pick >= start) & (pick < start + n)] - start
        out.append(mine.to(device))
        start += n
    return out


def calibrate(reader, *, device, dtype, sequences: Sequence[Sequence[int]], awq: bool, group_size: int = 128,
              kv: bool, activations: bool, gptq: str | None = None, progress: bool = True, clip: bool = True,
              awq_tokens: int = 256, text_name: str = "", seed: int = 0) -> Calibration:
    """Calibrates ``reader``'s model (a ``CheckpointReader``: ``config`` and ``get``) on the token
    ``sequences`` layer by layer (see the module docstring), in ``dtype`` on ``device``.

    ``activations``: each projection's largest input; ``kv``: each layer's largest key and value;
    ``awq``: the AWQ scales for int4 groups of ``group_size`` (searched on ``awq_tokens`` sampled
    rows, with the mean |x| of every row), and with ``clip`` the clip values of the folded
    weights; ``gptq``: every projection rounded by GPTQ against the second moment of its inputs
    on every calibration token, ``"fp8"`` the checkpoint's own weights to E4M3 (``gptq_fp8``),
    ``"int4"`` (with ``awq``) the folded weights onto int4 groups (``gptq_int4``).
    ``text_name`` is recorded as ``Calibration.text``."""
    t0 = time.time()
    cfg: ModelConfig = reader.config
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, dtype)
    device = torch.device(device)
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) < 1:
        raise ValueError("calibrate needs at least one non-empty sequence")
    if max(lengths) > cfg.max_position_embeddings:
        raise ValueError(f"a calibration sequence of {max(lengths)} tokens exceeds the model's "
                         f"{cfg.max_position_embeddings} positions: use shorter sequences")
    if awq:
        widths = [cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim] + ([] if cfg.is_moe else [cfg.intermediate_size])
        bad = [k for k in widths if k % group_size]
        if bad:
            raise ValueError(f"input width {bad[0]} is not a multiple of the int4 group size {group_size}")
    calib = Calibration(group_size=group_size, num_tokens=sum(lengths), num_sequences=len(lengths), text=text_name)
    if gptq not in (None, "fp8", "int4") or (gptq == "int4" and not awq):
        raise ValueError(f"gptq must be None, 'fp8' or 'int4' (with awq), got {gptq!r}")
    if not (awq or kv or activations or gptq):
        calib.seconds = time.time() - t0
        return calib
    scale_dtype = dtype
    rope = cos_sin_cache(cfg.head_dim, max(lengths), cfg.rope_theta, cfg.rope_scaling, device=device)
    rows = _sample_rows(lengths, awq_tokens, seed, device) if awq else None
    with torch.no_grad():
        hidden = embed(reader.get, sequences, device, dtype)
        bar = tqdm(range(cfg.num_hidden_layers), desc="calibrate", unit="layer", disable=not progress)
        for i in bar:
            layer = load_layer(reader.get, cfg, i, device, dtype)
            cap = LayerCapture(rows, second_moment=gptq is not None)
            run_layer(layer, cfg, hidden, rope, cap)
            if activations:
                for g, m in cap.amax.items():
                    calib.input_amax[f"model.layers.{i}.{PROJECTIONS[g]}"] = float(m)
            if kv:
                calib.kv_amax[i] = (float(cap.k_amax), float(cap.v_amax))
            if awq:
                _search_layer(layer, cfg, i, cap, group_size, scale_dtype, clip and gptq != "int4", calib)
            if gptq is not None:
                _gptq_layer(reader.get, cfg, i, cap, device, calib, gptq, group_size, scale_dtype)
            del layer, cap
    calib.seconds = time.time() - t0
    return calib


# ----------------------------------------------------------------------------------------------
# Folding the scales into the checkpoint's tensors
# ----------------------------------------------------------------------------------------------


def apply_awq_scales(get: Fetch, cfg: ModelConfig, calib: Calibration) -> Fetch:
    """Wraps a reader's ``get`` so that it returns the checkpoint's tensors with ``calib``'s AWQ
    scales folded in (float32 for every tensor it changes, the others as they are):
    ``input_layernorm / s_qkv``, q/k/v columns ``* s_qkv``, ``post_attention_layernorm / s_gu``,
    gate/up columns ``* s_gu``, up rows ``/ s_down``, down columns ``* s_down``, v rows (and
    bias) ``/ s_o`` and o columns ``* s_o``. In full precision the model computes the same."""
    scales = calib.awq_scales

    def folded(name: str) -> torch.Tensor:
        t = get(name)
        mt = _LAYER.match(name)
        if mt is None:
            return t
        p, rest = f"model.layers.{mt.group(1)}", mt.group(2)
        s_qkv, s_o = scales.get(f"{p}.qkv"), scales.get(f"{p}.o")
        s_gu, s_down = scales.get(f"{p}.gate_up"), scales.get(f"{p}.down")
        out = t.float()
        dev = t.device
        changed = False
        if rest == "input_layernorm.weight" and s_qkv is not None:
            out, changed = out / s_qkv.to(dev), True
        elif rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight") and s_qkv is not None:
            out, changed = out * s_qkv.to(dev), True
        if rest in ("self_attn.v_proj.weight", "self_attn.v_proj.bias") and s_o is not None:
            sv = v_row_scales(s_o, cfg).to(dev)
            out, changed = (out / sv[:, None] if out.dim() == 2 else out / sv), True
        if rest == "self_attn.o_proj.weight" and s_o is not None:
            out, changed = out * s_o.to(dev), True
        if rest == "post_attention_layernorm.weight" and s_gu is not None:
            out, changed = out / s_gu.to(dev), True
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight") and s_gu is not None:
            out, changed = out * s_gu.to(dev), True
        if rest == "mlp.up_proj.weight" and s_down is not None:
            out, changed = out / s_down.to(dev)[:, None], True
        if rest == "mlp.down_proj.weight" and s_down is not None:
            out, changed = out * s_down.to(dev), True
        return out if changed else t

    return folded


def fused_clip(calib: Calibration, engine_name: str, cfg: ModelConfig) -> torch.Tensor | None:
    """The clip values [N, K/G] of a whole (tp=1) fused engine projection weight, rows in
    ``rank_slice``'s order (q, k, v; gate, up): ``inf`` for q and k, which are not clipped.
    None when the calibration holds no clip for it. Use with ``clip_int4_params``."""
    mt = _LAYER.match(engine_name)
    if mt is None or not calib.awq_clip:
        return None
    p, rest = f"model.layers.{mt.group(1)}", mt.group(2)
    c = calib.awq_clip

    def part(name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        return c.get(f"{p}.{name}.weight", torch.full((rows, like.shape[1]), float("inf")))

    if rest == "self_attn.qkv_proj.weight" and f"{p}.self_attn.v_proj.weight" in c:
        v = c[f"{p}.self_attn.v_proj.weight"]
        q_rows = cfg.num_attention_heads * cfg.head_dim
        return torch.cat([part("self_attn.q_proj", q_rows, v), part("self_attn.k_proj", v.shape[0], v), v])
    if rest == "mlp.gate_up_proj.weight" and f"{p}.mlp.gate_proj.weight" in c:
        return torch.cat([c[f"{p}.mlp.gate_proj.weight"], c[f"{p}.mlp.up_proj.weight"]])
    if rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        return c.get(f"{p}.{rest}")
    return None
