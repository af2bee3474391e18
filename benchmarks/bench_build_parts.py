"""A large multi-rank build, in parts: `kiln build --random-weights --tp N --ranks ...` run once per
part into one directory. After each part every new rank file is checked against its partition
(the data bytes equal the layout's element count times the element size) and, unless --keep,
deleted so that a disk smaller than the model still sees every file written. Each part's peak
host memory (printed by the builder) is compared with the largest rank file.

    python benchmarks/bench_build_parts.py --model llama-3-70b --tp 8 --parts 0-2,3-5,6-7 --output /tmp/l70-tp8
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import write_record  # noqa: E402


def data_bytes(path: str) -> int:
    """Bytes after a safetensors file's header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parts", default="0-2,3-5,6-7", help="rank groups built one after another")
    ap.add_argument("--output", default="/tmp/kiln-build-parts")
    ap.add_argument("--keep", action="store_true", help="keep the rank files (needs the whole model's disk space)")
    a = ap.parse_args()

    import torch

    from kiln.launch.cli import _parse_ranks
    from kiln.parallel.mapping import Mapping
    from kiln.runtime.builder import rank_layout, read_engine_config
    from kiln.runtime.checkpoint import open_checkpoint

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    cfg = open_checkpoint(a.model, random_weights=True, dtype=dtype).config
    if os.path.exists(a.output):
        shutil.rmtree(a.output)
    ranks_done, parts = {}, []
    for part in a.parts.split(","):
        ranks = _parse_ranks(part)
        t = time.time()
        out = subprocess.run([sys.executable, "-m", "kiln.launch.cli", "build", "--model", a.model, "--random-weights",
                              "--dtype", a.dtype, "--device", "cpu", "--tp", str(a.tp), "--ranks", part, "--output", a.output],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        line = out.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        peak = float(re.search(r"peak host memory ([0-9.]+) GiB", line).group(1))
        parts.append({"ranks": ranks, "seconds": round(time.time() - t, 1), "peak_host_memory_gib": peak})
        for r in ranks:
            path = os.path.join(a.output, f"rank{r}.safetensors")
            lay = rank_layout(cfg, Mapping(tp=a.tp, rank=r), dtype)
            want = sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() for shape, dt in lay.values())
            got = data_bytes(path)
            ranks_done[r] = {"file_bytes": os.path.getsize(path), "data_bytes": got, "partition_bytes": want,
                             "tensors": len(lay), "matches": got == want}
            print(f"rank {r}: {got / 2**30:.3f} GiB of tensors, partition says {want / 2**30:.3f} GiB: "
                  f"{'match' if got == want else 'MISMATCH'}", flush=True)
            if not a.keep:
                os.remove(path)
    ec = read_engine_config(a.output)
    largest = max(v["file_bytes"] for v in ranks_done.values()) / 2**30
    peak = max(p["peak_host_memory_gib"] for p in parts)
    ok = len(ranks_done) == a.tp and all(v["matches"] for v in ranks_done.values())
    ok = ok and all(f"rank{r}.safetensors" in ec.files for r in range(a.tp))
    print(f"{len(ranks_done)} rank files, all match their partition: {ok}; largest {largest:.2f} GiB; "
          f"peak host memory {peak:.2f} GiB = {peak / largest:.2f} x the largest file", flush=True)
    write_record("build-parts", a.model, {"tp": a.tp, "dtype": a.dtype, "parts": a.parts, "random_weights": True},
                 {"ranks": {str(k): v for k, v in sorted(ranks_done.items())}, "parts": parts, "all_match": ok,
                  "largest_rank_file_gib": round(largest, 3), "peak_host_memory_gib": peak,
                  "peak_over_largest_file": round(peak / largest, 3)})
    if not a.keep:
        shutil.rmtree(a.output, ignore_errors=True)


if __name__ == "__main__":
    main()
