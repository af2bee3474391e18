"""Correctness and speed of the Triton kernels on one CUDA device.

Runs tests/test_kernels_gpu.py (every op against its plain-torch reference), then times each op
with CUDA events: paged decode attention for Llama-3-8B shapes (32 query heads, 8 KV heads,
head dim 128, block 16, bfloat16) at batch 1/64/256 x context 512/2048/8192, reported as GB/s of
K/V read beside the device-to-device copy bandwidth measured here; prefill attention in TFLOP/s;
norms, SiLU-and-mul, and rotary with the KV write in GB/s beside their torch references.

    python benchmarks/gpu_kernels_check.py [--skip-tests] [--quick]

Triton kernels are timed as CUDA-graph replays (GPU time without launch overhead; small decode
cases rotate over several caches so they are not served from L2) and eagerly (with the Python
launch cost). Writes a JSON record to $OUT when set, else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import text_table, write_record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

HQ, HK, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
L2_BYTES = 256 << 20


def run_tests() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_gpu.py"],
        cwd=ROOT, capture_output=True, text=True,
    )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-400:]
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    print(f"tests/test_kernels_gpu.py: {summary}")
    for ln in failed[:40]:
        print("  " + ln)
    if proc.returncode != 0 and not failed:
        print(proc.stdout[-4000:] + proc.stderr[-4000:])
    return {"returncode": proc.returncode, "summary": summary, "failed": failed}


def _events_ms(run, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def time_eager(fn, iters=30, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    return _events_ms(fn, iters)


def time_graph(fns, iters=30) -> float:
    """Milliseconds per call of the callables in ``fns``, captured once each into one graph."""
    from kiln.kernels.gemv import _time_calls

    return _time_calls(fns, iters) / 1000


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, in GB/s of bytes read plus bytes written."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_eager(lambda: b.copy_(a), iters=20)
    del a, b
    return 2 * n / ms / 1e6


def _decode_setup(b, ctx, gen, copies):
    from kernel_cases import make_meta

    width = ctx // BS
    nb = b * width
    caches = []
    for _ in range(copies):
        k = torch.randn((nb, BS, HK, D), device="cuda", dtype=DT)
        v = torch.randn((nb, BS, HK, D), device="cuda", dtype=DT)
        caches.append((k, v))
    tables = torch.randperm(nb, generator=gen).view(b, width)
    meta = make_meta([ctx] * b, [1] * b, tables, BS, "cuda")
    q = torch.randn((b, HQ, D), device="cuda", dtype=DT)
    return q, caches, meta


def bench_decode(batches, contexts, copy_gbs, gen) -> list[dict]:
    from dataclasses import replace

    from kiln.kernels import triton_attention as ops
    from kiln.kernels.attention import paged_attention_ref

    rows = []
    for b in batches:
        for ctx in contexts:
            kv_bytes = 2 * b * ctx * HK * D * 2
            copies = max(1, min(16, math.ceil(L2_BYTES / kv_bytes)))
            q, caches, meta = _decode_setup(b, ctx, gen, copies)
            scale = D ** -0.5
            fns = [lambda kc=kc, vc=vc: ops.paged_attention(q, kc, vc, meta, scale) for kc, vc in caches]
            ms = time_graph(fns)
            loose = replace(meta, max_seq_len=131072)
            fns_loose = [lambda kc=kc, vc=vc: ops.paged_attention(q, kc, vc, loose, scale) for kc, vc in caches]
            ms_loose = time_graph(fns_loose)
            ms_eager = time_eager(fns[0])
            ref_ms = None
            if kv_bytes <= (1 << 30):
                try:
                    ref_ms = time_eager(lambda: paged_attention_ref(q, *caches[0], meta, scale), iters=5, warmup=1)
                except torch.cuda.OutOfMemoryError:
                    ref_ms = None
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(
                batch=b, context=ctx, kv_mb=round(kv_bytes / 1e6, 1), graph_us=round(ms * 1e3, 1),
                graph_us_bound_128k=round(ms_loose * 1e3, 1), eager_us=round(ms_eager * 1e3, 1),
                kv_gbs=round(gbs, 1), pct_of_copy=round(100 * gbs / copy_gbs, 1),
                ref_us=None if ref_ms is None else round(ref_ms * 1e3, 1),
                splits=ops.decode_num_splits(q.device, b, HK, ctx, None, 4 * 64),
            ))
            del caches, q
            torch.cuda.empty_cache()
    return rows


def bench_prefill(cases, gen) -> list[dict]:
    from kernel_cases import make_paged_case

    from kiln.kernels import triton_attention as ops
    from kiln.kernels.attention import paged_attention_ref

    rows = []
    for name, seq_lens, query_lens in cases:
        case = make_paged_case(seq_lens, query_lens, HQ, HK, D, BS, DT, "cuda", seed=1)
        run = lambda: ops.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, case.scale)  # noqa: E731
        ms = time_graph([run], iters=10)
        ref_ms = time_eager(lambda: paged_attention_ref(case.q, case.k_cache, case.v_cache, case.meta, case.scale),
                            iters=3, warmup=1)
        visible = sum(sum(s - q + i + 1 for i in range(q)) for s, q in zip(seq_lens, query_lens))
        flops = 4 * HQ * D * visible
        rows.append(dict(case=name, us=round(ms * 1e3, 1), tflops=round(flops / ms / 1e9, 1),
                         ref_us=round(ref_ms * 1e3, 1), speedup=round(ref_ms / ms, 2)))
    return rows


def bench_elementwise(tokens_list) -> list[dict]:
    from kernel_cases import fused_qkv_views

    from kiln.kernels import triton_attention
    from kiln.kernels import triton_ops as ops
    from kiln.kernels.activation import silu_and_mul_ref
    from kiln.kernels.attention import rotary_write_kv_ref
    from kiln.kernels.norm import add_rms_norm_ref, rms_norm_ref
    from kiln.kernels.rotary import cos_sin_cache

    rows = []
    h, inter = 4096, 14336
    rope = cos_sin_cache(D, 8192, 500000.0, device="cuda")
    for t in tokens_list:
        x = torch.randn((t, h), device="cuda", dtype=DT)
        r = torch.randn((t, h), device="cuda", dtype=DT)
        w = torch.randn((h,), device="cuda", dtype=DT)
        gu = torch.randn((t, 2 * inter), device="cuda", dtype=DT)
        q, k, v = fused_qkv_views(t, HQ, HK, D, DT, "cuda")
        pos = torch.randint(0, 8192, (t,), device="cuda")
        nb = max(64, 2 * t // BS)
        kc = torch.randn((nb, BS, HK, D), device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        slots = torch.randperm(nb * BS, device="cuda")[:t]
        rope_kv_bytes = 2 * t * (2 * HQ + 4 * HK) * D  # bfloat16 q, k and v each read and written once
        ops_list = [
            ("rms_norm", lambda: ops.rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5), 2 * t * h * 2),
            ("add_rms_norm", lambda: ops.add_rms_norm(x, r, w, 1e-5), lambda: add_rms_norm_ref(x, r, w, 1e-5),
             4 * t * h * 2),
            ("silu_and_mul", lambda: ops.silu_and_mul(gu), lambda: silu_and_mul_ref(gu), 3 * t * inter * 2),
            ("rotary_write_kv", lambda: triton_attention.rotary_write_kv(q, k, v, pos, rope, kc, vc, slots),
             lambda: rotary_write_kv_ref(q, k, v, pos, rope, kc, vc, slots), rope_kv_bytes),
        ]
        for name, fn, ref, nbytes in ops_list:
            ms = time_graph([fn], iters=50)
            ref_ms = time_eager(ref, iters=20)
            rows.append(dict(op=name, tokens=t, us=round(ms * 1e3, 2), gbs=round(nbytes / ms / 1e6, 1),
                             ref_us=round(ref_ms * 1e3, 2), speedup=round(ref_ms / ms, 2)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    from kiln.kernels import triton_ops

    assert triton_ops.available(), "triton_ops.available() is False"
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    tests = None if args.skip_tests else run_tests()
    copy_gbs = copy_bandwidth()
    print(f"\ndevice: {torch.cuda.get_device_name()}  copy bandwidth (read+write): {copy_gbs:.0f} GB/s")

    batches = [1, 64] if args.quick else [1, 64, 256]
    contexts = [512, 2048] if args.quick else [512, 2048, 8192]
    decode = bench_decode(batches, contexts, copy_gbs, gen)
    print("\npaged decode attention (32q/8kv heads, D=128, block 16, bf16)")
    print(text_table(decode, ["batch", "context", "kv_mb", "splits", "graph_us", "graph_us_bound_128k", "eager_us",
                          "kv_gbs", "pct_of_copy", "ref_us"]))

    prefill_cases = [
        ("1 x 2048 prompt", [2048], [2048]),
        ("4 x 1024 chunk after 3072 ctx", [4096] * 4, [1024] * 4),
        ("512 chunk + 63 decodes @2k", [1536] + [2048] * 63, [512] + [1] * 63),
    ]
    if not args.quick:
        prefill_cases.insert(1, ("1 x 8192 prompt", [8192], [8192]))
    prefill = bench_prefill(prefill_cases, gen)
    print("\nprefill / mixed attention")
    print(text_table(prefill, ["case", "us", "tflops", "ref_us", "speedup"]))

    elementwise = bench_elementwise([16, 4096] if args.quick else [1, 16, 512, 4096])
    print("\nelementwise ops (hidden 4096, intermediate 14336, bf16)")
    print(text_table(elementwise, ["op", "tokens", "us", "gbs", "ref_us", "speedup"]))

    metrics = dict(tests=tests, copy_gbs=round(copy_gbs, 1), decode=decode, prefill=prefill,
                   elementwise=elementwise)
    settings = dict(q_heads=HQ, kv_heads=HK, head_dim=D, block_size=BS, dtype="bfloat16", quick=args.quick)
    write_record("gpu_kernels_check", "llama-3-8b-shapes", settings, metrics, out_dir=os.environ.get("OUT") or None)
    if tests is not None and tests["returncode"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
