"""Serving under load: `kiln serve` on an engine, streaming completions arriving as a Poisson
process at several rates, prompt and output lengths drawn with a realistic spread (log-normal,
clipped). Reports throughput and TTFT / TPOT percentiles per rate, a JSON record and a PNG plot.

    python benchmarks/bench_serving.py --engine engines/smollm2-float32-cpu --rates 0.5,1,2,4 --requests 32

``--compare-engine`` then runs the requests of the fastest rate through ``LLM.generate`` in this
process (after the server has stopped, so the two never share the device) and records
``engine_output_tokens_per_s`` and ``server_to_engine_ratio``: how close serving over HTTP comes to
the engine's own speed. ``--rates inf`` sends every request at once. ``--api-server-count N``
is passed to ``kiln serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import RESULTS, write_record  # noqa: E402


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def workload(n: int, seed: int, prompt_median: int, output_median: int, vocab_lo: int = 1000, vocab_hi: int = 30000):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = lognormal_int(rng, prompt_median, 0.8, 8, prompt_median * 8)
        o = lognormal_int(rng, output_median, 0.6, 4, output_median * 6)
        out.append(([rng.randrange(vocab_lo, vocab_hi) for _ in range(p)], o))
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if first is None:
                    first = time.perf_counter()
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "tpot": (end - first) / max(1, n - 1), "tokens": n, "latency": end - t0}


async def run_rate(url: str, model: str, reqs, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1024)) as client:
        tasks = []
        t0 = time.perf_counter()
        for prompt, out in reqs:
            tasks.append(asyncio.create_task(one(client, url, model, prompt, out)))
            await asyncio.sleep(rng.expovariate(rate))
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    toks = sum(r["tokens"] for r in ok)
    return {
        "rate_req_s": rate,
        "completed": len(ok),
        "errors": len(res) - len(ok),
        "output_tokens_per_s": round(toks / wall, 2),
        "ttft_ms_p50": round(pct([r["ttft"] for r in ok], 50) * 1000, 1),
        "ttft_ms_p99": round(pct([r["ttft"] for r in ok], 99) * 1000, 1),
        "tpot_ms_p50": round(pct([r["tpot"] for r in ok], 50) * 1000, 2),
        "tpot_ms_p99": round(pct([r["tpot"] for r in ok], 99) * 1000, 2),
        "latency_s_p50": round(pct([r["latency"] for r in ok], 50), 2),
    }


def engine_tokens_per_s(engine: str, reqs) -> float:
    """Output tokens/s of ``LLM.generate`` over the same requests (greedy, ignore_eos), all at once."""
    from kiln.runtime import LLM, SamplingParams

    with LLM(engine) as llm:
        params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in reqs]
        llm.generate([reqs[0][0]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params)
        wall = time.perf_counter() - t0
    return round(sum(len(o.outputs[0].token_ids) for o in outs) / wall, 2)


def plot(path: str, rows: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rates = [r["rate_req_s"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
    ax[0].plot(rates, [r["output_tokens_per_s"] for r in rows], "o-")
    ax[0].set_title("output tokens/s")
    ax[1].plot(rates, [r["ttft_ms_p50"] for r in rows], "o-", label="p50")
    ax[1].plot(rates, [r["ttft_ms_p99"] for r in rows], "o--", label="p99")
    ax[1].set_title("TTFT (ms)")
    ax[1].legend()
    ax[2].plot(rates, [r["tpot_ms_p50"] for r in rows], "o-", label="p50")
    ax[2].plot(rates, [r["tpot_ms_p99"] for r in rows], "o--", label="p99")
    ax[2].set_title("TPOT (ms)")
    ax[2].legend()
    for a in ax:
        a.set_xlabel("arrival rate (req/s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--rates", default="0.5,1,2,4")
    ap.add_argument("--requests", type=int, default=32, help="requests per rate")
    ap.add_argument("--prompt-median", type=int, default=128)
    ap.add_argument("--output-median", type=int, default=48)
    ap.add_argument("--model", default=None, help="model name for the record (default: the engine's)")
    ap.add_argument("--api-server-count", type=int, default=1, help="API server processes of kiln serve")
    ap.add_argument("--compare-engine", action="store_true",
                    help="also run the fastest rate's requests through LLM.generate and record the ratio")
    a = ap.parse_args()
    from kiln.runtime.worker import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kiln.launch.cli", "serve", a.engine, "--port", str(port),
                               "--api-server-count", str(a.api_server_count)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("the server did not become healthy")
        served = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        rows, loads = [], []
        for i, rate in enumerate(float(r) for r in a.rates.split(",")):
            reqs = workload(a.requests, seed=i, prompt_median=a.prompt_median, output_median=a.output_median)
            row = asyncio.run(run_rate(url, served, reqs, rate, seed=100 + i))
            if row["errors"]:
                raise RuntimeError(f"{row['errors']} requests failed at {rate} req/s")
            print(row, flush=True)
            rows.append(row)
            loads.append(reqs)
    finally:
        server.terminate()
        server.wait(60)
    cfg = json.load(open(os.path.join(a.engine, "engine.json")))
    model = a.model or cfg["model_name"]
    best_i = max(range(len(rows)), key=lambda i: rows[i]["output_tokens_per_s"])
    best = rows[best_i]
    metrics = {"per_rate": rows, "output_tokens_per_s": best["output_tokens_per_s"],
               "ttft_ms_p50": rows[0]["ttft_ms_p50"], "ttft_ms_p99": rows[0]["ttft_ms_p99"],
               "tpot_ms_p50": rows[0]["tpot_ms_p50"], "tpot_ms_p99": rows[0]["tpot_ms_p99"]}
    if a.compare_engine:
        eng = engine_tokens_per_s(a.engine, loads[best_i])
        metrics["engine_output_tokens_per_s"] = eng
        metrics["server_to_engine_ratio"] = round(best["output_tokens_per_s"] / eng, 3) if eng else None
        print(f"LLM.generate: {eng} output tokens/s; the server reached {metrics['server_to_engine_ratio']} of it", flush=True)
    write_record("serving", model,
                 {"rates_req_s": [r["rate_req_s"] for r in rows], "requests_per_rate": a.requests,
                  "prompt_tokens": f"log-normal, median {a.prompt_median}, sigma 0.8", "output_tokens":
                  f"log-normal, median {a.output_median}, sigma 0.6, ignore_eos", "dtype": cfg["build"]["dtype"],
                  "api_server_count": a.api_server_count, "compare_engine": a.compare_engine,
                  "compared_rate_req_s": best["rate_req_s"] if a.compare_engine else None},
                 metrics)
    out_dir = os.environ.get("KILN_RESULTS_DIR") or RESULTS
    plot(os.path.join(out_dir, f"serving-{model}.png"), rows, f"kiln serve: {model}")


if __name__ == "__main__":
    main()
