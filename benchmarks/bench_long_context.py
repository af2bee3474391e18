"""Long-context prefill and decode against the bandwidth floor, as a user meets them (wall time of
``LLM.generate``), on a random-weight engine of a 128k-context shape (llama-3.1-8b by default):

* ``ttft``: one prompt of ``--long`` tokens (32,000), max_tokens 1: time to first token, twice
  (two different prompts, so the prefix cache never helps), and the peak device memory the
  prefill took beyond the weights and the KV cache;
* ``decode1``: batch-1 decode per token with ``--long`` tokens of context;
* ``decode16``: a batch of ``--batch`` (16) sequences with ``--context`` (8,000) tokens each.

A decode row's time per step is ``(t(n + 1 tokens) - t(1 token)) / n`` on fresh prompts (the
prefill cancels), and its floor is what one step must read: every weight but the embedding table,
plus the KV cache of every sequence at the mean context of the timed steps, over the measured
copy bandwidth.

    python benchmarks/bench_long_context.py                  # GPU
    python benchmarks/bench_long_context.py --smoke          # tiny-llama on the CPU: the script itself

Writes a "long-context" record to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import build_random_engine, text_table, write_record  # noqa: E402


def kv_bytes_per_token(cfg, dtype_bytes: int) -> int:
    """Bytes of K and V one token holds over every layer."""
    d = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * dtype_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--long", type=int, default=32000, help="prompt tokens of the TTFT and batch-1 rows")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens of each sequence of the batch row")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--max-num-tokens", type=int, default=None, help="prefill chunk budget of the build (default: kiln's)")
    ap.add_argument("--engines", default=os.environ.get("KILN_ENGINES", "/tmp/kiln-engines"))
    ap.add_argument("--smoke", action="store_true", help="tiny-llama on the CPU at small sizes")
    a = ap.parse_args()
    if a.smoke:
        a.model, a.dtype, a.long, a.batch, a.context, a.steps = "tiny-llama", "float32", 600, 3, 200, 4

    import torch

    from kiln.runtime import LLM, SamplingParams
    from kiln.runtime.presets import PRESETS

    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    cfg = PRESETS[a.model]
    max_seq_len = max(a.long, a.context) + a.steps + 16
    if max_seq_len > cfg.max_position_embeddings:
        raise SystemExit(f"{a.model} holds {cfg.max_position_embeddings} positions; --long/--context ask for {max_seq_len}")
    eng = build_random_engine(a.model, os.path.join(a.engines, f"{a.model}-{a.dtype}-{device}-long{max_seq_len}"),
                              dtype=a.dtype, device=device, max_batch_size=max(a.batch, 1), max_seq_len=max_seq_len,
                              max_num_tokens=a.max_num_tokens, at_load=True)
    t = time.perf_counter()
    llm = LLM(eng, device=device)
    load_s = time.perf_counter() - t
    dtype_bytes = torch.finfo(getattr(torch, a.dtype)).bits // 8
    rng = random.Random(0)
    lo, hi = 100, min(cfg.vocab_size, 49152) - 1

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]

    def run(ps, tokens: int) -> float:
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(ps, sp)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return dt

    bw = None
    weights_read = 0
    if device == "cuda":
        from bench_gpu import copy_bandwidth, weight_bytes

        bw = copy_bandwidth()
        weights_read = weight_bytes(llm.engine)[1]

    rows = []
    run(prompts(1, 64), 4)  # warm: the first steps of a process
    # TTFT of a long prompt, twice, and the memory its prefill took on top of what the engine holds.
    mem0 = None
    if device == "cuda":
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ttft = [run(prompts(1, a.long), 1) for _ in range(2)]
    row = {"row": "ttft", "context": a.long, "batch": 1, "first_ms": round(ttft[0] * 1e3, 1), "second_ms": round(ttft[1] * 1e3, 1),
           "prefill_tok_s": round(a.long / ttft[1], 1)}
    if mem0 is not None:
        row["prefill_extra_gib"] = round((torch.cuda.max_memory_allocated() - mem0) / 2**30, 3)
    rows.append(row)
    print(text_table([row], list(row)), flush=True)

    for name, batch, ctx in (("decode1", 1, a.long), ("decode16", a.batch, a.context)):
        t1 = run(prompts(batch, ctx), 1)
        tn = run(prompts(batch, ctx), a.steps + 1)
        step_ms = (tn - t1) / a.steps * 1e3
        row = {"row": name, "context": ctx, "batch": batch, "step_ms": round(step_ms, 3)}
        if bw:
            kv = batch * (ctx + a.steps / 2) * kv_bytes_per_token(cfg, dtype_bytes)
            floor_ms = (weights_read + kv) / bw * 1e3
            row.update(weights_gb=round(weights_read / 1e9, 3), kv_gb=round(kv / 1e9, 3), floor_ms=round(floor_ms, 3),
                       vs_floor=round(step_ms / floor_ms, 3))
        rows.append(row)
        print(text_table([row], list(row)), flush=True)
    llm.shutdown()
    write_record("long-context", a.model, {"dtype": a.dtype, "long_prompt": a.long, "batch": a.batch, "context": a.context,
                                           "steps": a.steps, "max_seq_len": max_seq_len, "max_num_tokens": a.max_num_tokens,
                                           "weights": "random, drawn at load", "measured": "wall time of LLM.generate",
                                           "smoke": a.smoke},
                 {"copy_bandwidth_gb_s": round(bw / 1e9, 1) if bw else None, "load_s": round(load_s, 1), "rows": rows})


if __name__ == "__main__":
    main()
