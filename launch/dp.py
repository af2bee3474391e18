"""Data-parallel replicas behind one coordinator.

``DPEngine`` looks like an ``LLMEngine`` (add_request / abort_request / step / stats / shutdown,
plus tokenizer, config, max_seq_len, encode_prompt) so ``LLM`` and the HTTP server drive it the
same way. Each replica is a full ``LLMEngine`` (its own scheduler and KV block tables) over its own
executor; one ``step`` steps every busy replica at once (one thread each, so their forwards
overlap) and merges the outputs.

Routing. A prompt's first blocks (``tokens_per_block`` tokens each, up to ``affinity_blocks``)
are hashed as a chain; the replica that last served the longest known chain holds that prefix in
its KV cache and gets the request, unless its load (unfinished requests) is more than
``load_slack`` above the least-loaded replica. Otherwise the least-loaded replica wins. The hit
rate (requests sent to the replica holding their prefix / requests whose prefix was known) is in
``stats()``.

Failure. A background monitor checks every replica's liveness each ``heartbeat_s`` and cuts the
connection of one that fails, so a step waiting on it returns at once. The stepping thread then
moves the failed replica's unfinished requests to a healthy replica with the tokens generated so
far (``kiln.launch.resume``), or, when none comes back within ``resume_timeout_s``, ends them with
an error; and a background thread starts a replacement replica.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

from kiln.launch.resume import can_resume, ended_output, resume_request
from kiln.runtime.outputs import RequestOutput

log = logging.getLogger("kiln.dp")


@dataclass
class _Slot:
    index: int
    engine: object = None
    handle: object = None
    healthy: bool = False
    flagged: str | None = None     # set by the monitor: why the replica is down
    restarting: bool = False
    restarts: int = 0
    failures: int = 0


@dataclass
class _Pending:
    req: object
    reason: str
    deadline: float
    moves: int = 1


@dataclass
class _Counters:
    affinity_lookups: int = 0
    affinity_hits: int = 0
    routed: list = field(default_factory=list)
    resumed: int = 0
    failed_requests: int = 0
    replica_failures: int = 0


class _WaitingView:
    """``scheduler.waiting`` across replicas (what AsyncEngine's queue limit reads)."""

    def __init__(self, dp: "DPEngine"):
        self._dp = dp

    @property
    def waiting(self) -> list:
        out = [p.req for p in self._dp._pending]
        for s in self._dp._slots:
            if s.healthy and s.engine is not None:
                out.extend(s.engine.scheduler.waiting)
        return out


class DPEngine:
    """``starter(index) -> (LLMEngine, handle)`` starts replica ``index``; ``handle`` has
    ``check(timeout) -> str | None``, ``abort(reason)``, ``kill()`` and ``shutdown()``."""

    def __init__(self, starter, dp: int, tokenizer, config, *, add_bos: bool = True, affinity_blocks: int = 8,
                 load_slack: int = 4, heartbeat_s: float = 1.0, check_timeout_s: float = 10.0,
                 resume_timeout_s: float = 20.0, max_moves: int = 3, max_restarts: int = 5, restart: bool = True):
        self.starter = starter
        self.tokenizer = tokenizer
        self.config = config
        self.max_seq_len = config.build.max_seq_len
        self.block_size = config.build.tokens_per_block
        self.add_bos = add_bos
        self.affinity_blocks = affinity_blocks
        self.load_slack = load_slack
        self.heartbeat_s = heartbeat_s
        self.check_timeout_s = check_timeout_s
        self.resume_timeout_s = resume_timeout_s
        self.max_moves = max_moves
        self.max_restarts = max_restarts
        self.restart = restart
        self._slots = [_Slot(i) for i in range(dp)]
        self._lock = threading.Lock()
        self._ready: list[tuple[int, object, object]] = []
        self._pending: list[_Pending] = []
        self._outbox: list[RequestOutput] = []
        self._owner: dict[str, int] = {}
        self._affinity: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._moves: dict[str, int] = {}
        self.counters = _Counters()
        self.route_log: collections.deque = collections.deque(maxlen=4096)
        self.num_steps = 0
        self.forward_s = 0.0
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, dp), thread_name_prefix="kiln-dp")
        self.scheduler = _WaitingView(self)
        self._detokenize = True
        self._start_all()
        self._monitor = threading.Thread(target=self._monitor_loop, name="kiln-dp-monitor", daemon=True)
        self._monitor.start()

    # --- start-up -------------------------------------------------------------------------------
    def _start_all(self) -> None:
        futs = {self._pool.submit(self.starter, s.index): s for s in self._slots}
        errors = []
        for fut, slot in futs.items():
            try:
                slot.engine, slot.handle = fut.result()
                slot.healthy = True
            except BaseException as e:
                errors.append(e)
        if errors:
            for s in self._slots:
                if s.handle is not None:
                    s.handle.kill()
            raise errors[0]
        self.max_num_tokens = self._slots[0].engine.max_num_tokens
        self.eos_token_ids = self._slots[0].engine.eos_token_ids

    @property
    def detokenize(self) -> bool:
        """``LLMEngine.detokenize`` of every replica, restarted ones included."""
        return self._detokenize

    @detokenize.setter
    def detokenize(self, value: bool) -> None:
        self._detokenize = bool(value)
        for s in self._slots:
            if s.engine is not None:
                s.engine.detokenize = self._detokenize

    # --- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=self.add_bos)

    def _prefix_keys(self, ids: list[int]) -> list[int]:
        bs = self.block_size
        keys, h = [], 0
        for i in range(min(len(ids) // bs, self.affinity_blocks)):
            h = hash((h, tuple(ids[i * bs:(i + 1) * bs])))
            keys.append(h)
        return keys

    def _healthy(self) -> list[_Slot]:
        return [s for s in self._slots if s.healthy and s.flagged is None]

    @staticmethod
    def _load(slot: _Slot) -> int:
        return len(slot.engine.requests)

    def _route(self, keys: list[int]) -> tuple[_Slot, str]:
        healthy = self._healthy()
        if not healthy:
            from kiln.runtime.async_engine import EngineDeadError

            raise EngineDeadError("no replica is healthy right now (restarting): retry shortly")
        loads = {s.index: self._load(s) for s in healthy}
        least = min(loads.values())
        for k in reversed(keys):
            r = self._affinity.get(k)
            if r is None:
                continue
            self.counters.affinity_lookups += 1
            if r in loads and loads[r] <= least + self.load_slack:
                self.counters.affinity_hits += 1
                return self._slots[r], "affinity"
            break
        start = self.num_steps % len(healthy)
        order = healthy[start:] + healthy[:start]
        return min(order, key=lambda s: loads[s.index]), "load"

    def _remember(self, keys: list[int], index: int) -> None:
        for k in keys:
            self._affinity[k] = index
            self._affinity.move_to_end(k)
        while len(self._affinity) > 100_000:
            self._affinity.popitem(last=False)

    def add_request(self, request_id: str, prompt, params=None, priority: int = 0):
        from kiln.runtime.engine import RequestError

        if request_id in self._owner or any(p.req.request_id == request_id for p in self._pending):
            raise RequestError(f"request id '{request_id}' is already in use", code="duplicate_request_id")
        text, ids = (prompt, self.encode_prompt(prompt)) if isinstance(prompt, str) else (None, [int(t) for t in prompt])
        keys = self._prefix_keys(ids)
        slot, how = self._route(keys)
        req = slot.engine.add_request(request_id, ids if ids else prompt, params, priority=priority)
        req.prompt = text
        self._owner[request_id] = slot.index
        self._remember(keys, slot.index)
        self.route_log.append((request_id, slot.index, how))
        return req

    def abort_request(self, request_id: str) -> bool:
        idx = self._owner.get(request_id)
        if idx is not None:
            slot = self._slots[idx]
            if slot.engine is not None and slot.engine.abort_request(request_id):
                return True
        for p in list(self._pending):
            if p.req.request_id == request_id:
                self._pending.remove(p)
                self._outbox.append(ended_output(p.req, "abort", None))
                self._moves.pop(request_id, None)
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self._pending) or any(s.engine is not None and s.engine.has_unfinished() for s in self._healthy())

    def has_pending_outputs(self) -> bool:
        return bool(self._outbox) or bool(self._ready) or any(s.flagged for s in self._slots) or any(
            s.engine is not None and s.engine.has_pending_outputs() for s in self._healthy())

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._install_ready()
        for s in self._slots:
            if s.healthy and s.flagged is not None:
                self._fail(s, s.flagged)
        self._place_pending()
        busy = [s for s in self._healthy() if s.engine.has_unfinished() or s.engine.has_pending_outputs()]
        out: list[RequestOutput] = []
        if len(busy) == 1:
            results = [(busy[0], self._step_one(busy[0]))]
        else:
            futs = [(s, self._pool.submit(self._step_one, s)) for s in busy]
            results = [(s, f.result()) for s, f in futs]
        for slot, res in results:
            if isinstance(res, BaseException):
                self._fail(slot, str(res) or type(res).__name__)
                continue
            out.extend(res)
        if self._pending:
            self._place_pending()
            if not busy and not self._healthy():
                time.sleep(0.02)
        out.extend(self._outbox)
        self._outbox.clear()
        for o in out:
            if o.finished:
                self._owner.pop(o.request_id, None)
                self._moves.pop(o.request_id, None)
        self.num_steps += 1
        return out

    def _step_one(self, slot: _Slot):
        try:
            f0 = slot.engine.forward_s
            res = slot.engine.step()
            self.forward_s += slot.engine.forward_s - f0
            return res
        except BaseException as e:  # the replica failed; its requests are moved by the caller
            return e

    def _fail(self, slot: _Slot, reason: str) -> None:
        """Takes a failed replica out, moves or ends its requests, starts a replacement."""
        slot.healthy = False
        slot.failures += 1
        self.counters.replica_failures += 1
        msg = f"replica {slot.index} failed ({reason})"
        log.warning("event=replica_failed replica=%d reason=%s", slot.index, reason)
        engine, handle = slot.engine, slot.handle
        for req in list(engine._changed.values()):
            if req.request_id not in engine.requests:
                self._outbox.append(ended_output(req, "abort", req.error))
        deadline = time.monotonic() + self.resume_timeout_s
        for req in list(engine.requests.values()):
            moves = self._moves.get(req.request_id, 0) + 1
            self._owner.pop(req.request_id, None)
            if can_resume(req) and moves <= self.max_moves:
                self._moves[req.request_id] = moves
                self._pending.append(_Pending(req, msg, deadline, moves))
            else:
                self._end_with_error(req, f"{msg}; the request could not be resumed (n > 1 or moved {moves - 1} times)")
        for k in [k for k, v in self._affinity.items() if v == slot.index]:
            del self._affinity[k]
        slot.engine = None
        slot.handle = None
        slot.flagged = None
        threading.Thread(target=self._replace, args=(slot, handle), name=f"kiln-restart-{slot.index}", daemon=True).start()

    def _end_with_error(self, req, message: str) -> None:
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error"
        req.error = message
        self.counters.failed_requests += 1
        self._outbox.append(ended_output(req, "error", message))

    def _place_pending(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        keep = []
        for p in self._pending:
            healthy = self._healthy()
            if healthy:
                slot = min(healthy, key=self._load)
                try:
                    resume_request(slot.engine, p.req)
                except Exception as e:
                    self._end_with_error(p.req, f"{p.reason}; resuming failed: {e}")
                    continue
                self._owner[p.req.request_id] = slot.index
                self.counters.resumed += 1
                self.route_log.append((p.req.request_id, slot.index, "resume"))
            elif now > p.deadline:
                self._end_with_error(p.req, f"{p.reason}; no healthy replica came back within {self.resume_timeout_s:.0f} s")
            else:
                keep.append(p)
        self._pending = keep

    # --- restarts and health ----------------------------------------------------------------------
    def _replace(self, slot: _Slot, old_handle) -> None:
        if old_handle is not None:
            try:
                old_handle.kill()
            except Exception:
                log.exception("killing replica %d failed", slot.index)
        if not self.restart or self._closed:
            return
        slot.restarting = True
        delay = 1.0
        for attempt in range(self.max_restarts):
            if self._closed:
                break
            try:
                engine, handle = self.starter(slot.index)
            except BaseException as e:
                log.warning("event=replica_restart_failed replica=%d attempt=%d error=%s", slot.index, attempt + 1, e)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closed:
                handle.kill()
                break
            with self._lock:
                self._ready.append((slot.index, engine, handle))
            log.info("event=replica_restarted replica=%d", slot.index)
            break
        slot.restarting = False

    def _install_ready(self) -> None:
        if not self._ready:
            return
        with self._lock:
            ready, self._ready = self._ready, []
        for index, engine, handle in ready:
            slot = self._slots[index]
            engine.detokenize = self._detokenize
            slot.engine, slot.handle, slot.flagged = engine, handle, None
            slot.healthy = True
            slot.restarts += 1

    def _monitor_loop(self) -> None:
        while not self._closed:
            time.sleep(self.heartbeat_s)
            for slot in list(self._slots):
                handle = slot.handle
                if not slot.healthy or slot.flagged is not None or handle is None or self._closed:
                    continue
                try:
                    why = handle.check(self.check_timeout_s)
                except Exception as e:
                    why = f"health check failed: {type(e).__name__}: {e}"
                if why is not None and slot.handle is handle and not self._closed:
                    slot.flagged = why
                    handle.abort(why)

    def is_healthy(self) -> bool:
        return not self._closed and bool(self._healthy())

    # --- reporting and shutdown ---------------------------------------------------------------------
    def stats(self) -> dict:
        agg = {"running": 0, "waiting": len(self._pending), "kv_blocks_used": 0, "kv_blocks_free": 0, "kv_blocks_total": 0,
               "preemptions": 0}
        rates = []
        for s in self._healthy():
            st = s.engine.stats()
            for k in agg:
                agg[k] += st.get(k, 0)
            rates.append(st.get("prefix_cache_hit_rate", 0.0))
        c = self.counters
        agg.update({
            "prefix_cache_hit_rate": sum(rates) / len(rates) if rates else 0.0,
            "steps": self.num_steps,
            "dp": len(self._slots),
            "replicas_healthy": len(self._healthy()),
            "replicas_restarting": sum(1 for s in self._slots if s.restarting or not s.healthy),
            "replica_failures": c.replica_failures,
            "replica_restarts": sum(s.restarts for s in self._slots),
            "requests_resumed": c.resumed,
            "requests_failed_over_error": c.failed_requests,
            "affinity_lookups": c.affinity_lookups,
            "affinity_hits": c.affinity_hits,
            "affinity_hit_rate": c.affinity_hits / c.affinity_lookups if c.affinity_lookups else 0.0,
            "replica_load": [self._load(s) if s.healthy and s.engine is not None else None for s in self._slots],
        })
        return agg

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._monitor.join(timeout=self.check_timeout_s + self.heartbeat_s + 1)
        for s in self._slots:
            handle, s.healthy = s.handle, False
            if handle is not None:
                try:
                    handle.shutdown()
                except Exception:
                    log.exception("shutting replica %d down failed", s.index)
        with self._lock:
            ready, self._ready = self._ready, []
        for _, _, handle in ready:
            handle.kill()
        self._pool.shutdown(wait=False)
