"""Skinny products of quantized weights for decode: ``y = x @ w.T`` for x [M, K] with small M
(1 to a few rows) and w an FP8 (E4M3), INT8 or INT4 weight in the layouts of
``docs/quantization.md``. At these sizes the product only streams the weight once, so what
counts is reading it at the memory's bandwidth: 1 byte an element for FP8 and INT8, half a
byte for INT4.

The kernels follow ``kiln.kernels.gemv``: each program owns ``BLOCK_N`` weight rows and walks K
in ``BLOCK_K`` chunks; up to four x rows share each weight tile read (``rows``); the next
``num_stages - 1`` tiles are loaded into registers ahead of use, with ``evict_first``; the
first tiles load before the programmatic-dependent-launch wait, the activations after it.

* ``_q8_gemv_kernel`` (FP8 and INT8). INT8 values are decoded exactly with the 2^23 float
  trick (one integer add, one float subtract). FP8: the x rows are quantized in the kernel,
  exactly as ``quant.quantize_fp8_act`` does: a first pass over each row takes its amax (the
  row is small and stays in L1/L2), then every chunk is divided by the row's scale (a
  correctly rounded quotient, from the reciprocal and one FMA correction), clamped to +-448 and
  rounded to E4M3. The E4M3 products accumulate in float32; the sum is multiplied by the row's
  scale and then the weight row's scale, as the reference does.
  With ``x_scale`` (FP8 only) x is already x_q (E4M3, from ``quant_gemm.quantize_fp8``) with
  its row scales, and the kernel only widens it: one small kernel quantizes x once instead of
  every program quantizing its chunks (``quant_triton``'s "gemv-pre" path).
  With ``weight_only`` (FP8) x is not quantized at all: the E4M3 weight is widened and meets x
  in float32, as ``int8_linear_ref`` computes (``quant_triton``'s "gemv-wo" path, tried at
  M <= 2 where the activation quantization costs more than it saves).
* INT4 lives in ``kiln.kernels.quant_gemv4``.

With ``glu`` the weight is a fused [2I, K] gate/up projection (gate rows [0, I), up rows
[I, 2I)); tile rows alternate gate row c and up row I + c, and the epilogue writes
``silu(gate) * up`` [M, I] with the rounding points of the unfused path (the product rounded to
x's dtype, then the activation as ``triton_ops.silu_and_mul``).

Under Triton's interpreter (``TRITON_INTERPRET=1``), whose float32 -> E4M3 cast mis-rounds,
the E4M3 rounding is done with float arithmetic instead (``EMU``); on a GPU it is the
hardware's round-to-nearest-even conversion.
"""

from __future__ import annotations

import os

import torch

from kiln.kernels import triton_ops
from kiln.kernels.gemv import MAX_ROWS, GemvConfig, _w_tile, _x_chunk
from kiln.kernels.triton_ops import _gdc_enter, _jit, tl

__all__ = ["GemvConfig", "q8_gemv", "q8_configs", "q8_fits"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# Shared device helpers (also used by kiln.kernels.quant_gemm)
# ----------------------------------------------------------------------------------------------


@_jit
def _round_e4m3(q):
    """q (float32, |q| <= 448) rounded to the nearest E4M3 value (ties to even), in float32:
    adding and subtracting 2^(e + 20) leaves the float32 spacing of E4M3 at q's binade e
    (at least -6, the subnormal spacing 2^-9)."""
    a = tl.abs(q)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    c = ((e + 147) << 23).to(tl.float32, bitcast=True)
    r = (a + c) - c
    return tl.where(q < 0, -r, r)


@_jit
def _e4m3(x, s, r, EMU: tl.constexpr):
    """``(x / s).clamp(-448, 448)`` rounded to E4M3, as float32. ``r`` is RN(1 / s): q0 = x * r
    is within an ulp of x / s, and one FMA correction makes it the correctly rounded quotient
    (Markstein); the first clamp keeps the correction finite where x / s overflows."""
    q = tl.minimum(tl.maximum(x * r, -1024.0), 1024.0)
    q = tl.fma(tl.fma(-q, s, x), r, q)
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if EMU:
        v = _round_e4m3(q)
    else:
        v = q.to(tl.float8e4nv).to(tl.float32)
    return v


@_jit
def _row_amax(ptrs, K, offs_k, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """max |x| over one row of K values (float32)."""
    a = tl.zeros([1, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.maximum(a, tl.abs(_x_chunk(ptrs, k0, K, offs_k, EVEN_K)))
    return tl.max(tl.max(a, axis=1), axis=0)


@_jit
def _dyn_scale(amax):
    """A row's dynamic E4M3 scale: ``max(amax / 448, 1e-12)``, the quotient correctly rounded."""
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12)


@_jit
def _put(y_ptr, y, row, M, rows, n_mask, sym, SCALAR_MASK: tl.constexpr):
    if SCALAR_MASK:
        mask = n_mask & (row < M)
    else:  # the interpreter takes only masks shaped like the pointers
        mask = n_mask & (tl.zeros_like(rows) + row < M)
    tl.store(y_ptr + row.to(tl.int64) * sym + rows, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _put_glu(y_ptr, y, row, M, cols, c_mask, sym, HALF: tl.constexpr, SCALAR_MASK: tl.constexpr):
    """Tile rows alternate gate and up rows: each is rounded to the output dtype (as the
    product is), then ``silu(gate)`` rounded again and times up, as ``silu_and_mul``."""
    dt = y_ptr.dtype.element_ty
    g, u = tl.split(tl.reshape(y, [HALF, 2]))
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    if SCALAR_MASK:
        mask = c_mask & (row < M)
    else:
        mask = c_mask & (tl.zeros_like(cols) + row < M)
    tl.store(y_ptr + row.to(tl.int64) * sym + cols, (a * u).to(dt), mask=mask)


# ----------------------------------------------------------------------------------------------
# FP8 / INT8
# ----------------------------------------------------------------------------------------------


@_jit
def _q8_decode(w, FP8: tl.constexpr):
    if FP8:
        v = w.to(tl.float32)
    else:  # int8 q: the float with bits 0x4B000080 + q is 2^23 + 128 + q exactly
        v = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    return v


@_jit
def _q8_row_out(acc, s, ws, b, FP8: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if FP8:
        y = y * s
    y = y * ws
    if HAS_BIAS:
        y += b
    return y


@_jit
def _q8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, is_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym, m_blocks,
    FP8: tl.constexpr, STATIC: tl.constexpr, PREQ: tl.constexpr, MB: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SCALAR_MASK: tl.constexpr = True,
    EMU: tl.constexpr = False, GLU: tl.constexpr = False, PDL: tl.constexpr = False, WO: tl.constexpr = False,
):
    pid = tl.program_id(0)
    m0 = (pid % m_blocks) * MB
    nb = pid // m_blocks
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N read row N - 1 and x rows past M read row M - 1; the stores drop them.
    if GLU:
        t = tl.arange(0, BLOCK_N)
        cols = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        wrow = tl.minimum(nb * (BLOCK_N // 2) + t // 2, N - 1) + (t % 2) * N
    else:
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        wrow = tl.minimum(rows, N - 1)
    w_ptrs = w_ptr + wrow.to(tl.int64)[:, None] * swn + offs_k[None, :]
    x0 = x_ptr + m0.to(tl.int64) * sxm + offs_k
    x1 = x_ptr + tl.minimum(m0 + 1, M - 1).to(tl.int64) * sxm + offs_k
    x2 = x_ptr + tl.minimum(m0 + 2, M - 1).to(tl.int64) * sxm + offs_k
    x3 = x_ptr + tl.minimum(m0 + 3, M - 1).to(tl.int64) * sxm + offs_k
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if STAGES > 1:
        wa = _w_tile(w_ptrs, 0, K, offs_k, EVEN_K, True, SCALAR_MASK)
    if STAGES > 2:
        wb = _w_tile(w_ptrs, BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
    if STAGES > 3:
        wc = _w_tile(w_ptrs, 2 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
    ws = tl.load(ws_ptr + wrow).to(tl.float32)
    _gdc_enter(PDL)
    if FP8 and not WO:
        # Each x row's scale and its correctly rounded reciprocal.
        if PREQ:  # x is x_q already; is_ptr holds its row scales [M]
            s0 = tl.load(is_ptr + m0)
            s1 = tl.load(is_ptr + tl.minimum(m0 + 1, M - 1))
            s2 = tl.load(is_ptr + tl.minimum(m0 + 2, M - 1))
            s3 = tl.load(is_ptr + tl.minimum(m0 + 3, M - 1))
        elif STATIC:
            s0 = tl.load(is_ptr).to(tl.float32)
            s1 = s0
            s2 = s0
            s3 = s0
        else:
            s0 = _dyn_scale(_row_amax(x0, K, offs_k, EVEN_K, BLOCK_K))
            s1 = s0
            s2 = s0
            s3 = s0
            if MB > 1:
                s1 = _dyn_scale(_row_amax(x1, K, offs_k, EVEN_K, BLOCK_K))
            if MB > 2:
                s2 = _dyn_scale(_row_amax(x2, K, offs_k, EVEN_K, BLOCK_K))
            if MB > 3:
                s3 = _dyn_scale(_row_amax(x3, K, offs_k, EVEN_K, BLOCK_K))
        if not PREQ:
            r0 = tl.math.div_rn(1.0, s0)
            r1 = tl.math.div_rn(1.0, s1)
            r2 = tl.math.div_rn(1.0, s2)
            r3 = tl.math.div_rn(1.0, s3)
    for k0 in range(0, K, BLOCK_K):
        if STAGES == 1:
            w = _w_tile(w_ptrs, k0, K, offs_k, EVEN_K, False, SCALAR_MASK)
        elif STAGES == 2:
            w = wa
            wa = _w_tile(w_ptrs, k0 + BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        elif STAGES == 3:
            w = wa
            wa = wb
            wb = _w_tile(w_ptrs, k0 + 2 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        else:
            w = wa
            wa = wb
            wb = wc
            wc = _w_tile(w_ptrs, k0 + 3 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        w = _q8_decode(w, FP8)
        xa = _x_chunk(x0, k0, K, offs_k, EVEN_K)
        if FP8 and not PREQ and not WO:
            xa = _e4m3(xa, s0, r0, EMU)
        acc0 += w * xa
        if MB > 1:
            xa = _x_chunk(x1, k0, K, offs_k, EVEN_K)
            if FP8 and not PREQ and not WO:
                xa = _e4m3(xa, s1, r1, EMU)
            acc1 += w * xa
        if MB > 2:
            xa = _x_chunk(x2, k0, K, offs_k, EVEN_K)
            if FP8 and not PREQ and not WO:
                xa = _e4m3(xa, s2, r2, EMU)
            acc2 += w * xa
        if MB > 3:
            xa = _x_chunk(x3, k0, K, offs_k, EVEN_K)
            if FP8 and not PREQ and not WO:
                xa = _e4m3(xa, s3, r3, EMU)
            acc3 += w * xa

    if not FP8 or WO:
        s0 = 1.0
        s1 = 1.0
        s2 = 1.0
        s3 = 1.0
    if GLU:
        c_mask = cols < N
        _put_glu(y_ptr, _q8_row_out(acc0, s0, ws, 0.0, FP8, False), m0, M, cols, c_mask, sym, BLOCK_N // 2,
                 SCALAR_MASK)
        if MB > 1:
            _put_glu(y_ptr, _q8_row_out(acc1, s1, ws, 0.0, FP8, False), m0 + 1, M, cols, c_mask, sym,
                     BLOCK_N // 2, SCALAR_MASK)
        if MB > 2:
            _put_glu(y_ptr, _q8_row_out(acc2, s2, ws, 0.0, FP8, False), m0 + 2, M, cols, c_mask, sym,
                     BLOCK_N // 2, SCALAR_MASK)
        if MB > 3:
            _put_glu(y_ptr, _q8_row_out(acc3, s3, ws, 0.0, FP8, False), m0 + 3, M, cols, c_mask, sym,
                     BLOCK_N // 2, SCALAR_MASK)
    else:
        n_mask = rows < N
        b = 0.0
        if HAS_BIAS:
            b = tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
        _put(y_ptr, _q8_row_out(acc0, s0, ws, b, FP8, HAS_BIAS), m0, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 1:
            _put(y_ptr, _q8_row_out(acc1, s1, ws, b, FP8, HAS_BIAS), m0 + 1, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 2:
            _put(y_ptr, _q8_row_out(acc2, s2, ws, b, FP8, HAS_BIAS), m0 + 2, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 3:
            _put(y_ptr, _q8_row_out(acc3, s3, ws, b, FP8, HAS_BIAS), m0 + 3, M, rows, n_mask, sym, SCALAR_MASK)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _prep(x, n_rows, bn, glu, bias, out, out_dtype=None):
    m = x.shape[0]
    n = n_rows
    if glu:
        assert bias is None and n % 2 == 0 and bn >= 2, "glu takes an even gate/up weight, no bias, block_n >= 2"
        n //= 2
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    assert out.shape == (m, n) and out.stride(1) == 1
    return m, n, out


def q8_gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, config: GemvConfig, *, fp8: bool,
            input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, glu: bool = False,
            x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
            out: torch.Tensor | None = None, weight_only: bool = False) -> torch.Tensor:
    """``fp8_linear_ref`` (``fp8``: w float8_e4m3fn, activations quantized per row, or with the
    static ``input_scale`` [1]) or ``int8_linear_ref`` (w int8) of x [M, K] and w [N, K] with the
    float32 per-row scale ``w_scale`` [N], by the Triton kernel with ``config``. x and w need unit
    stride along K; returns (or fills) out [M, N] in x's dtype (with ``glu``: [M, N / 2],
    ``silu(gate) * up`` of the fused gate/up weight, no bias). With ``x_scale`` [M] (FP8), x is
    the already quantized x_q (float8_e4m3fn) and the result is in ``out_dtype``. ``weight_only``
    (FP8): x is not quantized; the widened weight meets x as it is, ``int8_linear_ref``'s math."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.stride(1) == 1 and w.stride(1) == 1 and w_scale.is_contiguous()
    assert w.dtype == (torch.float8_e4m3fn if fp8 else torch.int8), w.dtype
    preq = x_scale is not None
    assert not weight_only or (fp8 and not preq and input_scale is None)
    assert not preq or (fp8 and x.dtype == torch.float8_e4m3fn and x_scale.is_contiguous() and out_dtype is not None)
    bn, bk, warps, stages, rows = config
    m, n, out = _prep(x, w.shape[0], bn, glu, bias, out, out_dtype)
    if m == 0 or n == 0:
        return out
    k = x.shape[1]
    mb = min(m, rows, MAX_ROWS)
    m_blocks = triton_ops._cdiv(m, mb)
    grid = (triton_ops._cdiv(n, bn // 2 if glu else bn) * m_blocks,)
    static = fp8 and input_scale is not None and not preq
    scale_arg = x_scale if preq else input_scale if static else w_scale
    _q8_gemv_kernel[grid](
        x, w, w_scale, scale_arg, bias if bias is not None else w_scale, out,
        m, n, k, x.stride(0), w.stride(0), out.stride(0), m_blocks,
        FP8=fp8, STATIC=static, PREQ=preq, MB=mb, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, BLOCK_N=bn,
        BLOCK_K=bk,
        STAGES=stages, SCALAR_MASK=not _interpreting(), EMU=_interpreting(), GLU=glu, WO=weight_only, num_warps=warps,
        num_stages=1, **triton_ops.launch_opts(x),
    )
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _rows_useful(c: GemvConfig, m: int) -> bool:
    return c.rows == 1 or c.rows < 2 * max(int(m), 1)


def q8_fits(c: GemvConfig, m: int) -> bool:
    """1-byte weights: every thread loads at least one 16-byte vector of each tile, the float32
    accumulators of ``min(M, rows)`` x rows take at most 128 registers a thread, those plus the
    tiles in flight at most 168."""
    threads = 32 * c.num_warps
    tile = c.block_n * c.block_k
    if not _rows_useful(c, m) or tile < 16 * threads or c.num_stages > 4:
        return False
    acc = min(max(int(m), 1), c.rows, MAX_ROWS) * tile // threads
    return acc <= 128 and acc + c.num_stages * tile // (4 * threads) <= 168


def _cfgs(rows_lists):
    return [GemvConfig(bn, bk, w, s, r) for r, lst in rows_lists.items() for bn, bk, w, s in lst]


# Hand-picked starting points (not measured on a GPU yet): tiles of 4-16 KB per stage for one
# x row, smaller ones where several rows share a tile. ``tune`` times those that fit.
Q8_CONFIGS = _cfgs({
    1: [(2, 4096, 4, 1), (4, 4096, 4, 1), (4, 2048, 4, 1), (4, 2048, 4, 2), (8, 2048, 4, 1), (8, 2048, 8, 2),
        (8, 1024, 4, 2), (16, 1024, 8, 1), (16, 2048, 8, 1), (32, 512, 8, 2)],
    2: [(4, 2048, 4, 1), (4, 2048, 8, 2), (8, 1024, 4, 1), (8, 1024, 4, 2), (16, 512, 4, 2)],
    4: [(4, 1024, 4, 1), (4, 2048, 8, 1), (8, 512, 4, 2), (8, 1024, 8, 1), (16, 512, 8, 1)],
})


def _all(block_ks, stages):
    return [GemvConfig(n, k, w, s, r) for r in (1, 2, 4) for n in (2, 4, 8, 16, 32) for k in block_ks
            for w in (4, 8) for s in stages]


def q8_configs(m: int, full: bool = False) -> list[GemvConfig]:
    """The FP8/INT8 GEMV configs ``tune`` tries for M rows (``full``: every one that fits)."""
    src = _all((256, 512, 1024, 2048, 4096), (1, 2, 3, 4)) if full else Q8_CONFIGS
    return [c for c in src if q8_fits(c, m)]
