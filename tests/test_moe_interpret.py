"""The fused MoE path of decode-sized batches (kiln.kernels.moe_triton) against the reference loop
over experts, on the CPU under Triton's interpreter (in a child process with TRITON_INTERPRET=1,
as tests/test_kernels_interpret.py), and the row alignment it runs on (plain torch, in-process)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")

from kiln.kernels.moe import moe_forward_ref, route  # noqa: E402
from kiln.kernels.moe_triton import align, moe_forward_fused  # noqa: E402

if INTERPRET:
    from test_kernels_interpret import _patch_interpreter

    _patch_interpreter()


@pytest.mark.skipif(INTERPRET, reason="already in the interpreter process")
def test_interpreter_suite():
    from test_kernels_interpret import run_in_interpreter

    run_in_interpreter(__file__)


E, H, I, K = 8, 48, 40, 2


def _weights(dtype, seed, num_local=E):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_local, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(num_local, H, I, generator=g) / I**0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("t,first_expert,num_local,block_m", [(1, 0, 8, 16), (5, 0, 8, 4), (7, 2, 4, 4), (33, 4, 4, 16)])
def test_align_places_every_local_row_once(t, first_expert, num_local, block_m):
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    rows, bexp = align(ids, num_local, first_expert, block_m)
    r = t * K
    assert rows.numel() % block_m == 0 and bexp.numel() == rows.numel() // block_m
    assert rows.numel() >= r + num_local * (block_m - 1)  # room for the worst padding
    flat = ids.reshape(-1) - first_expert
    local = [i for i in range(r) if 0 <= flat[i] < num_local]
    placed = [int(x) for x in rows if x < r]
    assert sorted(placed) == local  # every local row once, no other row
    for b, e in enumerate(bexp.tolist()):
        block = [int(x) for x in rows[b * block_m : (b + 1) * block_m] if x < r]
        if e < 0:
            assert not block
        else:
            assert block and all(int(flat[i]) == e for i in block)  # a block holds one expert's rows
    used = [e for e in bexp.tolist() if e >= 0]
    assert used == sorted(used) and set(used) == {int(flat[i]) for i in local}


@in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,first_expert,num_local", [(1, 0, E), (3, 0, E), (6, 2, 4), (20, 4, 4)])
def test_fused_equals_the_reference(t, first_expert, num_local, dtype):
    """Decode sizes (one token, a few, more rows than a block), all experts local or an
    expert-parallel rank's share (rows routed elsewhere contribute nothing), renormalized top-k."""
    g = torch.Generator().manual_seed(10 + t)
    x = torch.randn(t, H, generator=g).to(dtype)
    logits = torch.randn(t, E, generator=g)
    w13, w2 = _weights(dtype, 11 + t, num_local)
    for renormalize in (True, False):
        got = moe_forward_fused(x, logits, w13, w2, K, renormalize, first_expert)
        ref = moe_forward_ref(x, logits, w13, w2, K, renormalize, first_expert)
        assert got.dtype == dtype and got.shape == ref.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        else:  # the slot sum in float32 against the reference's bfloat16 index_add, truncating casts
            torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)


@in_child
def test_fused_rows_of_other_ranks_stay_zero():
    """A token whose experts all live on other ranks gets zeros."""
    x = torch.randn(2, H)
    logits = torch.full((2, E), -10.0)
    logits[0, 6], logits[0, 7] = 5.0, 4.0  # token 0: experts 6 and 7, outside [0, 4)
    logits[1, 1], logits[1, 6] = 5.0, 4.0  # token 1: expert 1 here, 6 elsewhere
    w13, w2 = _weights(torch.float32, 3, 4)
    got = moe_forward_fused(x, logits, w13, w2, K, True, 0)
    assert torch.equal(got[0], torch.zeros(H))
    torch.testing.assert_close(got, moe_forward_ref(x, logits, w13, w2, K, True, 0), atol=1e-5, rtol=1e-5)
    w, ids = route(logits, K, True)
    assert ids[0].tolist() == [6, 7]
