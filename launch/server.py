"""The OpenAI-compatible HTTP app: ``build_app`` makes it, ``serve`` runs ``kiln serve``.

Routes: POST /v1/completions and /v1/chat/completions (JSON or server-sent events), GET /v1/models,
GET /health and GET /metrics. Every error uses OpenAI's body ``{"error": {...}}``. The app runs in
the API server processes (``kiln.launch.api_server``) over a client of the engine core process
(``kiln.launch.core_client``). SIGTERM drains: /health and new requests answer 503, requests in
flight get ``grace_period`` seconds to finish, what remains is aborted, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.launch.api_server import DrainingServer, make_server
from kiln.launch.logs import configure_logging
from kiln.launch.metrics import ServerMetrics
from kiln.launch.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, ProtocolError, new_id, now,
)
from kiln.launch.responses import (
    APIError, EventStream, chat_chunk, chat_logprobs, completion_choice, completion_chunk, completion_logprobs,
    echo_logprobs, error_event, error_response, merge_streams, sse, usage_of,
)
from kiln.runtime.async_engine import EngineDeadError, QueueFullError, RequestError

log = logging.getLogger("kiln.server")

_OPEN_PATHS = {"/health"}
READY_WAIT_S = 5.0  # a request that finds this API server's engine client not yet ready waits this long


class ServerState:
    """What the routes share: the engine client (an ``AsyncEngine`` in this process or a
    ``CoreClient`` of the engine core process; None while loading), names, limits, the drain
    flag, and which API server process this is (``api_server``, None when there is one)."""

    def __init__(self, engine, model_name: str, aliases: list[str], api_key, request_timeout: float, max_body_bytes: int,
                 api_server: int | None = None):
        self.engine = None
        self.api_server = api_server
        self.model_name = model_name
        self.aliases = {model_name, *[a for a in aliases if a]}
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.warming = False  # the API server's own first request is under way (/health: loading)
        self.active: dict[str, list[str]] = {}
        self.server_aborted: set[str] = set()
        self.metrics = ServerMetrics(model_name, self._stats)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine) -> None:
        self.engine = engine
        self.max_seq_len = getattr(engine, "max_seq_len", None) or getattr(getattr(engine, "engine", None), "max_seq_len", None)

    def _stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {}

    def serving(self) -> bool:
        return self.engine is not None and not self.draining and not self.warming and self.engine.is_alive()

    def unavailable(self) -> str:
        """Why the server does not serve: loading (or warming up), draining or dead."""
        if self.engine is None or getattr(self.engine, "loading", False) or self.warming:
            return "loading"
        if self.draining or getattr(self.engine, "core_draining", False):
            return "draining"
        return "dead"

    def abort_all(self) -> int:
        n = 0
        for rid, engine_ids in list(self.active.items()):
            self.server_aborted.add(rid)
            for eid in engine_ids:
                self.engine.abort(eid)
                n += 1
        return n


class _Guard:
    """ASGI middleware: API key, body size limit and refusal while draining or loading."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self._tag = (b"x-kiln-api-server", str(state.api_server).encode())

    async def __call__(self, scope, receive, send):
        if self.state.api_server is not None and scope["type"] == "http":
            send = _tagged(send, self._tag)
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        st = self.state
        headers = dict(scope.get("headers") or [])
        if st.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {st.api_key}":
                st.metrics.error("unauthorized")
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")
                return await error_response(err)(scope, receive, send)
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            if st.engine is not None and getattr(st.engine, "loading", False) and not st.draining:
                # This API server's engine client has not heard from the core yet: right after
                # start, another API server may already be answering; wait a moment before a 503.
                with contextlib.suppress(Exception):
                    await st.engine.wait_ready(timeout=READY_WAIT_S)
            if st.engine is None or st.draining or not st.engine.is_alive():
                why = {"loading": "the server is loading", "draining": "the server is shutting down"}.get(
                    st.unavailable(), "the engine has stopped")
                st.metrics.error("unavailable")
                return await error_response(APIError(503, why, "service_unavailable", code="unavailable"))(scope, receive, send)
            declared = headers.get(b"content-length")
            too_big = APIError(413, f"the request body exceeds {st.max_body_bytes} bytes", code="body_too_large")
            if declared is not None and declared.isdigit() and int(declared) > st.max_body_bytes:
                st.metrics.error("body_too_large")
                return await error_response(too_big)(scope, receive, send)
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body = msg.get("body", b"")
                size += len(body)
                if size > st.max_body_bytes:
                    st.metrics.error("body_too_large")
                    return await error_response(too_big)(scope, receive, send)
                chunks.append(body)
                if not msg.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replay_receive():
                return replay.pop() if replay else await receive()

            return await self.app(scope, replay_receive, send)
        return await self.app(scope, receive, send)


def _tagged(send, header: tuple[bytes, bytes]):
    """``send`` that adds ``header`` to the response's headers."""

    async def tagged(msg):
        if msg["type"] == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", ()), header]}
        await send(msg)

    return tagged


def _error_kind(err: APIError) -> str:
    if err.code == "context_length_exceeded":
        return "context_length_exceeded"
    return {400: "invalid_request", 404: "model_not_found", 408: "timeout", 413: "body_too_large", 429: "queue_full",
            503: "unavailable", 504: "timeout"}.get(err.status, "internal" if err.status >= 500 else "invalid_request")


def build_app(
    async_engine,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 4 << 20,
    request_timeout: float = 600.0,
    aliases: list[str] | tuple[str, ...] = (),
    api_server: int | None = None,
) -> FastAPI:
    """The app over an engine client: a ``CoreClient`` of the engine core process, or an
    ``AsyncEngine`` in this process (or None while it loads; attach it with ``app.state.kiln.attach``).
    ``api_server`` numbers this API server process (the ``X-Kiln-Api-Server`` header)."""
    state = ServerState(async_engine, model_name, list(aliases), api_key, request_timeout, max_body_bytes, api_server)
    app = FastAPI(title="kiln", version="0.1.0")
    app.state.kiln = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.error(_error_kind(exc))
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        state.metrics.error("invalid_request")
        return error_response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        state.metrics.error("internal")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error"))

    @app.get("/health")
    async def health():
        if state.serving():
            return {"status": "ok"}
        return JSONResponse({"status": state.unavailable()}, status_code=503)

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=state.model_name, max_model_len=getattr(state, "max_seq_len", None))]
        return ModelList(data=cards).model_dump()

    @app.get("/metrics")
    async def metrics():
        refresh = getattr(state.engine, "refresh_stats", None)
        if refresh is not None:
            await refresh()
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        params = _params(body)
        rid = new_id("cmpl")
        prompts = body.prompts()
        echo = [p if isinstance(p, str) else state.engine.tokenizer.decode(p) for p in prompts] if body.echo else None
        return await _run(state, request, rid, "/v1/completions", prompts, params, body, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        params = _params(body)
        tok = state.engine.tokenizer
        try:
            text = tok.apply_chat_template(body.conversation(), tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"messages cannot be rendered with the chat template: {e}", param="messages") from None
        ids = tok.encode(text, add_special_tokens=False)
        rid = new_id("chatcmpl")
        return await _run(state, request, rid, "/v1/chat/completions", [ids], params, body, chat=True, echo=None)

    app.add_middleware(_Guard, state=state)
    return app


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.aliases:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def _params(body):
    try:
        return body.to_sampling_params()
    except ProtocolError as e:
        raise APIError(400, str(e), param=e.param, code=e.code or "invalid_value") from None


async def _start(state: ServerState, rid: str, prompts, params, priority: int):
    """Submits every prompt; returns the engine ids, the streams and their first outputs."""
    eng = state.engine
    ids = [rid if len(prompts) == 1 else f"{rid}-{i}" for i in range(len(prompts))]
    gens, firsts = [], []
    try:
        for eid, p in zip(ids, prompts):
            g = eng.generate(p, params, request_id=eid, priority=priority)
            gens.append(g)
            firsts.append(await g.__anext__())
    except BaseException as e:
        for g in gens:
            await g.aclose()
        if isinstance(e, RequestError):
            raise APIError(400, str(e), param=e.param, code=e.code or "invalid_value") from None
        if isinstance(e, ValueError):
            raise APIError(400, str(e), param="response_format" if "response_format" in str(e) else None,
                           code="invalid_value") from None
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        if isinstance(e, EngineDeadError):
            raise APIError(503, str(e), "service_unavailable", code="engine_dead") from None
        raise
    return ids, gens, firsts


async def _run(state, request: Request, rid, route, prompts, params, body, *, chat: bool, echo):
    t0 = time.monotonic()
    deadline = t0 + state.request_timeout
    try:
        async with asyncio.timeout(state.request_timeout):
            ids, gens, firsts = await _start(state, rid, prompts, params, body.priority or 0)
    except TimeoutError:
        raise APIError(504, f"the request timed out after {state.request_timeout:g} s", "timeout_error", code="timeout") from None
    state.active[rid] = ids
    stream = merge_streams(gens, firsts)
    ctx = _Ctx(state, rid, route, params, body, chat, echo, t0, deadline, len(prompts),
               quiet=bool(request.scope.get("kiln.warm_up")))
    if body.stream:
        return EventStream(_sse_body(ctx, stream), on_close=ctx.close, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
    try:
        return await _collect(ctx, request, stream)
    finally:
        await stream.aclose()
        ctx.close()


class _Ctx:
    """One HTTP request's bookkeeping."""

    def __init__(self, state, rid, route, params, body, chat, echo, t0, deadline, num_prompts, quiet: bool = False):
        self.state, self.rid, self.route, self.params, self.body = state, rid, route, params, body
        self.chat, self.echo, self.t0, self.deadline = chat, echo, t0, deadline
        self.n = params.n
        self.score_only = not chat and bool(getattr(body, "score_only", False))
        self.num_prompts = num_prompts
        self.finals: dict[int, object] = {}
        self.status = 200
        self.outcome = "ok"
        self.created = now()
        self._closed = False
        self.quiet = quiet  # the API server's own warm-up request: no metrics, no log

    def record(self, p: int, out) -> None:
        if out.finished and p not in self.finals:
            self.finals[p] = out
            if not self.quiet:
                self.state.metrics.observe_request(out)

    def usage(self) -> dict:
        return usage_of(self.finals.values(), count_output=not self.score_only)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.active.pop(self.rid, None)
        self.state.server_aborted.discard(self.rid)
        if self.quiet:
            return
        u = self.usage()
        reasons = sorted({c.finish_reason or "none" for o in self.finals.values() for c in o.outputs})
        log.info(
            "request_id=%s route=%s status=%d outcome=%s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s duration_ms=%.1f",
            self.rid, self.route, self.status, self.outcome, bool(self.body.stream), u["prompt_tokens"],
            u["completion_tokens"], ",".join(reasons) or "none", (time.monotonic() - self.t0) * 1000,
        )


def _failure(ctx: _Ctx, out) -> APIError | None:
    """The error a finished output stands for, if it did not end normally."""
    if out.error:
        return APIError(400, out.error, code="request_failed")
    if any(c.finish_reason == "abort" for c in out.outputs):
        if ctx.rid in ctx.state.server_aborted:
            return APIError(503, "the server is shutting down: the request was aborted", "service_unavailable", code="aborted")
        return APIError(500, "the request was aborted", "server_error", code="aborted")
    return None


async def _collect(ctx: _Ctx, request: Request, stream):
    async def consume():
        async for p, out in stream:
            ctx.record(p, out)

    async def disconnected():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, timeout=max(0.0, ctx.deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
    if work in done:
        try:
            work.result()
        except EngineDeadError as e:
            ctx.status, ctx.outcome = 503, "engine_dead"
            raise APIError(503, str(e), "service_unavailable", code="engine_dead") from None
    elif watch in done:
        ctx.status, ctx.outcome = 499, "client_disconnected"
        ctx.state.metrics.error("aborted")
        return Response(status_code=499)
    else:
        ctx.status, ctx.outcome = 504, "timeout"
        raise APIError(504, f"the request timed out after {ctx.state.request_timeout:g} s", "timeout_error", code="timeout")
    for out in ctx.finals.values():
        err = _failure(ctx, out)
        if err is not None:
            ctx.status, ctx.outcome = err.status, err.code
            raise err
    return JSONResponse(_full_body(ctx))


def _finish(reason):
    return reason if reason in ("stop", "length") else "stop" if reason is None else reason


def _full_body(ctx: _Ctx) -> dict:
    choices = []
    for p in sorted(ctx.finals):
        out = ctx.finals[p]
        for c in out.outputs:
            idx = p * ctx.n + c.index
            if ctx.chat:
                lp = chat_logprobs(c.logprobs, ctx.params.logprobs or 0) if c.logprobs is not None else None
                choices.append({"index": idx, "message": {"role": "assistant", "content": c.text},
                                "logprobs": {"content": lp} if lp is not None else None,
                                "finish_reason": _finish(c.finish_reason)})
            else:
                text, lp = completion_choice(out, c, ctx.echo[p] if ctx.echo else None, ctx.score_only,
                                             ctx.state.engine.tokenizer.decode)
                choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": _finish(c.finish_reason)})
    choices.sort(key=lambda c: c["index"])
    return {
        "id": ctx.rid, "object": "chat.completion" if ctx.chat else "text_completion", "created": ctx.created,
        "model": ctx.state.model_name, "choices": choices, "usage": ctx.usage(),
        **({"system_fingerprint": None} if ctx.chat else {}),
    }


async def _sse_body(ctx: _Ctx, stream):
    sent_text: dict[int, int] = {}
    sent_tok: dict[int, int] = {}
    sent_ids: dict[int, int] = {}  # tokens each choice's chunks have covered
    done_choices: set[int] = set()
    echoed: set[int] = set()
    mk = chat_chunk if ctx.chat else completion_chunk
    try:
        if ctx.chat:
            for i in range(ctx.n * ctx.num_prompts):
                yield sse(chat_chunk(ctx, i, {"role": "assistant", "content": ""}, None, None))
        async with asyncio.timeout(max(0.0, ctx.deadline - time.monotonic())):
            async for p, out in stream:
                ctx.record(p, out)
                if out.finished:
                    err = _failure(ctx, out)
                    if err is not None:
                        ctx.status, ctx.outcome = err.status, err.code
                        yield error_event(err)
                        break
                if ctx.echo and p not in echoed:  # each prompt's first chunk: the prompt and its logprobs
                    echoed.add(p)
                    prompt_lp = echo_logprobs(out, ctx.state.engine.tokenizer.decode)
                    for j in range(ctx.n):
                        yield sse(completion_chunk(ctx, p * ctx.n + j, ctx.echo[p], prompt_lp, None))
                for c in out.outputs:
                    idx = p * ctx.n + c.index
                    if idx in done_choices:
                        continue
                    text = "" if ctx.score_only else c.text[sent_text.get(idx, 0):]
                    new_lp = None
                    if c.logprobs is not None and not ctx.score_only:
                        start = sent_tok.get(idx, 0)
                        entries = c.logprobs[start:]
                        if entries:
                            if ctx.chat:
                                new_lp = {"content": chat_logprobs(entries, ctx.params.logprobs or 0)}
                            else:
                                new_lp = completion_logprobs(entries, len(ctx.echo[p] if ctx.echo else "") + sent_text.get(idx, 0))
                        sent_tok[idx] = len(c.logprobs)
                    reason = _finish(c.finish_reason) if c.finish_reason else None
                    # New tokens get a chunk even when they add no text yet (a partial character,
                    # a special token, held-back stop-string text): clients time tokens by chunks.
                    num_ids = len(c.token_ids)
                    if not text and reason is None and new_lp is None and num_ids <= sent_ids.get(idx, 0):
                        continue
                    sent_ids[idx] = num_ids
                    sent_text[idx] = len(c.text)
                    if reason is not None:
                        done_choices.add(idx)
                    delta = {"content": text} if ctx.chat else text
                    yield sse(mk(ctx, idx, delta, new_lp, reason))
            else:
                if ctx.body.include_usage:
                    yield sse({"id": ctx.rid, "object": "chat.completion.chunk" if ctx.chat else "text_completion",
                               "created": ctx.created, "model": ctx.state.model_name, "choices": [],
                               "usage": ctx.usage()})
    except TimeoutError:
        ctx.status, ctx.outcome = 504, "timeout"
        ctx.state.metrics.error("timeout")
        yield error_event(APIError(504, f"the request timed out after {ctx.state.request_timeout:g} s",
                                   "timeout_error", code="timeout"))
    except asyncio.CancelledError:
        ctx.status, ctx.outcome = 499, "client_disconnected"
        ctx.state.metrics.error("aborted")
        raise
    except EngineDeadError as e:
        ctx.status, ctx.outcome = 503, "engine_dead"
        yield error_event(APIError(503, str(e), "service_unavailable", code="engine_dead"))
    finally:
        await stream.aclose()
    yield b"data: [DONE]\n\n"


# --- kiln serve: the processes live in api_server.py and supervisor.py ---------------------------------
def serve(args) -> int:
    """``kiln serve``: see ``kiln.launch.supervisor.serve``."""
    from kiln.launch.supervisor import serve as run

    return run(args)


__all__ = ["build_app", "serve", "make_server", "DrainingServer", "ServerState", "configure_logging"]
