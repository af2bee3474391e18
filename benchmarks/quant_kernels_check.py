"""Quantized linears on one CUDA device: the paths of kiln.kernels.quant_triton (Triton GEMV and
GEMM, torch._scaled_mm) for the Llama-3-8B and -70B projection shapes against the 16-bit
cuBLAS product (F.linear) of the same shape.

    python benchmarks/quant_kernels_check.py [--models 8b 70b] [--ops fp8 fp8-static int8 int4]
        [--m 1 2 4 16 64 256] [--group-size 128] [--dtype bfloat16] [--glu] [--reps 20]
        [--all-configs] [--skip-tests] [-v]

For each model, op and shape, ``quant_triton.tune`` times every candidate path at each M as
CUDA-graph replays over rotating weight copies (>= 256 MB in all, so weights come from device
memory, not L2), keeps the fastest, and also times F.linear on 16-bit weights (``bf16_us``).
GB/s is the quantized weight's bytes (values, scales, zero points) over the time, beside the
device-to-device copy bandwidth measured here; ``speedup`` is the 16-bit time over the
quantized one. ``--glu`` adds the fused gate/up + SiLU product of each gate_up shape. After
tuning, each op is run through the dispatch on fresh inputs and compared with its reference.
Unless ``--skip-tests``, tests/test_quant_gpu.py runs first. Prints tables and writes a
"gpu-quant-kernels" JSON record to $OUT when set, else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemv_check import copy_bandwidth  # noqa: E402
from record import text_table, write_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    "8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)},
}


def run_tests() -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quant_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"tests/test_quant_gpu.py: {tail} ({time.time() - t:.0f} s)", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:] + proc.stderr[-2000:])
    return dict(returncode=proc.returncode, summary=tail)


def check_rows(rows, dtype) -> list[dict]:
    """Each tuned (op, shape) through the dispatch on fresh inputs against its reference."""
    from kiln.kernels import quant_triton as qt
    from kiln.kernels import quant_tune

    out = []
    gen = torch.Generator(device="cuda").manual_seed(123)
    seen = {}
    for r in rows:
        m, n, k = r["shape"]
        op, g = r["op"], r["group_size"]
        key = (op, n, k, g)
        if key not in seen:
            seen.clear()
            torch.cuda.empty_cache()
            t = quant_tune.make_weights(op, n, k, g, dtype, "cuda", gen)
            if g:
                t["group_size"] = g
            seen[key] = t
        t = seen[key]
        x = torch.randn((m, k), device="cuda", dtype=dtype, generator=gen)
        xs = quant_tune._input_scale(op, x)
        y = quant_tune.dispatch(op, x, t, xs)
        kind = qt.choose(op, m, n, k, dtype, g)[0]
        ref = quant_tune.reference_for(kind, op, x, t, xs).float()
        rel = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        out.append(dict(op=op, shape=r["shape"], choice=qt.choice_name(*qt.choose(op, m, n, k, dtype, g)),
                        rel_err=float(f"{rel:.3g}")))
    seen.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ops", nargs="+", default=["fp8", "int8", "int4"], choices=["fp8", "fp8-static", "int8", "int4"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256], help="rows of x")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--glu", action="store_true", help="also the fused gate/up + SiLU product of gate_up")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per candidate")
    ap.add_argument("--all-configs", action="store_true", help="try every fitting config, not the defaults")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every candidate's time")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    from kiln.kernels import quant_triton as qt
    from kiln.kernels import quant_tune, triton_ops

    assert triton_ops.available(), "triton_ops.available() is False"
    dtype = getattr(torch, args.dtype)
    tests = None if args.skip_tests else run_tests()
    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_gbs:.0f} GB/s", flush=True)
    probe = quant_tune.probe_scaled_mm(dtype, "cuda")
    print(f"torch._scaled_mm rowwise serves {args.dtype}: without bias {probe[False]}, with bias {probe[True]}")

    t0 = time.time()
    rows = []
    for model in args.models:
        for op in args.ops:
            names = list(MODELS[model]) + (["gate_up:glu"] if args.glu else [])
            for name in names:
                n, k = MODELS[model][name.split(":")[0]]
                spec_op = op + ("-glu" if name.endswith(":glu") else "")
                spec = (spec_op, n, k, args.group_size) if op == "int4" else (spec_op, n, k)
                got = qt.tune([spec], dtype, "cuda", m_values=args.m, full=args.all_configs, reps=args.reps,
                              baseline=True, verbose=args.verbose)
                for r in got:
                    base = r.get("bf16_us") or r.get("dense_us")
                    r.update(model=model, name=name, speedup=round(base / r["us"], 2) if base else None,
                             dense_gb_s=round(n * k * dtype.itemsize / base / 1e3, 1) if base else None,
                             of_copy_bw=round(r["weight_gb_s"] / (copy_gbs / 2), 3))
                    rows.append(r)
                    print(f"{model} {spec_op} {name} M={r['shape'][0]}: {r['choice']} {r['us']} us "
                          f"{r['weight_gb_s']} GB/s (16-bit {base} us, x{r['speedup']})", flush=True)
    tune_s = time.time() - t0
    checks = check_rows(rows, dtype)

    # one decoder layer: the four projections' times added up, quantized against 16-bit
    layers = []
    for model in args.models:
        for op in args.ops:
            for m in args.m:
                sel = [r for r in rows if r["model"] == model and r["op"] == op and r["shape"][0] == m]
                if len(sel) == len(MODELS[model]):
                    q_us = sum(r["us"] for r in sel)
                    d_us = sum(r.get("bf16_us") or r.get("dense_us") or 0 for r in sel)
                    layers.append(dict(model=model, op=op, m=m, us=round(q_us, 1), dense_us=round(d_us, 1),
                                       speedup=round(d_us / q_us, 2) if q_us else None))

    print(f"\nquantized linears, {args.dtype} activations, tuned in {tune_s:.0f} s; GB/s = quantized weight bytes "
          f"/ time; of_copy_bw = that over half the copy bandwidth ({copy_gbs / 2:.0f} GB/s read)")
    print(text_table(rows, ["model", "op", "name", "shape", "choice", "us", "weight_gb_s", "of_copy_bw",
                            "gemv_us", "gemv-pre_us", "gemv-wo_us", "gemv-acc_us", "gemm_us", "scaled_mm_us", "bf16_us", "dense_gb_s", "speedup"]))
    print("\nper decoder layer (qkv + o + gate_up + down):")
    print(text_table(layers, ["model", "op", "m", "us", "dense_us", "speedup"]))
    print("\ndispatch after tuning vs the reference:")
    print(text_table(checks, ["op", "shape", "choice", "rel_err"]))

    settings = dict(dtype=args.dtype, ops=args.ops, m=args.m, group_size=args.group_size, models=args.models,
                    shapes={mo: MODELS[mo] for mo in args.models}, glu=args.glu, reps=args.reps,
                    all_configs=args.all_configs, timing="cuda-graph replays, weight copies >= 256 MB")
    metrics = dict(copy_gbs=round(copy_gbs, 1), scaled_mm_probe={str(k): v for k, v in probe.items()},
                   tune_s=round(tune_s, 1), rows=rows, layers=layers, checks=checks, tests=tests,
                   table=qt.tuned_table())
    write_record("gpu-quant-kernels", "llama-3-8b-70b-shapes", settings, metrics, out_dir=os.environ.get("OUT") or None)
    bad = [c for c in checks if not c["rel_err"] < 1e-2]
    if bad or (tests is not None and tests["returncode"] != 0):
        print(f"failures: {bad or tests}")
        sys.exit(1)


if __name__ == "__main__":
    main()
