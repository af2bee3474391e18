"""The OpenAI-compatible server through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema_rs
import openai
import pytest

from kiln.launch.server import build_app
from kiln.runtime.sampling_params import SamplingParams
from server_helpers import ServerThread, metric, shared

KEY = "sk-test"
PROMPT = "The capital of France is"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def env(smollm_engine):
    s = shared(smollm_engine)
    ref = s.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0)).outputs[0]
    app = build_app(s.client(), model_name="smollm", api_key=KEY, max_body_bytes=1 << 20, aliases=["eng"])
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        yield srv, client, ref, s


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_models_health_and_auth(env):
    srv, client, _, _ = env
    assert [m.id for m in client.models.list().data] == ["smollm"]
    assert httpx.get(srv.url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="smollm", prompt="hi", max_tokens=1)


def test_completion_stream_equals_offline(env):
    _, client, ref, _ = env
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model="eng", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_stream_equals_non_stream(env):
    _, client, _, _ = env
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="smollm", messages=msgs, max_tokens=10, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="smollm", messages=msgs, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n2_and_logprobs(env):
    _, client, _, _ = env
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=5, temperature=0.9, seed=1, n=2, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) >= 1
        assert "".join(lp.tokens) == c.text
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(2 <= len(t) <= 3 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    r = client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens // 2
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert bytes(t.bytes).decode() == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5  # greedy: the chosen token is the top one


def test_stop_sequence(env):
    _, client, ref, _ = env
    stop = ref.text.strip()[len(ref.text.strip()) // 2:][:2]
    cut = ref.text.index(stop)
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == ref.text[:cut]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="smollm", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text[:cut]


def test_json_schema_output(env):
    _, client, _, _ = env
    r = client.chat.completions.create(
        model="smollm", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=48,
        temperature=0.7, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert jsonschema_rs.is_valid(PERSON, obj), obj
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm", messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nope"}}},
        )


def test_request_errors(env):
    srv, client, _, _ = env
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm", prompt="hello " * 2100, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": "hi"}], temperature=3.5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    cases = [
        (b'{"model": "smollm", "prompt": "hi", ', 400),
        (b'[1, 2, 3]', 400),
        (json.dumps({"model": "smollm", "prompt": "hi", "max_tokens": "many"}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": "hi", "top_p": 0}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": "hi", "n": 0}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": []}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": [99999999]}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": [5, -(1 << 70)]}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": [1 << 40]}).encode(), 400),
        (json.dumps({"model": "smollm", "prompt": "x" * (2 << 20)}).encode(), 413),
    ]
    for body, status in cases:
        r = httpx.post(srv.url + "/v1/completions", content=body, headers={**_auth(), "Content-Type": "application/json"})
        assert r.status_code == status, (body[:60], r.text[:200])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "smollm", "messages": []}, headers=_auth())
    assert r.status_code == 400
    r = httpx.get(srv.url + "/v1/nothing", headers=_auth())
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_count_requests(env):
    srv, client, _, _ = env

    def scrape():
        r = httpx.get(srv.url + "/metrics", headers=_auth())
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    before = scrape()
    client.completions.create(model="smollm", prompt=PROMPT, max_tokens=3, temperature=0,
                              extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm", prompt="hello " * 2100, max_tokens=4)
    after = scrape()
    for name, labels, delta in [
        ("kiln_request_success_total", 'finish_reason="length"', 1),
        ("kiln_generation_tokens_total", "", 3),
        ("kiln_request_errors_total", 'kind="context_length_exceeded"', 1),
        ("kiln_time_to_first_token_seconds_count", "", 1),
        ("kiln_e2e_request_latency_seconds_count", "", 1),
    ]:
        assert metric(after, name, labels) - metric(before, name, labels) >= delta, name
    assert metric(after, "kiln_prompt_tokens_total") > metric(before, "kiln_prompt_tokens_total")
    for name in ("kiln_kv_blocks_used", "kiln_kv_blocks_free", "kiln_kv_cache_usage", "kiln_requests_running",
                 "kiln_requests_waiting", "kiln_prefix_cache_hit_rate", "kiln_preemptions_total"):
        metric(after, name)
    assert metric(after, "kiln_kv_blocks_free") > 0


def test_timeout_aborts_request(env):
    _, _, _, s = env
    core = s.client()
    app = build_app(core, model_name="smollm", request_timeout=1.0)
    with ServerThread(app) as srv:
        body = {"model": "smollm", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "timeout"
        end = time.monotonic() + 10
        while core.stats()["kv_blocks_used"] and time.monotonic() < end:
            time.sleep(0.1)
        assert core.stats()["kv_blocks_used"] == 0


def test_penalized_request_in_a_greedy_batch_keeps_every_output(env):
    """A request with repetition_penalty makes the engine wait for every step's tokens; batched
    with greedy requests through the server, each request still gives what it gives alone."""
    import asyncio

    srv, _, _, _ = env
    bodies = [{"model": "smollm", "prompt": f"Item {i}: the weather today is", "max_tokens": 10, "temperature": 0,
               "ignore_eos": True} for i in range(5)]
    bodies.append({**bodies[0], "prompt": "Repeat after me: red red red", "repetition_penalty": 1.5})

    batched, solo = _together_and_alone(srv, bodies)
    assert batched == solo
    assert solo[-1] != asyncio.run(_unpenalized(srv, bodies[-1]))


def _together_and_alone(srv, bodies: list[dict]) -> tuple[list[str], list[str]]:
    """The completion texts of ``bodies`` sent at once (one batch), then one at a time."""
    import asyncio

    async def one(client, body):
        r = await client.post(srv.url + "/v1/completions", json=body, headers=_auth())
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def together():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    async def alone():
        async with httpx.AsyncClient(timeout=120) as client:
            return [await one(client, b) for b in bodies]

    return asyncio.run(together()), asyncio.run(alone())


async def _unpenalized(srv, body):
    body = {k: v for k, v in body.items() if k != "repetition_penalty"}
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(srv.url + "/v1/completions", json=body, headers=_auth())
        return r.json()["choices"][0]["text"]


def test_logit_bias(env):
    """OpenAI's logit_bias: +100 makes greedy pick that token at every step, -100 bans the token
    greedy would pick; batched with plain greedy requests, every other output is what it is alone;
    keys that are not token ids of this vocabulary and values outside -100..100 are a 400."""
    srv, client, ref, s = env
    forced = ref.token_ids[3]
    offline = s.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0, logit_bias={forced: 100})).outputs[0]
    assert offline.token_ids == [forced] * 4
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == offline.text
    first = ref.token_ids[0]
    r = client.completions.create(model="smollm", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                  logit_bias={str(first): -100})
    banned = s.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0.0, logit_bias={first: -100})).outputs[0]
    assert banned.token_ids[0] != first and r.choices[0].text == banned.text

    plain = [{"model": "smollm", "prompt": f"Item {i}: the weather today is", "max_tokens": 8, "temperature": 0,
              "ignore_eos": True} for i in range(4)]
    bodies = [*plain, {**plain[0], "prompt": PROMPT, "logit_bias": {str(first): -100}}]

    batched, solo = _together_and_alone(srv, bodies)
    assert batched == solo and solo[-1].startswith(banned.text)

    for bias, param in (({"x": 1}, "logit_bias"), ({"5": 101}, "logit_bias"), ({"99999999": 1}, "logit_bias"),
                        ({str(1 << 40): 1}, "logit_bias")):
        resp = httpx.post(srv.url + "/v1/completions", json={"model": "smollm", "prompt": "hi", "logit_bias": bias},
                          headers=_auth())
        assert resp.status_code == 400, (bias, resp.text)
        assert resp.json()["error"]["param"].startswith(param), resp.text
