"""`kiln serve` as processes: the engine core apart from the API servers.

The wire carries every field of the outputs; the engine core and the API servers start and stop
together (SIGTERM drains all, exit 0, nothing left running); two API servers share one port and
one core and both answer; a killed engine core turns /health and every request into a 503 with
OpenAI's error body within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kiln.launch import core_wire as w
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from server_helpers import free_port, metric, wait_health


# --- the wire ------------------------------------------------------------------------------------------
def test_wire_schema_names_every_output_field():
    assert w.check_schema() == []


def _snapshots():
    """Successive states of one request with two completions, as the engine reports them."""
    outs = []
    for step in range(1, 5):
        comps = []
        for i in range(2):
            n = step + i
            comps.append(CompletionOutput(
                index=i, text="ab" * n, token_ids=list(range(10, 10 + n)), cumulative_logprob=-0.5 * n,
                logprobs=[{10 + j: Logprob(-0.1 * j, 1, None), 99: Logprob(-3.0, None, None)} for j in range(n)],
                finish_reason="length" if step == 4 else None, stop_reason=None))
        plp = [None] + [{5: Logprob(-1.0, 2, "x")}] * min(step, 2)
        outs.append(RequestOutput("r1", None, [1, 2, 3], comps, finished=step == 4, num_cached_tokens=step,
                                  metrics={"arrival": 1.0, "first_token": 2.0}, prompt_logprobs=plp))
    return outs


def test_wire_deltas_rebuild_every_snapshot():
    enc = w.OutputEncoder()
    req_state, seq_state = {}, {}
    sizes = []
    for out in _snapshots():
        frame = w.unpack(w.pack([w.STEP, [enc.encode(out)], {}]))
        sizes.append(len(w.pack(frame)))
        rid, req_values, comps = frame[1][0]
        assert rid == "r1"
        w.apply_fields(req_state, req_values, w.REQUEST_WIRE)
        for index, values in comps:
            w.apply_fields(seq_state.setdefault(index, {}), values, w.COMPLETION_WIRE)
        rebuilt = w.build(RequestOutput, dict(req_state, request_id=rid, prompt=None, prompt_token_ids=[1, 2, 3], outputs=[
            w.build(CompletionOutput, dict(seq_state[i], index=i)) for i in sorted(seq_state)]))
        assert rebuilt == out
    assert len(enc) == 0  # a finished request leaves no state behind
    assert sizes[-1] < sizes[0] * 2  # deltas, not whole histories


def test_spelled_out_encoder_equals_the_tables():
    """``OutputEncoder.encode`` names the tables' fields itself (it runs for every request of every
    step); it must send exactly what reading ``REQUEST_WIRE`` / ``COMPLETION_WIRE`` sends."""
    assert w._FAST  # the tables still list the fields encode spells out, in its order
    fast, slow = w.OutputEncoder(), w.OutputEncoder()
    snaps = _snapshots()
    more = [RequestOutput("r2", None, [7], [CompletionOutput(index=0, text="x" * n, token_ids=list(range(n)))],
                          finished=n == 5, metrics={"t": float(n)}) for n in (0, 1, 1, 3, 5)]
    for out in [x for pair in zip(snaps, more) for x in pair] + more[len(snaps):]:
        assert fast.encode(out) == slow.encode_by_table(out)
    assert len(fast) == len(slow) == 0


# --- the processes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    out = str(tmp_path_factory.mktemp("split") / "tiny")
    return build_engine("tiny-llama", out, BuildConfig(dtype="float32", max_seq_len=256), random_weights=True,
                        device_class="cpu", progress=False)


def test_encoding_live_requests_equals_encoding_their_snapshots(tiny):
    """What the engine core sends, read straight off the engine's requests (``encode_request``),
    is what encoding each step's ``RequestOutput`` sends: plain, stop strings (text held back),
    logprobs, n=2, prompt logprobs, an abort, a request finishing on its first token."""
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    eng = LLMEngine(tiny)
    eng.detokenize = False  # as in the engine core: text only for stop strings
    eng.raw_outputs = True
    vocab = eng.config.model.vocab_size
    prompt = lambda k: [(7 * k + j) % (vocab - 1) + 1 for j in range(5 + k)]  # noqa: E731
    reqs = {
        "plain": SamplingParams(max_tokens=9, ignore_eos=True),
        "stop": SamplingParams(max_tokens=12, ignore_eos=True, stop=["a", "e "], temperature=1.0, seed=3),
        "logprobs": SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2),
        "n2": SamplingParams(max_tokens=7, ignore_eos=True, n=2, temperature=1.0, seed=1),
        "plp": SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=1),
        "abort": SamplingParams(max_tokens=30, ignore_eos=True),
        "one": SamplingParams(max_tokens=1, ignore_eos=True),
    }
    for k, (rid, sp) in enumerate(reqs.items()):
        eng.add_request(rid, prompt(k), sp)
    direct, snap = w.OutputEncoder(), w.OutputEncoder()
    frames = steps = 0
    while eng.has_unfinished():
        steps += 1
        if steps == 4:
            assert eng.abort_request("abort")
        for req, fin in eng.step():
            out = eng._output(req)
            assert fin == out.finished
            assert direct.encode_request(req, fin) == snap.encode(out), (req.request_id, steps)
            frames += 1
    assert frames > len(reqs) and len(direct) == len(snap) == 0


def _serve(engine: str, log_path: str, *extra: str):
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "kiln.launch.cli", "serve", engine, "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _tree(pid: int) -> dict[str, list[int]]:
    from kiln.launch.procs import serve_roles

    return serve_roles(pid)


def _running(pid: int) -> bool:
    from kiln.launch.procs import alive

    return alive(pid)


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _completion(url: str, **body) -> httpx.Response:
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True, **body}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_two_api_servers_share_a_core_and_stop_together(tiny, tmp_path):
    proc, url = _serve(tiny, str(tmp_path / "log"), "--api-server-count", "2", "--grace-period", "5")
    try:
        wait_health(url, timeout=180, proc=proc)
        tree = _tree(proc.pid)
        assert len(tree["core"]) == 1 and len(tree["api"]) == 2, tree
        # An API server's warm-up request ran through the core before /health said ok, and counts nowhere.
        text = httpx.get(url + "/metrics", timeout=10).text
        assert metric(text, "kiln_engine_steps") > 0
        assert metric(text, "kiln_request_success_total", 'finish_reason="length"') == 0
        seen: dict[str, int] = {}
        results = []

        def hit(i):
            r = _completion(url, prompt=f"Request {i} says")
            results.append(r)

        for _ in range(6):  # concurrent waves: a busy API server leaves the next connection to the other
            threads = [threading.Thread(target=hit, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for r in results:
                seen[r.headers["x-kiln-api-server"]] = seen.get(r.headers["x-kiln-api-server"], 0) + 1
            results_ok = all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4 for r in results)
            assert results_ok, [r.text[:200] for r in results]
            if len(seen) == 2:
                break
            results.clear()
        assert set(seen) == {"0", "1"}, seen
        # Both processes' counters are summed on every scrape, whichever process answers it.
        served = sum(seen.values())
        for _ in range(4):
            text = httpx.get(url + "/metrics", timeout=10).text
            assert metric(text, "kiln_request_success_total", 'finish_reason="length"') == served
            assert metric(text, "kiln_kv_blocks_free") > 0

        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        rc = proc.wait(timeout=30)
        assert rc == 0, open(tmp_path / "log").read()[-3000:]
        assert time.monotonic() - t0 < 20
        left = [p for p in [*tree["core"], *tree["api"]] if _running(p)]
        assert not left, left
        log = open(tmp_path / "log").read()
        for role in ("proc=main", "proc=core", "proc=api0", "proc=api1"):
            assert role in log, role
        assert log.count("route=/v1/completions") == served + 1  # no request log line for the warm-ups
    finally:
        _stop(proc)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_killed_engine_core_gives_503(tiny, tmp_path):
    proc, url = _serve(tiny, str(tmp_path / "log"), "--grace-period", "3")
    try:
        wait_health(url, timeout=180, proc=proc)
        tree = _tree(proc.pid)
        core = tree["core"][0]
        events = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "long", "max_tokens": 240, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            t0 = time.monotonic()
            os.kill(core, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - t0 < 5
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2][6:])["error"]
        assert err["code"] == "engine_dead" and set(err) == {"message", "type", "param", "code"}
        h = httpx.get(url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "dead"
        for stream in (False, True):
            r = _completion(url, stream=stream)
            assert r.status_code == 503, r.text
            body = r.json()["error"]
            assert set(body) == {"message", "type", "param", "code"} and body["message"]
        assert time.monotonic() - t0 < 10
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1  # the engine core had failed
        left = [p for p in tree["api"] if _running(p)]
        assert not left, left
    finally:
        _stop(proc)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_torchrun_ranks_serve_one_engine_core(tiny, tmp_path):
    """`torchrun ... kiln serve --launcher torchrun`: rank 0's engine core drives rank 1, and the
    tp=2 engine answers as the tp=1 one does; SIGTERM stops every process."""
    from kiln.runtime.builder import build_engine
    from kiln.runtime.config import BuildConfig

    tp2 = build_engine("tiny-llama", str(tmp_path / "tp2"), BuildConfig(dtype="float32", max_seq_len=256, tp=2),
                       random_weights=True, device_class="cpu", progress=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "kiln.launch.cli", "serve", tp2, "--launcher", "torchrun", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_health(url, timeout=180, proc=proc)
        tree = set(__import__("kiln.launch.ray_launcher", fromlist=["descendants"]).descendants(proc.pid))
        r = _completion(url, max_tokens=6)
        assert r.status_code == 200, r.text
        from kiln.runtime import LLM, SamplingParams

        with LLM(tiny) as llm:
            want = llm.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        assert r.json()["choices"][0]["text"] == want.outputs[0].text
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        time.sleep(0.5)
        assert not [p for p in tree if _running(p)]
    finally:
        _stop(proc)


def test_settle_heap_freezes_what_is_alive():
    """The engine core and each API server freeze their heap once loaded, so later full
    collections do not walk the model and tokenizer objects (pauses of tens of ms per step)."""
    import gc

    from kiln.launch.procs import settle_heap

    def collected(objs) -> int:
        """How many of ``objs`` the collector's three generations hold (frozen ones are in none)."""
        young = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        return sum(id(x) in young for x in objs)

    keep = [[i] for i in range(5000)]
    assert collected(keep) == len(keep)
    try:
        n = settle_heap()  # objects other threads free later leave the frozen set, so n is an upper bound later
        assert n >= len(keep) and collected(keep) == 0
        gc.collect()
        assert collected(keep) == 0  # a collection leaves the frozen objects where they are
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0 and collected(keep) == len(keep)


def test_core_gathers_a_burst_behind_a_prefill_step(tiny):
    """The engine core waits for a prefill step in flight when two or more requests arrived since
    it was planned (then reads the socket and plans), and not for a lone arrival or a decode step."""
    import zmq

    from kiln.launch.engine_core import EngineCore
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    eng = LLMEngine(tiny, async_scheduling=True)  # overlapped, as on a GPU
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        core = EngineCore(eng, sock)
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        eng.add_request("a", [5, 6, 7, 8], sp)
        eng.step()  # a prefill step in flight
        assert eng.inflight_prefills and not core._gather()  # nothing arrived since
        eng.add_request("b", [9, 10, 11], sp)
        assert not core._gather()  # one arrival
        eng.add_request("c", [12, 13], sp)
        assert core._gather() and core.gathered == 1 and eng._inflight is None
        outs = {req.request_id for req, _ in eng.step()}  # the core reads the engine's requests
        assert "a" in outs  # the drained step's token comes with the next step
        while eng.has_unfinished():
            eng.step()
            assert not core._gather()  # decode steps and no arrivals: never waits
        assert core.stats()["core_gathered_steps"] == 1
    finally:
        sock.close(linger=0)
        ctx.term()
