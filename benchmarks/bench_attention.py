"""Decode attention alone: the paged decode kernel's time and read bandwidth at a batch and
context, for the 16-bit cache and for the FP8 cache under each of its (context tile, warps)
configs (``triton_attention.DECODE_CONFIGS_FP8``), checked against the plain-torch reference on
a few sequences first. Writes a ``decode-attention`` record.

    python3 benchmarks/bench_attention.py --batches 64,256,512 --context 1000
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_record  # noqa: E402


def _meta(batch: int, per_seq: int, bs: int, dev) -> SimpleNamespace:
    ctx = per_seq * bs
    perm = torch.randperm(batch * per_seq, device=dev).to(torch.int32)  # blocks scattered as in a used cache
    return SimpleNamespace(
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        block_tables=perm.view(batch, per_seq), max_seq_len=ctx, sliding_window=None, is_decode_only=True,
        max_query_len=1, query_lens_cpu=[1] * batch, seq_lens_cpu=[ctx] * batch,
    )


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def check(hq: int, hk: int, d: int, bs: int, dev) -> float:
    """Largest |kernel - reference| over every FP8 config on a few sequences (and the 16-bit cache)."""
    from kiln.kernels import attention as ref_ops
    from kiln.kernels import triton_attention as ta

    worst = 0.0
    for fp8 in (False, True):
        gen = torch.Generator(device=dev).manual_seed(5)
        per_seq = 40
        batch = 6
        nb = batch * per_seq
        k = torch.randn((nb, bs, hk, d), device=dev, generator=gen, dtype=torch.bfloat16)
        v = torch.randn((nb, bs, hk, d), device=dev, generator=gen, dtype=torch.bfloat16)
        q = torch.randn((batch, hq, d), device=dev, generator=gen, dtype=torch.bfloat16)
        meta = _meta(batch, per_seq, bs, dev)
        ks = vs = None
        if fp8:
            ks = torch.tensor([k.abs().amax().item() / 448], device=dev)
            vs = torch.tensor([v.abs().amax().item() / 448], device=dev)
            k, v = ref_ops.quantize_kv(k, ks), ref_ops.quantize_kv(v, vs)
        want = ref_ops.paged_attention_ref(q.float(), k, v, meta, d ** -0.5, k_scale=ks, v_scale=vs)
        configs = ta.DECODE_CONFIGS_FP8 if fp8 else [None]
        for cfg in configs:
            if cfg is not None:
                ta.set_decode_config(dev, d, cfg)
            out = torch.empty_like(q)
            ta.launch_decode(q, k, v, out, meta, d ** -0.5, k_scale=ks, v_scale=vs)
            worst = max(worst, (out.float() - want.float()).abs().max().item())
        ta.set_decode_config(dev, d, None)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,256,512")
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim (llama-3-8b)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    from kiln.kernels import triton_attention as ta

    dev = torch.device("cuda", torch.cuda.current_device())
    hq, hk, d = (int(x) for x in a.heads.split(","))
    bs = a.block_size
    err = check(hq, hk, d, bs, dev)
    print(f"max |kernel - reference| over every config: {err:.4f}")
    if err > 0.06:
        raise SystemExit(f"decode attention differs from the reference by {err}")
    per_seq = -(-a.context // bs)
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        meta = _meta(batch, per_seq, bs, dev)
        nb = batch * per_seq
        q = torch.randn((batch, hq, d), dtype=torch.bfloat16, device=dev)
        out = torch.empty_like(q)
        for fp8 in (False, True):
            dt = ta.KV_FP8_DTYPE if fp8 else torch.bfloat16
            k = torch.randn((nb, bs, hk, d), device=dev).to(dt)
            v = torch.randn((nb, bs, hk, d), device=dev).to(dt)
            scale = torch.ones(1, device=dev) if fp8 else None
            kv_bytes = 2 * k.numel() * k.element_size()
            for cfg in (ta.DECODE_CONFIGS_FP8 if fp8 else [None]):
                if cfg is not None:
                    ta.set_decode_config(dev, d, cfg)
                us = _time(lambda k=k, v=v: ta.launch_decode(q, k, v, out, meta, d ** -0.5, k_scale=scale, v_scale=scale), a.reps)
                rows.append(dict(batch=batch, context=per_seq * bs, cache="fp8" if fp8 else "bf16",
                                 config=f"{cfg[0]}x{cfg[1]}" if cfg else "64x4", us=round(us, 1),
                                 tb_s=round(kv_bytes / us / 1e6, 3)))
                print(f"batch {batch:4d} ctx {per_seq * bs} {rows[-1]['cache']:4s} {rows[-1]['config']:>6s}: "
                      f"{us:9.1f} us  {rows[-1]['tb_s']:.2f} TB/s")
            ta.set_decode_config(dev, d, None)
            del k, v
        tuned = ta.tune_decode(*(torch.empty((nb, bs, hk, d), dtype=ta.KV_FP8_DTYPE, device=dev),) * 2,
                               torch.ones(1, device=dev), torch.ones(1, device=dev), hq, torch.bfloat16,
                               batch=batch, context=a.context)
        print(f"batch {batch}: tune_decode {tuned} -> {ta.decode_tuned_table()}")
        ta.set_decode_config(dev, d, None)
    write_record("decode-attention", f"heads {hq}/{hk}x{d}", dict(batches=a.batches, context=a.context, block_size=bs,
                 reps=a.reps), dict(max_abs_err=err, rows=rows))


if __name__ == "__main__":
    main()
