"""Skinny matrix products (decode-time nn.Linear) on one CUDA device: the Triton kernel of
kiln.kernels.gemv against cuBLAS (F.linear) for the Llama-3-8B projection shapes.

    python benchmarks/gemv_check.py [--m 1 2 4] [--dtype bfloat16] [--reps 20] [--all-configs] [-v]

Runs ``gemv.tune`` over the shapes (N, K): qkv (6144, 4096), o (4096, 4096), gate+up
(28672, 4096), down (4096, 14336) and lm_head (128256, 4096) at each M, then checks ``linear``
on the tuned table against the float32 product. Times are CUDA-graph replays over rotating
weight copies (>= 256 MB in all, so the weight comes from device memory, not L2); GB/s counts
the weight, x and y bytes once each. Prints a table and writes a "gpu-gemv" JSON record to $OUT
when set, else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import text_table, write_record  # noqa: E402

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, GB/s of bytes read plus written (median of 20)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    times.sort()
    return 2 * n / times[len(times) // 2] / 1e6


def check_linear(rows, dtype) -> list[dict]:
    """``linear`` on each tuned shape against the float32 product (fresh random inputs)."""
    from kiln.kernels import gemv

    out = []
    gen = torch.Generator(device="cuda").manual_seed(123)
    for r in rows:
        m, n, k = r["shape"]
        w = torch.randn((n, k), device="cuda", dtype=dtype, generator=gen)
        x = torch.randn((m, k), device="cuda", dtype=dtype, generator=gen)
        y = gemv.linear(x, w)
        ref = gemv.gemv_ref(x, w)
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        out.append(dict(shape=r["shape"], choice=r["choice"], rel_err=float(f"{rel:.3g}")))
        del w
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4], help="rows of x")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per candidate")
    ap.add_argument("--all-configs", action="store_true",
                    help="try every config that fits (a few hundred), not only those of gemv.CONFIGS")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every candidate's time")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    from kiln.kernels import gemv, triton_ops

    assert triton_ops.available(), "triton_ops.available() is False"
    dtype = getattr(torch, args.dtype)
    copy_gbs = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_gbs:.0f} GB/s")

    t0 = time.time()
    rows = []
    for m in args.m:
        cands = gemv.configs(m, dtype, full=True) if args.all_configs else None
        for name in args.shapes:
            got = gemv.tune([SHAPES[name]], dtype, "cuda", m_values=(m,), candidates=cands, reps=args.reps,
                            verbose=args.verbose)
            for r in got:
                r["name"] = name
                r["speedup"] = round(r["cublas_us"] / r["triton_us"], 2) if r["triton_us"] else None
                rows.append(r)
                print(f"{name} M={m}: {r['choice']} {r['us']} us {r['gb_s']} GB/s (cuBLAS {r['cublas_us']} us)",
                      flush=True)
    tune_s = time.time() - t0
    checks = check_linear(rows, dtype)

    print(f"\ngemv, {args.dtype}, tuned in {tune_s:.0f} s; GB/s = (weight + x + y bytes) / time; "
          f"copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    print(text_table(rows, ["name", "shape", "choice", "us", "gb_s", "triton_config", "triton_us", "cublas_us",
                        "cublas_gb_s", "speedup"]))
    print("\nlinear() after tuning vs the float32 product:")
    print(text_table(checks, ["shape", "choice", "rel_err"]))

    settings = dict(dtype=args.dtype, m=args.m, shapes={k: SHAPES[k] for k in args.shapes}, reps=args.reps,
                    all_configs=args.all_configs, timing="cuda-graph replays, weight copies >= 256 MB")
    metrics = dict(copy_gbs=round(copy_gbs, 1), tune_s=round(tune_s, 1), table=gemv.tunedtext_table(),
                   rows=rows, linear_check=checks)
    write_record("gpu-gemv", "llama-3-8b-shapes", settings, metrics, out_dir=os.environ.get("OUT") or None)
    bad = [c for c in checks if not c["rel_err"] < (1e-4 if dtype == torch.float32 else 1e-2)]
    if bad:
        print(f"linear() disagrees with the float32 product: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
