"""The async engine: an ``LLMEngine`` stepped by one background thread, streamed to asyncio callers.

It serves an HTTP app from inside the engine's own process (tests, embedding). ``kiln serve``
does not use it: there the engine runs in a process of its own (``kiln.launch.engine_core``) and
the app talks to it through ``kiln.launch.core_client.CoreClient``, which has the same surface.

Callers on the event loop submit and abort requests through a command queue; the engine thread
applies commands between steps (so the scheduler is only ever touched by that thread), runs a
step, and hands each request's new output to its caller's ``asyncio.Queue`` through
``loop.call_soon_threadsafe``. Acceptance is answered synchronously: a bad request raises
``RequestError`` in the caller, and nothing already accepted is affected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator

from kiln.runtime.engine import LLMEngine, RequestError
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams

log = logging.getLogger("kiln.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an internal fault; no request can be served."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the caller should retry later."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        engine.stream_outputs = True  # callers stream: every step's state, text detokenized as it comes
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self.dead: BaseException | None = None
        self.step_count = 0
        self.busy_s = 0.0
        self.last_stats: dict = engine.stats()
        self.on_step = None  # optional callback(stats, outputs) run on the engine thread
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    # --- caller side (event loop) -----------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's state after every step that changed it; the last one is finished.
        Cancelling the iteration (a client that went away) aborts the request."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead}")
        rid = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._streams[rid] = (loop, q)
        self._send(("add", rid, prompt, params, priority, fut))
        try:
            await asyncio.wrap_future(fut)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._send(("abort", rid))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def stats(self) -> dict:
        return dict(self.last_stats)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    # --- engine thread ------------------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, priority, fut = cmd
                try:
                    if self.max_waiting is not None and len(self.engine.scheduler.waiting) >= self.max_waiting:
                        raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests): retry later")
                    self.engine.add_request(rid, prompt, params, priority=priority)
                    fut.set_result(None)
                except BaseException as e:  # RequestError, QueueFullError: reported to the caller only
                    fut.set_exception(e)
            elif cmd[0] == "abort":
                self.engine.abort_request(cmd[1])

    def _deliver(self, out: RequestOutput | BaseException, rid: str) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, out)
        except RuntimeError:  # the caller's loop has closed
            self._streams.pop(rid, None)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished() and not self.engine.has_pending_outputs():
                    self.last_stats = self.engine.stats()
                    self._wake.wait(0.1)
                    self._wake.clear()
                    continue
                t0 = time.perf_counter()
                outs = self.engine.step()
                self.busy_s += time.perf_counter() - t0
                self.step_count += 1
                self.last_stats = self.engine.stats()
                if self.on_step is not None:
                    self.on_step(self.last_stats, outs)
                for out in outs:
                    self._deliver(out, out.request_id)
        except BaseException as e:  # an internal fault: every caller gets a clear error, none hangs
            log.exception("engine loop failed")
            self.dead = e
            err = EngineDeadError(f"the engine stopped on an internal error: {e}")
            for rid in list(self._streams):
                self._deliver(err, rid)
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[5].set_exception(err)


__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestError"]
