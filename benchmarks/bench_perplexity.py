"""Accuracy of quantized engines: perplexity of the built-in model (SmolLM2-135M-Instruct) on a
held-out text shipped with the tests (tests/data/heldout.txt), read through
``SamplingParams(prompt_logprobs=0)``, for every precision kiln builds:

    float32, bfloat16, fp8, fp8 + fp8 KV cache, int8-weight, int4-awq and plain round-to-nearest
    int4 (``--int4-search rtn``) at the same group size.

The int4 group size is 64: SmolLM2's projection inputs (576 and 1536 wide) are multiples of 64
but not of the default 128. The text is cut into windows of ``--window`` tokens; each window is
one request, and the perplexity is exp(-mean log-probability) over every token of every window
but its first. ``measure`` returns the table and ``failures`` checks it against ``LIMITS``;
tests/test_quant_accuracy.py runs both.

    python benchmarks/bench_perplexity.py [--device cpu] [--window 1024] [--variants a,b,...]

Writes a ``perplexity`` record to benchmarks/results/ and prints the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import text_table, write_record  # noqa: E402

HELDOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "heldout.txt")
MODEL = "smollm2-135m-instruct"
GROUP_SIZE = 64
"""int4 columns per scale and zero point (the largest power of two dividing 576 and 1536)."""

# name: BuildConfig fields
VARIANTS: dict[str, dict] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "fp8": {"dtype": "bfloat16", "quant": "fp8"},
    "fp8+fp8kv": {"dtype": "bfloat16", "quant": "fp8", "kv_cache_dtype": "fp8"},
    "int8-weight": {"dtype": "bfloat16", "quant": "int8-weight"},
    "int4-awq": {"dtype": "bfloat16", "quant": "int4-awq", "group_size": GROUP_SIZE},
    "int4-rtn": {"dtype": "bfloat16", "quant": "int4-awq", "group_size": GROUP_SIZE, "int4_search": "rtn"},
}
LIMITS = {"fp8": 1.02, "fp8+fp8kv": 1.02, "int8-weight": 1.01, "int4-awq": 1.08}
"""Largest perplexity allowed, as a multiple of bfloat16's."""
FLOAT32_LIMIT = 1.01
"""float32 and bfloat16 agree within this ratio either way (a sanity check of the baseline)."""
COLUMNS = ["variant", "perplexity", "vs_bfloat16", "tokens", "build_s", "score_s"]


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """The text's tokens in consecutive windows of ``size`` (the last one shorter, kept if it has
    at least two tokens)."""
    out = [token_ids[i : i + size] for i in range(0, len(token_ids), size)]
    return [w for w in out if len(w) >= 2]


def perplexity(llm, chunks: list[list[int]]) -> tuple[float, int]:
    """exp(-mean logprob) of every token after each chunk's first, through prompt_logprobs."""
    from kiln.runtime.sampling_params import SamplingParams

    outs = llm.generate(chunks, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    total, n = 0.0, 0
    for o, c in zip(outs, chunks):
        lps = o.prompt_logprobs
        if lps is None or len(lps) != len(c) or lps[0] is not None:
            raise RuntimeError(f"prompt_logprobs has {None if lps is None else len(lps)} entries for {len(c)} prompt tokens")
        for tok, entry in zip(c[1:], lps[1:]):
            total += entry[tok].logprob
            n += 1
    return math.exp(-total / n), n


def build_variant(name: str, root: str, device: str = "cpu", window: int = 1024, progress: bool = False) -> tuple[str, float]:
    """The engine of variant ``name`` under ``root`` (kept if one is there) and the seconds its build took."""
    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    out = os.path.join(root, f"smollm2-{name}")
    t = time.time()
    if not os.path.exists(os.path.join(out, "engine.json")):
        build_engine(MODEL, out, BuildConfig(max_seq_len=window + 16, **VARIANTS[name]), device_class=device,
                     progress=progress)
    return out, time.time() - t


def measure(variants: list[str], root: str, device: str = "cpu", window: int = 1024, max_tokens: int | None = None,
            progress: bool = False, engines: dict[str, str] | None = None) -> list[dict]:
    """The table: builds the built-in model in each variant under ``root`` (or takes the engine
    directory ``engines[name]`` where given, built with at least ``window`` positions) and
    measures its perplexity on the first ``max_tokens`` tokens of the held-out text (all of it
    by default). One row per variant: perplexity, its ratio to bfloat16's, tokens scored, build
    and scoring seconds."""
    from kiln.runtime.llm import LLM

    engines = engines or {}
    text = open(HELDOUT, encoding="utf-8").read()
    rows = []
    chunks = None
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant '{name}': choose from {', '.join(VARIANTS)}")
        if name in engines:
            out, built = engines[name], 0.0
        else:
            out, built = build_variant(name, root, device, window, progress)
        t = time.time()
        llm = LLM(out, device=device)
        try:
            if chunks is None:
                ids = list(llm.tokenizer(text)["input_ids"])
                chunks = windows(ids[:max_tokens] if max_tokens else ids, window)
            ppl, n = perplexity(llm, chunks)
        finally:
            llm.shutdown()
        rows.append({"variant": name, "perplexity": round(ppl, 4), "tokens": n, "build_s": round(built, 1),
                     "score_s": round(time.time() - t, 1)})
        if progress:
            print(f"{name}: perplexity {ppl:.4f} over {n} tokens (build {built:.1f} s, load + score {time.time() - t:.1f} s)",
                  flush=True)
    base = next((r["perplexity"] for r in rows if r["variant"] == "bfloat16"), None)
    for r in rows:
        r["vs_bfloat16"] = round(r["perplexity"] / base, 4) if base else None
    return rows


def failures(rows: list[dict]) -> list[str]:
    """The limits the table misses (empty when every measured variant meets its own): ``LIMITS``
    against bfloat16, int4-awq strictly below int4-rtn, float32 within ``FLOAT32_LIMIT`` of
    bfloat16. Uses the unrounded ratios of the rounded perplexities."""
    ppl = {r["variant"]: r["perplexity"] for r in rows}
    out = []
    base = ppl.get("bfloat16")
    if base is not None:
        for name, limit in LIMITS.items():
            if name in ppl and not ppl[name] <= base * limit:
                out.append(f"{name}: perplexity {ppl[name]} is {ppl[name] / base:.4f} x bfloat16's {base} (limit {limit})")
        if "float32" in ppl and not 1 / FLOAT32_LIMIT <= ppl["float32"] / base <= FLOAT32_LIMIT:
            out.append(f"float32: perplexity {ppl['float32']} is {ppl['float32'] / base:.4f} x bfloat16's {base} "
                       f"(limit {FLOAT32_LIMIT} either way)")
    if "int4-awq" in ppl and "int4-rtn" in ppl and not ppl["int4-awq"] < ppl["int4-rtn"]:
        out.append(f"int4-awq: perplexity {ppl['int4-awq']} is not below round-to-nearest's {ppl['int4-rtn']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--engines", default=None, help="where to build (default: a temporary folder)")
    a = ap.parse_args()
    root = a.engines or tempfile.mkdtemp(prefix="kiln-ppl-")
    t = time.time()
    rows = measure(a.variants.split(","), root, a.device, a.window, a.max_tokens, progress=True)
    total = time.time() - t
    print(text_table(rows, COLUMNS))
    missed = failures(rows)
    print("\n".join(missed) if missed else "every limit met")
    write_record("perplexity", MODEL,
                 {"text": "tests/data/heldout.txt", "window": a.window, "max_tokens": a.max_tokens, "device": a.device,
                  "group_size": GROUP_SIZE, "limits_vs_bfloat16": LIMITS, "float32_limit": FLOAT32_LIMIT},
                 {"rows": rows, "total_s": round(total, 1), "failures": missed,
                  **{f"perplexity_{r['variant']}": r["perplexity"] for r in rows}})


if __name__ == "__main__":
    main()
