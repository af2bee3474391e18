"""The model's projections: one module per projection holding the tensors of its quantization
method (``docs/quantization.md``) and running the matching kernel.

A 16-bit projection holds ``weight`` (and ``bias``) and runs ``kiln.kernels.gemv.linear``, the
tuned GEMV / cuBLAS path; a quantized one holds its method's tensors and runs
``kiln.kernels.quant``. Tensor names and shapes are the engine file's, so the builder's layout
(``rank_layout``) and the loader follow from constructing the model.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.kernels import quant as q
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.gemv import linear, linear_silu_mul
from kiln.runtime.config import LinearQuant

PARTS = ("weight", "bias", "weight_scale", "input_scale", "qweight", "scales", "qzeros", "input_perm")
"""Every tensor name a projection may hold."""


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def part_shapes(n: int, k: int, quant: LinearQuant, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors (without the bias) of an [n, k] projection under ``quant``: name -> (shape, dtype)."""
    m = quant.method
    if m == "none":
        return {"weight": ((n, k), dtype)}
    if m == "fp8":
        out = {"weight": ((n, k), q.FP8), "weight_scale": ((n,), torch.float32)}
        if quant.static_activations:
            out["input_scale"] = ((1,), torch.float32)
        return out
    if m == "int8-weight":
        return {"weight": ((n, k), torch.int8), "weight_scale": ((n,), torch.float32)}
    g = quant.group_size
    if k % g:
        raise ValueError(f"input width {k} is not a multiple of the int4 group size {g}")
    out = {"qweight": ((n, k // 2), torch.uint8), "scales": ((n, k // g), dtype), "qzeros": ((n, k // g), torch.uint8)}
    if quant.input_perm:
        out["input_perm"] = ((k,), torch.int32)
    return out


class Projection(nn.Module):
    """``y = x @ W.T (+ bias)`` for x [..., in_features], W stored as ``quant`` says."""

    def __init__(self, out_features: int, in_features: int, *, dtype, device, quant: LinearQuant | None = None,
                 bias: bool = False):
        super().__init__()
        self.quant = quant or LinearQuant()
        self.method = self.quant.method
        self.out_features, self.in_features = out_features, in_features
        for name, (shape, dt) in part_shapes(out_features, in_features, self.quant, dtype).items():
            setattr(self, name, _param(*shape, dtype=dt, device=device))
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        if self.method == "fp8" and not self.quant.static_activations:
            self.input_scale = None
        if self.method == "int4" and not self.quant.input_perm:
            self.input_perm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m == "none":
            return linear(x, self.weight, self.bias)
        if m == "fp8":
            return q.fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)
        if m == "int8-weight":
            return q.int8_linear(x, self.weight, self.weight_scale, self.bias)
        return q.int4_linear(x, self.qweight, self.scales, self.qzeros, self.quant.group_size, self.input_perm, self.bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a fused gate/up projection (gate rows first, then up rows)."""
        if self.method == "none":
            return linear_silu_mul(x, self.weight)
        if x.is_cuda:
            from kiln.kernels import quant_triton as qt

            x2 = x.reshape(-1, x.shape[-1])
            if self.method == "fp8":
                y = qt.fp8_linear_silu_mul(x2, self.weight, self.weight_scale, self.input_scale)
            elif self.method == "int8-weight":
                y = qt.int8_linear_silu_mul(x2, self.weight, self.weight_scale)
            else:
                y = qt.int4_linear_silu_mul(x2, self.qweight, self.scales, self.qzeros, self.quant.group_size, self.input_perm)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return silu_and_mul(self(x))

    def weight_bytes(self) -> int:
        """Bytes of this projection's tensors (what one decode step reads)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())
