"""Collectives over torch.distributed: NCCL between GPUs, gloo between CPU processes.

``init_distributed`` joins the world and creates every tensor-parallel and pipeline group (group
creation is collective: all ranks create all groups in the same order), the expert-parallel and
moe_tp groups of MoE layers built with ``ep > 1``, plus a gloo group for the control plane.
``DistComm`` is what the model's parallel layers call.

``KILN_TIME_COLLECTIVES=1`` makes ``DistComm`` synchronise around each collective and add its
wall time to ``allreduce_s``, ``alltoall_s`` or ``allgather_s`` (``timings()`` returns all three),
so a caller can work out each collective's share of a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kiln.parallel.mapping import Mapping


@dataclass
class Groups:
    tp: object
    pp: object
    control: object  # gloo, whole world: step plans and results as bytes
    ep: object = None  # this rank's expert-parallel group (ep > 1 only; the tp group when ep == tp)
    moe_tp: object = None  # this rank's moe_tp group (ep > 1 only; None when moe_tp == 1)


def init_distributed(mapping: Mapping, master_addr: str | None, master_port: int | None, device: torch.device,
                     timeout_s: float = 600) -> Groups:
    """``master_port=None`` joins through the environment (torchrun's store); otherwise through
    a TCP store that rank 0 opens at ``master_addr:master_port``. Every group (tp, pp, ep,
    control) gets ``timeout_s``: torch's subgroups would otherwise keep its 10- or 30-minute default."""
    import datetime

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://" if master_port is None else f"tcp://{master_addr}:{master_port}",
            rank=mapping.rank,
            world_size=mapping.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    tp_group = pp_group = None
    for s in range(mapping.pp):
        ranks = mapping.for_rank(s * mapping.tp).tp_group_ranks()
        g = dist.new_group(ranks, timeout=timeout)
        if mapping.rank in ranks:
            tp_group = g
    for t in range(mapping.tp):
        ranks = mapping.for_rank(t).pp_group_ranks()
        g = dist.new_group(ranks, timeout=timeout)
        if mapping.rank in ranks:
            pp_group = g
    ep_group = moe_tp_group = None
    if mapping.ep > 1 and mapping.moe_tp == 1:
        ep_group = tp_group
    elif mapping.ep > 1:
        for s in range(mapping.pp):
            for j in range(mapping.moe_tp):
                ranks = mapping.for_rank(s * mapping.tp + j).ep_group_ranks()
                g = dist.new_group(ranks, timeout=timeout)
                if mapping.rank in ranks:
                    ep_group = g
        for s in range(mapping.pp):
            for e in range(mapping.ep):
                ranks = mapping.for_rank(s * mapping.tp + e * mapping.moe_tp).moe_tp_group_ranks()
                g = dist.new_group(ranks, timeout=timeout)
                if mapping.rank in ranks:
                    moe_tp_group = g
    control = dist.new_group(list(range(mapping.world_size)), backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return Groups(tp_group, pp_group, control, ep_group, moe_tp_group)


class DistComm:
    """Tensor-parallel collectives, the expert-parallel collectives of MoE layers, and pipeline
    point-to-point transfers of one rank."""

    def __init__(self, mapping: Mapping, groups: Groups):
        self.mapping = mapping
        self.groups = groups
        self.world_size = mapping.tp
        self.ep_size = mapping.ep
        self.ep_rank = mapping.moe_ep_rank
        # Wall time spent in each kind of collective (set KILN_TIME_COLLECTIVES=1 to measure).
        self.allreduce_s = 0.0
        self.alltoall_s = 0.0
        self.allgather_s = 0.0
        self._time = bool(os.environ.get("KILN_TIME_COLLECTIVES"))

    def timings(self) -> dict[str, float]:
        return {"allreduce_s": self.allreduce_s, "alltoall_s": self.alltoall_s, "allgather_s": self.allgather_s}

    def _timed(self, counter: str, x: torch.Tensor, fn) -> None:
        """Runs ``fn()``; when timing, synchronises around it and adds the wall time to ``counter``."""
        if not self._time:
            fn()
            return
        import time

        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if x.is_cuda:
            torch.cuda.synchronize()
        setattr(self, counter, getattr(self, counter) + time.perf_counter() - t)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.mapping.tp == 1:
            return x
        self._timed("allreduce_s", x, lambda: dist.all_reduce(x, group=self.groups.tp))
        return x

    def all_to_all(self, x: torch.Tensor, output_split_sizes: list[int] | None = None,
                   input_split_sizes: list[int] | None = None) -> torch.Tensor:
        """All-to-all over the expert-parallel group on the rows of ``x``: rows
        ``input_split_sizes[j]`` (in order) go to EP rank j, and the result holds the rows from
        each EP rank in EP-rank order, ``output_split_sizes[j]`` of them from rank j. Without
        split sizes, ``x``'s rows split evenly and the result has ``x``'s shape."""
        if self.ep_size == 1:
            return x
        rows = x.shape[0] if output_split_sizes is None else sum(output_split_sizes)
        out = x.new_empty((rows, *x.shape[1:]))
        x = x.contiguous()
        self._timed("alltoall_s", x, lambda: dist.all_to_all_single(
            out, x, output_split_sizes, input_split_sizes, group=self.groups.ep))
        return out

    def ep_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates each EP rank's ``x`` (equal shapes) along the first dimension, in EP-rank order."""
        if self.ep_size == 1:
            return x
        x = x.contiguous()
        out = x.new_empty((self.ep_size * x.shape[0], *x.shape[1:]))
        if x.is_cuda:
            self._timed("allgather_s", x, lambda: dist.all_gather_into_tensor(out, x, group=self.groups.ep))
        else:
            self._timed("allgather_s", x, lambda: dist.all_gather(list(out.split(x.shape[0])), x, group=self.groups.ep))
        return out

    def moe_tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks that hold the other moe_tp slices of this rank's experts."""
        if self.mapping.moe_tp == 1:
            return x
        group = self.groups.moe_tp if self.ep_size > 1 else self.groups.tp
        self._timed("allreduce_s", x, lambda: dist.all_reduce(x, group=group))
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates each tensor-parallel rank's ``x`` along the last dimension, in rank order."""
        if self.mapping.tp == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.mapping.tp)]
        dist.all_gather(parts, x.contiguous(), group=self.groups.tp)
        return torch.cat(parts, dim=-1)

    def _peer(self, stage: int) -> int:
        return stage * self.mapping.tp + self.mapping.tp_rank

    def send_hidden(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        dst = self._peer(self.mapping.pp_rank + 1)
        dist.send(hidden.contiguous(), dst)
        dist.send(residual.contiguous(), dst)

    def isend_hidden(self, hidden: torch.Tensor, residual: torch.Tensor) -> list:
        """Non-blocking send to the next stage; wait on the returned handles before reusing the tensors."""
        dst = self._peer(self.mapping.pp_rank + 1)
        return [dist.isend(hidden.contiguous(), dst), dist.isend(residual.contiguous(), dst)]

    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._peer(self.mapping.pp_rank - 1)
        h = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        r = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(h, src)
        dist.recv(r, src)
        return h, r


class ControlPlane:
    """Rank 0 (the coordinator) broadcasts bytes to every rank; any rank can send bytes to rank 0.
    Only msgpack bytes cross: nothing is pickled."""

    def __init__(self, group, rank: int):
        self.group = group
        self.rank = rank

    def broadcast(self, data: bytes | None) -> bytes:
        n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.group)
        if int(n) == 0:
            return b""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(n), dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return data if self.rank == 0 else bytes(buf.numpy())

    def send(self, data: bytes, dst: int) -> None:
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, group=self.group)

    def recv(self, src: int) -> bytes:
        n = torch.empty(1, dtype=torch.int64)
        dist.recv(n, src, group=self.group)
        buf = torch.empty(int(n), dtype=torch.uint8)
        dist.recv(buf, src, group=self.group)
        return bytes(buf.numpy())
