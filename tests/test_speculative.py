"""Speculative decoding with the n-gram proposer: greedy outputs are the target's own token for
token (in-flight, under preemption, without prefix caching, through an abort storm that leaks no
block); at temperature 1 the first generated tokens keep the target's distribution (chi-square
over 20,000 seeded draws); the rejection sampler and the proposer on their own; bad configs."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from kiln.runtime import LLM
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import NgramProposer, ProposalLength, parse_config, verify
from test_batching import TIE, make_workload

SPEC = {"method": "ngram", "num_speculative_tokens": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Thousands of small per-sequence attention calls: one intra-op thread is far faster than
    several fighting over a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square with ``dof`` degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def homogeneity_p(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int]:
    """Two-sample chi-square test that ``a`` and ``b`` count draws of one distribution; categories
    with fewer than ``min_count`` draws in both samples together are pooled. (p-value, dof)."""
    na, nb = sum(a.values()), sum(b.values())
    cats = [c for c in set(a) | set(b) if a[c] + b[c] >= min_count]
    rest_a, rest_b = na - sum(a[c] for c in cats), nb - sum(b[c] for c in cats)
    table = [(a[c], b[c]) for c in cats] + ([(rest_a, rest_b)] if rest_a + rest_b else [])
    stat = 0.0
    for x, y in table:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    dof = len(table) - 1
    return chi2_sf(stat, dof), dof


# --- the pieces -----------------------------------------------------------------------------------
def test_ngram_proposer():
    p = NgramProposer(max_n=3, min_n=1)
    assert p.propose([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]  # the trigram [1, 2, 3] matched at 0
    assert p.propose([5, 1, 2, 9, 1, 2], 4) == [9, 1, 2]  # bigram; only three tokens follow it
    assert p.propose([1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # the latest occurrence wins
    assert p.propose([1, 2, 3], 2) == [] and p.propose([4], 2) == [] and p.propose([4, 4], 0) == []
    assert NgramProposer(max_n=2, min_n=2).propose([9, 3, 5, 3], 2) == []  # only a unigram matches


def test_verify_greedy():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # argmax 1, 0, 2
    assert verify(scores, [1, 0], True, None) == (2, 2)  # both stand, then the bonus token
    assert verify(scores, [1, 2], True, None) == (1, 0)  # the second falls: the target's token instead
    assert verify(scores[:1], [], True, None) == (0, 1)
    with pytest.raises(ValueError):
        verify(scores, [1], True, None)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_draft_probs):
    """Whatever the proposals, the first emitted token is distributed as p[0] and, when the first
    proposal stands, the second as p[1]."""
    g = torch.Generator().manual_seed(0)
    vocab, draws = 6, 20000
    p = torch.softmax(torch.randn(3, vocab, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(2, vocab, generator=g), dim=-1)
    first, second, stood = Counter(), Counter(), 0
    for _ in range(draws):
        if with_draft_probs:
            draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        else:
            draft = [2, 4]  # a proposer without a distribution: q is all on its token
        a, nxt = verify(p, draft, False, g, q if with_draft_probs else None)
        toks = [*draft[:a], nxt]
        first[toks[0]] += 1
        if a >= 1:
            stood += 1
            second[toks[1]] += 1
    for counts, probs in ((first, p[0]), (second, p[1])):
        n = sum(counts.values())
        stat = sum((counts[v] - n * float(probs[v])) ** 2 / (n * float(probs[v])) for v in range(vocab))
        assert chi2_sf(stat, vocab - 1) > 0.01, (counts, probs)
    if not with_draft_probs:
        assert abs(stood / draws - float(p[0, 2])) < 0.02  # proposal 2 stands with probability p(2)


def test_proposal_length_follows_acceptance():
    pl = ProposalLength(k_max=4, min_acceptance=0.02)
    assert pl.k(None, 0) == 4 and pl.k(0.9, 0) == 4  # 0.5 ** 4 >= 0.02
    assert pl.k(0.2, 0) == 2  # 0.2 ** 2 = 0.04 >= 0.02 > 0.2 ** 3
    assert pl.k(0.01) == 0 and pl.k(0.01, probe=True) == 1 and pl.k(0.0, probe=True) == 1  # one on probe steps
    assert [s for s in range(64) if pl.probe_step(s)] == [15, 31, 47, 63]
    assert pl.k(None, 50) == 4  # no miss limit: lookups every step
    backoff = ProposalLength(k_max=4, min_acceptance=0.02, miss_limit=4)
    assert backoff.k(None, 3) == 4 and backoff.k(None, 4) == 0 and backoff.k(None, 4, probe=True) == 4
    assert backoff.k(0.9, 40) == 4  # a sequence whose proposals stand keeps looking up
    rate = None
    for _ in range(6):  # nothing ever stands: the rate halves each time
        rate = pl.update(rate, 4, 0)
    assert rate == pytest.approx(0.5 ** 7) and pl.k(rate, 0) == 0
    assert pl.update(rate, 2, 2) > 0.5 and pl.k(pl.update(rate, 2, 2), 0) == 4
    assert ProposalLength(k_max=3, min_acceptance=0.0).k(0.001, 0) == 3  # 0 proposes up to k_max


class _Junk:
    """Proposes tokens the target never picks (its own vocabulary's last ids)."""

    def propose(self, token_ids, k):
        return [2047 - i for i in range(k)]


def test_falling_proposals_turn_speculation_down(small_engine):
    """A sequence whose proposals never stand stops proposing after a few steps (a probe every
    16 steps); its output stays the target's."""
    prompt = list(range(100, 140))
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ref = LLM(small_engine).generate([prompt], sp)[0].outputs[0].token_ids
    llm = LLM(small_engine, speculative_config=SPEC)
    llm.engine.proposer = _Junk()
    out = llm.generate([prompt], sp)[0].outputs[0].token_ids
    st = llm.stats()
    assert out == ref and 2047 not in ref
    assert st["spec_accepted_tokens"] == 0
    assert 0 < st["spec_proposed_tokens"] <= 4 + 4 + 2 + 1 + 1 + 1 + 64 // 16  # 0.5, 0.25, 0.125, ... then probes
    fixed = LLM(small_engine, speculative_config={**SPEC, "min_acceptance": 0.0})
    fixed.engine.proposer = _Junk()
    fixed.generate([prompt], sp)
    assert fixed.stats()["spec_proposed_tokens"] > 3 * st["spec_proposed_tokens"]


def test_bad_configs():
    assert parse_config(None) is None
    assert parse_config(SPEC).num_speculative_tokens == 4
    for cfg, words in (({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens"),
                       ({"method": "lookahead", "num_speculative_tokens": 2}, "method"),
                       ({"method": "eagle", "num_speculative_tokens": 2}, "needs model"),
                       ({"method": "draft", "num_speculative_tokens": 2}, "needs draft_engine"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo"),
                       ("ngram", "dict")):
        with pytest.raises(ValueError, match=words):
            parse_config(cfg)


# --- the engine -------------------------------------------------------------------------------------
def mixed_params(i: int, max_tokens: int) -> SamplingParams:
    """Greedy requests of several kinds: plain, repetition penalty, a stop token and min_tokens,
    logprobs (not speculated), n=2 (not speculated)."""
    kind = i % 6
    kw = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if kind == 1:
        kw["repetition_penalty"] = 1.3
    elif kind == 2:
        kw.update(stop_token_ids=[7 + i], min_tokens=min(3, max_tokens))
    elif kind == 3:
        kw["logprobs"] = 1
    elif kind == 4:
        kw["n"] = 2
    return SamplingParams(**kw)


def repetitive(workload):
    """Prompts that repeat themselves, so that n-gram lookup finds proposals."""
    return [(rid, (p[: max(2, len(p) // 3)] * 3)[: len(p)], m) for rid, p, m in workload]


class Solo:
    """Each request alone on an engine without speculation; greedy top-2 gaps (for near-ties)
    from a second run of the same request with logprobs."""

    def __init__(self, engine_dir: str):
        self.engine = LLMEngine(engine_dir, num_kv_blocks=256, enable_prefix_caching=False)
        self.cache: dict = {}

    def _run(self, prompt, params):
        self.engine.add_request("solo", prompt, params)
        out = None
        while self.engine.has_unfinished():
            for o in self.engine.step():
                out = o
        return out.outputs

    def get(self, prompt, params: SamplingParams):
        key = (tuple(prompt), params.model_dump_json())
        if key not in self.cache:
            outs = self._run(prompt, params)
            scored = self._run(prompt, params.model_copy(update={"logprobs": 2}))[0]
            gaps = []
            for entry in scored.logprobs:
                lps = sorted((lp.logprob for lp in entry.values()), reverse=True)
                gaps.append(lps[0] - lps[1] if len(lps) > 1 else float("inf"))
            self.cache[key] = ([o.token_ids for o in outs], gaps)
        return self.cache[key]


@pytest.fixture(scope="module")
def solo(small_engine):
    return Solo(small_engine)


def run_over_time(engine, workload, per_step=2, abort=None):
    pending = [(rid, p, mixed_params(int(rid[1:]), m)) for rid, p, m in workload]
    outputs, step = {}, 0
    while pending or engine.has_unfinished():
        for _ in range(min(per_step, len(pending))):
            engine.add_request(*pending.pop(0))
        for rid, at in (abort or {}).items():
            if at == step:
                engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = [o.token_ids for o in out.outputs]
        step += 1
    return outputs


def assert_equal_solo(outputs, workload, solo, skip=()):
    ties = 0
    for rid, prompt, max_tokens in workload:
        if rid in skip:
            continue
        ref, gaps = solo.get(prompt, mixed_params(int(rid[1:]), max_tokens))
        got = outputs[rid]
        assert len(got) == len(ref), rid
        for g, r in zip(got, ref):
            if g != r:
                i = next(i for i, (a, b) in enumerate(zip(g, r)) if a != b)
                assert gaps[i] < TIE, f"{rid}: token {i} differs ({g[i]} vs {r[i]}) with a top-2 gap of {gaps[i]:.2e}"
                ties += 1
    return ties


@pytest.mark.parametrize("name, kwargs", [
    ("in-flight", dict(num_kv_blocks=2048, max_num_tokens=512)),
    ("prefix-off", dict(num_kv_blocks=2048, max_num_tokens=512, enable_prefix_caching=False)),
    ("preemption", dict(num_kv_blocks=40, max_num_tokens=256, scheduler_policy="max_utilization")),
    # verifying steps as decode rows (what CUDA graphs run), and steps planned ahead where no lookup is due
    ("decode-rows+overlap", dict(num_kv_blocks=2048, max_num_tokens=512, async_scheduling=True)),
])
def test_greedy_equals_the_target_alone(name, kwargs, small_engine, solo):
    workload = repetitive(make_workload(seed=1, count=64, max_prompt=300, max_out=40, shared_prefix=120))
    engine = LLMEngine(small_engine, speculative_config=SPEC, **kwargs)
    if name == "decode-rows+overlap":
        engine.executor.runner.verify_as_decode = True
    outputs = run_over_time(engine, workload)
    ties = assert_equal_solo(outputs, workload, solo)
    st = engine.stats()
    print(f"{name}: proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']} "
          f"preemptions={st['preemptions']} ties={ties}")
    assert st["spec_accepted_tokens"] > 0 and st["spec_proposed_tokens"] > st["spec_accepted_tokens"]
    if name == "decode-rows+overlap":
        assert st["overlapped_steps"] > 0 and st["synced_steps"] > 0, st
    assert st["kv_blocks_used"] == 0
    engine.block_manager.check_invariants()
    if name == "preemption":
        assert st["preemptions"] > 0


def test_abort_storm_leaks_nothing(small_engine, solo):
    rng = random.Random(5)
    workload = repetitive(make_workload(seed=3, count=120, max_prompt=40, max_out=12, shared_prefix=16))
    abort = {rid: rng.randint(0, 40) for rid, _, _ in rng.sample(workload, len(workload) // 3)}
    engine = LLMEngine(small_engine, num_kv_blocks=160, max_num_tokens=256, max_batch_size=48,
                       scheduler_policy="max_utilization", speculative_config=SPEC)
    outputs = run_over_time(engine, workload, per_step=4, abort=abort)
    assert_equal_solo(outputs, workload, solo, skip=set(abort))
    assert engine.stats()["spec_accepted_tokens"] > 0
    assert engine.stats()["kv_blocks_used"] == 0 and engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_invariants()
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def peaked_engine(tmp_path_factory):
    """A tiny Llama with large weights: its next-token distributions are far from uniform."""
    import transformers

    from conftest import build_small

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   initializer_range=1.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("peaked-hf")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return build_small(str(d), str(tmp_path_factory.mktemp("eng") / "peaked"), max_seq_len=256)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_keeps_the_target_distribution(peaked_engine, top_p):
    """The first three generated tokens over 20,000 seeded draws at temperature 1: with and
    without speculation, one distribution (chi-square homogeneity, p > 0.01). The prompt is the
    model's own greedy text, so that lookup finds proposals the model may accept."""
    draws = 20000
    x = [3, 17, 5, 9, 12, 200, 41]
    plain = LLM(peaked_engine, max_batch_size=512, max_num_tokens=4096)
    prompt = x + plain.generate([x], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0].outputs[0].token_ids
    # other seeds for the second sample: the two must be independent draws
    params = [[SamplingParams(max_tokens=4, temperature=1.0, top_p=top_p, ignore_eos=True, seed=i + run * draws)
               for i in range(draws)] for run in range(2)]
    base = Counter(tuple(o.outputs[0].token_ids[:3]) for o in plain.generate([prompt] * draws, params[0]))
    spec = LLM(peaked_engine, max_batch_size=512, max_num_tokens=4096,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    got = Counter(tuple(o.outputs[0].token_ids[:3]) for o in spec.generate([prompt] * draws, params[1]))
    st = spec.stats()
    p, dof = homogeneity_p(base, got)
    print(f"top_p={top_p}: p={p:.3f} dof={dof} proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']}")
    assert st["spec_accepted_tokens"] >= 500 and st["spec_proposed_tokens"] >= 5 * st["spec_accepted_tokens"]
    assert dof >= 20 and not math.isnan(p) and p > 0.01


def test_per_request_opt_out(small_engine):
    """``SamplingParams(speculative=False)`` runs as a plain row beside requests that speculate."""
    prompt = [7, 8, 9, 10] * 12
    llm = LLM(small_engine, speculative_config=SPEC)
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, speculative=False))
    assert llm.stats()["spec_proposed_tokens"] == 0
    both = llm.generate([prompt, prompt], [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, speculative=s)
                                           for s in (False, True)])
    assert llm.stats()["spec_proposed_tokens"] > 0
    assert both[0].outputs[0].token_ids == both[1].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_refusals(small_engine):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(small_engine, speculative_config={"method": "eagle", "num_speculative_tokens": 2, "model": small_engine + "-nope"})
    with pytest.raises(ValueError, match="local and torchrun"):
        LLM(small_engine, launcher="ray", speculative_config=SPEC)


def test_served_through_the_engine_core(small_engine):
    """``kiln serve --speculative ngram``'s engine core: the openai client gets the target's own
    greedy text, and /metrics counts proposed and accepted tokens."""
    import openai

    from kiln.launch.core_client import CoreClient
    from kiln.launch.server import build_app
    from server_helpers import CoreProcess, ServerThread, metric

    llm = LLM(small_engine)
    prompts = [list(range(40, 60)) * 3, [7, 8, 9, 10] * 12]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    core = CoreProcess(small_engine, speculative_config=SPEC)
    try:
        cfg = llm.engine.config
        client = CoreClient(core.address, tokenizer=llm.tokenizer, add_bos=cfg.tokenizer.add_bos_token,
                            max_seq_len=cfg.build.max_seq_len)
        with ServerThread(build_app(client, model_name="small")) as srv:
            oai = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
            for p, want in zip(prompts, ref):
                r = oai.completions.create(model="small", prompt=p, max_tokens=24, temperature=0,
                                           extra_body={"ignore_eos": True})
                assert r.choices[0].text == llm.tokenizer.decode(want)
            text = __import__("httpx").get(srv.url + "/metrics").text
            assert metric(text, "kiln_spec_accepted_tokens_total") > 0
            assert metric(text, "kiln_spec_proposed_tokens_total") >= metric(text, "kiln_spec_accepted_tokens_total")
    finally:
        core.stop()


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(tp=2, pp=2)])
def test_parallel_layouts_equal_one_rank(layout, small_checkpoint, tmp_path):
    """Ranks that do not sample learn how many proposals stood from the next step's plan; the
    greedy outputs of a tp / pp engine with speculation equal the one-rank engine's without."""
    from conftest import build_small

    prompts = [list(range(40, 60)) * 3, [7, 8, 9, 10] * 12, list(range(500, 530)) + list(range(500, 510))]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    with LLM(build_small(small_checkpoint, str(tmp_path / "one"))) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    with LLM(build_small(small_checkpoint, str(tmp_path / "par"), **layout), speculative_config=SPEC) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        st = llm.stats()
    assert got == ref
    assert st["spec_accepted_tokens"] > 0
