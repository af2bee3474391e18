"""The Ray launcher on a local CPU cluster: greedy outputs equal the local launcher's at tp=2 with
dp=1 and dp=2, requests sharing a prefix land on one replica, a killed worker costs no request
(each completes correctly or ends with a clear error) and its replica comes back, and the client
handles work against an in-process server. One Ray cluster for the whole module."""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from kiln.launch.topology import load_topology  # noqa: E402
from kiln.runtime import LLM, SamplingParams  # noqa: E402

from conftest import build_small, make_hf_model  # noqa: E402

TOPO = "local-cpu.yaml"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 60))]
SP = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
KILL_PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + i)] for i in range(8)]
PREFIX_A = list(range(3, 67))       # 64 tokens: four 16-token blocks
PREFIX_B = list(range(400, 464))
AFFINITY_PROMPTS = [(PREFIX_A if i % 2 == 0 else PREFIX_B) + [500 + i, 7] for i in range(8)]
TEXT = "hello kiln"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="kiln-test")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-hf")
    make_hf_model("llama").save_pretrained(d)
    return build_small(str(d), str(tmp_path_factory.mktemp("ray-eng") / "tp2"), tp=2)


@pytest.fixture(scope="module")
def ref(engine):
    """The local launcher's greedy outputs for every prompt the module uses."""
    with LLM(engine) as llm:
        base = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP)]
        long = [o.outputs[0].token_ids for o in llm.generate(KILL_PROMPTS, LONG)]
        aff = [o.outputs[0].token_ids for o in llm.generate(AFFINITY_PROMPTS, SP)]
        text = llm.generate([TEXT], SP)[0].outputs[0].text
    return {"base": base, "long": long, "affinity": aff, "text": text}


@pytest.fixture(scope="module")
def dp2(cluster, engine):
    llm = LLM(engine, launcher="ray", topology=TOPO)
    yield llm
    llm.shutdown()


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def run_with_kill(llm, prompts, params, kill, after_steps: int = 3, deadline_s: float = 30.0):
    """Submits every prompt, kills a worker after a few steps, steps until all end; returns outputs by id."""
    eng = llm.engine
    ids = [f"kill-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, params)
    done = {}
    steps = 0
    t_kill = None
    while len(done) < len(ids):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = (out, time.monotonic())
        steps += 1
        if steps == after_steps:
            kill(eng)
            t_kill = time.monotonic()
        assert t_kill is None or time.monotonic() - t_kill < deadline_s, "requests did not end in time"
    return [done[i] for i in ids], t_kill


def check_after_kill(results, t_kill, want):
    ok = err = 0
    for (out, t_end), w in zip(results, want):
        assert t_end - t_kill < 30.0
        if out.error is None:
            assert out.outputs[0].token_ids == w
            ok += 1
        else:
            assert "replica" in out.error and out.outputs[0].finish_reason == "error"
            err += 1
    return ok, err


def wait_healthy(eng, n: int, timeout: float = 120.0) -> float:
    t0 = time.monotonic()
    while eng.stats()["replicas_healthy"] < n:
        assert time.monotonic() - t0 < timeout, f"replicas did not come back: {eng.stats()}"
        eng.step()
        time.sleep(0.05)
    return time.monotonic() - t0


def test_tp2_dp1_equals_local_and_survives_rank0_death(cluster, engine, ref):
    topo = load_topology(TOPO).with_layout(dp=1)
    with LLM(engine, launcher="ray", topology=topo) as llm:
        assert tokens(llm.generate(PROMPTS, SP)) == ref["base"]
        rep = llm.engine._slots[0].handle

        results, t_kill = run_with_kill(llm, KILL_PROMPTS, LONG, lambda eng: ray.kill(rep.actors[0], no_restart=True))
        ok, err = check_after_kill(results, t_kill, ref["long"])
        print(f"\ndp=1 rank-0 kill: {ok} completed correctly, {err} ended with an error; stats {llm.stats()}")
        assert ok + err == len(KILL_PROMPTS)
        wait_healthy(llm.engine, 1)
        assert tokens(llm.generate(PROMPTS, SP)) == ref["base"]
        assert llm.stats()["replica_failures"] == 1


def test_dp2_equals_local(dp2, ref):
    assert tokens(dp2.generate(PROMPTS, SP)) == ref["base"]
    assert tokens(dp2.generate(PROMPTS * 3, SP)) == ref["base"] * 3


def test_prefix_affinity_routes_shared_prefixes_together(dp2, ref):
    eng = dp2.engine
    before = eng.stats()
    outs = dp2.generate(AFFINITY_PROMPTS, SP)
    assert tokens(outs) == ref["affinity"]
    routes = {rid: idx for rid, idx, _ in list(eng.route_log)[-len(AFFINITY_PROMPTS):]}
    placed = [routes[o.request_id] for o in outs]
    a, b = set(placed[0::2]), set(placed[1::2])
    st = eng.stats()
    hits = st["affinity_hits"] - before["affinity_hits"]
    lookups = st["affinity_lookups"] - before["affinity_lookups"]
    print(f"\naffinity: prefix A -> replicas {a}, prefix B -> replicas {b}; hit rate {hits}/{lookups} "
          f"(cumulative {st['affinity_hit_rate']:.2f})")
    assert len(a) == 1 and len(b) == 1
    assert lookups >= 6 and hits / lookups >= 0.75


def test_worker_kill_moves_requests_and_replica_restarts(dp2, ref):
    eng = dp2.engine

    def kill(e):
        loads = e.stats()["replica_load"]
        victim = max(range(len(loads)), key=lambda i: loads[i] or 0)
        ray.kill(e._slots[victim].handle.actors[1], no_restart=True)

    before = eng.stats()
    results, t_kill = run_with_kill(dp2, KILL_PROMPTS, LONG, kill)
    ok, err = check_after_kill(results, t_kill, ref["long"])
    st = eng.stats()
    print(f"\ndp=2 worker kill: {ok} completed correctly, {err} ended with an error, "
          f"{st['requests_resumed'] - before['requests_resumed']} resumed on the healthy replica")
    assert ok + err == len(KILL_PROMPTS) and ok >= 1
    assert tokens(dp2.generate(PROMPTS, SP)) == ref["base"]  # served by the surviving replica meanwhile
    took = wait_healthy(eng, 2)
    print(f"replica restarted in {took:.1f} s; stats {eng.stats()}")
    assert tokens(dp2.generate(PROMPTS * 2, SP)) == ref["base"] * 2


def test_client_handles_against_server(dp2, ref):
    from server_helpers import ServerThread

    from kiln.launch.client import AsyncKilnClient, KilnClient, KilnClientError
    from kiln.launch.ray_launcher import cluster_async_engine
    from kiln.launch.server import build_app

    eng = dp2.engine
    eng.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    ae = cluster_async_engine(eng)
    try:
        app = build_app(ae, model_name="tiny", api_key="k")
        with ServerThread(app) as srv:
            with KilnClient(srv.url, api_key="k") as c:
                assert c.health()
                out = c.generate(TEXT, SP)
                assert out.finished and out.outputs[0].text == ref["text"]
                assert out.outputs[0].finish_reason == "length" and out.metrics["completion_tokens"] == 10
                parts = list(c.stream(TEXT, SP))
                assert parts[-1].finished and parts[-1].outputs[0].text == ref["text"] and len(parts) > 2
                chat = c.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5, temperature=0))
                assert chat.finished and chat.outputs[0].finish_reason in ("length", "stop")
                with pytest.raises(KilnClientError) as e:
                    c.generate(TEXT, SamplingParams(max_tokens=100_000))
                assert e.value.status == 400
            with pytest.raises(KilnClientError) as e:
                KilnClient(srv.url, api_key="wrong").generate(TEXT, SP)
            assert e.value.status == 401

            async def run_async():
                async with AsyncKilnClient(srv.url, api_key="k") as c:
                    full = await c.generate(TEXT, SP)
                    last = None
                    async for part in c.stream(TEXT, SP):
                        last = part
                    return full, last

            full, last = asyncio.run(run_async())
            assert full.outputs[0].text == ref["text"] == last.outputs[0].text
    finally:
        ae.shutdown()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not __import__("os").path.isdir("/proc"), reason="reads the process tree from /proc")
def test_serve_with_ray_drains_on_sigterm_and_stops_its_cluster(engine):
    """`kiln serve --launcher ray`: answers, then SIGTERM drains, the process exits 0 within the grace
    period, and no process of the Ray cluster it started (agents included) outlives it."""
    import signal
    import subprocess
    import sys

    import httpx

    from kiln.runtime.worker import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.launch.cli", "serve", engine, "--launcher", "ray", "--topology", TOPO,
                             "--port", str(port), "--grace-period", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.5)
        r = httpx.post(url + "/v1/completions", json={"model": "tp2", "prompt": PROMPTS[0], "max_tokens": 10,
                                                       "temperature": 0.0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        from kiln.launch.ray_launcher import descendants

        tree = set(descendants(proc.pid))
        assert any(b"ray::" in open(f"/proc/{p}/cmdline", "rb").read() for p in tree if _running(p))  # actors and agents
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=40)
        assert rc == 0, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() - t0 < 25
        time.sleep(0.5)
        left = [p for p in tree if _running(p)]
        assert not left, [open(f"/proc/{p}/cmdline", "rb").read()[:80] for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
