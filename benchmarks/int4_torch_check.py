"""torch's own INT4 kernel (``torch._weight_int4pack_mm``, the tinygemm layout) on the Llama-3
8B projection shapes against the 16-bit product, to decide whether kiln's INT4 path should use
it: the weight of ``quant.quantize_int4`` (asymmetric groups, integer zero points) is repacked to
torch's layout (``_convert_weight_to_int4pack``; bfloat16 scale and zero ``(8 - z) * s`` per
group), checked against ``quant.int4_linear_ref`` and timed as CUDA-graph replays over weight
copies larger than L2.

    python benchmarks/int4_torch_check.py [--m 1 2 4 16 64] [--group-size 128]

Writes an "int4-torch" record to $OUT when set, else to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import text_table, write_record  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def to_torch_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, inner_k_tiles: int = 8):
    """kiln's int4 layout -> (packed weight, scales_and_zeros [K/G, N, 2] bfloat16) for
    ``torch._weight_int4pack_mm``, which computes ``(q - 8) * scale + zero``."""
    hi_first = ((qweight & 0x0F) << 4) | (qweight >> 4)  # torch packs the even column in the high nibble
    packed = torch._convert_weight_to_int4pack(hi_first.contiguous(), inner_k_tiles)
    s = scales.float()
    zero = (8.0 - qzeros.float()) * s
    sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


def main() -> None:
    from kiln.kernels import quant
    from kiln.kernels.gemv import _time_calls

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    g = args.group_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn((n, k), device="cuda", generator=gen)
        qw, sc, qz = quant.quantize_int4(w, g, torch.bfloat16)
        packed, sz = to_torch_int4(qw, sc, qz)
        copies = max(2, math.ceil((256 << 20) / (packed.numel() * packed.element_size())))
        ps = [packed] + [packed.clone() for _ in range(copies - 1)]
        w16 = [w.to(torch.bfloat16) for _ in range(max(2, math.ceil((256 << 20) / (n * k * 2))))]
        del w
        for m in args.m:
            x = torch.randn((m, k), device="cuda", generator=gen).to(torch.bfloat16)
            ref = quant.int4_linear_ref(x, qw, sc, qz, g).float()
            y = torch._weight_int4pack_mm(x, packed, g, sz).float()
            rel = ((y - ref).norm() / ref.norm()).item()
            us = _time_calls([lambda p=p: torch._weight_int4pack_mm(x, p, g, sz) for p in ps], args.reps)
            base = _time_calls([lambda t=t: F.linear(x, t) for t in w16], args.reps)
            nbytes = n * k // 2 + 2 * sz.numel()
            rows.append(dict(name=name, m=m, n=n, k=k, rel_err=float(f"{rel:.3g}"), us=round(us, 2),
                             gb_s=round(nbytes / us / 1e3, 1), bf16_us=round(base, 2), speedup=round(base / us, 2)))
            print(rows[-1], flush=True)
        del ps, w16
        torch.cuda.empty_cache()
    print(text_table(rows, ["name", "m", "n", "k", "rel_err", "us", "gb_s", "bf16_us", "speedup"]))
    write_record("int4-torch", "llama-3-8b-shapes", dict(group_size=g, m=args.m, reps=args.reps),
                 dict(rows=rows), out_dir=os.environ.get("OUT") or None)


if __name__ == "__main__":
    main()
