"""`kiln plan` sizes deployments from the builder's own per-rank layouts."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kiln.launch.cli import main
from kiln.launch.plan import PlanError, plan
from kiln.parallel.mapping import Mapping
from kiln.runtime.builder import rank_layout
from kiln.runtime.checkpoint import open_checkpoint

TOPO = os.path.join(os.path.dirname(__file__), "..", "cluster_configs", "hgx-h200-8gpu.yaml")


def rank_bytes(model: str, tp: int, pp: int = 1) -> int:
    cfg = open_checkpoint(model, random_weights=True, dtype=torch.bfloat16).config
    return max(sum(torch.Size(s).numel() for s, _ in rank_layout(cfg, Mapping(tp=tp, pp=pp, rank=r), torch.bfloat16).values()) * 2
               for r in range(tp * pp))


def test_llama_3_8b_fits_one_h100():
    p = plan("llama-3-8b", "h100", 1)
    r = p["recommended"]
    assert (r["tp"], r["pp"], r["dp"]) == (1, 1, 1) and r["fits"]
    assert r["weights_gib_per_gpu"] == round(rank_bytes("llama-3-8b", 1) / 2**30, 2)
    # KV: 32 layers x 2 x 8 heads x 128 x 2 bytes = 128 KiB a token, in what memory leaves
    assert 300_000 < r["kv_tokens_per_replica"] < 500_000


def test_llama_3_70b_on_an_h200_board():
    p = plan("llama-3-70b", "h200", 8)
    by = {(o["tp"], o["pp"]): o for o in p["options"]}
    assert not by[(1, 1)]["fits"] and by[(8, 1)]["fits"] and by[(4, 2)]["fits"]
    assert by[(8, 1)]["weights_gib_per_gpu"] == round(rank_bytes("llama-3-70b", 8) / 2**30, 2)
    assert by[(8, 1)]["decode_ms_per_token"] < by[(4, 1)]["decode_ms_per_token"] < by[(2, 1)]["decode_ms_per_token"]
    r = p["recommended"]
    assert r["fits"] and r["tp"] * r["pp"] * r["dp"] == 8
    assert f"--tp {r['tp']}" in r["build_command"]


def test_too_big_and_bad_input_are_clear_errors(capsys):
    with pytest.raises(PlanError, match="does not fit on 1 x H100"):
        plan("llama-3-70b", "h100", 1)
    assert main(["plan", "--model", "llama-3-8b", "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3-8b", "--max-seq-len", "0"]) == 2


def test_cli_json_and_topology(capsys):
    assert main(["plan", "--model", "llama-3.1-405b", "--topology", TOPO, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["gpus"] == 8 and p["gpu"].startswith("H200")
    assert p["recommended"]["tp"] == 8  # 405B in bfloat16 needs the whole board per replica
