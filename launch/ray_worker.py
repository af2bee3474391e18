"""The engine worker that the Ray launcher places, one per rank.

``EngineWorkerActor`` wraps ``kiln.runtime.worker.Worker``. Ray only creates it, calls a few
lifecycle methods with plain ints and strings (``address``, ``setup``, ``handshake``, ``serve``,
``connect``, ``ping``) and kills it; step plans never travel through Ray.

The data path of a replica: the coordinator (the driver) holds a TCP connection to the rank-0
actor and sends one length-prefixed msgpack frame per step; rank 0 broadcasts those same bytes
over the gloo control plane to the other ranks, runs its own part of the step, collects the
sampled tokens from the sampling rank and answers with one frame. While the coordinator is idle
rank 0 broadcasts a small ``ping`` frame every heartbeat so the other ranks' waits stay inside
the short collective timeout. Any failure (a peer gone, a collective timing out) closes the
socket, which the coordinator sees as end-of-file at once.
"""

from __future__ import annotations

import datetime
import os
import select
import socket
import struct
import threading
import time
import traceback

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEADER.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> bytes:
    (n,) = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes is over the limit")
    return recv_exact(sock, n)


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


class EngineWorkerActor:
    """One rank of one replica. Constructor arguments are plain strings and ints."""

    def __init__(self, engine_dir: str, rank: int, world_size: int, device: str, loopback: int = 1):
        self.engine_dir = engine_dir
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.loopback = bool(loopback)
        self.worker = None
        self.state = "created"
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    # --- lifecycle (called through Ray) -----------------------------------------------------------
    def address(self) -> list:
        """This node's address and a free port on it, for rank 0's TCP store."""
        host = "127.0.0.1" if self.loopback else node_ip()
        with socket.socket() as s:
            s.bind((host, 0))
            return [host, s.getsockname()[1]]

    def setup(self, master_addr: str, master_port: int, timeout_s: float) -> int:
        """Joins the process group (short timeout) and loads this rank's weights file."""
        import torch
        import torch.distributed as dist

        from kiln.runtime.worker import Worker

        dev = torch.device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo",
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=self.rank, world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=torch.device("cuda", 0) if dev.type == "cuda" else None,
            )
        self.worker = Worker(self.engine_dir, self.rank, self.world_size, master_addr, master_port,
                             self.device, local_rank=0 if dev.type == "cuda" else None, timeout_s=timeout_s)
        self.state = "loaded"
        return os.getpid()

    def handshake(self, num_kv_blocks, max_num_tokens: int, max_batch_size: int, eos: list, seed) -> int:
        n = self.worker.handshake(num_kv_blocks, max_num_tokens, max_batch_size, list(eos), seed)
        self.state = "ready"
        return n

    def serve(self) -> bool:
        """Ranks other than 0: run broadcast steps in a background thread until shutdown."""
        self._start(self._follower_loop)
        return True

    def connect(self, host: str, port: int, token: str, heartbeat_s: float) -> bool:
        """Rank 0: connect back to the coordinator and serve its step frames in a background thread."""
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_frame(sock, token.encode())
        sock.settimeout(None)
        self._heartbeat_s = heartbeat_s
        self._sock = sock
        self._start(self._leader_loop)
        return True

    def ping(self) -> str:
        return self.state if self.error is None else f"failed: {self.error}"

    def stop(self) -> bool:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    # --- step loops (background thread) -------------------------------------------------------------
    def _start(self, target) -> None:
        self.state = "serving"
        self._thread = threading.Thread(target=self._guard, args=(target,), name=f"kiln-rank{self.rank}", daemon=True)
        self._thread.start()

    def _guard(self, target) -> None:
        try:
            target()
            self.state = "stopped"
        except BaseException as e:  # reported through ping(); the coordinator restarts the replica
            self.error = f"rank {self.rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.state = "failed"
            traceback.print_exc()
        finally:
            if self._sock is not None:
                try:
                    self._sock.close()
                except OSError:
                    pass
            if self.worker is not None:
                try:
                    self.worker.close()
                except Exception:
                    pass

    def _follower_loop(self) -> None:
        from kiln.runtime.plan import StepPlan
        from kiln.runtime.worker import pack, unpack, unpack_masks

        w = self.worker
        while True:
            msg = unpack(w.control.broadcast(None))
            op = msg["op"]
            if op == "ping":
                continue
            if op == "shutdown":
                return
            plan = StepPlan.from_wire(msg["plan"])
            res = w.runner.execute(plan, unpack_masks(msg["masks"], w.device))
            if w.runner.samples:
                w.control.send(pack(res.to_wire()), 0)

    def _leader_loop(self) -> None:
        from kiln.runtime.plan import StepPlan, StepResult
        from kiln.runtime.worker import pack, unpack, unpack_masks

        w = self.worker
        sock = self._sock
        ping = pack({"op": "ping"})
        last = time.monotonic()
        interval = self._heartbeat_s
        while True:
            readable, _, _ = select.select([sock], [], [], interval)
            if not readable:
                if time.monotonic() - last >= interval and self.world_size > 1:
                    w.control.broadcast(ping)
                    last = time.monotonic()
                continue
            raw = recv_frame(sock)
            msg = unpack(raw)
            op = msg["op"]
            if self.world_size > 1 and op in ("step", "shutdown"):
                w.control.broadcast(raw)
                last = time.monotonic()
            if op == "shutdown":
                send_frame(sock, pack({"ok": True}))
                return
            if op == "ping":
                send_frame(sock, pack({"ok": True}))
                continue
            try:
                plan = StepPlan.from_wire(msg["plan"])
                masks = unpack_masks(msg["masks"], w.device)
                res = w.runner.execute(plan, masks if w.runner.samples else None)
                if w.sampling_rank != 0:
                    res = StepResult.from_wire(unpack(w.control.recv(w.sampling_rank)))
            except BaseException as e:
                try:
                    send_frame(sock, pack({"ok": False, "error": f"rank 0: {type(e).__name__}: {e}"}))
                finally:
                    raise
            send_frame(sock, pack({"ok": True, "result": res.to_wire()}))
