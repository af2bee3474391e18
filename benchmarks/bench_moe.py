"""MoE decode against its floors, as a user meets it (wall time of ``LLM.generate``), with the
expert path the engine picks, with the fused kernels of ``kiln.kernels.moe_triton``
(``KILN_MOE_FUSED=1``) and with its GEMV kernels for the fewest rows (``KILN_MOE_GEMV=1``; batch 64
takes the default path there), each in a process of its own:

* batch 1: the step reads attention, norms, the router, the ``top_k`` routed experts of every
  layer and the LM head; floor = those bytes / the measured copy bandwidth;
* batch 64: every expert is read once (with 64 tokens x top_k rows nearly all are chosen); floor =
  all weights but the embedding table / bandwidth.

    python benchmarks/bench_moe.py --models mixtral-8x7b,qwen3-30b-a3b --paths default,fused,gemv
    python benchmarks/bench_moe.py --smoke        # tiny-moe on the CPU: the script itself

Random-weight engines drawn at load. Writes a "moe-decode" record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import text_table, write_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def floors(cfg, dtype_bytes: int) -> tuple[int, int]:
    """(bytes a batch-1 step reads, bytes of every weight but the embedding table)."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    d = cfg.head_dim or h // cfg.num_attention_heads
    attn = h * d * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
    expert = 3 * h * cfg.moe_intermediate_size
    router = h * cfg.num_experts
    norms = 2 * h
    head = cfg.vocab_size * h
    one = L * (attn + cfg.num_experts_per_tok * expert + router + norms) + head
    every = L * (attn + cfg.num_experts * expert + router + norms) + head
    return one * dtype_bytes, every * dtype_bytes


def child(a) -> None:
    """One engine in this process: batch-1 and batch-64 decode step times."""
    import random

    import torch

    from kiln.runtime.llm import LLM
    from kiln.runtime.sampling_params import SamplingParams

    llm = LLM(a.engine)
    rng = random.Random(0)

    def run(batch, tokens):
        ps = [[rng.randrange(100, 1000) for _ in range(a.prompt)] for _ in range(batch)]
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(ps, sp)
        return time.perf_counter() - t

    out = {}
    for batch in (1, 64):
        run(batch, 4)
        t1 = min(run(batch, 1) for _ in range(2))
        tn = run(batch, a.steps + 1)
        out[f"batch{batch}_ms"] = round((tn - t1) / a.steps * 1000, 3)
    if a.offline_requests:
        ps = [[rng.randrange(100, 1000) for _ in range(a.isl)] for _ in range(a.offline_requests)]
        sp = SamplingParams(max_tokens=a.osl, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        res = llm.generate(ps, sp)
        wall = time.perf_counter() - t
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        out.update(offline_tok_s=round(tokens / wall, 1), offline_wall_s=round(wall, 1),
                   preemptions=int(llm.stats().get("preemptions", 0)))
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--paths", default="default,fused,gemv", help="default (the engine's choice), fused and/or gemv (KILN_MOE_FUSED=1, KILN_MOE_GEMV=1)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--engines", default="/tmp/kiln-engines")
    ap.add_argument("--offline-requests", type=int, default=0,
                    help="also run this many offline requests of --isl/--osl tokens (ignore_eos) on the default path")
    ap.add_argument("--isl", type=int, default=1000)
    ap.add_argument("--osl", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="tiny-moe on the CPU, few steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    from record import build_random_engine

    from kiln.runtime.presets import PRESETS

    device = "cpu" if a.smoke else "cuda"
    models = ["tiny-moe"] if a.smoke else a.models.split(",")
    dtype = "float32" if a.smoke else a.dtype
    steps = 4 if a.smoke else a.steps
    bw = None
    if not a.smoke:
        from bench_gpu import copy_bandwidth

        bw = copy_bandwidth()
    offline = 4 if a.smoke and a.offline_requests else a.offline_requests
    isl, osl = (16, 8) if a.smoke else (a.isl, a.osl)
    rows, failed = [], []
    for model in models:
        eng = build_random_engine(model, os.path.join(a.engines, f"{model}-{dtype}-{device}-moe"), dtype=dtype,
                                  device=device, max_batch_size=256 if offline else 64,
                                  max_seq_len=max(1024, isl + osl + 16), at_load=True)
        one, every = floors(PRESETS[model], 4 if dtype == "float32" else 2)
        for path in a.paths.split(","):
            env = dict(os.environ, KILN_MOE_FUSED="1" if path == "fused" else "0", KILN_MOE_GEMV="1" if path == "gemv" else "0")
            cmd = [sys.executable, __file__, "--child", "--engine", eng, "--steps", str(steps), "--prompt",
                   str(16 if a.smoke else a.prompt), "--isl", str(isl), "--osl", str(osl),
                   "--offline-requests", str(offline if path == "default" else 0)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-3000:] + proc.stderr[-3000:])
                failed.append(f"{model} {path}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
                print(failed[-1], flush=True)
                continue
            r = json.loads(lines[-1][7:])
            row = {"model": model, "path": path, **r, "batch1_floor_ms": None, "batch64_floor_ms": None}
            if bw:
                row["batch1_floor_ms"] = round(one / bw * 1000, 3)
                row["batch64_floor_ms"] = round(every / bw * 1000, 3)
                row["batch1_vs_floor"] = round(r["batch1_ms"] / row["batch1_floor_ms"], 3)
                row["batch64_vs_floor"] = round(r["batch64_ms"] / row["batch64_floor_ms"], 3)
            rows.append(row)
            print(text_table([row], list(row)), flush=True)
    write_record("moe-decode", ",".join(models), {"dtype": dtype, "steps": steps, "prompt_tokens": a.prompt,
                                                   "measured": "wall time of LLM.generate", "smoke": a.smoke,
                                                   "offline": {"requests": offline, "input_tokens": isl, "output_tokens": osl,
                                                               "ignore_eos": True, "path": "default"} if offline else None},
                 {"copy_bandwidth_gb_s": round(bw / 1e9, 1) if bw else None, "rows": rows, "failed": failed})
    if failed:
        raise SystemExit("failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
