"""Fast GPU paths written in Triton. ``available()`` is False where Triton or CUDA is missing.

Every op takes the same arguments as its plain-torch reference and returns the same thing:

* ``rms_norm`` / ``add_rms_norm``: one program per row (the last dimension), float32 sums.
* ``silu_and_mul``: [.., 2I] -> [.., I].
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

The launchers also work on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

On Hopper and later every kernel here is launched with programmatic dependent launch (PDL):
the next kernel in the stream may start while the current one drains, and waits
(``griddepcontrol.wait``) before it touches anything the current one writes. Each kernel calls
``_gdc_enter`` before its first load of an activation (the GEMV loads its first weight tiles
before it), so a chain of kernels, or a CUDA graph of them, overlaps one kernel's tail with the
next one's launch. Every program of every kernel waits, even one that returns early, so a
kernel finishes only after its predecessor has. ``KILN_PDL=0`` turns it off.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
    _jit = triton.jit
except ImportError:  # the kernels below are then never launched
    triton = None
    _HAVE_TRITON = False

    class tl:  # noqa: N801 - stands in for triton.language so the signatures still parse
        constexpr = None

    def _jit(fn):
        return fn


@functools.lru_cache(maxsize=None)
def available() -> bool:
    if not _HAVE_TRITON:
        return False
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


_LOG2E = 1.4426950408889634


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    if index is None:
        return 8
    return torch.cuda.get_device_properties(index).multi_processor_count


_PDL_ENV = os.environ.get("KILN_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _pdl_capable(index) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch (sm_90 and later,
    not under the interpreter, not with ``KILN_PDL=0``)."""
    return _PDL_ENV and t.is_cuda and _pdl_capable(t.device.index)


def launch_opts(t: torch.Tensor) -> dict:
    """The keyword arguments of a launch on t's device: the kernel's PDL flag and Triton's."""
    on = pdl(t)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@_jit
def _gdc_enter(PDL: tl.constexpr):
    """Waits until the previous kernel in the stream has finished and its writes are visible,
    then lets the next kernel launch. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@_jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, n_inner,
    sx0, sx1, sr0, sr1, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    i0 = row // n_inner
    i1 = row % n_inner
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(x_ptr + i0 * sx0 + i1 * sx1 + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + i0 * sr0 + i1 * sr1 + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (y * w).to(out_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor):
    """(tensor, rows per outer index, outer stride, inner stride) addressing the rows of x."""
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() == 2:
        return x, 1, x.stride(0), 0
    return x, x.shape[1], x.stride(0), x.stride(1)


def _norm_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def _rms_norm_launch(x, residual, weight, eps):
    h = x.shape[-1]
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, res_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=res_dtype, device=x.device) if residual is not None else out
    if x.numel() == 0:
        return out, res_out
    xr, inner, sx0, sx1 = _rows(x)
    if residual is not None:
        rr, _, sr0, sr1 = _rows(residual.expand(x.shape))
    else:
        rr, sr0, sr1 = xr, 0, 0
    block = _pow2(h)
    _rms_norm_kernel[(x.numel() // h,)](
        xr, rr, weight.contiguous(), out, res_out, h, inner, sx0, sx1, sr0, sr1, float(eps),
        HAS_RES=residual is not None, BLOCK=block, num_warps=_norm_warps(block), **launch_opts(x),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _rms_norm_launch(x, residual, weight, eps)


# ----------------------------------------------------------------------------------------------
# SiLU and multiply
# ----------------------------------------------------------------------------------------------


@_jit
def _silu_mul_kernel(x_ptr, out_ptr, n, sx, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _gdc_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n
    g = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + n + cols, mask=m, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block = min(_pow2(n), 2048)
    _silu_mul_kernel[(x2.shape[0], _cdiv(n, block))](x2, out, n, x2.stride(0), BLOCK=block, num_warps=4, **launch_opts(x2))
    return out


# ----------------------------------------------------------------------------------------------
# Rotary embedding and the KV-cache write
# ----------------------------------------------------------------------------------------------


@_jit
def _rotate_heads(src, dst, s_src, s_dst, n_heads, cos, sin, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotates the n_heads rows at src (row stride s_src) into dst (row stride s_dst); the
    result is rounded to src's dtype (as the reference computes it) and stored in dst's."""
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
    q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cache_ptr,
    sq0, sq1, sk0, sk1, sv0, sv1, sc0, sc1, sc2, svc0, svc1, svc2, s_cache,
    n_qh, n_kh, half, block_size,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr = False,
):
    _gdc_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, t, s_cache, half, q_ptr.dtype.element_ty, BLOCK_HALF)
    d = 2 * half
    _rotate_heads(q_ptr + t * sq0, qo_ptr + t * n_qh * d, sq1, d, n_qh, cos, sin, half, BLOCK_H, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        _rotate_heads(k_ptr + t * sk0, kc_ptr + blk * sc0 + off * sc1, sk1, sc2, n_kh, cos, sin, half,
                      BLOCK_H, BLOCK_HALF)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        for h0 in range(0, n_kh, BLOCK_H):
            heads = h0 + offs_h
            m = (heads < n_kh)[:, None] & (offs_d < d)[None, :]
            v = tl.load(v_ptr + t * sv0 + heads[:, None] * sv1 + offs_d[None, :], mask=m)
            dst = vc_ptr + blk * svc0 + off * svc1 + heads[:, None] * svc2 + offs_d[None, :]
            tl.store(dst, v.to(vc_ptr.dtype.element_ty), mask=m)


def rotary_write_kv(q, k, v, positions, cache, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Rotates q [T, Hq, D] and k [T, Hk, D] by the positions' cos/sin rows; writes the rotated
    k and v [T, Hk, D] into the paged cache at ``slot_mapping`` (skipping slots < 0) and
    returns the rotated q (new, contiguous). q, k and v may be strided views of one fused
    projection."""
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
        q, k, v, qo, k_cache, v_cache, positions, slot_mapping, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cache.stride(0),
        hq, hk, d // 2, k_cache.shape[1], BLOCK_H=heads, BLOCK_HALF=bh, num_warps=4, **launch_opts(q),
    )
    return qo


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------


@_jit
def _split_len(span, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr):
    """Tokens per context slice: the span shared evenly, in whole tiles, at least MIN_PART."""
    part = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
    return tl.maximum(part, MIN_PART)


@_jit
def _load_kv_tile(cache_ptr, row_ptr, pos, n_mask, kvh, c0, c1, c2, offs_d, d_mask,
                  BLOCK_SIZE: tl.constexpr):
    blk = tl.load(row_ptr + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    off = blk * c0 + (pos % BLOCK_SIZE) * c1 + kvh * c2
    return tl.load(cache_ptr + off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)


@_jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, part_o_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
    sq0, sq1, so0, so1, sk0, sk1, sk2, sv0, sv1, sv2, s_bt,
    scale_log2, window, group, n_q_heads, head_dim, BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DIRECT: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MIN_PART: tl.constexpr,
    PDL: tl.constexpr = False,
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
    part = _split_len(seq_len - lo, NUM_SPLITS, BLOCK_N, MIN_PART)
    start = lo + split * part
    if start >= seq_len:
        return
    end = tl.minimum(start + part, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    heads = kvh * group + offs_g
    q_row = q_row.to(tl.int64)
    q = tl.load(q_ptr + q_row * sq0 + heads[:, None] * sq1 + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        k = _load_kv_tile(kc_ptr, bt_row, pos, n_mask, kvh, sk0, sk1, sk2, offs_d, d_mask, BLOCK_SIZE)
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
        v = _load_kv_tile(vc_ptr, bt_row, pos, n_mask, kvh, sv0, sv1, sv2, offs_d, d_mask, BLOCK_SIZE)
        v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / l_i[:, None]
    st_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        dst = out_ptr + q_row * so0 + heads[:, None] * so1 + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        idx = (b.to(tl.int64) * n_q_heads + heads) * NUM_SPLITS + split
        tl.store(part_o_ptr + idx[:, None] * head_dim + offs_d[None, :], o, mask=st_mask)
        tl.store(part_lse_ptr + idx, m_i + tl.log2(l_i), mask=g_mask)


@_jit
def _decode_reduce_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr, so0, so1, window, n_q_heads, head_dim,
    NUM_SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
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
    n_act = tl.cdiv(span, _split_len(span, NUM_SPLITS, BLOCK_N, MIN_PART))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_act
    idx = (b.to(tl.int64) * n_q_heads + h) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + idx, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask, tl.exp2(lse - m), 0.0)
    o = tl.load(part_o_ptr + idx[:, None] * head_dim + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    dst = out_ptr + q_row.to(tl.int64) * so0 + h * so1 + offs_d
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


@_jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
    sq0, sq1, so0, so1, sk0, sk1, sk2, sv0, sv1, sv2, s_bt,
    scale_log2, window, group, head_dim, BLOCK_SIZE: tl.constexpr,
    SKIP_DECODES: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, G_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
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
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
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
        k = _load_kv_tile(kc_ptr, bt_row, pos, n_mask, kvh, sk0, sk1, sk2, offs_d, d_mask, BLOCK_SIZE)
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
        v = _load_kv_tile(vc_ptr, bt_row, pos, n_mask, kvh, sv0, sv1, sv2, offs_d, d_mask, BLOCK_SIZE)
        v = v.to(q.dtype)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    dst = out_ptr + rows[:, None] * so0 + heads[:, None] * so1 + offs_d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


_MAX_SPLITS = 64


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


def _attn_common(q, k_cache, v_cache):
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be contiguous"
    d = q.shape[-1]
    return q, dict(
        sk=(k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        sv=(v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        block_d=max(16, _pow2(d)),
        ieee=q.dtype == torch.float32,
    )


def _block_n(c) -> int:
    return 64 if c["block_d"] <= 128 and not c["ieee"] else 32


def launch_decode(q, k_cache, v_cache, out, meta, scale, num_splits=None):
    """Flash-decoding over every sequence of the batch whose query length is one."""
    num_seqs = meta.seq_lens.shape[0]
    _, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    q, c = _attn_common(q, k_cache, v_cache)
    block_n = _block_n(c)
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
        q, k_cache, v_cache, out, part_o, part_lse, meta.query_start_loc, meta.seq_lens, bt,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *c["sk"], *c["sv"], bt.stride(0),
        float(scale) * _LOG2E, int(window or 0), group, hq, d, BLOCK_SIZE=bs,
        NUM_SPLITS=num_splits, DIRECT=direct, HAS_WINDOW=window is not None, IEEE=c["ieee"],
        BLOCK_G=max(16, _pow2(group)), BLOCK_N=block_n, BLOCK_D=c["block_d"], MIN_PART=min_part,
        num_warps=4, **launch_opts(q),
    )
    if not direct:
        _decode_reduce_kernel[(num_seqs, hq)](
            out, part_o, part_lse, meta.query_start_loc, meta.seq_lens, out.stride(0), out.stride(1),
            int(window or 0), hq, d,
            NUM_SPLITS=num_splits, HAS_WINDOW=window is not None, BLOCK_S=max(2, _pow2(num_splits)),
            BLOCK_D=c["block_d"], BLOCK_N=block_n, MIN_PART=min_part, num_warps=4, **launch_opts(q),
        )
    return out


def launch_prefill(q, k_cache, v_cache, out, meta, scale, skip_decodes=True, block_m=None):
    """Tiled causal attention for every sequence (those of query length one are left to the
    decode kernel when ``skip_decodes``)."""
    num_seqs = meta.seq_lens.shape[0]
    _, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    q, c = _attn_common(q, k_cache, v_cache)
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
        q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, bt,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *c["sk"], *c["sv"], bt.stride(0),
        float(scale) * _LOG2E, int(window or 0), group, d, BLOCK_SIZE=bs,
        SKIP_DECODES=skip_decodes, HAS_WINDOW=window is not None, IEEE=c["ieee"],
        BLOCK_M=block_m, G_P2=g_p2, BLOCK_N=block_n, BLOCK_D=c["block_d"],
        num_warps=8 if block_m * c["block_d"] >= 128 * 128 else 4, **launch_opts(q),
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                    num_splits=None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] against the paged cache; returns [T, Hq, D].

    Decode-only batches (``meta.max_query_len == 1``) run only the flash-decoding kernels and do
    no host synchronisation. Mixed batches run the tiled kernel for sequences with several query
    tokens and the decode kernels for the single-token ones."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or meta.seq_lens.shape[0] == 0:
        return out
    if not meta.is_decode_only:
        launch_prefill(q, k_cache, v_cache, out, meta, scale, skip_decodes=True)
    launch_decode(q, k_cache, v_cache, out, meta, scale, num_splits=num_splits)
    return out
