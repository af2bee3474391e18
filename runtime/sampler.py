"""Batched next-token sampling over one row of logits per sequence.

Per row, in order:

1. ``logit_bias`` added, then grammar ``allowed_mask`` and ``min_tokens`` masking (EOS and stop
   token ids get ``-inf``);
2. repetition penalty over prompt and output tokens (positive logits divided, negative multiplied);
3. presence and frequency penalties over output tokens only;
4. log-probabilities, taken from ``log_softmax`` of the logits so far (before temperature);
5. greedy argmax when ``temperature == 0``; otherwise temperature, top-k, top-p, min-p and one
   draw from the renormalised distribution.

A row whose masks leave no token allowed is sampled from its unmasked logits instead.

With overlapped scheduling a row's output may end in tokens the host has not seen yet (negative
placeholders): they count towards ``min_tokens``, and the penalties count them from
``inflight_token_ids``, their copies on the device. Nothing here reads the device back, so a
launched step's sampling never makes the host wait for its forward pass.

Draws use the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``), which picks index ``i``
with probability ``p_i``. Rows with their own generator draw their noise from it alone, so a
seeded row's token depends only on its seed, its logits and how many tokens it has drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams
from .transfer import h2d

_NEG_INF = float("-inf")


@dataclass
class SampleRow:
    """One sequence's sampling inputs for the current step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    eos_token_ids: tuple[int, ...] = ()
    allowed_mask: torch.Tensor | None = None
    inflight_token_ids: torch.Tensor | None = None
    # Overlapped scheduling: output tokens the host has not seen yet (negative placeholders in
    # ``output_token_ids``) as a 1-D long tensor on the logits' device, counted by the penalties.


@dataclass
class Draw:
    """A launched sampling step: the chosen tokens on the device, and their host copies in flight."""

    token_ids: torch.Tensor
    host_ids: torch.Tensor
    host_logprobs: list[torch.Tensor] | None
    logprob_info: dict[int, tuple[int, int]]


@dataclass
class SampleResult:
    """The chosen token and, when asked for, its log-probability details."""

    token_id: int
    logprob: float | None
    top_logprobs: dict[int, float] | None
    rank: int | None


def _needs_processing(row: SampleRow) -> bool:
    p = row.params
    if row.allowed_mask is not None or p.needs_penalties or p.logit_bias:
        return True
    if len(row.output_token_ids) < p.min_tokens and (row.eos_token_ids or p.stop_token_ids):
        return True
    return False


class Sampler:
    """Turns a ``[batch, vocab]`` logits tensor into one token per row."""

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @staticmethod
    def make_generator(seed: int, device="cpu") -> torch.Generator:
        """A generator for one seeded sequence, on the device its logits live on."""
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(int(seed))
        return g

    def shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of rows without a seed of their own, on ``device``."""
        key = torch.device(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=key)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(int(self._seed))
            self._generators[key] = g
        return g

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        return self.finish(self.launch(logits, rows))

    def launch(self, logits: torch.Tensor, rows: list[SampleRow]) -> "Draw":
        """Enqueues the sampling work and the copy of its results to the host; returns at once
        (on a GPU) with the chosen tokens still on the device. ``finish`` waits and unpacks."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        n, vocab = logits.shape
        if n != len(rows):
            raise ValueError(f"{n} logits rows but {len(rows)} sample rows")
        device = logits.device
        if n == 0:
            return Draw(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long), None, {})
        if logits.dtype != torch.float32:
            logits = logits.float()

        # Rows that only need argmax of the raw logits: one batched argmax.
        fast = [
            i for i, r in enumerate(rows)
            if r.params.greedy and r.params.logprobs is None and not _needs_processing(r)
        ]
        if len(fast) == n:
            return self.launch_greedy(logits)
        token_ids = torch.empty(n, dtype=torch.long, device=device)
        fast_set = set(fast)
        slow = [i for i in range(n) if i not in fast_set]
        if fast:
            fast_idx = h2d(fast, torch.long, device)
            token_ids[fast_idx] = logits.index_select(0, fast_idx).argmax(dim=-1)

        logprob_info: dict[int, tuple[int, int]] = {}
        lp_tensors: list[torch.Tensor] = []
        slow_rows = [rows[i] for i in slow]
        slow_idx = h2d(slow, torch.long, device)
        proc = self._processed(logits.index_select(0, slow_idx), slow_rows)

        chosen = self._choose(proc, slow_rows, device)
        token_ids[slow_idx] = chosen

        want = [j for j, r in enumerate(slow_rows) if r.params.logprobs is not None]
        if want:
            want_idx = h2d(want, torch.long, device)
            lp_tensors = self._logprobs(proc.index_select(0, want_idx), chosen.index_select(0, want_idx),
                                        [slow_rows[j].params.logprobs for j in want])
            for k, j in enumerate(want):
                logprob_info[slow[j]] = (k, slow_rows[j].params.logprobs)
        lp_host = [t.to("cpu", non_blocking=True) for t in lp_tensors] if lp_tensors else None
        return Draw(token_ids, token_ids.to("cpu", non_blocking=True), lp_host, logprob_info)

    def _processed(self, proc: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Steps 1-3 on ``proc`` (a copy of the rows' float32 logits, changed in place)."""
        vocab = proc.shape[1]
        unmasked = None
        masked = []
        for j, row in enumerate(rows):
            if row.allowed_mask is not None or len(row.output_token_ids) < row.params.min_tokens:
                if unmasked is None:
                    unmasked = proc.clone()
                if self._mask_row(proc, j, row, vocab):
                    masked.append(j)
            elif row.params.logit_bias:
                self._mask_row(proc, j, row, vocab)
        if masked:
            # A row whose masks left nothing allowed falls back to its unmasked logits.
            # Chosen on the device: reading ``dead`` on the host would wait for the forward pass.
            m_idx = h2d(masked, torch.long, proc.device)
            rows_now = proc.index_select(0, m_idx)
            dead = torch.isneginf(rows_now).all(dim=-1, keepdim=True)
            proc.index_copy_(0, m_idx, torch.where(dead, unmasked.index_select(0, m_idx), rows_now))
        for j, row in enumerate(rows):
            self._penalise_row(proc, j, row, vocab)
        return proc

    def distributions(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """What each row draws from, as ``launch`` would: steps 1-3, then for a sampled row
        temperature, top-k, top-p, min-p and the softmax (probabilities); a greedy row keeps its
        processed logits, whose argmax is its token. [rows, vocab] float32."""
        proc = self._processed(logits.float().clone(), rows)
        sampled = [j for j, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = h2d(sampled, torch.long, proc.device)
            proc[idx] = torch.softmax(self._filtered(proc.index_select(0, idx), [rows[j] for j in sampled]), dim=-1)
        return proc

    @staticmethod
    def launch_greedy(logits: torch.Tensor) -> "Draw":
        """``launch`` for rows that all take the plain argmax (greedy, no masks, penalties or
        logprobs): no per-row inputs needed."""
        token_ids = logits.argmax(dim=-1)
        return Draw(token_ids, token_ids.to("cpu", non_blocking=True), None, {})

    @staticmethod
    def finish(draw: "Draw") -> list[SampleResult]:
        """The host-side results of ``launch``; the caller has waited for the device (or runs on a CPU)."""
        ids_cpu = draw.host_ids.tolist()
        if draw.host_logprobs:
            chosen_lp, ranks, top_vals, top_ids = (t.tolist() for t in draw.host_logprobs)
        results: list[SampleResult] = []
        for i, tok in enumerate(ids_cpu):
            info = draw.logprob_info.get(i)
            if info is None:
                results.append(SampleResult(int(tok), None, None, None))
                continue
            k, num = info
            top = {int(t): float(v) for t, v in zip(top_ids[k][:num], top_vals[k][:num])}
            top[tok] = float(chosen_lp[k])
            results.append(SampleResult(int(tok), float(chosen_lp[k]), top, int(ranks[k])))
        return results

    @staticmethod
    def _mask_row(proc: torch.Tensor, j: int, row: SampleRow, vocab: int) -> bool:
        """Add the logit bias, apply the grammar mask and the min_tokens ban; say whether anything
        was masked."""
        p = row.params
        touched = False
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                proc[j, h2d(ids, torch.long, proc.device)] += h2d([p.logit_bias[t] for t in ids], proc.dtype, proc.device)
        if row.allowed_mask is not None:
            mask = row.allowed_mask
            if mask.device != proc.device:
                mask = h2d(mask, torch.bool, proc.device)  # through pinned memory: the host does not wait
            mask = mask.to(torch.bool)
            if mask.numel() < vocab:
                full = torch.zeros(vocab, dtype=torch.bool, device=proc.device)
                full[: mask.numel()] = mask
                mask = full
            elif mask.numel() > vocab:
                mask = mask[:vocab]
            proc[j].masked_fill_(~mask, _NEG_INF)
            touched = True
        if len(row.output_token_ids) < p.min_tokens:
            banned = [t for t in (*row.eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab]
            if banned:
                proc[j, h2d(banned, torch.long, proc.device)] = _NEG_INF
                touched = True
        return touched

    @staticmethod
    def _penalise_row(proc: torch.Tensor, j: int, row: SampleRow, vocab: int) -> None:
        """Penalties over the tokens the host knows plus the in-flight ones still on the device
        (the same multiset either way, so the same result with and without overlap)."""
        p = row.params
        device = proc.device
        # Nothing here reads the device back (no unique, no bincount), so the host never waits.
        inflight = row.inflight_token_ids
        if inflight is not None:
            inflight = inflight.to(device=device, dtype=torch.long).clamp(0, vocab - 1)
        if p.repetition_penalty != 1.0:
            seen = [t for t in (*row.prompt_token_ids, *row.output_token_ids) if 0 <= t < vocab]
            if seen or inflight is not None:
                idx = h2d(seen, torch.long, device)
                if inflight is not None:
                    idx = torch.cat([idx, inflight])
                hit = torch.zeros(vocab, dtype=torch.bool, device=device)
                hit[idx] = True
                vals = proc[j]
                pen = p.repetition_penalty
                proc[j] = torch.where(hit, torch.where(vals > 0, vals / pen, vals * pen), vals)
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            out = [t for t in row.output_token_ids if 0 <= t < vocab]
            if out or inflight is not None:
                ids = h2d(out, torch.long, device)
                if inflight is not None:
                    ids = torch.cat([ids, inflight])
                counts = torch.zeros(vocab, dtype=proc.dtype, device=device)
                counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=proc.dtype, device=device))
                proc[j] -= p.presence_penalty * (counts > 0).to(proc.dtype) + p.frequency_penalty * counts

    def _choose(self, proc: torch.Tensor, rows: list[SampleRow], device: torch.device) -> torch.Tensor:
        m, vocab = proc.shape
        chosen = proc.argmax(dim=-1)
        sampled = [j for j, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return chosen
        s_idx = h2d(sampled, torch.long, device)
        s_rows = [rows[j] for j in sampled]
        probs = torch.softmax(self._filtered(proc.index_select(0, s_idx), s_rows), dim=-1)
        noise = torch.empty_like(probs)
        shared = [k for k, r in enumerate(s_rows) if r.generator is None]
        if shared:
            g = self.shared_generator(device)
            sh = torch.empty((len(shared), vocab), dtype=probs.dtype, device=device).exponential_(generator=g)
            noise[h2d(shared, torch.long, device)] = sh
        for k, r in enumerate(s_rows):
            if r.generator is not None:
                gdev = r.generator.device
                e = torch.empty(vocab, dtype=probs.dtype, device=gdev).exponential_(generator=r.generator)
                noise[k] = e.to(device)
        noise.clamp_min_(torch.finfo(probs.dtype).tiny)
        picks = (probs / noise).argmax(dim=-1)
        chosen[s_idx] = picks
        return chosen

    @staticmethod
    def _filtered(x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Step 5 before the draw: temperature, top-k, top-p and min-p on sampled rows' logits
        (``x`` is a copy, scaled in place)."""
        vocab = x.shape[1]
        x.div_(h2d([r.params.temperature for r in rows], x.dtype, x.device).unsqueeze(-1))
        ks = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
        if any(ks):
            x = _apply_top_k(x, ks)
        ps = [r.params.top_p for r in rows]
        if any(pv < 1.0 for pv in ps):
            x = _apply_top_p(x, ps)
        mps = [r.params.min_p for r in rows]
        if any(mp > 0.0 for mp in mps):
            x = _apply_min_p(x, mps)
        return x

    @staticmethod
    def _logprobs(proc: torch.Tensor, chosen: torch.Tensor, nums: list[int]) -> list[torch.Tensor]:
        lp = torch.log_softmax(proc, dim=-1)
        chosen_lp = lp.gather(1, chosen.unsqueeze(-1)).squeeze(-1)
        ranks = (lp > chosen_lp.unsqueeze(-1)).sum(dim=-1) + 1
        kmax = max(nums)
        if kmax > 0:
            top_vals, top_ids = lp.topk(min(kmax, lp.shape[-1]), dim=-1)
        else:
            top_vals = lp.new_empty((lp.shape[0], 0))
            top_ids = torch.empty((lp.shape[0], 0), dtype=torch.long, device=lp.device)
        return [chosen_lp, ranks, top_vals, top_ids]


def _apply_top_k(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Keep each row's ``k`` largest logits (``k == 0``: all of them)."""
    vocab = x.shape[-1]
    k = h2d([kv if kv > 0 else vocab for kv in ks], torch.long, x.device)
    kmax = int(max(kv if kv > 0 else vocab for kv in ks))
    top_vals = x.topk(kmax, dim=-1).values
    kth = top_vals.gather(1, (k - 1).clamp_max(kmax - 1).unsqueeze(-1))
    drop = x < kth
    drop[k >= vocab] = False
    return x.masked_fill(drop, _NEG_INF)


def _apply_top_p(x: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Keep the fewest most likely tokens whose probability mass reaches ``p`` (at least one)."""
    top_p = h2d(ps, x.dtype, x.device)
    probs = torch.softmax(x, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p.unsqueeze(-1)
    drop_sorted[:, 0] = False
    drop_sorted[top_p >= 1.0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return x.masked_fill(drop, _NEG_INF)


def _apply_min_p(x: torch.Tensor, mps: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    min_p = h2d(mps, x.dtype, x.device)
    probs = torch.softmax(x, dim=-1)
    threshold = min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
    drop = probs < threshold
    return x.masked_fill(drop, _NEG_INF)
