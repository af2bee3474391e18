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


def _ids_workload(n: int, seed: int):
    import random

    rng = random.Random(seed)
    return [([rng.randrange(3, 2048) for _ in range(rng.randint(1, 300))], rng.randint(1, 40)) for _ in range(n)]


def _run_ids(engine: LLMEngine, work, per_step: int = 3, logprobs: int | None = 2) -> dict:
    pending = list(enumerate(work))
    outs = {}
    while pending or engine.has_unfinished():
        for _ in range(min(per_step, len(pending))):
            i, (p, m) = pending.pop(0)
            engine.add_request(str(i), p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=logprobs))
        for o in engine.step():
            assert all(t >= 0 for t in o.outputs[0].token_ids)
            if o.finished:
                outs[int(o.request_id)] = o.outputs[0]
    assert engine.stats()["kv_blocks_used"] == 0
    return outs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_overlapped_scheduling(dtype, small_checkpoint, small_engine, tmp_path):
    """Requests arriving over time, with a cache small enough to preempt: the overlapped GPU engine
    gives the tokens of the GPU engine without overlap and of the CPU float32 engine (a divergence
    only at a near-tie of the reference's logits: batches differ, so GEMM rounding may too)."""
    gpu = build_engine(small_checkpoint, str(tmp_path / "gpu"), BuildConfig(dtype=dtype, max_seq_len=1024, max_batch_size=32),
                       device_class="cuda", progress=False)
    work = _ids_workload(48, seed=2)
    kw = dict(num_kv_blocks=64, max_num_tokens=256, scheduler_policy="max_utilization")
    overlapped = LLMEngine(gpu, **kw)
    assert overlapped.async_scheduling and overlapped.executor.runner.graphs is not None
    got = _run_ids(overlapped, work)
    assert overlapped.executor.runner.num_device_inputs > 0
    assert overlapped.stats()["preemptions"] > 0
    tie = TIE if dtype == "float32" else 0.25
    plain = _run_ids(LLMEngine(gpu, async_scheduling=False, **kw), work)
    ref = _run_ids(LLMEngine(small_engine, num_kv_blocks=1024), work)
    for name, r_all in (("gpu without overlap", plain), ("cpu float32", ref)):
        for i in range(len(work)):
            r, g = r_all[i], got[i]
            assert len(g.token_ids) == len(r.token_ids) == work[i][1]
            for j, (a, b) in enumerate(zip(g.token_ids, r.token_ids)):
                if a != b:
                    lps = sorted((lp.logprob for lp in r.logprobs[j].values()), reverse=True)
                    assert lps[0] - lps[1] < tie, f"{name}: request {i}, token {j} differs ({a} vs {b}), gap {lps[0] - lps[1]:.2e}"
                    break


def test_gpu_speculation_verifies_in_cuda_graphs(small_checkpoint, tmp_path, monkeypatch):
    """n-gram speculation on the GPU, float32: verifying steps run as decode rows inside the decode
    graphs (captured for the step budget's rows), steps with no lookup due overlap, and every
    request gives the tokens of the same engine without speculation (or differs at a near-tie)."""
    from kiln.runtime.model_runner import ModelRunner

    gpu = build_engine(small_checkpoint, str(tmp_path / "gpu"), BuildConfig(dtype="float32", max_seq_len=1024, max_batch_size=8),
                       device_class="cuda", progress=False)
    rows = []
    real = ModelRunner._rows_as_decode
    monkeypatch.setattr(ModelRunner, "_rows_as_decode", staticmethod(lambda *a: rows.append(1) or real(*a)))
    work = [((p[: len(p) // 3] * 3)[: len(p)], m) for p, m in _ids_workload(24, seed=5)]  # prompts that repeat themselves
    spec = LLMEngine(gpu, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    assert spec.executor.runner.graphs.buckets[-1] == 256 and spec.stats()["spec_step_token_budget"] == 256
    got = _run_ids(spec, work, logprobs=None)  # requests with logprobs do not speculate
    st = spec.stats()
    assert st["spec_accepted_tokens"] > 0 and rows and st["overlapped_steps"] > 0, st
    ref = _run_ids(LLMEngine(gpu), work)
    for i in range(len(work)):
        r, g = ref[i], got[i]
        assert len(g.token_ids) == len(r.token_ids) == work[i][1]
        for j, (a, b) in enumerate(zip(g.token_ids, r.token_ids)):
            if a != b:
                lps = sorted((lp.logprob for lp in r.logprobs[j].values()), reverse=True)
                assert lps[0] - lps[1] < TIE, f"request {i}, token {j} differs ({a} vs {b}), gap {lps[0] - lps[1]:.2e}"
                break
