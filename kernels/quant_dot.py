"""FP8 products for few rows on the tensor cores: ``fp8_linear_ref`` of x [M, K] (M up to a few
dozen) and an E4M3 weight [N, K], computed as ``y.T = w @ x_q.T``.

Why: the CUDA-core GEMV of ``kiln.kernels.quant_gemv`` widens every E4M3 weight to float32
before its multiply-add, and those conversions, not the memory, bound it at decode sizes. Here the
weight tile goes to the tensor cores as it is stored: each program owns ``BLOCK_N`` weight rows
(the MMA's M side, 64 or more fills it) and the x rows of one ``BLOCK_M`` block (the MMA's N side,
16 or 32), walks K in ``BLOCK_K`` chunks whose loads Triton pipelines through shared memory over
``num_stages`` stages, and only the small x tile is quantized in the kernel.

Rounding is the reference's: a first pass takes each x row's amax (dynamic) or uses the static
``input_scale``; x is divided by the row scale (the correctly rounded quotient, as
``quant_gemv._e4m3``), clamped to +-448 and rounded to E4M3; E4M3 products are exact and are
summed in float32 (the MMA's reduced-precision accumulation is promoted every 32 products); the sum is multiplied by the row's scale and then the
weight row's scale, plus the bias. With ``glu`` the weight is the fused [2I, K] gate/up
projection: each program holds a gate tile and the matching up tile, and writes
``silu(gate) * up`` with the unfused path's rounding points.

Under Triton's interpreter the E4M3 rounding is done in float arithmetic and the product is
taken in float32 (exact for E4M3 operands), so the CPU runs the same function.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from kiln.kernels import triton_ops
from kiln.kernels.quant_gemv import _dyn_scale, _e4m3, _interpreting
from kiln.kernels.triton_ops import _gdc_enter, _jit, tl

__all__ = ["DotConfig", "fp8_dot", "dot_configs", "dot_fits", "DOT_MAX_M"]

DOT_MAX_M = 32
"""The most x rows the kernel is a candidate for (more take the GEMM or ``_scaled_mm``)."""


class DotConfig(NamedTuple):
    """BLOCK_N weight rows and BLOCK_K columns per tile, BLOCK_M x rows, Triton's num_warps and
    num_stages (shared-memory pipeline depth)."""

    block_n: int
    block_k: int
    block_m: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"n{self.block_n}k{self.block_k}m{self.block_m}w{self.num_warps}s{self.num_stages}"

    @classmethod
    def parse(cls, name: str) -> "DotConfig":
        m = re.fullmatch(r"n(\d+)k(\d+)m(\d+)w(\d+)s(\d+)", name)
        if m is None:
            raise ValueError(f"not a dot config name: {name!r}")
        return cls(*(int(g) for g in m.groups()))


@_jit
def _x_tile(x_ptrs, k0, K, offs_k, m_ok):
    """x^T chunk [BLOCK_K, BLOCK_M] in float32 (rows past M and columns past K read 0)."""
    return tl.load(x_ptrs + k0, mask=m_ok[None, :] & (k0 + offs_k < K)[:, None], other=0.0).to(tl.float32)


@_jit
def _wq_tile(w_ptrs, k0, K, offs_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        w = tl.load(w_ptrs + k0)
    else:
        w = tl.load(w_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0)
    return w


@_jit
def _mma(w, xq, EMU: tl.constexpr):
    """One chunk's [BLOCK_N, BLOCK_M] sums of E4M3 products, in float32."""
    if EMU:
        p = tl.dot(w.to(tl.float32), xq, input_precision="ieee")
    else:
        # Hopper's FP8 MMA adds into its accumulator with fewer bits than float32 unless told
        # otherwise (Triton's sm_90 default lets all of K accumulate that way); promoting after
        # every 32 products keeps the float32 sum the reference takes.
        p = tl.dot(w, xq.to(tl.float8e4nv), max_num_imprecise_acc=32)
    return p


@_jit
def _fp8_dot_kernel(
    x_ptr, w_ptr, ws_ptr, is_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym,
    STATIC: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, EMU: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wrow = tl.minimum(rows, N - 1)  # rows past N read row N - 1; the store drops them
    w_ptrs = w_ptr + wrow.to(tl.int64)[:, None] * swn + offs_k[None, :]
    if GLU:
        u_ptrs = w_ptrs + N.to(tl.int64) * swn
    x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * sxm + offs_k[:, None]
    ws = tl.load(ws_ptr + wrow)
    if GLU:
        wsu = tl.load(ws_ptr + N + wrow)
    _gdc_enter(PDL)
    if STATIC:
        s = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(is_ptr)
    else:
        a = tl.zeros([BLOCK_K, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.maximum(a, tl.abs(_x_tile(x_ptrs, k0, K, offs_k, m_ok)))
        s = _dyn_scale(tl.max(a, axis=0))
    r = tl.math.div_rn(tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0, s)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if GLU:
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xq = _e4m3(_x_tile(x_ptrs, k0, K, offs_k, m_ok), s[None, :], r[None, :], EMU)
        acc += _mma(_wq_tile(w_ptrs, k0, K, offs_k, EVEN_K), xq, EMU)
        if GLU:
            acc_u += _mma(_wq_tile(u_ptrs, k0, K, offs_k, EVEN_K), xq, EMU)
    n_ok = rows < N
    out = y_ptr + offs_m.to(tl.int64)[None, :] * sym + rows[:, None]
    mask = n_ok[:, None] & m_ok[None, :]
    dt = y_ptr.dtype.element_ty
    y = acc * s[None, :] * ws[:, None]
    if GLU:
        g = y.to(dt).to(tl.float32)
        u = (acc_u * s[None, :] * wsu[:, None]).to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(out, (act * u).to(dt), mask=mask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out, y.to(dt), mask=mask)


def fp8_dot(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, config: DotConfig, *,
            input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, glu: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``quant.fp8_linear_ref`` of x [M, K] and the E4M3 weight [N, K] with per-row scale
    ``w_scale`` [N] (float32), activations quantized per row or with the static ``input_scale``
    [1], by the tensor-core kernel with ``config``. Returns (or fills) [M, N] in x's dtype; with
    ``glu``, [M, N / 2] = ``silu(gate) * up`` of the fused gate/up weight (no bias)."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.stride(1) == 1 and w.stride(1) == 1 and w_scale.is_contiguous() and w.dtype == torch.float8_e4m3fn
    assert not glu or (bias is None and w.shape[0] % 2 == 0), "glu takes an even gate/up weight and no bias"
    bn, bk, bm, warps, stages = config
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    if m == 0 or n == 0:
        return out
    grid = (triton_ops._cdiv(n, bn), triton_ops._cdiv(m, bm))
    _fp8_dot_kernel[grid](
        x, w, w_scale, input_scale if input_scale is not None else w_scale, bias if bias is not None else w_scale,
        out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        STATIC=input_scale is not None, HAS_BIAS=bias is not None, GLU=glu, EVEN_K=k % bk == 0,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, EMU=_interpreting(), num_warps=warps, num_stages=stages,
        **triton_ops.launch_opts(x),
    )
    return out


def dot_fits(c: DotConfig, m: int, glu: bool = False) -> bool:
    """Shared memory (the pipelined weight tiles, 1 byte an element, two with glu, and the x
    tiles) within 160 KB; float32 accumulators at most 64 registers a thread; BLOCK_M no larger
    than the rows need (16 is the MMA's smallest)."""
    if c.block_m > max(16, triton_ops._pow2(max(int(m), 1))) or c.block_k < 32:
        return False
    tiles = (2 if glu else 1) * c.block_n * c.block_k + 4 * c.block_k * c.block_m
    accs = (2 if glu else 1) * c.block_n * c.block_m // (32 * c.num_warps)
    return c.num_stages * tiles <= 160 * 1024 and accs <= 64


DOT_CONFIGS = [DotConfig(bn, bk, bm, w, s) for bm in (16, 32) for bn, bk, w, s in (
    (64, 256, 4, 4), (64, 512, 4, 3), (64, 128, 4, 6), (128, 256, 4, 4), (128, 128, 8, 5), (32, 512, 4, 4),
    (64, 256, 8, 5), (128, 512, 8, 3),
)]


def dot_configs(m: int, glu: bool = False, full: bool = False) -> list[DotConfig]:
    """The configs ``quant_tune`` tries for M rows (``full``: a wider grid)."""
    src = DOT_CONFIGS
    if full:
        src = [DotConfig(bn, bk, bm, w, s) for bm in (16, 32) for bn in (32, 64, 128) for bk in (128, 256, 512)
               for w in (4, 8) for s in (3, 4, 5, 6)]
    return [c for c in src if dot_fits(c, m, glu)]
