"""Mixture-of-experts feed-forward: top-k routing and the experts' SiLU-gated MLPs.

``w13``: [E_local, 2 * I, H] (gate rows then up rows), ``w2``: [E_local, H, I]. Experts outside
this rank's ``[first_expert, first_expert + E_local)`` contribute nothing here; the caller's
all-reduce sums the ranks' parts.
"""

from __future__ import annotations

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


def moe_forward(x, router_logits, w13, w2, top_k: int, renormalize: bool, first_expert: int = 0):
    return moe_forward_ref(x, router_logits, w13, w2, top_k, renormalize, first_expert)
