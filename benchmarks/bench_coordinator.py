"""Coordinator overhead per decode step: the Ray launcher against the local launcher, on the CPU.

Overhead = a step's wall time in the coordinator minus the forward time the executing rank
reports (``StepResult.forward_s``): scheduling, building the plan, msgpack, the socket round trip
to the rank-0 actor (Ray) or the in-process call / gloo broadcast (local), and processing the
sampled tokens. Measured at a steady decode batch of ``--batch`` sequences on a small random Llama,
for tp=1 and tp=2.

    python benchmarks/bench_coordinator.py [--batch 64] [--steps 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from record import write_record  # noqa: E402


def build(tmp: str, tp: int) -> str:
    import torch
    import transformers

    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    hf = os.path.join(tmp, "hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                       tie_word_embeddings=False)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).eval().save_pretrained(hf)
    out = os.path.join(tmp, f"tp{tp}")
    return build_engine(hf, out, BuildConfig(dtype="float32", tp=tp, max_seq_len=512, max_batch_size=128),
                        device_class="cpu", progress=False)


def measure(engine, batch: int, steps: int) -> dict:
    from kiln.runtime.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{i}", [(i * 13 + j) % 2000 + 3 for j in range(8)], sp)
    walls, fwds = [], []
    n = 0
    while engine.has_unfinished():
        f0 = engine.forward_s
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        n += 1
        if 3 <= n < 3 + steps and engine.stats()["running"] == batch:
            walls.append(wall)
            fwds.append(engine.forward_s - f0)
    over = [w - f for w, f in zip(walls, fwds)]
    return {
        "steps_measured": len(walls),
        "step_ms_p50": 1e3 * statistics.median(walls),
        "forward_ms_p50": 1e3 * statistics.median(fwds),
        "overhead_ms_p50": 1e3 * statistics.median(over),
        "overhead_ms_mean": 1e3 * statistics.fmean(over),
        "overhead_ms_p90": 1e3 * sorted(over)[int(0.9 * (len(over) - 1))],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    import ray

    from kiln.launch.ray_launcher import make_ray_engine
    from kiln.launch.topology import load_topology
    from kiln.runtime.engine import LLMEngine

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    topo = load_topology("local-cpu.yaml")
    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in a.tp:
            eng_dir = build(tmp, tp)
            local = LLMEngine(eng_dir)
            try:
                metrics[f"local_tp{tp}"] = measure(local, a.batch, a.steps)
            finally:
                local.shutdown()
            remote = make_ray_engine(eng_dir, topo.with_layout(tp=tp, dp=1))
            try:
                metrics[f"ray_tp{tp}"] = measure(remote, a.batch, a.steps)
            finally:
                remote.shutdown()
            l, r = metrics[f"local_tp{tp}"], metrics[f"ray_tp{tp}"]
            metrics[f"ray_minus_local_overhead_ms_p50_tp{tp}"] = r["overhead_ms_p50"] - l["overhead_ms_p50"]
            print(f"tp={tp}: overhead per decode step p50 local {l['overhead_ms_p50']:.2f} ms, ray {r['overhead_ms_p50']:.2f} ms "
                  f"(forward {l['forward_ms_p50']:.2f} / {r['forward_ms_p50']:.2f} ms)")
    ray.shutdown()
    write_record("coordinator_overhead", "llama-random-h128-l4-v2048",
                 {"batch": a.batch, "steps": a.steps, "tp": a.tp, "dtype": "float32", "launchers": ["local", "ray"],
                  "ray_version": ray.__version__},
                 metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
