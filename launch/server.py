"""The OpenAI-compatible HTTP server: ``build_app`` makes the FastAPI app, ``serve`` runs ``kiln serve``.

Routes: POST /v1/completions and /v1/chat/completions (JSON or server-sent events), GET /v1/models,
GET /health and GET /metrics. Every error uses OpenAI's body ``{"error": {...}}``. SIGTERM drains:
/health and new requests answer 503, requests in flight get ``grace_period`` seconds to finish,
what remains is aborted, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.launch.metrics import ServerMetrics
from kiln.launch.protocol import (
    ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, ProtocolError, new_id, now,
)
from kiln.launch.responses import (
    APIError, EventStream, chat_chunk, chat_logprobs, completion_chunk, completion_logprobs, error_event,
    error_response, merge_streams, sse, usage_of,
)
from kiln.runtime.async_engine import EngineDeadError, QueueFullError, RequestError

log = logging.getLogger("kiln.server")

_OPEN_PATHS = {"/health"}


class ServerState:
    """What the routes share: the engine (None while loading), names, limits and the drain flag."""

    def __init__(self, engine, model_name: str, aliases: list[str], api_key, request_timeout: float, max_body_bytes: int):
        self.engine = None
        self.model_name = model_name
        self.aliases = {model_name, *[a for a in aliases if a]}
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.active: dict[str, list[str]] = {}
        self.server_aborted: set[str] = set()
        self.metrics = ServerMetrics(model_name, self._stats)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine) -> None:
        self.engine = engine
        self.max_seq_len = getattr(getattr(engine, "engine", None), "max_seq_len", None)

    def _stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {}

    def serving(self) -> bool:
        return self.engine is not None and not self.draining and self.engine.is_alive()

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

    async def __call__(self, scope, receive, send):
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
            if st.engine is None or st.draining or not st.engine.is_alive():
                why = "the server is loading" if st.engine is None else "the server is shutting down" if st.draining else "the engine has stopped"
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
) -> FastAPI:
    """The app over an ``AsyncEngine`` (or None while it loads; attach it with ``app.state.kiln.attach``)."""
    state = ServerState(async_engine, model_name, list(aliases), api_key, request_timeout, max_body_bytes)
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
        why = "loading" if state.engine is None else "draining" if state.draining else "dead"
        return JSONResponse({"status": why}, status_code=503)

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=state.model_name, max_model_len=getattr(state, "max_seq_len", None))]
        return ModelList(data=cards).model_dump()

    @app.get("/metrics")
    async def metrics():
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        params = _params(body)
        rid = new_id("cmpl")
        prompts = body.prompts()
        echo = [p if isinstance(p, str) else "" for p in prompts] if body.echo else None
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
    ctx = _Ctx(state, rid, route, params, body, chat, echo, t0, deadline, len(prompts))
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

    def __init__(self, state, rid, route, params, body, chat, echo, t0, deadline, num_prompts):
        self.state, self.rid, self.route, self.params, self.body = state, rid, route, params, body
        self.chat, self.echo, self.t0, self.deadline = chat, echo, t0, deadline
        self.n = params.n
        self.num_prompts = num_prompts
        self.finals: dict[int, object] = {}
        self.status = 200
        self.outcome = "ok"
        self.created = now()
        self._closed = False

    def record(self, p: int, out) -> None:
        if out.finished and p not in self.finals:
            self.finals[p] = out
            self.state.metrics.observe_request(out)

    def usage(self) -> dict:
        return usage_of(self.finals.values())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.active.pop(self.rid, None)
        self.state.server_aborted.discard(self.rid)
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
        work.result()
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
                prefix = ctx.echo[p] if ctx.echo else ""
                lp = completion_logprobs(c.logprobs, len(prefix)) if c.logprobs is not None else None
                choices.append({"index": idx, "text": prefix + c.text, "logprobs": lp,
                                "finish_reason": _finish(c.finish_reason)})
    choices.sort(key=lambda c: c["index"])
    return {
        "id": ctx.rid, "object": "chat.completion" if ctx.chat else "text_completion", "created": ctx.created,
        "model": ctx.state.model_name, "choices": choices, "usage": ctx.usage(),
        **({"system_fingerprint": None} if ctx.chat else {}),
    }


async def _sse_body(ctx: _Ctx, stream):
    sent_text: dict[int, int] = {}
    sent_tok: dict[int, int] = {}
    done_choices: set[int] = set()
    mk = chat_chunk if ctx.chat else completion_chunk
    try:
        if ctx.chat:
            for i in range(ctx.n * ctx.num_prompts):
                yield sse(chat_chunk(ctx, i, {"role": "assistant", "content": ""}, None, None))
        elif ctx.echo:
            for p in range(ctx.num_prompts):
                for j in range(ctx.n):
                    yield sse(completion_chunk(ctx, p * ctx.n + j, ctx.echo[p], None, None))
        async with asyncio.timeout(max(0.0, ctx.deadline - time.monotonic())):
            async for p, out in stream:
                ctx.record(p, out)
                if out.finished:
                    err = _failure(ctx, out)
                    if err is not None:
                        ctx.status, ctx.outcome = err.status, err.code
                        yield error_event(err)
                        break
                for c in out.outputs:
                    idx = p * ctx.n + c.index
                    if idx in done_choices:
                        continue
                    text = c.text[sent_text.get(idx, 0):]
                    new_lp = None
                    if c.logprobs is not None:
                        start = sent_tok.get(idx, 0)
                        entries = c.logprobs[start:]
                        if entries:
                            if ctx.chat:
                                new_lp = {"content": chat_logprobs(entries, ctx.params.logprobs or 0)}
                            else:
                                new_lp = completion_logprobs(entries, sent_text.get(idx, 0))
                        sent_tok[idx] = len(c.logprobs)
                    reason = _finish(c.finish_reason) if c.finish_reason else None
                    if not text and reason is None and new_lp is None:
                        continue
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


# --- kiln serve -------------------------------------------------------------------------------------
class _KeyValueFormatter(logging.Formatter):
    def format(self, record):
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger("kiln")
    if not any(getattr(h, "_kiln", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(_KeyValueFormatter())
        h._kiln = True
        root.addHandler(h)
    root.setLevel(level)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or stop the other server") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, host: str, port: int, grace_period: float):
    """A uvicorn server whose SIGTERM/SIGINT drains ``app`` before exiting."""
    import uvicorn

    loop = "auto"
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        pass
    config = uvicorn.Config(app, host=host, port=port, loop=loop, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    return DrainingServer(config, app.state.kiln, grace_period)


try:
    import uvicorn as _uvicorn

    _ServerBase = _uvicorn.Server
except ImportError:  # pragma: no cover
    _ServerBase = object


class DrainingServer(_ServerBase):
    def __init__(self, config, state: ServerState, grace_period: float):
        super().__init__(config)
        self.kiln_state = state
        self.grace_period = grace_period
        self._drain_task = None
        self._loop = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    async def startup(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.kiln_state.draining or self._loop is None:
            self.should_exit = True
            if self.kiln_state.draining:
                self.force_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        self.kiln_state.draining = True
        log.info("event=drain_start grace_period_s=%g in_flight=%d", self.grace_period, len(self.kiln_state.active))
        self._loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task", self._loop.create_task(self._drain())))

    async def _drain(self) -> None:
        st = self.kiln_state
        end = time.monotonic() + self.grace_period
        while st.active and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if st.active:
            n = st.abort_all()
            log.info("event=drain_abort aborted=%d", n)
            stop = time.monotonic() + 2.0
            while st.active and time.monotonic() < stop:
                await asyncio.sleep(0.05)
        log.info("event=drain_done")
        self.should_exit = True


def serve(args) -> int:
    """``kiln serve``: binds the port, loads the engine (``/health`` is 503 meanwhile), serves until SIGTERM."""
    from kiln.runtime.async_engine import AsyncEngine
    from kiln.runtime.engine import LLMEngine

    if not os.path.isdir(args.engine):
        raise FileNotFoundError(f"engine directory '{args.engine}' does not exist: build one with 'kiln build'")
    configure_logging()
    name = getattr(args, "served_model_name", None) or os.path.basename(os.path.normpath(args.engine))
    aliases = [os.path.basename(os.path.normpath(args.engine)), args.engine]
    app = build_app(None, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    request_timeout=args.request_timeout, aliases=aliases)
    topology = None
    if getattr(args, "launcher", "local") == "ray":
        # Ray starts here, in the main thread, before the server installs its signal handlers: Ray's
        # driver installs a crash handler for SIGTERM that would otherwise abort the process a few
        # seconds into the drain, before the cluster it started is stopped.
        from kiln.launch.ray_launcher import connect_ray
        from kiln.launch.topology import resolve_topology
        from kiln.runtime.builder import read_engine_config

        cfg = read_engine_config(args.engine)
        topology = resolve_topology(getattr(args, "topology_spec", None) or args.topology, cfg.build, cfg.device_class)
        connect_ray(topology)
    sock = _bind(args.host, args.port)
    server = make_server(app, args.host, args.port, args.grace_period)
    failure: list[BaseException] = []
    holder: list = []

    def load():
        try:
            if getattr(args, "launcher", "local") == "ray":
                from kiln.launch.ray_launcher import cluster_async_engine, make_ray_engine

                engine = make_ray_engine(args.engine, topology, device=args.device, num_kv_blocks=args.num_kv_blocks)
                ae = cluster_async_engine(engine, max_waiting=args.max_queue)
            else:
                engine = LLMEngine(args.engine, device=args.device, num_kv_blocks=args.num_kv_blocks)
                ae = AsyncEngine(engine, max_waiting=args.max_queue)
            holder.append(ae)
            app.state.kiln.attach(ae)
            log.info("event=ready model=%s host=%s port=%d", name, args.host, args.port)
        except BaseException as e:
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=load, name="kiln-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        loader.join(timeout=0 if app.state.kiln.draining or server.force_exit else None)
        for ae in holder:
            ae.shutdown(timeout=5.0)
            if getattr(args, "launcher", "local") == "ray":
                from kiln.launch.ray_launcher import shutdown_ray

                ae.engine.shutdown()
                shutdown_ray()
                log.info("event=cluster_stopped")
    if failure:
        raise failure[0]
    return 0


__all__ = ["build_app", "serve", "make_server", "DrainingServer", "ServerState", "configure_logging"]
