"""Structured output: xgrammar masks over the built-in model's vocabulary, and JSON that parses."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.runtime.grammar import GrammarCompiler
from kiln.runtime.sampling_params import SamplingParams
from server_helpers import shared

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def env(smollm_engine):
    s = shared(smollm_engine)
    eng = s.llm.engine
    return s, eng.tokenizer, eng.config.model.vocab_size, eng.grammars()


def _walk(matcher, tok, text):
    for t in tok.encode(text, add_special_tokens=False):
        assert matcher.allowed_mask()[t], f"token {t} ({tok.decode([t])!r}) should be allowed"
        assert matcher.accept(t)


def test_mask_shape_and_eos_only_at_the_end(env):
    _, tok, vocab, gc = env
    eos = tok.eos_token_id
    m = gc.matcher({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    mask = m.allowed_mask()
    assert mask.dtype == torch.bool and mask.shape == (vocab,) and mask.device.type == "cpu"
    assert not mask[eos], "EOS must not be allowed before the JSON is complete"
    assert 0 < int(mask.sum()) < vocab
    _walk(m, tok, '{"name": "Ann", "age": 3')
    assert not m.allowed_mask()[eos]
    _walk(m, tok, "}")
    mask = m.allowed_mask()
    assert mask[eos] and int(mask.sum()) == len(gc.stop_token_ids)
    assert not m.is_terminated()
    assert m.accept(eos) and m.is_terminated()


def test_mask_matches_xgrammar_bitmask(env):
    import xgrammar as xgr

    _, tok, vocab, gc = env
    m = gc.matcher({"type": "json_object"})
    _walk(m, tok, '{"k": [1, 2')
    mask = m.allowed_mask().clone()
    bm = xgr.allocate_token_bitmask(1, vocab)
    m._m.fill_next_token_bitmask(bm, 0)
    ids = [i for i in range(vocab) if (int(bm[0, i // 32]) >> (i % 32)) & 1]
    assert mask.nonzero().flatten().tolist() == ids
    assert m.accept(tok.encode("]", add_special_tokens=False)[0])


def test_rejects_tokens_outside_the_grammar(env):
    _, tok, _, gc = env
    m = gc.matcher({"type": "json_object"})
    bad = tok.encode("hello", add_special_tokens=False)[0]
    assert not m.allowed_mask()[bad]
    assert not m.accept(bad)


def test_vocab_padding_beyond_tokenizer_is_masked(env):
    s, tok, vocab, _ = env
    gc = GrammarCompiler(tok, vocab + 64)
    mask = gc.matcher({"type": "json_object"}).allowed_mask()
    assert mask.shape == (vocab + 64,)
    assert not mask[vocab:].any()


def test_cache_and_invalid_schema(env):
    _, _, _, gc = env
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert gc.compile(fmt) is gc.compile(json.loads(json.dumps(fmt)))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        gc.matcher({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}})
    with pytest.raises(ValueError):
        gc.matcher({"type": "xml"})


def test_engine_output_parses(env):
    s, tok, _, _ = env
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    for sp in (SamplingParams(max_tokens=40, temperature=0.0, response_format=fmt),
               SamplingParams(max_tokens=40, temperature=0.8, seed=3, response_format=fmt)):
        out = s.generate(ids, sp).outputs[0]
        assert out.finish_reason == "stop", out
        obj = json.loads(out.text)
        assert isinstance(obj["name"], str) and isinstance(obj["age"], int) and set(obj) == {"name", "age"}
    prompt = tok.apply_chat_template([{"role": "user", "content": 'Reply with exactly {"ok": true}'}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    out = s.generate(ids, SamplingParams(max_tokens=60, temperature=0.0, response_format={"type": "json_object"})).outputs[0]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


def test_without_xgrammar_a_grammar_request_gets_one_clear_line(env, monkeypatch):
    """A server whose environment lacks xgrammar refuses response_format as a bad request that
    names the package, not as an internal error."""
    import sys

    from kiln.runtime.engine import RequestError

    tok, vocab = env[1], env[2]
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    with pytest.raises(ValueError, match="needs the xgrammar package"):
        GrammarCompiler(tok, vocab)
    engine = env[0].llm.engine
    monkeypatch.setattr(engine, "_grammars", None)  # the compiler is made again on the next grammar request
    with pytest.raises(RequestError, match="xgrammar"):
        engine.add_request("g", [1, 2, 3], SamplingParams(max_tokens=2, response_format={"type": "json_object"}))
    assert "g" not in engine.requests
