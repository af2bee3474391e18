"""Helpers shared by the server tests: one engine core process per engine and test session, and\nan API server (the HTTP app over a client of that core) in a thread of the test process."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import httpx

_shared: dict = {}
_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CoreProcess:
    """An engine core process (``python -m kiln.launch.engine_core``) over an engine directory,
    listening on an ipc socket in a private directory; stopped at exit."""

    def __init__(self, engine_dir: str, max_queue: int | None = 1024, grace_period: float = 5.0, **extra):
        from kiln.launch.procs import spawn

        self.dir = tempfile.mkdtemp(prefix="kiln-test-core-")
        self.address = f"ipc://{os.path.join(self.dir, 'core')}"
        self.proc = spawn("kiln.launch.engine_core", {
            "engine": engine_dir, "address": self.address, "max_queue": max_queue, "grace_period": grace_period,
            "parent_pid": os.getpid(), "status_file": os.path.join(self.dir, "status.json"), **extra})
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Shared:
    """One ``LLM`` over the engine directory (the offline reference) and one engine core process
    that the test servers' API clients share, as ``kiln serve``'s API server processes do."""

    def __init__(self, engine_dir: str):
        from kiln.runtime import LLM

        self.engine_dir = engine_dir
        self.llm = LLM(engine_dir)
        self._core: CoreProcess | None = None
        self._tokenizer = None

    @property
    def core(self) -> CoreProcess:
        with _lock:
            if self._core is None:
                self._core = CoreProcess(self.engine_dir)
            return self._core

    def client(self):
        """A new API-side client of the shared engine core (one per app: it lives on the app's loop)."""
        from kiln.launch.core_client import CoreClient

        cfg = self.llm.engine.config
        return CoreClient(self.core.address, tokenizer=self.llm.tokenizer, add_bos=cfg.tokenizer.add_bos_token,
                          max_seq_len=cfg.build.max_seq_len)

    def generate(self, prompt, params):
        """The finished RequestOutput for one prompt, offline (``LLM.generate``)."""
        with _lock:
            return self.llm.generate([prompt], params)[0]


def shared(engine_dir: str) -> Shared:
    with _lock:
        if engine_dir not in _shared:
            _shared[engine_dir] = Shared(engine_dir)
        return _shared[engine_dir]


class ServerThread:
    """Runs the app with uvicorn on a free port in a background thread."""

    def __init__(self, app, grace_period: float = 5.0):
        from kiln.launch.api_server import make_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, grace_period)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 180
        engine = self.server.kiln_state.engine
        while not self.server.started or not getattr(engine, "ready", True) or self.server.kiln_state.warming:
            if time.monotonic() > end or not self.thread.is_alive() or getattr(engine, "dead", None):
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


def wait_health(url: str, timeout: float = 120.0, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become healthy")


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (labels as written, e.g. 'kind="timeout"')."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(key)
