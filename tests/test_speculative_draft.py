"""Speculative decoding with a draft model: greedy outputs are the target's own token for token
(in flight, under preemption, through an abort storm and with a draft cache too small for every
sequence; no block leaked in the target's cache or the draft's); acceptance is partial for a
related draft and total for the target as its own draft; at temperature 1 the first generated
tokens keep the target's distribution; bad draft engines are refused with one line; and
``kiln serve --speculative draft-target`` through the openai client."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections import Counter

import pytest
import torch

from kiln.runtime import LLM
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.engine import LLMEngine
from kiln.runtime.safetensors_stream import sha256_file
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import parse_config
from test_batching import make_workload
from test_speculative import Solo, assert_equal_solo, homogeneity_p, one_thread, run_over_time  # noqa: F401


def first_layers(folder: str, out: str, num_layers: int) -> str:
    """A draft that is the checkpoint's embeddings, first ``num_layers`` layers, norm and head."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cfg.num_hidden_layers = num_layers
    draft = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    draft.load_state_dict(sd)
    draft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def draft_engine(small_checkpoint, tmp_path_factory):
    """Three of the target's four layers: it agrees with the target on some tokens, not all."""
    from conftest import build_small

    d = tmp_path_factory.mktemp("draft")
    first_layers(small_checkpoint, str(d / "hf"), 3)
    return build_small(str(d / "hf"), str(d / "engine"), max_seq_len=1024)


def spec(draft: str, k: int = 3) -> dict:
    return {"method": "draft", "num_speculative_tokens": k, "draft_engine": draft}


@pytest.fixture(scope="module")
def solo(small_engine):
    return Solo(small_engine)


def assert_nothing_leaked(engine: LLMEngine) -> None:
    st = engine.stats()
    assert st["kv_blocks_used"] == 0 and engine.block_manager.num_used_blocks == 0
    assert st["spec_draft_kv_blocks_used"] == 0 and not engine.draft.seqs
    engine.block_manager.check_invariants()
    engine.draft.block_manager.check_invariants()
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


# --- greedy: the target's own outputs ---------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("in-flight", dict(num_kv_blocks=2048, max_num_tokens=512)),
    ("preemption", dict(num_kv_blocks=40, max_num_tokens=256, scheduler_policy="max_utilization")),
])
def test_greedy_equals_the_target_alone(name, kwargs, small_engine, draft_engine, solo):
    """64 mixed requests (plain, repetition penalty, stop token with min_tokens, logprobs and n=2
    rows that do not speculate) arriving over time."""
    workload = make_workload(seed=1, count=64, max_prompt=160, max_out=32, shared_prefix=64)
    engine = LLMEngine(small_engine, speculative_config=spec(draft_engine), **kwargs)
    step = engine.step

    def checked_step():
        out = step()
        # only running sequences hold draft KV: finished, aborted and preempted ones gave it back
        assert set(engine.draft.seqs) <= {s.seq_id for s in engine.scheduler.running}
        return out
    engine.step = checked_step
    outputs = run_over_time(engine, workload)
    ties = assert_equal_solo(outputs, workload, solo)
    st = engine.stats()
    print(f"{name}: proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']} "
          f"rate={st['spec_acceptance_rate']:.3f} preemptions={st['preemptions']} ties={ties} "
          f"draft forwards={engine.draft.num_forwards}")
    assert 0 < st["spec_acceptance_rate"] < 1
    assert_nothing_leaked(engine)
    if name == "preemption":
        assert st["preemptions"] > 0


def test_abort_storm_and_a_small_draft_cache(small_engine, draft_engine, solo):
    """A third of the requests aborted at random steps, and a draft cache of 12 blocks: sequences
    that do not fit in it do not speculate; nothing leaks in either cache."""
    rng = random.Random(5)
    workload = make_workload(seed=3, count=96, max_prompt=40, max_out=12, shared_prefix=16)
    abort = {rid: rng.randint(0, 30) for rid, _, _ in rng.sample(workload, len(workload) // 3)}
    engine = LLMEngine(small_engine, num_kv_blocks=160, max_num_tokens=256, max_batch_size=48,
                       scheduler_policy="max_utilization", speculative_config=spec(draft_engine))
    engine.draft.block_manager = BlockManager(12, engine.draft.block_manager.block_size)
    outputs = run_over_time(engine, workload, per_step=4, abort=abort)
    assert_equal_solo(outputs, workload, solo, skip=set(abort))
    st = engine.stats()
    print(f"abort storm: proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']} "
          f"preemptions={st['preemptions']} did not fit in the draft's cache={engine.draft.num_unfit}")
    assert st["spec_accepted_tokens"] > 0 and engine.draft.num_unfit > 0
    assert_nothing_leaked(engine)


def test_the_target_as_its_own_draft_is_always_right(small_engine):
    workload = make_workload(seed=7, count=16, max_prompt=80, max_out=24)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [p for _, p, _ in workload]
    ref = [o.outputs[0].token_ids for o in LLM(small_engine).generate(prompts, sp)]
    # "model" is vLLM's name for the draft: it takes effect like draft_engine
    llm = LLM(small_engine, speculative_config={"method": "draft", "num_speculative_tokens": 4, "model": small_engine})
    assert llm.engine.draft is not None
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    st = llm.stats()
    assert got == ref
    assert st["spec_proposed_tokens"] > 0 and st["spec_acceptance_rate"] == 1.0


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)])
def test_parallel_targets(layout, small_checkpoint, small_engine, draft_engine, tmp_path):
    """A tp / pp target with a one-device draft on rank 0: greedy outputs equal the one-rank
    target's. Sampled requests speculate where rank 0 verifies (tp without pp); with pipeline
    stages the last stage verifies and they run as plain rows."""
    from conftest import build_small

    prompts = [list(range(40, 60)) * 3, [7, 8, 9, 10] * 12, list(range(500, 530)) + list(range(500, 510))]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(small_engine).generate(prompts, sp)]
    par = build_small(small_checkpoint, str(tmp_path / "par"), max_seq_len=1024, **layout)
    with LLM(par, speculative_config=spec(draft_engine)) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        greedy = llm.stats()["spec_proposed_tokens"]
        llm.generate(prompts, SamplingParams(max_tokens=20, temperature=1.0, seed=1, ignore_eos=True))
        sampled = llm.stats()["spec_proposed_tokens"] - greedy
    assert got == ref and greedy > 0
    assert (sampled > 0) == ("pp" not in layout)


# --- sampling: the target's distribution ----------------------------------------------------------
@pytest.fixture(scope="module")
def peaked_pair(tmp_path_factory):
    """A tiny Llama with large weights (its next-token distributions are far from uniform) and a
    draft that is its first layer of two."""
    import transformers

    from conftest import build_small

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   initializer_range=1.0, tie_word_embeddings=False)
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("peaked-draft")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d / "hf")
    target = build_small(str(d / "hf"), str(d / "target"), max_seq_len=256)
    first_layers(str(d / "hf"), str(d / "draft-hf"), 1)
    return target, build_small(str(d / "draft-hf"), str(d / "draft"), max_seq_len=256)


def first_three(llm: LLM, prompt: list[int], params: list[SamplingParams]) -> Counter:
    return Counter(tuple(o.outputs[0].token_ids[:3]) for o in llm.generate([prompt] * len(params), params))


DRAWS = 8000
LIMITS = dict(max_batch_size=1024, max_num_tokens=4096)


def seeded(top_p: float, run: int, unseeded_odd: bool = False) -> list[SamplingParams]:
    """DRAWS seeded requests; each run its own seeds, so that samples are independent. With
    ``unseeded_odd`` every other request has no seed (it draws from the engine's generators)."""
    return [SamplingParams(max_tokens=4, temperature=1.0, top_p=top_p, ignore_eos=True,
                           seed=None if unseeded_odd and i % 2 else i + run * DRAWS)
            for i in range(DRAWS)]


@pytest.fixture(scope="module")
def baseline(peaked_pair):
    """The target's first three tokens without speculation, by top_p (made once)."""
    target, _ = peaked_pair
    llm, cache = LLM(target, **LIMITS), {}

    def get(top_p: float) -> Counter:
        if top_p not in cache:
            cache[top_p] = first_three(llm, [3], seeded(top_p, 0))
        return cache[top_p]
    return get


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_keeps_the_target_distribution(peaked_pair, baseline, top_p):
    """The first three generated tokens over 8,000 draws at temperature 1, with and without the
    draft (half of the requests seeded, half drawing from the engine's seeded generators): one
    distribution (chi-square homogeneity, p > 0.01). The second and third tokens come from
    verification against the draft's distributions (first proposal standing or falling, second
    proposal standing or falling). A one-token prompt puts the prefills and the draft's first
    catch-up on the batched one-token path of the CPU attention, which keeps this fast;
    ``test_a_broken_verifier_is_caught`` shows the sample is large enough."""
    target, draft = peaked_pair
    llm = LLM(target, speculative_config=spec(draft, 2), seed=7, **LIMITS)
    got = first_three(llm, [3], seeded(top_p, 1, unseeded_odd=True))
    st = llm.stats()
    p, dof = homogeneity_p(baseline(top_p), got)
    print(f"top_p={top_p}: p={p:.3f} dof={dof} proposed={st['spec_proposed_tokens']} accepted={st['spec_accepted_tokens']}")
    assert st["spec_accepted_tokens"] >= 1000 and st["spec_proposed_tokens"] > st["spec_accepted_tokens"]
    assert dof >= 20 and not math.isnan(p) and p > 0.01


def test_a_broken_verifier_is_caught(peaked_pair, baseline, monkeypatch):
    """The same test, against a verifier that forgets the residual (a rejected proposal is
    replaced by a draw from p instead of max(0, p - q)): with half the draws it fails by far."""
    import kiln.runtime.model_runner as mr
    from kiln.runtime.speculative import _draw

    def no_residual(probs, draft, greedy, gen, draft_probs=None):
        assert not greedy and draft_probs is not None
        u = torch.rand(len(draft), generator=gen, dtype=torch.float64).tolist()
        for i, t in enumerate(draft):
            if u[i] >= min(1.0, float(probs[i, t]) / float(draft_probs[i, t])):
                return i, _draw(probs[i], gen)
        return len(draft), _draw(probs[-1], gen)

    target, draft = peaked_pair
    llm = LLM(target, speculative_config=spec(draft, 2), **LIMITS)
    monkeypatch.setattr(mr, "verify", no_residual)
    got = first_three(llm, [3], seeded(1.0, 2)[: DRAWS // 2])
    p, dof = homogeneity_p(baseline(1.0), got)
    print(f"broken verifier: p={p:.2e} dof={dof}")
    assert p < 1e-6


def test_draft_distributions_follow_the_request(peaked_pair):
    """The draft proposes from its own distribution under the request's top-k (q has at most k
    tokens, sums to one, holds each proposal), and greedily by its argmax."""
    from kiln.runtime.draft import DraftRequest

    target, draft = peaked_pair
    engine = LLMEngine(target, speculative_config=spec(draft, 3))
    dp = engine.draft
    sampled = SamplingParams(temperature=0.7, top_k=5, max_tokens=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    got = dp.propose([DraftRequest(1, [3, 17, 5], 3, 3, sampled, 11), DraftRequest(2, [3, 17, 5], 3, 3, greedy),
                      DraftRequest(3, [3, 17, 5], 3, 2, sampled)])
    assert dp.num_forwards == 3  # the catch-up and two more positions, for all three sequences at once
    for sid, k in ((1, 3), (3, 2)):  # seeded, and drawing from the proposer's own generator
        toks, q = got[sid]
        assert len(toks) == k and q.shape == (k, 256)
        for t, row in zip(toks, q):
            assert (row > 0).sum() <= 5 and float(row.sum()) == pytest.approx(1.0) and row[t] > 0
    toks, q = got[2]
    assert q is None
    alone = LLM(draft).generate([[3, 17, 5]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert toks == alone[0].outputs[0].token_ids  # the draft's own greedy continuation
    assert dp.block_manager.num_used_blocks > 0
    dp.retain({3})
    assert set(dp.seqs) == {3}
    dp.release(3)
    assert dp.block_manager.num_used_blocks == 0 and not dp.seqs


def test_draft_catch_up_in_passes_and_its_context_length(peaked_pair):
    """A catch-up longer than max_num_tokens runs in several passes with the same proposals; a
    sequence that would run past the draft's context length proposes nothing."""
    from kiln.runtime.draft import DraftRequest

    target, draft = peaked_pair
    dp = LLMEngine(target, speculative_config=spec(draft, 3)).draft
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(10 + 3 * i)] for i in range(3)]
    reqs = [DraftRequest(i, p, len(p), 3, greedy) for i, p in enumerate(prompts)]
    whole = dp.propose(reqs)
    for i in range(3):
        dp.release(i)
    dp.block_manager.reset_prefix_cache()
    before = dp.num_forwards
    dp.runner.max_num_tokens = 8  # 10 + 13 + 16 catch-up rows: five passes of at most 8
    cut = dp.propose(reqs)
    assert cut == whole and dp.num_forwards - before == 5 + 2
    dp.runner.max_num_tokens = 4096
    long = [5] * (dp.max_seq_len - 2)
    assert dp.propose([DraftRequest(9, long, len(long), 3, greedy)]) == {} and 9 not in dp.seqs


# --- bad input ------------------------------------------------------------------------------------
def test_config_names():
    c = parse_config({"method": "draft", "num_speculative_tokens": 2, "model": "engines/d"})
    assert c.draft_engine == "engines/d"  # vLLM's name for it
    for cfg, words in (({"method": "draft", "num_speculative_tokens": 2}, "needs draft_engine"),
                       ({"method": "draft", "num_speculative_tokens": 17, "draft_engine": "d"}, "num_speculative_tokens"),
                       ({"method": "draft", "num_speculative_tokens": 2, "draft_engine": "a", "model": "b"}, "once"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "draft_engine": "a"}, "only for"),
                       ({"method": "medusa", "num_speculative_tokens": 2}, "needs model")):
        with pytest.raises(ValueError, match=words):
            parse_config(cfg)


def copy_engine(src: str, dst: str, edit=None, tokenizer_edit=None) -> str:
    """A copy of an engine with engine.json edited (``edit(dict)``) or the tokenizer's vocabulary
    edited (``tokenizer_edit(dict)``), its checksum updated so only the edit differs."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "engine.json")) as f:
        cfg = json.load(f)
    if tokenizer_edit is not None:
        name = os.path.join(cfg["tokenizer"]["path"], "tokenizer.json")
        path = os.path.join(dst, name)
        with open(path) as f:
            tok = json.load(f)
        tokenizer_edit(tok["model"]["vocab"])
        with open(path, "w") as f:
            json.dump(tok, f)
        cfg["files"][name] = sha256_file(path)
    if edit is not None:
        edit(cfg)
    with open(os.path.join(dst, "engine.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_bad_draft_engines(small_engine, draft_engine, tiny_draft, tmp_path):
    def swap_two(vocab):
        a, b = sorted(vocab)[100], sorted(vocab)[101]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def gpu(cfg):
        cfg["device_class"] = "cuda"

    def tp2(cfg):
        cfg["build"]["tp"] = 2
        cfg["rank_files"] = ["rank0.safetensors", "rank1.safetensors"]

    cases = [
        (str(tmp_path / "nope"), "does not exist"),
        (str(tmp_path), "not a kiln engine"),
        (tiny_draft, "vocabulary of"),
        (copy_engine(draft_engine, str(tmp_path / "tok"), tokenizer_edit=swap_two), "another tokenizer"),
        (copy_engine(draft_engine, str(tmp_path / "gpu"), edit=gpu), "built for cuda but the target runs on cpu"),
        (copy_engine(draft_engine, str(tmp_path / "tp2"), edit=tp2), "tp=2"),
    ]
    for d, words in cases:
        with pytest.raises(ValueError, match=words) as e:
            LLMEngine(small_engine, speculative_config=spec(d))
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="local and torchrun"):
        LLM(small_engine, launcher="ray", speculative_config=spec(draft_engine))


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    """A draft with another vocabulary size than ``small_engine``'s."""
    from conftest import build_small, make_hf_model

    d = tmp_path_factory.mktemp("tiny-draft")
    make_hf_model("llama", vocab_size=512).save_pretrained(d / "hf")
    return build_small(str(d / "hf"), str(d / "engine"))


# --- serving ----------------------------------------------------------------------------------------
def test_kiln_serve_draft_target(small_engine, draft_engine, tmp_path):
    """``kiln serve --speculative draft-target --draft-engine DIR``: the openai client gets the
    target's own greedy text, a sampled request completes, and /metrics counts proposed and
    accepted tokens."""
    import subprocess
    import sys

    import httpx
    import openai

    from server_helpers import free_port, metric, wait_health

    llm = LLM(small_engine)
    prompts = [list(range(40, 60)) * 3, [7, 8, 9, 10] * 12, list(range(300, 340))]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kiln.launch.cli", "serve", small_engine, "--port", str(port),
                             "--speculative", "draft-target", "--draft-engine", draft_engine,
                             "--num-speculative-tokens", "3", "--served-model-name", "small"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, timeout=180, proc=proc)
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        for p, want in zip(prompts, ref):
            r = oai.completions.create(model="small", prompt=p, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
            assert r.choices[0].text == llm.tokenizer.decode(want)
        r = oai.completions.create(model="small", prompt=prompts[0], max_tokens=16, temperature=1.0, seed=3,
                                   extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        text = httpx.get(url + "/metrics").text
        assert metric(text, "kiln_spec_accepted_tokens_total") > 0
        assert metric(text, "kiln_spec_proposed_tokens_total") > metric(text, "kiln_spec_accepted_tokens_total")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
