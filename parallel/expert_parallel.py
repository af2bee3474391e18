"""Expert-parallel MoE: tokens go to the ranks that hold their experts and come back, by all-to-all.

Layout (see ``kiln.parallel.mapping``): a tensor-parallel group of ``tp = moe_tp x ep`` ranks
holds the experts split ``ep`` ways (``E / ep`` whole experts per expert-parallel slot) and each
expert's intermediate dimension split ``moe_tp`` ways. An expert-parallel (EP) group is the
``ep`` ranks that hold the same moe_tp slice of every slot's experts; together they hold that
slice of all experts. Every rank of the tensor-parallel group holds the same tokens.

One MoE layer with ``ep > 1``, on each rank:

1. Every rank routes all tokens (the router is replicated; top-k and each family's
   renormalisation as on one rank).
2. The tokens are cut into ``ep`` contiguous ranges of ``ceil(T / ep)`` (the last one shorter,
   possibly empty); EP rank r dispatches range r only.
3. Its (token, slot) rows are sorted by expert id, which also sorts them by owning EP rank
   (``expert // (E / ep)``). The per-expert row counts are exchanged first (an all-to-all of
   ``ep x E/ep`` integers), so every rank learns the split sizes of both transfers and how many of
   the rows it receives belong to each of its experts; the expert ids therefore travel in the
   counts, not beside the rows. The routing weights never leave the dispatching rank.
4. The hidden states go out by ``all_to_all_single`` with those split sizes; the receiver sorts
   its rows by local expert, runs the experts' MLPs on them (grouped GEMMs on Hopper,
   ``kiln.kernels.moe.expert_mlp``), restores the arrival order and sends the results back by a
   second all-to-all with the split sizes swapped.
5. The dispatching rank weights each returned row by its routing weight and sums a token's
   ``top_k`` rows: it now holds its token range's output, or with ``moe_tp > 1`` its moe_tp
   slice's part of it.

Combine. Each EP rank ends up with a disjoint token range, and with ``moe_tp > 1`` the moe_tp
ranks of one EP slot (which dispatched the same range) hold partial sums of it. The arrangement
used: an all-reduce over the moe_tp group on the range only (``T / ep`` rows), then an all-gather
of the ranges over the EP group. Per rank, with ring collectives, that moves
``(2 (moe_tp - 1) / tp + (ep - 1) / ep) T H`` elements. The alternative of scattering each range
into a zero ``[T, H]`` buffer and all-reducing over the whole tensor-parallel group moves
``2 (tp - 1) / tp T H``: twice as much when ``moe_tp == 1`` (an all-reduce is a reduce-scatter
plus an all-gather, and the ranges are disjoint, so the reduce-scatter half carries only zeros),
and more for every ``moe_tp > 1`` too. A reduce-scatter over moe_tp followed by an all-gather over
the whole tensor-parallel group moves exactly as much as the arrangement used, but needs ranges
that divide evenly ``tp`` ways. Ranges are padded to ``ceil(T / ep)`` rows for the all-gather, so
the gathered tensor cut to ``T`` rows is the token order.

Inside a CUDA graph (``ep_moe_forward_static``). The split sizes above are read on the host, which
a captured decode step cannot do. The static variant sends every EP rank a buffer of fixed
capacity instead: a token sends at most ``min(top_k, E / ep)`` rows to one rank, so ``ceil(T / ep)
x min(top_k, E / ep)`` rows per destination always suffice. A row's place in its destination's
buffer is its rank among this rank's rows bound there (a cumulative sum on the device), and the
local expert id of every row travels beside it (``-1`` in the unused places). Both all-to-alls
then have equal splits and fixed shapes, nothing is read on the host, and the receiver runs each
row through its expert (``kiln.kernels.moe.expert_rows``). At decode sizes the padding costs
little: 64 tokens, top-2 and ep = 2 send 64 rows of 4,096 bf16 values to each rank (0.5 MB).
"""

from __future__ import annotations

import torch

from kiln.kernels.moe import expert_mlp, expert_rows


def token_range(num_tokens: int, ep_size: int, ep_rank: int) -> tuple[int, int, int]:
    """(start, stop, padded length) of the tokens EP rank ``ep_rank`` dispatches."""
    chunk = -(-num_tokens // ep_size)
    start = min(ep_rank * chunk, num_tokens)
    return start, min(start + chunk, num_tokens), chunk


def ep_moe_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   comm) -> torch.Tensor:
    """The MoE layer's output for all ``T`` tokens of ``x`` [T, H], identical on every rank of the
    tensor-parallel group. ``weights`` / ``ids`` [T, k] are the routing (float32 weights, global
    expert ids); ``w13`` / ``w2`` hold this rank's ``E / ep`` experts (its moe_tp slice of them);
    ``comm`` provides ``ep_size``, ``ep_rank``, ``all_to_all``, ``moe_tp_all_reduce`` and
    ``ep_all_gather``."""
    ep, me = comm.ep_size, comm.ep_rank
    num_local = w13.shape[0]
    num_tokens, hidden = x.shape
    k = ids.shape[1]
    start, stop, chunk = token_range(num_tokens, ep, me)
    if chunk == 0:
        return torch.zeros_like(x)

    # Dispatch: this rank's (token, slot) rows sorted by expert, hence by destination rank.
    flat = ids[start:stop].reshape(-1)
    order = torch.argsort(flat, stable=True)
    send_counts = torch.bincount(flat, minlength=ep * num_local)
    recv_counts = comm.all_to_all(send_counts)
    counts = torch.stack([send_counts, recv_counts]).view(2, ep, num_local).cpu()
    input_splits = counts[0].sum(1).tolist()
    output_splits = counts[1].sum(1).tolist()
    recv = comm.all_to_all(x[start:stop][order // k], output_splits, input_splits)

    # Experts: the rows arrive grouped by source rank, then by local expert; regroup by expert.
    per_expert = counts[1].sum(0)
    local_ids = torch.arange(num_local).repeat(ep).repeat_interleave(counts[1].reshape(-1)).to(x.device)
    by_expert = torch.argsort(local_ids, stable=True)
    y_sorted = expert_mlp(recv[by_expert], per_expert, w13, w2)
    y = torch.empty_like(y_sorted)
    y[by_expert] = y_sorted

    # Combine: results return in the order the rows were sent; weight them and sum per token.
    back = comm.all_to_all(y, input_splits, output_splits)
    rows = torch.empty_like(back)
    rows[order] = back
    w = weights[start:stop].reshape(-1, 1).to(x.dtype)
    out = x.new_zeros(chunk, hidden)
    out[: stop - start] = (rows * w).view(stop - start, k, hidden).sum(1)
    out = comm.moe_tp_all_reduce(out)
    return comm.ep_all_gather(out)[:num_tokens]


def ep_moe_forward_static(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                          w2: torch.Tensor, comm, *, grouped: bool = False) -> torch.Tensor:
    """``ep_moe_forward`` with fixed-capacity all-to-alls and no host synchronisation, for steps
    captured in CUDA graphs (see the module docstring). Same arguments and result; ``grouped``
    runs the experts as grouped GEMMs (``kiln.kernels.moe.grouped_mm_usable``)."""
    ep, me = comm.ep_size, comm.ep_rank
    num_local = w13.shape[0]
    num_tokens, hidden = x.shape
    k = ids.shape[1]
    start, stop, chunk = token_range(num_tokens, ep, me)
    if chunk == 0:
        return torch.zeros_like(x)
    cap = chunk * min(k, num_local)  # rows one destination can receive from this rank

    # Dispatch: row j = (token start + j // k, slot j % k) goes to place pos[j] of rank dest[j]'s buffer.
    flat = ids[start:stop].reshape(-1)
    dest = torch.div(flat, num_local, rounding_mode="floor")
    bound = dest.unsqueeze(1) == torch.arange(ep, device=x.device)
    pos = (bound.to(torch.int64).cumsum(0) - 1).gather(1, dest.unsqueeze(1)).squeeze(1)
    place = dest * cap + pos
    send = x.new_zeros(ep * cap, hidden)
    send[place] = x[start:stop].repeat_interleave(k, 0)
    send_ids = torch.full((ep * cap,), -1, dtype=torch.int64, device=x.device)
    send_ids[place] = flat - dest * num_local
    recv = comm.all_to_all(send)
    recv_ids = comm.all_to_all(send_ids)

    # Experts, then the results go back to the places they came from.
    back = comm.all_to_all(expert_rows(recv, recv_ids, w13, w2, grouped=grouped))
    w = weights[start:stop].reshape(-1, 1).to(x.dtype)
    out = x.new_zeros(chunk, hidden)
    out[: stop - start] = (back[place] * w).view(stop - start, k, hidden).sum(1)
    out = comm.moe_tp_all_reduce(out)
    return comm.ep_all_gather(out)[:num_tokens]
