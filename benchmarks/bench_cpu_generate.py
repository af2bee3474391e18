"""Single-request generation speed on the CPU: `kiln generate` on the built-in model in float32
and bfloat16, beside Hugging Face transformers' `generate` on the same GGUF, in the same run.

    python benchmarks/bench_cpu_generate.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_record  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def build(dtype: str, root: str) -> str:
    out = os.path.join(root, f"smollm2-{dtype}-cpu")
    if not os.path.exists(os.path.join(out, "engine.json")):
        subprocess.run([sys.executable, "-m", "kiln.launch.cli", "build", "--model", "smollm2-135m-instruct", "--output", out,
                        "--dtype", dtype, "--device", "cpu", "--max-seq-len", "2048", "--quiet"], check=True)
    return out


def kiln_generate_tps(engine: str, tokens: int) -> float:
    p = subprocess.run([sys.executable, "-m", "kiln.launch.cli", "generate", engine, "--prompt", PROMPT, "--max-tokens", str(tokens),
                        "--ignore-eos", "--stats"], capture_output=True, text=True, check=True)
    m = re.search(r"\[(\d+) tokens in ([\d.]+) s: ([\d.]+) tokens/s\]", p.stderr)
    if not m or int(m.group(1)) != tokens:
        raise RuntimeError(f"unexpected kiln generate output: {p.stderr[-400:]}")
    return float(m.group(3))


def hf_generate_tps(dtype: str, tokens: int, repeats: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.runtime.checkpoint import builtin_gguf_path

    path = builtin_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=getattr(torch, dtype)).eval()
    ids = tok(PROMPT, return_tensors="pt")
    out = []
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            t = time.perf_counter()
            g = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            dt = time.perf_counter() - t
            assert g.shape[1] - ids["input_ids"].shape[1] == tokens
            out.append(tokens / dt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="engines")
    a = ap.parse_args()
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        eng = build(dtype, a.engines)
        kiln_runs = [kiln_generate_tps(eng, a.tokens) for _ in range(a.repeats)]
        hf_runs = hf_generate_tps(dtype, a.tokens, a.repeats)
        k, h = statistics.median(kiln_runs), statistics.median(hf_runs)
        metrics[dtype] = {
            "output_tokens_per_s": round(k, 2),
            "baseline_output_tokens_per_s": round(h, 2),
            "speedup_vs_baseline": round(k / h, 3),
            "decode_ms_per_token": round(1000 / k, 2),
            "runs_kiln": [round(x, 2) for x in kiln_runs],
            "runs_baseline": [round(x, 2) for x in hf_runs],
        }
        print(f"{dtype}: kiln {k:.1f} tok/s, transformers {h:.1f} tok/s")
    write_record("cpu-generate", "smollm2-135m-instruct", {"batch": 1, "output_tokens": a.tokens, "prompt": PROMPT,
                 "repeats": a.repeats, "statistic": "median", "threads": __import__("torch").get_num_threads()}, metrics)


if __name__ == "__main__":
    main()
