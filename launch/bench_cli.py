"""``kiln bench``: runs a benchmark script from benchmarks/ by name."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

BENCHMARKS = {
    "cpu-generate": "bench_cpu_generate.py",
    "inflight": "bench_inflight.py",
    "serving": "bench_serving.py",
    "gpu": "bench_gpu.py",
    "coordinator": "bench_coordinator.py",
    "tp": "bench_tp.py",
    "build-parts": "bench_build_parts.py",
    "cluster": "bench_cluster.py",
    "quant": "bench_quant.py",
    "perplexity": "bench_perplexity.py",
    "speculative": "bench_speculative.py",
    "moe": "bench_moe.py",
    "host": "bench_host.py",
    "long-context": "bench_long_context.py",
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (see benchmarks/); extra arguments go to it")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER)


def run(a) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "benchmarks", BENCHMARKS[a.name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark script {path} is not present: run kiln bench from a source checkout")
    sys.argv = [path, *a.args]
    runpy.run_path(path, run_name="__main__")
    return 0
