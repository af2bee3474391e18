"""Quantization at build time: which layout the engine's projections get, and a checkpoint
``get`` that returns every projection tensor in that layout.

``linear_quant_for`` decides the layout from the build flags and the checkpoint (a checkpoint
that is already quantized is kept as it is). ``QuantizedSource`` wraps a reader's ``get`` so
that ``model.layers.3.self_attn.q_proj.weight_scale`` (any part of docs/quantization.md) comes
back quantized from the whole, unsplit checkpoint tensor; the partition rules then cut each
part for its rank, so every tensor-parallel layout holds the same numbers. The KV cache's
per-layer scales come from the same source.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Callable

import torch

from kiln.kernels import quant as q
from kiln.runtime.config import BuildConfig, LinearQuant, QuantizationInfo

_HF_PROJ = re.compile(r"^(model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.(\w+)$")
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([kv])_scale$")
_ENGINE_PROJ = {
    "self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj", "mlp.down_proj": "mlp.down_proj",
}


KV_HEADROOM = 2.0
"""The FP8 KV cache scales hold this multiple of the calibration text's largest |k| and |v|: served
text goes past the calibration's range (the held-out text of the accuracy table by up to 21% in
a layer), and a clamped key costs far more than a rounded one. A power of two moves no value's
E4M3 rounding; only values below 2^-14 of the largest lose precision to the subnormal range."""


class QuantizationError(ValueError):
    """A quantization request that cannot be met; one line naming the problem and the fix."""


def engine_projection(hf_base: str) -> str:
    """'model.layers.3.self_attn.k_proj' -> 'model.layers.3.self_attn.qkv_proj'."""
    m = _HF_PROJ.match(hf_base + ".weight")
    if m is None:
        raise KeyError(hf_base)
    return f"model.layers.{m.group(2)}.{_ENGINE_PROJ[m.group(3)]}"


def linear_quant_for(build: BuildConfig, checkpoint_quant=None) -> LinearQuant:
    """The projections' layout: the checkpoint's own quantization when it has one (``--quant``
    must then be ``none`` or the same method), otherwise the one ``--quant`` asks for."""
    kv = build.kv_cache_dtype == "fp8"
    if checkpoint_quant is not None:
        cq = checkpoint_quant
        same = {"fp8": "fp8", "int4": "int4-awq"}[cq.method]
        if build.quant not in ("none", same):
            raise QuantizationError(
                f"the checkpoint is already quantized ({cq.format}, {cq.method}) and is read as it is: "
                f"drop --quant {build.quant} (or pass --quant {same})")
        if build.activation_scales == "static" and not (cq.method == "fp8" and cq.activation == "static"):
            raise QuantizationError("--calibration static needs a checkpoint without its own activation scheme: "
                                    f"this one is {cq.format} with {cq.activation or 'no'} activation quantization")
        return LinearQuant(method=cq.method, static_activations=cq.activation == "static",
                           group_size=cq.group_size or 128, input_perm=cq.desc_act, kv_fp8=kv)
    method = {"none": "none", "fp8": "fp8", "int8-weight": "int8-weight", "int4-awq": "int4"}[build.quant]
    return LinearQuant(method=method, static_activations=build.activation_scales == "static",
                       group_size=build.group_size, kv_fp8=kv)


class QuantizedSource:
    """A ``Fetch`` over a checkpoint's ``get`` that returns projection parts in ``quant``'s layout.

    ``get`` may already be wrapped (AWQ's folded scales). ``calibration`` supplies static
    activation scales, the KV cache scales and AWQ clipping; without one the KV scales are 1.0.
    ``checkpoint`` is the reader when it holds quantized tensors of its own (taken as they are).
    The last few projections' parts are kept, so q/k/v or gate/up parts are quantized once."""

    def __init__(self, get: Callable[[str], torch.Tensor], quant: LinearQuant, scale_dtype: torch.dtype,
                 calibration=None, checkpoint=None, keep: int = 8):
        self.get = get
        self.quant = quant
        self.scale_dtype = scale_dtype
        self.calibration = calibration
        self.checkpoint = checkpoint if getattr(checkpoint, "quant", None) is not None else None
        self._parts: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._keep = keep

    def __call__(self, name: str) -> torch.Tensor:
        kv = _KV_SCALE.match(name)
        if kv is not None:
            return self._kv_scale(int(kv.group(1)), kv.group(2))
        m = _HF_PROJ.match(name)
        if m is None or self.quant.method == "none" or m.group(4) == "bias":
            return self.get(name)
        base, part = m.group(1), m.group(4)
        parts = self._parts.get(base)
        if parts is None:
            parts = self._quantize(base)
            self._parts[base] = parts
            while len(self._parts) > self._keep:
                self._parts.popitem(last=False)
        if part not in parts:
            raise KeyError(f"projection {base} has no '{part}' in the {self.quant.method} layout")
        return parts[part]

    def _kv_scale(self, layer: int, which: str) -> torch.Tensor:
        amax = None
        if self.calibration is not None:
            amax = self.calibration.kv_amax[layer][0 if which == "k" else 1]
        return torch.tensor([q.fp8_input_scale(amax * KV_HEADROOM) if amax is not None else 1.0], dtype=torch.float32)

    def _quantize(self, base: str) -> dict[str, torch.Tensor]:
        if self.checkpoint is not None and self.checkpoint.is_quantized(base):
            return dict(self.checkpoint.get_quantized(base))
        w = self.get(base + ".weight")
        method = self.quant.method
        if method == "fp8":
            rounded = getattr(self.calibration, "fp8_weights", {}).get(base)
            weight, scale = rounded if rounded is not None else q.quantize_fp8_rows(w)
            out = {"weight": weight, "weight_scale": scale}
            if self.quant.static_activations:
                amax = self.calibration.input_amax[engine_projection(base)] if self.calibration is not None else None
                if amax is None:
                    raise QuantizationError("static FP8 activation scales need calibration: build with --calibration dynamic")
                out["input_scale"] = torch.tensor([q.fp8_input_scale(amax)], dtype=torch.float32)
            return out
        if method == "int8-weight":
            weight, scale = q.quantize_int8_rows(w)
            return {"weight": weight, "weight_scale": scale}
        g = self.quant.group_size
        rounded = getattr(self.calibration, "int4_weights", {}).get(base)
        if rounded is not None:
            qweight, scales, zeros = rounded
            return {"qweight": qweight, "scales": scales.to(self.scale_dtype), "qzeros": zeros}
        clip = getattr(self.calibration, "awq_clip", None) or {}
        scales = zeros = None
        if base + ".weight" in clip:
            scales, zeros = _clipped_params(w, clip[base + ".weight"], g, self.scale_dtype)
        qweight, scales, zeros = q.quantize_int4(w, g, self.scale_dtype, scales, zeros)
        return {"qweight": qweight, "scales": scales, "qzeros": zeros}


def _clipped_params(w: torch.Tensor, max_abs: torch.Tensor, group_size: int, scale_dtype):
    """int4 group parameters of w with each group clipped to [-max_abs, max_abs] first."""
    n, k = w.shape
    lim = max_abs.float().to(w.device).repeat_interleave(group_size, dim=-1)
    wc = torch.maximum(torch.minimum(w.float(), lim), -lim)
    return q.int4_group_params(wc.reshape(n, k), group_size, scale_dtype)


def _needs_calibration(quant: LinearQuant, build: BuildConfig, from_checkpoint: bool) -> tuple[bool, bool, bool, bool]:
    """(AWQ search, KV scales, static activation scales, GPTQ rounding) that this build must calibrate."""
    awq = quant.method == "int4" and not from_checkpoint
    act = quant.method == "fp8" and quant.static_activations and not from_checkpoint
    gptq = not from_checkpoint and ((quant.method == "fp8" and build.fp8_rounding == "gptq")
                                    or (quant.method == "int4" and build.int4_search == "awq+gptq"))
    return awq, quant.kv_fp8, act, gptq


def prepare_source(reader, build: BuildConfig, quant: LinearQuant, *, tokenizer_dir: str | None, device, dtype,
                   weights_at_load: bool = False, progress: bool = True, calibration_text: str | None = None,
                   random_weights: bool = False) -> tuple[Callable[[str], torch.Tensor], QuantizationInfo | None]:
    """The fetch the builder cuts rank tensors from, and engine.json's quantization record.

    Runs the calibration the layout needs (AWQ's scale search for int4 built here, GPTQ's
    rounding for fp8 built here, the KV cache scales, static FP8 activation scales) on the
    shipped calibration text, or ``calibration_text``; random weights skip the AWQ search and
    GPTQ (round-to-nearest, recorded as such), and weights drawn at load take no calibration at
    all (KV scales 1.0)."""
    from_ckpt = getattr(reader, "quant", None) is not None
    awq, kv, act, gptq = _needs_calibration(quant, build, from_ckpt)
    if random_weights or build.int4_search == "rtn":
        awq = False
    if random_weights or weights_at_load or (quant.method == "int4" and not awq):
        gptq = False
    if calibration_text is not None:
        if not (awq or kv or act or gptq) or weights_at_load:
            raise QuantizationError("--calibration-text applies only to builds that calibrate (--quant int4-awq with the AWQ "
                                    "search, --quant fp8 with GPTQ rounding, --kv-cache-dtype fp8, or --calibration static): "
                                    "drop it")
        if not os.path.isfile(calibration_text):
            raise QuantizationError(f"calibration text '{calibration_text}' does not exist: pass a UTF-8 text file")
    if quant.method == "none" and not quant.kv_fp8:
        return reader.get, None
    if weights_at_load and act:
        raise QuantizationError("static FP8 activation scales need calibration, which weights drawn at load cannot have: "
                                "build with --calibration dynamic or without --weights-at-load")
    calib = None
    if (awq or kv or act or gptq) and not weights_at_load:
        from transformers import AutoTokenizer

        from kiln.runtime import calibrate as cal

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        text = open(calibration_text).read() if calibration_text else None
        seqs = cal.calibration_token_ids(tok, text, seq_len=min(512, reader.config.max_position_embeddings))
        calib = cal.calibrate(reader, device=device, dtype=dtype, sequences=seqs, awq=awq, group_size=quant.group_size,
                              kv=kv, activations=act, gptq=(quant.method if gptq else None), progress=progress)
    get = reader.get
    if calib is not None and awq:
        from kiln.runtime.calibrate import apply_awq_scales

        get = apply_awq_scales(get, reader.config, calib)
    source = QuantizedSource(get, quant, dtype, calib, reader)
    info = QuantizationInfo(
        linear=quant,
        source=f"checkpoint:{reader.quant.format}" if from_ckpt else "build",
        search=_search(quant, from_ckpt, awq, gptq),
        weight_scales=_scale_layout(quant),
        kv_scales=None if not quant.kv_fp8 else (
            f"per layer, calibrated: {KV_HEADROOM:g} x the largest |k| and |v| on the calibration text / 448" if calib is not None
            else "1.0 (weights drawn at load: no calibration)"),
        calibration=None if calib is None else {
            "text": calibration_text or "kiln/runtime/data/calibration.txt", "sequences": calib.num_sequences,
            "tokens": calib.num_tokens, "seconds": round(calib.seconds, 2),
            "awq_search": awq, "gptq": gptq, "kv_scales": kv, "activation_scales": act},
    )
    return source, info


def _search(quant: LinearQuant, from_checkpoint: bool, awq: bool, gptq: bool) -> str:
    """engine.json's ``search``: how the weights quantized here were rounded."""
    if from_checkpoint or quant.method in ("none", "int8-weight"):
        return "none"
    if quant.method == "int4":
        return ("awq+gptq" if gptq else "awq") if awq else "rtn"
    return "gptq" if gptq else "rtn"


def _scale_layout(quant: LinearQuant) -> str:
    m = quant.method
    if m == "fp8":
        act = "static per tensor (input_scale [1])" if quant.static_activations else "dynamic per token"
        return f"weight_scale [N] float32 per output channel; activations {act}"
    if m == "int8-weight":
        return "weight_scale [N] float32 per output channel, symmetric"
    if m == "int4":
        return f"scales and qzeros [N, K/{quant.group_size}] per group of {quant.group_size} input columns, asymmetric"
    return "none"
