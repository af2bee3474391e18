"""Random inputs for the kernel tests: paged KV caches with shuffled block tables and batch metadata.

``cache_dtype=torch.float8_e4m3fn`` makes float8 caches with per-layer scales: keys and values are
drawn at different magnitudes (so swapped or missing scales show), quantized with
``quantize_kv``, and the cases carry the scales as float32 tensors of shape [1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.kernels.attention import KV_FP8_DTYPE, AttentionMetadata, kv_scales_from_amax, quantize_kv


@dataclass
class PagedCase:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def scales(self) -> dict:
        """The scale keyword arguments of the attention functions (none for a 16-bit cache)."""
        return {} if self.k_scale is None else dict(k_scale=self.k_scale, v_scale=self.v_scale)


K_MAGNITUDE, V_MAGNITUDE = 3.0, 0.5


def fp8_scale(values: torch.Tensor, device, amax_share: float = 1.0) -> torch.Tensor:
    """The scale tensor ([1], float32, on ``device``) calibrated on ``amax_share`` of the largest
    absolute value of ``values`` (below 1, some of those values clamp)."""
    amax = amax_share * values.abs().max().item()
    return torch.tensor([kv_scales_from_amax(amax)], dtype=torch.float32, device=device)


def fp8_cache(values: torch.Tensor, device):
    """``values`` (on the CPU) quantized as an e4m3 cache on ``device``, and its scale."""
    s = fp8_scale(values, "cpu")
    return quantize_kv(values, s).to(device), s.to(device)


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
    sliding_window=None, seed=0, max_seq_len=None, table_width=None, cache_dtype=None,
) -> PagedCase:
    """q in ``dtype``; the caches in ``cache_dtype`` (``dtype`` when None; for float8_e4m3fn,
    keys of magnitude ``K_MAGNITUDE`` and values of ``V_MAGNITUDE`` quantized with their scales)."""
    gen = torch.Generator().manual_seed(seed)
    tables, num_blocks = random_block_tables(seq_lens, block_size, gen, width=table_width)
    meta = make_meta(seq_lens, query_lens, tables, block_size, device, sliding_window, max_seq_len)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    t = sum(query_lens)
    q = torch.randn((t, num_q_heads, head_dim), generator=gen).to(device=device, dtype=dtype)
    if cache_dtype == KV_FP8_DTYPE:
        (k_cache, k_scale), (v_cache, v_scale) = fp8_cache(k * K_MAGNITUDE, device), fp8_cache(v * V_MAGNITUDE, device)
        return PagedCase(q, k_cache, v_cache, meta, head_dim ** -0.5, k_scale, v_scale)
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    k_cache = k.to(device=device, dtype=cache_dtype)
    v_cache = v.to(device=device, dtype=cache_dtype)
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
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def run(self, fn, k_cache=None, v_cache=None):
        """``fn`` (the kernel or the reference) on fresh copies of the caches (the case's, or
        ``k_cache`` / ``v_cache`` when given): (q out, k cache, v cache). The scales are passed
        where the cache is float8."""
        kc = (self.k_cache if k_cache is None else k_cache).clone()
        vc = (self.v_cache if v_cache is None else v_cache).clone()
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale) if kc.dtype == KV_FP8_DTYPE else {}
        qo = fn(self.q, self.k, self.v, self.positions, self.rope, kc, vc, self.slots, **scales)
        return qo, kc, vc


def make_rotary_kv_case(t, hq, hk, d, bs, num_blocks, dtype, device, *, max_pos, theta, pad, seed,
                        cache_dtype=None) -> RotaryKVCase:
    """Seeds ``seed`` to ``seed + 4``; ``pad`` indexes the slots set to -1. A float8_e4m3fn
    ``cache_dtype`` takes each scale from 3/4 of the largest new key (value), so some clamp."""
    from kiln.kernels.rotary import cos_sin_cache

    q, k, v = fused_qkv_views(t, hq, hk, d, dtype, device, seed=seed)
    pos = torch.randint(0, max_pos, (t,), generator=torch.Generator().manual_seed(seed + 1))
    slots = torch.randperm(num_blocks * bs, generator=torch.Generator().manual_seed(seed + 2))[:t]
    slots[pad] = -1

    def values(s):
        return torch.randn((num_blocks, bs, hk, d), generator=torch.Generator().manual_seed(s))

    rope = cos_sin_cache(d, max_pos, theta, device=device)
    if cache_dtype == KV_FP8_DTYPE:
        k_scale, v_scale = fp8_scale(k, "cpu", amax_share=0.75), fp8_scale(v, "cpu", amax_share=0.75)
        return RotaryKVCase(q, k, v, pos.to(device), rope, slots.to(device),
                            quantize_kv(values(seed + 3), k_scale).to(device),
                            quantize_kv(values(seed + 4), v_scale).to(device), k_scale.to(device), v_scale.to(device))
    k_cache, v_cache = (values(s).to(device=device, dtype=dtype) for s in (seed + 3, seed + 4))
    return RotaryKVCase(q, k, v, pos.to(device), rope, slots.to(device), k_cache, v_cache)
