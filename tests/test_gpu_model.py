"""The built-in model on the GPU (Triton kernels, CUDA graphs) gives the CPU float32 engine's greedy
tokens. A divergence counts as equal only where the CPU reference's top-2 logits are within 1e-3."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.builder import build_engine
from kiln.runtime.config import BuildConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Q: What is 12 times 12?\nA:",
    "<|im_start|>user\nName three planets.<|im_end|>\n<|im_start|>assistant\n",
]
TIE = 1e-3


def run(engine: LLMEngine, n: int = 16):
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[int(o.request_id)] = o.outputs[0]
    return [outs[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_greedy_equals_cpu_float32(dtype, tmp_path):
    cpu = build_engine("smollm2-135m-instruct", str(tmp_path / "cpu"), BuildConfig(dtype="float32", max_seq_len=512),
                       device_class="cpu", progress=False)
    gpu = build_engine("smollm2-135m-instruct", str(tmp_path / "gpu"), BuildConfig(dtype=dtype, max_seq_len=512, max_batch_size=16),
                       device_class="cuda", progress=False)
    ref = run(LLMEngine(cpu))
    engine = LLMEngine(gpu)
    assert engine.executor.runner.graphs is not None  # decode ran through CUDA graphs
    got = run(engine)
    tie = TIE if dtype == "float32" else 0.25  # bfloat16 rounds logits by about 1e-2 relative
    for p, r, g in zip(PROMPTS, ref, got):
        for i, (a, b) in enumerate(zip(g.token_ids, r.token_ids)):
            if a != b:
                lps = sorted((lp.logprob for lp in r.logprobs[i].values()), reverse=True)
                assert lps[0] - lps[1] < tie, f"{p!r}: token {i} differs ({a} vs {b}), reference gap {lps[0] - lps[1]:.2e}"
                break
