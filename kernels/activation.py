"""SiLU-and-multiply: ``silu(gate) * up`` over a fused [.., 2 * I] gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            return triton_ops.silu_and_mul(x)
    return silu_and_mul_ref(x)
