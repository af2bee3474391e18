"""The engine core process: the scheduler, the step loop and the workers, and no HTTP.

``kiln serve`` starts it as ``python -m kiln.launch.engine_core`` with a JSON config on stdin.
It binds a ROUTER socket on a loopback-only address (``ipc://`` in a private directory, or
``tcp://127.0.0.1``), loads the engine with the configured launcher (local, torchrun or Ray),
and then runs one loop on its main thread: read every waiting message from the API server
processes (new requests, aborts, stats requests), run one engine step, hand that step's outputs
to the sender thread. While requests keep arriving during a prefill step, the next step is
planned once that one ends (not at once, as overlapped scheduling otherwise does), so a burst
fills a few full prefill steps. Each API process's outputs of the step are encoded on the
loop's thread as changes since its last frame (token ids, finish reasons, logprobs; text only for requests
with stop strings, which the engine matches on text), read straight off the engine's request
state; the sender packs them as one frame and pushes it to that process's own socket, so the
packing and sending overlap the next step.

The core enforces the waiting-queue limit (``max_waiting``) because only it sees the queue. On
SIGTERM it drains: new requests are refused, those in flight get ``grace_period`` seconds, the
rest are aborted, then it exits 0. It ignores SIGINT (its supervisor drains the API processes
first) and exits when its parent process is gone. A failure of the step loop is sent to every
API process as DEAD before the core exits with status 1.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time

import zmq

from kiln.launch import core_wire as w

log = logging.getLogger("kiln.core")

_SNDHWM = 100_000  # frames queued for one API process before it counts as gone
GATHER_ARRIVALS = 2  # requests arrived during a prefill step that make the next step wait for it


class _Sender(threading.Thread):
    """Packs frames and pushes them to API processes, each on its own PUSH socket."""

    def __init__(self, ctx: zmq.Context, gone: queue.SimpleQueue, stats_every_s: float = 0.5):
        super().__init__(name="kiln-core-sender", daemon=True)
        self.ctx = ctx
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.gone = gone
        self.stats_every_s = stats_every_s
        self.socks: dict[bytes, zmq.Socket] = {}
        self.last_stats: dict[bytes, float] = {}
        self.frames = 0
        self.busy_s = 0.0  # seconds spent packing and sending (on this thread, under the interpreter lock)

    def put(self, item) -> None:
        self.q.put(item)

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            t = time.perf_counter()
            try:
                self._handle(item)
            except Exception:
                log.exception("event=sender_error")
            self.busy_s += time.perf_counter() - t
        for s in self.socks.values():
            s.close(linger=2000)

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "step":
            _, by_owner, stats = item
            now = time.monotonic()
            for ident in list(self.socks):
                outs = by_owner.get(ident)
                if outs:
                    self._send(ident, [w.STEP, outs, stats])
                    self.last_stats[ident] = now
                elif now - self.last_stats.get(ident, 0.0) >= self.stats_every_s:
                    self._send(ident, [w.STATS, None, stats])
                    self.last_stats[ident] = now
        elif kind == "send":
            self._send(item[1], item[2])
        elif kind == "broadcast":
            for ident in list(self.socks):
                self._send(ident, item[1])
        elif kind == "register":
            _, ident, addr = item
            self._close(ident)
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, _SNDHWM)
            s.connect(addr)
            self.socks[ident] = s
        elif kind == "unregister":
            self._close(item[1])

    def _send(self, ident: bytes, frame) -> None:
        s = self.socks.get(ident)
        if s is None:
            return
        try:
            s.send(w.pack(frame), zmq.NOBLOCK)
            self.frames += 1
        except zmq.Again:
            log.warning("event=api_server_stalled api=%s", ident.decode(errors="replace"))
            self._close(ident)
            self.gone.put(ident)

    def _close(self, ident: bytes) -> None:
        s = self.socks.pop(ident, None)
        self.last_stats.pop(ident, None)
        if s is not None:
            s.close(linger=0)


class EngineCore:
    """The step loop over an engine (``LLMEngine`` or the Ray ``DPEngine``) and the core's half
    of the wire; ``sock`` is the bound ROUTER socket the API processes send to."""

    def __init__(self, engine, sock: zmq.Socket, *, max_waiting: int | None = None, grace_period: float = 30.0,
                 heartbeat_s: float = 1.0, parent_pid: int | None = None):
        self.engine = engine
        engine.stream_outputs = True
        engine.detokenize = False  # the API processes detokenize; stop strings are still matched here
        # An engine in this process hands over its request state, encoded here before the next
        # step (a Ray data-parallel engine's outputs are snapshots already).
        self.raw = hasattr(engine, "raw_outputs") and w.DIRECT_ENCODING
        if self.raw:
            engine.raw_outputs = True
        self.encoders: dict[bytes, w.OutputEncoder] = {}  # per API process: what its frames carried
        self.sock = sock
        self.max_waiting = max_waiting
        self.grace_period = grace_period
        self.heartbeat_s = heartbeat_s
        self.parent_pid = parent_pid
        self.owner: dict[str, bytes] = {}
        self.clients: set[bytes] = set()
        self._gone: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = _Sender(sock.context, self._gone)
        self.term_requested = False
        self.draining = False
        self._drain_deadline = 0.0
        self.busy_s = 0.0
        self.num_steps = 0
        self.gathered = 0  # steps planned after waiting for a prefill step, to take a burst's arrivals
        self.read_s = 0.0  # seconds reading the API processes' messages (adding requests) while busy
        self.route_s = 0.0  # seconds sorting each step's outputs by API process

    # --- the loop ------------------------------------------------------------------------------------
    def busy(self) -> bool:
        return self.engine.has_unfinished() or self.engine.has_pending_outputs()

    def run(self) -> int:
        """Serves until drained (SIGTERM), the parent is gone, or the step loop fails; the exit status."""
        self.sender.start()
        rc = 0
        try:
            rc = self._loop()
        except BaseException as e:
            log.exception("event=engine_failed")
            self.sender.put(("broadcast", [w.DEAD, f"the engine stopped on an internal error: {type(e).__name__}: {e}"]))
            rc = 1
        self.sender.put(None)
        self.sender.join(5.0)
        return rc

    def _loop(self) -> int:
        was_busy, last_beat = False, 0.0
        while True:
            if self.term_requested and not self.draining:
                self.begin_drain()
            busy = self.busy()
            t = time.perf_counter()
            self._read_input(0 if busy else 50)
            self._drop_gone()
            if busy:
                self.read_s += time.perf_counter() - t
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("event=parent_gone")
                self._abort_all()
                self._flush()
                return 0
            if self.draining and (not self.busy() or time.monotonic() > self._drain_deadline):
                n = self._abort_all()
                self._flush()
                log.info("event=core_drained aborted=%d", n)
                self.sender.put(("broadcast", [w.BYE]))
                return 0
            if not self.busy():
                now = time.monotonic()
                if was_busy or now - last_beat >= self.heartbeat_s:
                    self.sender.put(("broadcast", [w.STATS, None, self.stats()]))
                    last_beat = now
                was_busy = False
                continue
            self._gather()
            self._step()
            was_busy = True

    def _gather(self) -> bool:
        """Requests arriving while a prefill step runs (``GATHER_ARRIVALS`` or more since it was
        planned): wait for that step, read what came meanwhile, and only then plan the next, so a
        burst fills a few prefill steps instead of many small ones queued behind each other."""
        e = self.engine
        if not getattr(e, "inflight_prefills", False) or getattr(e, "added_since_plan", 0) < GATHER_ARRIVALS:
            return False
        t = time.perf_counter()
        e.finish_inflight()
        self.busy_s += time.perf_counter() - t  # the step's own time, counted where it is waited for
        self.gathered += 1
        self._read_input(0)
        return True

    def _step(self) -> None:
        t0 = time.perf_counter()
        outs = self.engine.step()
        self.busy_s += time.perf_counter() - t0
        self.num_steps += 1
        t = time.perf_counter()
        by_owner: dict[bytes, list] = {}
        owner, encoders, raw = self.owner, self.encoders, self.raw
        for o in outs:
            if raw:
                req, fin = o
                rid = req.request_id
            else:
                rid, fin = o.request_id, o.finished
            ident = owner.pop(rid, None) if fin else owner.get(rid)
            enc = encoders.get(ident) if ident is not None else None
            if enc is not None:
                by_owner.setdefault(ident, []).append(enc.encode_request(req, fin) if raw else enc.encode(o))
        stats = self.stats()
        self.sender.put(("step", by_owner, stats))
        self.route_s += time.perf_counter() - t

    def _flush(self) -> None:
        """Steps until the outputs of aborted requests are out (their final frames)."""
        for _ in range(3):
            if not self.busy():
                return
            self._step()

    def stats(self) -> dict:
        s = self.engine.stats()
        s["core_busy_s"] = self.busy_s
        s["core_steps"] = self.num_steps
        s["core_gathered_steps"] = self.gathered
        host = s.setdefault("host_s", {})
        host["core_read"] = self.read_s
        host["core_route"] = self.route_s
        host["core_send"] = self.sender.busy_s
        s["max_waiting"] = self.max_waiting
        s["draining"] = self.draining
        healthy = getattr(self.engine, "is_healthy", None)
        s["healthy"] = bool(healthy()) if healthy is not None else True
        return s

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.grace_period
        log.info("event=core_drain_start grace_period_s=%g in_flight=%d", self.grace_period, len(self.owner))
        self.sender.put(("broadcast", [w.DRAINING]))

    def _abort_all(self) -> int:
        n = 0
        for rid in list(self.owner):
            if self.engine.abort_request(rid):
                n += 1
        return n

    # --- messages ------------------------------------------------------------------------------------
    def _read_input(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                ident, frame = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            try:
                msg = w.unpack(frame)
                self._handle(ident, msg[0], msg[1:])
            except (ValueError, TypeError, KeyError, IndexError) as e:
                log.warning("event=bad_frame api=%s error=%s", ident.decode(errors="replace"), type(e).__name__)

    def _handle(self, ident: bytes, kind: str, body: list) -> None:
        if kind == w.ADD:
            self._add(ident, body[0])
        elif kind == w.ABORT:
            for rid in body[0]:
                if self.owner.get(rid) == ident:
                    self.engine.abort_request(rid)
        elif kind == w.STATS:
            self.sender.put(("send", ident, [w.STATS, body[0], self.stats()]))
        elif kind == w.HELLO:
            self._hello(ident, body[0])
        elif kind == w.CONFIG:
            if "max_waiting" in body[0]:
                mw = body[0]["max_waiting"]
                self.max_waiting = None if mw is None else int(mw)
        elif kind == w.BYE:
            self._leave(ident)
        else:
            raise ValueError(f"unknown frame kind {kind!r}")

    def _hello(self, ident: bytes, info: dict) -> None:
        if info.get("version") != w.WIRE_VERSION:
            log.error("event=wire_version_mismatch api=%s theirs=%s ours=%d", ident.decode(errors="replace"),
                      info.get("version"), w.WIRE_VERSION)
            return
        addr = str(info["output"])
        if not (addr.startswith("ipc://") or addr.startswith("tcp://127.") or addr.startswith("tcp://[::1]")):
            log.error("event=refused_output_address address=%s", addr)
            return
        self.clients.add(ident)
        self.encoders[ident] = w.OutputEncoder()
        self.sender.put(("register", ident, addr))
        self.sender.put(("send", ident, [w.READY, {"version": w.WIRE_VERSION, "pid": os.getpid(),
                                                   "max_waiting": self.max_waiting, "stats": self.stats()}]))
        if self.draining:
            self.sender.put(("send", ident, [w.DRAINING]))
        log.info("event=api_server_joined api=%s pid=%s", ident.decode(errors="replace"), info.get("pid"))

    def _leave(self, ident: bytes) -> None:
        for rid, who in list(self.owner.items()):
            if who == ident:
                self.engine.abort_request(rid)
                del self.owner[rid]
        self.clients.discard(ident)
        self.encoders.pop(ident, None)
        self.sender.put(("unregister", ident))

    def _drop_gone(self) -> None:
        while True:
            try:
                ident = self._gone.get_nowait()
            except queue.Empty:
                return
            self._leave(ident)

    def _add(self, ident: bytes, items: list) -> None:
        from pydantic import ValidationError

        from kiln.runtime.engine import RequestError
        from kiln.runtime.sampling_params import SamplingParams

        if ident not in self.clients:
            return
        rejects = []
        for rid, ids, params, priority in items:
            rid = str(rid)
            try:
                if self.draining:
                    rejects.append([rid, "draining", "the server is shutting down", "unavailable", None])
                    continue
                if self.max_waiting is not None and len(self.engine.scheduler.waiting) >= self.max_waiting:
                    rejects.append([rid, "queue_full", f"the waiting queue is full ({self.max_waiting} requests): retry later",
                                    "queue_full", None])
                    continue
                sp = SamplingParams.model_validate(params)
                self.engine.add_request(rid, [int(t) for t in ids], sp, priority=int(priority))
                self.owner[rid] = ident
            except RequestError as e:
                rejects.append([rid, "invalid", str(e), e.code, e.param])
            except ValidationError as e:
                err = e.errors()[0] if e.errors() else {}
                loc = ".".join(str(x) for x in err.get("loc", ())) or None
                rejects.append([rid, "invalid", f"invalid {loc or 'request'}: {err.get('msg', 'invalid value')}", "invalid_value", loc])
            except (ValueError, TypeError) as e:
                rejects.append([rid, "invalid", str(e), "invalid_value", None])
            except Exception as e:
                log.exception("event=add_failed request_id=%s", rid)
                rejects.append([rid, "error", f"the request could not be started: {type(e).__name__}", "internal_error", None])
        if rejects:
            self.sender.put(("send", ident, [w.REJECT, rejects]))


# --- the process -----------------------------------------------------------------------------------
class _Stop(BaseException):
    """SIGTERM while the engine loads."""


def _load(cfg: dict):
    launcher = cfg.get("launcher", "local")
    if launcher == "ray":
        from kiln.launch.ray_launcher import make_ray_engine

        return make_ray_engine(cfg["engine"], cfg["_topology"], device=cfg.get("device"), num_kv_blocks=cfg.get("num_kv_blocks"))
    from kiln.runtime.engine import LLMEngine

    return LLMEngine(cfg["engine"], launcher=launcher, device=cfg.get("device"), num_kv_blocks=cfg.get("num_kv_blocks"),
                     speculative_config=cfg.get("speculative_config"))


def _write_status(path: str | None, status: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_core(cfg: dict) -> int:
    """The engine core process's body; ``cfg`` as ``kiln serve`` writes it (see ``main``)."""
    from kiln.launch.logs import configure_logging
    from kiln.launch.procs import die_with_parent

    parent = cfg.get("parent_pid")
    die_with_parent(parent, signal.SIGTERM)
    configure_logging(proc="core")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    status = cfg.get("status_file")
    try:
        sock.bind(cfg["address"])
    except zmq.ZMQError as e:
        _write_status(status, {"error": f"the engine core cannot bind {cfg['address']}: {e}", "usage": False})
        return 1
    engine, topology = None, None
    try:
        if cfg.get("launcher") == "ray":
            # Ray starts before this process's SIGTERM handler is installed: its driver installs a
            # crash handler for SIGTERM that would otherwise end the drain early.
            from kiln.launch.ray_launcher import connect_ray
            from kiln.launch.topology import load_topology, resolve_topology
            from kiln.runtime.builder import read_engine_config

            conf = read_engine_config(cfg["engine"])
            topology = resolve_topology(load_topology(cfg["topology"]), conf.build, conf.device_class)
            connect_ray(topology)
            cfg["_topology"] = topology

        def stop_loading(sig, frame):
            raise _Stop()

        signal.signal(signal.SIGTERM, stop_loading)
        t0 = time.monotonic()
        engine = _load(cfg)
    except _Stop:
        log.info("event=core_stopped_while_loading")
        _shutdown(None, topology)
        return 0
    except BaseException as e:
        usage = isinstance(e, (ValueError, FileNotFoundError, MemoryError))
        _write_status(status, {"error": _one_line(e), "usage": usage})
        if not usage:
            log.debug("engine load failed", exc_info=True)
        _shutdown(None, topology)
        return 2 if usage else 1
    from kiln.launch.procs import settle_heap

    frozen = settle_heap()
    core = EngineCore(engine, sock, max_waiting=cfg.get("max_queue"), grace_period=float(cfg.get("grace_period", 30.0)),
                      parent_pid=parent)

    def on_term(sig, frame):
        core.term_requested = True

    signal.signal(signal.SIGTERM, on_term)
    log.info("event=core_ready pid=%d load_s=%.1f launcher=%s frozen_objects=%d", os.getpid(), time.monotonic() - t0,
             cfg.get("launcher", "local"), frozen)
    rc = core.run()
    sock.close(linger=0)
    _shutdown(engine, topology)
    log.info("event=core_exit status=%d", rc)
    return rc


def _shutdown(engine, topology) -> None:
    try:
        if engine is not None:
            engine.shutdown()
    except Exception:
        log.exception("event=engine_shutdown_failed")
    if topology is not None:
        from kiln.launch.ray_launcher import shutdown_ray

        shutdown_ray()
        log.info("event=cluster_stopped")


def main() -> int:
    """``python -m kiln.launch.engine_core`` with a JSON object on stdin: ``engine``, ``address``
    (ipc:// or tcp://127.0.0.1:PORT), ``launcher``, ``topology`` (Ray), ``device``,
    ``num_kv_blocks``, ``speculative_config``, ``max_queue``, ``grace_period``, ``parent_pid``,
    ``status_file`` (where a load failure is written as ``{"error", "usage"}``)."""
    from kiln.launch.procs import read_config

    return run_core(read_config())


if __name__ == "__main__":
    sys.exit(main())
