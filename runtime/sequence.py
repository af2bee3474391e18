"""Coordinator-side request and sequence state.

A ``Request`` holds the prompt, sampling parameters and its ``n`` sequences. A ``Sequence`` is one
completion: its tokens (prompt + output), how many have their KV computed, and what the workers
were last told about it (so the next step plan carries only deltas).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.runtime.detokenizer import stop_holdback
from kiln.runtime.outputs import Logprob
from kiln.runtime.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int
    token_ids: list[int]
    num_prompt: int
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    bm_len: int = 0                      # tokens registered with the block manager
    sent_len: int = 0                    # tokens the workers know
    sent_table: list[int] | None = None  # block table the workers know (None: unknown to them)
    detok: object = None
    text: str = ""
    sent_text_len: int = 0
    sent_token_len: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    grammar: object = None               # a grammar matcher when the output is constrained
    num_pending: int = 0                 # trailing placeholders: tokens launched but not seen yet
    draft: list[int] | None = None       # speculative proposals for the next step (the scheduler takes them)
    spec_base: int = 0                   # num_computed before the speculative step in flight
    spec_k: int = 0                      # proposals in that step (0: none)
    spec_resync: bool = False            # the workers' num_computed must be reset on the next step
    spec_rate: float | None = None       # running share of its proposals that stood (None: none verified)
    spec_misses: int = 0                 # lookups in a row that found no proposal

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt : len(self.token_ids) - self.num_pending]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def visible_text(self) -> str:
        """The output text a caller may see now: while it runs, a tail that could begin one of
        its stop strings is held back."""
        stop = self.request.params.stop
        if stop and not self.finished:
            return self.text[: len(self.text) - stop_holdback(self.text, stop)]
        return self.text


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    error: str | None = None
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list | None = None  # entries known so far, by prompt position (None: not asked for)

    @property
    def finished(self) -> bool:
        return bool(self.seqs) and all(s.finished for s in self.seqs) and (self.forked or self.params.n == 1 or self.error is not None)

    def timings(self) -> dict[str, float]:
        """Arrival, first-token and finish times (``time.monotonic``) known so far."""
        m = {"arrival": self.arrival}
        if self.first_token_time is not None:
            m["first_token"] = self.first_token_time
        if self.finish_time is not None:
            m["finish"] = self.finish_time
        return m

    def max_hit_tokens(self) -> int | None:
        """Prompt tokens a (re)admitted sequence may take from the prefix cache: with prompt
        logprobs, only those whose successors are scored already (every other row must run)."""
        if self.prompt_logprobs is None:
            return None
        return max(0, len(self.prompt_logprobs) - 1)

    def wants_prompt_logprobs(self, start: int, num_tokens: int, num_prompt: int) -> bool:
        """Whether a chunk of ``num_tokens`` rows from position ``start`` scores prompt tokens not known yet."""
        return self.prompt_logprobs is not None and min(start + num_tokens, num_prompt - 1) >= len(self.prompt_logprobs)

    def sort_key(self) -> tuple:
        return (self.priority, self.arrival)
