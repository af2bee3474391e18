"""The Triton kernels against their plain-torch references on a CUDA device.

Each op runs on fresh random inputs at model-sized shapes; paged attention covers decode-only
batches with contexts from 1 to ~4,000 tokens over shuffled block tables, mixed batches of
prefill chunks continuing from cached context plus decodes, GQA / MQA / MHA, sliding windows,
and a CUDA-graph capture of the decode path replayed with different lengths and tables. The
float8_e4m3fn cache runs the same shapes: the rotary + cache write byte for byte against
``quantize_kv``, attention against the float32 reference over the same e4m3 cache, and a decode
step captured in a CUDA graph whose scales change in place between replays.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

from kiln.kernels import triton_attention as attn_ops  # noqa: E402
from kiln.kernels import triton_ops as ops  # noqa: E402
from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kiln.kernels.attention import (  # noqa: E402
    KV_FP8_DTYPE, paged_attention, paged_attention_ref, quantize_kv, rotary_write_kv, rotary_write_kv_ref,
)
from kiln.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kiln.kernels.rotary import cos_sin_cache  # noqa: E402

from kernel_cases import (  # noqa: E402
    K_MAGNITUDE, V_MAGNITUDE, fp8_cache, fused_qkv_views, make_meta, make_paged_case, make_rotary_kv_case,
)

DEV = "cuda"
BF, FP16 = torch.bfloat16, torch.float16


def _randn(*shape, dtype=BF, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def _close(a, b, tol, rtol=None):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol if rtol is None else rtol)


def _close_norm(a, b, dtype):
    """Norm outputs: the same float32 math as the reference, so at most a unit or two in the
    last place of bfloat16/float16 apart where a rounding flips."""
    if dtype == torch.float32:
        _close(a, b, 1e-5)
    else:
        _close(a, b, 1e-2, 2e-2)


def _check_attn(out, ref, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _close(out, ref, tol)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < (1e-4 if dtype == torch.float32 else 1e-2), rel


def test_available_and_dispatch():
    assert ops.available()
    x = _randn(4, 256, seed=1)
    w = _randn(256, seed=2)
    _close_norm(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), BF)


# ----------------------------------------------------------------------------------------------
# Elementwise and normalisation ops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF, FP16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (37, 4096), (128, 8192), (5, 5120), (3, 896)])
def test_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=3, scale=4.0)
    w = _randn(shape[-1], dtype=dtype, seed=4)
    _close_norm(ops.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (16, 2, 64)])
def test_rms_norm_qk_heads_strided(hq, hk, d):
    q, k, _ = fused_qkv_views(50, hq, hk, d, BF, DEV, seed=5)
    wq, wk = _randn(d, seed=6), _randn(d, seed=7)
    _close_norm(ops.rms_norm(q, wq, 1e-6), rms_norm_ref(q, wq, 1e-6), BF)
    _close_norm(ops.rms_norm(k, wk, 1e-6), rms_norm_ref(k, wk, 1e-6), BF)


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("shape", [(1, 4096), (300, 4096), (64, 8192)])
def test_add_rms_norm(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=8)
    r = _randn(*shape, dtype=dtype, seed=9, scale=3.0)
    w = _randn(shape[-1], dtype=dtype, seed=10)
    y, s = ops.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-5)
    _close(s, s_ref, 1e-3)
    _close_norm(y, y_ref, dtype)
    y2, s2 = add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(y2, y) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (77, 2 * 14336), (3, 2 * 11008), (9, 2 * 100)])
def test_silu_and_mul(shape, dtype):
    x = _randn(*shape, dtype=dtype, seed=11, scale=3.0)
    _close(ops.silu_and_mul(x), silu_and_mul_ref(x), 1e-2, 2e-2)
    assert torch.equal(silu_and_mul(x), ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("t,hq,hk,d,bs", [(1, 32, 8, 128, 16), (300, 32, 8, 128, 32), (33, 14, 2, 64, 16), (5, 4, 1, 32, 16)])
def test_rotary_write_kv(t, hq, hk, d, bs, dtype):
    """Rotary and the cache write in one kernel against apply_rotary_ref + write_kv_ref."""
    case = make_rotary_kv_case(t, hq, hk, d, bs, -(-t // bs) + 8, dtype, DEV, max_pos=8192, theta=500000.0,
                               pad=slice(None, None, 5), seed=18)
    qo, kc, vc = case.run(attn_ops.rotary_write_kv)
    q_ref, kc_ref, vc_ref = case.run(rotary_write_kv_ref)
    _close(qo, q_ref, 2e-2)
    _close(kc, kc_ref, 2e-2)
    assert torch.equal(vc, vc_ref)
    qo2, kc2, vc2 = case.run(rotary_write_kv)
    assert torch.equal(qo2, qo)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------

HEADS = [(32, 8, 128), (8, 1, 64), (16, 16, 64), (4, 2, 32)]


def _run(case, **kw):
    out = attn_ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **kw)
    ref = paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    return out, ref


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hq,hk,d", HEADS)
def test_decode_varied_contexts(hq, hk, d, bs, dtype):
    g = torch.Generator().manual_seed(20)
    seq_lens = [1, 4000, 2, 17, 513] + torch.randint(1, 4001, (12,), generator=g).tolist()
    case = make_paged_case(seq_lens, [1] * len(seq_lens), hq, hk, d, bs, dtype, DEV, seed=21)
    out, ref = _run(case)
    _check_attn(out, ref, dtype)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_forced_splits(splits):
    seq_lens = [1, 3999, 250, 1024, 64]
    case = make_paged_case(seq_lens, [1] * 5, 32, 8, 128, 16, BF, DEV, seed=22)
    out, ref = _run(case, num_splits=splits)
    _check_attn(out, ref, BF)


def test_decode_float32():
    case = make_paged_case([5, 700, 2100], [1, 1, 1], 8, 2, 64, 16, torch.float32, DEV, seed=23)
    out, ref = _run(case)
    _check_attn(out, ref, torch.float32)


@pytest.mark.parametrize("config", attn_ops.DECODE_CONFIGS_FP8)
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_decode_fp8_each_tile(config, splits):
    case = make_paged_case([1, 3999, 250, 1024, 64], [1] * 5, 32, 8, 128, 16, BF, DEV, seed=23, cache_dtype=F8)
    attn_ops.set_decode_config(torch.device(DEV), 128, config)
    try:
        out, ref = _run_fp8(case, num_splits=splits)
    finally:
        attn_ops.set_decode_config(torch.device(DEV), 128, None)
    _check_attn(out, ref, BF)


def test_tune_decode_keeps_the_faster_tile():
    case = make_paged_case([16], [1], 32, 8, 128, 16, BF, DEV, seed=24, cache_dtype=F8)
    k = torch.empty((9000, 16, 8, 128), dtype=F8, device=DEV)
    try:
        times = attn_ops.tune_decode(k, k.clone(), case.k_scale, case.v_scale, 32, BF)
        ran = {name: t for name, t in times.items() if not name.startswith("failed_")}
        assert set(ran) == {f"{n}x{w}" for n, w in attn_ops.DECODE_CONFIGS_FP8}, times
        assert attn_ops.decode_tuned_table()[f"{torch.cuda.current_device()}:128"] == min(ran, key=ran.get)
    finally:
        attn_ops.set_decode_config(torch.device(DEV), 128, None)


@pytest.mark.parametrize("window", [1, 128, 1000])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (8, 1, 64)])
def test_decode_sliding_window(hq, hk, d, window):
    seq_lens = [1, 90, 129, 1000, 3000, 4000]
    case = make_paged_case(seq_lens, [1] * 6, hq, hk, d, 16, BF, DEV, sliding_window=window, seed=24)
    out, ref = _run(case)
    _check_attn(out, ref, BF)


def test_decode_loose_length_bound():
    seq_lens = [3, 700, 1500]
    case = make_paged_case(seq_lens, [1] * 3, 32, 8, 128, 16, BF, DEV, seed=25, max_seq_len=131072,
                           table_width=8192)
    out, ref = _run(case)
    _check_attn(out, ref, BF)


MIXED = [
    ([1500, 300, 2000, 45, 900, 7], [512, 1, 100, 45, 1, 7]),
    ([4000, 1, 64, 2500], [1, 1, 64, 300]),
    ([33, 34, 35], [33, 2, 1]),
]


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hq,hk,d", HEADS)
@pytest.mark.parametrize("lens", MIXED)
def test_mixed_batch(lens, hq, hk, d, bs, dtype):
    seq_lens, query_lens = lens
    case = make_paged_case(seq_lens, query_lens, hq, hk, d, bs, dtype, DEV, seed=26)
    out, ref = _run(case)
    _check_attn(out, ref, dtype)


@pytest.mark.parametrize("window", [64, 700])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (8, 1, 64), (16, 16, 64)])
def test_mixed_sliding_window(hq, hk, d, window):
    seq_lens, query_lens = [1500, 300, 2000, 45, 900], [512, 1, 100, 45, 1]
    case = make_paged_case(seq_lens, query_lens, hq, hk, d, 16, BF, DEV, sliding_window=window, seed=27)
    out, ref = _run(case)
    _check_attn(out, ref, BF)


def test_long_prefill_gqa():
    case = make_paged_case([3000, 1200], [3000, 700], 32, 8, 128, 16, BF, DEV, seed=28)
    out, ref = _run(case)
    _check_attn(out, ref, BF)


def test_mixed_float32():
    case = make_paged_case([300, 20, 129], [150, 1, 129], 8, 2, 64, 16, torch.float32, DEV, seed=29)
    out, ref = _run(case)
    _check_attn(out, ref, torch.float32)


def test_dispatcher_routes_to_triton():
    case = make_paged_case([100, 7], [1, 1], 32, 8, 128, 16, BF, DEV, seed=30)
    a = paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    b = attn_ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
    assert torch.equal(a, b)


@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (8, 1, 64, 32)])
def test_decode_cuda_graph_replay(hq, hk, d, bs):
    """Capture one decode step, then replay it with new lengths and tables in the same buffers."""
    b, bound = 8, 4096
    width = bound // bs
    num_blocks = b * width + 5
    gen = torch.Generator().manual_seed(31)
    k_cache = torch.randn((num_blocks, bs, hk, d), generator=gen).to(DEV, BF)
    v_cache = torch.randn((num_blocks, bs, hk, d), generator=gen).to(DEV, BF)
    q = torch.randn((b, hq, d), generator=gen).to(DEV, BF)

    def tables():
        return torch.randperm(num_blocks, generator=gen)[: b * width].view(b, width)

    def lens():
        return [1, bound] + torch.randint(1, bound + 1, (b - 2,), generator=gen).tolist()

    meta = make_meta(lens(), [1] * b, tables(), bs, DEV, max_seq_len=bound)
    scale = d ** -0.5

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            paged_attention(q, k_cache, v_cache, meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(q, k_cache, v_cache, meta, scale)

    for step in range(3):
        new = make_meta(lens(), [1] * b, tables(), bs, DEV, max_seq_len=bound)
        meta.seq_lens.copy_(new.seq_lens)
        meta.block_tables.copy_(new.block_tables)
        q.copy_(torch.randn((b, hq, d), generator=gen).to(DEV, BF))
        graph.replay()
        ref = paged_attention_ref(q, k_cache, v_cache, new, scale)
        _check_attn(out, ref, BF)


# ----------------------------------------------------------------------------------------------
# float8_e4m3fn KV cache
# ----------------------------------------------------------------------------------------------

F8 = KV_FP8_DTYPE


def _bytes(x):
    return x.view(torch.uint8)


def _same_bytes(a, b) -> bool:
    return a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _close_fp8_keys(a, b, k_scale):
    """e4m3 keys of two rotations that may differ by a unit in bfloat16's last place: in
    dequantized units, that unit plus one e4m3 step (1/8) where it crosses a rounding edge."""
    torch.testing.assert_close(a.float() * k_scale, b.float() * k_scale, atol=2e-2, rtol=0.13)


def _run_fp8(case, **kw):
    """The kernels on an e4m3 case against the reference over the same cache with float32
    queries (keys and values exactly ``cache.float() * scale``), so the difference is the
    kernels' own rounding, as in the 16-bit checks."""
    out = attn_ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales, **kw)
    ref = paged_attention_ref(case.q.float(), case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    assert out.dtype == case.q.dtype
    return out, ref


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("t,hq,hk,d,bs", [(1, 32, 8, 128, 16), (300, 32, 8, 128, 32), (33, 14, 2, 64, 16), (5, 4, 1, 32, 16)])
def test_rotary_write_kv_fp8(t, hq, hk, d, bs, dtype):
    """The quantized store: values byte for byte the reference's; keys byte for byte
    ``quantize_kv`` of the rotation the kernel stores in a 16-bit cache; padding slots untouched."""
    case = make_rotary_kv_case(t, hq, hk, d, bs, -(-t // bs) + 8, dtype, DEV, max_pos=8192, theta=500000.0,
                               pad=slice(None, None, 5), seed=18, cache_dtype=F8)
    qo, kc, vc = case.run(attn_ops.rotary_write_kv)
    q_ref, kc_ref, vc_ref = case.run(rotary_write_kv_ref)
    zeros = torch.zeros(kc.shape, dtype=dtype, device=DEV)
    qo16, kc16, _ = case.run(attn_ops.rotary_write_kv, k_cache=zeros, v_cache=zeros)
    _close(qo, q_ref, 2e-2)
    assert torch.equal(qo, qo16)
    assert kc.dtype == F8 and _same_bytes(vc, vc_ref)
    rows = (-1, hk, d)
    slots = case.slots[case.slots >= 0]
    assert torch.equal(_bytes(kc).view(rows)[slots], _bytes(quantize_kv(kc16.view(rows)[slots], case.k_scale)))
    _close_fp8_keys(kc, kc_ref, case.k_scale)
    untouched = torch.ones(kc.view(rows).shape[0], dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.equal(_bytes(kc).view(rows)[untouched], _bytes(case.k_cache).view(rows)[untouched])
    qo2, kc2, vc2 = case.run(rotary_write_kv)
    assert torch.equal(qo2, qo) and _same_bytes(kc2, kc) and _same_bytes(vc2, vc)


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("hq,hk,d", HEADS)
def test_decode_fp8_varied_contexts(hq, hk, d, dtype):
    g = torch.Generator().manual_seed(20)
    seq_lens = [1, 4000, 2, 17, 513] + torch.randint(1, 4001, (12,), generator=g).tolist()
    case = make_paged_case(seq_lens, [1] * len(seq_lens), hq, hk, d, 16, dtype, DEV, seed=21, cache_dtype=F8)
    out, ref = _run_fp8(case)
    _check_attn(out, ref, dtype)


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_fp8_forced_splits(splits):
    case = make_paged_case([1, 3999, 250, 1024, 64], [1] * 5, 32, 8, 128, 16, BF, DEV, seed=22, cache_dtype=F8)
    out, ref = _run_fp8(case, num_splits=splits)
    _check_attn(out, ref, BF)


@pytest.mark.parametrize("window", [1, 128, 1000])
def test_decode_fp8_sliding_window(window):
    seq_lens = [1, 90, 129, 1000, 3000, 4000]
    case = make_paged_case(seq_lens, [1] * 6, 32, 8, 128, 16, BF, DEV, sliding_window=window, seed=24,
                           cache_dtype=F8)
    out, ref = _run_fp8(case)
    _check_attn(out, ref, BF)


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("hq,hk,d", HEADS)
@pytest.mark.parametrize("lens", MIXED)
def test_mixed_batch_fp8(lens, hq, hk, d, bs):
    seq_lens, query_lens = lens
    case = make_paged_case(seq_lens, query_lens, hq, hk, d, bs, BF, DEV, seed=26, cache_dtype=F8)
    out, ref = _run_fp8(case)
    _check_attn(out, ref, BF)


@pytest.mark.parametrize("window", [64, 700])
def test_mixed_fp8_sliding_window(window):
    seq_lens, query_lens = [1500, 300, 2000, 45, 900], [512, 1, 100, 45, 1]
    case = make_paged_case(seq_lens, query_lens, 32, 8, 128, 16, BF, DEV, sliding_window=window, seed=27,
                           cache_dtype=F8)
    out, ref = _run_fp8(case)
    _check_attn(out, ref, BF)


def test_fp8_float32_queries():
    case = make_paged_case([300, 20, 129, 2100], [150, 1, 129, 1], 8, 2, 64, 16, torch.float32, DEV, seed=29,
                           cache_dtype=F8)
    out, ref = _run_fp8(case)
    _check_attn(out, ref, torch.float32)


def test_fp8_dispatcher_routes_to_triton():
    case = make_paged_case([100, 7, 40], [1, 1, 12], 32, 8, 128, 16, BF, DEV, seed=30, cache_dtype=F8)
    a = paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    b = attn_ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **case.scales)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)


@pytest.mark.parametrize("hq,hk,d,bs", [(32, 8, 128, 16), (8, 1, 64, 32)])
def test_fp8_decode_step_cuda_graph(hq, hk, d, bs):
    """An FP8 layer's decode step (rotary + quantized cache write, then attention) captured in a
    CUDA graph and replayed with new tokens, lengths and tables, and with both scales changed in
    place before each replay: the kernels read the scales from their tensors, so every replay
    uses the current values."""
    b, bound = 8, 2048
    width = bound // bs
    num_blocks = b * width + 5
    gen = torch.Generator().manual_seed(32)
    shape = (num_blocks, bs, hk, d)
    k_cache, k_scale = fp8_cache(torch.randn(shape, generator=gen) * K_MAGNITUDE, DEV)
    v_cache, v_scale = fp8_cache(torch.randn(shape, generator=gen) * V_MAGNITUDE, DEV)
    rope = cos_sin_cache(d, bound, 500000.0, device=DEV)
    qkv = torch.empty((b, (hq + 2 * hk) * d), device=DEV, dtype=BF)
    q, k, v = (x.view(b, n, d) for x, n in zip(qkv.split([hq * d, hk * d, hk * d], dim=-1), (hq, hk, hk)))
    scale = d ** -0.5

    def new_meta():
        tables = torch.randperm(num_blocks, generator=gen)[: b * width].view(b, width)
        lens = [1, bound] + torch.randint(1, bound + 1, (b - 2,), generator=gen).tolist()
        return make_meta(lens, [1] * b, tables, bs, DEV, max_seq_len=bound)

    def load(new):
        meta.seq_lens.copy_(new.seq_lens)
        meta.block_tables.copy_(new.block_tables)
        meta.slot_mapping.copy_(new.slot_mapping)
        pos.copy_(new.seq_lens.long() - 1)
        qkv.copy_(torch.randn(qkv.shape, generator=gen).to(DEV, BF))

    def step():
        q2 = rotary_write_kv(q, k, v, pos, rope, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        return q2, paged_attention(q2, k_cache, v_cache, meta, scale, k_scale, v_scale)

    meta = new_meta()
    pos = torch.zeros(b, dtype=torch.long, device=DEV)
    load(meta)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, out = step()

    for i in range(3):
        new = new_meta()
        load(new)
        old_ks, old_vs = k_scale.clone(), v_scale.clone()
        k_scale.mul_(1.1)
        v_scale.mul_(1.25)
        kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
        graph.replay()
        q_ref = rotary_write_kv_ref(q, k, v, pos, rope, kc_ref, vc_ref, new.slot_mapping, k_scale, v_scale)
        _close(q_out, q_ref, 2e-2)
        assert _same_bytes(v_cache, vc_ref)
        _close_fp8_keys(k_cache, kc_ref, k_scale)
        ref = paged_attention_ref(q_out.float(), k_cache, v_cache, new, scale, k_scale, v_scale)
        _check_attn(out, ref, BF)
        stale = paged_attention_ref(q_out.float(), k_cache, v_cache, new, scale, old_ks, old_vs)
        assert (out.float() - stale).abs().max() > 0.05


# ----------------------------------------------------------------------------------------------
# Skinny matrix products (decode-time nn.Linear): kiln.kernels.gemv
# ----------------------------------------------------------------------------------------------

import torch.nn.functional as F  # noqa: E402

from kiln.kernels import gemv  # noqa: E402

LLAMA_LINEAR = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def _check_gemv(y, ref, tol=1.6e-2):
    """float32 sums rounded once to bfloat16/float16: a unit or two in the last place, plus slack
    for the few results near zero (cuBLAS may also round split-K partial sums)."""
    assert not y.isnan().any()
    scale = ref.abs().mean().item()
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * scale)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if y.dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", LLAMA_LINEAR)
def test_gemv_every_config(n, k, m):
    x = _randn(m, k, seed=60)
    w = _randn(n, k, seed=61)
    ref = gemv.gemv_ref(x, w)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=BF)
    for cfg in gemv.configs(m, BF):
        out.fill_(float("nan"))
        gemv.gemv(x, w, cfg, out=out)
        _check_gemv(out, ref)


@pytest.mark.parametrize("dtype", [BF, FP16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 4, 6])
def test_gemv_dtypes_bias_strided_rows(m, dtype):
    """An N and K off the tile sizes, a bias, and x / w rows that are views into wider tensors."""
    n, k = 1000, 1544
    x = _randn(m, k + 64, dtype=dtype, seed=62)[:, 32 : 32 + k]
    w = _randn(n, k + 128, dtype=dtype, seed=63)[:, :k]
    b = _randn(n, dtype=dtype, seed=64)
    ref = gemv.gemv_ref(x, w, b)
    for cfg in [gemv.GemvConfig(4, 2048, 4, 1, 1), gemv.GemvConfig(4, 1024, 4, 1, 2),
                gemv.GemvConfig(2, 512, 4, 1, 4), gemv.GemvConfig(16, 256, 8, 3, 4)]:
        _check_gemv(gemv.gemv(x, w, cfg, bias=b), ref, tol=1e-4 if dtype == torch.float32 else 1.6e-2)


@pytest.fixture(scope="module")
def gemv_tuned():
    saved = gemv.tuned_table()
    gemv.clear_table()
    rows = gemv.tune(LLAMA_LINEAR, BF, DEV, m_values=(1, 2), reps=5)
    yield rows
    gemv.clear_table()
    gemv.load_table(saved)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k", LLAMA_LINEAR)
def test_linear_after_tune(gemv_tuned, n, k, m):
    row = next(r for r in gemv_tuned if r["shape"] == [m, n, k])
    assert row["choice"] == "cublas" or row["us"] <= row["cublas_us"]
    x = _randn(m, k, seed=65)
    w = _randn(n, k, seed=66)
    y = gemv.linear(x, w)
    _check_gemv(y, gemv.gemv_ref(x, w), tol=2e-2)
    cfg = gemv.choice(m, n, k, BF)
    assert (cfg is None) == (row["choice"] == "cublas")
    expected = F.linear(x, w) if cfg is None else gemv.gemv(x, w, cfg)
    assert torch.equal(y, expected)
    # x [B, T, K] views go the same way
    y3 = gemv.linear(x.view(m, 1, k), w)
    assert y3.shape == (m, 1, n) and torch.equal(y3.view(m, n), expected)


def test_linear_fallbacks(gemv_tuned, monkeypatch):
    n, k = 4096, 4096
    tuned_row = [r for r in gemv.tuned_table() if r["shape"] == [1, n, k]]
    gemv.load_table([dict(shape=[1, n, k], dtype="bfloat16", choice="n4k2048w4s1r1", us=1.0, gb_s=1.0,
                          cublas_us=2.0)])
    x = _randn(1, k, seed=67)
    w = _randn(n, k, seed=68)
    assert torch.equal(gemv.linear(x, w), gemv.gemv(x, w, gemv.GemvConfig(4, 2048, 4, 1, 1)))
    monkeypatch.setenv("KILN_GEMV", "0")
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    monkeypatch.delenv("KILN_GEMV")
    # other dtypes, untuned M, and x with K strided all take F.linear
    assert torch.equal(gemv.linear(x.half(), w.half()), F.linear(x.half(), w.half()))
    x3 = _randn(3, k, seed=69)
    assert torch.equal(gemv.linear(x3, w), F.linear(x3, w))
    xs = _randn(1, 2 * k, seed=70)[:, ::2]
    assert torch.equal(gemv.linear(xs, w), F.linear(xs, w))
    gemv.load_table(tuned_row)


def test_linear_cuda_graph(gemv_tuned):
    """Capture ``linear`` for a tuned and an untuned shape, replay with new inputs."""
    k = 4096
    w_tuned = _randn(4096, k, seed=71)
    w_other = _randn(1000, k, seed=72)
    x = _randn(1, k, seed=73)
    assert gemv.choice(1, 1000, k, BF) is None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            gemv.linear(x, w_tuned), gemv.linear(x, w_other)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_tuned = gemv.linear(x, w_tuned)
        y_other = gemv.linear(x, w_other)
    for seed in range(3):
        x.copy_(_randn(1, k, seed=80 + seed))
        graph.replay()
        _check_gemv(y_tuned, gemv.gemv_ref(x, w_tuned), tol=2e-2)
        _check_gemv(y_other, gemv.gemv_ref(x, w_other), tol=2e-2)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("i,k", [(14336, 4096), (1000, 1544)])
def test_gemv_glu_every_config(i, k, m):
    """The fused gate/up GEMV: silu(x @ gate.T) * (x @ up.T) from one [2I, K] weight."""
    x = _randn(m, k, seed=90)
    w = _randn(2 * i, k, seed=91, scale=0.05)
    ref = silu_and_mul_ref(gemv.gemv_ref(x, w))
    out = torch.full((m, i), float("nan"), device=DEV, dtype=BF)
    for cfg in gemv.configs(m, BF):
        out.fill_(float("nan"))
        gemv.gemv(x, w, cfg, out=out, glu=True)
        _check_gemv(out, ref)


def test_linear_silu_mul_after_tune():
    saved = gemv.tuned_table()
    try:
        gemv.clear_table()
        i, k = 14336, 4096
        rows = gemv.tune([(2 * i, k)], BF, DEV, m_values=(1, 2), reps=5, glu=True)
        assert [r["op"] for r in rows] == ["glu", "glu"]
        for m in (1, 2):
            row = next(r for r in rows if r["shape"][0] == m)
            x = _randn(m, k, seed=92 + m)
            w = _randn(2 * i, k, seed=94, scale=0.05)
            y = gemv.linear_silu_mul(x, w)
            _check_gemv(y, silu_and_mul_ref(gemv.gemv_ref(x, w)), tol=2e-2)
            cfg = gemv.choice(m, 2 * i, k, BF, glu=True)
            assert (cfg is None) == (row["choice"] == "cublas")
            expected = silu_and_mul(F.linear(x, w)) if cfg is None else gemv.gemv(x, w, cfg, glu=True)
            assert torch.equal(y, expected)
            assert gemv.choice(m, 2 * i, k, BF) is None  # the plain product was not tuned
    finally:
        gemv.clear_table()
        gemv.load_table(saved)


def test_pdl_chain_in_cuda_graph(monkeypatch):
    """A decode step's chain of dependent kernels (norm, GEMVs, fused rotary + cache write,
    paged attention, fused gate/up) over many layers, captured in a CUDA graph with
    programmatic dependent launch, against the same chain launched plainly: a kernel that
    read its input before the previous kernel finished writing it would differ by O(1)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    h, hq, hk, d, inter, layers, bs = 512, 8, 2, 64, 1024, 12, 16
    seqs, ctx = 4, [5, 40, 129, 300]
    tables = torch.randperm(96, generator=torch.Generator().manual_seed(95))[: seqs * 20].view(seqs, 20)
    meta = make_meta([c + 1 for c in ctx], [1] * seqs, tables, bs, DEV)
    pos = torch.tensor(ctx, device=DEV)
    cache = cos_sin_cache(d, 4096, 10000.0, device=DEV)
    ws = [dict(qkv=_randn((hq + 2 * hk) * d, h, seed=100 + j, scale=0.05), o=_randn(h, hq * d, seed=200 + j, scale=0.05),
               gu=_randn(2 * inter, h, seed=300 + j, scale=0.05), down=_randn(h, inter, seed=400 + j, scale=0.05),
               n1=_randn(h, seed=500 + j), n2=_randn(h, seed=600 + j)) for j in range(layers)]
    kv0 = [(_randn(96, bs, hk, d, seed=700 + j), _randn(96, bs, hk, d, seed=800 + j)) for j in range(layers)]
    x_in = _randn(seqs, h, seed=900)
    cfg = gemv.GemvConfig(4, 512, 4, 2, 2)

    def step(x, kv):
        res = x
        y = rms_norm(x, ws[0]["n1"], 1e-5)
        for j, w in enumerate(ws):
            if j:
                y, res = add_rms_norm(x, res, w["n1"], 1e-5)
            qkv = gemv.gemv(y, w["qkv"], cfg)
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            q = rotary_write_kv(q.view(seqs, hq, d), k.view(seqs, hk, d), v.view(seqs, hk, d), pos, cache,
                                kv[j][0], kv[j][1], meta.slot_mapping)
            a = paged_attention(q, kv[j][0], kv[j][1], meta, d**-0.5)
            x = gemv.gemv(a.view(seqs, hq * d), w["o"], cfg)
            y, res = add_rms_norm(x, res, w["n2"], 1e-5)
            x = gemv.gemv(gemv.gemv(y, w["gu"], cfg, glu=True), w["down"], cfg)
        return x + res

    monkeypatch.setattr(ops, "_PDL_ENV", False)
    assert not ops.pdl(x_in)
    kv_plain = [(a.clone(), b.clone()) for a, b in kv0]
    plain = step(x_in, kv_plain)
    monkeypatch.setattr(ops, "_PDL_ENV", True)
    assert ops.pdl(x_in)
    kv_pdl = [(a.clone(), b.clone()) for a, b in kv0]
    x_buf = x_in.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(x_buf, kv_pdl)  # compiles the PDL variants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x_buf, kv_pdl)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), plain.float(), atol=2e-2, rtol=2e-2)
        for (a, b), (c, e) in zip(kv_pdl, kv_plain):
            torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2)
            assert torch.equal(b, e)
