"""Fuzzing the HTTP API: schemathesis cases from the app's OpenAPI document plus random junk bodies.
No input may make the server answer 5xx."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from kiln.launch.server import build_app
from server_helpers import ServerThread, shared

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def served(smollm_engine):
    s = shared(smollm_engine)
    app = build_app(s.client(), model_name="smollm", request_timeout=60)
    with ServerThread(app) as srv:
        yield app, srv


def _bounded(body):
    """Keeps generation short: small max_tokens and n (the values stay valid or invalid as drawn)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS  # null means "up to the context": too long for a fuzz case
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 2:
            body["n"] = 2
        v = body.get("min_tokens")
        if isinstance(v, int) and not isinstance(v, bool) and v > 64:
            body["min_tokens"] = 64
    return body


def test_openapi_operations_never_5xx(served):
    app, srv = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ops = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in ops}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths
    seen: dict[str, set[int]] = {}
    for op in ops:
        examples = 40 if op.method.upper() == "POST" else 5

        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict):
                case.body = _bounded(case.body)
            r = case.call(base_url=srv.url, timeout=60)
            seen.setdefault(op.path, set()).add(r.status_code)
            assert r.status_code < 500, (op.path, case.body, r.status_code, r.text[:300])
            if r.status_code >= 400:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"]

        check()
    assert 200 in seen["/v1/completions"] and 400 in seen["/v1/completions"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from([
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "logprobs",
    "top_logprobs", "seed", "response_format", "stream_options", "top_k", "min_p", "stop_token_ids", "echo",
    "priority", "min_tokens", "repetition_penalty",
])


@st.composite
def _junk(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return json.dumps(draw(_json)).encode()
    base = {"model": "smollm", "prompt": "Hi", "max_tokens": 2} if kind == 2 else {
        "model": "smollm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for key in draw(st.lists(_fields, max_size=3)):
        base[key] = draw(_json)
    return json.dumps(_bounded(base)).encode()


def test_junk_bodies_never_5xx(served):
    _, srv = served
    client = httpx.Client(base_url=srv.url, timeout=60)

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=_junk(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def check(body, path):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (path, body[:200], r.status_code, r.text[:300])
        if r.status_code != 200:
            assert "error" in r.json()

    check()
    client.close()
