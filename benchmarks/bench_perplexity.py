"""Accuracy of quantized engines: perplexity of the built-in model (SmolLM2-135M-Instruct) on a
held-out text shipped with the tests (tests/data/heldout.txt), read through
``SamplingParams(prompt_logprobs=0)``, for every precision kiln builds:

    float32, bfloat16, fp8, fp8 + fp8 KV cache, int8-weight, int4-awq and plain round-to-nearest
    int4 (``--int4-search rtn``) at the same group size.

The text is cut into windows of ``--window`` tokens; each window is one request, and the
perplexity is exp(-mean log-probability) over every token of every window but its first.

    python benchmarks/bench_perplexity.py [--device cpu] [--window 1024]

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

# name: BuildConfig fields beside dtype
VARIANTS: dict[str, dict] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "fp8": {"dtype": "bfloat16", "quant": "fp8"},
    "fp8+fp8kv": {"dtype": "bfloat16", "quant": "fp8", "kv_cache_dtype": "fp8"},
    "int8-weight": {"dtype": "bfloat16", "quant": "int8-weight"},
    "int4-awq": {"dtype": "bfloat16", "quant": "int4-awq"},
    "int4-rtn": {"dtype": "bfloat16", "quant": "int4-awq", "int4_search": "rtn"},
}
LIMITS = {"fp8": 1.02, "fp8+fp8kv": 1.02, "int8-weight": 1.01, "int4-awq": 1.08}
"""Largest perplexity allowed, as a multiple of bfloat16's."""


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


def measure(variants: list[str], root: str, device: str = "cpu", window: int = 1024, max_tokens: int | None = None,
            progress: bool = False) -> list[dict]:
    """Builds the built-in model in each variant under ``root`` and measures its perplexity."""
    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig
    from kiln.runtime.llm import LLM

    text = open(HELDOUT, encoding="utf-8").read()
    rows = []
    chunks = None
    for name in variants:
        out = os.path.join(root, f"smollm2-{name}")
        t = time.time()
        if not os.path.exists(os.path.join(out, "engine.json")):
            build_engine("smollm2-135m-instruct", out, BuildConfig(max_seq_len=window + 16, **VARIANTS[name]),
                         device_class=device, progress=progress)
        built = time.time() - t
        llm = LLM(out, device=device)
        if chunks is None:
            ids = llm.tokenizer(text)["input_ids"]
            chunks = windows(ids[:max_tokens] if max_tokens else ids, window)
        t = time.time()
        ppl, n = perplexity(llm, chunks)
        llm.shutdown()
        rows.append({"variant": name, "perplexity": round(ppl, 4), "tokens": n, "build_s": round(built, 1),
                     "score_s": round(time.time() - t, 1)})
    base = next((r["perplexity"] for r in rows if r["variant"] == "bfloat16"), None)
    for r in rows:
        r["vs_bfloat16"] = round(r["perplexity"] / base, 4) if base else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--engines", default=None, help="where to build (default: a temporary folder)")
    a = ap.parse_args()
    root = a.engines or tempfile.mkdtemp(prefix="kiln-ppl-")
    rows = measure(a.variants.split(","), root, a.device, a.window, progress=True)
    print(text_table(rows, ["variant", "perplexity", "vs_bfloat16", "tokens", "build_s", "score_s"]))
    write_record("perplexity", "smollm2-135m-instruct",
                 {"text": "tests/data/heldout.txt", "window": a.window, "device": a.device, "group_size": 128,
                  "limits_vs_bfloat16": LIMITS},
                 {"rows": rows, **{f"perplexity_{r['variant']}": r["perplexity"] for r in rows}})


if __name__ == "__main__":
    main()
