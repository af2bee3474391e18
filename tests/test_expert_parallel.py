"""Expert-parallel dispatch and combine by all-to-all, against single-process references: gloo
ranks with known routings (empty token ranges, ranks that receive nothing, a skewed expert), the
moe_tp all-reduce inside it, the collective timers, the fixed-capacity variant that CUDA graphs
capture (with every host read refused while it runs), and the grouped-GEMM expert path on the CPU
where torch provides one."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels.activation import silu_and_mul
from kiln.kernels.moe import (
    expert_mlp,
    expert_mlp_grouped,
    expert_mlp_ref,
    expert_rows,
    moe_forward_dense,
    moe_forward_grouped,
    moe_forward_ref,
)
from kiln.parallel.expert_parallel import ep_moe_forward, ep_moe_forward_static, token_range
from kiln.runtime.model import LocalComm

H, I, E, K = 16, 12, 4, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return w13, w2


def _routings() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (x [T, H], weights [T, K], ids [T, K]); the ids are chosen, not learned."""
    g = torch.Generator().manual_seed(1)
    cases = {}

    def add(name, ids):
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1, K)
        t = ids.shape[0]
        w = torch.rand(t, K, generator=g) + 0.1
        cases[name] = (torch.randn(t, H, generator=g), w / w.sum(-1, keepdim=True), ids)

    add("mixed-odd", [[(t * 3) % E, (t * 3 + 1 + t % 2) % E] for t in range(7)])  # 7 tokens: a short tail range
    add("one-token", [[3, 1]])  # the second EP rank dispatches nothing
    add("first-experts-only", [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])  # EP rank 1 receives nothing
    add("skewed", [[2, e] for e in (0, 1, 3, 0, 3, 1, 0, 3, 1, 0, 1)])
    add("no-tokens", [])
    return cases


def _reference(x, w, ids, w13, w2):
    """Each token: the routing-weighted sum of its experts' MLPs, one token at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += w[t, j] * F.linear(silu_and_mul(F.linear(x[t : t + 1], w13[e])), w2[e])[0]
    return out


def _rank_weights(w13, w2, ep: int, moe_tp: int, ep_rank: int, moe_tp_rank: int):
    """This rank's experts and its moe_tp slice of each: gate and up rows, down columns."""
    n, sl = E // ep, I // moe_tp
    experts = slice(ep_rank * n, (ep_rank + 1) * n)
    rows = slice(moe_tp_rank * sl, (moe_tp_rank + 1) * sl)
    gate, up = w13[experts, :I], w13[experts, I:]
    return torch.cat([gate[:, rows], up[:, rows]], dim=1).contiguous(), w2[experts, :, rows].contiguous()


class _no_host_reads:
    """Refuses the tensor-to-host reads that a captured CUDA graph cannot make (``item``,
    ``tolist``, ``cpu``, truth values and ``int()``) while the block runs."""

    NAMES = ("item", "tolist", "cpu", "__bool__", "__int__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(name):
            def f(*a, **k):
                raise AssertionError(f"host read: Tensor.{name}")
            return f

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def _worker(rank: int, tp: int, ep: int, port: int, out_dir: str) -> None:
    try:
        os.environ["KILN_TIME_COLLECTIVES"] = "1"
        torch.set_num_threads(1)
        from kiln.parallel.comm import DistComm, init_distributed
        from kiln.parallel.mapping import Mapping

        m = Mapping(tp=tp, ep=ep, rank=rank)
        comm = DistComm(m, init_distributed(m, "127.0.0.1", port, torch.device("cpu"), timeout_s=60))
        w13, w2 = _weights()
        lw13, lw2 = _rank_weights(w13, w2, ep, m.moe_tp, m.moe_ep_rank, m.moe_tp_rank)
        errors = {}
        for name, (x, w, ids) in _routings().items():
            ref = _reference(x, w, ids, w13, w2)
            got = ep_moe_forward(x, w, ids, lw13, lw2, comm)
            with _no_host_reads():
                static = ep_moe_forward_static(x, w, ids, lw13, lw2, comm)
            for path, out in (("", got), ("static ", static)):
                errors[path + name] = (out - ref).abs().max().item() if x.shape[0] else 0.0
                assert out.shape == x.shape
        torch.save({"errors": errors, "timings": comm.timings()}, os.path.join(out_dir, f"{rank}.pt"))
        import torch.distributed as dist

        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_ranks(tp: int, ep: int, tmp_path) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, tp, ep, port, str(tmp_path))) for r in range(tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errs = [(tmp_path / f"{r}.err") for r in range(tp)]
    msgs = [e.read_text() for e in errs if e.exists()]
    assert not msgs, msgs[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"{r}.pt") for r in range(tp)]


@pytest.mark.parametrize("tp, ep", [(2, 2), (4, 2), (4, 4)])
def test_dispatch_combine_matches_reference(tp, ep, tmp_path):
    """tp=2 ep=2 and tp=4 ep=4: EP ranks with whole experts. tp=4 ep=2: two EP groups of two, each expert's
    intermediate split over a moe_tp pair whose partial sums the moe_tp all-reduce adds."""
    t0 = time.perf_counter()
    results = _run_ranks(tp, ep, tmp_path)
    for r, res in enumerate(results):
        for name, err in res["errors"].items():
            assert err <= 1e-5, (r, name, err)
        assert res["timings"]["alltoall_s"] > 0 and res["timings"]["allgather_s"] > 0
        if tp // ep > 1:
            assert res["timings"]["allreduce_s"] > 0
    a2a = max(res["timings"]["alltoall_s"] for res in results)
    print(f"tp={tp} ep={ep}: {time.perf_counter() - t0:.2f} s, all-to-all {a2a * 1e3:.2f} ms")


def test_one_rank_comm_matches_reference():
    w13, w2 = _weights()
    for name, (x, w, ids) in _routings().items():
        got = ep_moe_forward(x, w, ids, w13, w2, LocalComm())
        torch.testing.assert_close(got, _reference(x, w, ids, w13, w2), atol=1e-5, rtol=1e-5, msg=name)


def test_token_ranges_cover_tokens_once():
    for t in range(0, 20):
        for ep in (1, 2, 3, 4, 8):
            ranges = [token_range(t, ep, r) for r in range(ep)]
            covered = [i for a, b, _ in ranges for i in range(a, b)]
            assert covered == list(range(t))
            assert all(b - a <= c for a, b, c in ranges)


def _grouped_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.zeros(2, 8), torch.zeros(1, 8, 8), offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _local_case(first_expert: int, local: int, tokens: int, seed: int):
    """(generator, this rank's w13 and w2 of ``local`` experts from ``first_expert``, x, router logits)."""
    g = torch.Generator().manual_seed(seed)
    w13, w2 = _weights()
    w13, w2 = w13[first_expert : first_expert + local], w2[first_expert : first_expert + local]
    return g, w13, w2, torch.randn(tokens, H, generator=g), torch.randn(tokens, E, generator=g)


@pytest.mark.skipif(not _grouped_on_cpu(), reason="torch._grouped_mm does not run on this CPU build")
@pytest.mark.parametrize("first_expert, local", [(0, 4), (2, 2), (1, 2)])
def test_grouped_path_logic_on_cpu(first_expert, local):
    """The grouped path's sorting, offsets and dropping of other ranks' rows, checked in float32
    on the CPU (the bf16 CUDA kernels are compared in test_kernels_gpu.py)."""
    g, w13, w2, x, logits = _local_case(first_expert, local, 23, seed=2)
    got = moe_forward_grouped(x, logits, w13, w2, K, True, first_expert)
    torch.testing.assert_close(got, moe_forward_ref(x, logits, w13, w2, K, True, first_expert), atol=1e-5, rtol=1e-5)
    counts = torch.tensor([5, 0, 7, 3][:local])
    rows = torch.randn(int(counts.sum()), H, generator=g)
    torch.testing.assert_close(expert_mlp_grouped(rows, counts, w13, w2), expert_mlp_ref(rows, counts, w13, w2),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expert_mlp(rows, counts, w13, w2), expert_mlp_ref(rows, counts, w13, w2))


@pytest.mark.parametrize("first_expert, local", [(0, 4), (2, 2), (1, 2)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_dense_path_equals_the_reference(first_expert, local, renormalize):
    """The path taken while a CUDA graph is captured without grouped GEMMs (float32 engines):
    every local expert on every row, weighted by its routing weight, equals the routed loop."""
    _, w13, w2, x, logits = _local_case(first_expert, local, 19, seed=3)
    got = moe_forward_dense(x, logits, w13, w2, K, renormalize, first_expert)
    torch.testing.assert_close(got, moe_forward_ref(x, logits, w13, w2, K, renormalize, first_expert), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grouped", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _grouped_on_cpu(), reason="torch._grouped_mm does not run on this CPU build"))])
def test_expert_rows_equals_the_loop(grouped):
    """Rows with local expert ids (some outside this rank's range, as the static EP buffers' unused
    places are) through ``expert_rows``: each row equals its expert's MLP alone, others are zeros."""
    g, w13, w2, x, _ = _local_case(0, E, 13, seed=4)
    local = torch.tensor([3, -1, 0, 2, 2, 4, 1, 0, -1, 3, 1, 2, 0])
    with _no_host_reads():
        got = expert_rows(x, local, w13, w2, grouped=grouped)
    for r, e in enumerate(local.tolist()):
        want = F.linear(silu_and_mul(F.linear(x[r : r + 1], w13[e])), w2[e])[0] if 0 <= e < E else torch.zeros(H)
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)
