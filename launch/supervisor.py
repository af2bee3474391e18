"""``kiln serve``'s parent process: it starts the engine core and the API servers, and stops them together.

The process tree::

    kiln serve (this process: binds the port, forwards signals, waits; serves nothing itself)
    |-- python -m kiln.launch.engine_core     scheduler, step loop, workers (load_engine with the launcher)
    |-- python -m kiln.launch.api_server      x --api-server-count: HTTP, tokenization, detokenization, SSE

Every child gets its config as JSON on stdin and dies with this process (the kernel's parent-death
signal; the engine core also watches its parent and stops its workers first). The port is bound
here once and inherited by every API server. The core listens on ``ipc://`` in a directory only
this user can open, and each API server binds its output socket there too.

SIGTERM or SIGINT: the API servers drain (new requests 503, those in flight get
``--grace-period``), then the engine core is told to stop and exits, then this process exits 0.
A second signal stops them at once. An engine core that dies leaves the API servers up,
answering 503 on /health and to every request, until the server is stopped (status 1); an API
server that dies stops everything (status 1). A load failure of the core is this command's
error, in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time

from kiln.launch.api_server import bind_listener
from kiln.launch.logs import configure_logging
from kiln.launch.procs import alive, become_subreaper, reap_orphans, spawn, stop_pids

log = logging.getLogger("kiln.serve")


class ServeError(RuntimeError):
    """The engine core could not start; the message says why."""


class ServeUsageError(ValueError):
    """The engine core refused the engine or a setting; the message names the fix."""


class Supervisor:
    """Runs the process tree of one ``kiln serve`` until it is stopped; ``run`` returns the exit status."""

    def __init__(self, args, run_dir: str, sock, model_name: str, aliases: list[str]):
        self.args = args
        self.run_dir = run_dir
        self.sock = sock
        self.model_name = model_name
        self.aliases = aliases
        self.count = int(getattr(args, "api_server_count", 1) or 1)
        self.core_address = f"ipc://{os.path.join(run_dir, 'core')}"
        self.status_file = os.path.join(run_dir, "core-status.json")
        self.core = None
        self.apis: list = []
        self.signals = 0
        self.stopping = False
        self.failed = False
        self.load_error: dict | None = None

    # --- start ---------------------------------------------------------------------------------------
    def _core_config(self) -> dict:
        a = self.args
        return {"engine": a.engine, "address": self.core_address, "launcher": getattr(a, "launcher", "local"),
                "topology": getattr(a, "topology", None), "device": getattr(a, "device", None),
                "num_kv_blocks": getattr(a, "num_kv_blocks", None), "max_queue": getattr(a, "max_queue", None),
                "speculative_config": getattr(a, "speculative_config", None),
                "grace_period": float(getattr(a, "grace_period", 30.0)), "parent_pid": os.getpid(),
                "status_file": self.status_file}

    def _api_config(self, index: int) -> dict:
        a = self.args
        return {"fd": self.sock.fileno(), "core_address": self.core_address, "engine": a.engine, "api_index": index,
                "model_name": self.model_name, "aliases": self.aliases, "api_key": a.api_key,
                "max_body_bytes": a.max_body_bytes, "request_timeout": a.request_timeout, "grace_period": a.grace_period,
                "host": a.host, "port": a.port, "parent_pid": os.getpid(), "output_dir": self.run_dir}

    def start(self) -> None:
        become_subreaper()
        self.core = spawn("kiln.launch.engine_core", self._core_config())
        log.info("event=engine_core_started pid=%d launcher=%s", self.core.pid, getattr(self.args, "launcher", "local"))
        env = dict(os.environ)
        if self.count > 1:
            mp = os.path.join(self.run_dir, "metrics")
            os.makedirs(mp, exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = mp
        for i in range(self.count):
            p = spawn("kiln.launch.api_server", self._api_config(i), pass_fds=[self.sock.fileno()], env=env)
            self.apis.append(p)
            log.info("event=api_server_started index=%d pid=%d", i, p.pid)
        self.sock.close()  # the API servers hold it now; the port is free once they are gone

    # --- run -----------------------------------------------------------------------------------------
    def _on_signal(self, sig, frame) -> None:
        self.signals += 1

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self._wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._stop_everything()
        if self.load_error is not None:
            cls = ServeUsageError if self.load_error.get("usage") else ServeError
            raise cls(self.load_error.get("error") or "the engine core failed to start")
        return 1 if self.failed else 0

    def _wait(self) -> None:
        handled = 0
        core_seen = False
        while True:
            reap_orphans({self.core.pid, *(p.pid for p in self.apis)})
            if self.signals > handled:
                handled = self.signals
                if handled == 1:
                    log.info("event=stop_requested")
                    self._stop_apis()
                else:
                    log.info("event=stop_now")
                    self._signal_all(signal.SIGTERM)
            rc = self.core.poll()
            if rc is not None and not core_seen:
                core_seen = True
                self._core_exited(rc)
            for i, p in enumerate(self.apis):
                if p.poll() is not None and not self.stopping:
                    log.error("event=api_server_exited index=%d status=%d", i, p.returncode)
                    self.failed = True
                    self._stop_apis()
            if self.stopping and all(p.poll() is not None for p in self.apis):
                return
            time.sleep(0.05)

    def _core_exited(self, rc: int) -> None:
        status = None
        with contextlib.suppress(OSError, ValueError):
            with open(self.status_file) as f:
                status = json.load(f)
        if status and status.get("error"):
            self.load_error = status
            self._stop_apis()
        elif not self.stopping:
            log.error("event=engine_core_exited status=%d: the API servers answer 503 until stopped", rc)
            self.failed = True

    def _stop_apis(self) -> None:
        self.stopping = True
        for p in self.apis:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGTERM)

    def _signal_all(self, sig) -> None:
        for p in [*self.apis, self.core]:
            if p is not None and p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(sig)

    def _stop_everything(self) -> None:
        """The core stops after the API servers; whatever is left of the tree is ended."""
        for p in self.apis:
            _wait_or_kill(p, 10.0)
        if self.core is not None:
            if self.core.poll() is None:
                with contextlib.suppress(OSError):
                    self.core.send_signal(signal.SIGTERM)
            _wait_or_kill(self.core, 30.0)
            if self.core.returncode not in (0, None) and not self.failed and self.load_error is None:
                log.error("event=engine_core_exit status=%d", self.core.returncode)
                self.failed = True
        from kiln.launch.ray_launcher import descendants

        left = [p for p in descendants(os.getpid()) if alive(p)]
        if left:
            log.info("event=stopping_leftovers count=%d", len(left))
            stop_pids(left)
        reap_orphans(set())
        log.info("event=stopped")


def _wait_or_kill(proc, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except Exception:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)


def _torchrun_worker(args) -> int:
    """A rank other than 0 of ``torchrun ... kiln serve --launcher torchrun``: runs the steps rank 0
    (the engine core process under rank 0's ``kiln serve``) broadcasts, until it says stop."""
    from kiln.runtime.worker import Worker

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)  # rank 0's engine core stops this rank when it exits
    w = Worker(args.engine, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None, None, getattr(args, "device", None),
               int(os.environ.get("LOCAL_RANK", 0)))
    w.handshake(None, 1, 1, [], None)
    w.serve_forever()
    return 0


def serve(args) -> int:
    """``kiln serve``: binds the port, starts the engine core and the API servers (``/health`` is
    503 while the core loads), and serves until SIGTERM."""
    if not os.path.isdir(args.engine):
        raise FileNotFoundError(f"engine directory '{args.engine}' does not exist: build one with 'kiln build'")
    configure_logging(proc="main")
    if getattr(args, "launcher", "local") == "torchrun" and int(os.environ.get("RANK", "0")) != 0:
        return _torchrun_worker(args)
    name = getattr(args, "served_model_name", None) or os.path.basename(os.path.normpath(args.engine))
    aliases = [os.path.basename(os.path.normpath(args.engine)), args.engine]
    run_dir = tempfile.mkdtemp(prefix="kiln-serve-")
    try:
        sock = bind_listener(args.host, args.port)
        return Supervisor(args, run_dir, sock, name, aliases).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["ServeError", "ServeUsageError", "Supervisor", "serve"]
