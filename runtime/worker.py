"""One engine worker per rank, and the executor that drives them from rank 0.

Every rank holds its build-time partition (its own weights file), its KV cache and a model runner.
Rank 0 is also the coordinator: it runs the scheduler, broadcasts each step plan over the control
plane (msgpack bytes on a gloo group; nothing is pickled), runs its own part of the step, and
receives the sampled tokens from the rank that samples (last pipeline stage, tensor rank 0).
Activations move over the data plane: all-reduce inside tensor-parallel groups, send/recv
between pipeline stages (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import torch

from kiln.parallel.comm import ControlPlane, DistComm, init_distributed
from kiln.parallel.mapping import Mapping
from kiln.runtime.builder import read_engine_config
from kiln.runtime.kv_cache import KVCache, choose_num_blocks, memory_block_capacity
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.plan import StepPlan, StepResult


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def pack_masks(masks: dict[int, torch.Tensor] | None) -> list:
    if not masks:
        return []
    return [[sid, int(m.numel()), np.packbits(m.cpu().numpy()).tobytes()] for sid, m in masks.items()]


def unpack_masks(rows: list, device) -> dict[int, torch.Tensor] | None:
    if not rows:
        return None
    out = {}
    for sid, n, bits in rows:
        arr = np.unpackbits(np.frombuffer(bits, dtype=np.uint8))[:n].astype(bool)
        out[sid] = torch.from_numpy(arr).to(device)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One rank: joins the process group and loads only this rank's weights file."""

    def __init__(self, engine_dir: str, rank: int, world_size: int, master_addr: str | None, master_port: int | None,
                 device: str | None = None, local_rank: int | None = None, verify: bool = True, timeout_s: float = 600):
        from kiln.runtime.loader import EngineLoadError, load_rank, resolve_device, tune_for_device

        self.config = read_engine_config(engine_dir)
        b = self.config.build
        if world_size != b.world_size:
            raise EngineLoadError(
                f"engine was built for {b.world_size} ranks (tp={b.tp}, pp={b.pp}) but the launcher started {world_size}: "
                f"launch {b.world_size} ranks or rebuild with matching --tp/--pp"
            )
        dev = resolve_device(self.config, device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank if local_rank is not None else rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        self.device = dev
        self.mapping = Mapping(tp=b.tp, pp=b.pp, ep=b.ep, rank=rank)
        groups = init_distributed(self.mapping, master_addr, master_port, dev, timeout_s=timeout_s)
        self.comm = DistComm(self.mapping, groups)
        self.control = ControlPlane(groups.control, rank)
        self.model = load_rank(engine_dir, self.config, self.mapping, dev, comm=self.comm, verify=verify)
        tune_for_device(self.model, engine_dir)
        self.engine_dir = engine_dir
        self.runner: ModelRunner | None = None

    @property
    def sampling_rank(self) -> int:
        return (self.mapping.pp - 1) * self.mapping.tp

    def kv_capacity(self) -> int:
        from kiln.runtime.loader import kv_cache_dtype

        ls = self.model.ls
        b = self.config.build
        return memory_block_capacity(len(ls.layers), ls.num_kv_heads, ls.head_dim, b.tokens_per_block,
                                     kv_cache_dtype(self.config), self.device)

    def init_kv(self, num_blocks: int, max_num_tokens: int, max_batch_size: int, eos: list[int], seed: int | None) -> None:
        from kiln.runtime.loader import kv_cache_dtype

        ls = self.model.ls
        b = self.config.build
        kv = KVCache(len(ls.layers), num_blocks, b.tokens_per_block, ls.num_kv_heads, ls.head_dim,
                     kv_cache_dtype(self.config), self.device)
        self.runner = ModelRunner(self.model, kv, max_num_tokens, max_batch_size, eos_token_ids=eos, seed=seed)
        self.runner.tune_attention()
        from kiln.runtime.loader import save_tuning

        save_tuning(self.engine_dir, self.device)
        if self.device.type == "cuda" and not os.environ.get("KILN_EAGER"):
            self.runner.enable_cuda_graphs(b.max_seq_len)

    def handshake(self, num_kv_blocks: int | None, max_num_tokens: int, max_batch_size: int, eos: list[int], seed) -> int:
        """Collective: every rank reports its KV capacity; rank 0 picks the smallest and tells all."""
        cap = self.kv_capacity()
        if self.mapping.rank == 0:
            caps = [cap] + [unpack(self.control.recv(r)) for r in range(1, self.mapping.world_size)]
            b = self.config.build
            num = num_kv_blocks or choose_num_blocks(min(caps), b.tokens_per_block, max_batch_size, b.max_seq_len)
            msg = {"num_blocks": num, "max_num_tokens": max_num_tokens, "max_batch_size": max_batch_size, "eos": eos, "seed": seed}
            self.control.broadcast(pack(msg))
        else:
            self.control.send(pack(cap), 0)
            msg = unpack(self.control.broadcast(None))
        self.init_kv(msg["num_blocks"], msg["max_num_tokens"], msg["max_batch_size"], msg["eos"], msg["seed"])
        return msg["num_blocks"]

    def serve_forever(self) -> None:
        """Ranks other than 0: run every step rank 0 broadcasts until told to stop."""
        while True:
            msg = unpack(self.control.broadcast(None))
            if msg["op"] == "shutdown":
                break
            plan = StepPlan.from_wire(msg["plan"])
            res = self.runner.execute(plan, unpack_masks(msg["masks"], self.device))
            if self.runner.samples and self.mapping.rank != 0:
                self.control.send(pack(res.to_wire()), 0)
        self.close()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedExecutor:
    """Rank 0's side: broadcast the plan, run rank 0's part, collect the sampled tokens."""

    def __init__(self, worker: Worker, procs: list[subprocess.Popen] | None = None):
        self.worker = worker
        self.runner = worker.runner
        self.procs = procs or []
        self.closed = False
        import atexit

        atexit.register(self.shutdown)  # workers are told to stop even if the caller never does

    def execute(self, plan: StepPlan, allowed_masks=None) -> StepResult:
        w = self.worker
        w.control.broadcast(pack({"op": "step", "plan": plan.to_wire(), "masks": pack_masks(allowed_masks)}))
        res = w.runner.execute(plan, allowed_masks if w.runner.samples else None)
        if w.sampling_rank != 0:
            res = StepResult.from_wire(unpack(w.control.recv(w.sampling_rank)))
        return res

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.worker.control.broadcast(pack({"op": "shutdown"}))
        finally:
            self.worker.close()
            deadline = time.time() + timeout
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()


def spawn_local_workers(engine_dir: str, world_size: int, port: int, device: str | None) -> list[subprocess.Popen]:
    """Starts ranks 1..world_size-1 as processes on this machine (rank 0 is the caller)."""
    procs = []
    for r in range(1, world_size):
        cmd = [sys.executable, "-m", "kiln.launch.worker", engine_dir, "--rank", str(r), "--world-size", str(world_size),
               "--master-port", str(port)]
        if device:
            cmd += ["--device", device]
        procs.append(subprocess.Popen(cmd, env=dict(os.environ)))
    return procs
