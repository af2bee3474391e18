"""Child processes of ``kiln serve``: started with a JSON config on stdin (nothing pickled), tied
to their parent's life, and found again through /proc when they must be stopped."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def settle_heap() -> int:
    """Collects once, then moves every object alive now (the model, the tokenizer, the imported
    modules) out of the collector's reach: a long-lived server process's later full collections
    then walk only what was made since, instead of pausing the step loop or the event loop for
    tens of milliseconds each time. Objects still die when nothing refers to them. Returns how
    many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def die_with_parent(parent_pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Has the kernel send ``sig`` to this process when its parent exits; exits at once if the
    parent is already gone."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def become_subreaper() -> bool:
    """Orphaned descendants (a killed child's own children) are re-parented to this process, so
    it can still stop them."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def spawn(module: str, config: dict, *, pass_fds=(), env: dict | None = None) -> subprocess.Popen:
    """Starts ``python -m module`` and hands it ``config`` as JSON on its stdin."""
    proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, pass_fds=tuple(pass_fds),
                            env=env if env is not None else dict(os.environ))
    try:
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
    except OSError:  # the child died before reading: its exit code tells why
        pass
    return proc


def read_config() -> dict:
    """The JSON config a child process was given on stdin."""
    return json.loads(sys.stdin.buffer.read().decode() or "{}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def stop_pids(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, whichever of ``pids`` still run."""
    left = [p for p in pids if alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGTERM)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def reap_orphans(keep: set[int]) -> None:
    """Collects exited children of this process that it did not start with ``spawn`` (orphans it
    inherited as a subreaper); ``keep`` are the pids that ``subprocess`` waits for itself."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    me = os.getpid()
    for d in names:
        if not d.isdigit() or int(d) in keep:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] == "Z":
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(int(d), os.WNOHANG)


__all__ = ["alive", "become_subreaper", "die_with_parent", "reap_orphans", "read_config", "spawn", "stop_pids"]


def serve_roles(pid: int) -> dict[str, list[int]]:
    """The processes of the ``kiln serve`` whose parent process is ``pid``, by role: the engine
    core (``core``) and the API servers (``api``). Linux /proc; empty lists elsewhere."""
    from kiln.launch.ray_launcher import cmdline, descendants

    roles: dict[str, list[int]] = {"core": [], "api": []}
    for p in descendants(pid):
        cmd = cmdline(p) or b""
        if b"kiln.launch.engine_core" in cmd:
            roles["core"].append(p)
        elif b"kiln.launch.api_server" in cmd:
            roles["api"].append(p)
    return roles
