"""Where the quantized engines' perplexity goes: the bfloat16 engine of the built-in model with
its projections' weights and/or inputs rounded in place (quantize, dequantize) one way at a time,
scored on the held-out text exactly as ``bench_perplexity`` scores the engines.

Rows (each the perplexity and its ratio to the unmodified bfloat16 engine):

* ``fp8 w`` / ``fp8 a`` / ``fp8 w+a``: E4M3 weights (per-output-channel scales), E4M3 inputs
  (per-token scales), both: the engine's fp8 numerics;
* ``fp8 a <proj>``: inputs of one projection kind only;
* ``m3 a``: inputs rounded to 3 mantissa bits with an unlimited exponent (E4M3's precision
  without its range: what the per-token scale's range costs is ``fp8 a`` minus this);
* ``gptq fp8 w`` / ``gptq fp8 w+a``: the E4M3 weights rounded column by column with the error
  spread onto the columns not yet rounded through the inverse input Hessian (Frantar et al.,
  2022), from the shipped calibration text;
* ``int4 rtn w`` / ``gptq int4 w`` / ``gptq int4 act-order w``: asymmetric int4 at the
  accuracy table's group size, rounded to nearest, Hessian-compensated in column order, and
  in order of decreasing Hessian diagonal.

    python benchmarks/perplexity_ablation.py [--rows fp8,gptq,int4] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_perplexity as bp  # noqa: E402
from record import text_table, write_record  # noqa: E402

KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def fp8_rows(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def fp8_weight(w: torch.Tensor) -> torch.Tensor:
    s = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
    return fp8_rows(w, s)


def fp8_act(x: torch.Tensor) -> torch.Tensor:
    s = (x.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=1e-12)
    return fp8_rows(x, s)


def m3_act(x: torch.Tensor) -> torch.Tensor:
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 16) / 16, e)


def int4_group(w: torch.Tensor):
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    sc = ((hi - lo) / 15).clamp(min=1e-8)
    return sc, torch.round(-lo / sc).clamp(0, 15)


def int4_round(w, sc, z):
    return (torch.clamp(torch.round(w / sc) + z, 0, 15) - z) * sc


def int4_rtn(w: torch.Tensor, g: int) -> torch.Tensor:
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], g):
        sc, z = int4_group(w[:, j : j + g])
        out[:, j : j + g] = int4_round(w[:, j : j + g], sc[:, None], z[:, None])
    return out


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: str, g: int = 64, act_order: bool = False, damp: float = 0.01):
    """Hessian-compensated rounding of w [N, K] for inputs with second moment h [K, K]."""
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        return gptq(w[:, perm], h[perm][:, perm], fmt, g, False, damp)[:, torch.argsort(perm)]
    w = w.float().clone()
    k = w.shape[1]
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    s8 = (w.abs().amax(dim=1) / 448).clamp(min=1e-12)
    out = torch.zeros_like(w)
    block = g if fmt == "int4" else 128
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros((w.shape[0], i2 - i1))
        hi = hinv[i1:i2, i1:i2]
        if fmt == "int4":
            sc, z = int4_group(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = int4_round(col, sc, z) if fmt == "int4" else fp8_rows(col, s8)
            out[:, i1 + i] = q
            e = (col - q) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return out


class Ablation:
    """The bfloat16 engine with every projection routed through ``self.forward``."""

    def __init__(self, engine: str):
        from kiln.runtime import linear
        from kiln.runtime.llm import LLM

        self.linear = linear
        self.orig = (linear.Projection.forward, linear.Projection.silu_mul)
        self.mode: dict = {}
        self.hess: dict = {}
        ab = self

        def forward(proj, x):
            return ab.forward(proj, x)

        def silu_mul(proj, x):
            from kiln.kernels.activation import silu_and_mul

            return silu_and_mul(ab.forward(proj, x))

        linear.Projection.forward, linear.Projection.silu_mul = forward, silu_mul
        self.llm = LLM(engine, device="cpu")
        root = self.llm.engine.executor.runner.model  # the in-process CPU engine's model
        self.projs = {n: m for n, m in root.named_modules() if isinstance(m, linear.Projection)}
        for name, mod in self.projs.items():
            mod._ablation_name = name

    def forward(self, proj, x):
        m = self.mode
        name = proj._ablation_name
        if m.get("capture"):
            x2 = x.reshape(-1, x.shape[-1]).float()
            h, n = self.hess.get(name, (0, 0))
            self.hess[name] = (h + x2.t() @ x2, n + x2.shape[0])
        w = m.get("weights", {}).get(name, proj.weight)
        kinds = m.get("act_kinds", KINDS)
        if m.get("act") and name.rsplit(".", 1)[-1] in kinds:
            x = m["act"](x.float()).to(x.dtype)
        return F.linear(x, w)

    def close(self):
        self.llm.shutdown()
        self.linear.Projection.forward, self.linear.Projection.silu_mul = self.orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="fp8,gptq,int4")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--calibration-sequences", type=int, default=8)
    a = ap.parse_args()
    groups = set(a.rows.split(","))
    root = tempfile.mkdtemp(prefix="kiln-ablation-")
    engine, _ = bp.build_variant("bfloat16", root)
    ab = Ablation(engine)
    try:
        ids = list(ab.llm.tokenizer(open(bp.HELDOUT, encoding="utf-8").read())["input_ids"])
        chunks = bp.windows(ids[: a.max_tokens] if a.max_tokens else ids, 1024)
        rows, base = [], None

        def score(label, **mode):
            nonlocal base
            ab.mode = mode
            ppl, n = bp.perplexity(ab.llm, chunks)
            base = base or ppl
            rows.append({"row": label, "perplexity": round(ppl, 4), "vs_bfloat16": round(ppl / base, 4), "tokens": n})
            print(f"{label:26s} {ppl:.4f}  x{ppl / base:.4f}", flush=True)

        score("bfloat16")
        wf8 = {n: fp8_weight(m.weight.float()).to(m.weight.dtype) for n, m in ab.projs.items()}
        if "fp8" in groups:
            score("fp8 w", weights=wf8)
            score("fp8 a", act=fp8_act)
            score("fp8 w+a", weights=wf8, act=fp8_act)
            for k in KINDS:
                score(f"fp8 a {k}", act=fp8_act, act_kinds=(k,))
            score("m3 a", act=m3_act)
        if groups & {"gptq", "int4"}:
            from kiln.runtime.calibrate import calibration_token_ids
            from kiln.runtime.sampling_params import SamplingParams

            seqs = calibration_token_ids(ab.llm.tokenizer, None, num_sequences=a.calibration_sequences, seq_len=512)
            ab.mode = {"capture": True}
            ab.llm.generate(seqs, SamplingParams(max_tokens=1, temperature=0.0))
            hess = {n: h / c for n, (h, c) in ab.hess.items()}
            if "gptq" in groups:
                wg = {n: gptq(m.weight.float(), hess[n], "fp8").to(m.weight.dtype) for n, m in ab.projs.items()}
                score("gptq fp8 w", weights=wg)
                score("gptq fp8 w+a", weights=wg, act=fp8_act)
            if "int4" in groups:
                g = bp.GROUP_SIZE
                score("int4 rtn w", weights={n: int4_rtn(m.weight.float(), g).to(m.weight.dtype) for n, m in ab.projs.items()})
                score("gptq int4 w", weights={n: gptq(m.weight.float(), hess[n], "int4", g).to(m.weight.dtype)
                                              for n, m in ab.projs.items()})
                score("gptq int4 act-order w", weights={n: gptq(m.weight.float(), hess[n], "int4", g, True).to(m.weight.dtype)
                                                        for n, m in ab.projs.items()})
    finally:
        ab.close()
    print(text_table(rows, ["row", "perplexity", "vs_bfloat16", "tokens"]))
    write_record("perplexity-ablation", bp.MODEL, dict(text="tests/data/heldout.txt", window=1024, rows=a.rows,
                 int4_group_size=bp.GROUP_SIZE, calibration_sequences=a.calibration_sequences), dict(rows=rows))


if __name__ == "__main__":
    main()
