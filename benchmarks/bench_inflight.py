"""In-flight batching on the CPU: N concurrent requests through the scheduler vs the same
requests one at a time, on the same engine in the same run.

    python benchmarks/bench_inflight.py [--requests 64]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_record  # noqa: E402


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(100, 49000) for _ in range(rng.randint(32, 256))], rng.randint(32, 96)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--engine", default="engines/smollm2-float32-cpu")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.engine, "engine.json")):
        subprocess.run([sys.executable, "-m", "kiln.launch.cli", "build", "--model", "smollm2-135m-instruct", "--output", a.engine,
                        "--dtype", "float32", "--device", "cpu", "--max-seq-len", "2048", "--quiet"], check=True)
    from kiln.runtime import LLM, SamplingParams

    llm = LLM(a.engine, max_batch_size=a.requests, max_num_tokens=2048, enable_prefix_caching=False)
    reqs = workload(a.requests)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    total = sum(m for _, m in reqs)
    llm.generate([reqs[0][0]], params[0])  # warm-up

    t = time.perf_counter()
    batched = llm.generate([p for p, _ in reqs], params)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    serial = [llm.generate([p], sp)[0] for (p, _), sp in zip(reqs, params)]
    t_serial = time.perf_counter() - t
    same = sum(b.outputs[0].token_ids == s.outputs[0].token_ids for b, s in zip(batched, serial))
    print(f"batched {total / t_batched:.1f} tok/s, one at a time {total / t_serial:.1f} tok/s, identical outputs {same}/{len(reqs)}")
    write_record(
        "cpu-inflight-batching", "smollm2-135m-instruct",
        {"requests": a.requests, "prompt_tokens": "uniform 32-256", "output_tokens": "uniform 32-96", "dtype": "float32",
         "max_num_tokens": 2048, "prefix_caching": False},
        {"output_tokens_per_s": round(total / t_batched, 2), "serial_output_tokens_per_s": round(total / t_serial, 2),
         "speedup_vs_serial": round(t_serial / t_batched, 2), "batched_wall_s": round(t_batched, 2),
         "serial_wall_s": round(t_serial, 2), "identical_outputs": same, "output_tokens": total},
    )


if __name__ == "__main__":
    main()
