"""Tensor parallelism on one machine: decode step time of an engine at tp=1 and tp>1, at several
batch sizes, and the all-reduce share of a step.

Each tp gets a random-weight engine of the model (built once into --engines). The engine runs
through ``LLMEngine`` with the local launcher (one process per rank): B requests with 128-token
prompts are prefilled, then decode steps are timed. The all-reduce share is measured apart: one
process per rank replays the step's collectives alone (two all-reduces of [B, hidden] per layer,
captured in a CUDA graph on GPUs) on the same GPUs, and their time is divided by the step's.

    python benchmarks/bench_tp.py --model llama-3-8b --tp 1,2 --batches 1,64 --weights-at-load
    python benchmarks/bench_tp.py --model tiny-llama --tp 1,2 --batches 1,4 --device cpu   # a check on CPUs
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import build_random_engine, write_record  # noqa: E402


def step_ms(engine, batch: int, steps: int, prompt_len: int = 128) -> float:
    """Mean wall time of a decode step with ``batch`` running sequences."""
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(batch)
    sp = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [rng.randrange(1000, 30000) for _ in range(prompt_len)], sp)
    started: set[str] = set()
    while len(started) < batch:  # every prompt prefilled: each request has its first token
        started.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
    for _ in range(4):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - t) / steps * 1000
    for i in range(batch):
        engine.abort_request(f"b{batch}-{i}")
    while engine.has_unfinished():
        engine.step()
    return ms


def _allreduce_worker(rank: int, world: int, port: int, hidden: int, layers: int, batches: list[int], device: str, q) -> None:
    import datetime

    import torch.distributed as dist

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank) if cuda else None)
    out = {}
    for b in batches:
        x = torch.randn(b, hidden, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
        n = 2 * layers

        def run():
            for _ in range(n):
                dist.all_reduce(x)

        if cuda:
            from kiln.kernels.gemv import _time_calls  # graph capture, timed replays

            out[b] = _time_calls([run], 20) / 1000
        else:
            run()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(5):
                run()
            out[b] = (time.perf_counter() - t) / 5 * 1000
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def allreduce_ms(tp: int, hidden: int, layers: int, batches: list[int], device: str) -> dict[int, float]:
    """Milliseconds of one step's all-reduces alone, per batch size, on ``tp`` ranks."""
    import torch.multiprocessing as mp

    from kiln.runtime.worker import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, tp, port, hidden, layers, batches, device, q)) for r in range(tp)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join(60)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engines", default="/tmp/kiln-engines")
    ap.add_argument("--weights-at-load", action="store_true",
                    help="build without weight files; each rank draws its weights at load (no minute-long writes)")
    a = ap.parse_args()
    from kiln.runtime.engine import LLMEngine

    dtype = "bfloat16" if a.device == "cuda" else "float32"
    tps = [int(t) for t in a.tp.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for tp in tps:
        name = f"{a.model}-{dtype}-tp{tp}" + ("-at-load" if a.weights_at_load else "")
        eng_dir = build_random_engine(a.model, os.path.join(a.engines, name), dtype=dtype, device=a.device, tp=tp,
                                      at_load=a.weights_at_load)
        engine = LLMEngine(eng_dir)
        cfg = engine.config.model
        try:
            for b in batches:
                ms = step_ms(engine, b, a.steps)
                rows.append({"tp": tp, "batch": b, "step_ms": round(ms, 3), "output_tokens_per_s": round(b / ms * 1000, 1)})
                print(rows[-1], flush=True)
        finally:
            engine.shutdown()
        if tp > 1:
            ar = allreduce_ms(tp, cfg.hidden_size, cfg.num_hidden_layers, batches, a.device)
            for r in rows:
                if r["tp"] == tp:
                    r["allreduce_ms"] = round(ar[r["batch"]], 3)
                    r["allreduce_fraction"] = round(ar[r["batch"]] / r["step_ms"], 3)
                    print(r, flush=True)
    metrics = {"rows": rows}
    for b in batches:
        one = next((r for r in rows if r["tp"] == 1 and r["batch"] == b), None)
        for r in rows:
            if one and r["tp"] > 1 and r["batch"] == b:
                metrics[f"speedup_tp{r['tp']}_batch{b}"] = round(one["step_ms"] / r["step_ms"], 3)
    write_record("tensor-parallel-decode", a.model, {"dtype": dtype, "tp": tps, "batches": batches, "prompt_tokens": 128,
                                                     "steps": a.steps, "launcher": "local",
                                                     "weights_at_load": a.weights_at_load}, metrics)


if __name__ == "__main__":
    main()
