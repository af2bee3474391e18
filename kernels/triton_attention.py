"""The attention layer's Triton kernels, each taking the same arguments as its plain-torch
reference in ``kiln.kernels.attention`` and returning the same thing:

* ``rotary_write_kv``: the attention layer's step before attention, in one kernel: the
  rotate-half rotary embedding of q (into a new contiguous tensor) and of k, which goes straight
  into the paged cache beside v (slots < 0 skipped). q, k and v may be strided views of a fused
  qkv projection.
* ``paged_attention``: causal attention through block tables for batches mixing prefill chunks
  and decodes. Decodes use a flash-decoding kernel (each program reads the K/V of one KV head
  for one slice of the context and serves every query head of that group; a second kernel
  merges the slices by their log-sum-exp). Longer queries use a tiled kernel that packs the
  query heads of a KV group into the rows of one tile. All lengths are read from device
  tensors, so a decode-only call can be captured in a CUDA graph.

FP8 caches (float8_e4m3fn, with float32 ``k_scale`` / ``v_scale`` tensors of one element): the
write kernel stores ``x / scale`` (divided with IEEE rounding, ``div_rn``), clamped to ±448 and
rounded to nearest even, so its bytes equal ``kiln.kernels.attention.quantize_kv``'s. The
attention kernels widen the e4m3 tiles to q's dtype (exactly) for the dot products, fold
``k_scale`` into the softmax scale and multiply the output by ``v_scale``. Every kernel loads the
scales from their tensors, so a captured CUDA graph sees a scale changed in place. ``KV_FP8`` is
a constexpr: with a 16-bit cache the scales are ``None`` and the FP8 code is not compiled in.

The launchers also work on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), and
use programmatic dependent launch as described in ``kiln.kernels.triton_ops``.
"""

import torch

from kiln.kernels.attention import KV_FP8_DTYPE, kv_cache_is_fp8
from kiln.kernels.triton_ops import _LOG2E, _cdiv, _gdc_enter, _jit, _jit_runtime_ints, _pow2, _sm_count, launch_opts, tl

# ----------------------------------------------------------------------------------------------
# Rotary embedding and the KV-cache write
# ----------------------------------------------------------------------------------------------


@_jit
def _quantize(x, scale):
    """``quantize_kv`` in the kernel: x in float32 divided by scale (IEEE rounding), clamped to
    [-448, 448], cast to e4m3 (round to nearest even)."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    return tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)


@_jit
def _rotate_heads(src, dst, s_src, s_dst, n_heads, cos, sin, half, scale,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, QUANT: tl.constexpr):
    """Rotates the n_heads rows at src (row stride s_src) into dst (row stride s_dst); the
    result is rounded to src's dtype (as the reference computes it) and stored in dst's, or,
    with QUANT, quantized to e4m3 with ``scale``."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + offs_h
        m = (heads < n_heads)[:, None] & (offs_d < half)[None, :]
        x = src + heads[:, None] * s_src + offs_d[None, :]
        x1 = tl.load(x, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x + half, mask=m, other=0.0).to(tl.float32)
        y = dst + heads[:, None] * s_dst + offs_d[None, :]
        y1 = (x1 * cos - x2 * sin).to(src.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(src.dtype.element_ty)
        if QUANT:
            tl.store(y, _quantize(y1, scale), mask=m)
            tl.store(y + half, _quantize(y2, scale), mask=m)
        else:
            tl.store(y, y1.to(dst.dtype.element_ty), mask=m)
            tl.store(y + half, y2.to(dst.dtype.element_ty), mask=m)


@_jit
def _cos_sin(pos_ptr, cache_ptr, t, s_cache, half, dtype: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The cos and sin rows of token t's position, rounded to dtype as the reference does."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    dm = offs_d < half
    cs = cache_ptr + pos * s_cache + offs_d
    cos = tl.load(cs, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(cs + half, mask=dm, other=0.0).to(dtype).to(tl.float32)[None, :]
    return cos, sin


@_jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cache_ptr, ks_ptr, vs_ptr,
    sq0, sq1, sk0, sk1, sv0, sv1, sc0, sc1, sc2, svc0, svc1, svc2, s_cache,
    n_qh, n_kh, half, block_size,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, KV_FP8: tl.constexpr = False, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, t, s_cache, half, q_ptr.dtype.element_ty, BLOCK_HALF)
    d = 2 * half
    _rotate_heads(q_ptr + t * sq0, qo_ptr + t * n_qh * d, sq1, d, n_qh, cos, sin, half, None,
                  BLOCK_H, BLOCK_HALF, False)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        if KV_FP8:
            k_scale = tl.load(ks_ptr)
            v_scale = tl.load(vs_ptr)
        else:
            k_scale = None
            v_scale = None
        _rotate_heads(k_ptr + t * sk0, kc_ptr + blk * sc0 + off * sc1, sk1, sc2, n_kh, cos, sin, half, k_scale,
                      BLOCK_H, BLOCK_HALF, KV_FP8)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        for h0 in range(0, n_kh, BLOCK_H):
            heads = h0 + offs_h
            m = (heads < n_kh)[:, None] & (offs_d < d)[None, :]
            v = tl.load(v_ptr + t * sv0 + heads[:, None] * sv1 + offs_d[None, :], mask=m)
            dst = vc_ptr + blk * svc0 + off * svc1 + heads[:, None] * svc2 + offs_d[None, :]
            if KV_FP8:
                tl.store(dst, _quantize(v, v_scale), mask=m)
            else:
                tl.store(dst, v.to(vc_ptr.dtype.element_ty), mask=m)


def rotary_write_kv(q, k, v, positions, cache, k_cache, v_cache, slot_mapping,
                    k_scale=None, v_scale=None) -> torch.Tensor:
    """Rotates q [T, Hq, D] and k [T, Hk, D] by the positions' cos/sin rows; writes the rotated
    k and v [T, Hk, D] into the paged cache at ``slot_mapping`` (skipping slots < 0) and
    returns the rotated q (new, contiguous). q, k and v may be strided views of one fused
    projection. An e4m3 cache needs ``k_scale`` and ``v_scale`` and stores ``quantize_kv``."""
    fp8 = kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    t, hq, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return qo
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if cache.stride(-1) != 1:
        cache = cache.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    bh = _pow2(d // 2)
    heads = max(1, min(_pow2(max(hq, hk)), 4096 // bh))
    _rotary_write_kv_kernel[(t,)](
        q, k, v, qo, k_cache, v_cache, positions, slot_mapping, cache, k_scale, v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cache.stride(0),
        hq, hk, d // 2, k_cache.shape[1], BLOCK_H=heads, BLOCK_HALF=bh, KV_FP8=fp8, num_warps=4,
        **launch_opts(q),
    )
    return qo


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------


@_jit
def _split_len(span, num_splits, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr):
    """Tokens per context slice: the span shared evenly, in whole tiles, at least MIN_PART."""
    part = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(part, MIN_PART)


@_jit
def _load_kv_tile(cache_ptr, row_ptr, pos, n_mask, kvh, c0, c1, c2, offs_d, d_mask,
                  BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr):
    blk = tl.load(row_ptr + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    off = blk * c0 + (pos % BLOCK_SIZE) * c1 + kvh * c2
    return tl.load(cache_ptr + off[:, None] + offs_d[None, :], mask=_row_mask(n_mask, d_mask, EVEN_D), other=0.0)


@_jit
def _row_mask(rows, d_mask, EVEN_D: tl.constexpr):
    """The mask of a [rows, BLOCK_D] tile: with EVEN_D (head_dim == BLOCK_D) the rows mask alone,
    constant along each row, without the comparison against the runtime head_dim."""
    if EVEN_D:
        return rows[:, None]
    else:
        return rows[:, None] & d_mask[None, :]


@_jit_runtime_ints("num_splits", "s_bt")
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, part_o_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
    sq0, sq1, so0, so1, sk0, sk1, sk2, sv0, sv1, sv2, s_bt,
    scale_log2, window, group, n_q_heads, head_dim, num_splits, BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MIN_PART: tl.constexpr,
    KV_FP8: tl.constexpr = False, EVEN_D: tl.constexpr = False, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) - q_row != 1:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    lo = seq_len * 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    part = _split_len(seq_len - lo, num_splits, BLOCK_N, MIN_PART)
    start = lo + split * part
    if start >= seq_len:
        return
    end = tl.minimum(start + part, seq_len)
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(ks_ptr)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    heads = kvh * group + offs_g
    q_row = q_row.to(tl.int64)
    q = tl.load(q_ptr + q_row * sq0 + heads[:, None] * sq1 + offs_d[None, :],
                mask=_row_mask(g_mask, d_mask, EVEN_D), other=0.0)
    if KV_FP8 and q.dtype == tl.bfloat16:
        # E4M3 tiles widen to float16 in one packed conversion (to bfloat16 it takes three);
        # bfloat16 q is exact in float16 within its normal range, and the clamp keeps it finite.
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        k = _load_kv_tile(kc_ptr, bt_row, pos, n_mask, kvh, sk0, sk1, sk2, offs_d, d_mask, BLOCK_SIZE, EVEN_D)
        k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, pos, n_mask, kvh, sv0, sv1, sv2, offs_d, d_mask, BLOCK_SIZE, EVEN_D)
        v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / l_i[:, None]
    if KV_FP8:
        o = o * tl.load(vs_ptr)
    st_mask = _row_mask(g_mask, d_mask, EVEN_D)
    if DIRECT:
        dst = out_ptr + q_row * so0 + heads[:, None] * so1 + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        idx = (b.to(tl.int64) * n_q_heads + heads) * num_splits + split
        tl.store(part_o_ptr + idx[:, None] * head_dim + offs_d[None, :], o, mask=st_mask)
        tl.store(part_lse_ptr + idx, m_i + tl.log2(l_i), mask=g_mask)


@_jit_runtime_ints("num_splits")
def _decode_reduce_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr, so0, so1, window, n_q_heads, head_dim, num_splits,
    HAS_WINDOW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qsl_ptr + b)
    if tl.load(qsl_ptr + b + 1) - q_row != 1:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    lo = seq_len * 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    span = seq_len - lo
    n_act = tl.cdiv(span, _split_len(span, num_splits, BLOCK_N, MIN_PART))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_act
    idx = (b.to(tl.int64) * n_q_heads + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + idx, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask, tl.exp2(lse - m), 0.0)
    o = tl.load(part_o_ptr + idx[:, None] * head_dim + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    dst = out_ptr + q_row.to(tl.int64) * so0 + h * so1 + offs_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


@_jit_runtime_ints("s_bt")
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
    sq0, sq1, so0, so1, sk0, sk1, sk2, sv0, sv1, sv2, s_bt,
    scale_log2, window, group, head_dim, BLOCK_SIZE: tl.constexpr,
    SKIP_DECODES: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, G_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr = False, EVEN_D: tl.constexpr = False, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    BLOCK_Q: tl.constexpr = BLOCK_M // G_P2
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    done = tile * BLOCK_Q >= q_len
    if SKIP_DECODES:
        done = done | (q_len == 1)
    if done:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(ks_ptr)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = tile * BLOCK_Q + offs_m // G_P2
    g = offs_m % G_P2
    row_mask = (tok < q_len) & (g < group)
    d_mask = offs_d < head_dim
    heads = kvh * group + g
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * sq0 + heads[:, None] * sq1 + offs_d[None, :],
                mask=_row_mask(row_mask, d_mask, EVEN_D), other=0.0)
    qpos = ctx + tok

    hi = tl.minimum(seq_len, ctx + tl.minimum((tile + 1) * BLOCK_Q, q_len))
    lo = seq_len * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx + tile * BLOCK_Q - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < hi
        k = _load_kv_tile(kc_ptr, bt_row, pos, n_mask, kvh, sk0, sk1, sk2, offs_d, d_mask, BLOCK_SIZE, EVEN_D)
        k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        keep = n_mask[None, :] & (pos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            keep = keep & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(keep, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, pos, n_mask, kvh, sv0, sv1, sv2, offs_d, d_mask, BLOCK_SIZE, EVEN_D)
        v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if KV_FP8:
        o = o * tl.load(vs_ptr)
    dst = out_ptr + rows[:, None] * so0 + heads[:, None] * so1 + offs_d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=_row_mask(row_mask, d_mask, EVEN_D))


_MAX_SPLITS = 64
_BLOCK_S = _pow2(_MAX_SPLITS)  # the reduce kernel's slice tile: one shape for every split count


def decode_num_splits(device: torch.device, num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      window, min_part: int) -> int:
    """Context slices per (sequence, KV head): enough programs to fill the device a few times
    over, no more slices than ``max_seq_len`` (or the window) can use. Depends only on Python ints."""
    work = max(1, num_seqs * num_kv_heads)
    target = 4 * _sm_count(device.index if device.type == "cuda" else None)
    if work >= target:
        return 1
    span = max_seq_len if window is None else min(max_seq_len, window)
    return max(1, min(_cdiv(target, work), _MAX_SPLITS, _cdiv(max(span, 1), min_part)))


def _attn_common(q, k_cache, v_cache, k_scale, v_scale):
    if q.stride(-1) != 1:
        q = q.contiguous()
    fp8 = kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    d = q.shape[-1]
    return q, dict(
        sk=(k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        sv=(v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        block_d=max(16, _pow2(d)),
        even_d=max(16, _pow2(d)) == d,
        ieee=q.dtype == torch.float32,
        fp8=fp8,
    )


DECODE_CONFIGS_FP8 = ((64, 4), (128, 4), (128, 8), (256, 8))
"""(context tile, warps) the FP8-KV decode kernel may take. At a large batch its time goes to the
per-token work (the padded query-head tile's products, softmax, conversions) more than to the
bytes: on an H100 it reads half the 16-bit kernel's bytes in about 70% of its time at every
tile. Which config is fastest depends on the GPU and batch, so ``tune_decode`` times each at
load and keeps the fastest ((64, 4) until it has run)."""
_DECODE_TUNED: dict[tuple, tuple[int, int]] = {}  # (device index, head tile) -> (BLOCK_N, warps), FP8-KV decode


def _block_n(c) -> int:
    """The context tile of the prefill kernel and of the 16-bit decode kernel."""
    return 32 if c["block_d"] > 128 or c["ieee"] else 64


def _decode_config(c, device=None) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the decode kernel: the tuned one for an FP8 cache where set."""
    if c["fp8"] and device is not None and _block_n(c) == 64:
        return _DECODE_TUNED.get((device.index, c["block_d"]), (64, 4))
    return _block_n(c), 4


def _tuned_key(device, head_dim: int) -> tuple:
    device = torch.device(device)
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    return index, max(16, _pow2(head_dim))


def set_decode_config(device: torch.device, head_dim: int, config: tuple[int, int] | None) -> None:
    """Fixes (or with None forgets) the FP8-KV decode kernel's (context tile, warps) on
    ``device`` for heads of ``head_dim`` (tests, ``tune_decode``)."""
    key = _tuned_key(device, head_dim)
    if config is None:
        _DECODE_TUNED.pop(key, None)
        return
    config = tuple(config)
    if config not in DECODE_CONFIGS_FP8:
        raise ValueError(f"decode config {config} is not one of {DECODE_CONFIGS_FP8}")
    _DECODE_TUNED[key] = config


def decode_config_chosen(device: torch.device, head_dim: int) -> bool:
    """Whether the FP8-KV decode config for heads of ``head_dim`` on ``device`` is already set."""
    return _tuned_key(device, head_dim) in _DECODE_TUNED


def decode_tuned_table() -> dict:
    """``{"device:head_tile": "BLOCK_Nxwarps"}`` chosen so far (records and logs)."""
    return {f"{d}:{h}": f"{n}x{w}" for (d, h), (n, w) in _DECODE_TUNED.items()}


def tune_decode(k_cache, v_cache, k_scale, v_scale, num_q_heads: int, dtype: torch.dtype, *, batch: int = 256,
                context: int = 1024, reps: int = 10) -> dict | None:
    """Times the FP8-KV decode kernel with each of ``DECODE_CONFIGS_FP8`` over ``batch``
    sequences of ``context`` tokens in distinct blocks of this (e4m3) cache (scaled down to the
    blocks it has; what the blocks hold does not matter for the time), keeps the fastest for
    later launches, and returns ``{"BLOCK_Nxwarps": microseconds}``. None (nothing chosen) off a GPU or for a
    16-bit cache. Run before CUDA graphs are captured: graphs keep the tile they were taken with."""
    if not (k_cache.is_cuda and k_cache.dtype == KV_FP8_DTYPE):
        return None
    from types import SimpleNamespace

    nb, bs, hk, d = k_cache.shape
    per_seq = max(1, min(_cdiv(context, bs), nb // max(1, batch)))
    batch = max(1, min(batch, nb // per_seq))
    ctx = per_seq * bs
    dev = k_cache.device
    tables = torch.arange(batch * per_seq, dtype=torch.int32, device=dev).view(batch, per_seq)
    meta = SimpleNamespace(
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        block_tables=tables, max_seq_len=ctx, sliding_window=None,
    )
    q = torch.randn((batch, num_q_heads, d), dtype=dtype, device=dev)
    out = torch.empty_like(q)
    key = (dev.index, max(16, _pow2(d)))
    before = _DECODE_TUNED.get(key)
    times, failed = {}, {}
    for cfg in DECODE_CONFIGS_FP8:
        name = f"{cfg[0]}x{cfg[1]}"
        _DECODE_TUNED[key] = cfg
        try:
            for _ in range(2):
                launch_decode(q, k_cache, v_cache, out, meta, d ** -0.5, k_scale=k_scale, v_scale=v_scale)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                launch_decode(q, k_cache, v_cache, out, meta, d ** -0.5, k_scale=k_scale, v_scale=v_scale)
            end.record()
            end.synchronize()
            times[cfg] = start.elapsed_time(end) * 1000 / reps
        except Exception as e:  # noqa: BLE001 - a config this GPU cannot run (resources) is not chosen
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not times:
        if before is None:
            _DECODE_TUNED.pop(key, None)
        else:
            _DECODE_TUNED[key] = before
        raise RuntimeError(f"no FP8-KV decode config runs on this GPU: {failed}")
    _DECODE_TUNED[key] = min(times, key=times.get)
    out = {f"{n}x{w}": round(t, 2) for (n, w), t in times.items()}
    return dict(out, **{f"failed_{name}": msg for name, msg in failed.items()})


def launch_decode(q, k_cache, v_cache, out, meta, scale, num_splits=None, *, k_scale=None, v_scale=None):
    """Flash-decoding over every sequence of the batch whose query length is one."""
    num_seqs = meta.seq_lens.shape[0]
    _, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    q, c = _attn_common(q, k_cache, v_cache, k_scale, v_scale)
    block_n, warps = _decode_config(c, q.device)
    min_part = 4 * block_n
    window = meta.sliding_window
    if num_splits is None:
        num_splits = decode_num_splits(q.device, num_seqs, hk, meta.max_seq_len, window, min_part)
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out
    else:
        part_o = torch.empty((num_seqs, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, hq, num_splits), dtype=torch.float32, device=q.device)
    bt = meta.block_tables
    _decode_kernel[(num_seqs, hk, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, out, part_o, part_lse, meta.query_start_loc, meta.seq_lens, bt,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *c["sk"], *c["sv"], bt.stride(0),
        float(scale) * _LOG2E, int(window or 0), group, hq, d, num_splits, BLOCK_SIZE=bs, DIRECT=direct, HAS_WINDOW=window is not None, IEEE=c["ieee"],
        BLOCK_G=max(16, _pow2(group)), BLOCK_N=block_n, BLOCK_D=c["block_d"], MIN_PART=min_part,
        KV_FP8=c["fp8"], EVEN_D=c["even_d"], num_warps=warps, **launch_opts(q),
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, hq)](
            out, part_o, part_lse, meta.query_start_loc, meta.seq_lens, out.stride(0), out.stride(1),
            int(window or 0), hq, d, num_splits, HAS_WINDOW=window is not None, BLOCK_S=_BLOCK_S,
            BLOCK_D=c["block_d"], BLOCK_N=block_n, MIN_PART=min_part, num_warps=4, **launch_opts(q),
        )
    return out


def launch_prefill(q, k_cache, v_cache, out, meta, scale, skip_decodes=True, block_m=None, *,
                   k_scale=None, v_scale=None):
    """Tiled causal attention for every sequence (those of query length one are left to the
    decode kernel when ``skip_decodes``)."""
    num_seqs = meta.seq_lens.shape[0]
    _, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    q, c = _attn_common(q, k_cache, v_cache, k_scale, v_scale)
    g_p2 = _pow2(group)
    if block_m is None:
        block_m = 128 if c["block_d"] <= 128 and not c["ieee"] else 64
    block_m = max(block_m, g_p2)
    block_n = _block_n(c)
    block_q = block_m // g_p2
    window = meta.sliding_window
    bt = meta.block_tables
    grid = (_cdiv(max(meta.max_query_len, 1), block_q), hk, num_seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, out, meta.query_start_loc, meta.seq_lens, bt,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *c["sk"], *c["sv"], bt.stride(0),
        float(scale) * _LOG2E, int(window or 0), group, d, BLOCK_SIZE=bs,
        SKIP_DECODES=skip_decodes, HAS_WINDOW=window is not None, IEEE=c["ieee"],
        BLOCK_M=block_m, G_P2=g_p2, BLOCK_N=block_n, BLOCK_D=c["block_d"], KV_FP8=c["fp8"], EVEN_D=c["even_d"],
        num_warps=8 if block_m * c["block_d"] >= 128 * 128 else 4, **launch_opts(q),
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                    k_scale=None, v_scale=None, num_splits=None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] against the paged cache; returns [T, Hq, D]. An e4m3
    cache needs ``k_scale`` and ``v_scale`` (float32 tensors of shape [1]).

    Decode-only batches (``meta.max_query_len == 1``) run only the flash-decoding kernels and do
    no host synchronisation. Mixed batches run the tiled kernel for sequences with several query
    tokens and the decode kernels for the single-token ones."""
    kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or meta.seq_lens.shape[0] == 0:
        return out
    if not meta.is_decode_only:
        launch_prefill(q, k_cache, v_cache, out, meta, scale, skip_decodes=True, k_scale=k_scale, v_scale=v_scale)
    launch_decode(q, k_cache, v_cache, out, meta, scale, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    return out
