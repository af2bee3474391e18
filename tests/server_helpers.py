"""Helpers shared by the server tests: one loaded engine per test session and an in-process server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx

_shared: dict = {}
_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shared:
    """One ``LLM`` over the engine directory; its engine is later wrapped in an ``AsyncEngine``.

    Offline generation goes through ``LLM.generate`` until the async engine starts (only one
    thread may step an engine), and through the async engine afterwards."""

    def __init__(self, engine_dir: str):
        from kiln.runtime import LLM

        self.engine_dir = engine_dir
        self.llm = LLM(engine_dir)
        self._async = None

    @property
    def async_engine(self):
        from kiln.runtime.async_engine import AsyncEngine

        with _lock:
            if self._async is None:
                self._async = AsyncEngine(self.llm.engine)
            return self._async

    def generate(self, prompt, params):
        """The finished RequestOutput for one prompt."""
        if self._async is None:
            return self.llm.generate([prompt], params)[0]

        async def run():
            last = None
            async for out in self._async.generate(prompt, params):
                last = out
            return last

        return asyncio.run(run())


def shared(engine_dir: str) -> Shared:
    with _lock:
        if engine_dir not in _shared:
            _shared[engine_dir] = Shared(engine_dir)
        return _shared[engine_dir]


class ServerThread:
    """Runs the app with uvicorn on a free port in a background thread."""

    def __init__(self, app, grace_period: float = 5.0):
        from kiln.launch.server import make_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, "127.0.0.1", self.port, grace_period)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
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
