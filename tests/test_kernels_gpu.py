"""The Triton kernels against their plain-torch references on a CUDA device.

Each op runs on fresh random inputs at model-sized shapes; paged attention covers decode-only
batches with contexts from 1 to ~4,000 tokens over shuffled block tables, mixed batches of
prefill chunks continuing from cached context plus decodes, GQA / MQA / MHA, sliding windows,
and a CUDA-graph capture of the decode path replayed with different lengths and tables.
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

from kiln.kernels import triton_ops as ops  # noqa: E402
from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kiln.kernels.attention import paged_attention, paged_attention_ref, write_kv_ref  # noqa: E402
from kiln.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from kiln.kernels.rotary import apply_rotary, apply_rotary_ref, cos_sin_cache  # noqa: E402

from kernel_cases import fused_qkv_views, make_meta, make_paged_case  # noqa: E402

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
@pytest.mark.parametrize("t,hq,hk,d", [(1, 32, 8, 128), (200, 32, 8, 128), (33, 14, 2, 64), (5, 4, 1, 32)])
def test_apply_rotary(t, hq, hk, d, dtype):
    q, k, _ = fused_qkv_views(t, hq, hk, d, dtype, DEV, seed=12)
    cache = cos_sin_cache(d, 8192, 500000.0, device=DEV)
    pos = torch.randint(0, 8192, (t,), generator=torch.Generator().manual_seed(13)).to(DEV)
    q_in, k_in = q.clone(), k.clone()
    qo, ko = ops.apply_rotary(q, k, pos, cache)
    q_ref, k_ref = apply_rotary_ref(q_in, k_in, pos, cache)
    _close(qo, q_ref, 2e-2)
    _close(ko, k_ref, 2e-2)
    qo2, ko2 = apply_rotary(q_in, k_in, pos, cache)
    assert torch.equal(qo2, qo) and torch.equal(ko2, ko)


@pytest.mark.parametrize("dtype", [BF, FP16])
@pytest.mark.parametrize("hk,d,bs", [(8, 128, 16), (8, 128, 32), (1, 64, 16), (2, 32, 32)])
def test_write_kv_with_padding(hk, d, bs, dtype):
    t, nb = 300, 64
    _, k, v = fused_qkv_views(t, 4 * hk, hk, d, dtype, DEV, seed=14)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(15))[:t].to(DEV)
    slots[::7] = -1
    kc, vc = _randn(nb, bs, hk, d, dtype=dtype, seed=16), _randn(nb, bs, hk, d, dtype=dtype, seed=17)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ops.write_kv(k, v, kc, vc, slots)
    write_kv_ref(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------

HEADS = [(32, 8, 128), (8, 1, 64), (16, 16, 64), (4, 2, 32)]


def _run(case, **kw):
    out = ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale, **kw)
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
    b = ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)
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
