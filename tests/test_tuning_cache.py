"""The engine directory's saved kernel choices (kiln.runtime.tuning): written after a load,
read back by the next load on the same GPU and software, ignored when either differs, when the
file is unreadable or when KILN_TUNING_CACHE=0; an unwritable directory only loses the file.
The GPU is simulated: the tables are the kernels' own, filled with valid rows."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kiln.kernels import gemv, quant_triton, triton_attention
from kiln.runtime import tuning

DEV = torch.device("cuda", 0)
GEMV_ROW = {"shape": [1, 4096, 4096], "dtype": "bfloat16", "op": "linear", "choice": "n8k512w4s1r1", "us": 9.0}
GEMV_CUBLAS = {"shape": [2, 6144, 4096], "dtype": "bfloat16", "op": "glu", "choice": "cublas", "us": 20.0}
QUANT_ROW = {"op": "fp8", "shape": [64, 4096, 4096], "dtype": "bfloat16", "group_size": 0, "choice": "scaled_mm"}
QUANT_GEMV = {"op": "int4", "shape": [1, 4096, 4096], "dtype": "bfloat16", "group_size": 128,
              "choice": "gemv:n4k2048w4s2r1"}


@pytest.fixture
def gpu(monkeypatch):
    """A named GPU for the key, and empty kernel tables before and after."""
    state = {"name": "NVIDIA H200", "cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: state["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["cap"])
    monkeypatch.delenv("KILN_TUNING_CACHE", raising=False)

    def clear():
        gemv.clear_table()
        quant_triton.clear_table()
        triton_attention.set_decode_config(DEV, 128, None)

    clear()
    yield state
    clear()


def _fill():
    gemv.load_table([GEMV_ROW, GEMV_CUBLAS])
    quant_triton.load_table([QUANT_ROW, QUANT_GEMV])
    triton_attention.set_decode_config(DEV, 128, (128, 4))


def _tables():
    return (sorted(json.dumps(r, sort_keys=True) for r in gemv.tuned_table()),
            sorted(json.dumps(r, sort_keys=True) for r in quant_triton.tuned_table()),
            triton_attention.decode_config_chosen(DEV, 128))


def test_round_trip(gpu, tmp_path):
    _fill()
    want = _tables()
    path = tuning.store(str(tmp_path), DEV)
    assert path and os.path.dirname(path) == str(tmp_path / "tuning") and "nvidia-h200" in os.path.basename(path)
    saved = json.load(open(path))
    assert saved["key"]["gpu"] == "NVIDIA H200" and saved["key"]["capability"] == [9, 0]
    assert saved["key"]["torch"] == torch.__version__
    gemv.clear_table()
    quant_triton.clear_table()
    triton_attention.set_decode_config(DEV, 128, None)
    assert _tables() == ([], [], False)
    assert tuning.restore(str(tmp_path), DEV)
    assert _tables() == want
    assert gemv.choice(1, 4096, 4096, torch.bfloat16) == gemv.GemvConfig.parse("n8k512w4s1r1")
    assert gemv.choice(2, 6144, 4096, torch.bfloat16, glu=True) is None  # the cuBLAS path
    assert quant_triton.choose("fp8", 64, 4096, 4096, torch.bfloat16)[0] == "scaled_mm"
    assert triton_attention.decode_tuned_table() == {"0:128": "128x4"}


def test_other_gpu_or_software_is_not_read(gpu, tmp_path, monkeypatch):
    _fill()
    tuning.store(str(tmp_path), DEV)
    gemv.clear_table()
    quant_triton.clear_table()
    gpu["name"] = "NVIDIA H100 80GB HBM3"
    assert not tuning.restore(str(tmp_path), DEV)  # another GPU: another file, none saved
    gpu["name"] = "NVIDIA H200"
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert not tuning.restore(str(tmp_path), DEV)
    assert gemv.tuned_table() == [] and quant_triton.tuned_table() == []


def test_stale_key_in_the_file_is_not_read(gpu, tmp_path):
    _fill()
    path = tuning.store(str(tmp_path), DEV)
    saved = json.load(open(path))
    saved["key"]["triton"] = "0.0"  # a file whose contents do not match its name's key
    json.dump(saved, open(path, "w"))
    gemv.clear_table()
    assert not tuning.restore(str(tmp_path), DEV)
    assert gemv.tuned_table() == []


@pytest.mark.parametrize("corrupt", ["{not json", json.dumps({"key": None}), "bad-choice", "bad-decode"])
def test_unreadable_file_is_reported_and_ignored(gpu, tmp_path, caplog, corrupt):
    _fill()
    path = tuning.store(str(tmp_path), DEV)
    saved = json.load(open(path))
    if corrupt == "bad-choice":
        saved["tables"]["quant"][0]["choice"] = "warp-drive:n1"
        text = json.dumps(saved)
    elif corrupt == "bad-decode":
        saved["tables"]["decode_attention"] = {"128": "96x4"}
        text = json.dumps(saved)
    else:
        text = corrupt
    open(path, "w").write(text)
    gemv.clear_table()
    quant_triton.clear_table()
    quant_triton.load_table([QUANT_GEMV])
    triton_attention.set_decode_config(DEV, 128, None)
    before = _tables()
    with caplog.at_level("INFO", logger="kiln.tuning"):
        assert not tuning.restore(str(tmp_path), DEV)
    assert _tables() == before  # nothing half-loaded
    if corrupt != json.dumps({"key": None}):
        assert "tuning_cache_unreadable" in caplog.text
    else:
        assert "tuning_cache_stale" in caplog.text


def test_unwritable_directory_and_switch_off(gpu, tmp_path, monkeypatch, caplog):
    _fill()
    (tmp_path / "tuning").write_text("a file where the folder would go")
    with caplog.at_level("WARNING", logger="kiln.tuning"):
        assert tuning.store(str(tmp_path), DEV) is None
    assert "tuning_cache_not_written" in caplog.text
    monkeypatch.setenv("KILN_TUNING_CACHE", "0")
    other = tmp_path / "off"
    assert tuning.store(str(other), DEV) is None and not other.exists()
    monkeypatch.delenv("KILN_TUNING_CACHE")
    tuning.store(str(other), DEV)
    monkeypatch.setenv("KILN_TUNING_CACHE", "0")
    gemv.clear_table()
    assert not tuning.restore(str(other), DEV) and gemv.tuned_table() == []


def test_cpu_engines_keep_no_file(gpu, tmp_path):
    _fill()
    assert tuning.store(str(tmp_path), torch.device("cpu")) is None
    assert not tuning.restore(str(tmp_path), torch.device("cpu"))
    assert not (tmp_path / "tuning").exists()
