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


@dataclass
class RotaryKVCase:
    """Inputs of ``rotary_write_kv``: q/k/v views of one fused projection, positions, the cos/sin
    table, cache slots (some -1: padding) and random caches to write into."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    rope: torch.Tensor
    slots: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def run(self, fn):
        """``fn`` (the kernel or the reference) on fresh copies of the caches: (q out, k cache, v cache)."""
        kc, vc = self.k_cache.clone(), self.v_cache.clone()
        qo = fn(self.q, self.k, self.v, self.positions, self.rope, kc, vc, self.slots)
        return qo, kc, vc


def make_rotary_kv_case(t, hq, hk, d, bs, num_blocks, dtype, device, *, max_pos, theta, pad, seed) -> RotaryKVCase:
    """Seeds ``seed`` to ``seed + 4``; ``pad`` indexes the slots set to -1."""
    from kiln.kernels.rotary import cos_sin_cache

    q, k, v = fused_qkv_views(t, hq, hk, d, dtype, device, seed=seed)
    pos = torch.randint(0, max_pos, (t,), generator=torch.Generator().manual_seed(seed + 1))
    slots = torch.randperm(num_blocks * bs, generator=torch.Generator().manual_seed(seed + 2))[:t]
    slots[pad] = -1

    def cache(s):
        return torch.randn((num_blocks, bs, hk, d), generator=torch.Generator().manual_seed(s)).to(device=device, dtype=dtype)

    return RotaryKVCase(q, k, v, pos.to(device), cos_sin_cache(d, max_pos, theta, device=device), slots.to(device),
                        cache(seed + 3), cache(seed + 4))
