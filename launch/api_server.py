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
        await super().startup(sockets=sockets)

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
