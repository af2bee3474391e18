"""The paged KV cache: per layer, keys and values in ``[num_blocks, block_size, kv_heads, head_dim]``."""

from __future__ import annotations

import os

import torch

from kiln.runtime.transfer import h2d


class KVCache:
    """Per layer a (keys, values) pair of ``[num_blocks, block_size, kv_heads, head_dim]`` tensors
    in ``dtype``: the engine dtype, or float8_e4m3fn for an FP8 cache (one byte per element, so
    the same memory holds twice the tokens of a 16-bit one; its per-layer scales belong to the
    model, not to the cache)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers = [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(num_layers)]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block ``dst`` becomes a copy of block ``src`` in every layer."""
        src = h2d([p[0] for p in pairs], torch.long, self.device)
        dst = h2d([p[1] for p in pairs], torch.long, self.device)
        for k, v in self.layers:
            k, v = _raw(k), _raw(v)
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        """Keys and values of one block in every layer, at ``dtype``'s element size (1 for float8)."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def _is_float8(dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def _zeros(shape, dtype, device) -> torch.Tensor:
    """A zeroed cache tensor; a float8 one is allocated as bytes (all-zero bytes are +0.0)."""
    if _is_float8(dtype):
        return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


def _raw(cache: torch.Tensor) -> torch.Tensor:
    """The tensor that block copies go through: a float8 cache's bytes (``index_copy_`` has no
    float8 kernel on the CPU), any other cache itself."""
    return cache.view(torch.uint8) if _is_float8(cache.dtype) else cache


def gpu_memory_utilization() -> float:
    """The share of GPU memory kiln may fill (weights, KV cache, graphs): KILN_GPU_MEMORY_UTILIZATION, default 0.9."""
    raw = os.environ.get("KILN_GPU_MEMORY_UTILIZATION", "0.9")
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise ValueError(f"KILN_GPU_MEMORY_UTILIZATION must be a number in (0, 1], got {raw!r}")
    return v


def memory_block_capacity(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype, device,
                          utilization: float | None = None) -> int:
    """Blocks that fit in memory: on a GPU a share of the free memory after weights (see
    ``gpu_memory_utilization()``); on a CPU a quarter of the available RAM."""
    per_block = KVCache.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    dev = torch.device(device)
    if dev.type == "cuda":
        util = utilization if utilization is not None else gpu_memory_utilization()
        free, total = torch.cuda.mem_get_info(dev)
        budget = free - (1 - util) * total
    else:
        budget = host_available_memory() / 4
    return max(0, int(budget // per_block))


def host_available_memory() -> int:
    """Bytes the host can give without swapping: MemAvailable (free plus reclaimable page cache)
    where /proc/meminfo has it, free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def choose_num_blocks(capacity: int, block_size: int, max_batch_size: int, max_seq_len: int) -> int:
    """Enough blocks for every sequence at full length, capped by what memory holds."""
    need = -(-max_seq_len // block_size)
    if capacity < need:
        raise MemoryError(
            f"KV cache needs {need} blocks for one sequence of {max_seq_len} tokens but memory fits {capacity}: "
            "build with a smaller --max-seq-len or free memory"
        )
    return max(need, min(max_batch_size * need, capacity))
