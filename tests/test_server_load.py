"""The server under load: many streams with disconnects, a full queue, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kiln.launch.server import build_app
from server_helpers import ServerThread, free_port, metric, shared, wait_health


@pytest.fixture(scope="module")
def server(smollm_engine):
    s = shared(smollm_engine)
    app = build_app(s.client(), model_name="smollm")
    with ServerThread(app) as srv:
        yield srv, s


async def _stream(client, url, body, *, disconnect_after=None):
    """Reads one SSE stream; returns (status, data events). Leaves after ``disconnect_after`` chunks."""
    events = []
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.text]
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if disconnect_after is not None and len(events) >= disconnect_after:
                return 200, events
    return 200, events


def _finish_reasons(events):
    reasons = []
    for e in events:
        if e == "[DONE]":
            continue
        obj = json.loads(e)
        for c in obj.get("choices", []):
            if c.get("finish_reason"):
                reasons.append(c["finish_reason"])
    return reasons


def _wait_idle(srv, timeout=30.0) -> str:
    end = time.monotonic() + timeout
    while True:
        text = httpx.get(srv.url + "/metrics").text
        idle = metric(text, "kiln_kv_blocks_used") == 0 and metric(text, "kiln_requests_running") == 0
        if idle or time.monotonic() > end:
            return text
        time.sleep(0.2)


def test_128_streams_with_disconnects(server):
    srv, s = server
    url = srv.url + "/v1/completions"

    async def main():
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            tasks = []
            for i in range(128):
                leave = i % 4 == 0
                body = {"model": "smollm", "prompt": f"Story {i}: once upon a time", "stream": True,
                        "max_tokens": 40 if leave else 8, "temperature": 0.8, "seed": i, "ignore_eos": leave}
                tasks.append(_stream(client, url, body, disconnect_after=2 if leave else None))
            return await asyncio.gather(*tasks)

    before = httpx.get(srv.url + "/metrics").text
    results = asyncio.run(main())
    for i, (status, events) in enumerate(results):
        assert status == 200, events
        if i % 4:
            assert events[-1] == "[DONE]"
            assert _finish_reasons(events) in (["stop"], ["length"]), events[-3:]
    text = _wait_idle(srv)
    assert metric(text, "kiln_kv_blocks_used") == 0
    assert metric(text, "kiln_requests_running") == 0 and metric(text, "kiln_requests_waiting") == 0
    done = metric(text, "kiln_request_success_total", 'finish_reason="length"') + metric(
        text, "kiln_request_success_total", 'finish_reason="stop"')
    done_before = metric(before, "kiln_request_success_total", 'finish_reason="length"') + metric(
        before, "kiln_request_success_total", 'finish_reason="stop"')
    assert done - done_before >= 96
    assert metric(text, "kiln_request_errors_total", 'kind="aborted"') - metric(
        before, "kiln_request_errors_total", 'kind="aborted"') >= 1


def test_queue_full_gives_429(server):
    srv, s = server
    ae = srv.server.kiln_state.engine  # the app's client of the engine core: the limit is the core's
    old = ae.max_waiting
    ae.max_waiting = 2

    async def one(client, i):
        r = await client.post(srv.url + "/v1/completions",
                              json={"model": "smollm", "prompt": f"Item {i}:", "max_tokens": 4, "temperature": 0})
        return r.status_code, r.json()

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    try:
        results = asyncio.run(main())
    finally:
        ae.max_waiting = old
    codes = [c for c, _ in results]
    assert all(c in (200, 429) for c in codes), codes
    assert 429 in codes and 200 in codes, codes
    for c, body in results:
        if c == 429:
            assert body["error"]["code"] == "queue_full"
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert metric(_wait_idle(srv), "kiln_kv_blocks_used") == 0


def test_sigterm_drains_then_exits(smollm_engine):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    grace = 6.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.launch.cli", "serve", smollm_engine, "--port", str(port),
         "--grace-period", str(grace)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_health(url, timeout=180, proc=proc)

        async def main():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
                started = [asyncio.Event() for _ in range(16)]

                async def one(i):
                    long = i % 2 == 1
                    body = {"model": os.path.basename(smollm_engine),
                            "prompt": f"Request {i} says", "stream": True, "temperature": 0,
                            "max_tokens": 1500 if long else 6, "ignore_eos": True}
                    events = []
                    try:
                        async with client.stream("POST", url + "/v1/completions", json=body) as r:
                            assert r.status_code == 200, await r.aread()
                            async for line in r.aiter_lines():
                                if line.startswith("data: "):
                                    events.append(line[6:])
                                    started[i].set()
                    except httpx.HTTPError as e:
                        events.append(f"transport error: {e!r}")
                    started[i].set()
                    return long, events

                tasks = [asyncio.create_task(one(i)) for i in range(16)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
                t_term = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                try:
                    refused = (await client.get(url + "/health")).status_code
                except httpx.HTTPError:
                    refused = "refused"
                try:
                    r = await client.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 2})
                    new_status = r.status_code
                except httpx.HTTPError:
                    new_status = "refused"
                results = await asyncio.gather(*tasks)
                return t_term, refused, new_status, results

        t_term, health_status, new_status, results = asyncio.run(main())
        assert health_status in (503, "refused")
        assert new_status in (503, "refused")
        for long, events in results:
            assert events and events[-1] == "[DONE]", events[-2:]
            last = json.loads(events[-2])
            if "error" in last:
                assert long and last["error"]["code"] == "aborted", last
            else:
                assert last["choices"][0]["finish_reason"] == "length"
        assert any("error" in json.loads(ev[-2]) for long, ev in results if long), "long requests should be aborted"
        assert all("error" not in json.loads(ev[-2]) for long, ev in results if not long)
        rc = proc.wait(timeout=grace + 15)
        assert time.monotonic() - t_term < grace + 10
        assert rc == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
