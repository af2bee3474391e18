"""Skinny matrix products for decode: ``y = x @ w.T`` with x [M, K] for small M (1 to 4 rows),
w [N, K] an ``nn.Linear`` weight (row-major, bfloat16 / float16 / float32), y [M, N] in x's dtype.

At these sizes the product only streams the weight once from device memory, so the goal is the
memory's read bandwidth. ``_gemv_kernel`` gives each program ``BLOCK_N`` weight rows; it walks K
in ``BLOCK_K`` chunks, multiplying each weight tile by the matching slice of its x rows into
float32 [BLOCK_N, BLOCK_K] accumulators (one per x row, up to four, so those rows share one read
of the weight), and reduces them across K once, after the loop. A config's ``rows`` caps the x
rows per program; further rows go to adjacent programs, which read the same weight rows at about
the same time (mostly from L2). Its ``num_stages`` is how many weight tiles each program keeps in
flight, loading ahead into registers: Triton's own pipelining leaves loads that feed no
``tl.dot`` alone, so the kernel does it itself and is launched with Triton's ``num_stages=1``.

Which config is fastest depends on the shape, M and the chip, and cuBLAS wins some cases (on an
H100, M=4 went to cuBLAS), so nothing is tuned at launch time:

* ``tune(shapes, dtype, device, m_values)`` times each config of ``configs(m, dtype)`` and
  ``F.linear`` per (M, N, K) on rotating weight copies too large for L2, as CUDA-graph replays,
  and keeps the fastest in a module-level table (``tuned_table()`` lists it as JSON-able rows,
  ``load_table(rows)`` puts such rows back).
* ``linear(x, w, bias=None)`` runs the Triton kernel where the table names a Triton winner for
  (M, N, K, dtype) and ``F.linear`` everywhere else on a GPU (untuned shapes, cuBLAS winners,
  ``KILN_GEMV=0``); CPU tensors go to ``cpu_linear.linear``. On a GPU it reads only the table and
  tensor metadata: no synchronisation, no allocation but the output, so it can be captured in a
  CUDA graph.
* ``gemv(x, w, config)`` launches the kernel with a given config (tests, benchmarks).
* ``gemv_ref(x, w, bias)`` is the float32 reference.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kiln.kernels import cpu_linear, triton_ops
from kiln.kernels.triton_ops import _gdc_enter, _jit, tl

MAX_ROWS = 4  # the most x rows one program serves (one float32 accumulator tile each)


class GemvConfig(NamedTuple):
    """One launch shape: BLOCK_N weight rows and BLOCK_K columns per tile; Triton's num_warps;
    num_stages, how many weight tiles each program has in flight (the loads of the next
    num_stages - 1 tiles are issued, into registers, before the current one is used); and
    ``rows``: at most this many x rows share one program (and one read of its weight rows);
    more x rows take adjacent programs, which read the same weight rows at about the same time,
    so that the repeats mostly come from L2."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    rows: int = MAX_ROWS

    @property
    def name(self) -> str:
        return f"n{self.block_n}k{self.block_k}w{self.num_warps}s{self.num_stages}r{self.rows}"

    @classmethod
    def parse(cls, name: str) -> "GemvConfig":
        m = re.fullmatch(r"n(\d+)k(\d+)w(\d+)s(\d+)(?:r(\d+))?", name)
        if m is None:
            raise ValueError(f"not a gemv config name: {name!r}")
        return cls(*(int(g) for g in m.groups() if g is not None))


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@_jit
def _x_chunk(ptrs, k0, K, offs_k, EVEN_K: tl.constexpr):
    if EVEN_K:
        x = tl.load(ptrs + k0)
    else:
        x = tl.load(ptrs + k0, mask=k0 + offs_k < K, other=0.0)
    return x.to(tl.float32)[None, :]


@_jit
def _w_tile(w_ptrs, k0, K, offs_k, EVEN_K: tl.constexpr, GUARD: tl.constexpr, SCALAR_MASK: tl.constexpr):
    """The weight tile at column k0, read straight to registers; with GUARD, none past K.
    SCALAR_MASK is off under Triton's interpreter, which takes only tensor masks."""
    if EVEN_K:
        if GUARD and SCALAR_MASK:
            w = tl.load(w_ptrs + k0, mask=k0 < K, other=0.0, eviction_policy="evict_first")
        elif GUARD:
            w = tl.load(w_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs + k0, mask=(k0 + offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
    return w


@_jit
def _store_row(y_ptr, acc, b, row, M, rows, n_mask, sym, HAS_BIAS: tl.constexpr, SCALAR_MASK: tl.constexpr):
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += b
    if SCALAR_MASK:
        mask = n_mask & (row < M)
    else:  # the interpreter takes only masks shaped like the pointers
        mask = n_mask & (tl.zeros_like(rows) + row < M)
    tl.store(y_ptr + row.to(tl.int64) * sym + rows, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _store_glu(y_ptr, acc, row, M, cols, c_mask, sym, HALF: tl.constexpr, SCALAR_MASK: tl.constexpr):
    """Tile rows alternate gate and up rows of the same output columns: y = silu(gate) * up."""
    g, u = tl.split(tl.reshape(tl.sum(acc, axis=1), [HALF, 2]))
    y = g / (1.0 + tl.exp(-g)) * u
    if SCALAR_MASK:
        mask = c_mask & (row < M)
    else:
        mask = c_mask & (tl.zeros_like(cols) + row < M)
    tl.store(y_ptr + row.to(tl.int64) * sym + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym, m_blocks,
    MB: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SCALAR_MASK: tl.constexpr = True,
    GLU: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # Programs that share weight rows (one per block of MB x rows) are adjacent in launch order.
    pid = tl.program_id(0)
    m0 = (pid % m_blocks) * MB
    nb = pid // m_blocks
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N read row N - 1 (and x rows past M read row M - 1), so the loads need no mask
    # along those axes; the stores drop them. With GLU, N is the output width and w holds 2N
    # rows (gate, then up): tile row i reads gate row c or up row N + c of column c = i // 2.
    if GLU:
        t = tl.arange(0, BLOCK_N)
        cols = nb * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        wrow = tl.minimum(nb * (BLOCK_N // 2) + t // 2, N - 1) + (t % 2) * N
    else:
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        wrow = tl.minimum(rows, N - 1)
    w_ptrs = w_ptr + wrow.to(tl.int64)[:, None] * swn + offs_k[None, :]
    x0 = x_ptr + m0.to(tl.int64) * sxm + offs_k
    x1 = x_ptr + tl.minimum(m0 + 1, M - 1).to(tl.int64) * sxm + offs_k
    x2 = x_ptr + tl.minimum(m0 + 2, M - 1).to(tl.int64) * sxm + offs_k
    x3 = x_ptr + tl.minimum(m0 + 3, M - 1).to(tl.int64) * sxm + offs_k
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    # STAGES weight tiles in flight: the loads of the next STAGES - 1 tiles are issued before
    # the current one is used (Triton's own pipelining leaves loads that feed no tl.dot alone).
    # The weights are no earlier kernel's output, so the first tiles load before the PDL wait.
    if STAGES > 1:
        wa = _w_tile(w_ptrs, 0, K, offs_k, EVEN_K, True, SCALAR_MASK)
    if STAGES > 2:
        wb = _w_tile(w_ptrs, BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
    if STAGES > 3:
        wc = _w_tile(w_ptrs, 2 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
    _gdc_enter(PDL)
    for k0 in range(0, K, BLOCK_K):
        if STAGES == 1:
            w = _w_tile(w_ptrs, k0, K, offs_k, EVEN_K, False, SCALAR_MASK)
        elif STAGES == 2:
            w = wa
            wa = _w_tile(w_ptrs, k0 + BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        elif STAGES == 3:
            w = wa
            wa = wb
            wb = _w_tile(w_ptrs, k0 + 2 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        else:
            w = wa
            wa = wb
            wb = wc
            wc = _w_tile(w_ptrs, k0 + 3 * BLOCK_K, K, offs_k, EVEN_K, True, SCALAR_MASK)
        w = w.to(tl.float32)
        acc0 += w * _x_chunk(x0, k0, K, offs_k, EVEN_K)
        if MB > 1:
            acc1 += w * _x_chunk(x1, k0, K, offs_k, EVEN_K)
        if MB > 2:
            acc2 += w * _x_chunk(x2, k0, K, offs_k, EVEN_K)
        if MB > 3:
            acc3 += w * _x_chunk(x3, k0, K, offs_k, EVEN_K)

    if GLU:
        c_mask = cols < N
        _store_glu(y_ptr, acc0, m0, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 1:
            _store_glu(y_ptr, acc1, m0 + 1, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 2:
            _store_glu(y_ptr, acc2, m0 + 2, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
        if MB > 3:
            _store_glu(y_ptr, acc3, m0 + 3, M, cols, c_mask, sym, BLOCK_N // 2, SCALAR_MASK)
    else:
        n_mask = rows < N
        b = 0.0
        if HAS_BIAS:
            b = tl.load(b_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)
        _store_row(y_ptr, acc0, b, m0, M, rows, n_mask, sym, HAS_BIAS, SCALAR_MASK)
        if MB > 1:
            _store_row(y_ptr, acc1, b, m0 + 1, M, rows, n_mask, sym, HAS_BIAS, SCALAR_MASK)
        if MB > 2:
            _store_row(y_ptr, acc2, b, m0 + 2, M, rows, n_mask, sym, HAS_BIAS, SCALAR_MASK)
        if MB > 3:
            _store_row(y_ptr, acc3, b, m0 + 3, M, rows, n_mask, sym, HAS_BIAS, SCALAR_MASK)


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """``x @ w.T (+ bias)`` by the Triton kernel with ``config``. x [M, K] and w [N, K] need unit
    stride along K (any row stride); bias [N] contiguous; returns (or fills) out [M, N] in x's dtype.
    With ``glu``, w is a fused [2I, K] gate/up weight and the result is ``silu(gate) * up`` [M, I]
    (``silu_and_mul`` of the product, in one kernel; no bias)."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert x.stride(1) == 1 and w.stride(1) == 1, "x and w need unit stride along K"
    m, k = x.shape
    n = w.shape[0]
    bn, bk, warps, stages, rows = config
    if glu:
        assert bias is None and n % 2 == 0 and bn >= 2, "glu takes an even gate/up weight, no bias, block_n >= 2"
        n //= 2
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    assert out.shape == (m, n) and out.stride(1) == 1
    mb = min(m, rows, MAX_ROWS)
    m_blocks = triton_ops._cdiv(m, mb)
    grid = (triton_ops._cdiv(n, bn // 2 if glu else bn) * m_blocks,)
    _gemv_kernel[grid](
        x, w, bias if bias is not None else w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), m_blocks,
        MB=mb, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
        SCALAR_MASK=os.environ.get("TRITON_INTERPRET") != "1", GLU=glu, num_warps=warps, num_stages=1,
        **triton_ops.launch_opts(x),
    )
    return out


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 product, [.., N] in float32."""
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

BLOCK_NS = (2, 4, 8, 16, 32)
BLOCK_KS = (256, 512, 1024, 2048)
WARPS = (4, 8)
STAGES = (1, 2, 3, 4)
ROWS = (1, 2, 4)


def all_configs() -> list[GemvConfig]:
    return [GemvConfig(n, k, w, s, r) for r in ROWS for n in BLOCK_NS for k in BLOCK_KS for w in WARPS for s in STAGES]


def config_fits(c: GemvConfig, m: int, dtype: torch.dtype) -> bool:
    """Whether a config is worth trying for M rows: its ``rows`` makes a difference at this M
    (1, or less than twice M), each thread loads at least one 16-byte vector of every weight
    tile, the float32 accumulators of its ``min(M, rows)`` x rows take at most 128 registers a
    thread, and those plus the weight tiles in flight at most 168."""
    m = max(int(m), 1)
    if c.rows != 1 and c.rows >= 2 * m:
        return False
    threads = 32 * c.num_warps
    tile = c.block_n * c.block_k
    size = dtype.itemsize
    if tile * size < 16 * threads:
        return False
    acc_regs = min(m, c.rows, MAX_ROWS) * tile // threads
    tile_regs = c.num_stages * tile * size // (4 * threads)
    return acc_regs <= 128 and acc_regs + tile_regs <= 168


# The default candidates: the configs that came within 2% of the fastest on some Llama-3-8B
# projection shape at M = 1, 2 or 4 in a full sweep of ``all_configs()`` on an H100 (bfloat16,
# Triton 3.6). ``rows`` only matters against M, so ``configs(m)`` keeps those that fit.
CONFIGS = [
    GemvConfig(*c) for c in [
        # one x row per program (M = 1; repeated reads of each weight tile for larger M)
        (4, 2048, 4, 1, 1), (4, 2048, 8, 1, 1), (2, 2048, 8, 1, 1), (4, 1024, 4, 1, 1), (2, 1024, 4, 1, 1),
        (2, 1024, 8, 1, 1), (2, 512, 4, 1, 1), (8, 512, 4, 1, 1), (4, 512, 4, 2, 1), (8, 1024, 4, 2, 1),
        (16, 1024, 8, 1, 1), (32, 256, 8, 1, 1),
        # two x rows per program
        (4, 1024, 4, 1, 2), (4, 1024, 4, 2, 2), (2, 1024, 4, 1, 2), (2, 1024, 4, 4, 2), (4, 512, 4, 1, 2),
        (8, 512, 4, 1, 2), (8, 512, 4, 2, 2), (8, 256, 4, 2, 2), (16, 256, 4, 1, 2),
        # four x rows per program
        (2, 1024, 4, 2, 4), (8, 256, 4, 2, 4), (8, 256, 4, 3, 4), (16, 256, 4, 2, 4),
    ]
]


def configs(m: int, dtype: torch.dtype = torch.bfloat16, full: bool = False) -> list[GemvConfig]:
    """The configs ``tune`` tries for an M-row product: those of ``CONFIGS`` that fit, or with
    ``full`` every fitting one of ``all_configs()`` (a few hundred)."""
    return [c for c in (all_configs() if full else CONFIGS) if config_fits(c, m, dtype)]


# ----------------------------------------------------------------------------------------------
# Tuning table and dispatch
# ----------------------------------------------------------------------------------------------

_CHOICE: dict[tuple, GemvConfig | None] = {}  # (M, N, K, dtype, glu) -> config, None for the torch path
_ROWS: dict[tuple, dict] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _enabled() -> bool:
    return os.environ.get("KILN_GEMV", "1") != "0"


def choice(m: int, n: int, k: int, dtype: torch.dtype, glu: bool = False) -> GemvConfig | None:
    """The tuned Triton config for (M, N, K, dtype) (with ``glu``, the fused gate/up product of
    an [N, K] weight), or None (untuned, or the torch path won)."""
    return _CHOICE.get((m, n, k, dtype, glu))


def _pick(x: torch.Tensor, w: torch.Tensor, bias, glu: bool):
    """(config, x as [M, K]) where the table names a Triton winner this call can take, else None."""
    if not (x.is_cuda and _CHOICE and _enabled() and triton_ops.available()) or w.dim() != 2:
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    cfg = _CHOICE.get((m, w.shape[0], k, x.dtype, glu))
    if (cfg is None or w.dtype != x.dtype or w.stride(1) != 1 or x.stride(-1) != 1 or w.device != x.device
            or (bias is not None and not (bias.dtype == x.dtype and bias.dim() == 1 and bias.is_contiguous()))):
        return None
    x2 = x if x.dim() == 2 else _as_rows(x, m, k)
    return None if x2 is None else (cfg, x2)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x [..., K], through the Triton kernel where ``tune`` found it
    fastest for this (M, N, K, dtype), M being the number of rows of x."""
    if x.device.type == "cpu":
        return cpu_linear.linear(x, w, bias)
    hit = _pick(x, w, bias, False)
    if hit is None:
        return F.linear(x, w, bias)
    y = gemv(hit[1], w, hit[0], bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.shape[0])


def linear_silu_mul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(linear(x, w))`` for a fused [2I, K] gate/up weight: one Triton kernel where
    ``tune(..., glu=True)`` found that fastest for this shape, else the product and then the
    activation kernel."""
    hit = _pick(x, w, None, True)
    if hit is None:
        from kiln.kernels.activation import silu_and_mul

        return silu_and_mul(linear(x, w))
    y = gemv(hit[1], w, hit[0], glu=True)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.shape[0] // 2)


def _as_rows(x: torch.Tensor, m: int, k: int):
    """x [..., K] as an [M, K] view, or None where no view has that shape."""
    try:
        return x.view(m, k)
    except RuntimeError:
        return None


def tuned_table() -> list[dict]:
    """One row per tuned (M, N, K, dtype, op): shape [M, N, K], dtype, op ("linear", or "glu" for
    the fused gate/up product), choice (a config name or "cublas", the torch path), us and gb_s
    of that choice, cublas_us, and the best Triton config with its us."""
    return [dict(r) for r in _ROWS.values()]


def load_table(rows) -> None:
    """Puts back rows of ``tuned_table()`` (from a record, or tuned in another process)."""
    for r in rows:
        m, n, k = (int(v) for v in r["shape"])
        dtype = getattr(torch, r["dtype"])
        key = (m, n, k, dtype, r.get("op", "linear") == "glu")
        _CHOICE[key] = None if r["choice"] == "cublas" else GemvConfig.parse(r["choice"])
        _ROWS[key] = dict(r)


def clear_table() -> None:
    _CHOICE.clear()
    _ROWS.clear()


# ----------------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------------


def _time_calls(fns, reps: int) -> float:
    """Median microseconds per call of the callables ``fns``, captured once each into one CUDA
    graph whose replays are timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return 1e3 * ms / len(fns)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def tune(shapes, dtype: torch.dtype = torch.bfloat16, device="cuda", m_values=(1,),
         candidates=None, reps: int = 20, min_bytes: int = 256 << 20, verbose: bool = False,
         glu: bool = False) -> list[dict]:
    """Times each config of ``configs(m, dtype)`` (or ``candidates``) and ``F.linear`` for each
    (N, K) of ``shapes`` and each M of ``m_values``, and records the fastest in the table that
    ``linear`` reads. With ``glu`` the shapes are fused gate/up weights and what is timed is the
    fused ``silu(gate) * up`` kernel against ``F.linear`` followed by ``silu_and_mul`` (the
    table that ``linear_silu_mul`` reads). Each timing is the median of ``reps`` CUDA-graph replays of one call per
    weight copy, over enough copies to total ``min_bytes`` (at least two), so the weight is read
    from device memory rather than L2. Configs whose result strays from the float32 product or
    that fail to compile are skipped. Returns the rows added to ``tuned_table()``."""
    device = torch.device(device)
    assert device.type == "cuda" and triton_ops.available(), "tuning needs a CUDA device and triton"
    assert not torch.cuda.is_current_stream_capturing(), "tune() cannot run inside a CUDA-graph capture"
    with torch.cuda.device(device):
        return _tune(shapes, dtype, device, m_values, candidates, reps, min_bytes, verbose, glu)


def _tune(shapes, dtype, device, m_values, candidates, reps, min_bytes, verbose, glu) -> list[dict]:
    from kiln.kernels.activation import silu_and_mul, silu_and_mul_ref

    size = dtype.itemsize
    tol = 1e-3 if dtype == torch.float32 else 1e-2  # a wrong kernel is off by O(1)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, k in shapes:
        n, k = int(n), int(k)
        copies = max(2, math.ceil(min_bytes / (n * k * size)))
        ws = [torch.randn((n, k), device=device, dtype=dtype, generator=gen) for _ in range(copies)]
        for m in m_values:
            m = int(m)
            x = torch.randn((m, k), device=device, dtype=dtype, generator=gen)
            ref = silu_and_mul_ref(gemv_ref(x, ws[0])) if glu else gemv_ref(x, ws[0])
            if glu:
                cublas_us = _time_calls([lambda w=w: silu_and_mul(F.linear(x, w)) for w in ws], reps)
            else:
                cublas_us = _time_calls([lambda w=w: F.linear(x, w) for w in ws], reps)
            best, best_us, tried = None, math.inf, 0
            for cfg in candidates if candidates is not None else configs(m, dtype):
                try:
                    err = _rel_err(gemv(x, ws[0], cfg, glu=glu), ref)
                    if not err < tol:
                        if verbose:
                            print(f"  {cfg.name}: relative error {err:.2e}, skipped")
                        continue
                    us = _time_calls([lambda w=w: gemv(x, w, cfg, glu=glu) for w in ws], reps)
                except Exception as e:  # out of resources for this tile, say
                    if verbose:
                        print(f"  {cfg.name}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                tried += 1
                if verbose:
                    print(f"  M={m} N={n} K={k} {cfg.name}: {us:.2f} us")
                if us < best_us:
                    best, best_us = cfg, us
            n_out = n // 2 if glu else n
            nbytes = (n * k + m * k + m * n_out) * size
            use_triton = best is not None and best_us < cublas_us
            us = best_us if use_triton else cublas_us
            row = dict(
                shape=[m, n, k], dtype=_dtype_name(dtype), op="glu" if glu else "linear",
                choice=best.name if use_triton else "cublas",
                us=round(us, 2), gb_s=round(nbytes / us / 1e3, 1), cublas_us=round(cublas_us, 2),
                cublas_gb_s=round(nbytes / cublas_us / 1e3, 1),
                triton_config=best.name if best is not None else None,
                triton_us=round(best_us, 2) if best is not None else None,
                configs_timed=tried, weight_copies=copies,
            )
            key = (m, n, k, dtype, glu)
            _CHOICE[key] = best if use_triton else None
            _ROWS[key] = row
            rows.append(row)
            if verbose:
                print(row)
        del ws
    return rows
