"""Benchmark records: one JSON file per run in benchmarks/results/ (API.md's "Benchmark records"),
and what the benchmark scripts share: building a random-weight engine, printing a table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    if os.environ.get("KILN_COMMIT"):  # a copy of the tree run elsewhere names its commit
        return os.environ["KILN_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (the device machine)
        return os.environ.get("KILN_COMMIT", "unknown")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_record(benchmark: str, model: str, settings: dict, metrics: dict, out_dir: str | None = None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    rec = {
        "benchmark": benchmark,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "device": device_name(),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "model": model,
        "settings": settings,
        "metrics": metrics,
    }
    out_dir = out_dir or os.environ.get("KILN_RESULTS_DIR") or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    dev = rec["device"].replace(" ", "-").lower()
    path = os.path.join(out_dir, f"{benchmark}-{dev}-{now.strftime('%Y%m%dT%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps(rec["metrics"], indent=2))
    print(f"record: {path}")
    return path


def build_random_engine(model: str, out: str, *, dtype: str, device: str, tp: int = 1, pp: int = 1, ep: int = 1,
                        max_batch_size: int = 256, max_seq_len: int = 2048, max_num_tokens: int | None = None,
                        at_load: bool = False) -> str:
    """A random-weight engine of ``model`` at ``out`` through ``kiln build`` (kept if one is there);
    ``at_load`` writes no weight files (each rank draws its weights at load)."""
    if not os.path.exists(os.path.join(out, "engine.json")):
        t = time.time()
        cmd = [sys.executable, "-m", "kiln.launch.cli", "build", "--model", model, "--random-weights", "--dtype", dtype,
               "--device", device, "--tp", str(tp), "--pp", str(pp), "--ep", str(ep), "--output", out,
               "--max-batch-size", str(max_batch_size), "--max-seq-len", str(max_seq_len), "--quiet"]
        if max_num_tokens is not None:
            cmd += ["--max-num-tokens", str(max_num_tokens)]
        if at_load:
            cmd.append("--weights-at-load")
        subprocess.run(cmd, check=True)
        print(f"built {out} in {time.time() - t:.1f} s", flush=True)
    return out


def text_table(rows: list[dict], cols: list[str]) -> str:
    """``rows``' values under ``cols`` as right-aligned text columns, with a header line."""
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(cols, widths))]
    lines += ["  ".join(str(r.get(c)).rjust(wd) for c, wd in zip(cols, widths)) for r in rows]
    return "\n".join(lines)
