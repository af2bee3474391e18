"""Multi-GPU runs through the Ray launcher, one call for a whole board: each run builds a
random-weight engine with its own parallel layout, places it with a topology file (its layout
replaced by the run's), and measures

* batch-1 decode per token against the bandwidth floor of the GPUs a replica spans (the largest
  rank's weight bytes / the measured per-GPU copy bandwidth; stages of a pipeline add up);
* offline throughput at each --batches size (--input / --output tokens, ignore_eos);
* the all-reduce share of a decode step (the step's all-reduces replayed alone, bench_tp.py);
* time to first token of a --ttft-tokens prompt (0 skips it).

Runs are ``model:layout`` with layout like tp4, tp2pp2, tp4ep4 or tp4dp2:

    python benchmarks/bench_cluster.py --topology cluster_configs/h200-4gpu.yaml \\
        --runs llama-3-70b:tp4,llama-3-70b:tp2pp2,mixtral-8x7b:tp4ep4,mixtral-8x7b:tp4ep1 --batches 128,256
    python benchmarks/bench_cluster.py --topology cluster_configs/hgx-h200-8gpu.yaml --weights-at-load \\
        --runs llama-3.1-405b:tp8 --batches 64,256 --input 1024 --output 1024 --ttft-tokens 4096
    python benchmarks/bench_cluster.py --topology cluster_configs/h200-2gpu.yaml --weights-at-load \\
        --runs llama-3-8b:tp2 --batches 1,64 --input 128 --output 64       # tp=2 through Ray on two GPUs
    python benchmarks/bench_cluster.py --topology local-cpu.yaml --runs tiny-llama:tp2 --batches 4 \\
        --input 32 --output 8 --device cpu                                   # a check on CPUs
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tp import allreduce_ms, step_ms  # noqa: E402
from record import build_random_engine, write_record  # noqa: E402


def parse_layout(text: str) -> dict:
    lay = {"tp": 1, "pp": 1, "ep": 1, "dp": 1}
    for key, val in re.findall(r"(tp|pp|ep|dp)(\d+)", text):
        lay[key] = int(val)
    if not re.fullmatch(r"((tp|pp|ep|dp)\d+)+", text):
        raise SystemExit(f"bad layout {text!r}: write it like tp4, tp2pp2, tp4ep4 or tp4dp2")
    return lay


def throughput(engine, batch: int, n_in: int, n_out: int) -> dict:
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(batch)
    sp = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"t{batch}-{i}", [rng.randrange(1000, 30000) for _ in range(n_in)], sp)
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t
    return {"batch": batch, "output_tokens_per_s": round(batch * n_out / wall, 1), "wall_s": round(wall, 2)}


def ttft(engine, n: int) -> float:
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(7)
    t = time.perf_counter()
    engine.add_request("ttft", [rng.randrange(1000, 30000) for _ in range(n)], SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - t) * 1000


def largest_stage_bytes(cfg, lay: dict, dtype) -> int:
    """Bytes a batch-1 step reads on the slowest path: per stage its largest rank, stages summed."""
    from kiln.parallel.mapping import Mapping
    from kiln.runtime.builder import rank_layout

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in range(lay["pp"]):
        ranks = [Mapping(tp=lay["tp"], pp=lay["pp"], ep=lay["ep"], rank=s * lay["tp"] + t) for t in range(lay["tp"])]
        total += max(sum(torch.Size(sh).numel() for n, (sh, _) in rank_layout(cfg, m, dtype).items() if "embed_tokens" not in n
                         or cfg.tie_word_embeddings) * size for m in ranks)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", required=True)
    ap.add_argument("--runs", required=True, help="model:layout,... e.g. llama-3-70b:tp4,llama-3-70b:tp2pp2")
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--input", type=int, default=1024)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--ttft-tokens", type=int, default=0)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engines", default="/tmp/kiln-engines")
    ap.add_argument("--weights-at-load", action="store_true", help="build without weight files (models larger than the disk)")
    a = ap.parse_args()
    from kiln.launch.ray_launcher import make_ray_engine, shutdown_ray
    from kiln.launch.topology import load_topology

    base = load_topology(a.topology)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    tdt = torch.bfloat16 if a.device == "cuda" else torch.float32
    bw = None
    if a.device == "cuda":
        from bench_gpu import copy_bandwidth

        bw = copy_bandwidth()
        torch.cuda.empty_cache()
    batches = [int(b) for b in a.batches.split(",")]
    max_seq = max(a.input + a.output, a.ttft_tokens + 1, 2048)
    for run in a.runs.split(","):
        model, _, lay_text = run.partition(":")
        lay = parse_layout(lay_text)
        name = f"{model}-{dtype}-tp{lay['tp']}pp{lay['pp']}ep{lay['ep']}" + ("-at-load" if a.weights_at_load else "")
        eng_dir = build_random_engine(model, os.path.join(a.engines, name), dtype=dtype, device=a.device, tp=lay["tp"],
                                      pp=lay["pp"], ep=lay["ep"], max_seq_len=max_seq, at_load=a.weights_at_load)
        topo = base.model_copy(update={"layout": base.layout.model_copy(update=lay)})
        engine = make_ray_engine(eng_dir, topo)
        cfg = engine.config.model
        m = {"layout": lay}
        try:
            ms = step_ms(engine, 1, a.decode_steps)
            m["decode_ms_per_token"] = round(ms, 3)
            if bw:
                floor = largest_stage_bytes(cfg, lay, tdt) / bw * 1000
                m.update(bandwidth_floor_ms=round(floor, 3), ratio_to_floor=round(ms / floor, 3),
                         copy_bandwidth_gb_s_per_gpu=round(bw / 1e9, 1))
            m["throughput"] = [throughput(engine, b, a.input, a.output) for b in batches]
            m["decode_step_ms"] = {str(b): round(step_ms(engine, b, a.decode_steps // 2), 3) for b in batches}
            if a.ttft_tokens:
                m["ttft_ms"] = round(ttft(engine, a.ttft_tokens), 1)
        finally:
            engine.shutdown()
        if lay["tp"] > 1:
            ar = allreduce_ms(lay["tp"], cfg.hidden_size, cfg.num_hidden_layers // lay["pp"], [1] + batches, a.device)
            m["allreduce_ms"] = {str(b): round(v, 3) for b, v in ar.items()}
            m["allreduce_fraction"] = round(ar[1] / m["decode_ms_per_token"], 3)
            m["allreduce_fraction_by_batch"] = {str(b): round(ar[b] / m["decode_step_ms"][str(b)], 3) for b in batches}
        print(run, m, flush=True)
        write_record("cluster", model, {"topology": base.name, "layout": lay, "dtype": dtype, "input_tokens": a.input,
                                        "output_tokens": a.output, "launcher": "ray", "weights_at_load": a.weights_at_load}, m)
    shutdown_ray()


if __name__ == "__main__":
    main()
