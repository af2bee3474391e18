"""Attention over a paged KV cache, for batches that mix prefill chunks and decodes.

The cache of one layer is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A sequence's tokens live in the blocks its block table lists, in order; token ``p`` of a
sequence sits in slot ``p % block_size`` of block ``table[p // block_size]``.

The batch is flattened: the query tokens of sequence ``i`` are rows
``query_start_loc[i]:query_start_loc[i+1]``, and they are the *last* tokens of its context of
``seq_lens[i]`` tokens (earlier ones are already in the cache).
"""

from __future__ import annotations

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


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Stores new keys and values [T, Hk, D] at their flat slots; slots < 0 are skipped."""
    nb, bs = k_cache.shape[:2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(nb * bs, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(nb * bs, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of a sequence, [length, Hk, D], read through its block table."""
    bs = cache.shape[1]
    nblk = (length + bs - 1) // bs
    return cache.index_select(0, table[:nblk]).flatten(0, 1)[:length]


def _decode_batch_ref(q, k_cache, v_cache, meta: AttentionMetadata, rows: list[int], seqs: list[int], scale: float):
    """One query token per sequence: gather every context at once, padded and masked."""
    bs = k_cache.shape[1]
    lens = torch.tensor([meta.seq_lens_cpu[i] for i in seqs], device=q.device)
    width = max(meta.seq_lens_cpu[i] for i in seqs)
    nblk = (width + bs - 1) // bs
    idx = torch.tensor(seqs, device=q.device)
    tables = meta.block_tables.index_select(0, idx)[:, :nblk].long()
    b = len(seqs)
    k = k_cache[tables].reshape(b, nblk * bs, *k_cache.shape[2:])[:, :width].to(q.dtype)
    v = v_cache[tables].reshape(b, nblk * bs, *v_cache.shape[2:])[:, :width].to(q.dtype)
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


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] against each sequence's cached context; returns [T, Hq, D].
    Single-token queries (decodes) are batched together; longer ones run one sequence at a time."""
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    dec_rows, dec_seqs = [], []
    start = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if qlen == 1:
            dec_rows.append(start)
            dec_seqs.append(i)
            start += 1
            continue
        if qlen == 0:
            continue
        table = meta.block_tables[i]
        k = gather_kv(k_cache, table, slen).to(q.dtype)
        v = gather_kv(v_cache, table, slen).to(q.dtype)
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
    if dec_rows:
        out[torch.tensor(dec_rows, device=q.device)] = _decode_batch_ref(q, k_cache, v_cache, meta, dec_rows, dec_seqs, scale)
    return out


def rotary_write_kv_ref(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Rotates q and k (``apply_rotary_ref``), writes the rotated k and v into the cache
    (``write_kv_ref``) and returns the rotated q."""
    from kiln.kernels.rotary import apply_rotary_ref

    q, k = apply_rotary_ref(q, k, positions, rope_cache)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """An attention layer's step before attention: the rotary embedding of q [T, Hq, D] and
    k [T, Hk, D] at ``positions``, the rotated k and v written to the paged cache at
    ``slot_mapping`` (slots < 0 skipped); returns the rotated q. One kernel on a GPU."""
    if q.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            return triton_ops.rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping)
    return rotary_write_kv_ref(q, k, v, positions, rope_cache, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if q.is_cuda:
        from kiln.kernels import triton_ops

        if triton_ops.available():
            return triton_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
