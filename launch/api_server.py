"""An API server process of ``kiln serve``: uvicorn over the HTTP app, in front of the engine core.

``kiln serve`` starts ``--api-server-count`` of these as ``python -m kiln.launch.api_server``,
each with a JSON config on stdin and the listening socket inherited as a file descriptor, so
all of them accept on the one port and the kernel spreads connections between them. Each talks
to the engine core through its own ``CoreClient`` and answers with an ``X-Kiln-Api-Server``
header naming itself. SIGTERM drains (``DrainingServer``); SIGINT is left to the supervisor,
which forwards SIGTERM; the process dies with its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

log = logging.getLogger("kiln.server")

try:
    import uvicorn as _uvicorn

    _ServerBase = _uvicorn.Server
except ImportError:  # pragma: no cover
    _ServerBase = object


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket all API server processes share (inheritable, so children get it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or stop the other server") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def warm_up(app, state) -> None:
    """One streamed completion (three prompt tokens, two outputs) through this process's app
    once the core is ready, so the first client request does not pay for first use (the HTTP
    stack's streaming, body validation, the core round trip, detokenization); /health answers
    503 ("loading") until it is done. It runs in this process (no socket) and is marked so that
    it counts in no metric and writes no request log."""
    state.warming = True
    try:
        body = json.dumps({"model": state.model_name, "prompt": [0, 1, 2], "max_tokens": 2, "temperature": 0.0,
                           "stream": True, "ignore_eos": True}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if state.api_key is not None:
            headers.append((b"authorization", f"Bearer {state.api_key}".encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": headers, "client": None, "server": None, "kiln.warm_up": True}
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        done = asyncio.Event()
        status: list[int] = []

        async def receive():
            if pending:
                return pending.pop()
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                done.set()

        await asyncio.wait_for(app(scope, receive, send), timeout=60.0)
        if status != [200]:
            log.info("event=warm_up_failed status=%s", status[0] if status else None)
    except Exception as e:  # the first request pays instead; nothing is wrong with serving
        log.info("event=warm_up_failed error=%s", type(e).__name__)
    finally:
        state.warming = False


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


class DrainingServer(_ServerBase):
    """uvicorn's server with kiln's drain: on the first signal /health and new requests answer
    503, requests in flight get ``grace_period`` seconds, the rest are aborted; then it exits.
    A second signal exits at once. The engine client starts with the server and closes with it."""

    def __init__(self, config, state, grace_period: float, signals=(signal.SIGINT, signal.SIGTERM),
                 accept_when_ready: bool = False):
        super().__init__(config)
        self.kiln_state = state
        self.grace_period = grace_period
        self.signals = signals
        self.accept_when_ready = accept_when_ready
        self._drain_task = None
        self._warm_task = None  # held so the event loop does not drop the warm-up task
        self._loop = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in self.signals}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    async def startup(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        start = getattr(self.kiln_state.engine, "start", None)
        if start is not None:
            await start()
        if self.accept_when_ready:
            # Connections wait in the shared socket's queue for the API servers that are ready.
            eng = self.kiln_state.engine
            while getattr(eng, "loading", False) and not self.should_exit:
                await asyncio.sleep(0.05)
            await warm_up(self.config.app, self.kiln_state)
        else:
            self.kiln_state.warming = True  # /health waits for it from the start
            self._warm_task = self._loop.create_task(self._warm_when_ready())
        await super().startup(sockets=sockets)

    async def _warm_when_ready(self) -> None:
        eng = self.kiln_state.engine
        while getattr(eng, "loading", False) and not self.should_exit:
            await asyncio.sleep(0.05)
        await warm_up(self.config.app, self.kiln_state)

    async def shutdown(self, sockets=None):
        await super().shutdown(sockets=sockets)
        close = getattr(self.kiln_state.engine, "aclose", None)
        if close is not None:
            await close()

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


def run_api_server(cfg: dict) -> int:
    """The API server process's body; ``cfg`` as ``kiln serve`` writes it (see ``main``)."""
    from kiln.launch.logs import configure_logging
    from kiln.launch.procs import die_with_parent

    die_with_parent(cfg.get("parent_pid"))
    index = int(cfg.get("api_index", 0))
    configure_logging(proc=f"api{index}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from kiln.launch.core_client import CoreClient
    from kiln.launch.server import build_app

    sock = socket.socket(fileno=int(cfg["fd"]))
    client = CoreClient.from_engine_dir(cfg["core_address"], cfg["engine"], api_index=index)
    app = build_app(client, model_name=cfg["model_name"], api_key=cfg.get("api_key"),
                    max_body_bytes=int(cfg.get("max_body_bytes", 4 << 20)),
                    request_timeout=float(cfg.get("request_timeout", 600.0)), aliases=cfg.get("aliases", []),
                    api_server=index)
    from kiln.launch.procs import settle_heap

    settle_heap()
    server = make_server(app, cfg.get("host", "127.0.0.1"), int(cfg.get("port", 0)), float(cfg.get("grace_period", 30.0)))
    server.signals = (signal.SIGTERM,)
    server.accept_when_ready = index > 0  # the first answers 503 while the core loads; the others join when ready
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if mp_dir:
            with contextlib.suppress(Exception):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid(), mp_dir)
    log.info("event=api_server_exit")
    return 0


def main() -> int:
    """``python -m kiln.launch.api_server`` with a JSON object on stdin: ``fd`` (the inherited
    listening socket), ``core_address``, ``engine``, ``api_index``, ``model_name``, ``aliases``,
    ``api_key``, ``max_body_bytes``, ``request_timeout``, ``grace_period``, ``host``, ``port``,
    ``parent_pid``."""
    from kiln.launch.procs import read_config

    return run_api_server(read_config())


if __name__ == "__main__":
    sys.exit(main())
