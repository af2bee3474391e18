"""The MoE layer's GPU paths (grouped GEMMs, the dense path under capture, the fused kernels of
kiln.kernels.moe_triton, the expert-parallel sorting) against the reference loop over experts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

from test_kernels_gpu import _close, _randn  # noqa: E402


# ----------------------------------------------------------------------------------------------
# MoE experts: grouped GEMMs (torch._grouped_mm) against the loop over experts
# ----------------------------------------------------------------------------------------------


def _moe_weights(e, h, i, seed):
    """Expert weights scaled so each layer's outputs stay near unit size."""
    return _randn(e, 2 * i, h, seed=seed, scale=h**-0.5), _randn(e, h, i, seed=seed + 1, scale=i**-0.5)


def _check_moe(out, ref):
    """Both sides round the intermediate activations to bfloat16 and accumulate in float32; they
    differ by the GEMMs' summation order, a unit or two in bfloat16's last place."""
    _close(out, ref, 3e-2, 3e-2)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize(
    "h,i,counts",
    [
        (2048, 768, [3, 0, 17, 1, 0, 0, 40, 2]),  # qwen3-30b-a3b-sized experts; empty groups
        (4096, 1792, [1, 1, 1, 1]),               # decode-sized groups
        (1024, 512, [300, 0, 0, 213]),            # prefill-sized groups around empty ones
        (512, 256, [0, 0, 0, 9]),                 # only the last expert has rows
    ],
)
def test_expert_mlp_grouped_matches_loop(h, i, counts):
    from kiln.kernels.moe import expert_mlp, expert_mlp_grouped, expert_mlp_ref, grouped_mm_usable

    w13, w2 = _moe_weights(len(counts), h, i, seed=40)
    x = _randn(sum(counts), h, seed=42)
    c = torch.tensor(counts)
    assert grouped_mm_usable(x, w13, w2)
    ref = expert_mlp_ref(x, c, w13, w2)
    _check_moe(expert_mlp_grouped(x, c, w13, w2), ref)
    _check_moe(expert_mlp(x, c, w13, w2), ref)


@pytest.mark.parametrize(
    "t,e,k,h,i,first,local",
    [
        (1, 128, 8, 2048, 768, 0, 128),     # qwen3-30b-a3b decode, all experts local
        (77, 8, 2, 4096, 1792, 0, 8),       # mixtral-like prefill chunk (intermediate cut 8 ways)
        (513, 64, 6, 1024, 256, 16, 16),    # a rank holding experts 16..31 of 64
        (33, 8, 2, 512, 128, 6, 2),         # the last rank's two experts of eight
    ],
)
def test_moe_forward_grouped_matches_ref(t, e, k, h, i, first, local):
    from kiln.kernels.moe import moe_forward, moe_forward_grouped, moe_forward_ref

    w13, w2 = _moe_weights(local, h, i, seed=50)
    x = _randn(t, h, seed=52)
    logits = _randn(t, e, seed=53, scale=2.0)
    ref = moe_forward_ref(x, logits, w13, w2, k, True, first)
    _check_moe(moe_forward_grouped(x, logits, w13, w2, k, True, first), ref)
    _check_moe(moe_forward(x, logits, w13, w2, k, False, first), moe_forward_ref(x, logits, w13, w2, k, False, first))


def _captured(fn, warmups: int = 2):
    """``fn()`` run ``warmups`` times on a side stream, then captured: (the graph, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_moe_forward_grouped_cuda_graph_replay():
    """The grouped path reads nothing on the host, so a decode step captures and replays with new
    tokens and new routings."""
    from kiln.kernels.moe import moe_forward, moe_forward_ref

    t, e, k, h, i = 16, 32, 4, 1024, 384
    w13, w2 = _moe_weights(e, h, i, seed=60)
    x = _randn(t, h, seed=61)
    logits = _randn(t, e, seed=62, scale=2.0)
    graph, out = _captured(lambda: moe_forward(x, logits, w13, w2, k, True))
    for step in range(3):
        x.copy_(_randn(t, h, seed=70 + step))
        logits.copy_(_randn(t, e, seed=80 + step, scale=2.0))
        graph.replay()
        _check_moe(out, moe_forward_ref(x, logits, w13, w2, k, True))


def test_moe_forward_float32_cuda_graph_replay():
    """Without grouped GEMMs (float32 weights) a captured MoE layer takes the dense path, which
    reads nothing on the host: it captures, and replays new routings as the reference computes them."""
    from kiln.kernels.moe import moe_forward, moe_forward_ref

    t, e, k, h, i = 8, 8, 2, 256, 128
    w13, w2 = (w.float() for w in _moe_weights(e, h, i, seed=90))
    x = _randn(t, h, seed=91, dtype=torch.float32)
    logits = _randn(t, e, seed=92, scale=2.0, dtype=torch.float32)
    graph, out = _captured(lambda: moe_forward(x, logits, w13, w2, k, True))
    for step in range(3):
        x.copy_(_randn(t, h, seed=95 + step, dtype=torch.float32))
        logits.copy_(_randn(t, e, seed=99 + step, scale=2.0, dtype=torch.float32))
        graph.replay()
        torch.testing.assert_close(out, moe_forward_ref(x, logits, w13, w2, k, True), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_fused_path_captured_and_replayed(dtype, monkeypatch):
    """The fused MoE kernels (``KILN_MOE_FUSED=1``) in a CUDA graph: new inputs and routings on
    each replay, an expert-parallel rank's share of experts among them."""
    from kiln.kernels.moe import moe_forward, moe_forward_ref

    monkeypatch.setenv("KILN_MOE_FUSED", "1")
    t, e, k, h, i = 4, 8, 2, 512, 256
    w13, w2 = (w.to(dtype) for w in _moe_weights(e, h, i, seed=93))
    for first, local in ((0, e), (4, 4)):
        lw13, lw2 = w13[first : first + local].contiguous(), w2[first : first + local].contiguous()
        x = _randn(t, h, seed=94, dtype=dtype)
        logits = _randn(t, e, seed=95, scale=2.0, dtype=torch.float32)
        graph, out = _captured(lambda: moe_forward(x, logits, lw13, lw2, k, True, first))
        for step in range(3):
            x.copy_(_randn(t, h, seed=96 + step, dtype=dtype))
            logits.copy_(_randn(t, e, seed=99 + step, scale=2.0, dtype=torch.float32))
            graph.replay()
            ref = moe_forward_ref(x, logits, lw13, lw2, k, True, first)
            if dtype == torch.float32:
                torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            else:
                _check_moe(out, ref)


def test_expert_parallel_path_on_one_rank():
    """The all-to-all MoE path's sorting, counts and regrouping on CUDA tensors (a one-rank comm:
    the collectives are the identity), with the grouped GEMMs inside."""
    from kiln.kernels.moe import moe_forward_ref, route
    from kiln.parallel.expert_parallel import ep_moe_forward
    from kiln.runtime.model import LocalComm

    t, e, k, h, i = 45, 16, 4, 1024, 256
    w13, w2 = _moe_weights(e, h, i, seed=90)
    x = _randn(t, h, seed=91)
    logits = _randn(t, e, seed=92, scale=2.0)
    weights, ids = route(logits, k, True)
    _check_moe(ep_moe_forward(x, weights, ids, w13, w2, LocalComm()), moe_forward_ref(x, logits, w13, w2, k, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_static_expert_parallel_path_captured(dtype):
    """The fixed-capacity all-to-all path (what a captured EP decode step runs) captured in a CUDA
    graph on one rank and replayed on new tokens: its placing, expert ids and grouped or dense
    experts against the reference loop."""
    from kiln.kernels.moe import grouped_mm_usable, moe_forward_ref, route
    from kiln.parallel.expert_parallel import ep_moe_forward_static
    from kiln.runtime.model import LocalComm

    t, e, k, h, i = 24, 8, 2, 512, 256
    w13, w2 = _moe_weights(e, h, i, seed=110)
    w13, w2 = w13.to(dtype), w2.to(dtype)
    x = _randn(t, h, seed=111, dtype=dtype)
    logits = _randn(t, e, seed=112, scale=2.0, dtype=torch.float32)

    def layer():
        weights, ids = route(logits, k, True)
        return ep_moe_forward_static(x, weights, ids, w13, w2, LocalComm(), grouped=grouped_mm_usable(x, w13, w2))

    graph, out = _captured(layer)
    for step in range(3):
        x.copy_(_randn(t, h, seed=113 + step, dtype=dtype))
        logits.copy_(_randn(t, e, seed=116 + step, scale=2.0, dtype=torch.float32))
        graph.replay()
        ref = moe_forward_ref(x, logits, w13, w2, k, True)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        else:
            _check_moe(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,e,k,h,i,first,local", [(1, 8, 2, 4096, 14336, 0, 8), (2, 128, 8, 2048, 768, 0, 128),
                                                    (3, 16, 4, 1024, 256, 8, 8)])
def test_gemv_path_captured(t, e, k, h, i, first, local, dtype):
    """The MoE GEMV kernels (mixtral- and qwen3-moe-sized experts, and an expert-parallel rank's
    share) captured in a CUDA graph and replayed on new tokens, against the reference loop."""
    from kiln.kernels.moe import moe_forward_ref
    from kiln.kernels.moe_triton import moe_forward_gemv

    w13, w2 = _moe_weights(local, h, i, seed=120)
    w13, w2 = w13.to(dtype), w2.to(dtype)
    x = _randn(t, h, seed=121, dtype=dtype)
    logits = _randn(t, e, seed=122, scale=2.0, dtype=torch.float32)
    graph, out = _captured(lambda: moe_forward_gemv(x, logits, w13, w2, k, True, first))
    for step in range(3):
        x.copy_(_randn(t, h, seed=123 + step, dtype=dtype))
        logits.copy_(_randn(t, e, seed=126 + step, scale=2.0, dtype=torch.float32))
        graph.replay()
        ref = moe_forward_ref(x, logits, w13, w2, k, True, first)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        else:
            _check_moe(out, ref)
