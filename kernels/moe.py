"""Mixture-of-experts feed-forward: top-k routing and the experts' SiLU-gated MLPs.

``w13``: [E_local, 2 * I, H] (gate rows then up rows), ``w2``: [E_local, H, I]. Experts outside
this rank's ``[first_expert, first_expert + E_local)`` contribute nothing here; the caller's
all-reduce sums the ranks' parts.

The experts' GEMMs run either as a loop over experts (the plain-torch reference, used on the CPU)
or, on CUDA with bfloat16 weights where ``torch._grouped_mm`` exists (Hopper and later), as two
grouped GEMMs over rows sorted by expert, delimited by int32 end offsets: one for every expert's
``w13``, one for every expert's ``w2``. The grouped path needs no host synchronisation, so it can
be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kiln.kernels.activation import silu_and_mul


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, then top-k; weights renormalised to sum to one when asked.
    Returns (weights [T, k] in float32, expert ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def moe_forward_ref(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    """Loops over the local experts, running each on the tokens routed to it."""
    weights, ids = route(router_logits, top_k, renormalize)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == first_expert + e)
        if tok.numel() == 0:
            continue
        h = silu_and_mul(F.linear(x[tok], w13[e]))
        y = F.linear(h, w2[e]) * weights[tok, slot].unsqueeze(-1).to(x.dtype)
        out.index_add_(0, tok, y)
    return out


# ----------------------------------------------------------------------------------------------
# The experts' MLPs on rows already sorted by expert
# ----------------------------------------------------------------------------------------------


def expert_mlp_ref(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x`` [R, H] holds ``counts[e]`` rows for local expert e, expert by expert; returns each row
    through its expert's MLP, [R, H]. Rows after ``counts.sum()`` come back as zeros."""
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            h = silu_and_mul(F.linear(x[start : start + n], w13[e]))
            out[start : start + n] = F.linear(h, w2[e])
        start += n
    return out


def expert_mlp_grouped(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``expert_mlp_ref`` as two grouped GEMMs; rows after ``counts.sum()`` come back unspecified."""
    offs = torch.cumsum(counts.to(device=x.device), 0).to(torch.int32)
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs, out_dtype=x.dtype)
    h = silu_and_mul(h)
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs, out_dtype=x.dtype)


@functools.lru_cache(maxsize=None)
def _device_has_grouped_mm(index: int) -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(index)[0] >= 9


def grouped_mm_usable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """CUDA, bfloat16 throughout, a device with grouped GEMMs, and rows of whole 16-byte units."""
    if not (x.is_cuda and x.dtype == w13.dtype == w2.dtype == torch.bfloat16):
        return False
    if x.shape[-1] % 8 or w2.shape[-1] % 8:
        return False
    if any(t.data_ptr() % 16 for t in (w13, w2)):
        return False
    return _device_has_grouped_mm(x.device.index if x.device.index is not None else torch.cuda.current_device())


def expert_mlp(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The experts' MLPs on rows sorted by expert (``counts[e]`` rows for expert e): grouped GEMMs
    where usable, the reference loop otherwise. Rows after ``counts.sum()`` are unspecified."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if grouped_mm_usable(x, w13, w2):
        return expert_mlp_grouped(x.contiguous(), counts, w13, w2)
    return expert_mlp_ref(x, counts, w13, w2)


def expert_rows(rows: torch.Tensor, local: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *,
                grouped: bool) -> torch.Tensor:
    """Each row of ``rows`` [R, H] through the MLP of local expert ``local[r]``, with no host
    synchronisation (so it can be captured in a CUDA graph); rows whose id is outside
    ``[0, num_local)`` come back as zeros. ``grouped``: sort the rows by expert and run two grouped
    GEMMs; otherwise every local expert runs on every row and keeps the rows routed to it."""
    num_local = w13.shape[0]
    inside = (local >= 0) & (local < num_local)
    if grouped:
        key = torch.where(inside, local, num_local)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(num_local + 1, dtype=torch.int64, device=rows.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        y_sorted = expert_mlp_grouped(rows[order].contiguous(), counts[:num_local], w13, w2)
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
    else:
        y = torch.zeros_like(rows)
        for e in range(num_local):
            mine = (local == e).unsqueeze(-1).to(rows.dtype)
            y += F.linear(silu_and_mul(F.linear(rows, w13[e])), w2[e]) * mine
    return torch.where(inside.unsqueeze(-1), y, 0)


# ----------------------------------------------------------------------------------------------
# The whole layer on one rank
# ----------------------------------------------------------------------------------------------


def moe_forward_grouped(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    """``moe_forward_ref`` with grouped GEMMs and without host synchronisation: every (token, slot)
    row is sorted by local expert, rows routed to other ranks' experts sort last, past the final
    offset, and are dropped when the weighted rows are summed per token."""
    weights, ids = route(router_logits, top_k, renormalize)
    num_local = w13.shape[0]
    t, k = ids.shape
    local = ids.reshape(-1) - first_expert
    inside = (local >= 0) & (local < num_local)
    key = torch.where(inside, local, num_local)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    y_sorted = expert_mlp_grouped(x[order // k], counts[:num_local], w13, w2)
    y = torch.empty_like(y_sorted)
    y[order] = y_sorted
    w = (weights.reshape(-1) * inside).to(x.dtype).unsqueeze(-1)
    y = torch.where(inside.unsqueeze(-1), y * w, 0)
    return y.view(t, k, -1).sum(1)


def moe_forward_dense(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    """``moe_forward_ref`` without host synchronisation or grouped GEMMs: every local expert runs on
    every row, weighted by that row's routing weight for it (zero where it was not chosen), summed
    in expert order as the reference does. It reads every local expert, so it serves where nothing
    else can be captured in a CUDA graph (float32 or float16 weights, GPUs without grouped GEMMs)."""
    weights, ids = route(router_logits, top_k, renormalize)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        w_e = torch.where(ids == first_expert + e, weights, 0.0).sum(-1)
        h = silu_and_mul(F.linear(x, w13[e]))
        out += F.linear(h, w2[e]) * w_e.unsqueeze(-1).to(x.dtype)
    return out


def moe_forward(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    """The layer on this rank: the GEMV kernels of ``kiln.kernels.moe_triton`` for the fewest rows
    where opted in (``KILN_MOE_GEMV=1``), its fused kernels for few rows where opted in
    (``KILN_MOE_FUSED=1``); grouped GEMMs where usable; the dense path while a CUDA graph is being
    captured (the reference loop synchronises with the host); the reference loop elsewhere."""
    from kiln.kernels.moe_triton import fused_usable, gemv_usable, moe_forward_fused, moe_forward_gemv

    if x.shape[0] and gemv_usable(x, w13, w2, top_k):
        return moe_forward_gemv(x, router_logits, w13, w2, top_k, renormalize, first_expert)
    if x.shape[0] and fused_usable(x, w13, w2, top_k):
        return moe_forward_fused(x, router_logits, w13, w2, top_k, renormalize, first_expert)
    if x.shape[0] and grouped_mm_usable(x, w13, w2):
        return moe_forward_grouped(x, router_logits, w13, w2, top_k, renormalize, first_expert)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return moe_forward_dense(x, router_logits, w13, w2, top_k, renormalize, first_expert)
    return moe_forward_ref(x, router_logits, w13, w2, top_k, renormalize, first_expert)
