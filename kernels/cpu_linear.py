"""16-bit products on a CPU: ``F.linear`` in bfloat16 / float16 runs natively where the processor
has fast 16-bit matrix instructions, and many times slower where it has not (on an AVX2 core a
[1024, 576] x [576, 1536] bfloat16 product took 122 ms against 14 ms in float32). Where it is
slower, ``linear`` widens x, the weight and the bias to float32 (exact), multiplies, and rounds
the product to x's dtype once: the arithmetic of a 16-bit GEMM that accumulates in float32, which
is what GPU GEMMs do. Which is faster is measured once per process and dtype (``widen``), at
``MIN_ROWS`` rows and more; fewer rows keep the 16-bit product, which then reads less memory.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

MIN_ROWS = 16
_WIDEN: dict[torch.dtype, bool] = {}


def _time(fn, reps: int = 3) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t


def widen(dtype: torch.dtype) -> bool:
    """Whether float32 products beat native ``dtype`` ones on this CPU (measured on first use)."""
    hit = _WIDEN.get(dtype)
    if hit is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 512, generator=g).to(dtype)
        w = torch.randn(512, 512, generator=g).to(dtype)
        native = _time(lambda: F.linear(x, w))
        wide = _time(lambda: F.linear(x.float(), w.float()).to(dtype))
        hit = _WIDEN[dtype] = wide < 0.7 * native
    return hit


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for CPU tensors, widened to float32 where that is faster."""
    if (x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and x.numel() >= MIN_ROWS * x.shape[-1]
            and widen(x.dtype)):
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w, bias)
