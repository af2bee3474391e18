"""`kiln bench serving` end to end on the CPU, at smoke sizes: it starts its own `kiln serve`,
runs every workload through the openai client, then the same requests through `LLM.generate`,
and writes one record with every figure and each criterion decided."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

CRITERIA = {"throughput_vs_engine", "tpot_vs_engine_step", "fresh_ttft_first_vs_second", "burst_ttft_p50_ms",
            "batch1_tpot_vs_engine_decode"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_serving_smoke_writes_a_full_record(small_engine, tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ, KILN_RESULTS_DIR=str(results), TOKENIZERS_PARALLELISM="false")
    clients, prompt_len, out_len = 4, 16, 8
    cmd = [sys.executable, "-m", "kiln.launch.cli", "bench", "serving", "--engine", small_engine, "--smoke", "--engine-ratio",
           "--clients", str(clients), "--prompt-len", str(prompt_len), "--output-len", str(out_len),
           "--ttft-min", "16", "--ttft-max", "96", "--burst-clients", "4", "--burst-prompt-len", "16",
           "--burst-output-len", "2", "--batch1-runs", "1", "--stall-batch", "3", "--stall-output-len", "4",
           "--stall-variants", "penalties,n2,logit_bias", "--rates", "inf", "--poisson-requests", "4",
           "--poisson-prompt-median", "16", "--poisson-output-median", "4", "--client-procs", "1",
           "--server-log", str(tmp_path / "serve.log"), "--no-plot"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-4000:], p.stderr[-4000:])
    (path,) = glob.glob(str(results / "serving-cpu-*.json"))
    rec = json.load(open(path))
    assert rec["benchmark"] == "serving" and rec["device"] == "cpu"
    for key in ("commit", "date", "model", "settings", "metrics"):
        assert rec[key], key
    s, m = rec["settings"], rec["metrics"]
    assert s["engine_ratio"] and s["smoke"] and s["concurrent"] == {"clients": clients, "prompt_tokens": prompt_len,
                                                                    "output_tokens": out_len}

    # 256-stream workload at smoke size, and the same requests through LLM.generate
    c = m["concurrent"]
    assert c["completed"] == clients and c["errors"] == 0
    assert c["output_tokens"] == clients * out_len and c["finish_reasons"] == ["length"]  # ignore_eos reached the engine
    assert c["chunks_per_token"] is not None and 0 < c["chunks_per_token"] <= 1
    eng = m["engine"]["concurrent"]
    assert eng["output_tokens"] == clients * out_len and eng["batch"] == clients
    assert _positive(eng["output_tokens_per_s"]) and _positive(eng["step_ms_at_batch"]) and eng["steps_at_batch"] > 0
    # host time per step by phase: the engine's own (LLM.generate) and the server's core (from /metrics)
    assert eng["host_ms_per_step"]["steps"] > 0 and _positive(eng["host_ms_per_step"]["schedule"])
    hc = c["host_ms_per_step"]
    assert hc["steps"] > 0 and all(_positive(hc[k]) for k in ("schedule", "launch", "outputs", "core_send"))
    # CPU share of the engine core's loop thread, the API server and the client worker while it ran
    assert _positive(c["cpu_busy"]["core_main_thread"]) and {"api0", "clients0"} <= set(c["cpu_busy"])
    for key in ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "engine_output_tokens_per_s",
                "server_to_engine_ratio", "engine_step_ms_at_batch"):
        assert _positive(m[key]), key
    assert m["ttft_ms_p50"] <= m["ttft_ms_p99"] and m["tpot_ms_p50"] <= m["tpot_ms_p99"]
    assert m["engine_step_ms_source"] == "LLM.generate"
    assert abs(m["server_to_engine_ratio"] - m["output_tokens_per_s"] / m["engine_output_tokens_per_s"]) < 1e-3

    # a fresh server: five random lengths in the range, two requests each
    ft = m["fresh_ttft"]
    assert len(ft["lengths"]) == 5 and ft["lengths"] == s["fresh_ttft"]["lengths"] and all(16 <= n <= 96 for n in ft["lengths"])
    assert all(_positive(x) for x in ft["first_ms"] + ft["second_ms"])
    assert ft["max_ratio"] == max(ft["ratios"])

    b1, bu = m["batch1"], m["burst"]
    assert _positive(b1["tpot_ms"]) and _positive(b1["engine_decode_ms_per_token"])
    assert bu["completed"] == 4 and bu["errors"] == 0 and _positive(bu["ttft_ms_p50"])
    assert bu["engine_steps"] > 0 and bu["gathered_steps"] >= 0  # a CPU engine does not overlap: nothing to gather

    st = m["stall"]
    assert _positive(st["baseline"]["tpot_ms_p50"])
    assert st["variants"]["penalties"]["special_error"] is None and _positive(st["variants"]["penalties"]["others_tpot_vs_plain"])
    assert st["variants"]["n2"]["special_tokens"] == 2 * 4  # two completions of four tokens
    lb = st["variants"]["logit_bias"]
    assert lb["special_error"] is None and lb["special_tokens"] == 4 and _positive(lb["others_tpot_vs_plain"])

    (row,) = m["per_rate"]
    assert row["rate_req_s"] == "inf" and row["completed"] == 4 and row["errors"] == 0

    chk = m["server_checks"]
    assert chk["metrics_from_core"] and chk["metrics_from_api_server"] and chk["logs_from_core_and_api"]
    assert chk["serve_exit_status"] == 0 and chk["generation_tokens"] > 0

    assert set(m["criteria"]) == CRITERIA
    for name, crit in m["criteria"].items():
        assert crit["pass"] in (True, False) and _positive(crit["value"]), name
        assert crit["pass"] == (crit["value"] >= crit["limit"] if crit["op"] == ">=" else crit["value"] <= crit["limit"]), name
    assert m["all_pass"] == all(c["pass"] for c in m["criteria"].values())
    assert m["timings"]["total_s"] > 0


def test_bench_serving_engine_stall_alone_starts_no_server(small_engine, tmp_path):
    """The engine-side stall part: plain batch, then one penalties, n=2 and grammar request swapped
    in, each with overlap on and off; step-time ratios to plain and the overlapped share."""
    results = tmp_path / "results"
    env = dict(os.environ, KILN_RESULTS_DIR=str(results), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "kiln.launch.cli", "bench", "serving", "--engine", small_engine, "--smoke",
           "--workloads", "engine_stall", "--stall-batch", "4", "--prompt-len", "16", "--stall-output-len", "8", "--no-plot"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-4000:], p.stderr[-4000:])
    assert "kiln serve up" not in p.stdout
    (path,) = glob.glob(str(results / "serving-cpu-*.json"))
    m = json.load(open(path))["metrics"]
    assert "server_checks" not in m and m["criteria"] == {}
    es = m["engine_stall"]
    assert es["batch"] == 4 and es["variants"] == ["penalties", "n2", "grammar"]
    for mode, share in (("overlap", lambda x: x > 0.5), ("sync", lambda x: x == 0.0)):
        rows = es[mode]
        assert rows["async_scheduling"] == (mode == "overlap")
        assert _positive(rows["plain"]["step_ms_p50"]) and share(rows["plain"]["overlapped_share"])
        for v in es["variants"]:
            r = rows[v]
            assert "error" not in r, r
            assert _positive(r["step_vs_plain"]) and r["steps_timed"] > 0 and share(r["overlapped_share"]), (mode, v, r)
        assert rows["n2"]["special_tokens"] == [8, 8]
        assert rows["grammar"]["special_tokens"] == [8] and rows["grammar"]["special_finish"] == ["length"]


def test_bench_host_splits_the_step_loop_by_phase(small_engine, tmp_path):
    """`kiln bench host` on the CPU: host milliseconds by phase for decode steps at the full
    batch and for the rest, a cProfile of decode steps, a prefill step by kernel, in a record."""
    results = tmp_path / "results"
    env = dict(os.environ, KILN_RESULTS_DIR=str(results))
    cmd = [sys.executable, "-m", "kiln.launch.cli", "bench", "host", "--engine", small_engine, "--batch", "6",
           "--prompt-len", "12", "--output-len", "10", "--cprofile", "2", "--prefill", "3"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = glob.glob(str(results / "host-phases-cpu-*.json"))
    rec = json.load(open(path))
    m = rec["metrics"]
    dec = m["decode_at_batch"]
    assert dec["steps"] > 0 and _positive(dec["ms_p50"]["schedule"]) and _positive(dec["ms_p50"]["launch"])
    assert dec["ms_p50"]["wall"] >= dec["ms_p50"]["schedule"]
    assert m["other"]["steps"] > 0
    assert m["cprofile_steps"] == 2 and m["cprofile_top"] and _positive(m["cprofile_top"][0]["tottime_ms_per_step"])
    (pf,) = m["prefill"]
    assert pf["prompts"] == 3 and pf["tokens"] == 36 and _positive(pf["wall_ms"]) and pf["kernels"]
    assert rec["settings"]["batch"] == 6
