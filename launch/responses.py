"""Response pieces of the HTTP server: OpenAI error bodies, server-sent events, logprob shapes."""

from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse, StreamingResponse


class APIError(Exception):
    """An error answered with OpenAI's body and the given HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param=None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status in (429, 503):
        headers = {"Retry-After": "1"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_event(err: APIError) -> bytes:
    return sse(err.body())


class EventStream(StreamingResponse):
    """A streaming response that always closes its generator and runs ``on_close``, also when the
    client goes away mid-stream (the generator's close aborts the engine request)."""

    def __init__(self, content, *, on_close=None, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close()


async def merge_streams(gens: list, firsts: list):
    """Yields ``(index, output)`` from several engine streams as outputs arrive, each one's first
    output (already taken) before the rest. Closing this generator closes every stream."""
    for i, out in enumerate(firsts):
        yield i, out
    live = [i for i, out in enumerate(firsts) if not out.finished]
    if len(gens) == 1:
        try:
            if live:
                async for out in gens[0]:
                    yield 0, out
        finally:
            await gens[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i):
        try:
            async for out in gens[i]:
                q.put_nowait((i, out))
            q.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i)) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()


def usage_of(finals, count_output: bool = True) -> dict:
    """OpenAI's usage block; ``count_output=False`` for a prompt-only score (echo, max_tokens 0)."""
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs) if count_output else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _ranked(entry: dict) -> list:
    """A token's logprob entry as (token id, Logprob) pairs: the sampled token first, then by logprob."""
    items = list(entry.items())
    return items[:1] + sorted(items[1:], key=lambda kv: -kv[1].logprob)


def _safe(x: float) -> float:
    if x != x:
        return -9999.0
    return max(float(x), -9999.0)


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI's completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for entry in entries:
        ranked = _ranked(entry)
        _, chosen = ranked[0]
        text = chosen.decoded_token or ""
        tokens.append(text)
        lps.append(_safe(chosen.logprob))
        offsets.append(pos)
        pos += len(text)
        top = {}
        for _, lp in sorted(ranked, key=lambda kv: -kv[1].logprob):
            top.setdefault(lp.decoded_token or "", _safe(lp.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(out, decode) -> dict | None:
    """The echoed prompt's part of OpenAI's completions logprobs (from ``out.prompt_logprobs``):
    the first token has null ``token_logprobs`` and ``top_logprobs``; offsets count from the start
    of the echoed text. None when the request did not ask for prompt logprobs."""
    entries = out.prompt_logprobs
    if entries is None or not out.prompt_token_ids:
        return None
    first = decode([out.prompt_token_ids[0]])
    rest = completion_logprobs([e for e in entries[1:] if e is not None], len(first))
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def join_logprobs(head: dict | None, tail: dict | None) -> dict | None:
    """Two completions logprobs blocks one after the other (the echoed prompt's, then the output's)."""
    if head is None or tail is None:
        return head if tail is None else tail
    return {k: [*head[k], *tail[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def completion_choice(out, c, echo: str | None, score_only: bool, decode) -> tuple[str, dict | None]:
    """A finished completion's text and logprobs: with ``echo`` (the prompt's text) both start
    with the prompt; ``score_only`` (echo with max_tokens 0) leaves the generated token out."""
    prefix = echo or ""
    gen = completion_logprobs(c.logprobs, len(prefix)) if c.logprobs is not None and not score_only else None
    if echo is None:
        return c.text, gen
    text = prefix if score_only else prefix + c.text
    return text, join_logprobs(echo_logprobs(out, decode), gen)


def chat_logprobs(entries: list[dict], k: int) -> list[dict]:
    """OpenAI's chat shape: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    out = []
    for entry in entries:
        ranked = _ranked(entry)
        _, chosen = ranked[0]
        text = chosen.decoded_token or ""
        top = sorted(ranked, key=lambda kv: -kv[1].logprob)[:k] if k else []
        out.append({
            "token": text, "logprob": _safe(chosen.logprob), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": _safe(lp.logprob),
                 "bytes": list((lp.decoded_token or "").encode("utf-8"))}
                for _, lp in top
            ],
        })
    return out


def completion_chunk(ctx, index: int, text: str, logprobs, finish_reason) -> dict:
    return {"id": ctx.rid, "object": "text_completion", "created": ctx.created, "model": ctx.state.model_name,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(ctx, index: int, delta: dict, logprobs, finish_reason) -> dict:
    return {"id": ctx.rid, "object": "chat.completion.chunk", "created": ctx.created, "model": ctx.state.model_name,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


__all__ = [
    "APIError", "EventStream", "chat_chunk", "chat_logprobs", "completion_choice", "completion_chunk",
    "completion_logprobs", "echo_logprobs", "error_event", "error_response", "join_logprobs", "merge_streams", "sse",
    "usage_of",
]
