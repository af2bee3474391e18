"""Serving at engine speed: `kiln serve` against the engine's own `LLM.generate`, in one call.

The benchmark starts a fresh `kiln serve` on an engine directory (or builds a random-weight engine
first), drives it with the official `openai` client (streaming completions, `ignore_eos` through
`extra_body`, from several client processes so the client is never the bottleneck), and runs, in
this order on the one server:

1. fresh TTFT: the first request ever at each of five prompt lengths drawn at random (one per
   fifth of 100-4000 tokens), each followed by a second request of the same length (new tokens, so
   no prefix-cache hit), one output token each. Criterion: first <= 1.3 x second at every length
   (a kernel compiled on a request's path shows here).
2. batch-1: one streaming request at a time (200 prompt / 200 output tokens), a few times.
   Criterion: TPOT <= 1.05 x the engine's batch-1 decode time per token.
3. burst: 64 concurrent 200-token prompts arriving at once. Criterion: TTFT p50 <= 250 ms.
4. concurrent: 256 concurrent streams, 200 prompt / 200 output tokens. Criteria: output tokens/s
   >= 0.9 x `LLM.generate` on the same requests (``--engine-ratio``), TPOT p50 <= 1.15 x the
   engine's step time at that batch.
5. stall: 64 concurrent streams, then the same with one of them asking for something that may
   make the batch wait for the host (penalties, n=2, a grammar, min_tokens, logprobs, logit_bias):
   the other 63 streams' TPOT against the plain batch's (no criterion: the cost is the figure).
6. Poisson sweep: requests arriving as a Poisson process at several rates, prompt and output
   lengths log-normal (as the earlier serving records), throughput and TTFT/TPOT per rate.

7. engine stall (``--workloads engine_stall``, in this process, no server): the cost of one such
   request in a batch through ``LLM.generate`` with overlapped scheduling on: 64 plain greedy
   requests (200-token prompts, 200 output tokens, ignore_eos), then the same with one of them
   swapped for a penalties, an n=2 or a grammar request; each run's median decode step time while
   the special request is in the batch, over the plain run's, and the share of steps that were
   planned while the previous step was still on the device. The same runs without overlap give
   the reference. A run of this workload alone starts no server.

Then the server stops (freeing the device) and, with ``--engine-ratio``, the same requests of (2)
and (4) run through `LLM.generate` in this process; the engine's step time at the batch comes from
timing its steps there (without the flag, from the server's /metrics: the engine core's busy time
over its steps while the batch ran). One JSON record (benchmarks/record.py) holds every figure,
each criterion with its limit and pass/fail, and checks that /metrics and the structured logs
report from both the engine core and the API server.

    kiln bench serving --engine-ratio                         # GPU: llama-3-8b, random weights drawn at load
    kiln bench serving --engine engines/x --engine-ratio
    kiln bench serving --smoke --engine-ratio                 # CPU: small sizes, tiny-llama
    kiln bench serving --workloads engine_stall [--smoke]     # only the engine-side stall costs
    python benchmarks/bench_serving.py --workloads concurrent,batch1 --clients 64

TTFT is the time to the first streamed chunk; the server sends one for every step that produced
tokens, text or not (a random-weight engine's tokens are often outside its tokenizer's vocabulary).
TPOT is (last chunk - first chunk) / (completion tokens - 1) per request, the usage chunk's count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_clients import ClientPool, MetricsSampler, Server, cpu_busy, cpu_snapshot, http_get, process_roles  # noqa: E402

WORKLOADS = ("fresh_ttft", "batch1", "burst", "concurrent", "stall", "poisson")
ENGINE_WORKLOADS = ("engine_stall",)  # run through LLM.generate in this process; not in the default list
ENGINE_STALL_VARIANTS = ("penalties", "n2", "grammar")
STALL_VARIANTS = ("penalties", "n2", "grammar", "min_tokens", "logprobs", "logit_bias")
LIMITS = {  # criterion -> (op, limit)
    "throughput_vs_engine": (">=", 0.9),
    "tpot_vs_engine_step": ("<=", 1.15),
    "fresh_ttft_first_vs_second": ("<=", 1.3),
    "burst_ttft_p50_ms": ("<=", 250.0),
    "batch1_tpot_vs_engine_decode": ("<=", 1.05),
}


# ================================================================================================
# Workloads
# ================================================================================================
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _r(x, nd=2):
    return None if x is None else round(x, nd)


def tokens_range(vocab: int) -> tuple[int, int]:
    """Prompt token ids are drawn from here: clear of the lowest (special, byte) ids."""
    hi = min(vocab, 32000)
    return min(1000, hi // 4), hi


class Prompts:
    """Random prompts of token ids; every prompt starts with a fresh token sequence, so no two
    share a KV block (no prefix-cache hits between requests)."""

    def __init__(self, vocab: int, seed: int):
        self.lo, self.hi = tokens_range(vocab)
        self.rng = random.Random(seed)

    def make(self, n: int) -> list[int]:
        return [self.rng.randrange(self.lo, self.hi) for _ in range(n)]


def summarize(res: list[dict], start_at: float, *, include=None) -> dict:
    """Throughput and latency percentiles of a workload's request records (``include``: the
    indices that count; throughput still counts every request's tokens)."""
    chosen = [r for r in res if include is None or r["i"] in include]
    ok = [r for r in chosen if "error" not in r]
    errors = [r["error"] for r in chosen if "error" in r]
    all_ok = [r for r in res if "error" not in r]
    end = max((r["t_end"] for r in res), default=start_at)
    wall = max(1e-9, end - start_at)
    tokens = sum(r["tokens"] for r in all_ok)
    ttft = [(r["t_first"] - r["t_send"]) * 1000 for r in ok if r["t_first"] is not None]
    tpot = [(r["t_last"] - r["t_first"]) / (r["tokens"] - 1) * 1000 for r in ok
            if r["t_first"] is not None and r["tokens"] > 1]
    lat = [(r["t_end"] - r["t_send"]) for r in ok]
    gaps = [g * 1000 for r in ok for g in r.get("gaps", ())]
    chunks = sum(r["chunks"] for r in ok)
    out = {
        "requests": len(chosen), "completed": len(ok), "errors": len(errors),
        "output_tokens": tokens, "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": _r(pct(ttft, 50)), "ttft_ms_p99": _r(pct(ttft, 99)), "ttft_ms_mean": _r(statistics.fmean(ttft) if ttft else None),
        "tpot_ms_p50": _r(pct(tpot, 50), 3), "tpot_ms_p99": _r(pct(tpot, 99), 3),
        "latency_s_p50": _r(pct(lat, 50), 3),
        "chunks_per_token": _r(chunks / sum(r["tokens"] for r in ok), 3) if ok and sum(r["tokens"] for r in ok) else None,
        "finish_reasons": sorted({f for r in ok for f in r["finish"]}),
    }
    if gaps:
        out["itl_ms_p50"] = _r(pct(gaps, 50), 3)
        out["itl_ms_p99"] = _r(pct(gaps, 99), 3)
    if errors:
        out["error_examples"] = sorted(set(errors))[:3]
    return out


def _req(prompt: list[int], max_tokens: int, at: float = 0.0, temperature: float = 0.0, **more) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "at": at, "temperature": temperature, **more}


def ttft_lengths(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """``n`` lengths, one drawn uniformly from each of ``n`` equal parts of [lo, hi]."""
    edges = [lo + (hi - lo) * k / n for k in range(n + 1)]
    return [rng.randint(int(math.ceil(edges[k])), int(edges[k + 1])) for k in range(n)]


def run_fresh_ttft(pool, url, model, prompts: Prompts, lengths: list[int], temperature: float) -> dict:
    first, second = [], []
    for n in lengths:
        for bucket in (first, second):
            (r,), _ = pool.run(url, model, [_req(prompts.make(n), 1, temperature=temperature)])
            if "error" in r or r["t_first"] is None:
                raise RuntimeError(f"fresh-TTFT request of {n} tokens failed: {r.get('error')}")
            bucket.append((r["t_first"] - r["t_send"]) * 1000)
    ratios = [a / b for a, b in zip(first, second)]
    return {"lengths": lengths, "first_ms": [round(x, 2) for x in first], "second_ms": [round(x, 2) for x in second],
            "ratios": [round(x, 3) for x in ratios], "max_ratio": round(max(ratios), 3)}


def run_concurrent(pool, server, url, model, prompts: Prompts, clients: int, prompt_len: int, out_len: int,
                   temperature: float, gaps: bool = True) -> tuple[dict, list[tuple[list[int], int]]]:
    reqs = [(prompts.make(prompt_len), out_len) for _ in range(clients)]
    roles = process_roles(server.proc.pid, [p.pid for p in pool.procs])
    c0, t = cpu_snapshot(roles), time.monotonic()
    with MetricsSampler(server) as ms:
        res, t0 = pool.run(url, model, [_req(p, o, temperature=temperature) for p, o in reqs], gaps=gaps)
    busy = cpu_busy(c0, cpu_snapshot(roles), time.monotonic() - t)
    return {**summarize(res, t0), **ms.step_ms(clients), "clients": clients, "host_ms_per_step": ms.host_ms_per_step(),
            "cpu_busy": busy}, reqs


def run_batch1(pool, server, url, model, prompts: Prompts, prompt_len: int, out_len: int, runs: int,
               temperature: float) -> tuple[dict, list[tuple[list[int], int]]]:
    rows, reqs = [], []
    with MetricsSampler(server, every_s=0.1) as ms:
        for _ in range(runs):
            p = prompts.make(prompt_len)
            reqs.append((p, out_len))
            res, t0 = pool.run(url, model, [_req(p, out_len, temperature=temperature)], gaps=True)
            rows.append(summarize(res, t0))
    bad = [r for r in rows if r["errors"]]
    if bad:
        raise RuntimeError(f"batch-1 request failed: {bad[0].get('error_examples')}")
    tpots = [r["tpot_ms_p50"] for r in rows]
    return {"runs": runs, "tpot_ms_runs": tpots, "tpot_ms": _r(statistics.median(tpots), 3),
            "ttft_ms_runs": [r["ttft_ms_p50"] for r in rows], "itl_ms_p50": rows[-1].get("itl_ms_p50"),
            "chunks_per_token": rows[-1]["chunks_per_token"], **ms.step_ms(1)}, reqs


def burst_procs(clients: int, base: int) -> int:
    """Client processes of the burst: one per 4 clients, at most 16 and the CPU count, at least
    ``base``. The openai client spends a few milliseconds of CPU turning each token-id prompt into
    its request (5 ms for 200 ids on a 2-core machine), so 64 users packed into few processes
    would leave one after another instead of at once. Its own pool: more processes beside the
    server during the 256-stream workload take CPU from it."""
    return max(base, min(16, os.cpu_count() or 1, -(-clients // 4)))


def run_burst(pool, server, url, model, prompts: Prompts, clients: int, prompt_len: int, out_len: int,
              temperature: float) -> dict:
    n = burst_procs(clients, len(pool.procs))
    own = ClientPool(n) if n > len(pool.procs) else None
    try:
        if own is not None:
            own.warm(url)
        m0 = server.metrics()
        res, t0 = (own or pool).run(url, model, [_req(prompts.make(prompt_len), out_len, temperature=temperature)
                                                 for _ in range(clients)])
        m1 = server.metrics()
    finally:
        if own is not None:
            own.close()
    key = "kiln_engine_gathered_steps_total"
    ttft_s = m1.get("kiln_time_to_first_token_seconds_sum", 0) - m0.get("kiln_time_to_first_token_seconds_sum", 0)
    ttft_n = m1.get("kiln_time_to_first_token_seconds_count", 0) - m0.get("kiln_time_to_first_token_seconds_count", 0)
    sends = [r["t_send"] for r in res]
    return {**summarize(res, t0), "clients": clients, "engine_steps": int(m1.get("kiln_engine_steps", 0) - m0.get("kiln_engine_steps", 0)),
            "gathered_steps": int(m1.get(key, 0) - m0.get(key, 0)),
            # the engine's own TTFT (its arrival to its first token) and how long the clients took to send them all
            "engine_ttft_ms_mean": _r(ttft_s / ttft_n * 1000) if ttft_n else None,
            "send_spread_ms": _r((max(sends) - min(sends)) * 1000), "client_procs": n}


def stall_special(variant: str, vocab: int, out_len: int) -> dict:
    """The request fields of one stall variant (openai kwargs, extra_body)."""
    lo, hi = tokens_range(vocab)
    if variant == "penalties":
        return {"kwargs": {"presence_penalty": 0.5, "frequency_penalty": 0.5}, "extra": {"repetition_penalty": 1.1}}
    if variant == "n2":
        return {"kwargs": {"n": 2}}
    if variant == "grammar":
        return {"extra": {"response_format": {"type": "json_object"}}}
    if variant == "min_tokens":
        return {"extra": {"min_tokens": out_len}}
    if variant == "logprobs":
        return {"kwargs": {"logprobs": 5}}
    if variant == "logit_bias":
        return {"kwargs": {"logit_bias": {str(lo + k): -2.0 for k in range(8)}}}
    raise ValueError(f"unknown stall variant {variant!r}: use {', '.join(STALL_VARIANTS)}")


def run_stall(pool, url, model, prompts: Prompts, batch: int, prompt_len: int, out_len: int, variants: list[str],
              vocab: int, temperature: float) -> dict:
    base_res, t0 = pool.run(url, model, [_req(prompts.make(prompt_len), out_len, temperature=temperature) for _ in range(batch)])
    base = summarize(base_res, t0)
    out = {"batch": batch, "prompt_tokens": prompt_len, "output_tokens": out_len,
           "baseline": {k: base[k] for k in ("tpot_ms_p50", "tpot_ms_p99", "output_tokens_per_s", "errors")}, "variants": {}}
    others = set(range(1, batch))
    for v in variants:
        reqs = [_req(prompts.make(prompt_len), out_len, temperature=temperature) for _ in range(batch)]
        reqs[0].update(stall_special(v, vocab, out_len))
        res, t0 = pool.run(url, model, reqs)
        s = summarize(res, t0, include=others)
        special = res[0]
        served = special.get("error") is None
        row = {"others_tpot_ms_p50": s["tpot_ms_p50"], "others_tpot_ms_p99": s["tpot_ms_p99"],
               "others_errors": s["errors"], "output_tokens_per_s": s["output_tokens_per_s"],
               # a refused special request leaves a plain batch one smaller: no cost to report
               "others_tpot_vs_plain": _r(s["tpot_ms_p50"] / base["tpot_ms_p50"], 3)
               if served and s["tpot_ms_p50"] and base["tpot_ms_p50"] else None,
               "special_tokens": special["tokens"], "special_error": special.get("error")}
        if special.get("error") is None and special["t_first"] is not None and special["tokens"] > 1 and v != "n2":
            row["special_tpot_ms"] = _r((special["t_last"] - special["t_first"]) / (special["tokens"] - 1) * 1000, 3)
        out["variants"][v] = row
    return out


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def poisson_requests(prompts: Prompts, n: int, rate: float, prompt_median: int, output_median: int, max_seq_len: int,
                     rng: random.Random, temperature: float) -> list[dict]:
    reqs, at = [], 0.0
    for _ in range(n):
        p = lognormal_int(rng, prompt_median, 0.8, 8, min(prompt_median * 8, max_seq_len // 2))
        o = lognormal_int(rng, output_median, 0.6, 4, min(output_median * 6, max_seq_len - p - 1))
        reqs.append(_req(prompts.make(p), o, at=at, temperature=temperature))
        if math.isfinite(rate):
            at += rng.expovariate(rate)
    return reqs


def run_poisson(pool, url, model, prompts: Prompts, rates: list[float], n: int, prompt_median: int, output_median: int,
                max_seq_len: int, seed: int, temperature: float) -> list[dict]:
    rows = []
    for k, rate in enumerate(rates):
        reqs = poisson_requests(prompts, n, rate, prompt_median, output_median, max_seq_len, random.Random(seed + 100 + k),
                                temperature)
        res, t0 = pool.run(url, model, reqs)
        s = summarize(res, t0)
        row = {"rate_req_s": rate if math.isfinite(rate) else "inf",
               **{k2: s[k2] for k2 in ("completed", "errors", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99",
                                       "tpot_ms_p50", "tpot_ms_p99", "latency_s_p50")}}
        print(f"  poisson {row}", flush=True)
        rows.append(row)
    return rows


# ================================================================================================
# The engine's own speed: LLM.generate on the same requests, in this process
# ================================================================================================
class StepTimer:
    """Times each ``LLMEngine.step`` of an ``LLM`` with the batch it ran: running and waiting
    counts before the step, and whether every running sequence had at most one token to run."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: list[tuple[bool, int, float]] = []
        self._orig = engine.step
        engine.step = self._step

    def _step(self):
        sch = self.engine.scheduler
        running = sch.running
        decode = not sch.waiting and all(s.uncomputed <= 1 for s in running)
        n = len(running)
        t = time.perf_counter()
        out = self._orig()
        self.steps.append((decode, n, time.perf_counter() - t))
        return out

    def decode_ms(self, batch: int) -> tuple[float | None, int]:
        xs = [s for d, n, s in self.steps if d and n == batch]
        return (round(statistics.median(xs) * 1000, 3) if xs else None), len(xs)


def engine_side(outs) -> dict:
    ttft = [(o.metrics["first_token"] - o.metrics["arrival"]) * 1000 for o in outs if "first_token" in o.metrics]
    tpot = [(o.metrics["finish"] - o.metrics["first_token"]) / (len(o.outputs[0].token_ids) - 1) * 1000
            for o in outs if "first_token" in o.metrics and "finish" in o.metrics and len(o.outputs[0].token_ids) > 1]
    return {"ttft_ms_p50": _r(pct(ttft, 50)), "tpot_ms_p50": _r(pct(tpot, 50), 3)}


def run_engine(engine_dir: str, concurrent_reqs, batch1_reqs, temperature: float) -> dict:
    from kiln.runtime import LLM, SamplingParams

    t = time.monotonic()
    llm = LLM(engine_dir)
    out: dict = {"load_s": round(time.monotonic() - t, 1)}
    timer = StepTimer(llm.engine)
    sp = lambda m: SamplingParams(max_tokens=m, temperature=temperature, ignore_eos=True)  # noqa: E731
    try:
        warm = (concurrent_reqs or batch1_reqs)[0][0]
        llm.generate([warm[: max(1, len(warm) // 2)]], sp(4))
        if concurrent_reqs:
            timer.steps.clear()
            h0, n0 = dict(llm.engine.stats().get("host_s", {})), llm.engine.num_steps
            t = time.perf_counter()
            outs = llm.generate([p for p, _ in concurrent_reqs], [sp(o) for _, o in concurrent_reqs])
            wall = time.perf_counter() - t
            h1, n1 = llm.engine.stats().get("host_s", {}), llm.engine.num_steps
            host = {"steps": n1 - n0, **{k: round((v - h0.get(k, 0.0)) / max(1, n1 - n0) * 1000, 3) for k, v in h1.items()}}
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            step, n = timer.decode_ms(len(concurrent_reqs))
            out["concurrent"] = {"output_tokens": tokens, "wall_s": round(wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
                                 "step_ms_at_batch": step, "steps_at_batch": n, "batch": len(concurrent_reqs), **engine_side(outs),
                                 "host_ms_per_step": host}
        if batch1_reqs:
            tpots, steps = [], []
            for p, o in batch1_reqs:
                timer.steps.clear()
                (res,) = llm.generate([p], sp(o))
                tpots.append(engine_side([res])["tpot_ms_p50"])
                steps.append(timer.decode_ms(1)[0])
            out["batch1"] = {"tpot_ms_runs": tpots, "decode_ms_per_token": _r(statistics.median(tpots), 3),
                             "step_ms_p50": _r(statistics.median([s for s in steps if s is not None]), 3) if any(steps) else None}
        out["async_scheduling"] = bool(getattr(llm.engine, "async_scheduling", False))
    finally:
        llm.shutdown()
        del llm
    return out


def engine_stall_params(variant: str, out_len: int):
    """The SamplingParams of one engine-stall request (greedy, ``out_len`` tokens)."""
    from kiln.runtime import SamplingParams

    base = dict(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    if variant == "plain":
        return SamplingParams(**base)
    if variant == "penalties":
        return SamplingParams(**base, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5)
    if variant == "n2":
        return SamplingParams(**base, n=2)
    if variant == "grammar":
        # A JSON string far longer than the output: the request stays under the grammar (and in the
        # batch) for all its tokens whatever a random-weight model picks.
        schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100 * out_len}}, "required": ["text"]}
        return SamplingParams(**base, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    raise ValueError(f"unknown engine stall variant {variant!r}: use {', '.join(ENGINE_STALL_VARIANTS)}")


def run_engine_stall(engine_dir: str, prompts: Prompts, batch: int, prompt_len: int, out_len: int,
                     variants: list[str]) -> dict:
    """``batch`` plain greedy requests through LLM.generate, then the same with the first swapped
    for each variant, with overlapped scheduling on and off: per run, the median step time over
    decode steps with the whole batch in (for a variant, while its request is running) and the
    share of launched steps that overlapped; each variant's step time over the plain run's."""
    from kiln.runtime import LLM

    reqs = [prompts.make(prompt_len) for _ in range(batch)]
    out: dict = {"batch": batch, "prompt_tokens": prompt_len, "output_tokens": out_len, "variants": list(variants)}
    for mode, overlap in (("overlap", True), ("sync", False)):
        t = time.monotonic()
        llm = LLM(engine_dir, async_scheduling=overlap)
        eng = llm.engine
        rows: dict = {"load_s": round(time.monotonic() - t, 1), "async_scheduling": eng.async_scheduling}
        steps: list[tuple[bool, float]] = []
        special = {"params": None}
        orig = eng.step

        def timed_step():
            sch = eng.scheduler
            full = not sch.waiting and len(sch.running) >= batch and all(s.uncomputed <= 1 for s in sch.running)
            sp = special["params"]
            if sp is not None:
                full = full and any(s.request.params is sp for s in sch.running)
            t0 = time.perf_counter()
            res = orig()
            steps.append((full, time.perf_counter() - t0))
            return res

        eng.step = timed_step
        try:
            llm.generate([reqs[0][: max(1, prompt_len // 2)]], engine_stall_params("plain", 4))  # warm-up
            for v in ("plain", *variants):
                params = [engine_stall_params("plain", out_len) for _ in range(batch)]
                try:
                    params[0] = engine_stall_params(v, out_len)
                except Exception as e:  # noqa: BLE001 - a variant this engine cannot serve is reported, not fatal
                    rows[v] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                special["params"] = params[0] if v != "plain" else None
                steps.clear()
                o0, s0 = eng.overlapped_steps, eng.synced_steps
                t0 = time.perf_counter()
                try:
                    outs = llm.generate(reqs, params)
                except Exception as e:  # noqa: BLE001
                    rows[v] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                wall = time.perf_counter() - t0
                full = [dt for f, dt in steps if f]
                o, sy = eng.overlapped_steps - o0, eng.synced_steps - s0
                rows[v] = {
                    "step_ms_p50": _r(statistics.median(full) * 1000, 3) if full else None, "steps_timed": len(full),
                    "steps": len(steps), "wall_s": round(wall, 3),
                    "overlapped_share": _r(o / (o + sy), 3) if o + sy else None,
                    "special_tokens": [len(c.token_ids) for c in outs[0].outputs],
                    "special_finish": [c.finish_reason for c in outs[0].outputs],
                }
            plain = rows.get("plain", {}).get("step_ms_p50")
            for v in variants:
                r = rows.get(v, {})
                if plain and r.get("step_ms_p50"):
                    r["step_vs_plain"] = _r(r["step_ms_p50"] / plain, 3)
        finally:
            eng.step = orig
            llm.shutdown()
            del llm, eng
        out[mode] = rows
    return out


# ================================================================================================
# Criteria, checks, the record
# ================================================================================================
def criterion(name: str, value, what: str, source: str | None = None, errors: int = 0) -> dict:
    """One criterion's row; requests that failed in its workload fail it whatever the figure."""
    op, limit = LIMITS[name]
    ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
    if errors:
        ok = False
    row = {"value": None if value is None else round(value, 4), "op": op, "limit": limit, "pass": ok, "what": what}
    if source:
        row["reference"] = source
    if errors:
        row["failed_requests"] = errors
    return row


def server_checks(final_metrics: dict, log_text: str) -> dict:
    """/metrics and the logs under the split: figures from the engine core (steps, busy time)
    and from the API server (token counts, latency histograms); log lines of each process."""
    procs = sorted({tok[5:] for line in log_text.splitlines() for tok in line.split() if tok.startswith("proc=")})
    return {
        "metrics_from_core": final_metrics.get("kiln_engine_steps", 0) > 0 and
                             final_metrics.get("kiln_engine_busy_seconds_total", 0) > 0,
        "metrics_from_api_server": final_metrics.get("kiln_generation_tokens_total", 0) > 0 and
                                   final_metrics.get("kiln_time_to_first_token_seconds_count", 0) > 0,
        "engine_steps": final_metrics.get("kiln_engine_steps"),
        "engine_busy_s": _r(final_metrics.get("kiln_engine_busy_seconds_total"), 3),
        "generation_tokens": final_metrics.get("kiln_generation_tokens_total"),
        "preemptions": final_metrics.get("kiln_preemptions_total"),
        "log_procs": procs,
        "logs_from_core_and_api": "core" in procs and any(p.startswith("api") for p in procs),
    }


def engine_settings(engine_dir: str) -> dict:
    cfg = json.load(open(os.path.join(engine_dir, "engine.json")))
    b = cfg.get("build", {})
    return {"model": cfg.get("model_name") or os.path.basename(os.path.normpath(engine_dir)),
            "vocab_size": int(cfg["model"]["vocab_size"]), "dtype": b.get("dtype"), "max_seq_len": int(b.get("max_seq_len", 2048)),
            "max_batch_size": b.get("max_batch_size"), "max_num_tokens": b.get("max_num_tokens"),
            "quant": b.get("quant"), "kv_cache_dtype": b.get("kv_cache_dtype"), "tp": b.get("tp"), "pp": b.get("pp"),
            "weights_at_load": cfg.get("random_weights_seed") is not None}


def resolve_engine(a) -> str:
    if a.engine:
        if not os.path.exists(os.path.join(a.engine, "engine.json")):
            raise SystemExit(f"bench serving: {a.engine} holds no engine.json: build one with `kiln build`")
        return a.engine
    from record import build_random_engine

    import torch

    cuda = torch.cuda.is_available()
    model = a.model or ("llama-3-8b" if cuda else "tiny-llama")
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    dev = "cuda" if cuda else "cpu"
    out = os.path.join(a.engines, f"{model}-{dtype}-{dev}-serving-b{a.build_max_batch_size}-s{a.build_max_seq_len}")
    return build_random_engine(model, out, dtype=dtype, device=dev, max_batch_size=a.build_max_batch_size,
                               max_seq_len=a.build_max_seq_len, max_num_tokens=a.build_max_num_tokens, at_load=True)


SMOKE = dict(clients=8, prompt_len=32, output_len=16, ttft_min=16, ttft_max=400, burst_clients=8, burst_prompt_len=32,
             burst_output_len=4, batch1_runs=2, stall_batch=4, stall_output_len=12, rates="16,inf", poisson_requests=8,
             poisson_prompt_median=32, poisson_output_median=8, stall_variants="penalties,n2,min_tokens,logprobs,logit_bias")
DEFAULTS = dict(clients=256, prompt_len=200, output_len=200, ttft_min=100, ttft_max=4000, burst_clients=64, burst_prompt_len=200,
                burst_output_len=32, batch1_runs=3, stall_batch=64, stall_output_len=200, rates="4,8,16,32", poisson_requests=128,
                poisson_prompt_median=256, poisson_output_median=128, stall_variants=",".join(STALL_VARIANTS))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default=None, help="engine directory (default: build a random-weight engine of --model)")
    ap.add_argument("--model", default=None, help="random-weight model to build without --engine (default: llama-3-8b on a "
                    "GPU, tiny-llama on a CPU); weights are drawn at load")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--engines", default=os.environ.get("KILN_ENGINES", "/tmp/kiln-engines"), help="where to build it")
    ap.add_argument("--build-max-batch-size", type=int, default=256)
    ap.add_argument("--build-max-seq-len", type=int, default=4096)
    ap.add_argument("--build-max-num-tokens", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="small sizes for every workload (a CPU check of the benchmark)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS + ENGINE_WORKLOADS)}")
    ap.add_argument("--engine-stall-variants", default=",".join(ENGINE_STALL_VARIANTS),
                    help=f"comma-separated subset of {','.join(ENGINE_STALL_VARIANTS)} (engine_stall workload)")
    ap.add_argument("--engine-ratio", action="store_true",
                    help="after the server stops, run the concurrent and batch-1 requests through LLM.generate here")
    ap.add_argument("--api-server-count", type=int, default=1)
    ap.add_argument("--client-procs", type=int, default=None, help="client processes (default: a quarter of the CPUs, 1-8)")
    ap.add_argument("--clients", type=int, help="concurrent streams of the concurrent workload (256)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens of the concurrent, batch-1 and stall requests (200)")
    ap.add_argument("--output-len", type=int, help="output tokens of the concurrent and batch-1 requests (200)")
    ap.add_argument("--ttft-lengths", default=None, help="comma-separated prompt lengths for fresh TTFT (default: five at random)")
    ap.add_argument("--ttft-min", type=int)
    ap.add_argument("--ttft-max", type=int)
    ap.add_argument("--burst-clients", type=int)
    ap.add_argument("--burst-prompt-len", type=int)
    ap.add_argument("--burst-output-len", type=int)
    ap.add_argument("--batch1-runs", type=int)
    ap.add_argument("--stall-batch", type=int)
    ap.add_argument("--stall-output-len", type=int)
    ap.add_argument("--stall-variants", default=None, help=f"comma-separated subset of {','.join(STALL_VARIANTS)}")
    ap.add_argument("--rates", default=None, help="Poisson arrival rates in requests/s ('inf': all at once)")
    ap.add_argument("--poisson-requests", type=int, help="requests per rate")
    ap.add_argument("--poisson-prompt-median", type=int)
    ap.add_argument("--poisson-output-median", type=int)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals (fresh-TTFT lengths are drawn "
                    "from the system's randomness unless --ttft-lengths)")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more argument for kiln serve (repeatable)")
    ap.add_argument("--server-log", default=None, help="keep kiln serve's output here")
    ap.add_argument("--health-timeout", type=float, default=900.0)
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    base = SMOKE if a.smoke else DEFAULTS
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in a.workloads if w not in WORKLOADS + ENGINE_WORKLOADS]
    if bad:
        ap.error(f"unknown workloads {bad}: use {','.join(WORKLOADS + ENGINE_WORKLOADS)}")
    a.engine_stall_variants = [v.strip() for v in a.engine_stall_variants.split(",") if v.strip()]
    bad = [v for v in a.engine_stall_variants if v not in ENGINE_STALL_VARIANTS]
    if bad:
        ap.error(f"unknown engine stall variants {bad}: use {','.join(ENGINE_STALL_VARIANTS)}")
    a.stall_variants = [v.strip() for v in a.stall_variants.split(",") if v.strip()]
    bad = [v for v in a.stall_variants if v not in STALL_VARIANTS]
    if bad:
        ap.error(f"unknown stall variants {bad}: use {','.join(STALL_VARIANTS)}")
    if a.client_procs is None:
        a.client_procs = max(1, min(8, (os.cpu_count() or 4) // 4))
    return a


def plot(path: str, rows: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in rows if r["rate_req_s"] != "inf"]
    if not rows:
        return
    rates = [r["rate_req_s"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    ax[0].plot(rates, [r["output_tokens_per_s"] for r in rows], "o-")
    ax[0].set_title("output tokens/s")
    for i, key in ((1, "ttft"), (2, "tpot")):
        ax[i].plot(rates, [r[f"{key}_ms_p50"] for r in rows], "o-", label="p50")
        ax[i].plot(rates, [r[f"{key}_ms_p99"] for r in rows], "o--", label="p99")
        ax[i].set_title(f"{key.upper()} (ms)")
        ax[i].legend()
    for x in ax:
        x.set_xlabel("arrival rate (req/s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    engine_dir = resolve_engine(a)
    es = engine_settings(engine_dir)
    max_seq = es["max_seq_len"]
    model_name = a.model or es["model"]
    if a.ttft_lengths:
        lengths = [int(x) for x in a.ttft_lengths.split(",")]
    else:
        lengths = ttft_lengths(5, a.ttft_min, min(a.ttft_max, max_seq - 2), random.Random(int.from_bytes(os.urandom(8), "little")))
    if any(n + 1 >= max_seq for n in lengths) or a.prompt_len + a.output_len > max_seq or a.burst_prompt_len + a.burst_output_len > max_seq:
        raise SystemExit(f"bench serving: the engine's max_seq_len {max_seq} is too short for these prompt and output lengths")
    prompts = Prompts(es["vocab_size"], a.seed)
    log_path = a.server_log or os.path.join(tempfile.mkdtemp(prefix="kiln-bench-serving-"), "serve.log")
    metrics: dict = {}
    concurrent_reqs = batch1_reqs = None

    if any(w in WORKLOADS for w in a.workloads):  # the server's part
        t = time.monotonic()
        pool = ClientPool(a.client_procs)
        server = Server(engine_dir, log_path, a.api_server_count, a.serve_arg)
        try:
            timings["server_start_s"] = round(server.wait_healthy(a.health_timeout), 1)
            status, body = http_get(server.url + "/v1/models")
            model = json.loads(body)["data"][0]["id"]
            url = server.url
            pool.warm(url)  # the clients' own first-connection costs are not the server's
            print(f"kiln serve up in {timings['server_start_s']} s at {url} (log {log_path})", flush=True)

            def phase(name, fn):
                t0 = time.monotonic()
                r = fn()
                timings[f"{name}_s"] = round(time.monotonic() - t0, 1)
                shown = {k: v for k, v in r.items() if not isinstance(v, (list, dict))} if isinstance(r, dict) else r
                print(f"{name}: {shown}", flush=True)
                return r

            if "fresh_ttft" in a.workloads:  # first: nothing else may reach the server before it
                metrics["fresh_ttft"] = phase("fresh_ttft", lambda: run_fresh_ttft(pool, url, model, prompts, lengths, a.temperature))
                print(f"  lengths {lengths} first {metrics['fresh_ttft']['first_ms']} second {metrics['fresh_ttft']['second_ms']}")
            if "batch1" in a.workloads:
                def b1():
                    nonlocal batch1_reqs
                    r, batch1_reqs = run_batch1(pool, server, url, model, prompts, a.prompt_len, a.output_len, a.batch1_runs, a.temperature)
                    return r
                metrics["batch1"] = phase("batch1", b1)
            if "burst" in a.workloads:
                metrics["burst"] = phase("burst", lambda: run_burst(pool, server, url, model, prompts, a.burst_clients,
                                                                    a.burst_prompt_len, a.burst_output_len, a.temperature))
            if "concurrent" in a.workloads:
                def conc():
                    nonlocal concurrent_reqs
                    r, concurrent_reqs = run_concurrent(pool, server, url, model, prompts, a.clients, a.prompt_len, a.output_len,
                                                        a.temperature)
                    return r
                metrics["concurrent"] = phase("concurrent", conc)
            if "stall" in a.workloads:
                metrics["stall"] = phase("stall", lambda: run_stall(pool, url, model, prompts, a.stall_batch, a.prompt_len,
                                                                    a.stall_output_len, a.stall_variants, es["vocab_size"],
                                                                    a.temperature))
                for v, row in metrics["stall"]["variants"].items():
                    print(f"  stall {v}: {row}")
            if "poisson" in a.workloads:
                rates = [float(r) for r in a.rates.split(",")]
                metrics["per_rate"] = phase("poisson", lambda: {"rows": run_poisson(
                    pool, url, model, prompts, rates, a.poisson_requests, a.poisson_prompt_median, a.poisson_output_median,
                    max_seq, a.seed, a.temperature)})["rows"]
            final = server.metrics()
        finally:
            pool.close()
            rc = server.stop()
        timings["server_phase_s"] = round(time.monotonic() - t, 1)
        with open(log_path) as f:
            log_text = f.read()
        checks = server_checks(final, log_text)
        checks["serve_exit_status"] = rc
        metrics["server_checks"] = checks

    if a.engine_ratio and (concurrent_reqs or batch1_reqs):
        t = time.monotonic()
        metrics["engine"] = run_engine(engine_dir, concurrent_reqs, batch1_reqs, a.temperature)
        timings["engine_s"] = round(time.monotonic() - t, 1)
        print(f"engine (LLM.generate): {metrics['engine']}", flush=True)

    if "engine_stall" in a.workloads:
        t = time.monotonic()
        metrics["engine_stall"] = run_engine_stall(engine_dir, Prompts(es["vocab_size"], a.seed + 1), a.stall_batch,
                                                   a.prompt_len, a.stall_output_len, a.engine_stall_variants)
        timings["engine_stall_s"] = round(time.monotonic() - t, 1)
        for mode in ("overlap", "sync"):
            for v, row in metrics["engine_stall"][mode].items():
                print(f"  engine stall {mode} {v}: {row}", flush=True)

    # --- the headline figures and the criteria ---------------------------------------------------
    eng = metrics.get("engine", {})
    crit = {}
    conc = metrics.get("concurrent")
    if conc:
        metrics.update({k: conc[k] for k in ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")})
        ec = eng.get("concurrent")
        if ec:
            metrics["engine_output_tokens_per_s"] = ec["output_tokens_per_s"]
            metrics["server_to_engine_ratio"] = round(conc["output_tokens_per_s"] / ec["output_tokens_per_s"], 4)
        crit["throughput_vs_engine"] = criterion(
            "throughput_vs_engine", metrics.get("server_to_engine_ratio"),
            f"server output tok/s over LLM.generate's, {conc['clients']} streams of {a.prompt_len}/{a.output_len} tokens",
            errors=conc["errors"])
        step, source = (ec.get("step_ms_at_batch"), "LLM.generate") if ec and ec.get("step_ms_at_batch") else \
            (conc.get("server_step_ms_p50"), "server /metrics")
        metrics["engine_step_ms_at_batch"] = step
        metrics["engine_step_ms_source"] = source if step else None
        ratio = conc["tpot_ms_p50"] / step if step and conc["tpot_ms_p50"] else None
        crit["tpot_vs_engine_step"] = criterion("tpot_vs_engine_step", ratio,
                                                f"TPOT p50 over the engine's step time at batch {conc['clients']}", source,
                                                errors=conc["errors"])
    ft = metrics.get("fresh_ttft")
    if ft:
        crit["fresh_ttft_first_vs_second"] = criterion(
            "fresh_ttft_first_vs_second", ft["max_ratio"],
            f"worst first/second TTFT on a fresh server over prompt lengths {ft['lengths']}")
    bu = metrics.get("burst")
    if bu:
        crit["burst_ttft_p50_ms"] = criterion("burst_ttft_p50_ms", bu["ttft_ms_p50"],
                                              f"TTFT p50 of {bu['clients']} concurrent {a.burst_prompt_len}-token prompts at once",
                                              errors=bu["errors"])
    b1 = metrics.get("batch1")
    if b1:
        eb = eng.get("batch1")
        ref, source = (eb["decode_ms_per_token"], "LLM.generate") if eb and eb.get("decode_ms_per_token") else \
            (b1.get("server_step_ms_p50"), "server /metrics")
        b1["engine_decode_ms_per_token"] = ref
        crit["batch1_tpot_vs_engine_decode"] = criterion(
            "batch1_tpot_vs_engine_decode", b1["tpot_ms"] / ref if ref and b1["tpot_ms"] else None,
            "batch-1 streaming TPOT over the engine's batch-1 decode time per token", source)
    metrics["criteria"] = crit
    decided = [c["pass"] for c in crit.values() if c["pass"] is not None]
    metrics["all_pass"] = all(decided) if decided and len(decided) == len(crit) else None
    timings["total_s"] = round(time.monotonic() - t_all, 1)
    metrics["timings"] = timings

    settings = {
        "engine": os.path.basename(os.path.normpath(engine_dir)), **{k: v for k, v in es.items() if k != "model"},
        "workloads": a.workloads, "smoke": a.smoke, "engine_ratio": a.engine_ratio, "api_server_count": a.api_server_count,
        "client_procs": a.client_procs, "client": "openai streaming completions, ignore_eos via extra_body; each client process lists the models once before the workloads",
        "temperature": a.temperature, "seed": a.seed,
        "concurrent": {"clients": a.clients, "prompt_tokens": a.prompt_len, "output_tokens": a.output_len},
        "fresh_ttft": {"lengths": lengths, "output_tokens": 1, "range": [a.ttft_min, a.ttft_max]},
        "burst": {"clients": a.burst_clients, "prompt_tokens": a.burst_prompt_len, "output_tokens": a.burst_output_len},
        "batch1": {"runs": a.batch1_runs, "prompt_tokens": a.prompt_len, "output_tokens": a.output_len},
        "stall": {"batch": a.stall_batch, "prompt_tokens": a.prompt_len, "output_tokens": a.stall_output_len,
                  "variants": a.stall_variants},
        "poisson": {"rates_req_s": a.rates, "requests_per_rate": a.poisson_requests,
                    "prompt_tokens": f"log-normal, median {a.poisson_prompt_median}, sigma 0.8",
                    "output_tokens": f"log-normal, median {a.poisson_output_median}, sigma 0.6, ignore_eos"},
        "serve_args": a.serve_arg,
        "engine_stall": {"batch": a.stall_batch, "prompt_tokens": a.prompt_len, "output_tokens": a.stall_output_len,
                         "variants": a.engine_stall_variants, "greedy": True, "ignore_eos": True},
    }
    from record import RESULTS, write_record

    path = write_record("serving", model_name, settings, metrics)
    for name, c in crit.items():
        print(f"{'PASS' if c['pass'] else 'FAIL' if c['pass'] is False else 'n/a '} {name}: {c['value']} {c['op']} {c['limit']}")
    if metrics.get("per_rate") and not a.no_plot:
        out_dir = os.environ.get("KILN_RESULTS_DIR") or RESULTS
        plot(os.path.join(out_dir, f"serving-{model_name}.png"), metrics["per_rate"], f"kiln serve: {model_name}")
    return {"path": path, "metrics": metrics, "settings": settings}


if __name__ == "__main__":
    main()
