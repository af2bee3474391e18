"""Fused MoE for decode-sized batches: the (token, slot) rows routed to each local expert are sorted
into blocks of ``BLOCK_M`` rows on the device (no host synchronisation, every shape static), and
one Triton GEMM per projection walks the blocks, each program reading its block's expert: an
expert that no row chose is never read, one that several rows chose is read once per block.

* ``align(ids, num_local, first_expert, block_m)``: (rows [P] int32, block_expert [P / block_m]
  int32). ``rows`` lists, expert by expert, the flattened ``token * top_k + slot`` of each row
  routed to a local expert, each expert's run padded to whole blocks with ``T * top_k`` (no row);
  ``block_expert`` gives each block's local expert, -1 for blocks past the last one used. P is
  ``T * top_k + num_local * (block_m - 1)`` rounded up to a block: the most the padding can take.
* ``moe_forward_fused``: ``kiln.kernels.moe.moe_forward_ref`` with these kernels: the gate/up GEMM
  gathers x rows by token into sorted order, ``silu_and_mul``, the down GEMM writes each row's
  output times its routing weight back to its (token, slot) place, and the slots are summed per
  token. Rows routed to other ranks' experts stay zero (the caller's all-reduce adds them).

Each product is rounded to the activation dtype as ``F.linear`` is, and the down product is
multiplied by the routing weight in that dtype, as the reference does; only the summation order
differs. Under Triton's interpreter the same code runs on the CPU (the tests), with IEEE float32
products for float32 inputs.
"""

from __future__ import annotations

import os

import torch

from kiln.kernels import triton_ops
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.triton_ops import _cdiv, _jit, tl

__all__ = ["align", "moe_forward_fused", "fused_usable", "moe_forward_gemv", "gemv_usable", "BLOCK_M"]

BLOCK_M = 16
"""Rows per block: the smallest tile the tensor cores take."""

FUSED_MAX_ROWS = 64
"""The most (token, slot) rows a step may route for ``moe.moe_forward`` to take the fused path."""


def align(ids: torch.Tensor, num_local: int, first_expert: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows routed to each local expert in blocks of ``block_m`` (see the module docstring)."""
    t, k = ids.shape
    r = t * k
    dev = ids.device
    p = _cdiv(r + num_local * (block_m - 1), block_m) * block_m
    local = ids.reshape(-1).to(torch.int64) - first_expert
    inside = (local >= 0) & (local < num_local)
    key = torch.where(inside, local, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_local] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.cumsum(counts, 0) - counts  # where each key's run starts in sorted order
    rank = torch.arange(r, device=dev) - first[sorted_key]
    dest = torch.where(sorted_key < num_local, starts[sorted_key.clamp(max=num_local - 1)] + rank, p)
    rows = torch.full((p + 1,), r, dtype=torch.int32, device=dev)
    rows[dest] = order.to(torch.int32)
    blocks = torch.arange(p // block_m, device=dev, dtype=torch.int64)
    block_expert = torch.searchsorted(ends // block_m, blocks, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return rows[:p], block_expert


@_jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, out_ptr, rows_ptr, bexp_ptr, wt_ptr, N, K, R, sa, swe, swn, so,
    BY_TOKEN: tl.constexpr, TOP_K: tl.constexpr, SCATTER: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(bexp_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.load(rows_ptr + offs_m)
    valid = row < R
    if BY_TOKEN:
        a_row = tl.where(valid, row // TOP_K, 0)
    else:
        a_row = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    a_ptrs = a_ptr + a_row.to(tl.int64)[:, None] * sa + offs_k[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * swe + offs_n.to(tl.int64)[None, :] * swn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt)
    if SCATTER:
        # the product of two values of the output dtype, rounded once to it (a multiply in that dtype)
        wt = tl.load(wt_ptr + row, mask=valid, other=0.0).to(dt).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64)[:, None] * so + offs_n[None, :], (y.to(tl.float32) * wt[:, None]).to(dt),
                 mask=valid[:, None] & n_ok[None, :])
    else:
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * so + offs_n[None, :], y, mask=n_ok[None, :])


def _gemm(a, w, out, rows, bexp, r, *, by_token, top_k, scatter, weights=None, block_n=64, block_k=64):
    n, kdim = w.shape[1], w.shape[2]
    grid = (bexp.numel(), _cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, w, out, rows, bexp, weights if weights is not None else rows, n, kdim, r,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        BY_TOKEN=by_token, TOP_K=top_k, SCATTER=scatter, IEEE=a.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )


def moe_forward_fused(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    """``moe.moe_forward_ref`` by the fused kernels (see the module docstring); no host synchronisation."""
    from kiln.kernels.moe import route

    weights, ids = route(router_logits, top_k, renormalize)
    t, k = ids.shape
    r = t * k
    num_local, two_i, h_dim = w13.shape
    x = x.contiguous()
    rows, bexp = align(ids, num_local, first_expert)
    p = rows.numel()
    h = torch.zeros((p, two_i), dtype=x.dtype, device=x.device)
    _gemm(x, w13, h, rows, bexp, r, by_token=True, top_k=k, scatter=False)
    h = silu_and_mul(h)
    y = torch.zeros((r, h_dim), dtype=x.dtype, device=x.device)
    _gemm(h, w2, y, rows, bexp, r, by_token=False, top_k=k, scatter=True, weights=weights.reshape(-1).contiguous())
    return y.view(t, k, h_dim).sum(1)


def fused_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """Opted in (``KILN_MOE_FUSED=1``: the path is checked against the reference on CPUs under the
    interpreter, and not yet timed on a GPU), CUDA with Triton, few rows, contiguous experts."""
    if os.environ.get("KILN_MOE_FUSED") != "1":
        return False
    if not (x.is_cuda and triton_ops.available()) or x.shape[0] * top_k > FUSED_MAX_ROWS:
        return False
    return w13.is_contiguous() and w2.is_contiguous() and x.dtype == w13.dtype == w2.dtype


# ----------------------------------------------------------------------------------------------
# The fewest rows (a batch of one to a few tokens): one GEMV per (token, slot) pair
# ----------------------------------------------------------------------------------------------
GEMV_MAX_ROWS = 16
"""The most (token, slot) rows a step may route for ``moe.moe_forward`` to take the GEMV path."""


@_jit
def _moe_up_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, h_ptr, I, K, sx, swe, swn, first_expert, num_local,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[pair, n] = silu(gate) * up of the pair's expert on its token, for BLOCK_N columns n."""
    pair = tl.program_id(0)
    e = tl.load(ids_ptr + pair).to(tl.int64) - first_expert
    if (e < 0) | (e >= num_local):
        return  # another rank's expert: the down kernel never reads this row
    t = pair // TOP_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < I
    wg = w_ptr + e * swe + offs_n.to(tl.int64)[:, None] * swn + offs_k[None, :]
    wu = wg + I * swn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs_k < K
        xv = tl.load(x_ptr + t * sx + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.sum(tl.load(wg + k0, mask=m, other=0.0).to(tl.float32) * xv[None, :], axis=1)
        acc_u += tl.sum(tl.load(wu + k0, mask=m, other=0.0).to(tl.float32) * xv[None, :], axis=1)
    dt = h_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)  # each product rounded as F.linear's, then silu_and_mul's own roundings
    u = acc_u.to(dt).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(h_ptr + pair.to(tl.int64) * I + offs_n, (s * u).to(dt), mask=n_ok)


@_jit
def _moe_down_gemv_kernel(
    h_ptr, w_ptr, ids_ptr, wt_ptr, out_ptr, H, I, swe, swn, so, first_expert, num_local,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[t, n] = sum over the token's slots of (w2[e] . h[pair])[n] x its routing weight."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < H
    dt = out_ptr.dtype.element_ty
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        e = tl.load(ids_ptr + pair).to(tl.int64) - first_expert
        mine = (e >= 0) & (e < num_local)
        e = tl.where(mine, e, 0)
        k_end = tl.where(mine, I, 0)  # another rank's expert reads nothing and adds nothing
        w_rows = w_ptr + e * swe + offs_n.to(tl.int64)[:, None] * swn + offs_k[None, :]
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k_ok = k0 + offs_k < k_end
            hv = tl.load(h_ptr + pair.to(tl.int64) * I + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            acc += tl.sum(tl.load(w_rows + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * hv[None, :],
                          axis=1)
        wt = tl.load(wt_ptr + pair).to(dt).to(tl.float32)
        # the product rounded to the activation dtype, then the weight multiplied in it, as the reference
        out += (acc.to(dt).to(tl.float32) * wt).to(dt).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * so + offs_n, out.to(dt), mask=n_ok)


def moe_forward_gemv(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0,
                     block_n: int = 32, block_k: int = 128):
    """``moe.moe_forward_ref`` for a few tokens by two GEMV kernels and no sorting: the first runs
    each (token, slot) pair's gate and up rows with ``silu_and_mul`` fused, the second each
    token's down rows over its slots, weighted and summed. Every chosen expert is read once per
    pair; nothing synchronises with the host. Rows routed to other ranks' experts add nothing."""
    from kiln.kernels.moe import route

    weights, ids = route(router_logits, top_k, renormalize)
    t, k = ids.shape
    num_local, two_i, h_dim = w13.shape
    inter = two_i // 2
    x = x.contiguous()
    ids = ids.contiguous()
    h = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)
    _moe_up_gemv_kernel[(t * k, _cdiv(inter, block_n))](
        x, w13, ids, h, inter, h_dim, x.stride(0), w13.stride(0), w13.stride(1), first_expert, num_local,
        TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    out = torch.empty((t, h_dim), dtype=x.dtype, device=x.device)
    _moe_down_gemv_kernel[(t, _cdiv(h_dim, block_n))](
        h, w2, ids, weights.reshape(-1).contiguous(), out, h_dim, inter, w2.stride(0), w2.stride(1), out.stride(0),
        first_expert, num_local, TOP_K=k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def gemv_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> bool:
    """Opted in (``KILN_MOE_GEMV=1``: checked against the reference on CPUs under the interpreter,
    not yet timed on a GPU), CUDA with Triton, at most ``GEMV_MAX_ROWS`` rows, contiguous experts."""
    if os.environ.get("KILN_MOE_GEMV") != "1":
        return False
    if not (x.is_cuda and triton_ops.available()) or x.shape[0] * top_k > GEMV_MAX_ROWS:
        return False
    return w13.is_contiguous() and w2.is_contiguous() and x.dtype == w13.dtype == w2.dtype
