"""The INT4 skinny product for decode: ``int4_linear_ref`` of x [M, K] (small M) with qweight
[N, K/2] uint8 (column 2j in the low nibble of byte j), scales [N, K/G] and qzeros [N, K/G]
uint8, streaming half a byte per weight element. The program structure is that of
``kiln.kernels.quant_gemv`` (``BLOCK_N`` weight rows, ``BLOCK_K`` chunks, up to four x rows
per weight read, tiles loaded ahead into registers, the PDL wait after the first weight loads).

Each chunk's bytes are split into their two nibbles and interleaved back into column order,
and ``q - zero`` is formed exactly in float32 (2^23 + q minus 2^23 + zero). Two ways to go on,
picked per shape by ``quant_triton.tune``:

* grouped sums (``acc=False``): each group's ``sum((q - z) * x)`` is reduced within the chunk and
  multiplied by its scale once (the reference's sum, reassociated by group);
* exact weights (``acc=True``): ``w = (q - z) * s`` per element (the reference's dequantized
  value, bit for bit) accumulated as ``w * x`` into float32 [BLOCK_N, BLOCK_K] accumulators that
  are reduced once, after the loop, as the 16-bit GEMV does; with ``block_k`` at most the group
  size the chunk's scale and zero are one value per row and everything stays two-dimensional.
"""

from __future__ import annotations

import torch

from kiln.kernels import triton_ops
from kiln.kernels.gemv import MAX_ROWS, GemvConfig, _w_tile, _x_chunk
from kiln.kernels.quant_gemv import _all, _cfgs, _interpreting, _prep, _put, _put_glu, _rows_useful
from kiln.kernels.triton_ops import _gdc_enter, _jit, tl

__all__ = ["q4_gemv", "q4_configs", "q4_fits", "group_fits", "Q4_CONFIGS", "Q4_ACC_CONFIGS"]


@_jit
def _g_tile(ptrs, g0, NG, offs_g, EVEN_K: tl.constexpr, GUARD: tl.constexpr, SCALAR_MASK: tl.constexpr):
    """Group scales or zero points of the groups from g0 (kept in cache: a row's next chunks
    read the same sectors)."""
    if EVEN_K and not GUARD:
        v = tl.load(ptrs + g0)
    elif EVEN_K and SCALAR_MASK:
        v = tl.load(ptrs + g0, mask=g0 < NG, other=0.0)
    else:
        v = tl.load(ptrs + g0, mask=(g0 + offs_g < NG)[None, :], other=0.0)
    return v


@_jit
def _q4_tiles(q_ptrs, s_ptrs, z_ptrs, k0, K, G: tl.constexpr, offs_b, offs_g, EVEN_K: tl.constexpr,
              GUARD: tl.constexpr, SCALAR_MASK: tl.constexpr):
    """The packed bytes, group scales and zero points of the chunk at column k0 (raw, so that
    a load issued ahead is not waited on until its use)."""
    w = _w_tile(q_ptrs, k0 // 2, K // 2, offs_b, EVEN_K, GUARD, SCALAR_MASK)
    s = _g_tile(s_ptrs, k0 // G, K // G, offs_g, EVEN_K, GUARD, SCALAR_MASK)
    z = _g_tile(z_ptrs, k0 // G, K // G, offs_g, EVEN_K, GUARD, SCALAR_MASK)
    return w, s, z


@_jit
def _q4_codes(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed bytes [BLOCK_N, BLOCK_K / 2] -> 2^23 + q [BLOCK_N, BLOCK_K] in float32, columns in
    stored order."""
    p = w.to(tl.int32)
    q = tl.reshape(tl.join(p & 15, p >> 4), [BLOCK_N, BLOCK_K])
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@_jit
def _q4_weights(w, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPC: tl.constexpr, GE: tl.constexpr):
    """The chunk's exact dequantized weights ``(q - z) * s`` [BLOCK_N, BLOCK_K] (float32)."""
    qf = _q4_codes(w, BLOCK_N, BLOCK_K)
    zc = z.to(tl.float32) + 8388608.0
    sf = s.to(tl.float32)
    if GPC == 1:  # one group: [BLOCK_N, 1] scale and zero
        v = (qf - zc) * sf
    else:
        v = tl.reshape((tl.reshape(qf, [BLOCK_N, GPC, GE]) - zc[:, :, None]) * sf[:, :, None], [BLOCK_N, BLOCK_K])
    return v


@_jit
def _q4_dot(w, s, z, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GPC: tl.constexpr, GE: tl.constexpr):
    """sum over the chunk of (q - z) * x, group by group, each group's sum times its scale [BLOCK_N]."""
    d = tl.reshape(_q4_codes(w, BLOCK_N, BLOCK_K), [BLOCK_N, GPC, GE]) - (z.to(tl.float32) + 8388608.0)[:, :, None]
    part = tl.sum(d * tl.reshape(x, [1, GPC, GE]), axis=2)
    return tl.sum(part * s.to(tl.float32), axis=1)


@_jit
def _q4_step(acc, w, s, z, x, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GPC: tl.constexpr, GE: tl.constexpr):
    if ACC:
        acc += _q4_weights(w, s, z, BLOCK_N, BLOCK_K, GPC, GE) * x
    else:
        acc += _q4_dot(w, s, z, x, BLOCK_N, BLOCK_K, GPC, GE)
    return acc


@_jit
def _q4_out(acc, ACC: tl.constexpr):
    if ACC:
        y = tl.sum(acc, axis=1)
    else:
        y = acc
    return y


@_jit
def _q4_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, sxm, sqn, ssn, szn, sym, m_blocks,
    G: tl.constexpr, GPC: tl.constexpr, GE: tl.constexpr, MB: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    ACC: tl.constexpr = False, SCALAR_MASK: tl.constexpr = True, GLU: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    m0 = (pid % m_blocks) * MB
    nb = pid // m_blocks
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, GPC)
    if GLU:  # tile rows alternate gate row c and up row N + c
        t = tl.arange(0, BLOCK_N)
        cols = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        wrow = tl.minimum(nb * (BLOCK_N // 2) + t // 2, N - 1) + (t % 2) * N
    else:
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        wrow = tl.minimum(rows, N - 1)
    wrow64 = wrow.to(tl.int64)
    q_ptrs = q_ptr + wrow64[:, None] * sqn + offs_b[None, :]
    s_ptrs = s_ptr + wrow64[:, None] * ssn + offs_g[None, :]
    z_ptrs = z_ptr + wrow64[:, None] * szn + offs_g[None, :]
    x0 = x_ptr + m0.to(tl.int64) * sxm + offs_k
    x1 = x_ptr + tl.minimum(m0 + 1, M - 1).to(tl.int64) * sxm + offs_k
    x2 = x_ptr + tl.minimum(m0 + 2, M - 1).to(tl.int64) * sxm + offs_k
    x3 = x_ptr + tl.minimum(m0 + 3, M - 1).to(tl.int64) * sxm + offs_k
    if ACC:
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    if STAGES > 1:
        wa, sa, za = _q4_tiles(q_ptrs, s_ptrs, z_ptrs, 0, K, G, offs_b, offs_g, EVEN_K, True, SCALAR_MASK)
    if STAGES > 2:
        wb, sb, zb = _q4_tiles(q_ptrs, s_ptrs, z_ptrs, BLOCK_K, K, G, offs_b, offs_g, EVEN_K, True, SCALAR_MASK)
    _gdc_enter(PDL)
    for k0 in range(0, K, BLOCK_K):
        if STAGES == 1:
            w, s, z = _q4_tiles(q_ptrs, s_ptrs, z_ptrs, k0, K, G, offs_b, offs_g, EVEN_K, False, SCALAR_MASK)
        elif STAGES == 2:
            w, s, z = wa, sa, za
            wa, sa, za = _q4_tiles(q_ptrs, s_ptrs, z_ptrs, k0 + BLOCK_K, K, G, offs_b, offs_g, EVEN_K, True,
                                   SCALAR_MASK)
        else:
            w, s, z = wa, sa, za
            wa, sa, za = wb, sb, zb
            wb, sb, zb = _q4_tiles(q_ptrs, s_ptrs, z_ptrs, k0 + 2 * BLOCK_K, K, G, offs_b, offs_g, EVEN_K, True,
                                   SCALAR_MASK)
        acc0 = _q4_step(acc0, w, s, z, _x_chunk(x0, k0, K, offs_k, EVEN_K), ACC, BLOCK_N, BLOCK_K, GPC, GE)
        if MB > 1:
            acc1 = _q4_step(acc1, w, s, z, _x_chunk(x1, k0, K, offs_k, EVEN_K), ACC, BLOCK_N, BLOCK_K, GPC, GE)
        if MB > 2:
            acc2 = _q4_step(acc2, w, s, z, _x_chunk(x2, k0, K, offs_k, EVEN_K), ACC, BLOCK_N, BLOCK_K, GPC, GE)
        if MB > 3:
            acc3 = _q4_step(acc3, w, s, z, _x_chunk(x3, k0, K, offs_k, EVEN_K), ACC, BLOCK_N, BLOCK_K, GPC, GE)

    y0 = _q4_out(acc0, ACC)
    y1 = _q4_out(acc1, ACC)
    y2 = _q4_out(acc2, ACC)
    y3 = _q4_out(acc3, ACC)
    if GLU:
        c_mask = cols < N
        _put_glu(y_ptr, y0, m0, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 1:
            _put_glu(y_ptr, y1, m0 + 1, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 2:
            _put_glu(y_ptr, y2, m0 + 2, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 3:
            _put_glu(y_ptr, y3, m0 + 3, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
    else:
        n_mask = rows < N
        if HAS_BIAS:
            b = tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
            y0 += b
            y1 += b
            y2 += b
            y3 += b
        _put(y_ptr, y0, m0, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 1:
            _put(y_ptr, y1, m0 + 1, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 2:
            _put(y_ptr, y2, m0 + 2, M, rows, n_mask, sym, SCALAR_MASK)
        if MB > 3:
            _put(y_ptr, y3, m0 + 3, M, rows, n_mask, sym, SCALAR_MASK)


def q4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
            config: GemvConfig, bias: torch.Tensor | None = None, glu: bool = False, acc: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``int4_linear_ref`` (without ``input_perm``: apply it to x first) of x [M, K] by the
    Triton kernel with ``config`` (``acc``: the exact-weight variant). ``group_fits(block_k,
    group_size)`` must hold. With ``glu`` the weight is a fused [2I, K] gate/up projection and
    the result ``silu(gate) * up`` [M, I] (no bias)."""
    assert x.dim() == 2 and qweight.dim() == 2 and 2 * qweight.shape[1] == x.shape[1], (x.shape, qweight.shape)
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and qzeros.stride(1) == 1
    assert qweight.dtype == torch.uint8 and qzeros.dtype == torch.uint8
    bn, bk, warps, stages, rows = config
    g = int(group_size)
    k = x.shape[1]
    assert k % g == 0 and group_fits(bk, g), (k, g, bk)
    m, n, out = _prep(x, qweight.shape[0], bn, glu, bias, out)
    if m == 0 or n == 0:
        return out
    ge = min(bk, g)
    mb = min(m, rows, MAX_ROWS)
    m_blocks = triton_ops._cdiv(m, mb)
    grid = (triton_ops._cdiv(n, bn // 2 if glu else bn) * m_blocks,)
    _q4_gemv_kernel[grid](
        x, qweight, scales, qzeros, bias if bias is not None else scales, out, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(0), m_blocks,
        G=g, GPC=bk // ge, GE=ge, MB=mb, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, BLOCK_N=bn,
        BLOCK_K=bk, STAGES=min(stages, 3), ACC=acc, SCALAR_MASK=not _interpreting(), GLU=glu, num_warps=warps,
        num_stages=1, **triton_ops.launch_opts(x),
    )
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def group_fits(block_k: int, group_size: int) -> bool:
    """Whether a chunk of ``block_k`` columns holds whole groups (a power-of-two group size) or
    lies inside one group."""
    g = int(group_size)
    return g > 0 and (g % block_k == 0 or (block_k % g == 0 and g & (g - 1) == 0))


def q4_fits(c: GemvConfig, m: int, group_size: int, acc: bool = False) -> bool:
    """Whole groups (or a part of one) per chunk, at least one 16-byte vector a thread per tile,
    at most 3 tiles in flight taking at most 32 registers; grouped sums: at most 64 float32
    values of the dequantized tile a thread; exact weights: the accumulators of
    ``min(M, rows)`` x rows at most 128 registers, those plus the dequantized tile at most 160."""
    threads = 32 * c.num_warps
    tile = c.block_n * c.block_k
    if not (_rows_useful(c, m) and group_fits(c.block_k, group_size) and tile // 2 >= 16 * threads
            and c.num_stages <= 3 and c.num_stages * tile // (8 * threads) <= 32):
        return False
    if not acc:
        return tile // threads <= 64
    regs = min(max(int(m), 1), c.rows, MAX_ROWS) * tile // threads
    return regs <= 128 and regs + tile // threads <= 160


# Hand-picked starting points (not yet timed on a GPU): grouped sums favour chunks of several
# groups; exact weights favour chunks of one group (two-dimensional, one scale per row) over
# more rows.
Q4_CONFIGS = _cfgs({
    1: [(2, 4096, 4, 1), (4, 2048, 4, 1), (4, 2048, 4, 2), (4, 4096, 8, 1), (8, 1024, 4, 1), (8, 1024, 4, 2),
        (8, 2048, 8, 1), (16, 1024, 8, 1), (16, 512, 4, 2), (4, 1024, 4, 2)],
    2: [(4, 1024, 4, 1), (4, 2048, 8, 1), (8, 1024, 4, 1), (8, 512, 4, 2), (4, 2048, 4, 2)],
    4: [(4, 1024, 4, 1), (8, 512, 4, 1), (4, 2048, 8, 1), (8, 1024, 8, 2), (16, 512, 8, 1)],
})
Q4_ACC_CONFIGS = _cfgs({
    1: [(32, 128, 4, 2), (32, 128, 4, 3), (64, 128, 8, 2), (16, 256, 4, 2), (8, 1024, 4, 2), (4, 2048, 4, 2),
        (16, 512, 8, 2)],
    2: [(32, 128, 4, 2), (16, 256, 4, 2), (64, 128, 8, 2), (8, 512, 4, 2)],
    4: [(32, 128, 4, 2), (64, 128, 8, 2), (16, 256, 4, 1)],
})


def q4_configs(m: int, group_size: int, full: bool = False, acc: bool = False) -> list[GemvConfig]:
    """The INT4 GEMV configs ``tune`` tries for M rows and this group size (``acc``: of the
    exact-weight variant; ``full``: every one that fits)."""
    if full:
        src = _all((64, 128, 256, 512, 1024, 2048, 4096), (1, 2, 3)) + [
            GemvConfig(n, k, w, s, r) for r in (1, 2, 4) for n in (64,) for k in (64, 128, 256) for w in (4, 8)
            for s in (1, 2, 3)]
    else:
        src = Q4_ACC_CONFIGS if acc else Q4_CONFIGS
    return [c for c in src if q4_fits(c, m, group_size, acc)]
