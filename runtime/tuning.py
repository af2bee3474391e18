"""Load-time kernel choices kept in the engine directory between loads.

Loading an engine on a GPU times kernels for its shapes: the 16-bit GEMV configs
(``kiln.kernels.gemv``), the quantized projections' paths (``kiln.kernels.quant_triton``) and the
FP8-KV decode attention's config (``kiln.kernels.triton_attention``). The choices are written to
``<engine>/tuning/<gpu>-<hash>.json`` with the GPU, its compute capability and the torch, Triton,
CUDA and kiln versions they were made under; a later load with the same key reads them back and
times nothing it already has (kernels still compile, from Triton's own cache when it has them).
A file whose key differs is left alone and the load tunes afresh; an unreadable one is reported
and ignored; an engine directory that cannot be written keeps working without the file.
``KILN_TUNING_CACHE=0`` neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import torch

log = logging.getLogger("kiln.tuning")
FORMAT = 1


def enabled() -> bool:
    return os.environ.get("KILN_TUNING_CACHE", "1") != "0"


def device_key(device: torch.device) -> dict:
    """What the timings depend on besides the shapes: the GPU and the software that compiles."""
    import kiln

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {
        "format": FORMAT,
        "gpu": torch.cuda.get_device_name(index),
        "capability": list(torch.cuda.get_device_capability(index)),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "kiln": kiln.__version__,
    }


def cache_file(engine_dir: str, key: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", key["gpu"].lower()).strip("-") or "gpu"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(engine_dir, "tuning", f"{slug}-{digest}.json")


def _tables() -> dict:
    from kiln.kernels import gemv, quant_triton, triton_attention

    return {
        "gemv": gemv.tuned_table(),
        "quant": quant_triton.tuned_table(),
        "decode_attention": {h.split(":", 1)[1]: c for h, c in triton_attention.decode_tuned_table().items()},
    }


def restore(engine_dir: str, device: torch.device) -> bool:
    """Puts this GPU's saved choices for the engine back into the kernels' tables; True if
    there were any. A file from other hardware or software versions is not read."""
    if not enabled() or device.type != "cuda":
        return False
    key = device_key(device)
    path = cache_file(engine_dir, key)
    if not os.path.exists(path):
        return False
    from kiln.kernels import gemv, quant_triton, triton_attention

    try:
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") != key:
            log.info("event=tuning_cache_stale path=%s", path)
            return False
        t = saved["tables"]
        decode = {int(h): tuple(int(v) for v in c.split("x")) for h, c in t.get("decode_attention", {}).items()}
        for cfg in decode.values():
            if cfg not in triton_attention.DECODE_CONFIGS_FP8:
                raise ValueError(f"unknown decode attention config {cfg}")
        gemv_rows, quant_rows = list(t.get("gemv", [])), list(t.get("quant", []))
        gemv_before, quant_before = gemv.tuned_table(), quant_triton.tuned_table()
        try:
            gemv.load_table(gemv_rows)
            quant_triton.load_table(quant_rows)
        except Exception:
            gemv.clear_table()
            gemv.load_table(gemv_before)
            quant_triton.clear_table()
            quant_triton.load_table(quant_before)
            raise
        for head_tile, cfg in decode.items():
            triton_attention.set_decode_config(device, head_tile, cfg)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("event=tuning_cache_unreadable path=%s error=%s: tuning afresh", path, f"{type(e).__name__}: {e}")
        return False
    log.info("event=tuning_cache_restored path=%s gemv=%d quant=%d decode_attention=%d", path, len(gemv_rows),
             len(quant_rows), len(decode))
    return True


def store(engine_dir: str, device: torch.device) -> str | None:
    """Writes the kernels' current choices for this GPU into the engine directory (atomically);
    the path, or None where nothing was written."""
    if not enabled() or device.type != "cuda":
        return None
    key = device_key(device)
    path = cache_file(engine_dir, key)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"key": key, "tables": _tables()}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("event=tuning_cache_not_written path=%s error=%s", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    return path
