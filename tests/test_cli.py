"""The kiln command: builds and generates, and refuses bad input with one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kiln.launch.cli import main


def kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "kiln.launch.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "tiny")
    p = kiln("build", "--model", "tiny-llama", "--random-weights", "--output", out, "--device", "cpu", "--max-seq-len", "128", "--quiet")
    assert p.returncode == 0, p.stderr
    return out


def test_build_writes_engine_directory(tiny_engine):
    cfg = json.load(open(os.path.join(tiny_engine, "engine.json")))
    assert cfg["schema_version"] == 1 and cfg["device_class"] == "cpu"
    assert cfg["rank_files"] == ["rank0.safetensors"]
    assert "rank0.safetensors" in cfg["files"] and any(f.startswith("tokenizer/") for f in cfg["files"])
    assert cfg["build"]["dtype"] == "float32" and cfg["build"]["max_seq_len"] == 128


def test_generate_prints_text(tiny_engine):
    p = kiln("generate", tiny_engine, "--prompt", "Hello", "--max-tokens", "5", "--ignore-eos")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def _copy(engine: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(engine, dst)
    return dst


def _edit(engine: str, **changes) -> None:
    path = os.path.join(engine, "engine.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            cfg[a][b] = v
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


def test_refuses_wrong_checksum(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    with open(os.path.join(eng, "rank0.safetensors"), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert_refused(kiln("generate", eng, "--prompt", "x"), "checksum", "rebuild")


def test_refuses_newer_schema(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    _edit(eng, schema_version=99)
    assert_refused(kiln("generate", eng, "--prompt", "x"), "schema version 99", "upgrade kiln")


def test_refuses_other_device_class(tiny_engine, tmp_path):
    eng = _copy(tiny_engine, tmp_path)
    _edit(eng, device_class="cuda")
    p = kiln("generate", eng, "--prompt", "x", "--device", "cpu")
    assert_refused(p, "built for cuda", "rebuild")


def test_tp2_engine_generates_the_same_text(tiny_engine, tmp_path):
    out = str(tmp_path / "tp2")
    p = kiln("build", "--model", "tiny-llama", "--random-weights", "--output", out, "--device", "cpu", "--tp", "2",
             "--max-seq-len", "128", "--quiet")
    assert p.returncode == 0, p.stderr
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    args = ("--prompt", "Hello there", "--max-tokens", "6", "--ignore-eos")
    one, two = kiln("generate", tiny_engine, *args), kiln("generate", out, *args)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


def test_refuses_missing_paths(tmp_path):
    assert_refused(kiln("build", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "e")), "does not exist")
    assert_refused(kiln("generate", str(tmp_path / "nope"), "--prompt", "x"), "does not exist")
    assert_refused(kiln("build", "--model", "llama-9000", "--random-weights", "--output", str(tmp_path / "e")), "llama-9000")


@pytest.mark.parametrize(
    "args, word",
    [
        (["build", "--model", "tiny-llama", "--random-weights", "--tp", "0"], "--tp"),
        (["build", "--model", "tiny-llama", "--random-weights", "--max-seq-len", "0"], "--max-seq-len"),
        (["build", "--model", "tiny-llama", "--random-weights", "--tokens-per-block", "3"], "power of two"),
        (["build", "--model", "tiny-llama", "--random-weights", "--tp", "3"], "tp=3"),
    ],
)
def test_refuses_out_of_range_build_flags(args, word, tmp_path):
    assert_refused(kiln(*args, "--output", str(tmp_path / "e"), "--device", "cpu"), word)


def test_refuses_out_of_range_generate_flags(tiny_engine):
    assert_refused(kiln("generate", tiny_engine, "--prompt", "x", "--temperature", "-1"), "--temperature")
    assert_refused(kiln("generate", tiny_engine, "--prompt", "x", "--top-p", "2"), "--top-p")


def test_refuses_speculative_flags_it_cannot_run(tiny_engine):
    assert_refused(kiln("serve", tiny_engine, "--speculative", "eagle"), "--speculative eagle", "--draft-engine DIR")
    assert_refused(kiln("serve", tiny_engine, "--speculative", "medusa", "--speculative-model", tiny_engine + "-nope"),
                   "--draft-engine", "does not exist")
    assert_refused(kiln("serve", tiny_engine, "--speculative", "eagle", "--draft-engine", tiny_engine),
                   "--draft-engine", "eagle heads directory")
    assert_refused(kiln("serve", tiny_engine, "--draft-engine", tiny_engine), "--draft-engine")
    assert_refused(kiln("serve", tiny_engine, "--speculative", "draft-target"), "--draft-engine")
    assert_refused(kiln("serve", tiny_engine, "--speculative", "draft-target", "--draft-engine", tiny_engine + "-nope"),
                   "--draft-engine", "does not exist")
    assert_refused(kiln("serve", tiny_engine, "--launcher", "ray", "--topology", "cluster_configs/local-cpu.yaml",
                        "--speculative", "draft-target", "--draft-engine", tiny_engine), "--launcher local or torchrun")
    assert_refused(kiln("serve", tiny_engine, "--speculative", "ngram", "--num-speculative-tokens", "0"),
                   "--num-speculative-tokens")
    assert_refused(kiln("serve", tiny_engine, "--num-speculative-tokens", "3"), "--speculative ngram")


def test_main_returns_code_without_exiting(tmp_path, capsys):
    assert main(["build", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kiln build: error:")
