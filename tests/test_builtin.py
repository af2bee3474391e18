"""The built-in model (SmolLM2-135M-Instruct from its GGUF) generates what transformers generates."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Q: What is 12 times 12?\nA:",
]


@pytest.fixture(scope="module")
def llm(smollm_engine):
    return LLM(smollm_engine)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers(llm, smollm_hf):
    hf, tok = smollm_hf
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        ref = hf_greedy(hf, ids, 32)
        got = out.outputs[0].token_ids
        assert got == ref[: len(got)], prompt
        if out.outputs[0].finish_reason == "length":
            assert len(got) == 32
        else:  # stopped at the end-of-sequence token, as transformers did
            assert got[-1] == tok.eos_token_id and len(ref) == len(got)
        assert out.outputs[0].text == tok.decode(got, skip_special_tokens=True)


def test_chat_equals_transformers(llm, smollm_hf):
    hf, tok = smollm_hf
    messages = [{"role": "user", "content": "What is the tallest mountain in the world?"}]
    out = llm.chat(messages, SamplingParams(max_tokens=40, temperature=0.0))[0]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert out.prompt_token_ids == ids
    ref = hf_greedy(hf, ids, 40)
    got = out.outputs[0].token_ids
    assert got == ref[: len(got)]
    assert "Everest" in out.outputs[0].text


def test_seeded_sampling_is_reproducible(llm):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a = llm.generate(["Write a word:"], sp)[0].outputs[0].token_ids
    b = llm.generate(["Write a word:"], sp)[0].outputs[0].token_ids
    c = llm.generate(["Write a word:"], sp.model_copy(update={"seed": 99}))[0].outputs[0].token_ids
    assert a == b
    assert a != c


def test_n_stop_and_logprobs(llm):
    sp = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7, logprobs=2)
    out = llm.generate(["List three colours:"], sp)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tok, entry in zip(o.token_ids, o.logprobs):
            assert tok in entry and entry[tok].logprob <= 0
    greedy = llm.generate(["The capital of France is"], SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    cut = llm.generate(["The capital of France is"], SamplingParams(max_tokens=20, temperature=0, stop=["answer"]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "answer"
    assert greedy.text.startswith(cut.text) and "answer" not in cut.text and len(cut.text) < len(greedy.text)
