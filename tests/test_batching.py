"""In-flight batching gives each request exactly what it gets alone: with requests arriving over
time, with chunked prefill, with a cache small enough to force preemption, with prefix caching on
and off, and through an abort storm. A divergence counts as equal only where the solo run's own
top-2 logits are within 1e-4 (its log-probabilities differ by the same amount as its logits)."""

from __future__ import annotations

import random

import pytest

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

TIE = 1e-4


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def engine_dir(small_engine):
    return small_engine


def make_workload(seed: int, count: int, max_prompt: int, max_out: int, shared_prefix: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 2048) for _ in range(shared_prefix)]
    reqs = []
    for i in range(count):
        n = rng.randint(1, max_prompt)
        body = [rng.randrange(3, 2048) for _ in range(n)]
        prompt = (prefix + body)[:n] if (shared_prefix and i % 2 == 0) else body
        reqs.append((f"r{i}", prompt, rng.randint(1, max_out)))
    return reqs


class SoloReference:
    """Each request run alone on a fresh-enough engine; cached across tests."""

    def __init__(self, engine_dir: str):
        self.engine = LLMEngine(engine_dir, num_kv_blocks=256, enable_prefix_caching=False)
        self.cache: dict[tuple, tuple[list[int], list[float]]] = {}

    def get(self, prompt: list[int], max_tokens: int):
        key = (tuple(prompt), max_tokens)
        if key not in self.cache:
            self.engine.add_request("solo", prompt, greedy(max_tokens))
            out = None
            while self.engine.has_unfinished():
                for o in self.engine.step():
                    out = o
            c = out.outputs[0]
            gaps = []
            for entry in c.logprobs:
                lps = sorted((lp.logprob for lp in entry.values()), reverse=True)
                gaps.append(lps[0] - lps[1] if len(lps) > 1 else float("inf"))
            self.cache[key] = (c.token_ids, gaps)
        return self.cache[key]


@pytest.fixture(scope="module")
def solo(engine_dir):
    return SoloReference(engine_dir)


def assert_matches_solo(outputs: dict, workload, solo: SoloReference, skip=()):
    ties = 0
    for rid, prompt, max_tokens in workload:
        if rid in skip:
            continue
        got = outputs[rid]
        ref, gaps = solo.get(prompt, max_tokens)
        assert len(got) == len(ref) == max_tokens, rid
        for i, (a, b) in enumerate(zip(got, ref)):
            if a != b:
                assert gaps[i] < TIE, f"{rid}: token {i} differs ({a} vs {b}) with a top-2 gap of {gaps[i]:.2e}"
                ties += 1
                break
    return ties


def run_over_time(engine: LLMEngine, workload, per_step: int = 2, abort: dict | None = None):
    """Adds ``per_step`` requests every step; aborts requests at the steps ``abort`` names."""
    pending = list(workload)
    outputs: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(min(per_step, len(pending))):
            rid, prompt, max_tokens = pending.pop(0)
            engine.add_request(rid, prompt, greedy(max_tokens))
        for rid, at in (abort or {}).items():
            if at == step:
                engine.abort_request(rid)
        for out in engine.step():
            assert all(t >= 0 for t in out.outputs[0].token_ids)  # never a placeholder
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        step += 1
    return outputs


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("in-flight", dict(num_kv_blocks=2048, max_num_tokens=512)),
        ("prefix-off", dict(num_kv_blocks=2048, max_num_tokens=512, enable_prefix_caching=False)),
        ("preemption", dict(num_kv_blocks=48, max_num_tokens=256, scheduler_policy="max_utilization")),
        ("no-evict", dict(num_kv_blocks=48, max_num_tokens=256)),
        # Overlapped scheduling: each step is planned before the last one's tokens are seen.
        ("async", dict(num_kv_blocks=2048, max_num_tokens=512, async_scheduling=True)),
        ("async-preemption", dict(num_kv_blocks=48, max_num_tokens=256, scheduler_policy="max_utilization",
                                  async_scheduling=True)),
    ],
)
def test_64_requests_equal_solo(name, kwargs, engine_dir, solo):
    workload = make_workload(seed=0, count=64, max_prompt=600, max_out=48, shared_prefix=300)
    engine = LLMEngine(engine_dir, **kwargs)
    outputs = run_over_time(engine, workload)
    ties = assert_matches_solo(outputs, workload, solo)
    stats = engine.stats()
    print(f"{name}: preemptions={stats['preemptions']} prefix_hit_rate={stats['prefix_cache_hit_rate']:.2f} ties={ties} steps={stats['steps']}")
    assert stats["kv_blocks_used"] == 0
    engine.block_manager.check_invariants()
    if name in ("preemption", "async-preemption"):
        assert stats["preemptions"] > 0
    if name == "no-evict":
        assert stats["preemptions"] == 0
    if name in ("in-flight", "async"):
        assert stats["prefix_cache_hit_rate"] > 0
    if kwargs.get("async_scheduling"):
        assert engine.executor.runner.num_device_inputs > 0  # steps really ran ahead of the host
    if name == "prefix-off":
        assert stats["prefix_cache_hit_rate"] == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_storm(engine_dir, solo, async_scheduling):
    rng = random.Random(5)
    workload = make_workload(seed=3, count=200, max_prompt=40, max_out=8, shared_prefix=16)
    abort = {rid: rng.randint(0, 60) for rid, _, _ in rng.sample(workload, len(workload) // 3)}
    engine = LLMEngine(engine_dir, num_kv_blocks=160, max_num_tokens=256, max_batch_size=48, scheduler_policy="max_utilization",
                       async_scheduling=async_scheduling)
    outputs = run_over_time(engine, workload, per_step=4, abort=abort)
    aborted_early = {rid for rid in abort if rid not in outputs or len(outputs[rid]) < dict((r, m) for r, _, m in workload)[rid]}
    assert_matches_solo(outputs, workload, solo, skip=set(abort))
    assert engine.stats()["kv_blocks_used"] == 0 and engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert aborted_early, "the storm aborted nothing mid-flight"


def test_request_that_can_never_fit_ends_with_error(engine_dir):
    engine = LLMEngine(engine_dir, num_kv_blocks=4)
    engine.add_request("big", list(range(100, 200)), greedy(4))
    engine.add_request("small", [100, 101], greedy(2))
    done = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished():
            break
    assert done["big"].error and "blocks" in done["big"].error
    assert done["big"].outputs[0].finish_reason == "error"
    assert len(done["small"].outputs[0].token_ids) == 2


def test_chunked_prefill_does_not_stall_decodes(engine_dir):
    engine = LLMEngine(engine_dir, num_kv_blocks=512, max_num_tokens=64)
    engine.add_request("decoder", [100, 200, 300], greedy(30))
    for _ in range(3):
        engine.step()
    engine.add_request("long", [7 + i % 2000 for i in range(600)], greedy(2))
    before = None
    for _ in range(5):
        plan_tokens = {o.request_id: len(o.outputs[0].token_ids) for o in engine.step()}
        assert "decoder" in plan_tokens  # the decode advanced every step while the prompt was chunked
        if before is not None:
            assert plan_tokens["decoder"] == before + 1
        before = plan_tokens["decoder"]


def _run_all(engine: LLMEngine, requests) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            for c in o.outputs:
                assert all(t >= 0 for t in c.token_ids)
            if o.finished:
                out[o.request_id] = [(c.token_ids, c.finish_reason, c.text) for c in o.outputs]
    assert engine.stats()["kv_blocks_used"] == 0
    engine.block_manager.check_invariants()
    return out


def test_async_scheduling_equals_sync_for_every_kind_of_request(engine_dir):
    """Seeded sampling, top-k/top-p, stop tokens hit mid-run, max_tokens 1, min_tokens, penalties
    and n = 2, mixed in one batch (which still overlaps)."""
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.randint(2, 40))] for _ in range(12)]
    probe = LLMEngine(engine_dir, num_kv_blocks=512)
    first = _run_all(probe, [(f"p{i}", p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
                             for i, p in enumerate(prompts)])

    def requests():
        reqs = []
        for i, p in enumerate(prompts):
            stop_tok = first[f"p{i}"][0][0][4]  # greedy requests stop at their fifth token
            kind = i % 6
            if kind == 0:
                sp = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_tok], ignore_eos=True)
            elif kind == 1:
                sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=i, ignore_eos=True)
            elif kind == 2:
                sp = SamplingParams(max_tokens=1, temperature=0.0)
            elif kind == 3:
                sp = SamplingParams(max_tokens=10, min_tokens=6, temperature=0.0, stop_token_ids=[stop_tok], logprobs=1)
            elif kind == 4:
                sp = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
            else:
                sp = SamplingParams(max_tokens=6, temperature=0.7, n=2, seed=100 + i, ignore_eos=True)
            reqs.append((f"r{i}", p, sp))
        return reqs

    sync = _run_all(LLMEngine(engine_dir, num_kv_blocks=512, async_scheduling=False), requests())
    eng = LLMEngine(engine_dir, num_kv_blocks=512, async_scheduling=True)
    got = _run_all(eng, requests())
    assert got == sync
    assert any(c[1] == "stop" for v in sync.values() for c in v)  # a stop token ended a request mid-run
    assert eng.executor.runner.num_device_inputs > 0
    assert eng.stats()["overlapped_steps"] > eng.stats()["synced_steps"]
    eng2 = LLMEngine(engine_dir, num_kv_blocks=512, async_scheduling=True)
    plain = [r for r in requests() if r[2].n == 1 and r[2].repetition_penalty == 1.0]
    assert _run_all(eng2, plain) == {k: v for k, v in sync.items() if k in {r[0] for r in plain}}
    assert eng2.executor.runner.num_device_inputs > 0


def test_load_time_warm_steps_leave_outputs_unchanged(engine_dir, solo):
    """The prefill, mixed and split-decode steps a GPU engine runs at load (so that nothing
    compiles on a request's path), its prefill steps at every row-count bucket and its two
    warm-up requests are valid steps: serving after them gives the same tokens, and the counts
    start from zero."""
    engine = LLMEngine(engine_dir, num_kv_blocks=64)
    engine.executor.runner.warm_kernels(max_seq_len=512, force=True)
    engine._warm_up()
    st = engine.stats()
    assert st["steps"] == 0 and st["running"] == st["waiting"] == 0 and not engine.requests
    assert st["kv_blocks_used"] == 0 and all(v == 0.0 for v in st["host_s"].values())
    for i, (_, prompt, n) in enumerate(make_workload(11, 4, 40, 6)):
        engine.add_request(f"w{i}", prompt, greedy(n))
        out = None
        while engine.has_unfinished():
            for o in engine.step():
                out = o
        assert out.outputs[0].token_ids == solo.get(prompt, n)[0]
