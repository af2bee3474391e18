"""The GPU benchmark suite, in one run on one GPU:

(a) batch-1 decode time per token of a llama-3-8b-shaped random engine in bfloat16, against the
    bandwidth floor (weight bytes read per step / measured device copy bandwidth);
(b) offline throughput: N requests (default 1,000), input lengths uniform in 128-2,048, output
    lengths uniform in 128-1,024 (ignore_eos), max_batch_size 256; GPU busy fraction of decode;
(c) the baseline: transformers' `generate` on the same GPU for (a), and for a 128-request sample
    of (b) in padded batches (static cache), throughput taken from that sample;
(d) time to first token of a 2,048-token prompt.

    python benchmarks/bench_gpu.py [--model llama-3-8b] [--requests 1000] [--skip-baseline]

Writes one record per part to benchmarks/results/ (or $KILN_RESULTS_DIR) and a PNG plot.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import build_random_engine, write_record  # noqa: E402


def copy_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (s.elapsed_time(e) / 1000)


def weight_bytes(engine) -> tuple[int, int]:
    """(all weight bytes, bytes a decode step reads: all but the embedding table)."""
    total = read = 0
    for n, p in engine.executor.runner.model.named_parameters():
        b = p.numel() * p.element_size()
        total += b
        if "embed_tokens" not in n or engine.config.model.tie_word_embeddings:
            read += b
    return total, read


def decode_ms_per_token(engine, prompt_len: int = 128, steps: int = 256) -> float:
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(0)
    ids = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
    engine.add_request("b1", ids, SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    while engine.has_unfinished():
        engine.step()
        n += 1
    ms = (time.perf_counter() - t) / n * 1000
    # The same again with CUDA events around each step's GPU work: GPU time vs wall time.
    runner = engine.executor.runner
    engine.add_request("b1-timed", ids, SamplingParams(max_tokens=65, temperature=0.0, ignore_eos=True))
    engine.step()
    runner.time_gpu = True
    gpu = []
    while engine.has_unfinished():
        engine.step()
        gpu.append(runner.last_gpu_s)
    runner.time_gpu = False
    decode_ms_per_token.step_gpu_ms = sorted(gpu)[len(gpu) // 2] * 1000
    return ms


def decode_breakdown(engine) -> dict:
    """Where a batch-1 decode step's time goes: back-to-back graph replays (GPU only, no CPU
    between steps), and each weight's GEMV alone at M=1 (rotating inputs; summed over layers)."""

    from kiln.kernels.gemv import linear

    runner = engine.executor.runner
    out = {}
    if runner.graphs is not None:
        g = runner.graphs.graphs[1]
        for _ in range(5):
            g.replay()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(50):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        out["graph_replay_ms"] = round(s.elapsed_time(e) / 50, 3)
    total_ms = 0.0
    shapes = {}
    for n, p in runner.model.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in n:
            key = tuple(p.shape)
            shapes.setdefault(key, [p, 0])[1] += 1
    rows = []
    for (o, i), (w, count) in shapes.items():
        x = torch.randn(1, i, dtype=w.dtype, device="cuda")
        for _ in range(3):
            linear(x, w)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            linear(x, w)
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / 20
        total_ms += ms * count
        rows.append({"shape": [o, i], "count": count, "ms": round(ms, 4), "gb_s": round(w.numel() * w.element_size() / ms / 1e6, 1)})
    out["gemv_sum_ms"] = round(total_ms, 3)
    out["gemv"] = rows
    return out


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(1000, 30000) for _ in range(rng.randint(128, 2048))], rng.randint(128, 1024)) for _ in range(n)]


def busy_fraction(spans, min_seqs: int = 0) -> tuple[float | None, int]:
    """GPU busy share of decode, from device events alone: over each decode-only step that follows
    another step, its GPU time against that time plus the idle gap since the previous step ended.
    Returns (fraction, steps counted); only steps of at least ``min_seqs`` sequences count."""
    busy = total = 0.0
    n = 0
    for prev, cur in zip(spans, spans[1:]):
        decode, seqs, start, end = cur
        if not decode or seqs < min_seqs:
            continue
        run = start.elapsed_time(end)
        gap = max(0.0, prev[3].elapsed_time(start))
        busy += run
        total += run + gap
        n += 1
    return (round(busy / total, 3) if total else None), n


class HostPhases:
    """Host time per engine step in its phases (scheduling, launching, waiting for the device,
    processing tokens), by wrapping those methods of one engine for the benchmark's duration."""

    NAMES = ("schedule", "launch", "wait", "process")

    def __init__(self, engine):
        from kiln.runtime import model_runner

        self.cur = dict.fromkeys(self.NAMES, 0.0)
        self.steps: list[tuple[bool, int, dict]] = []
        self._undo = []
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.executor.runner, "launch", "launch")
        self._wrap(engine, "_process", "process")
        self._wrap(model_runner.PendingStep, "result", "wait", cls=True)

    def _wrap(self, obj, attr, name, cls=False):
        f = getattr(obj, attr)
        cur = self.cur

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                cur[name] += time.perf_counter() - t

        setattr(obj, attr, timed)
        self._undo.append((obj, attr, f if cls else None))

    def end_step(self, decode_only: bool, seqs: int) -> None:
        self.steps.append((decode_only, seqs, dict(self.cur)))
        for k in self.cur:
            self.cur[k] = 0.0

    def restore(self) -> None:
        for obj, attr, f in self._undo:
            if f is not None:
                setattr(obj, attr, f)
            else:
                delattr(obj, attr)

    def medians_ms(self, seqs: int) -> dict:
        rows = [d for dec, n, d in self.steps if dec and n >= seqs]
        if not rows:
            return {}
        return {k: round(statistics.median(r[k] for r in rows) * 1000, 2) for k in self.NAMES}


def offline_throughput(engine, reqs) -> dict:
    """Workload (b) as ``LLM.generate`` runs it: outputs detokenized once, at the end."""
    from kiln.runtime.sampling_params import SamplingParams

    runner = engine.executor.runner
    engine.stream_outputs = False
    for i, (p, m) in enumerate(reqs):
        engine.add_request(f"o{i}", p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
    torch.cuda.synchronize()
    runner.time_gpu = True
    runner.gpu_spans.clear()
    phases = HostPhases(engine)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        phases.end_step(runner.last_step_decode_only, runner.last_step_seqs)
    wall = time.perf_counter() - t0
    phases.restore()
    runner.time_gpu = False
    engine.stream_outputs = True
    torch.cuda.synchronize()
    spans = runner.gpu_spans
    busy, n_decode = busy_fraction(spans)
    busy256, n256 = busy_fraction(spans, 256)
    gpu256 = [s.elapsed_time(e) for d, n, s, e in spans if d and n >= 256]
    out_tokens = sum(m for _, m in reqs)
    return {
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "total_tokens_per_s": round((out_tokens + sum(len(p) for p, _ in reqs)) / wall, 1),
        "wall_s": round(wall, 1),
        "gpu_busy_fraction": busy,
        "decode_steps": n_decode,
        "gpu_busy_fraction_batch256": busy256,
        "decode_steps_at_batch256": n256,
        "max_batch": max((s[1] for s in spans), default=0),
        "gpu_ms_per_step_batch256_p50": round(statistics.median(gpu256), 2) if gpu256 else None,
        "host_ms_per_step_batch256_p50": phases.medians_ms(256),
        "preemptions": engine.stats()["preemptions"],
    }


def ttft_ms(engine, prompt_len: int = 2048, repeats: int = 5) -> float:
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(1)
    times = []
    for r in range(repeats):
        ids = [rng.randrange(1000, 30000) for _ in range(prompt_len)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.add_request(f"t{r}", ids, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished():
            engine.step()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return times[len(times) // 2]


def _stop_after(n: int):
    """A stopping criterion that ends generate after ``n`` new tokens: a warm-up that compiles and
    captures transformers' decode step for a shape without generating the whole output."""
    import transformers

    class StopAfter(transformers.StoppingCriteria):
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores, **kw):
            if self.start is None:
                self.start = input_ids.shape[1] - 1
            done = input_ids.shape[1] - self.start >= n
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return transformers.StoppingCriteriaList([StopAfter()])


def hf_baseline(cfg_name: str, reqs, batch: int = 64, decode_tokens: int = 128) -> dict:
    """transformers' generate with a static cache (which transformers compiles with CUDA graphs).

    Every padded batch of the sample has the same shape (left-padded to the longest prompt of
    the sample, the longest output of the sample), so one compile serves them all; each shape is
    warmed up outside the timed region by a generate that a stopping criterion ends early."""
    import transformers

    from kiln.runtime.presets import resolve_preset

    c = resolve_preset(cfg_name)
    hcfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=4096, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    out = {"transformers_version": transformers.__version__}
    gen = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.inference_mode():
        ids = torch.randint(1000, 30000, (1, 128), device="cuda")
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, stopping_criteria=_stop_after(4), **gen)
        torch.cuda.synchronize()
        out["baseline_warmup_s"] = round(time.perf_counter() - t, 1)
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, **gen)  # second warm-up: all graphs in place
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, **gen)
        torch.cuda.synchronize()
        out["baseline_decode_ms_per_token"] = round((time.perf_counter() - t) / decode_tokens * 1000, 3)
        sample = reqs[:128]
        width = max(len(p) for p, _ in sample)
        new = max(m for _, m in sample)
        batches = []
        for i in range(0, len(sample), batch):
            chunk = sample[i : i + batch]
            x = torch.zeros(batch, width, dtype=torch.long, device="cuda")
            mask = torch.zeros_like(x)
            for j, (p, _) in enumerate(chunk):  # left padding; a short last batch is padded with copies
                x[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            for j in range(len(chunk), batch):
                x[j], mask[j] = x[0], mask[0]
            batches.append((x, mask))
        t = time.perf_counter()
        model.generate(batches[0][0], attention_mask=batches[0][1], max_new_tokens=new, min_new_tokens=new,
                       stopping_criteria=_stop_after(4), **gen)
        torch.cuda.synchronize()
        out["baseline_batch_warmup_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        for x, mask in batches:
            model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    out["baseline_output_tokens_per_s"] = round(sum(m for _, m in sample) / wall, 1)
    out["baseline_generated_tokens_per_s"] = round(len(batches) * batch * new / wall, 1)
    out["baseline_sample_requests"] = len(sample)
    out["baseline_batch"] = batch
    out["baseline_padded_shape"] = [batch, width, new]
    del model
    torch.cuda.empty_cache()
    return out


def plot(path: str, rows: list[tuple[str, float, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [r[0] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], width=0.4, label="kiln")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], width=0.4, label="transformers")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_from_records(results: str, device: str) -> str:
    """Redraws gpu-throughput.png from the newest decode, offline and baseline records of a device."""
    import glob
    import json

    def newest(kind):
        paths = sorted(glob.glob(os.path.join(results, f"{kind}-{device}-*.json")))
        if not paths:
            raise SystemExit(f"no {kind} record for {device} in {results}")
        return json.load(open(paths[-1]))["metrics"]

    dec, off, base = newest("gpu-decode-batch1"), newest("gpu-offline-throughput"), newest("gpu-hf-baseline")
    path = os.path.join(results, "gpu-throughput.png")
    plot(path, [("offline (b)", off["output_tokens_per_s"], base["baseline_output_tokens_per_s"]),
                ("batch-1 decode", 1000 / dec["decode_ms_per_token"], 1000 / base["baseline_decode_ms_per_token"])])
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--engines", default="/tmp/kiln-engines")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--parts", default="abcd")
    ap.add_argument("--policy", default="guaranteed_no_evict")
    ap.add_argument("--plot-only", metavar="DEVICE", help="redraw the plot from this device's records "
                    "(its slug in record names, e.g. nvidia-h100-80gb-hbm3) and exit")
    a = ap.parse_args()
    if a.plot_only:
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        print(plot_from_records(os.environ.get("KILN_RESULTS_DIR", here), a.plot_only))
        return
    from kiln.runtime.engine import LLMEngine

    bw = copy_bandwidth()
    reqs = workload(a.requests)
    base = hf_baseline(a.model, reqs) if not a.skip_baseline and "c" in a.parts else {}
    if base:
        write_record("gpu-hf-baseline", a.model, {"dtype": "bfloat16", "cache": "static", "sample_requests": 128,
                     "workload": "requests 0-127 of (b)", "batch": base["baseline_batch"]}, base)
    if not set(a.parts) & set("abd"):
        return
    eng_dir = build_random_engine(a.model, os.path.join(a.engines, f"{a.model}-bf16"), dtype="bfloat16", device="cuda",
                                  max_batch_size=256, max_seq_len=4096, max_num_tokens=8192)
    t = time.time()
    engine = LLMEngine(eng_dir, scheduler_policy=a.policy)
    print(f"loaded in {time.time() - t:.1f} s (GEMV tuning and graph capture included)", flush=True)
    total, read = weight_bytes(engine)
    floor_ms = read / bw * 1000
    from kiln.kernels import gemv, triton_ops

    settings = {"dtype": "bfloat16", "max_batch_size": 256, "cuda_graphs": engine.executor.runner.graphs is not None,
                "async_scheduling": engine.async_scheduling, "scheduler_policy": engine.scheduler.policy,
                "gpu_memory_utilization": float(os.environ.get("KILN_GPU_MEMORY_UTILIZATION", "0.9")),
                "num_kv_blocks": engine.block_manager.num_blocks,
                "pdl": triton_ops.pdl(torch.empty(0, device="cuda")),
                "lm_head_in_graph": bool(engine.executor.runner.graphs is not None and engine.executor.runner.graphs.with_logits)}
    if "a" in a.parts:
        ms = decode_ms_per_token(engine)
        m = {"decode_ms_per_token": round(ms, 3), "bandwidth_floor_ms": round(floor_ms, 3), "ratio_to_floor": round(ms / floor_ms, 3),
             "copy_bandwidth_gb_s": round(bw / 1e9, 1), "weight_bytes": total, "weight_bytes_read_per_step": read,
             "step_gpu_ms": round(decode_ms_per_token.step_gpu_ms, 3), **decode_breakdown(engine),
             "gemv_table": [{k: r.get(k) for k in ("shape", "op", "choice", "us", "gb_s", "cublas_us")} for r in gemv.tuned_table()]}
        if base:
            m["baseline_decode_ms_per_token"] = base["baseline_decode_ms_per_token"]
            m["speedup_vs_baseline"] = round(base["baseline_decode_ms_per_token"] / ms, 2)
        write_record("gpu-decode-batch1", a.model, {**settings, "batch": 1, "prompt_tokens": 128}, m)
    if "b" in a.parts:
        m = offline_throughput(engine, reqs)
        if base:
            m.update({k: v for k, v in base.items() if k.startswith("baseline_") and "decode" not in k})
            m["speedup_vs_baseline"] = round(m["output_tokens_per_s"] / base["baseline_output_tokens_per_s"], 2)
        write_record("gpu-offline-throughput", a.model,
                     {**settings, "requests": len(reqs), "input_tokens": "uniform 128-2048", "output_tokens": "uniform 128-1024",
                      "ignore_eos": True, "outputs": "at finish, as LLM.generate (stream_outputs off)"}, m)
        if base:
            plot(os.path.join(os.environ.get("KILN_RESULTS_DIR", os.path.join(os.path.dirname(__file__), "results")),
                              "gpu-throughput.png"),
                 [("offline (b)", m["output_tokens_per_s"], base["baseline_output_tokens_per_s"]),
                  ("batch-1 decode", 1000 / ms if "a" in a.parts else 0, 1000 / base["baseline_decode_ms_per_token"])])
    if "d" in a.parts:
        write_record("gpu-ttft", a.model, {**settings, "prompt_tokens": 2048}, {"ttft_ms_p50": round(ttft_ms(engine), 2)})


if __name__ == "__main__":
    main()
