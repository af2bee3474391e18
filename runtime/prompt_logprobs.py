"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``), as vLLM defines them.

For a prompt ``t_0 .. t_{L-1}`` the request gets a list of ``L`` entries: ``None`` for ``t_0``,
then for each ``t_i`` a dict ``{token_id: Logprob}`` holding ``t_i`` itself (its log-probability
given ``t_0 .. t_{i-1}`` and its rank in the vocabulary) and the ``prompt_logprobs`` most likely
tokens at that position. Log-probabilities are ``log_softmax`` of the raw float32 logits.

Worker side (``launch_prompt_logprobs`` / ``finish_prompt_logprobs``): in a prefill chunk, row
``j`` of a sequence that starts at position ``s`` predicts the token at ``s + j + 1``; every row
but the one at the prompt's last token is scored. Logits are computed a slice of rows at a time
so memory stays bounded for large vocabularies, and only ids, log-probabilities and ranks go to
the host. Every rank of the last pipeline stage runs the same slices (``compute_logits`` gathers
the vocabulary across tensor-parallel ranks); only the sampling rank scores them.

Coordinator side (``add_prompt_logprobs``): entries arrive chunk by chunk and are kept by
position, so a prompt recomputed after preemption neither repeats nor loses one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.runtime.outputs import Logprob
from kiln.runtime.plan import PromptLogprobs
from kiln.runtime.transfer import h2d

SLICE_ELEMENTS = 1 << 25
"""Logits elements (float32) computed at once: 256 rows of a 128k vocabulary."""


@dataclass
class PromptSpan:
    """Rows of this step's hidden states that score prompt tokens of one sequence."""

    seq_id: int
    first_row: int      # row of the hidden states that predicts the token at ``start``
    start: int          # prompt position of the first scored token
    token_ids: list[int]
    num_top: int


@dataclass
class PendingPromptLogprobs:
    """Scores launched on the device, with their host copies in flight."""

    spans: list[PromptSpan]
    host: list[torch.Tensor]  # chosen logprobs [R], ranks [R], top values [R, K], top ids [R, K]


def prompt_spans(seq_ids, chunks: dict, seqs: dict) -> list[PromptSpan]:
    """The prompt rows to score among this step's chunks.

    ``chunks`` maps a sequence to ``(first row, first position, number of tokens)`` in this step;
    ``seqs`` to its mirrored state (``token_ids``, ``num_prompt``, ``params``)."""
    spans = []
    for sid in seq_ids:
        chunk = chunks.get(sid)
        st = seqs.get(sid)
        if chunk is None or st is None or st.params.prompt_logprobs is None:
            continue
        row, pos, n = chunk
        stop = min(pos + n, st.num_prompt - 1)  # the prompt's last row predicts the first output token
        if stop <= pos:
            continue
        spans.append(PromptSpan(sid, row, pos + 1, list(st.token_ids[pos + 1 : stop + 1]), st.params.prompt_logprobs))
    return spans


def launch_prompt_logprobs(model, hidden: torch.Tensor, spans: list[PromptSpan], score: bool) -> PendingPromptLogprobs | None:
    """Computes the logits of the spans' rows in slices and, when ``score``, gathers each target
    token's log-probability and rank and the top-N on the device; the host copies are enqueued
    without waiting. Ranks that only join the collectives pass ``score=False`` and get None."""
    if not spans:
        return None
    dev = hidden.device
    rows: list[int] = []
    targets: list[int] = []
    for sp in spans:
        rows.extend(range(sp.first_row, sp.first_row + len(sp.token_ids)))
        targets.extend(sp.token_ids)
    kmax = max(sp.num_top for sp in spans)
    vocab = model.cfg.vocab_size
    kmax = min(kmax, vocab)
    step = max(1, SLICE_ELEMENTS // max(vocab, 1))
    row_idx = h2d(rows, torch.long, dev)
    tgt = h2d(targets, torch.long, dev) if score else None
    parts: list[list[torch.Tensor]] = []
    for a in range(0, len(rows), step):
        logits = model.compute_logits(hidden.index_select(0, row_idx[a : a + step]))
        if not score:
            continue
        lp = torch.log_softmax(logits.float(), dim=-1)
        del logits
        chosen = lp.gather(1, tgt[a : a + step].unsqueeze(-1)).squeeze(-1)
        ranks = (lp > chosen.unsqueeze(-1)).sum(dim=-1) + 1
        if kmax > 0:
            top_vals, top_ids = lp.topk(kmax, dim=-1)
        else:
            top_vals = lp.new_empty((lp.shape[0], 0))
            top_ids = torch.empty((lp.shape[0], 0), dtype=torch.long, device=dev)
        parts.append([chosen, ranks, top_vals, top_ids])
    if not score:
        return None
    cat = [torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(4)]
    return PendingPromptLogprobs(spans, [t.to("cpu", non_blocking=True) for t in cat])


def finish_prompt_logprobs(pending: PendingPromptLogprobs | None) -> list[PromptLogprobs]:
    """The host-side results of ``launch_prompt_logprobs``; the caller has waited for the device."""
    if pending is None:
        return []
    chosen, ranks, top_vals, top_ids = (t.tolist() for t in pending.host)
    out = []
    r = 0
    for sp in pending.spans:
        m = len(sp.token_ids)
        k = sp.num_top
        out.append(PromptLogprobs(
            seq_id=sp.seq_id, start=sp.start, token_ids=list(sp.token_ids),
            logprobs=[float(x) for x in chosen[r : r + m]], ranks=[int(x) for x in ranks[r : r + m]],
            top_ids=[row[:k] for row in top_ids[r : r + m]], top_logprobs=[row[:k] for row in top_vals[r : r + m]],
        ))
        r += m
    return out


def add_prompt_logprobs(entries: list, pl: PromptLogprobs, decode) -> None:
    """Appends ``pl``'s entries to a request's list (``entries[i]`` is prompt position ``i``).

    Positions already present (a prompt recomputed after preemption) are skipped; ``decode``
    maps a list of token ids to their texts."""
    skip = len(entries) - pl.start
    if skip < 0:
        raise RuntimeError(
            f"prompt logprobs of sequence {pl.seq_id} start at position {pl.start} but only {len(entries)} are known"
        )
    if skip >= len(pl.token_ids):
        return
    ids = set(pl.token_ids[skip:])
    for row in pl.top_ids[skip:]:
        ids.update(row)
    order = sorted(ids)
    texts = dict(zip(order, decode(order)))
    for j in range(skip, len(pl.token_ids)):
        tok = pl.token_ids[j]
        entry = {tok: Logprob(pl.logprobs[j], pl.ranks[j], texts[tok])}
        tops = pl.top_ids[j] if pl.top_ids else []
        vals = pl.top_logprobs[j] if pl.top_logprobs else []
        for rank, (t, v) in enumerate(zip(tops, vals), start=1):
            if t not in entry:
                entry[t] = Logprob(v, rank, texts[t])
        entries.append(entry)
