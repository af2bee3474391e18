"""Quantized engines on one GPU, as a user meets them (wall time of ``LLM.generate``):

(a) batch-1 decode per token for bfloat16, fp8, fp8 + fp8 KV, int8-weight and int4 engines of
    one shape, each against its own weight-read floor (bytes one step reads / measured copy
    bandwidth) and against bfloat16;
(b) batch-64 decode step of the same engines, and each one's KV cache capacity in tokens;
(c) offline throughput, ISL/OSL 1000/1000 (``--requests``, ignore_eos) for the variants in
    ``--offline`` at ``--max-batch-size``.

Random-weight engines drawn at load (``--weights-at-load``): the weights are quantized on the GPU
as the builder would, so no weight files are written. int4 engines of random weights use
round-to-nearest (an AWQ search needs real weights; the kernel is the same).

    python benchmarks/bench_quant.py --model llama-3-8b --variants bf16,fp8,fp8kv,int8,int4 --offline bf16,fp8kv

One record per part in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import copy_bandwidth  # noqa: E402
from record import text_table, write_record  # noqa: E402

VARIANTS = {
    "bf16": [],
    "fp8": ["--quant", "fp8"],
    "fp8kv": ["--quant", "fp8", "--kv-cache-dtype", "fp8"],
    "int8": ["--quant", "int8-weight"],
    "int4": ["--quant", "int4-awq"],
}


def build(model: str, variant: str, root: str, max_batch_size: int, max_seq_len: int) -> str:
    import subprocess

    out = os.path.join(root, f"{model}-{variant}")
    if not os.path.exists(os.path.join(out, "engine.json")):
        cmd = [sys.executable, "-m", "kiln.launch.cli", "build", "--model", model, "--random-weights", "--dtype", "bfloat16",
               "--device", "cuda", "--output", out, "--max-batch-size", str(max_batch_size), "--max-seq-len", str(max_seq_len),
               "--weights-at-load", "--quiet", *VARIANTS[variant]]
        subprocess.run(cmd, check=True)
    return out


def read_bytes(llm) -> int:
    """Bytes a decode step reads: every weight but the embedding table (unless tied)."""
    model = llm.engine.executor.runner.model
    tied = model.cfg.tie_word_embeddings
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if tied or "embed_tokens" not in n)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 30000) for _ in range(length)] for _ in range(n)]


def timed_generate(llm, ps, max_tokens: int) -> float:
    from kiln.runtime.sampling_params import SamplingParams

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(ps, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - t


def kernel_profile(llm, batch: int, context: int, steps: int, top: int = 14) -> dict:
    """Device time per decode step by kernel (CUPTI sees the kernels of graph replays too): the
    difference of two profiled runs, ``steps + 1`` and 1 output tokens, of ``batch`` requests
    with ``context``-token prompts, so prefill drops out."""
    from torch.profiler import ProfilerActivity, profile

    ps = prompts(batch, context, 3)

    def run(n):
        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            timed_generate(llm, ps, n)
        out = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
            if t > 0:
                out[e.key] = (out.get(e.key, (0.0, 0))[0] + t, out.get(e.key, (0.0, 0))[1] + e.count)
        return out

    timed_generate(llm, ps, 2)
    one, many = run(1), run(steps + 1)
    per = {k: ((v[0] - one.get(k, (0.0, 0))[0]) / steps, (v[1] - one.get(k, (0.0, 0))[1]) / steps)
           for k, v in many.items()}
    rows = sorted(((k, t, c) for k, (t, c) in per.items() if t > 0.5), key=lambda r: -r[1])
    total = sum(t for _, t, _ in rows)
    return {"batch": batch, "context": context, "device_us_per_step": round(total, 1),
            "kernels": [{"name": k[:90], "us": round(t, 1), "calls": round(c, 1)} for k, t, c in rows[:top]]}


def print_profile(variant: str, prof: dict) -> None:
    print(f"--- {variant}: device time per decode step at batch {prof['batch']}, context {prof['context']}: "
          f"{prof['device_us_per_step']} us", flush=True)
    for r in prof["kernels"]:
        print(f"  {r['us']:9.1f} us  {r['calls']:6.1f} x  {r['name']}", flush=True)


def decode_ms(llm, batch: int, steps: int, seed: int) -> float:
    """Wall time per decode step of ``batch`` requests: (T(steps + 1 tokens) - T(1 token)) / steps."""
    ps = prompts(batch, 128, seed)
    timed_generate(llm, ps, 8)  # warm
    t1 = min(timed_generate(llm, ps, 1) for _ in range(2))
    tn = timed_generate(llm, ps, steps + 1)
    return (tn - t1) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--variants", default="bf16,fp8,fp8kv,int8,int4")
    ap.add_argument("--offline", default="bf16,fp8kv", help="variants to run the offline workload on ('' for none)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--isl", type=int, default=1000)
    ap.add_argument("--osl", type=int, default=1000)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--engines", default="/tmp/kiln-engines")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--policy", default="max_utilization", help="scheduler policy (guaranteed_no_evict or max_utilization)")
    ap.add_argument("--profile", default="", help="batch:context pairs to profile by kernel, e.g. 1:128,256:1000")
    a = ap.parse_args()
    from kiln.runtime.llm import LLM

    bw = copy_bandwidth()
    offline = [v for v in a.offline.split(",") if v]
    rows, results = [], {}
    for v in a.variants.split(","):
        eng = build(a.model, v, a.engines, a.max_batch_size, max(4096, a.isl + a.osl + 64))
        t = time.time()
        llm = LLM(eng, scheduler_policy=a.policy)
        load_s = time.time() - t
        nbytes = read_bytes(llm)
        floor = nbytes / bw * 1000
        b1 = decode_ms(llm, 1, a.steps, 0)
        b64 = decode_ms(llm, 64, 128, 1)
        bm = llm.engine.block_manager
        row = {"variant": v, "load_s": round(load_s, 1), "weight_gb_read": round(nbytes / 1e9, 3),
               "floor_ms": round(floor, 3), "batch1_ms": round(b1, 3), "ratio_to_floor": round(b1 / floor, 3),
               "batch64_step_ms": round(b64, 2), "kv_tokens": bm.num_blocks * bm.block_size}
        from kiln.kernels import triton_attention

        if triton_attention.decode_tuned_table():
            row["fp8_kv_decode_tile"] = triton_attention.decode_tuned_table()  # chosen at load by measurement
        if a.profile:
            row["profiles"] = []
            for pair in a.profile.split(","):
                pb, pc = (int(x) for x in pair.split(":"))
                prof = kernel_profile(llm, pb, pc, 16)
                print_profile(v, prof)
                row["profiles"].append(prof)
        if v in offline:
            results[v] = row
            save(a, offline, rows + [row], results, bw, done=False)  # a call cut short in the offline run keeps the rest
            ps = prompts(a.requests, a.isl, 7)
            wall = timed_generate(llm, ps, a.osl)
            row["offline_tok_s"] = round(a.requests * a.osl / wall, 1)
            row["offline_wall_s"] = round(wall, 1)
            row["preemptions"] = llm.stats().get("preemptions")
        results[v] = row
        rows.append(row)
        print(text_table([row], [k for k in row if k != "profiles"]), flush=True)
        save(a, offline, rows, results, bw, done=False)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    save(a, offline, rows, results, bw, done=True)


_WRITTEN: list[str] = []


def save(a, offline, rows, results, bw, done: bool) -> None:
    """The record of the rows so far (a run cut short keeps what it measured); each call
    replaces the previous file."""
    if "bf16" in results:
        for r in rows:
            r["batch1_vs_bf16"] = round(r["batch1_ms"] / results["bf16"]["batch1_ms"], 3)
    if done:
        print(text_table(rows, ["variant", "weight_gb_read", "floor_ms", "batch1_ms", "ratio_to_floor", "batch1_vs_bf16",
                                "batch64_step_ms", "kv_tokens", "offline_tok_s", "load_s"]))
    settings = {"weights": "random, drawn and quantized at load", "max_batch_size": a.max_batch_size,
                "scheduler_policy": a.policy, "profile": a.profile, "variants": a.variants, "complete": done,
                "decode_prompt_tokens": 128, "batch1_steps": a.steps, "measured": "wall time of LLM.generate",
                "offline": {"variants": offline, "requests": a.requests, "input_tokens": a.isl, "output_tokens": a.osl,
                            "ignore_eos": True}}
    path = write_record("gpu-quant", a.model, settings,
                        {"copy_bandwidth_gb_s": round(bw / 1e9, 1), "rows": rows,
                         **{f"{r['variant']}_decode_ms_per_token": r["batch1_ms"] for r in rows},
                         **{f"{r['variant']}_output_tokens_per_s": r["offline_tok_s"] for r in rows if "offline_tok_s" in r}})
    if _WRITTEN and _WRITTEN[-1] != path and os.path.exists(_WRITTEN[-1]):
        os.remove(_WRITTEN[-1])
    _WRITTEN.append(path)


if __name__ == "__main__":
    main()
