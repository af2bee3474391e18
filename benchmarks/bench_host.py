"""Where the host's time goes in the step loop, per kind of step, through ``LLM``'s engine.

Runs ``--batch`` requests (``--prompt-len`` prompt tokens, ``--output-len`` output tokens,
ignore_eos) through the engine's step loop as ``LLM.generate`` does (outputs as the offline path
builds them, or as a streaming caller gets them with ``--stream``), and for every step records the
engine's host seconds by phase (``stats()["host_s"]``: schedule, launch, result with the part
blocked on the device, process, outputs) and the wall time. Steps are split into decode-only steps
at the full batch and the rest (those that prefill). With ``--cprofile N``, N more decode steps at
the full batch run under cProfile and the functions with the most own time are listed.

A step whose host phases, less the time blocked on the device, add up to more than the device's
time for that step leaves the device idle: the figure to hold against the decode step time.

    python benchmarks/bench_host.py                          # GPU: llama-3-8b bf16, batch 256
    python benchmarks/bench_host.py --model tiny-llama --batch 64 --output-len 32   # CPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import build_random_engine, text_table, write_record  # noqa: E402


def run(engine, reqs, stream: bool, prof_steps: int = 0) -> dict:
    from kiln.runtime.sampling_params import SamplingParams

    engine.stream_outputs = stream
    for i, (p, m) in enumerate(reqs):
        engine.add_request(f"h{i}", p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
    batch = len(reqs)
    rows: list[tuple[bool, float, dict]] = []
    prof = cProfile.Profile() if prof_steps else None
    profiled = 0
    t_all = time.perf_counter()
    while engine.has_unfinished():
        sch = engine.scheduler
        decode = not sch.waiting and len(sch.running) == batch and all(s.uncomputed <= 1 for s in sch.running)
        before = dict(engine.host_s)
        dw0 = engine.stats()["host_s"].get("device_wait", 0.0)
        use_prof = prof is not None and decode and profiled < prof_steps and sum(1 for r in rows if r[0]) >= 2
        t = time.perf_counter()
        if use_prof:
            prof.enable()
        engine.step()
        if use_prof:
            prof.disable()
            profiled += 1
        wall = time.perf_counter() - t
        after = engine.stats()["host_s"]
        d = {k: after[k] - before.get(k, 0.0) for k in engine.host_s}
        d["device_wait"] = after.get("device_wait", 0.0) - dw0
        if not use_prof:
            rows.append((decode, wall, d))
    total = time.perf_counter() - t_all
    out: dict = {"wall_s": round(total, 3), "steps": len(rows)}
    for name, keep in (("decode_at_batch", True), ("other", False)):
        sel = [(w, d) for dec, w, d in rows if dec == keep]
        if not sel:
            continue
        med = {k: round(statistics.median(d[k] for _, d in sel) * 1000, 3) for k in sel[0][1]}
        med["wall"] = round(statistics.median(w for w, _ in sel) * 1000, 3)
        med["host_busy"] = round(statistics.median(sum(v for k, v in d.items() if k != "device_wait") - d["device_wait"]
                                                   for _, d in sel) * 1000, 3)
        out[name] = {"steps": len(sel), "ms_p50": med}
    if prof is not None and profiled:
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats("tottime").print_stats(25)
        out["cprofile_steps"] = profiled
        out["cprofile_top"] = [
            {"function": f"{os.path.basename(fn)}:{line}({name})", "calls": nc, "tottime_ms_per_step": round(tt / profiled * 1000, 3),
             "cumtime_ms_per_step": round(ct / profiled * 1000, 3)}
            for (fn, line, name), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
        ]
    return out


def prefill_profile(engine, prompts: list[list[int]], top: int = 16) -> dict:
    """One step that prefills ``prompts`` (one output token each) under the torch profiler: the
    step's wall time, the device time by kernel, and the prefill rate those give."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kiln.runtime.sampling_params import SamplingParams

    cuda = torch.cuda.is_available()
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        wall = time.perf_counter() - t
    per: dict[str, list] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) if cuda else e.self_cpu_time_total
        if us > 0:
            r = per.setdefault(e.key, [0.0, 0])
            r[0] += us
            r[1] += e.count
    total = sum(v[0] for v in per.values())
    tokens = sum(len(p) for p in prompts)
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return {"prompts": len(prompts), "tokens": tokens, "wall_ms": round(wall * 1000, 2),
            "device_ms": round(total / 1000, 2), "tokens_per_s_wall": round(tokens / wall),
            "kernels": [{"name": k[:100], "ms": round(v[0] / 1000, 3), "calls": v[1]} for k, v in rows]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--engines", default=os.environ.get("KILN_ENGINES", "/tmp/kiln-engines"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--stream", action="store_true", help="build every request's output each step (a streaming caller)")
    ap.add_argument("--cprofile", type=int, default=0, help="decode steps at the full batch to run under cProfile")
    ap.add_argument("--prefill", default="", help="prompt counts (each --prompt-len tokens) to prefill in one step under "
                                                  "the torch profiler, e.g. 8,40")
    a = ap.parse_args(argv)

    import random

    import torch

    from kiln.runtime.engine import LLMEngine

    cuda = torch.cuda.is_available()
    if a.engine:
        engine_dir = a.engine
    else:
        model = a.model or ("llama-3-8b" if cuda else "tiny-llama")
        dtype = a.dtype or ("bfloat16" if cuda else "float32")
        dev = "cuda" if cuda else "cpu"
        engine_dir = build_random_engine(model, os.path.join(a.engines, f"{model}-{dtype}-{dev}-serving-b{a.batch}-s4096"),
                                         dtype=dtype, device=dev, max_batch_size=a.batch, max_seq_len=4096,
                                         max_num_tokens=8192, at_load=True)
    t = time.monotonic()
    engine = LLMEngine(engine_dir)
    load_s = time.monotonic() - t
    vocab = engine.config.model.vocab_size
    rng = random.Random(0)
    lo, hi = min(1000, vocab // 4), min(vocab - 1, 30000)
    make = lambda: [rng.randint(lo, hi) for _ in range(a.prompt_len)]  # noqa: E731
    run(engine, [(make(), 4)], a.stream)  # warm
    res = run(engine, [(make(), a.output_len) for _ in range(a.batch)], a.stream, a.cprofile)
    if a.prefill:
        res["prefill"] = []
        for n in (int(x) for x in a.prefill.split(",")):
            pp = prefill_profile(engine, [make() for _ in range(n)])
            res["prefill"].append(pp)
            print(f"prefill of {n} x {a.prompt_len} tokens: wall {pp['wall_ms']} ms, device {pp['device_ms']} ms, "
                  f"{pp['tokens_per_s_wall']} tok/s")
            for k in pp["kernels"]:
                print(f"  {k['ms']:9.3f} ms {k['calls']:5d}  {k['name']}")
    for name in ("decode_at_batch", "other"):
        if name in res:
            print(f"{name} ({res[name]['steps']} steps), ms per step:")
            print(text_table([res[name]["ms_p50"]], list(res[name]["ms_p50"])))
    for r in res.get("cprofile_top", [])[:20]:
        print(f"  {r['tottime_ms_per_step']:8.3f} ms  {r['calls']:6d}  {r['function']}")
    settings = {"engine": os.path.basename(engine_dir.rstrip("/")), "batch": a.batch, "prompt_tokens": a.prompt_len,
                "prefill_prompts": a.prefill,
                "output_tokens": a.output_len, "stream": a.stream, "async_scheduling": engine.async_scheduling,
                "load_s": round(load_s, 1)}
    write_record("host-phases", engine_dir.rstrip("/").split("/")[-1], settings, res)
    engine.shutdown()
    return res


if __name__ == "__main__":
    main()
