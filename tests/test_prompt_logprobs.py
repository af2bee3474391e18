"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``, and ``echo`` with ``logprobs`` over
HTTP) against transformers' own logits: every position, the top-N and each token's rank, through
chunked prefill, preemption, overlapped scheduling, prefix caching, n > 1 and tensor/pipeline
parallelism."""

from __future__ import annotations

import msgpack
import openai
import pytest
import torch

from kiln.runtime import LLM, SamplingParams
from kiln.runtime.engine import LLMEngine
from kiln.runtime.plan import PromptLogprobs, StepPlan, StepResult

from conftest import build_small, make_hf_model

ATOL = 1e-4
PROMPTS = [list(range(3, 43)), [7, 300, 11, 12, 9, 401, 5, 6, 7, 8, 9, 10, 77], [100, 200], [42]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(engine dir, transformers model, HF folder) of a tiny float32 llama."""
    d = tmp_path_factory.mktemp("plp")
    hf = make_hf_model("llama")
    hf.save_pretrained(d / "hf")
    return build_small(str(d / "hf"), str(d / "eng"), tokens_per_block=4), hf, str(d / "hf")


@pytest.fixture(scope="module")
def llm(tiny):
    with LLM(tiny[0], max_num_tokens=16) as m:  # prompts longer than 16 tokens prefill in chunks
        yield m


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' float32 logits: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(hf, ids: list[int], got: list, num_top: int) -> None:
    """``got`` is vLLM's layout for ``ids``: None, then the actual token and the top ``num_top``."""
    assert got is not None and len(got) == len(ids)
    assert got[0] is None
    ref = hf_logprobs(hf, ids)
    for i in range(1, len(ids)):
        row, tok, entry = ref[i - 1], ids[i], got[i]
        top = row.topk(num_top).indices.tolist() if num_top else []
        assert set(entry) == {tok, *top}, i
        assert next(iter(entry)) == tok  # the actual token first
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        for k, t in enumerate(top, start=1):
            if t != tok:
                assert entry[t].rank == k
        for t, lp in entry.items():
            assert abs(lp.logprob - float(row[t])) <= ATOL, (i, t)
            assert isinstance(lp.decoded_token, str)


def test_offline_chunked_mixed_batch(tiny, llm):
    """Chunked prefill (max_num_tokens 16) beside requests without prompt logprobs; n > 1 gets
    one list for the request; the sampled tokens are unchanged by asking for prompt logprobs."""
    _, hf, _ = tiny
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain)]
    params = [
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0),
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=5, logprobs=2),
        plain,
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=3),
    ]
    outs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == base
    check(hf, PROMPTS[0], outs[0].prompt_logprobs, 0)
    check(hf, PROMPTS[1], outs[1].prompt_logprobs, 5)
    assert outs[2].prompt_logprobs is None
    assert outs[3].prompt_logprobs == [None]  # a one-token prompt has nothing to score
    o = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert o.prompt_token_ids == PROMPTS[1]
    check(hf, PROMPTS[1], o.prompt_logprobs, 0)
    o = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, n=3, temperature=1.0, seed=1, prompt_logprobs=2))[0]
    assert len(o.outputs) == 3
    check(hf, PROMPTS[0], o.prompt_logprobs, 2)


def test_prefix_caching_does_not_skip_scored_rows(tiny, llm):
    """A request with prompt logprobs computes every prompt row although its prefix is cached;
    its own blocks still serve later requests."""
    _, hf, _ = tiny
    prefix = list(range(50, 82))
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([prefix + [5, 6, 7]], sp)
    a = llm.generate([prefix + [8, 9, 10, 11]], SamplingParams(max_tokens=1, prompt_logprobs=4))[0]
    assert a.num_cached_tokens == 0
    check(hf, prefix + [8, 9, 10, 11], a.prompt_logprobs, 4)
    b = llm.generate([prefix + [8, 9, 10, 11, 12]], sp)[0]
    assert b.num_cached_tokens >= len(prefix)
    c = llm.generate([prefix + [8, 9]], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    check(hf, prefix + [8, 9], c.prompt_logprobs, 1)


def _run(eng: LLMEngine) -> dict:
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_overlap(tiny, async_scheduling):
    """Few KV blocks force preemption by recompute, also of a prompt in the middle of its chunked
    prefill (its blocks partly evicted meanwhile): entries are neither repeated nor lost.
    Overlapped scheduling plans each step before the last one's results are read."""
    eng_dir, hf, _ = tiny
    kw = dict(max_num_tokens=12, async_scheduling=async_scheduling, scheduler_policy="max_utilization")
    eng = LLMEngine(eng_dir, num_kv_blocks=16, **kw)
    eng.stream_outputs = False
    prompts = [list(range(10 + i, 28 + 2 * i)) for i in range(4)]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=2))
    done = _run(eng)
    assert eng.stats()["preemptions"] > 0
    for i, p in enumerate(prompts):
        check(hf, p, done[str(i)].prompt_logprobs, 2)

    # "short" decodes and grows while "long" prefills in chunks behind it; "long" is preempted
    # with 40 of its 44 prompt tokens computed and comes back once "short" is done.
    eng = LLMEngine(eng_dir, num_kv_blocks=13, **kw)
    eng.stream_outputs = False
    long = list(range(20, 64))
    eng.add_request("short", list(range(200, 205)), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    eng.add_request("long", long, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1))
    done = _run(eng)
    assert eng.stats()["preemptions"] == 1
    check(hf, long, done["long"].prompt_logprobs, 1)


def test_wire_round_trip():
    """StepPlan and StepResult carry prompt logprobs as plain msgpack values."""
    plan = StepPlan(step_id=3, prompt_logprobs=[4, 9])
    res = StepResult(step_id=3, prompt_logprobs=[PromptLogprobs(4, 1, [5, 6], [-1.5, -0.25], [7, 1], [[6], [6]], [[-0.5], [-0.25]])])
    for obj, cls in ((plan, StepPlan), (res, StepResult)):
        wire = msgpack.unpackb(msgpack.packb(obj.to_wire(), use_bin_type=True), raw=False, strict_map_key=False)
        assert cls.from_wire(wire) == obj


def test_tensor_and_pipeline_parallel(tiny, tmp_path):
    """tp=2 gathers the vocabulary for the scored rows; pp=2 scores on the last stage, whose
    results cross the control plane to rank 0."""
    _, hf, folder = tiny
    for layout in (dict(tp=2), dict(pp=2)):
        eng = build_small(folder, str(tmp_path / "-".join(f"{k}{v}" for k, v in layout.items())), tokens_per_block=4, **layout)
        with LLM(eng, max_num_tokens=16) as par:
            outs = par.generate(PROMPTS[:2], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
        for p, o in zip(PROMPTS, outs):
            check(hf, p, o.prompt_logprobs, 3)


@pytest.fixture(scope="module")
def client(tiny):
    """The OpenAI client on a test server whose API side talks to an engine core process, as
    ``kiln serve`` runs (prompt logprobs cross the core's wire format)."""
    from kiln.launch.server import build_app

    from server_helpers import ServerThread, shared

    app = build_app(shared(tiny[0]).client(), model_name="tiny", max_body_bytes=1 << 20)
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_echo_logprobs(tiny, llm, client):
    """Legacy completions with echo: the prompt's text and its tokens' logprobs come first (null
    for the first token), then the output's; max_tokens 0 scores the prompt only; streaming
    carries the prompt in its first chunk."""
    _, hf, _ = tiny
    text = "kiln scores every prompt token"
    ids = llm.engine.encode_prompt(text)
    ref = hf_logprobs(hf, ids)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith(text)
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(text)
    assert "".join(lp.tokens[: len(ids)]) == text
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) <= ATOL
        top = sorted(lp.top_logprobs[i].values(), reverse=True)[:2]
        assert all(abs(a - b) <= ATOL for a, b in zip(top, ref[i - 1].topk(2).values.tolist()))
    gen = llm.generate([ids], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))[0].outputs[0]
    assert ch.text == text + gen.text
    assert all(abs(a - gen.logprobs[j][t].logprob) <= ATOL
               for j, (a, t) in enumerate(zip(lp.token_logprobs[len(ids):], gen.token_ids)))

    r = client.completions.create(model="tiny", prompt=[ids, ids[:5]], max_tokens=0, echo=True, logprobs=0)
    assert [c.text for c in r.choices] == [text, llm.tokenizer.decode(ids[:5])]
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids) + 5
    assert len(r.choices[0].logprobs.tokens) == len(ids)
    assert all(abs(a - float(ref[i, ids[i + 1]])) <= ATOL for i, a in enumerate(r.choices[0].logprobs.token_logprobs[1:]))
    assert r.choices[0].finish_reason == "length"

    r = client.completions.create(model="tiny", prompt=text, max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text == text + gen.text[: len(r.choices[0].text) - len(text)] and r.choices[0].logprobs is None

    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=3, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    first = chunks[0].choices[0]
    assert first.text == text and first.logprobs.token_logprobs[0] is None
    assert first.logprobs.token_logprobs[1:] == lp.token_logprobs[1 : len(ids)]
    assert "".join(c.choices[0].text for c in chunks) == ch.text

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=text, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


@pytest.mark.slow
def test_builtin_model(smollm_engine, smollm_hf):
    """The built-in SmolLM2 (its real tokenizer) against transformers on the same GGUF (slow
    alone: building the engine and reading the GGUF into transformers take most of a minute;
    the other server and built-in tests share both fixtures)."""
    model, _ = smollm_hf
    with LLM(smollm_engine, max_num_tokens=8, num_kv_blocks=64) as m:
        o = m.generate(["The capital of France is Paris, and"], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    check(model, o.prompt_token_ids, o.prompt_logprobs, 1)
