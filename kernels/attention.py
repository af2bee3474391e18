"""Attention over a paged KV cache, for batches that mix prefill chunks and decodes.

The cache of one layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A sequence's tokens live in the blocks its block table lists, in order; token ``p`` of a
sequence sits in slot ``p % block_size`` of block ``table[p // block_size]``.

The batch is flattened: the query tokens of sequence ``i`` are rows
``query_start_loc[i]:query_start_loc[i+1]``, and they are the *last* tokens of its context of
``seq_lens[i]`` tokens (earlier ones are already in the cache).

A cache is either 16-bit (or float32), holding keys and values as they are, or float8_e4m3fn
with one float32 scale per layer for keys and one for values (``k_scale`` / ``v_scale``, tensors
of one element on the cache's device). An e4m3 cache holds ``quantize_kv(k, k_scale)``, that is
``(k.float() / k_scale).clamp(-448, 448)`` cast to e4m3 (round to nearest even), and attention
reads ``cache.float() * k_scale``. Every function below that takes a cache takes the two scales:
``None`` for a 16-bit cache (the results are then exactly what they were without scales), both
required for an e4m3 one; anything else raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Everything attention needs about the batch, passed explicitly to every layer.

    ``query_start_loc``: [B + 1] int32 offsets of each sequence's query rows.
    ``seq_lens``: [B] int32 context length of each sequence after this step's tokens.
    ``block_tables``: [B, max_blocks] int32 block ids (padding entries are never read).
    ``slot_mapping``: [T] int64 flat cache slot (block * block_size + offset) of each new token,
    ``-1`` for padding tokens that must not be written.
    ``query_lens_cpu`` / ``seq_lens_cpu``: the same lengths as Python lists, so the reference path
    needs no device synchronisation.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    sliding_window: int | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def step_layout(qlens: list[int], tables: list[list[int]]):
    """The host arrays of a step's metadata: block tables padded with zeros to the longest
    ([num_seqs, width] int32, width at least 1) and query start offsets ([num_seqs + 1] int32)."""
    import numpy as np

    width = max((len(x) for x in tables), default=1) or 1
    bt = np.zeros((len(tables), width), dtype=np.int32)
    for i, x in enumerate(tables):
        bt[i, : len(x)] = x
    qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
    np.cumsum(qlens, out=qsl[1:])
    return bt, qsl


KV_FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_KV_SCALE = 1e-12


def kv_scales_from_amax(amax: float) -> float:
    """The scale of one layer's keys (or values) in an e4m3 cache from the largest absolute key
    (value) seen on the calibration text: ``amax / 448``, at least ``MIN_KV_SCALE`` so that a
    layer whose keys were all zero still divides by a positive number."""
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be a finite number >= 0, got {amax}")
    return max(amax / FP8_MAX, MIN_KV_SCALE)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an e4m3 cache stores for keys or values ``x``: ``x`` in float32 divided by ``scale``,
    clamped to [-448, 448] and cast to float8_e4m3fn (round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values read from an e4m3 cache: ``x.float() * scale``, then ``dtype``."""
    return (x.float() * scale).to(dtype)


def _check_scale(name: str, scale, cache: torch.Tensor) -> None:
    if scale is None:
        raise ValueError(f"a float8_e4m3fn KV cache needs {name} (a float32 tensor of shape [1]); got None")
    if not isinstance(scale, torch.Tensor):
        raise ValueError(f"{name} must be a float32 tensor of shape [1], got {type(scale).__name__}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"{name} must be a float32 tensor of shape [1], got {scale.dtype} of shape {list(scale.shape)}"
        )
    if scale.device != cache.device:
        raise ValueError(f"{name} is on {scale.device} but the KV cache is on {cache.device}")


def kv_cache_is_fp8(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale=None, v_scale=None) -> bool:
    """Whether the caches are float8_e4m3fn, after checking that the scales fit them: both given
    (float32, one element, on the cache's device) for an e4m3 cache, both ``None`` otherwise."""
    fp8 = k_cache.dtype == KV_FP8_DTYPE
    if v_cache.dtype != k_cache.dtype and (fp8 or v_cache.dtype == KV_FP8_DTYPE):
        raise ValueError(f"the key and value caches must have one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if fp8:
        _check_scale("k_scale", k_scale, k_cache)
        _check_scale("v_scale", v_scale, v_cache)
        return True
    if k_cache.dtype.itemsize == 1:
        raise ValueError(f"KV cache dtype {k_cache.dtype} is not supported; the 8-bit cache is float8_e4m3fn")
    if k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale / v_scale are for float8_e4m3fn KV caches; this cache is {k_cache.dtype}")
    return False


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """An e4m3 cache as the uint8 tensor of its bytes (index_copy_ has no float8 kernel on every
    device); any other cache as it is."""
    return cache.view(torch.uint8) if cache.dtype == KV_FP8_DTYPE else cache


def _read(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries in the compute dtype: dequantized where there is a scale, cast otherwise."""
    return x.to(dtype) if scale is None else dequantize_kv(x, scale, dtype)


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Stores new keys and values [T, Hk, D] at their flat slots; slots < 0 are skipped. An e4m3
    cache stores ``quantize_kv(k, k_scale)`` and ``quantize_kv(v, v_scale)``."""
    fp8 = kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    nb, bs = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if fp8:
        rows = (nb * bs, *k_cache.shape[2:])
        _bytes(k_cache).view(rows).index_copy_(0, slot_mapping, quantize_kv(k, k_scale).view(torch.uint8))
        _bytes(v_cache).view(rows).index_copy_(0, slot_mapping, quantize_kv(v, v_scale).view(torch.uint8))
        return
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a sequence, [length, Hk, D], read through its block table
    (in the cache's dtype: e4m3 entries are returned as they are stored)."""
    bs = cache.shape[1]
    nblk = (length + bs - 1) // bs
    out = _bytes(cache).index_select(0, table[:nblk]).flatten(0, 1)[:length]
    return out.view(cache.dtype)


def _decode_batch_ref(q, k_cache, v_cache, meta: AttentionMetadata, rows: list[int], seqs: list[int], scale: float,
                      k_scale=None, v_scale=None):
    """One query token per sequence: gather every context at once, padded and masked."""
    bs = k_cache.shape[1]
    lens = torch.tensor([meta.seq_lens_cpu[i] for i in seqs], device=q.device)
    width = max(meta.seq_lens_cpu[i] for i in seqs)
    nblk = (width + bs - 1) // bs
    idx = torch.tensor(seqs, device=q.device)
    tables = meta.block_tables.index_select(0, idx)[:, :nblk].long()
    b = len(seqs)
    k = _bytes(k_cache)[tables].view(k_cache.dtype).reshape(b, nblk * bs, *k_cache.shape[2:])[:, :width]
    v = _bytes(v_cache)[tables].view(v_cache.dtype).reshape(b, nblk * bs, *v_cache.shape[2:])[:, :width]
    k, v = _read(k, k_scale, q.dtype), _read(v, v_scale, q.dtype)
    kpos = torch.arange(width, device=q.device)
    mask = kpos[None, :] < lens[:, None]
    if meta.sliding_window is not None:
        mask &= kpos[None, :] > (lens[:, None] - 1 - meta.sliding_window)
    qi = q.index_select(0, torch.tensor(rows, device=q.device)).unsqueeze(2)  # [B, Hq, 1, D]
    o = F.scaled_dot_product_attention(
        qi, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale,
        enable_gqa=q.shape[1] != k_cache.shape[2],
    )
    return o.squeeze(2)


_BATCH_ELEMS = 1 << 24
"""Score elements (sequences x query heads x query rows x keys) one padded prefill batch of the
reference holds at most; longer prompts run one sequence at a time."""


def _prefill_batch_ref(q, k_cache, v_cache, meta: AttentionMetadata, items: list[tuple[int, int, int, int]],
                       scale: float, k_scale=None, v_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Several multi-token queries at once, padded and masked: ``items`` are (first row, sequence,
    query length, context length). Returns (rows [R], outputs [R, Hq, D])."""
    bs = k_cache.shape[1]
    dev = q.device
    b = len(items)
    lq = max(it[2] for it in items)
    ls = max(it[3] for it in items)
    nblk = (ls + bs - 1) // bs
    qlen = torch.tensor([it[2] for it in items], device=dev)
    slen = torch.tensor([it[3] for it in items], device=dev)
    first = torch.tensor([it[0] for it in items], device=dev)
    j = torch.arange(lq, device=dev)
    valid = j[None, :] < qlen[:, None]  # [B, Lq]
    rows = torch.where(valid, first[:, None] + j[None, :], first[:, None])
    qb = q.index_select(0, rows.flatten()).view(b, lq, q.shape[1], q.shape[2]).transpose(1, 2)
    tables = meta.block_tables.index_select(0, torch.tensor([it[1] for it in items], device=dev))[:, :nblk].long()
    k = _bytes(k_cache)[tables].view(k_cache.dtype).reshape(b, nblk * bs, *k_cache.shape[2:])[:, :ls]
    v = _bytes(v_cache)[tables].view(v_cache.dtype).reshape(b, nblk * bs, *v_cache.shape[2:])[:, :ls]
    k, v = _read(k, k_scale, q.dtype), _read(v, v_scale, q.dtype)
    qpos = slen[:, None] - qlen[:, None] + j[None, :]  # [B, Lq]
    kpos = torch.arange(ls, device=dev)
    mask = kpos[None, None, :] <= qpos[:, :, None]
    if meta.sliding_window is not None:
        mask &= kpos[None, None, :] > qpos[:, :, None] - meta.sliding_window
    mask |= ~valid[:, :, None] & (kpos == 0)[None, None, :]  # padded rows see one key (no NaN), then are dropped
    o = F.scaled_dot_product_attention(qb, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=q.shape[1] != k_cache.shape[2])
    return rows[valid], o.transpose(1, 2)[valid]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] against each sequence's cached context; returns [T, Hq, D].
    Single-token queries (decodes) are batched together, short multi-token ones in padded groups,
    long prompts one sequence at a time.
    Keys and values are read in q's dtype (an e4m3 cache's through ``dequantize_kv``)."""
    kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    dec_rows, dec_seqs = [], []
    group: list[tuple[int, int, int, int]] = []
    start = 0

    def run_group():
        if group:
            rows, o = _prefill_batch_ref(q, k_cache, v_cache, meta, group, scale, k_scale, v_scale)
            out[rows] = o
            group.clear()

    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if qlen == 1:
            dec_rows.append(start)
            dec_seqs.append(i)
            start += 1
            continue
        if qlen == 0:
            continue
        if qlen * slen * hq <= _BATCH_ELEMS:  # short prompts share one padded product
            lq = max([qlen] + [g[2] for g in group])
            ls = max([slen] + [g[3] for g in group])
            if (len(group) + 1) * hq * lq * ls > _BATCH_ELEMS:
                run_group()
            group.append((start, i, qlen, slen))
            start += qlen
            continue
        table = meta.block_tables[i]
        k = _read(gather_kv(k_cache, table, slen), k_scale, q.dtype)
        v = _read(gather_kv(v_cache, table, slen), v_scale, q.dtype)
        qi = q[start : start + qlen]
        qpos = torch.arange(slen - qlen, slen, device=q.device)
        kpos = torch.arange(slen, device=q.device)
        mask = kpos[None, :] <= qpos[:, None]
        if meta.sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - meta.sliding_window
        if hq != hk:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        o = F.scaled_dot_product_attention(
            qi.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    run_group()
    if dec_rows:
        out[torch.tensor(dec_rows, device=q.device)] = _decode_batch_ref(
            q, k_cache, v_cache, meta, dec_rows, dec_seqs, scale, k_scale, v_scale
        )
    return out


def rotary_write_kv_ref(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping,
                        k_scale=None, v_scale=None) -> torch.Tensor:
    """Rotates q and k (``apply_rotary_ref``), writes the rotated k and v into the cache
    (``write_kv_ref``, quantized with the scales for an e4m3 cache) and returns the rotated q."""
    from kiln.kernels.rotary import apply_rotary_ref

    kv_cache_is_fp8(k_cache, v_cache, k_scale, v_scale)
    q, k = apply_rotary_ref(q, k, positions, rope_cache)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping,
                    k_scale=None, v_scale=None) -> torch.Tensor:
    """An attention layer's step before attention: the rotary embedding of q [T, Hq, D] and
    k [T, Hk, D] at ``positions``, the rotated k and v written to the paged cache at
    ``slot_mapping`` (slots < 0 skipped); returns the rotated q. One kernel on a GPU.

    For a float8_e4m3fn cache pass the layer's ``k_scale`` and ``v_scale`` (float32 tensors of
    shape [1] on the cache's device); the cache then holds ``quantize_kv`` of the rotated k and
    of v, byte for byte the same on the GPU and the CPU. The kernel reads the scales from their
    tensors, so a CUDA graph that captured it uses a scale changed in place."""
    if q.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            from kiln.kernels import triton_attention

            return triton_attention.rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping,
                                                    k_scale, v_scale)
    return rotary_write_kv_ref(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                    k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] against the paged cache (``paged_attention_ref``'s
    result); on a GPU the Triton kernels, which can be captured in a CUDA graph for decode-only
    batches. An e4m3 cache needs the layer's ``k_scale`` and ``v_scale``: keys are read as
    ``cache.float() * k_scale`` and values as ``cache.float() * v_scale``."""
    if q.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            from kiln.kernels import triton_attention

            return triton_attention.paged_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
