"""The API server's handle on the engine core process.

``CoreClient`` looks to the HTTP app like the in-process ``AsyncEngine`` (``generate``, ``abort``,
``stats``, ``is_alive``, ``tokenizer``), but the engine runs in another process. It tokenizes
prompts here, sends requests over a DEALER socket (its routing id names this API process, so
the core routes outputs back to it), and receives one frame per engine step on a PULL socket of
its own. Outputs arrive as token ids; each request's text is detokenized here, incrementally
(``IncrementalDetokenizer``), when its consumer reads it, so a consumer that falls behind reads
several steps at once. Requests with stop strings are the exception: the core matches stop
strings on text, so their text comes from the core.

The client lives on one asyncio event loop (``start`` binds it). The core's death is seen as a
disconnect on the socket's monitor (or told by ``mark_dead``): every request in flight then
ends with ``EngineDeadError`` and ``is_alive`` turns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kiln.launch import core_wire as w
from kiln.runtime.async_engine import EngineDeadError, QueueFullError
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.engine import RequestError
from kiln.runtime.outputs import CompletionOutput, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

log = logging.getLogger("kiln.client")


class _Seq:
    """One completion's state as the frames build it, and its detokenizer."""

    __slots__ = ("fields", "detok", "text", "fed", "flushed", "filled")

    def __init__(self):
        self.fields: dict = {}
        self.detok = None
        self.text = ""
        self.fed = 0
        self.flushed = False
        self.filled = 0  # logprob entries whose tokens are decoded


_MAX_TOKEN_ID = (1 << 31) - 1  # token ids travel as 32-bit integers at most


class _Stream:
    """One request: its prompt, the state the core's frames built, and its waiting consumer."""

    __slots__ = ("rid", "prompt", "prompt_ids", "params", "tokenizer", "arrival", "fields", "seqs", "dirty", "waiter",
                 "failure", "text_from_core", "prompt_filled")

    def __init__(self, rid, prompt, prompt_ids, params, tokenizer, arrival):
        self.rid, self.prompt, self.prompt_ids, self.params = rid, prompt, prompt_ids, params
        self.tokenizer = tokenizer
        self.arrival = arrival
        self.fields: dict = {}
        self.seqs: dict[int, _Seq] = {}
        self.dirty = False
        self.waiter: asyncio.Future | None = None
        self.failure: BaseException | None = None
        self.text_from_core = bool(params.stop)
        self.prompt_filled = 0

    def apply(self, req_values: list, comps: list) -> None:
        w.apply_fields(self.fields, req_values, w.REQUEST_WIRE)
        for index, values in comps:
            seq = self.seqs.get(index)
            if seq is None:
                seq = self.seqs[index] = _Seq()
            w.apply_fields(seq.fields, values, w.COMPLETION_WIRE)
        self.wake()

    def fail(self, err: BaseException) -> None:
        self.failure = err
        self.wake()

    def wake(self) -> None:
        self.dirty = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        while not self.dirty:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        self.dirty = False

    def _text(self, seq: _Seq) -> str:
        if self.text_from_core:
            return seq.fields.get("text") or ""
        ids = seq.fields.get("token_ids") or ()
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.params.skip_special_tokens)
        if seq.fed < len(ids):
            add = seq.detok.add
            parts = [add(t) for t in ids[seq.fed:]]
            seq.fed = len(ids)
            seq.text += "".join(parts)
        reason = seq.fields.get("finish_reason")
        if reason is not None and reason != "abort" and not seq.flushed:
            seq.flushed = True
            seq.text += seq.detok.flush()
        return seq.text

    def _fill_tokens(self, entries, start: int) -> int:
        """Decodes the tokens of logprob entries from ``start`` on that the core left undecoded;
        returns how many entries are done."""
        for e in entries[start:]:
            if e is None:
                continue
            for t, lp in e.items():
                if lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.decode([t])
        return len(entries)

    def snapshot(self) -> RequestOutput:
        outs = []
        for index in sorted(self.seqs):
            seq = self.seqs[index]
            lps = seq.fields.get("logprobs")
            if lps:
                seq.filled = self._fill_tokens(lps, seq.filled)
            values = dict(seq.fields, index=index, text=self._text(seq))
            values.setdefault("token_ids", [])
            outs.append(w.build(CompletionOutput, values))
        values = dict(self.fields, request_id=self.rid, prompt=self.prompt, prompt_token_ids=self.prompt_ids, outputs=outs)
        metrics = dict(values.get("metrics") or {})
        metrics["arrival"] = self.arrival  # when this API process took the request
        values["metrics"] = metrics
        plp = values.get("prompt_logprobs")
        if plp:
            self.prompt_filled = self._fill_tokens(plp, self.prompt_filled)
        return w.build(RequestOutput, values)


def _ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="kiln-api-")


class CoreClient:
    """Talks to the engine core at ``address`` (from ``kiln.launch.engine_core``).

    ``tokenizer``, ``add_bos`` and ``max_seq_len`` describe the engine (``from_engine_dir``
    reads them from its directory). ``api_index`` names this API process in logs and frames."""

    def __init__(self, address: str, *, tokenizer, add_bos: bool, max_seq_len: int | None = None, api_index: int = 0,
                 output_dir: str | None = None):
        self.address = address
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.max_seq_len = max_seq_len
        self.api_index = api_index
        self.identity = f"api{api_index}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._own_dir = output_dir is None
        self._dir = output_dir or _ipc_dir()
        self.output_address = f"ipc://{os.path.join(self._dir, self.identity.decode())}"
        self._streams: dict[str, _Stream] = {}
        self._adds: list = []
        self._aborts: list = []
        self._flush_scheduled = False
        self._stats: dict = {}
        self._stat_waiters: dict[int, asyncio.Future] = {}
        self._stat_tokens = 0
        self._max_waiting: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._ctx = None
        self.ready = False
        self.core_pid: int | None = None
        self.core_draining = False
        self.dead: str | None = None
        self.closed = False

    @classmethod
    def from_engine_dir(cls, address: str, engine_dir: str, **kw) -> "CoreClient":
        """A client whose tokenizer and limits come from the engine directory (no weights are read)."""
        from kiln.runtime.builder import read_engine_config
        from kiln.runtime.loader import load_tokenizer

        cfg = read_engine_config(engine_dir)
        tok = load_tokenizer(engine_dir, cfg)
        return cls(address, tokenizer=tok, add_bos=cfg.tokenizer.add_bos_token, max_seq_len=cfg.build.max_seq_len, **kw)

    # --- life ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connects on the running loop and says hello; ``ready`` turns True when the core answers."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._ctx = zmq.asyncio.Context()
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.bind(self.output_address)
        self._in = self._ctx.socket(zmq.DEALER)
        self._in.setsockopt(zmq.ROUTING_ID, self.identity)
        self._in.setsockopt(zmq.LINGER, 1000)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._monitor = self._in.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._in.connect(self.address)
        self._send([w.HELLO, {"version": w.WIRE_VERSION, "output": self.output_address, "api_index": self.api_index,
                              "pid": os.getpid()}])
        self._tasks = [self._loop.create_task(self._recv_loop()), self._loop.create_task(self._watch())]

    async def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not self.ready:
            if self.dead or time.monotonic() > end:
                raise EngineDeadError(self.dead or "the engine core did not answer")
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Says goodbye (the core aborts this process's requests) and closes the sockets."""
        if self.closed:
            return
        self.closed = True
        if self._loop is None:
            self._cleanup_dir()
            return
        if not self.dead:
            with contextlib.suppress(zmq.ZMQError):
                self._send([w.BYE])
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._monitor.close(linger=0)
        self._out.close(linger=0)
        self._in.close(linger=500)
        self._ctx.term()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def is_alive(self) -> bool:
        return (self.ready and self.dead is None and not self.core_draining and not self.closed
                and self._stats.get("healthy", True))

    @property
    def loading(self) -> bool:
        return not self.ready and self.dead is None

    def mark_dead(self, reason: str, expected: bool = False) -> None:
        """The core is gone: every request in flight fails with ``EngineDeadError`` (loop thread
        only). ``expected``: it said goodbye (a normal shutdown)."""
        if self.dead is not None:
            return
        self.dead = reason
        log.log(logging.INFO if expected else logging.ERROR, "event=engine_core_lost api=%d reason=%s in_flight=%d",
                self.api_index, _quoted(reason), len(self._streams))
        err = EngineDeadError(reason)
        for st in list(self._streams.values()):
            st.fail(err)
        for fut in self._stat_waiters.values():
            if not fut.done():
                fut.set_result(None)

    # --- requests ------------------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's state whenever new outputs came; the last one is finished. Closing
        the iteration early (a client that went away) aborts the request in the core."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            async for out in self._generate_elsewhere(prompt, params, request_id, priority):
                yield out
            return
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead}")
        if not self.ready:
            raise EngineDeadError("the engine core is not ready")
        rid = request_id or uuid.uuid4().hex
        if rid in self._streams:
            raise RequestError(f"request id '{rid}' is already in use", code="duplicate_request_id")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=self.add_bos)
        else:
            text, ids = None, [int(t) for t in prompt]
            if any(t < 0 or t > _MAX_TOKEN_ID for t in ids):  # the core checks the vocabulary itself
                raise RequestError(f"prompt token ids must be in 0..{_MAX_TOKEN_ID}", param="prompt")
        st = _Stream(rid, text, ids, params, self.tokenizer, time.monotonic())
        self._streams[rid] = st
        self._adds.append([rid, ids, params.model_dump(exclude_defaults=True), int(priority)])
        self._schedule_flush()
        finished = False
        try:
            while True:
                await st.wait()
                if st.failure is not None:
                    finished = True  # rejected or the core is gone: nothing to abort
                    raise st.failure
                out = st.snapshot()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if self._streams.get(rid) is st:
                del self._streams[rid]
            if not finished:
                self.abort(rid)

    async def _generate_elsewhere(self, prompt, params, request_id, priority) -> AsyncIterator[RequestOutput]:
        """``generate`` for a caller on another event loop: the request runs on the client's loop
        and its outputs are handed over; closing this iteration cancels (and so aborts) it there."""
        caller = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump():
            try:
                async for out in self.generate(prompt, params, request_id, priority):
                    caller.call_soon_threadsafe(q.put_nowait, out)
                caller.call_soon_threadsafe(q.put_nowait, done)
            except asyncio.CancelledError:
                raise
            except BaseException as e:
                caller.call_soon_threadsafe(q.put_nowait, e)

        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = await q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            fut.cancel()

    def abort(self, request_id: str) -> None:
        if self._off_loop():
            self._loop.call_soon_threadsafe(self.abort, request_id)
            return
        if self.dead is None and not self.closed:
            self._aborts.append(request_id)
            self._schedule_flush()

    @property
    def max_waiting(self) -> int | None:
        """The core's waiting-queue limit (429 past it); setting it changes it in the core."""
        return self._max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int | None) -> None:
        self._max_waiting = value
        msg = [w.CONFIG, {"max_waiting": value}]
        if self._off_loop():
            fut = asyncio.run_coroutine_threadsafe(self._send_async(msg), self._loop)
            fut.result(10)
        else:
            self._send(msg)

    def stats(self) -> dict:
        """The core's latest stats (every frame carries them; at least once a second when idle)."""
        return dict(self._stats)

    async def refresh_stats(self, timeout: float = 0.5) -> dict:
        """Asks the core for its stats now; the latest known ones if it does not answer in time."""
        if self.ready and self.dead is None and not self._off_loop():
            self._stat_tokens += 1
            token = self._stat_tokens
            fut = self._loop.create_future()
            self._stat_waiters[token] = fut
            self._send([w.STATS, token])
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                self._stat_waiters.pop(token, None)
        return self.stats()

    # --- the wire ------------------------------------------------------------------------------------
    def _off_loop(self) -> bool:
        return self._loop is not None and threading.get_ident() != self._thread

    async def _send_async(self, msg) -> None:
        self._send(msg)

    def _send(self, msg) -> None:
        self._in.send(w.pack(msg), zmq.NOBLOCK)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Sends the requests and aborts gathered during one turn of the loop as one frame each."""
        self._flush_scheduled = False
        if self.dead is not None or self.closed:
            self._adds.clear()
            self._aborts.clear()
            return
        try:
            if self._adds:
                adds, self._adds = self._adds, []
                try:
                    frame = w.pack([w.ADD, adds])
                except (OverflowError, TypeError, ValueError):
                    frame = self._pack_adds_one_by_one(adds)
                if frame is not None:
                    self._in.send(frame, zmq.NOBLOCK)
            if self._aborts:
                aborts, self._aborts = self._aborts, []
                self._send([w.ABORT, aborts])
        except zmq.ZMQError as e:
            self.mark_dead(f"the engine core cannot be reached: {e}")

    def _pack_adds_one_by_one(self, adds: list):
        """The frame of the requests that pack; each one that does not fails alone (its caller
        gets a 400), so one bad value never holds up the others of its turn."""
        good = []
        for add in adds:
            try:
                w.pack(add)
            except (OverflowError, TypeError, ValueError) as e:
                st = self._streams.get(add[0])
                if st is not None:
                    st.fail(RequestError(f"the request cannot be sent to the engine: {e}"))
                continue
            good.append(add)
        return w.pack([w.ADD, good]) if good else None

    async def _recv_loop(self) -> None:
        while True:
            frame = await self._out.recv()
            try:
                msg = w.unpack(frame)
                self._on_frame(msg[0], msg)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                log.warning("event=bad_frame error=%s", type(e).__name__)

    def _on_frame(self, kind: str, msg: list) -> None:
        if kind == w.STEP:
            streams = self._streams
            for rid, req_values, comps in msg[1]:
                st = streams.get(rid)
                if st is not None:
                    st.apply(req_values, comps)
            self._stats = msg[2]
        elif kind == w.STATS:
            self._stats = msg[2]
            fut = self._stat_waiters.get(msg[1]) if msg[1] is not None else None
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == w.REJECT:
            for rid, why, message, code, param in msg[1]:
                st = self._streams.get(rid)
                if st is not None:
                    st.fail(_rejection(why, message, code, param))
        elif kind == w.READY:
            info = msg[1]
            if info.get("version") != w.WIRE_VERSION:
                self.mark_dead(f"the engine core speaks wire version {info.get('version')}, this server {w.WIRE_VERSION}")
                return
            self.core_pid = info.get("pid")
            self._max_waiting = info.get("max_waiting")
            self._stats = info.get("stats") or {}
            self.ready = True
            log.info("event=ready api=%d core_pid=%s", self.api_index, self.core_pid)
        elif kind == w.DRAINING:
            self.core_draining = True
        elif kind == w.DEAD:
            self.mark_dead(str(msg[1]))
        elif kind == w.BYE:
            self.mark_dead("the engine core has stopped", expected=True)

    async def _watch(self) -> None:
        """Marks the core dead when its connection drops after it was up."""
        connected = False
        while True:
            ev = parse_monitor_message(await self._monitor.recv_multipart())
            if ev["event"] == zmq.EVENT_CONNECTED:
                connected = True
            elif ev["event"] == zmq.EVENT_DISCONNECTED and connected and not self.closed:
                self.mark_dead("the engine core process exited")


def _rejection(why: str, message: str, code, param) -> BaseException:
    if why == "invalid":
        return RequestError(message, code=code, param=param)
    if why == "queue_full":
        return QueueFullError(message)
    if why == "draining":
        return EngineDeadError(message)
    return RuntimeError(message)


def _quoted(text: str) -> str:
    """A log value without spaces breaking the key=value line."""
    return '"' + text.replace('"', "'") + '"'


__all__ = ["CoreClient"]
