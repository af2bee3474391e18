"""RMSNorm, alone and fused with the residual add.

``rms_norm_ref`` and ``add_rms_norm_ref`` are the plain-torch references (CPU and tests);
``rms_norm`` and ``add_rms_norm`` dispatch once per device to the fastest available path.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 and cast back."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds ``x`` to ``residual`` and normalises the sum. Returns (normed, new residual)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            return triton_ops.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            return triton_ops.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)
