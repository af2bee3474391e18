"""Host-to-device copies that never wait for the GPU.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the
stream, which would stall the host behind every queued kernel and defeat overlapped scheduling.
``h2d`` stages the values in pinned memory (PyTorch's caching host allocator, which keeps a
buffer alive until its copy has run) and enqueues the copy without waiting.
"""

from __future__ import annotations

import torch


def h2d(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or numpy array) as a tensor on ``device``; on a GPU, copied asynchronously."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
