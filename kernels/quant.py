"""Quantized linears: FP8 (E4M3 weights per output channel, activations per token or per tensor),
INT8 weight-only (per output channel) and INT4 weight-only (asymmetric groups along K).

The tensor layouts are those of ``docs/quantization.md``. This module holds the quantizers the
builder uses and the plain-torch references (``*_ref``) that the CPU runs and the GPU paths are
tested against; the fast GPU paths live in ``kiln.kernels.quant_triton`` and are chosen by the
dispatchers at the bottom (``fp8_linear``, ``int8_linear``, ``int4_linear``).

Every reference computes in float32 and rounds exactly where the format does: activations are
quantized to E4M3 with the documented scale, weights are dequantized exactly (an E4M3 or int8
value times a float32 scale, an int4 value minus its zero point times the group scale), the
product accumulates in float32, and the result is cast to the input's dtype once.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""The largest finite E4M3 value."""
MIN_SCALE = 1e-12
"""The smallest scale a quantizer emits: an all-zero row or group keeps a finite, positive scale."""


# ----------------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------------


def _div(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` correctly rounded on every device: a Python number as divisor makes CUDA multiply
    by its rounded reciprocal instead (one ulp off at times), so the divisor goes as a tensor."""
    return t / torch.full((), d, dtype=t.dtype, device=t.device)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x / scale).clamp(-448, 448)`` in E4M3, dividing in float32 (scale broadcasts)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel E4M3 quantization of a weight [N, K]: (weight [N, K] E4M3, scale [N] float32)."""
    scale = _div(w.float().abs().amax(dim=-1), FP8_MAX).clamp(min=MIN_SCALE)
    return to_fp8(w, scale[:, None]), scale


def fp8_input_scale(amax: float) -> float:
    """The static per-tensor activation scale for inputs whose largest magnitude is ``amax``."""
    return max(float(amax) / FP8_MAX, MIN_SCALE)


def quantize_fp8_act(x: torch.Tensor, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] in E4M3 and their float32 scale per row [M]: each row's own
    ``max|x| / 448`` (dynamic), or the calibrated ``input_scale`` [1] for every row (static)."""
    if input_scale is None:
        s = _div(x.float().abs().amax(dim=-1), FP8_MAX).clamp(min=MIN_SCALE)
    else:
        s = input_scale.float().expand(x.shape[0])
    return to_fp8(x, s[:, None]), s


def fp8_linear_ref(x, weight, weight_scale, input_scale=None, bias=None) -> torch.Tensor:
    """``y = (x_q @ weight.T) * s_x[:, None] * weight_scale[None, :] (+ bias)`` with x [M, K]."""
    xq, sx = quantize_fp8_act(x, input_scale)
    y = (xq.float() @ weight.float().t()) * sx[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# INT8 weight-only
# ----------------------------------------------------------------------------------------------


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (weight [N, K] int8, scale [N] float32), scale = amax / 127."""
    scale = _div(w.float().abs().amax(dim=-1), 127.0).clamp(min=MIN_SCALE)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_ref(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """``y = (x @ weight.T) * weight_scale (+ bias)``, the product in float32."""
    y = (x.float() @ weight.float().t()) * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# INT4 weight-only, asymmetric groups along K
# ----------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: [N, K/2] uint8 -> [N, K] uint8 values 0..15."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def int4_group_params(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest group parameters of w [N, K]: (scales [N, K/G] in ``scale_dtype``, zero
    points [N, K/G] uint8), from each group's min and max (the range always holds 0)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the int4 group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(dim=-1).clamp(max=0.0)
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = _div(hi - lo, 15.0).clamp(min=MIN_SCALE).to(scale_dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.uint8)
    return scale, zero


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16,
                  scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of w [N, K] in groups of ``group_size`` along K: (qweight [N, K/2] uint8,
    scales [N, K/G], qzeros [N, K/G] uint8). Values are rounded against the stored (rounded)
    scale, so dequantization reproduces exactly what was chosen. ``scales``/``zeros`` override
    the round-to-nearest group parameters (a clipping search passes its own)."""
    if scales is None or zeros is None:
        scales, zeros = int4_group_params(w, group_size, scale_dtype)
    n, k = w.shape
    s = scales.float().repeat_interleave(group_size, dim=-1)
    z = zeros.float().repeat_interleave(group_size, dim=-1)
    q = torch.round(w.float() / s + z).clamp(0, 15)
    return pack_int4(q), scales, zeros


def dequantize_int4(qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """float32 [N, K]: ``(q - zero) * scale`` per group (columns in stored order)."""
    q = unpack_int4(qweight).float()
    s = scales.float().repeat_interleave(group_size, dim=-1)
    z = qzeros.float().repeat_interleave(group_size, dim=-1)
    return (q - z) * s


def fake_quant_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """w after an int4 round trip (float32): what the engine would compute with."""
    return dequantize_int4(*quantize_int4(w, group_size, scale_dtype), group_size)


def int4_linear_ref(x, qweight, scales, qzeros, group_size: int, input_perm=None, bias=None) -> torch.Tensor:
    """``y = x[:, input_perm] @ dequantize_int4(...).T (+ bias)`` in float32, cast to x's dtype."""
    xf = x.float()
    if input_perm is not None:
        xf = xf.index_select(-1, input_perm.long())
    y = xf @ dequantize_int4(qweight, scales, qzeros, group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Dispatch: the GPU paths where they apply, the references elsewhere
# ----------------------------------------------------------------------------------------------


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def fp8_linear(x, weight, weight_scale, input_scale=None, bias=None) -> torch.Tensor:
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.fp8_linear(x2, weight, weight_scale, input_scale, bias)
    else:
        y = fp8_linear_ref(x2, weight, weight_scale, input_scale, bias)
    return y.reshape(*lead, y.shape[-1])


def int8_linear(x, weight, weight_scale, bias=None) -> torch.Tensor:
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.int8_linear(x2, weight, weight_scale, bias)
    else:
        y = int8_linear_ref(x2, weight, weight_scale, bias)
    return y.reshape(*lead, y.shape[-1])


def int4_linear(x, qweight, scales, qzeros, group_size: int, input_perm=None, bias=None) -> torch.Tensor:
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.int4_linear(x2, qweight, scales, qzeros, group_size, input_perm, bias)
    else:
        y = int4_linear_ref(x2, qweight, scales, qzeros, group_size, input_perm, bias)
    return y.reshape(*lead, y.shape[-1])


def fp8_linear_silu_mul_ref(x, weight, weight_scale, input_scale=None) -> torch.Tensor:
    """``silu_and_mul_ref(fp8_linear_ref(...))`` for a fused [2I, K] gate/up weight (gate rows
    first, then up rows)."""
    from kiln.kernels.activation import silu_and_mul_ref

    return silu_and_mul_ref(fp8_linear_ref(x, weight, weight_scale, input_scale))


def int8_linear_silu_mul_ref(x, weight, weight_scale) -> torch.Tensor:
    """``silu_and_mul_ref(int8_linear_ref(...))`` for a fused [2I, K] gate/up weight."""
    from kiln.kernels.activation import silu_and_mul_ref

    return silu_and_mul_ref(int8_linear_ref(x, weight, weight_scale))


def int4_linear_silu_mul_ref(x, qweight, scales, qzeros, group_size: int, input_perm=None) -> torch.Tensor:
    """``silu_and_mul_ref(int4_linear_ref(...))`` for a fused [2I, K] gate/up weight."""
    from kiln.kernels.activation import silu_and_mul_ref

    return silu_and_mul_ref(int4_linear_ref(x, qweight, scales, qzeros, group_size, input_perm))


def fp8_linear_silu_mul(x, weight, weight_scale, input_scale=None) -> torch.Tensor:
    """``silu_and_mul(fp8_linear(x, ...))`` of a fused gate/up weight, in one kernel where the
    GPU path has one."""
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.fp8_linear_silu_mul(x2, weight, weight_scale, input_scale)
    else:
        y = fp8_linear_silu_mul_ref(x2, weight, weight_scale, input_scale)
    return y.reshape(*lead, y.shape[-1])


def int8_linear_silu_mul(x, weight, weight_scale) -> torch.Tensor:
    """``silu_and_mul(int8_linear(x, ...))`` of a fused gate/up weight."""
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.int8_linear_silu_mul(x2, weight, weight_scale)
    else:
        y = int8_linear_silu_mul_ref(x2, weight, weight_scale)
    return y.reshape(*lead, y.shape[-1])


def int4_linear_silu_mul(x, qweight, scales, qzeros, group_size: int, input_perm=None) -> torch.Tensor:
    """``silu_and_mul(int4_linear(x, ...))`` of a fused gate/up weight."""
    x2, lead = _flat(x)
    if x2.is_cuda:
        from kiln.kernels import quant_triton

        y = quant_triton.int4_linear_silu_mul(x2, qweight, scales, qzeros, group_size, input_perm)
    else:
        y = int4_linear_silu_mul_ref(x2, qweight, scales, qzeros, group_size, input_perm)
    return y.reshape(*lead, y.shape[-1])
