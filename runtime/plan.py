"""The messages of one data path: coordinator -> workers (``StepPlan``) and back (``StepResult``).

The scheduler owns the requests and the block tables; the workers keep a copy of each running
sequence's state. A step plan therefore carries full data only for sequences the workers have
not seen (new, or resumed after preemption) and deltas for the rest: the tokens sampled since
the last step and the block-table entries that changed. Every sequence gets a token count for
this step; there are no separate prefill and decode phases. Both types are plain dataclasses of
ints, floats, strings and lists so they cross process boundaries as msgpack (``to_wire`` /
``from_wire``) without pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kiln.runtime.sampling_params import SamplingParams


@dataclass
class NewSeq:
    """A sequence the workers must (re)create: its whole state."""

    seq_id: int
    token_ids: list[int]          # prompt + tokens generated so far
    num_prompt_tokens: int
    num_computed: int             # leading tokens whose KV is already in the cache (prefix hits)
    num_tokens: int               # tokens to run this step, starting at num_computed
    block_table: list[int]
    params: dict                  # SamplingParams as a dict
    seed: int | None = None       # per-sequence generator seed (params.seed + index for n > 1)
    sample: bool = True           # whether this step ends at the sequence's last token and samples


@dataclass
class CachedSeq:
    """A sequence the workers know: what changed since its last step."""

    seq_id: int
    new_token_ids: list[int]      # tokens appended since the workers last saw it
    num_tokens: int
    block_start: int              # block-table entries from this index on are replaced by new_blocks
    new_blocks: list[int]
    sample: bool = True
    draft_token_ids: list[int] = field(default_factory=list)
    # speculative proposals run after the sequence's tokens this step (counted in num_tokens);
    # the workers keep them only for this step
    num_computed: int = -1        # >= 0: the sequence's computed tokens, reset after a speculative step


@dataclass
class StepPlan:
    step_id: int
    new: list[NewSeq] = field(default_factory=list)
    cached: list[CachedSeq] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)        # sequences the workers may forget
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies, src -> dst
    forks: list[tuple[int, int, int | None]] = field(default_factory=list)
    # (parent, child, seed): the child starts as a copy of the parent's state this step and samples
    # its first token from the parent's logits (it is listed in ``cached`` with num_tokens 0)
    prompt_logprobs: list[int] = field(default_factory=list)
    # sequences whose prompt rows in this step are scored (SamplingParams.prompt_logprobs)
    preempted: list[int] = field(default_factory=list)
    # of ``finished``: sequences preempted, to come back as new ones; the workers keep their
    # sampling generators, so a seeded sequence draws on where it left off

    @property
    def num_seqs(self) -> int:
        return len(self.new) + len(self.cached)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.new) + sum(s.num_tokens for s in self.cached)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict) -> "StepPlan":
        return cls(
            step_id=d["step_id"],
            new=[NewSeq(**s) for s in d["new"]],
            cached=[CachedSeq(**s) for s in d["cached"]],
            finished=list(d["finished"]),
            copies=[tuple(c) for c in d["copies"]],
            forks=[tuple(c) for c in d["forks"]],
            prompt_logprobs=list(d.get("prompt_logprobs", ())),
            preempted=list(d.get("preempted", ())),
        )


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class PromptLogprobs:
    """Log-probabilities of consecutive prompt tokens, scored by one prefill chunk of a sequence.

    Entry ``j`` is about the prompt token at position ``start + j`` given the tokens before it:
    its id, log-probability, rank in the vocabulary (1 is the most likely) and the ``top_ids`` /
    ``top_logprobs`` of the request's ``prompt_logprobs`` most likely tokens (empty lists for 0).
    """

    seq_id: int
    start: int
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class StepResult:
    step_id: int
    sampled: list[SampledToken] = field(default_factory=list)
    forward_s: float = 0.0
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)

    def to_wire(self) -> dict:
        d = asdict(self)
        for s in d["sampled"]:
            if s["top_logprobs"] is not None:
                s["top_logprobs"] = list(s["top_logprobs"].items())
        return d

    @classmethod
    def from_wire(cls, d: dict) -> "StepResult":
        out = []
        for s in d["sampled"]:
            tl = s.get("top_logprobs")
            out.append(SampledToken(**{**s, "top_logprobs": dict(tl) if tl is not None else None}))
        plp = [PromptLogprobs(**p) for p in d.get("prompt_logprobs", ())]
        return cls(step_id=d["step_id"], sampled=out, forward_s=d.get("forward_s", 0.0), prompt_logprobs=plp)


def params_from_wire(d: dict) -> SamplingParams:
    return SamplingParams.model_validate(d)
