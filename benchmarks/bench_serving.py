"""Serving under load: `kiln serve` on an engine, streaming completions arriving as a Poisson
process at several rates, prompt and output lengths drawn with a realistic spread (log-normal,
clipped). Reports throughput and TTFT / TPOT percentiles per rate, a JSON record and a PNG plot.

    python benchmarks/bench_serving.py --engine engines/smollm2-float32-cpu --rates 0.5,1,2,4 --requests 32
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
    a = ap.parse_args()
    from kiln.runtime.worker import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kiln.launch.cli", "serve", a.engine, "--port", str(port)],
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
        rows = []
        for i, rate in enumerate(float(r) for r in a.rates.split(",")):
            reqs = workload(a.requests, seed=i, prompt_median=a.prompt_median, output_median=a.output_median)
            row = asyncio.run(run_rate(url, served, reqs, rate, seed=100 + i))
            if row["errors"]:
                raise RuntimeError(f"{row['errors']} requests failed at {rate} req/s")
            print(row, flush=True)
            rows.append(row)
    finally:
        server.terminate()
        server.wait(60)
    cfg = json.load(open(os.path.join(a.engine, "engine.json")))
    model = a.model or cfg["model_name"]
    best = max(rows, key=lambda r: r["output_tokens_per_s"])
    write_record("serving", model,
                 {"rates_req_s": [r["rate_req_s"] for r in rows], "requests_per_rate": a.requests,
                  "prompt_tokens": f"log-normal, median {a.prompt_median}, sigma 0.8", "output_tokens":
                  f"log-normal, median {a.output_median}, sigma 0.6, ignore_eos", "dtype": cfg["build"]["dtype"]},
                 {"per_rate": rows, "output_tokens_per_s": best["output_tokens_per_s"],
                  "ttft_ms_p50": rows[0]["ttft_ms_p50"], "ttft_ms_p99": rows[0]["ttft_ms_p99"],
                  "tpot_ms_p50": rows[0]["tpot_ms_p50"], "tpot_ms_p99": rows[0]["tpot_ms_p99"]})
    out_dir = os.environ.get("KILN_RESULTS_DIR") or RESULTS
    plot(os.path.join(out_dir, f"serving-{model}.png"), rows, f"kiln serve: {model}")


if __name__ == "__main__":
    main()
