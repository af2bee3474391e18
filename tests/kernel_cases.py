"""Random inputs for the kernel tests: paged KV caches with shuffled block tables and batch metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels.attention import AttentionMetadata


@dataclass
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_meta(seq_lens, query_lens, block_tables, block_size, device, sliding_window=None, max_seq_len=None):
    """Metadata for sequences whose last ``query_lens[i]`` of ``seq_lens[i]`` tokens are queried."""
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = []
    for i, (qn, sn) in enumerate(zip(query_lens, seq_lens)):
        for p in range(sn - qn, sn):
            slots.append(int(block_tables[i, p // block_size]) * block_size + p % block_size)
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device=device, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max_seq_len if max_seq_len is not None else max(seq_lens),
        sliding_window=sliding_window,
    )


def random_block_tables(seq_lens, block_size, gen, extra_blocks=3, width=None):
    """Shuffled, non-contiguous block ids; unused table entries hold random (valid) ids."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(need) + extra_blocks
    width = max(max(need), 1) if width is None else width
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at : at + n]
        at += n
    return tables, num_blocks


def make_paged_case(
    seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device,
    sliding_window=None, seed=0, max_seq_len=None, table_width=None,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_block_tables(seq_lens, block_size, gen, width=table_width)
    meta = make_meta(seq_lens, query_lens, tables, block_size, device, sliding_window, max_seq_len)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    t = sum(query_lens)
    q = torch.randn((t, num_q_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    return PagedCase(q, k_cache, v_cache, meta, head_dim ** -0.5)


def fused_qkv_views(t, hq, hk, d, dtype, device, seed=0):
    """q, k, v as the strided views a fused qkv projection yields."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn((t, (hq + 2 * hk) * d), generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.reshape(t, hq, d), k.reshape(t, hk, d), v.reshape(t, hk, d)
