"""Speculative decoding as a user meets it (wall time of ``LLM.generate``), with and without
n-gram prompt lookup, on one device:

(a) ``grounded``: the built-in model at batch 1 on input-grounded requests (rewrite, extract,
    summarize a passage given in the prompt; passages from tests/data/heldout.txt), greedy:
    output tokens/s both ways, the speedup, the acceptance rate, and whether every output equals
    the one without speculation;
(b) ``load``: a random-weight engine of ``--model`` on the offline workload (``--isl`` /
    ``--osl``, ignore_eos) at each batch of ``--batches``: output tokens/s both ways and their
    ratio (random weights rarely repeat themselves: this is the cost of proposals that fall);
(c) ``verify``: the wall time of one decode step of ``--model`` at batch 1 and 64 when every
    sequence verifies K = 1, 2, 4, 8 proposals, against a plain decode step;
(d) ``draft``: the grounded requests again with a draft model proposing: the built-in model as
    target and its own first ``--draft-layers`` decoder layers as draft (each count given) (``kiln build
    --num-layers``: the same vocabulary and tokenizer, a fraction of the layers' cost per token,
    and no training needed), against the target alone.

    python benchmarks/bench_speculative.py --parts grounded,load,verify --model llama-3-8b --device cuda
    python benchmarks/bench_speculative.py --smoke      # small sizes on a CPU

One record per run in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import build_random_engine, text_table, write_record  # noqa: E402

HELDOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "heldout.txt")
TASKS = (
    "Rewrite the following passage in plain words, keeping every fact and the order of its sentences.\n\n{p}",
    "Copy, word for word, every sentence of the passage below that contains a number or a name.\n\n{p}",
    "Summarize the passage below in three sentences, reusing its own wording where you can.\n\n{p}",
    "Correct any spelling or grammar mistakes in this passage and return it in full.\n\n{p}",
)


def passages(n: int, words: int) -> list[str]:
    text = open(HELDOUT, encoding="utf-8").read().split()
    return [" ".join(text[i * words : (i + 1) * words]) for i in range(n)]


def spec_config(k: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k}


def timed(llm, prompts, params) -> tuple[float, list]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t, outs


def part_grounded(engine: str, device: str, k: int, requests: int, max_tokens: int, words: int,
                  draft: str | None = None) -> dict:
    """Batch-1 grounded requests without and with speculation (n-gram, or ``draft``'s engine)."""
    from kiln.runtime import LLM, SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    row = {}
    outputs = {}
    name_spec = "draft" if draft else "ngram"
    cfg_spec = {"method": "draft", "num_speculative_tokens": k, "draft_engine": draft} if draft else spec_config(k)
    for name, cfg in (("plain", None), (name_spec, cfg_spec)):
        llm = LLM(engine, device=device, speculative_config=cfg)
        convs = [[{"role": "user", "content": TASKS[i % len(TASKS)].format(p=p)}] for i, p in enumerate(passages(requests, words))]
        llm.chat(convs[0], SamplingParams(max_tokens=8, temperature=0.0))  # warm
        total_s, toks, outs = 0.0, 0, []
        for c in convs:  # batch 1: one request at a time
            t = time.perf_counter()
            o = llm.chat(c, sp)[0].outputs[0]
            total_s += time.perf_counter() - t
            toks += len(o.token_ids)
            outs.append(o.token_ids)
        outputs[name] = outs
        row[f"{name}_tok_s"] = round(toks / total_s, 1)
        if cfg:
            st = llm.stats()
            row.update(acceptance_rate=round(st["spec_acceptance_rate"], 3), proposed=st["spec_proposed_tokens"],
                       accepted=st["spec_accepted_tokens"])
        llm.shutdown()
    row["speedup"] = round(row[f"{name_spec}_tok_s"] / row["plain_tok_s"], 3)
    row["outputs_equal"] = sum(a == b for a, b in zip(outputs["plain"], outputs[name_spec]))
    row["requests"] = requests
    return row


def part_load(engine: str, device: str, k: int, batches: list[int], isl: int, osl: int, seed: int) -> list[dict]:
    from kiln.runtime import LLM, SamplingParams

    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    rows = []
    for b in batches:
        prompts = [[rng.randrange(1000, 30000) for _ in range(isl)] for _ in range(b)]
        row = {"batch": b}
        for name, cfg in (("plain", None), ("ngram", spec_config(k))):
            llm = LLM(engine, device=device, speculative_config=cfg, max_batch_size=max(b, 1))
            timed(llm, prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm
            dt, outs = timed(llm, prompts, sp)
            row[f"{name}_tok_s"] = round(sum(len(o.outputs[0].token_ids) for o in outs) / dt, 1)
            if cfg:
                row["acceptance_rate"] = round(llm.stats()["spec_acceptance_rate"], 3)
            llm.shutdown()
        row["ratio"] = round(row["ngram_tok_s"] / row["plain_tok_s"], 3)
        rows.append(row)
    return rows


class _FixedProposer:
    """Proposes ``k`` copies of the last token: every sequence verifies exactly k proposals."""

    def __init__(self, k: int):
        self.k = k

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return [token_ids[-1]] * min(self.k, k)


def part_verify(engine: str, device: str, batches: list[int], ks: list[int], steps: int, seed: int) -> list[dict]:
    """Wall time per engine step while every sequence decodes (plain) or verifies K proposals."""
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    rng = random.Random(seed)
    rows = []
    for b in batches:
        prompts = [[rng.randrange(1000, 30000) for _ in range(64)] for _ in range(b)]
        row = {"batch": b}
        for k in [0, *ks]:
            eng = LLMEngine(engine, device=device, max_batch_size=max(b, 1),
                            speculative_config=spec_config(max(k, 1)) if k else None)
            if k:
                eng.proposer = _FixedProposer(k)
            sp = SamplingParams(max_tokens=(steps + 4) * (k + 1), temperature=0.0, ignore_eos=True)
            for i, p in enumerate(prompts):
                eng.add_request(f"r{i}", p, sp)
            eng.step()  # prefill
            eng.step()  # warm
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                eng.step()
            _sync(device)
            row["plain_ms" if not k else f"k{k}_ms"] = round((time.perf_counter() - t) / steps * 1e3, 3)
            for i in range(len(prompts)):
                eng.abort_request(f"r{i}")
            eng.step()
            eng.shutdown()
        for k in ks:
            row[f"k{k}_vs_plain"] = round(row[f"k{k}_ms"] / row["plain_ms"], 3)
        rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="grounded,load,verify")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--model", default="llama-3-8b", help="the random-weight shape of the load and verify parts")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--verify-batches", default="1,64")
    ap.add_argument("--verify-ks", default="1,2,4,8")
    ap.add_argument("--isl", type=int, default=1000)
    ap.add_argument("--osl", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=8, help="grounded requests (one at a time)")
    ap.add_argument("--max-tokens", type=int, default=256, help="grounded output tokens at most")
    ap.add_argument("--words", type=int, default=160, help="words per grounded passage")
    ap.add_argument("--steps", type=int, default=32, help="timed steps per verify row")
    ap.add_argument("--engines", default=None, help="where to build (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="small sizes on a CPU (tiny-llama for load and verify)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draft-layers", default="10,20", help="draft part: drafts of the target's first N layers (of 30), comma-separated")
    a = ap.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.model, a.dtype, a.batches, a.verify_batches, a.verify_ks = "tiny-llama", "float32", "1,4", "1,4", "1,2"
        a.isl, a.osl, a.requests, a.max_tokens, a.words, a.steps = 32, 16, 2, 24, 40, 4
    parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in parts if p not in ("grounded", "load", "verify", "draft")]
    if bad:
        ap.error(f"unknown parts {bad}: use grounded, load, verify, draft")
    root = a.engines or tempfile.mkdtemp(prefix="kiln-spec-")
    metrics: dict = {}
    if "grounded" in parts or "draft" in parts:
        from kiln.runtime.builder import build_engine
        from kiln.runtime.config import BuildConfig

        dt = "float32" if device == "cpu" else "bfloat16"

        def builtin(name, **kw):
            eng = os.path.join(root, name)
            if not os.path.exists(os.path.join(eng, "engine.json")):
                build_engine("smollm2-135m-instruct", eng, BuildConfig(dtype=dt, max_seq_len=2048), device_class=device,
                             progress=False, **kw)
            return eng

        eng = builtin(f"smollm2-{device}")
    if "grounded" in parts:
        g = part_grounded(eng, device, a.k, a.requests, a.max_tokens, a.words)
        print(text_table([g], list(g)))
        metrics["grounded"] = g
        metrics["acceptance_rate"] = g["acceptance_rate"]
    if "draft" in parts:
        metrics["draft"] = []
        for n in (int(x) for x in a.draft_layers.split(",")):
            draft = builtin(f"smollm2-first{n}-{device}", num_layers=n)
            d = part_grounded(eng, device, a.k, a.requests, a.max_tokens, a.words, draft=draft)
            d = {"draft_layers": n, **d, "pair": f"target: the built-in model ({dt}); draft: its first {n} decoder layers"}
            print(text_table([d], list(d)))
            metrics["draft"].append(d)
    if "load" in parts or "verify" in parts:
        big = max([int(b) for b in a.batches.split(",")] + [int(b) for b in a.verify_batches.split(",")])
        eng = build_random_engine(a.model, os.path.join(root, f"{a.model}-{a.dtype}"), dtype=a.dtype, device=device,
                                  max_batch_size=big, max_seq_len=a.isl + a.osl + 64, at_load=device != "cpu")
        if "load" in parts:
            rows = part_load(eng, device, a.k, [int(b) for b in a.batches.split(",")], a.isl, a.osl, a.seed)
            print(text_table(rows, list(rows[0])))
            metrics["load"] = rows
            metrics["min_ratio_under_load"] = min(r["ratio"] for r in rows)
        if "verify" in parts:
            rows = part_verify(eng, device, [int(b) for b in a.verify_batches.split(",")],
                               [int(k) for k in a.verify_ks.split(",")], a.steps, a.seed)
            print(text_table(rows, list(rows[0])))
            metrics["verify"] = rows
    write_record("speculative", "smollm2-135m-instruct" if set(parts) <= {"grounded", "draft"} else a.model,
                 {"parts": parts, "device": device, "methods": ["ngram"] + (["draft"] if "draft" in parts else []),
                  "draft_layers": a.draft_layers if "draft" in parts else None, "num_speculative_tokens": a.k, "dtype": a.dtype,
                  "batches": a.batches, "isl": a.isl, "osl": a.osl, "grounded_requests": a.requests,
                  "grounded_max_tokens": a.max_tokens, "smoke": a.smoke, "measured": "wall time of LLM.generate / LLMEngine.step"},
                 metrics)


if __name__ == "__main__":
    main()
