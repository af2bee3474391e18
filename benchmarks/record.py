"""Benchmark records: one JSON file per run in benchmarks/results/ (API.md's "Benchmark records")."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

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
