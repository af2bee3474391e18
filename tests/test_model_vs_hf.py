"""The decoder equals transformers' own model code: logits at prefill and through 20 decode steps."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

from conftest import HF_ARCHS, build_small

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", list(HF_ARCHS))
def test_logits_match_transformers(arch, hf_checkpoints, tmp_path):
    folder, hf = hf_checkpoints[arch]
    engine = LLMEngine(build_small(folder, str(tmp_path / "eng"), tokens_per_block=4), num_kv_blocks=64)
    runner = engine.executor.runner
    runner.keep_logits = True
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 512, (13,), generator=g).tolist()
    engine.add_request("r", prompt, SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True))

    engine.step()  # prefill: logits of every prompt position
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert runner.last_logits.shape == ref.shape
    assert rel_err(runner.last_logits, ref) < RTOL

    tokens = list(prompt)
    for step in range(20):
        out = engine.step()
        tokens.append(engine_last_input(runner))
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1]
        got = runner.last_logits[0]
        assert rel_err(got, ref) < RTOL, f"decode step {step}: relative error {rel_err(got, ref):.2e}"
    # The greedy tokens are the reference's argmax at every step.
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=21, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0].outputs[0].token_ids == gen[0, len(prompt):].tolist()


def engine_last_input(runner) -> int:
    """The token the last decode step consumed (the one sampled the step before)."""
    return int(runner.input_ids[0])
