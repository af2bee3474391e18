"""The float8_e4m3fn KV cache on the CPU: the documented rounding of the write, attention over an
e4m3 cache against plain attention over the dequantized keys and values, the argument checks,
and the cache's allocation, block copies and capacity."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.kernels.attention import (
    FP8_MAX, KV_FP8_DTYPE, MIN_KV_SCALE, dequantize_kv, gather_kv, kv_cache_is_fp8, kv_scales_from_amax,
    paged_attention, paged_attention_ref, quantize_kv, rotary_write_kv, rotary_write_kv_ref, write_kv_ref,
)
from kiln.kernels.rotary import apply_rotary_ref
from kiln.runtime import kv_cache as kv_cache_mod
from kiln.runtime.kv_cache import KVCache, memory_block_capacity

from kernel_cases import make_meta, make_paged_case, make_rotary_kv_case, random_block_tables

F8 = KV_FP8_DTYPE
BF = torch.bfloat16


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _scale(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def _e4m3_nearest(y: torch.Tensor) -> torch.Tensor:
    """The byte of the e4m3 value nearest each float32 ``y`` (|y| <= 448), ties to the even code:
    an implementation of round-to-nearest-even independent of torch's cast."""
    codes = torch.arange(256, dtype=torch.int32)
    vals = codes.to(torch.uint8).view(F8).float()
    finite = ~vals.isnan()
    codes, vals = codes[finite], vals[finite].double()
    dist = (y.double().reshape(-1, 1) - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tied = dist == best
    # among equally near codes prefer an even mantissa (even code), then the sign of y (+-0)
    same_sign = (codes[None, :] >= 128) == torch.signbit(y).reshape(-1, 1)
    rank = tied.int() * 4 + (codes[None, :] % 2 == 0).int() * 2 + same_sign.int()
    return codes[rank.argmax(dim=1)].to(torch.uint8).reshape(y.shape)


def _documented(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bytes the cache must hold for ``x``: x in float32 divided by the scale, clamped to
    +-448, rounded to nearest even e4m3."""
    return _e4m3_nearest((x.float() / scale).clamp(-FP8_MAX, FP8_MAX))


# ----------------------------------------------------------------------------------------------
# Scales and the rounding of the write
# ----------------------------------------------------------------------------------------------


def test_kv_scales_from_amax():
    assert kv_scales_from_amax(448.0) == 1.0
    assert kv_scales_from_amax(torch.tensor(8.96)) == pytest.approx(0.02)
    assert kv_scales_from_amax(0.0) == MIN_KV_SCALE
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amax"):
            kv_scales_from_amax(bad)


def test_quantize_kv_is_the_documented_rounding():
    g = torch.Generator().manual_seed(1)
    s = _scale(0.0371)
    x = torch.cat([
        torch.randn(4000, generator=g) * 6,
        torch.randn(200, generator=g) * 40,  # beyond 448 * s: clamps
        torch.randn(200, generator=g) * 1e-3,  # e4m3 subnormals
        torch.tensor([0.0, -0.0, 448 * 0.0371, -1000.0, 1000.0]),
    ])
    got = quantize_kv(x, s)
    assert got.dtype == F8
    assert torch.equal(_bytes(got), _documented(x, s))
    assert not got.float().isnan().any()
    ties = torch.tensor([3.125, 3.375, -0.5625, 124.0, 0.015625 * 1.5]) * 0.0371
    assert torch.equal(_bytes(quantize_kv(ties, s)), _documented(ties, s))
    back = dequantize_kv(got, s, torch.float32)
    assert torch.equal(back, got.float() * s)
    assert back.abs().max() <= FP8_MAX * s


@pytest.mark.parametrize("dtype", [BF, torch.float32, torch.float16])
def test_write_then_read_round_trip(dtype):
    """Keys and values written through their slots (padding skipped) come back through a block
    table exactly as the documented rounding, and read as ``cache.float() * scale``."""
    nb, bs, hk, d, t = 6, 4, 2, 16, 13
    g = torch.Generator().manual_seed(2)
    k = (torch.randn((t, hk, d), generator=g) * 5).to(dtype)
    v = (torch.randn((t, hk, d), generator=g) * 0.3).to(dtype)
    ks = _scale(kv_scales_from_amax(0.8 * k.float().abs().max()))
    vs = _scale(kv_scales_from_amax(v.float().abs().max()))
    table = torch.randperm(nb, generator=g)
    slots = (table[torch.arange(t) // bs] * bs + torch.arange(t) % bs).long()
    slots[[3, 9]] = -1
    k_cache = quantize_kv(torch.randn((nb, bs, hk, d), generator=g), ks)
    v_cache = quantize_kv(torch.randn((nb, bs, hk, d), generator=g), vs)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, k_cache, v_cache, slots, ks, vs)

    got_k, got_v = gather_kv(k_cache, table, t), gather_kv(v_cache, table, t)
    assert got_k.dtype == F8 and got_k.shape == (t, hk, d)
    written = slots >= 0
    assert torch.equal(_bytes(got_k)[written], _documented(k, ks)[written])
    assert torch.equal(_bytes(got_v)[written], _documented(v, vs)[written])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[written]] = False
    rows = (nb * bs, hk, d)
    assert torch.equal(_bytes(k_cache).view(rows)[untouched], _bytes(before_k).view(rows)[untouched])
    assert torch.equal(_bytes(v_cache).view(rows)[untouched], _bytes(before_v).view(rows)[untouched])
    assert torch.equal(dequantize_kv(got_k, ks, torch.float32), got_k.float() * ks)


def test_rotary_write_kv_ref_quantizes_the_rotated_keys():
    case = make_rotary_kv_case(9, 4, 2, 32, 8, 5, BF, "cpu", max_pos=256, theta=10000.0, pad=[2, 6], seed=3,
                               cache_dtype=F8)
    assert case.k_cache.dtype == F8 and case.k_scale.shape == (1,)
    qo, kc, vc = case.run(rotary_write_kv_ref)
    q_rot, k_rot = apply_rotary_ref(case.q, case.k, case.positions, case.rope)
    assert torch.equal(qo, q_rot)
    valid = case.slots >= 0
    slots = case.slots[valid]
    rows = (-1, *kc.shape[2:])
    assert torch.equal(_bytes(kc).view(rows)[slots], _documented(k_rot, case.k_scale)[valid])
    assert torch.equal(_bytes(vc).view(rows)[slots], _documented(case.v, case.v_scale)[valid])
    assert (_documented(k_rot, case.k_scale) == 0x7E).any()  # some keys clamp to 448
    qo2, kc2, vc2 = case.run(rotary_write_kv)
    assert torch.equal(qo2, qo) and _same_bytes(kc2, kc) and _same_bytes(vc2, vc)


def test_sixteen_bit_cache_unchanged():
    case = make_rotary_kv_case(7, 4, 2, 32, 8, 4, BF, "cpu", max_pos=64, theta=10000.0, pad=[1], seed=4)
    assert case.k_scale is None
    qo, kc, vc = case.run(rotary_write_kv_ref)
    _, k_rot = apply_rotary_ref(case.q, case.k, case.positions, case.rope)
    valid = case.slots >= 0
    assert torch.equal(kc.view(-1, 2, 32)[case.slots[valid]], k_rot[valid])
    assert torch.equal(vc.view(-1, 2, 32)[case.slots[valid]], case.v[valid])


# ----------------------------------------------------------------------------------------------
# Attention over an e4m3 cache
# ----------------------------------------------------------------------------------------------


def plain_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale) -> torch.Tensor:
    """Causal attention written out per sequence, in float64, over keys ``k_cache.float() *
    k_scale`` and values ``v_cache.float() * v_scale`` read token by token through the tables."""
    kd = k_cache.float() * k_scale
    vd = v_cache.float() * v_scale
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hk
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for i, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        table = meta.block_tables[i].tolist()
        keys = torch.stack([kd[table[p // bs], p % bs] for p in range(slen)]).double()
        vals = torch.stack([vd[table[p // bs], p % bs] for p in range(slen)]).double()
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        qpos = torch.arange(slen - qlen, slen)[:, None]
        kpos = torch.arange(slen)[None, :]
        keep = kpos <= qpos
        if meta.sliding_window is not None:
            keep &= kpos > qpos - meta.sliding_window
        qi = q[row : row + qlen].double()
        s = torch.einsum("qhd,khd->hqk", qi, keys) * scale
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        out[row : row + qlen] = torch.einsum("hqk,khd->qhd", p, vals)
        row += qlen
    return out


CASES = {
    "decode": ([1, 37, 300, 129], [1, 1, 1, 1], None),
    "prefill-chunks": ([40, 77, 33], [40, 23, 5], None),
    "mixed": ([40, 77, 70, 1, 45], [40, 1, 23, 1, 5], None),
    "mixed-window": ([40, 77, 70, 1, 45], [40, 1, 23, 1, 5], 19),
    "decode-window": ([5, 90, 333], [1, 1, 1], 40),
}
HEADS = {"gqa": (4, 2, 32, 16), "mqa": (3, 1, 32, 8), "mha": (2, 2, 64, 16)}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_paged_attention_fp8_against_plain_attention(name, heads, dtype):
    seq_lens, query_lens, window = CASES[name]
    hq, hk, d, bs = HEADS[heads]
    case = make_paged_case(seq_lens, query_lens, hq, hk, d, bs, dtype, "cpu", sliding_window=window, seed=5,
                           cache_dtype=F8)
    assert case.k_cache.dtype == F8 and not torch.equal(case.k_scale, case.v_scale)
    out = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    want = plain_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, case.k_scale, case.v_scale)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    rel = ((out.double() - want).norm() / want.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    assert torch.equal(paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales), out)


def test_cache_written_in_chunks_then_attended():
    """A KVCache filled step by step (a prompt in two chunks beside another sequence's decodes)
    through write_kv_ref, attended after every step: the same as plain attention over the
    documented rounding of everything written so far."""
    hq, hk, d, bs = 4, 2, 32, 8
    steps = [(20, 5), (13, 1), (1, 1), (1, 1)]
    total = [sum(s[i] for s in steps) for i in range(2)]
    g = torch.Generator().manual_seed(6)
    tables, nb = random_block_tables(total, bs, g)
    kv = KVCache(1, nb, bs, hk, d, F8, "cpu")
    k_cache, v_cache = kv.layers[0]
    new_k = [torch.randn((n, hk, d), generator=g) * 2 for n in total]
    new_v = [torch.randn((n, hk, d), generator=g) * 0.7 for n in total]
    ks = _scale(kv_scales_from_amax(max(x.abs().max() for x in new_k)))
    vs = _scale(kv_scales_from_amax(max(x.abs().max() for x in new_v)))
    done = [0, 0]
    for qlens in steps:
        lens = [done[i] + qlens[i] for i in range(2)]
        meta = make_meta(lens, list(qlens), tables, bs, "cpu")
        k = torch.cat([new_k[i][done[i] : lens[i]] for i in range(2)])
        v = torch.cat([new_v[i][done[i] : lens[i]] for i in range(2)])
        q = torch.randn((sum(qlens), hq, d), generator=g)
        write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, ks, vs)
        out = paged_attention(q, k_cache, v_cache, meta, d**-0.5, ks, vs)
        want = plain_attention(q, k_cache, v_cache, meta, d**-0.5, ks, vs)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
        for i in range(2):
            got = gather_kv(k_cache, meta.block_tables[i], lens[i])
            assert torch.equal(_bytes(got), _documented(new_k[i][: lens[i]], ks))
        done = lens


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def test_scales_checked():
    case = make_paged_case([9, 3], [1, 3], 4, 2, 16, 4, BF, "cpu", seed=7, cache_dtype=F8)
    args = (case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_attention_ref(*args)
    with pytest.raises(ValueError, match="needs v_scale"):
        paged_attention(*args, k_scale=case.k_scale)
    with pytest.raises(ValueError, match="float32 tensor of shape"):
        paged_attention_ref(*args, k_scale=case.k_scale.double(), v_scale=case.v_scale)
    with pytest.raises(ValueError, match="float32 tensor of shape"):
        paged_attention_ref(*args, k_scale=case.k_scale.repeat(2), v_scale=case.v_scale)
    with pytest.raises(ValueError, match="float32 tensor of shape"):
        paged_attention_ref(*args, k_scale=0.5, v_scale=case.v_scale)
    with pytest.raises(ValueError, match="is on meta"):
        paged_attention_ref(*args, k_scale=case.k_scale, v_scale=torch.empty(1, device="meta"))
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    slots = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="needs k_scale"):
        write_kv_ref(k, v, case.k_cache, case.v_cache, slots)
    bf_k, bf_v = case.k_cache.to(BF), case.v_cache.to(BF)
    with pytest.raises(ValueError, match="for float8_e4m3fn KV caches"):
        write_kv_ref(k, v, bf_k, bf_v, slots, case.k_scale, case.v_scale)
    with pytest.raises(ValueError, match="for float8_e4m3fn KV caches"):
        paged_attention(case.q, bf_k, bf_v, case.meta, case.scale, v_scale=case.v_scale)
    with pytest.raises(ValueError, match="one dtype"):
        kv_cache_is_fp8(case.k_cache, bf_v, case.k_scale, case.v_scale)
    e5 = case.k_cache.to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="not supported"):
        kv_cache_is_fp8(e5, e5)
    rc = make_rotary_kv_case(3, 4, 2, 16, 4, 3, BF, "cpu", max_pos=16, theta=10000.0, pad=[], seed=8, cache_dtype=F8)
    with pytest.raises(ValueError, match="needs k_scale"):
        rotary_write_kv(rc.q, rc.k, rc.v, rc.positions, rc.rope, rc.k_cache, rc.v_cache, rc.slots)
    assert kv_cache_is_fp8(case.k_cache, case.v_cache, case.k_scale, case.v_scale)
    assert not kv_cache_is_fp8(bf_k, bf_v)


# ----------------------------------------------------------------------------------------------
# The cache itself
# ----------------------------------------------------------------------------------------------


def test_kv_cache_fp8_allocation_and_copy_blocks():
    kv = KVCache(3, 7, 4, 2, 8, F8, "cpu")
    assert kv.dtype == F8
    for k, v in kv.layers:
        assert k.dtype == F8 and v.dtype == F8 and k.shape == (7, 4, 2, 8)
        assert not _bytes(k).any() and not _bytes(v).any() and not k.float().any()
    g = torch.Generator().manual_seed(9)
    for k, v in kv.layers:
        _bytes(k).copy_(torch.randint(0, 127, k.shape, generator=g, dtype=torch.uint8))
        _bytes(v).copy_(torch.randint(128, 255, v.shape, generator=g, dtype=torch.uint8))
    before = [(k.clone(), v.clone()) for k, v in kv.layers]
    kv.copy_blocks([(1, 4), (6, 0), (2, 3)])
    for (k, v), (k0, v0) in zip(kv.layers, before):
        for src, dst in [(1, 4), (6, 0), (2, 3)]:
            assert _same_bytes(k[dst], k0[src]) and _same_bytes(v[dst], v0[src])
        for blk in (1, 2, 5, 6):
            assert _same_bytes(k[blk], k0[blk]) and _same_bytes(v[blk], v0[blk])


def test_kv_cache_sixteen_bit_dtype_attribute():
    kv = KVCache(1, 2, 4, 1, 8, BF, "cpu")
    assert kv.dtype == BF and kv.layers[0][0].dtype == BF
    kv.layers[0][0][1].fill_(1.5)
    kv.copy_blocks([(1, 0)])
    assert torch.equal(kv.layers[0][0][0], kv.layers[0][0][1])


def test_fp8_capacity_is_twice_bfloat16(monkeypatch):
    shape = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128)
    bf = KVCache.bytes_per_block(dtype=BF, **shape)
    f8 = KVCache.bytes_per_block(dtype=F8, **shape)
    assert bf == 2 * 32 * 16 * 8 * 128 * 2 and f8 * 2 == bf
    monkeypatch.setattr(kv_cache_mod, "host_available_memory", lambda: 4 * 1000 * bf + 7)
    cap_bf = memory_block_capacity(32, 8, 128, 16, BF, "cpu")
    cap_f8 = memory_block_capacity(32, 8, 128, 16, F8, "cpu")
    assert cap_bf == 1000 and cap_f8 == 2000
    assert math.isclose(cap_f8 * f8, cap_bf * bf)


@pytest.mark.parametrize("cache", ["bf16", "fp8"])
@pytest.mark.parametrize("window", [None, 20])
def test_reference_prefill_groups_equal_one_sequence_at_a_time(cache, window, monkeypatch):
    """The CPU reference runs short multi-token queries as padded groups: the same numbers as
    the loop over sequences (decodes, prefill chunks and verification rows mixed in one batch)."""
    import kiln.kernels.attention as A
    from kernel_cases import make_paged_case

    lens, qlens = [40, 7, 90, 33, 1, 64, 5], [40, 3, 17, 1, 1, 5, 5]
    case = make_paged_case(lens, qlens, 4, 2, 32, 16, torch.float32, "cpu", sliding_window=window, seed=9,
                           cache_dtype=A.KV_FP8_DTYPE if cache == "fp8" else None)
    grouped = A.paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    monkeypatch.setattr(A, "_BATCH_ELEMS", 0)  # every multi-token query on its own
    alone = A.paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    torch.testing.assert_close(grouped, alone, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(A, "_BATCH_ELEMS", 4 * 3 * 90 * 2)  # groups of a few, split where they would grow past it
    torch.testing.assert_close(A.paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale,
                                                     **case.scales), alone, atol=1e-5, rtol=1e-5)
