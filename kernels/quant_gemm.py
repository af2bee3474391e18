"""Quantized linears for larger M (prefill, big decode batches): a Triton GEMM on tensor cores,
the E4M3 activation quantizer, and the ``torch._scaled_mm`` path for FP8.

* ``quantize_fp8(x, input_scale=None)``: x [M, K] -> (x_q [M, K] float8_e4m3fn, s [M] float32),
  exactly ``quant.quantize_fp8_act``: one program per row takes the row's amax in a first pass
  (or uses the static scale), then divides (correctly rounded), clamps and rounds to E4M3.
* ``q_gemm(...)``: ``tl.dot`` of 16-bit tiles whose values are exactly the format's:
  - ``fmt="int8"``: the int8 tile cast to x's dtype (exact), the float32 sum times the row scale
    at the end;
  - ``fmt="int4"``: ``q - zero`` (an integer in [-15, 15], exact in x's dtype) per group; each
    K step lies in one group (``block_k`` divides the group size), its float32 product is
    multiplied by the group scale and added to the accumulator: the reference's sum, grouped;
  - ``fmt="fp8"``: x_q and the weight tile widened to float16 (every E4M3 value is a float16),
    the float32 sum times the row's activation scale, then the weight row's scale.
  Bias is added in float32 before the one rounding to x's dtype.
* ``scaled_mm(x_q, s, weight, weight_scale, bias, out_dtype)``: ``torch._scaled_mm`` with
  rowwise scales (Hopper and later; bfloat16 output is the documented case).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from kiln.kernels import triton_ops
from kiln.kernels.gemv import _x_chunk
from kiln.kernels.quant_gemv import _dyn_scale, _e4m3, _interpreting, _row_amax
from kiln.kernels.triton_ops import _gdc_enter, _jit, tl

FMTS = {"fp8": 0, "int8": 1, "int4": 2}


class GemmConfig(NamedTuple):
    """A GEMM launch: BLOCK_M x BLOCK_N output tiles over BLOCK_K steps, Triton's num_warps and
    num_stages (software pipelining of the tile loads), and GROUP_M, how many row blocks share
    a column band in launch order (L2 reuse of weight tiles)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}g{self.group_m}"

    @classmethod
    def parse(cls, name: str) -> "GemmConfig":
        m = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(?:g(\d+))?", name)
        if m is None:
            raise ValueError(f"not a gemm config name: {name!r}")
        return cls(*(int(g) for g in m.groups() if g is not None))


# ----------------------------------------------------------------------------------------------
# Activation quantization
# ----------------------------------------------------------------------------------------------


ONE_TILE_MAX_K = 16384
"""Rows up to this width are quantized from one register tile: one read of x, no second pass."""


@_jit
def _quant_fp8_kernel(x_ptr, is_ptr, q_ptr, s_ptr, K, sxm, sqm, STATIC: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr, EMU: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    xp = x_ptr + row * sxm + offs_k
    qp = q_ptr + row * sqm + offs_k[None, :]
    _gdc_enter(PDL)
    if ONE_TILE:
        # The whole row in registers: one load, the amax, the quantized store. A loop over
        # chunks waits on memory twice per chunk, which at a few programs per SM is most of
        # the kernel's time.
        x = _x_chunk(xp, 0, K, offs_k, EVEN_K)
        if STATIC:
            s = tl.load(is_ptr).to(tl.float32)
        else:
            s = _dyn_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        r = tl.math.div_rn(1.0, s)
        xq = _e4m3(x, s, r, EMU).to(tl.float8e4nv)
        if EVEN_K:
            tl.store(qp, xq)
        else:
            tl.store(qp, xq, mask=(offs_k < K)[None, :])
    else:
        if STATIC:
            s = tl.load(is_ptr).to(tl.float32)
        else:
            s = _dyn_scale(_row_amax(xp, K, offs_k, EVEN_K, BLOCK_K))
        r = tl.math.div_rn(1.0, s)
        for k0 in range(0, K, BLOCK_K):
            xq = _e4m3(_x_chunk(xp, k0, K, offs_k, EVEN_K), s, r, EMU).to(tl.float8e4nv)
            if EVEN_K:
                tl.store(qp + k0, xq)
            else:
                tl.store(qp + k0, xq, mask=(k0 + offs_k < K)[None, :])
    tl.store(s_ptr + row, s)


def quantize_fp8(x: torch.Tensor, input_scale: torch.Tensor | None = None,
                 one_tile_max_k: int = ONE_TILE_MAX_K) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize_fp8_act`` by one Triton kernel: (x_q [M, K] float8_e4m3fn, s [M] float32).
    One program per row; rows of at most ``one_tile_max_k`` values are read once, as one tile."""
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, s
    one = k <= one_tile_max_k
    bk = triton_ops._pow2(k) if one else 2048
    warps = 4 if bk <= 1024 else 8 if bk <= 4096 else 16
    _quant_fp8_kernel[(m,)](
        x, input_scale if input_scale is not None else s, xq, s, k, x.stride(0), xq.stride(0),
        STATIC=input_scale is not None, EVEN_K=k % bk == 0, BLOCK_K=bk, ONE_TILE=one, EMU=_interpreting(),
        num_warps=warps, **triton_ops.launch_opts(x),
    )
    return xq, s


def scaled_mm(xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq @ weight.T) * sx[:, None] * weight_scale[None, :] (+ bias)`` by ``torch._scaled_mm``
    with rowwise scales, precise (not fast) accumulation."""
    return torch._scaled_mm(xq, weight.t(), scale_a=sx.view(-1, 1), scale_b=weight_scale.view(1, -1), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=False)


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------


@_jit
def _q_gemm_kernel(
    x_ptr, w_ptr, ws_ptr, z_ptr, sx_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, ssn, szn, sym,
    FMT: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * sxm + offs_k[None, :]
    if FMT == 2:
        offs_b = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + rows_n[:, None] * swn + offs_b[None, :]
    else:
        w_ptrs = w_ptr + rows_n[:, None] * swn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    _gdc_enter(PDL)
    for k0 in range(0, K, BLOCK_K):
        if FMT == 2:  # K is a multiple of the group size, which BLOCK_K divides
            a = tl.load(x_ptrs + k0)
            p = tl.load(w_ptrs + k0 // 2).to(tl.int32)
            g = k0 // G
            z = tl.load(z_ptr + rows_n * szn + g).to(tl.int32)
            s = tl.load(ws_ptr + rows_n * ssn + g).to(tl.float32)
            q = tl.reshape(tl.join(p & 15, p >> 4), [BLOCK_N, BLOCK_K])
            b = (q - z[:, None]).to(tl.float32).to(a.dtype)
            acc += tl.dot(a, tl.trans(b)) * s[None, :]
        else:
            if EVEN_K:
                a = tl.load(x_ptrs + k0)
                w = tl.load(w_ptrs + k0)
            else:
                k_mask = (k0 + offs_k < K)[None, :]
                a = tl.load(x_ptrs + k0, mask=k_mask, other=0.0)
                w = tl.load(w_ptrs + k0, mask=k_mask, other=0.0)
            if FMT == 0:
                a = a.to(tl.float16)
                b = w.to(tl.float16)
            else:  # int8 -> float32 -> 16-bit, exact (and what int -> bfloat16 lowers to anyway)
                b = w.to(tl.float32).to(a.dtype)
            acc = tl.dot(a, tl.trans(b), acc)

    if FMT == 0:
        acc = acc * tl.load(sx_ptr + rows_m).to(tl.float32)[:, None]
    if FMT != 2:
        acc = acc * tl.load(ws_ptr + rows_n).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * sym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def q_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, config: GemmConfig, *, fmt: str,
           zeros: torch.Tensor | None = None, group_size: int = 0, x_scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The product of x [M, K] and a quantized weight by the Triton GEMM with ``config``:

    * ``fmt="fp8"``: x is x_q (float8_e4m3fn) with its row scales ``x_scale`` [M]; w float8
      [N, K] with ``w_scale`` [N]; the result in ``out_dtype``;
    * ``fmt="int8"``: x bfloat16/float16, w int8 [N, K], ``w_scale`` [N];
    * ``fmt="int4"``: x bfloat16/float16, w the packed qweight [N, K/2], ``w_scale`` the group
      scales [N, K/G], ``zeros`` the zero points [N, K/G]; ``group_size`` a multiple of block_k.
    """
    assert x.dim() == 2 and w.dim() == 2 and x.stride(1) == 1 and w.stride(1) == 1
    f = FMTS[fmt]
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk, warps, stages, gm = config
    if f == 2:
        assert 2 * w.shape[1] == k and zeros is not None and k % group_size == 0 and group_size % bk == 0
        assert w_scale.stride(1) == 1 and zeros.stride(1) == 1
    else:
        assert w.shape[1] == k and w_scale.is_contiguous()
    if f == 0:
        assert x.dtype == torch.float8_e4m3fn and x_scale is not None and out_dtype is not None
    else:
        assert x.dtype in (torch.bfloat16, torch.float16), "the int GEMM takes 16-bit activations"
        out_dtype = x.dtype
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    if m == 0 or n == 0:
        return out
    grid = (triton_ops._cdiv(m, bm) * triton_ops._cdiv(n, bn),)
    _q_gemm_kernel[grid](
        x, w, w_scale, zeros if zeros is not None else w_scale, x_scale if x_scale is not None else w_scale,
        bias if bias is not None else w_scale, out, m, n, k, x.stride(0), w.stride(0),
        w_scale.stride(0) if f == 2 else 0, zeros.stride(0) if f == 2 else 0, out.stride(0),
        FMT=f, G=int(group_size) if f == 2 else 1, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
        **triton_ops.launch_opts(x),
    )
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# Starting points (not yet measured on a GPU): small BLOCK_M for decode batches, the usual
# Hopper shapes for prefill; block_k 32/64 for small int4 groups.
GEMM_CONFIGS = [
    GemmConfig(*c) for c in [
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 32, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 3),
        (64, 64, 128, 4, 3), (64, 64, 32, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
    ]
]


def gemm_fits(c: GemmConfig, m: int, fmt: str, group_size: int = 0) -> bool:
    """Whether a config is worth trying for M rows: BLOCK_M at most the power of two at or above
    M (at least 16), int4 steps inside one group, and shared memory for the pipelined tiles
    within 200 KB."""
    m = max(int(m), 1)
    if c.block_m > max(16, triton_ops._pow2(m)):
        return False
    if fmt == "int4" and (group_size <= 0 or group_size % c.block_k):
        return False
    wbytes = {"fp8": 1.0, "int8": 1.0, "int4": 0.5}[fmt]
    smem = c.num_stages * (c.block_m * c.block_k * (1 if fmt == "fp8" else 2) + c.block_n * c.block_k * wbytes)
    return smem + 2 * c.block_n * c.block_k <= 200 * 1024


def gemm_configs(m: int, fmt: str, group_size: int = 0, full: bool = False) -> list[GemmConfig]:
    """The GEMM configs ``tune`` tries for M rows (``full``: a wider grid)."""
    if full:
        src = [GemmConfig(bm, bn, bk, w, s) for bm in (16, 32, 64, 128) for bn in (64, 128, 256)
               for bk in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    else:
        src = GEMM_CONFIGS
    return [c for c in src if gemm_fits(c, m, fmt, group_size)]
