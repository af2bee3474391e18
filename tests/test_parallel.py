"""Tensor, pipeline and expert parallelism across processes (gloo on the CPU): the same greedy
tokens and log-probabilities as the one-rank engine and as transformers, through the local
launcher and through torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kiln.runtime import LLM, SamplingParams

from conftest import build_small, make_hf_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 60))]
RTOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "mixtral", "qwen3_moe"):
        d = tmp_path_factory.mktemp(f"par-{arch}")
        m = make_hf_model(arch)
        m.save_pretrained(d)
        out[arch] = (str(d), m)
    return out


def run(engine: str, n: int = 10):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)
    with LLM(engine) as llm:
        outs = llm.generate(PROMPTS, sp)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    return torch.log_softmax(logits.float(), -1)


def assert_same(got, ref, hf=None):
    for p, (toks, lps), (rtoks, rlps) in zip(PROMPTS, got, ref):
        assert toks == rtoks
        ref_lp = hf_logprobs(hf, p, toks) if hf is not None else None
        for i, (e, re_) in enumerate(zip(lps, rlps)):
            assert set(e) == set(re_)
            for t in e:
                assert abs(e[t].logprob - re_[t].logprob) <= RTOL * max(1.0, abs(re_[t].logprob))
                if ref_lp is not None:
                    assert abs(e[t].logprob - float(ref_lp[i, t])) <= RTOL * max(1.0, abs(float(ref_lp[i, t])))


@pytest.mark.parametrize(
    "arch, layout",
    [
        ("llama", dict(tp=2)),
        ("llama", dict(pp=2)),
        ("llama", dict(tp=2, pp=2)),
        ("mixtral", dict(tp=2, ep=2)),
        ("qwen3_moe", dict(tp=2, ep=2)),
        ("qwen3_moe", dict(tp=2)),
        ("mixtral", dict(tp=4, ep=2)),
        ("qwen3_moe", dict(tp=4, ep=4)),
    ],
)
def test_layouts_equal_one_rank_and_transformers(arch, layout, checkpoints, tmp_path):
    folder, hf = checkpoints[arch]
    one = run(build_small(folder, str(tmp_path / "one")))
    par_dir = build_small(folder, str(tmp_path / "par"), **layout)
    files = sorted(f for f in os.listdir(par_dir) if f.endswith(".safetensors"))
    assert len(files) == layout.get("tp", 1) * layout.get("pp", 1)
    assert_same(run(par_dir), one, hf)


def test_torchrun_equals_local_launcher(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    eng = build_small(folder, str(tmp_path / "tp2"), tp=2)
    local = [t for t, _ in run(eng)]
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kiln.launch.torchrun_entry", eng, "--prompt-ids", json.dumps(PROMPTS), "--max-tokens", "10",
           "--ignore-eos", "--json-out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [r["token_ids"] for r in json.load(open(out))] == local


def test_torchrun_with_wrong_world_size_is_refused(checkpoints, tmp_path):
    folder, _ = checkpoints["llama"]
    eng = build_small(folder, str(tmp_path / "tp2"), tp=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "kiln.launch.torchrun_entry", eng, "--prompt", "hi"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "built for 2 ranks" in p.stderr and "started 1" in p.stderr


def test_vocab_parallel_greedy_with_padded_vocab(tmp_path):
    """Plain greedy at tp=2 picks tokens from per-rank (value, index) pairs; an odd vocabulary
    leaves a padding row in the last slice that must never win."""
    hf = make_hf_model("llama", vocab_size=511)
    hf.save_pretrained(tmp_path / "hf")
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with LLM(build_small(str(tmp_path / "hf"), str(tmp_path / "one"))) as llm:
        one = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
    with LLM(build_small(str(tmp_path / "hf"), str(tmp_path / "tp2"), tp=2)) as llm:
        two = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)]
    assert two == one
    for p, toks in zip(PROMPTS, one):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert toks == ref[0, len(p):].tolist()


def test_llama_3_70b_tp8_partition_sizes():
    """Every rank of a llama-3-70b tp=8 build holds an equal eighth of each split tensor and a
    full copy of the replicated norms; nothing is lost or held twice (layouts only, no data)."""
    from kiln.parallel.mapping import Mapping
    from kiln.runtime.builder import rank_layout
    from kiln.runtime.presets import resolve_preset

    cfg = resolve_preset("llama-3-70b")
    full = rank_layout(cfg, Mapping(), torch.bfloat16)
    ranks = [rank_layout(cfg, Mapping(tp=8, rank=r), torch.bfloat16) for r in range(8)]
    numel = lambda shape: int(torch.tensor(shape).prod()) if shape else 1  # noqa: E731
    sizes = [sum(numel(s) * 2 for s, _ in lay.values()) for lay in ranks]
    assert len(set(sizes)) == 1
    for name, (shape, _) in full.items():
        parts = [numel(lay[name][0]) for lay in ranks]
        replicated = name.endswith("norm.weight")
        assert sum(parts) == numel(shape) * (8 if replicated else 1), name
    total = sum(numel(s) * 2 for s, _ in full.values())
    assert abs(sizes[0] - total / 8) / (total / 8) < 0.001
    print(f"llama-3-70b tp=8: {sizes[0] / 2**30:.2f} GiB per rank, {total / 2**30:.1f} GiB in all")


def test_every_group_gets_the_configured_timeout():
    """torch's subgroups default to a 30-minute (gloo) or 10-minute (NCCL) timeout; kiln's groups
    all take the one they are given, so a hung rank surfaces within it. Run in a child process:
    it initialises torch.distributed."""
    code = (
        "import torch\n"
        "from kiln.parallel.mapping import Mapping\n"
        "from kiln.parallel.comm import init_distributed\n"
        "from kiln.runtime.worker import free_port\n"
        "g = init_distributed(Mapping(tp=1, pp=1, rank=0), '127.0.0.1', free_port(), torch.device('cpu'), timeout_s=7)\n"
        "print([grp._get_backend(torch.device('cpu')).options._timeout.total_seconds() for grp in (g.tp, g.pp, g.control)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[7.0, 7.0, 7.0]"


def test_build_in_parts_equals_whole_build(checkpoints, tmp_path):
    """--ranks builds some ranks' files; parts built into one directory merge into the engine a
    whole build gives (same bytes), which loads only once every rank is there."""
    from kiln.runtime.builder import BuildError, build_engine, read_engine_config
    from kiln.runtime.config import BuildConfig
    from kiln.runtime.loader import EngineLoadError

    src = checkpoints["llama"][0]
    bc = BuildConfig(dtype="float32", max_seq_len=256, tp=2, pp=2)
    whole = build_engine(src, str(tmp_path / "whole"), bc, device_class="cpu", progress=False)
    parts = str(tmp_path / "parts")
    build_engine(src, parts, bc, device_class="cpu", progress=False, ranks=[0, 3])
    with pytest.raises(EngineLoadError, match="incomplete.*--ranks"):
        LLM(parts)
    with pytest.raises(BuildError, match="other settings"):
        build_engine(src, parts, BuildConfig(dtype="float32", max_seq_len=128, tp=2, pp=2), device_class="cpu", progress=False, ranks=[1])
    with pytest.raises(BuildError, match="0..3"):
        build_engine(src, parts, bc, device_class="cpu", progress=False, ranks=[4])
    build_engine(src, parts, bc, device_class="cpu", progress=False, ranks=[1, 2])
    a, b = read_engine_config(whole), read_engine_config(parts)
    assert a.files == b.files  # every rank file and tokenizer file, byte for byte
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = []
    for eng in (whole, parts):  # one multi-rank engine at a time in this process
        with LLM(eng) as llm:
            got.append([o.outputs[0].token_ids for o in llm.generate([[5, 6, 7, 8]], sp)])
    assert got[0] == got[1]


def test_random_weights_drawn_at_load_equal_the_written_ones(tmp_path):
    """--weights-at-load writes no weight files; each rank draws exactly the slice the builder
    would have written (same seed), so outputs match a built engine's, at one rank and at tp=2."""
    from kiln.runtime.builder import BuildError, build_engine, read_engine_config
    from kiln.runtime.config import BuildConfig

    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for tp in (1, 2):
        bc = BuildConfig(dtype="float32", max_seq_len=256, tp=tp)
        files = build_engine("tiny-llama", str(tmp_path / f"files{tp}"), bc, random_weights=True, seed=3, device_class="cpu",
                             progress=False)
        drawn = build_engine("tiny-llama", str(tmp_path / f"drawn{tp}"), bc, random_weights=True, seed=3, device_class="cpu",
                             progress=False, weights_at_load=True)
        assert not [f for f in os.listdir(drawn) if f.endswith(".safetensors")]
        assert read_engine_config(drawn).random_weights_seed == 3
        got = []
        for eng in (files, drawn):
            with LLM(eng) as llm:
                got.append([o.outputs[0].token_ids for o in llm.generate([[5, 6, 7, 8], [9, 10]], sp)])
        assert got[0] == got[1], tp
    with pytest.raises(BuildError, match="needs --random-weights"):
        build_engine(str(tmp_path / "files1"), str(tmp_path / "x"), BuildConfig(dtype="float32"), device_class="cpu",
                     progress=False, weights_at_load=True)
