"""Overlapped scheduling with requests that read their history or the host: penalties, n > 1,
a grammar, min_tokens with logit bias and logprobs. Each rides in a batch of plain requests; the
outputs equal those of the same batch run without overlap (greedy and seeded sampling), and the
steps overlap while the request is in the batch instead of waiting for the host."""

from __future__ import annotations

import json
import random

import pytest

from kiln.runtime.engine import LLMEngine
from kiln.runtime.grammar import GrammarCompiler
from kiln.runtime.sampling_params import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}},
    },
    "required": ["name", "age", "tags"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PLAIN_TOKENS = 24


@pytest.fixture(scope="module")
def engine_dir(small_engine):
    return small_engine


def _engine(engine_dir, async_scheduling: bool, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 512)
    eng = LLMEngine(engine_dir, async_scheduling=async_scheduling, **kw)
    # The small model's byte tokenizer names no end-of-sequence token: give the grammar the model's.
    eng._grammars = GrammarCompiler(eng.tokenizer, eng.config.model.vocab_size, stop_token_ids=sorted(eng.eos_token_ids))
    return eng


def _special(kind: str, sampled: bool) -> SamplingParams:
    temp = dict(temperature=0.9, top_p=0.95, seed=17) if sampled else dict(temperature=0.0)
    if kind == "penalties":
        # A few tokens pushed up so far that only the penalties on their last use keep them from
        # coming back at once: a count that missed the token in flight would show.
        return SamplingParams(max_tokens=PLAIN_TOKENS, ignore_eos=True, repetition_penalty=1.4,
                              presence_penalty=0.6, frequency_penalty=1.5,
                              logit_bias={5: 4.0, 9: 4.0, 13: 4.0}, **temp)
    if kind == "n2":
        return SamplingParams(max_tokens=PLAIN_TOKENS, ignore_eos=True, n=2, **temp)
    if kind == "grammar":
        return SamplingParams(max_tokens=PLAIN_TOKENS, response_format=FORMAT, **temp)
    if kind == "min_bias_logprobs":
        # EOS is pushed up by the bias but banned until min_tokens; token 7 is banned outright.
        return SamplingParams(max_tokens=PLAIN_TOKENS, min_tokens=12, logit_bias={2: 8.0, 7: -100.0, 11: 3.0},
                              logprobs=3, **temp)
    raise ValueError(kind)


def _requests(kind: str, sampled: bool):
    rng = random.Random(3)
    reqs = []
    for i in range(6):
        prompt = [rng.randrange(3, 2048) for _ in range(rng.randint(4, 40))]
        reqs.append((f"plain{i}", prompt, SamplingParams(max_tokens=PLAIN_TOKENS, temperature=0.0, ignore_eos=True)))
    # Arrives with the plain ones, so it is in the batch from the first step on.
    reqs.insert(2, ("special", [rng.randrange(3, 2048) for _ in range(17)], _special(kind, sampled)))
    return reqs


def _run(engine: LLMEngine, reqs, watch: str = "special"):
    """Every request's outputs, and per step while ``watch`` is unfinished: (overlapped, tokens
    ``watch`` has after the step)."""
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    out, trace = {}, []
    while engine.has_unfinished():
        running = watch in engine.requests
        before = engine.overlapped_steps + engine.synced_steps, engine.overlapped_steps
        outs = engine.step()
        after = engine.overlapped_steps + engine.synced_steps, engine.overlapped_steps
        for o in outs:
            for c in o.outputs:
                assert all(t >= 0 for t in c.token_ids)
            if o.finished:
                out[o.request_id] = [
                    (c.token_ids, c.finish_reason, c.text,
                     None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in e.items()} for e in c.logprobs])
                    for c in o.outputs
                ]
        if running and after[0] > before[0]:
            trace.append(after[1] > before[1])
    assert engine.stats()["kv_blocks_used"] == 0
    engine.block_manager.check_invariants()
    return out, trace


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", ["penalties", "n2", "grammar", "min_bias_logprobs"])
def test_overlap_equals_sync_and_keeps_overlapping(engine_dir, kind, sampled):
    reqs = _requests(kind, sampled)
    sync, sync_trace = _run(_engine(engine_dir, False), reqs)
    eng = _engine(engine_dir, True)
    got, trace = _run(eng, reqs)
    assert got == sync
    assert not any(sync_trace)
    # The launches planned while the request ran: all but the first (nothing in flight yet).
    assert len(trace) >= PLAIN_TOKENS // 2
    assert sum(trace) >= len(trace) - 1, trace
    assert eng.executor.runner.num_device_inputs > 0
    stats = eng.stats()
    assert stats["overlapped_steps"] >= 0.8 * (stats["overlapped_steps"] + stats["synced_steps"])
    special = got["special"]
    if kind == "n2":
        assert len(special) == 2
        if sampled:
            assert special[0][0] != special[1][0]
    if kind == "penalties" and not sampled:
        # The penalties changed the output: the same request without them differs.
        plain_eng = _engine(engine_dir, True)
        free = [(r, p, SamplingParams(max_tokens=PLAIN_TOKENS, temperature=0.0, ignore_eos=True) if r == "special" else sp)
                for r, p, sp in reqs]
        assert _run(plain_eng, free)[0]["special"][0][0] != special[0][0]
    if kind == "min_bias_logprobs":
        toks = special[0][0]
        assert len(toks) >= 12 and 7 not in toks
        assert all(len(e) >= 3 for e in special[0][3])
        if not sampled:
            assert special[0][1] == "stop" and toks[-1] == 2  # EOS, as soon as min_tokens allowed it
    if kind == "grammar":
        toks, reason = special[0][0], special[0][1]
        assert reason in ("stop", "length")
        m = eng.grammars().matcher(FORMAT)
        assert all(m.accept(t) for t in toks)
        if reason == "stop":
            json.loads(special[0][2])


def test_grammar_advances_every_step_while_overlapping(engine_dir):
    """The grammar request gets a token on every step, as the plain ones do: its mask is applied
    once its last token reaches the host, while the step's forward pass is already running."""
    reqs = _requests("grammar", False)
    eng = _engine(engine_dir, True)
    for rid, prompt, params in reqs:
        eng.add_request(rid, prompt, params)
    counts = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == "special":
                counts.append(len(o.outputs[0].token_ids))
    assert counts[-1] >= 8
    # One more token per step from the first one on (the last count may end on an EOS drop).
    assert counts[:-1] == list(range(counts[0], counts[0] + len(counts) - 1))


class _NoLateMasks:
    """An executor that launches without waiting but cannot take masks after the launch."""

    def __init__(self, inner):
        self._inner = inner
        self.runner = inner.runner

    def execute(self, plan, allowed_masks=None):
        return self._inner.execute(plan, allowed_masks)

    def launch(self, plan, allowed_masks=None):
        return self._inner.launch(plan, allowed_masks)


def test_grammar_sits_out_where_masks_cannot_come_late(engine_dir):
    """Without late masks the grammar request skips the steps planned while its token is in
    flight; the rest of the batch still overlaps and every output is unchanged."""
    reqs = _requests("grammar", False)
    sync, _ = _run(_engine(engine_dir, False), reqs)
    base = _engine(engine_dir, True)
    eng = LLMEngine(loaded=base.loaded, executor=_NoLateMasks(base.executor), async_scheduling=True)
    eng._grammars = base._grammars
    assert eng.scheduler.grammar_waits
    got, trace = _run(eng, reqs)
    assert got == sync
    # While the plain requests run, every launch after the first overlaps.
    assert all(trace[1:PLAIN_TOKENS]), trace


def _mixed(seed: int, count: int):
    rng = random.Random(seed)
    kinds = ["plain", "penalties", "n2", "grammar", "min_bias_logprobs"]
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(3, 2048) for _ in range(rng.randint(2, 120))]
        kind = kinds[i % len(kinds)]
        sampled = i % 3 == 0
        if kind == "plain":
            sp = SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0, ignore_eos=True)
        else:
            sp = _special(kind, sampled).model_copy(update={"max_tokens": rng.randint(12, 30)})
            if sampled:
                sp = sp.model_copy(update={"seed": 1000 + i})
        reqs.append((f"r{i}", prompt, sp))
    return reqs


def _run_arrivals(engine: LLMEngine, reqs, per_step: int = 3):
    out, pending = {}, list(reqs)
    while pending or engine.has_unfinished():
        for rid, prompt, params in pending[:per_step]:
            engine.add_request(rid, prompt, params)
        pending = pending[per_step:]
        for o in engine.step():
            if o.finished:
                out[o.request_id] = [(c.token_ids, c.finish_reason) for c in o.outputs]
    assert engine.stats()["kv_blocks_used"] == 0
    engine.block_manager.check_invariants()
    return out


@pytest.mark.parametrize("policy", ["guaranteed_no_evict", "max_utilization"])
def test_mixed_arrivals_with_preemption_equal_sync(engine_dir, policy):
    """Every kind of request, arriving over time into a cache small enough to preempt (with the
    max_utilization policy): overlapped and synchronous runs give the same outputs."""
    reqs = _mixed(7, 30)
    kw = dict(num_kv_blocks=40, max_num_tokens=128, scheduler_policy=policy)
    sync = _run_arrivals(_engine(engine_dir, False, **kw), reqs)
    eng = _engine(engine_dir, True, **kw)
    got = _run_arrivals(eng, reqs)
    assert got == sync
    stats = eng.stats()
    if policy == "max_utilization":
        assert stats["preemptions"] > 0
    assert stats["overlapped_steps"] > 0.8 * (stats["overlapped_steps"] + stats["synced_steps"])


def test_gathering_arrivals_behind_a_prefill_step_equals_sync(engine_dir):
    """The engine core's rule for bursts: while a prefill step is in flight and requests keep
    arriving, it waits for that step (``finish_inflight``), reads what came, then plans. Mixed
    requests arriving a few per step give the same outputs as without overlap, the rule fires,
    and the drained step's outputs come with the next step."""
    from kiln.launch.engine_core import GATHER_ARRIVALS

    reqs = _mixed(11, 24)
    kw = dict(num_kv_blocks=512, max_num_tokens=128)
    sync = _run_arrivals(_engine(engine_dir, False, **kw), reqs)
    eng = _engine(engine_dir, True, **kw)
    out, pending, gathered = {}, list(reqs), 0
    while pending or eng.has_unfinished():
        for rid, prompt, params in pending[:3]:
            eng.add_request(rid, prompt, params)
        pending = pending[3:]
        if eng.inflight_prefills and eng.added_since_plan >= GATHER_ARRIVALS:
            eng.finish_inflight()
            assert eng._inflight is None and not eng.inflight_prefills
            gathered += 1
        for o in eng.step():
            if o.finished:
                out[o.request_id] = [(c.token_ids, c.finish_reason) for c in o.outputs]
    assert out == sync
    assert gathered > 0 and eng.added_since_plan == 0
    assert eng.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_survives_preemption(engine_dir):
    """A preempted seeded sequence draws on from where its generator stopped (the workers keep it
    until the sequence comes back): outputs with preemptions, overlapped or not, equal those of a
    cache that never preempts."""
    reqs = _mixed(11, 24)
    calm = _run_arrivals(_engine(engine_dir, False, num_kv_blocks=512, max_num_tokens=128), reqs)
    kw = dict(num_kv_blocks=64, max_num_tokens=128, scheduler_policy="max_utilization")
    for overlap in (False, True):
        eng = _engine(engine_dir, overlap, **kw)
        assert _run_arrivals(eng, reqs) == calm, overlap
        assert eng.stats()["preemptions"] > 0
        assert not eng.executor.runner._kept_generators  # none left behind
