"""Speculative decoding: a proposer guesses the next tokens of a sequence, the target model checks
all of them in one forward pass, and the tokens it would have produced itself are kept.

* ``SpeculativeConfig`` is what ``LLM(..., speculative_config=...)`` takes, as vLLM users write it.
* A proposer has one method, ``propose(token_ids, k) -> list[int]``: at most ``k`` guesses of the
  tokens that follow ``token_ids``. ``NgramProposer`` (prompt lookup) needs no model: it finds the
  latest earlier occurrence of the sequence's last n tokens and proposes what followed it.
  ``DraftProposer`` (``runtime/draft.py``) runs a smaller engine over all speculating sequences at
  once and also returns the distributions its proposals were drawn from. ``MedusaProposer`` and
  ``EagleProposer`` (``runtime/heads.py``) read the target's hidden states and propose argmax
  chains (checked like n-gram proposals, ``q = 1`` at each token).
* ``ProposalLength`` decides how many tokens each sequence proposes from its running acceptance.
* ``verify`` decides, from the target's distribution at each of the ``k + 1`` positions, how many
  proposals stand and which token comes after them (the correction or the bonus token). Greedy
  rows keep the proposals that equal the target's argmax, so the output is the target's own token
  for token. Sampled rows use rejection sampling (Leviathan et al., 2023; Chen et al., 2023):
  proposal ``d`` with draft probability ``q(d)`` stands with probability ``min(1, p(d) / q(d))``;
  the first one that falls is replaced by a draw from ``max(0, p - q)`` renormalised, and when all
  stand one more token is drawn from ``p``. Every emitted token then has the target's
  distribution. A proposer without a distribution (n-gram) proposes with ``q = 1`` at its token.

Where the coordinator and the workers do their parts is in ``docs/speculative.md``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SPECULATIVE_TOKENS = 16

HEADS = ("medusa", "eagle")
"""Methods whose proposer reads the target's hidden states (``runtime/heads.py``)."""

GPU_STEP_TOKEN_BUDGET = 256
"""The default ``step_token_budget`` on a GPU. A decode step of an 8B-class model on a Hopper GPU
reads every weight once whatever its row count up to roughly the GPU's FLOP-to-byte ratio
(about 990 TFLOP/s over 4.8 TB/s for 16-bit weights: ~200 rows), so proposals verified below
that cost little; above it each row adds compute, and a proposal that falls is throughput lost
(at batch 256 no proposal is verified). A CPU is bound by arithmetic at any row count: no default
limit there, where tests exercise speculation at every batch size."""


NGRAM_MISS_LIMIT = 4
"""n-gram lookups in a row that may find nothing before a never-verified sequence waits for probe
steps (where steps overlap; see ``ProposalLength``)."""


class SpeculativeConfig(BaseModel):
    """How the engine speculates. ``method``: "ngram" (prompt lookup: proposals copied from earlier
    in the sequence), "draft" (a smaller model proposes: ``draft_engine`` is a kiln engine
    directory built like any other, with the target's tokenizer; ``model`` is accepted as another
    name for it, as vLLM users write it), "medusa" or "eagle" (heads trained on the target read its
    hidden states, ``runtime/heads.py``: ``model`` is their directory, in the layout their
    projects publish); ``num_speculative_tokens``: proposals per step and sequence at most;
    ``prompt_lookup_max`` / ``prompt_lookup_min``: the longest and shortest trailing n-gram looked
    up (the longest that matches wins); ``min_acceptance``: see ``ProposalLength`` (0 proposes
    ``num_speculative_tokens`` whenever lookup finds them); ``step_token_budget``: see
    ``within_budget`` and ``GPU_STEP_TOKEN_BUDGET``."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft", "medusa", "eagle"] = Field(description="the proposer")
    draft_engine: str | None = Field(None, description='method "draft": the draft model\'s engine directory')
    model: str | None = Field(None, description='the draft engine (method "draft") or the heads\' directory ("medusa", "eagle")')
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPECULATIVE_TOKENS, description="proposals per step at most")
    prompt_lookup_max: int = Field(4, ge=1, le=64, description="longest trailing n-gram looked up")
    prompt_lookup_min: int = Field(1, ge=1, le=64, description="shortest trailing n-gram looked up")
    min_acceptance: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="propose the j-th token only while the sequence's acceptance rate to the power j is at least this")
    step_token_budget: int | None = Field(
        None, ge=1, le=1 << 20,
        description="the most tokens a verifying step holds (decode rows plus proposals); proposals past it are "
                    "cut, lowest expected yield first (default: 256 on a GPU, no limit on a CPU)")

    @model_validator(mode="after")
    def _draft_engine(self) -> "SpeculativeConfig":
        if self.model is not None:
            if self.draft_engine is not None and self.draft_engine != self.model:
                raise ValueError("give the draft engine once: draft_engine and model name different directories")
            self.draft_engine, self.model = self.model, None
        if self.method == "draft" and not self.draft_engine:
            raise ValueError('method "draft" needs draft_engine: the draft model\'s engine directory')
        if self.method in HEADS and not self.draft_engine:
            raise ValueError(f'method "{self.method}" needs model: the directory of its heads')
        if self.method == "ngram" and self.draft_engine is not None:
            raise ValueError('draft_engine is only for method "draft", not \'ngram\'')
        return self

    @property
    def heads_dir(self) -> str | None:
        """The heads' directory of method "medusa" or "eagle"."""
        return self.draft_engine if self.method in HEADS else None


class ProposalLength:
    """How many tokens each sequence proposes, from its own running acceptance rate ``a`` (per
    proposal; an average over its recent verifications that starts at ``prior``): the largest
    ``j <= k_max`` with ``a ** j >= min_acceptance``, the chance that the j-th proposal is reached
    and stands against the cost of verifying it. A sequence whose proposals keep falling stops
    proposing and tries one proposal on probe steps (every ``probe_every`` engine steps), which
    updates ``a`` again. With ``miss_limit``, a sequence never verified whose last ``miss_limit``
    lookups found nothing also waits for probe steps: the engine then plans its steps ahead
    (overlapped scheduling) instead of waiting for every token to look the next proposal up."""

    def __init__(self, k_max: int, min_acceptance: float, prior: float = 0.5, decay: float = 0.5, probe_every: int = 16,
                 miss_limit: int | None = None):
        self.k_max, self.min_acceptance = k_max, min_acceptance
        self.prior, self.decay, self.probe_every, self.miss_limit = prior, decay, probe_every, miss_limit

    def k(self, rate: float | None, misses: int = 0, probe: bool = False) -> int:
        """Proposals for a sequence with running rate ``rate`` (None: no verification yet) whose
        last ``misses`` lookups found nothing; ``probe``: this is a probe step."""
        a = self.prior if rate is None else rate
        k = 0
        while k < self.k_max and a ** (k + 1) >= self.min_acceptance and a > 0:
            k += 1
        if k == 0:
            return 1 if probe else 0
        if rate is None and self.miss_limit is not None and misses >= self.miss_limit and not probe:
            return 0
        return k

    def probe_step(self, step: int) -> bool:
        return step % self.probe_every == self.probe_every - 1

    def update(self, rate: float | None, proposed: int, accepted: int) -> float:
        """The running rate after a verification of ``proposed`` proposals of which ``accepted`` stood."""
        return (1 - self.decay) * (self.prior if rate is None else rate) + self.decay * accepted / proposed



def parse_config(cfg: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """``speculative_config`` as given to ``LLM``: None, a dict or a ``SpeculativeConfig``;
    ValueError with one line for a method kiln does not run or a field out of range."""
    if cfg is None or isinstance(cfg, SpeculativeConfig):
        return cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(cfg).__name__}")
    try:
        out = SpeculativeConfig(**cfg)
    except Exception as e:  # pydantic's ValidationError: its first error, on one line
        errs = getattr(e, "errors", lambda: [])()
        if errs:
            loc = ".".join(str(x) for x in errs[0].get("loc", ()))
            msg = errs[0].get("msg", "").removeprefix("Value error, ")
            raise ValueError(f"speculative_config.{loc}: {msg}" if loc else f"speculative_config: {msg}") from None
        raise ValueError(f"speculative_config: {e}") from None
    if out.prompt_lookup_min > out.prompt_lookup_max:
        raise ValueError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max")
    return out


class NgramProposer:
    """Prompt lookup: for n from ``max_n`` down to ``min_n``, the latest earlier occurrence of the
    last n tokens; the tokens that followed it (at most k) are the proposal."""

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        size = len(token_ids)
        if size < 2 or k < 1:
            return []
        a = np.asarray(token_ids)
        for n in range(min(self.max_n, size - 1), self.min_n - 1, -1):
            # windows starting at 0 .. size - 1 - n: each is followed by at least one token
            windows = np.lib.stride_tricks.sliding_window_view(a[: size - 1], n)
            hits = np.flatnonzero((windows == a[size - n :]).all(axis=1))
            if hits.size:
                j = int(hits[-1]) + n
                return token_ids[j : j + k]
        return []


def verify(probs: torch.Tensor, draft: list[int], greedy: bool, generator: torch.Generator | None,
           draft_probs: torch.Tensor | None = None) -> tuple[int, int]:
    """(proposals that stand, the token after them) for one sequence.

    ``probs`` [k + 1, vocab]: the target's processed distribution at each position (greedy rows:
    any scores whose argmax is the target's token); ``draft`` the k proposals; ``draft_probs``
    [k, vocab] the proposer's distributions (None: all mass on each proposal). Random numbers come
    from ``generator`` (on ``probs``' device)."""
    k = len(draft)
    if probs.shape[0] != k + 1:
        raise ValueError(f"{probs.shape[0]} rows of target probabilities for {k} proposals")
    if greedy:
        target = probs.argmax(dim=-1).tolist()
        a = 0
        while a < k and target[a] == draft[a]:
            a += 1
        return a, target[a]
    dev = probs.device
    u = torch.rand(k, generator=generator, device=dev, dtype=torch.float64).tolist() if k else []
    for i, d in enumerate(draft):
        p_d = float(probs[i, d])
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        if q_d > 0 and u[i] < min(1.0, p_d / q_d):
            continue
        if draft_probs is None:
            residual = probs[i].clone()
            residual[d] = 0.0
        else:
            residual = (probs[i] - draft_probs[i]).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # p was all on d (rounding): nothing else to draw
            residual = probs[i]
        return i, _draw(residual, generator)
    return k, _draw(probs[k], generator)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index with probability proportional to ``weights`` (the exponential race)."""
    e = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=generator)
    e.clamp_min_(torch.finfo(torch.float32).tiny)
    return int((weights.float() / e).argmax())


def within_budget(wants: list[tuple[float | None, int]], budget: int | None, prior: float = 0.5) -> list[int]:
    """How many proposals each sequence verifies this step when the step has room for only
    ``budget`` of them (None: no limit): ``wants`` holds each sequence's running acceptance rate
    (None: not measured yet, ``prior`` stands in) and the proposals it would make. The j-th
    proposal of a sequence with rate a yields a ** j tokens on average, so the budget goes to the
    largest of those first; a sequence keeps its first proposals (a proposal beyond one that
    fell is never verified). Ties go to the earlier sequence."""
    ks = [max(0, int(k)) for _, k in wants]
    if budget is None or sum(ks) <= budget:
        return ks
    gains = []
    for i, (rate, k) in enumerate(wants):
        a = prior if rate is None else rate
        gains += [(-(a ** (j + 1)), i, j) for j in range(max(0, int(k)))]
    gains.sort()
    out = [0] * len(wants)
    for _, i, _ in gains[: max(0, budget)]:
        out[i] += 1
    return out
