"""The Ray launcher: placement, lifecycle and health of engine replicas on a Ray cluster.

Ray does three things here and nothing else: it reserves devices (one STRICT_PACK placement
group per pipeline stage, so a stage's tensor-parallel ranks share a node while stages may
spread over nodes), it starts one ``EngineWorkerActor`` per rank, and it tells us when an actor
dies. Step plans and results never pass through Ray: the coordinator (this process) listens on a
TCP socket, the replica's rank-0 actor connects back, and each step is one msgpack request and one
msgpack response on that connection (see ``kiln.launch.ray_worker``).

``make_ray_engine`` returns a ``DPEngine`` (``kiln.launch.dp``) over ``layout.dp`` replicas; it
looks like an ``LLMEngine`` to ``LLM`` and to the server. ``load_ray_engine`` returns one
replica as a ``LoadedEngine`` for code that wants a plain ``LLMEngine``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
import uuid

from kiln.launch.ray_worker import EngineWorkerActor, node_ip, recv_frame, send_frame
from kiln.launch.topology import Topology, TopologyError, resolve_topology

log = logging.getLogger("kiln.ray")

_ray_lock = threading.Lock()
_started_here = False


class LaunchError(RuntimeError):
    """A replica that could not be placed or started; the message says why."""


class ReplicaFailed(RuntimeError):
    """A replica stopped answering (a worker died, a collective failed); its requests move elsewhere."""


def connect_ray(topology: Topology):
    """Connects to ``topology.ray_address`` or starts a local cluster sized by the topology."""
    import ray

    global _started_here
    with _ray_lock:
        if not ray.is_initialized():
            _started_here = topology.ray_address is None
            kw = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False, namespace="kiln")
            if topology.ray_address:
                ray.init(address=topology.ray_address, **kw)
            else:
                need = topology.layout.ranks_per_replica * topology.layout.dp * topology.cpus_per_rank
                cpus = max(int(topology.cpus_per_node or 0), int(need + 0.999))
                gpus = topology.gpus_per_node or None
                ray.init(num_cpus=cpus, num_gpus=gpus, **kw)
    return ray


def descendants(pid: int) -> list[int]:
    """Pids of ``pid``'s descendants (Linux /proc; empty elsewhere)."""
    parent: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for d in names:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def cmdline(pid: int) -> bytes | None:
    """The process's command line as /proc holds it (NUL-separated), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _ray_descendants() -> list[int]:
    """This process's descendants that belong to Ray."""
    return [pid for pid in descendants(os.getpid()) if b"ray" in (cmdline(pid) or b"")]


def _reap(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``, whichever of ``pids`` still run."""
    import signal

    def alive(p: int) -> bool:
        try:
            os.kill(p, 0)
        except OSError:
            return False
        try:
            with open(f"/proc/{p}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return True

    left = [p for p in pids if alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGTERM)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def shutdown_ray() -> None:
    """Stops the local Ray cluster if this process started it (connections to others just close).
    Ray's agents (dashboard agent, runtime-env agent) can outlive ``ray.shutdown()``: whatever
    of the cluster this process started is still running afterwards is terminated."""
    global _started_here
    import ray

    with _ray_lock:
        started = _started_here
        pids = _ray_descendants() if started else []
        if ray.is_initialized():
            ray.shutdown()
        if pids:
            _reap(pids)
        _started_here = False


class ReplicaExecutor:
    """The coordinator's side of one replica: a step plan out, a step result back, on one socket."""

    def __init__(self, sock: socket.socket, name: str, step_timeout_s: float = 600.0):
        from kiln.runtime.worker import pack, pack_masks, unpack

        self._pack, self._pack_masks, self._unpack = pack, pack_masks, unpack
        self.sock = sock
        self.name = name
        self.sock.settimeout(step_timeout_s)
        self.closed = False
        self.failure: str | None = None

    def execute(self, plan, allowed_masks=None):
        from kiln.runtime.plan import StepResult

        if self.closed:
            raise ReplicaFailed(f"{self.name} is down: {self.failure or 'closed'}")
        payload = self._pack({"op": "step", "plan": plan.to_wire(), "masks": self._pack_masks(allowed_masks)})
        try:
            send_frame(self.sock, payload)
            reply = self._unpack(recv_frame(self.sock))
        except (OSError, ConnectionError) as e:
            self.closed = True
            why = self.failure or f"connection to rank 0 lost ({type(e).__name__}: {e})"
            raise ReplicaFailed(f"{self.name} failed: {why}") from None
        if not reply.get("ok"):
            self.closed = True
            raise ReplicaFailed(f"{self.name} failed: {reply.get('error')}")
        return StepResult.from_wire(reply["result"])

    def abort(self, reason: str) -> None:
        """Unblocks a step waiting on a dead replica (called from the health monitor)."""
        self.failure = self.failure or reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(timeout)
            send_frame(self.sock, self._pack({"op": "shutdown"}))
            recv_frame(self.sock)
        except (OSError, ConnectionError):
            pass
        finally:
            self.sock.close()


class RayReplica:
    """The Ray objects of one replica: its placement groups and actors, rank order."""

    def __init__(self, name: str, pgs: list, actors: list):
        self.name = name
        self.pgs = pgs
        self.actors = actors
        self.executor: ReplicaExecutor | None = None
        self.pids: list[int] = []

    def check(self, timeout: float) -> str | None:
        """None while every rank answers; otherwise why the replica is unhealthy."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        refs = [a.ping.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        for rank, ref in enumerate(refs):
            if ref not in ready_set:
                return f"rank {rank} did not answer a heartbeat within {timeout:.0f} s"
            try:
                state = ray.get(ref, timeout=0)
            except RayActorError:
                return f"the worker of rank {rank} died"
            except (GetTimeoutError, RayError) as e:
                return f"rank {rank}: {type(e).__name__}"
            if isinstance(state, str) and state.startswith("failed"):
                return state.removeprefix("failed: ")
        return None

    def abort(self, reason: str) -> None:
        if self.executor is not None:
            self.executor.abort(reason)

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.executor is not None:
            self.executor.closed = True
            try:
                self.executor.sock.close()
            except OSError:
                pass
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.actors, self.pgs = [], []

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        self.kill()


def _bundle(topo: Topology) -> dict:
    b = {"CPU": topo.cpus_per_rank}
    if topo.gpus_per_node:
        b["GPU"] = 1
    return b


def start_replica(engine_dir: str, topo: Topology, name: str, *, num_kv_blocks, max_num_tokens: int, max_batch_size: int,
                  eos: list[int], seed) -> tuple[RayReplica, int]:
    """Places and starts one replica; returns it connected, with its number of KV blocks."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    lay = topo.layout
    world = lay.ranks_per_replica
    timeout = topo.restart_timeout_s
    local = topo.ray_address is None
    strategy = "PACK" if topo.allow_cross_node_tp else "STRICT_PACK"
    pgs = [placement_group([_bundle(topo)] * lay.tp, strategy=strategy, name=f"{name}-stage{s}") for s in range(lay.pp)]
    rep = RayReplica(name, pgs, [])
    try:
        try:
            ray.get([pg.ready() for pg in pgs], timeout=timeout)
        except GetTimeoutError:
            raise LaunchError(
                f"{name}: the cluster could not place {lay.pp} stage(s) of {lay.tp} x {_bundle(topo)} within {timeout:.0f} s: "
                f"it has {ray.cluster_resources()}; add nodes or lower the layout"
            ) from None
        actor_cls = ray.remote(EngineWorkerActor)
        for r in range(world):
            stage, t = divmod(r, lay.tp)
            opts = dict(num_cpus=topo.cpus_per_rank, num_gpus=1 if topo.gpus_per_node else 0, max_concurrency=4, max_restarts=0,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(pgs[stage], placement_group_bundle_index=t))
            rep.actors.append(actor_cls.options(**opts).remote(engine_dir, r, world, topo.device, int(local)))
        addr, port = ray.get(rep.actors[0].address.remote(), timeout=timeout)
        rep.pids = ray.get([a.setup.remote(addr, port, topo.collective_timeout_s) for a in rep.actors], timeout=timeout)
        blocks = ray.get([a.handshake.remote(num_kv_blocks, max_num_tokens, max_batch_size, list(eos), seed) for a in rep.actors],
                         timeout=timeout)
        ray.get([a.serve.remote() for a in rep.actors[1:]], timeout=timeout)
        rep.executor = _connect_rank0(rep, topo, name, local)
        return rep, int(blocks[0])
    except GetTimeoutError:
        rep.kill()
        raise LaunchError(f"{name}: the workers did not start within {timeout:.0f} s (restart_timeout_s)") from None
    except RayError as e:
        rep.kill()
        cause = getattr(e, "cause", None) or e
        raise LaunchError(f"{name}: a worker failed to start: {str(cause).strip().splitlines()[-1]}") from None
    except BaseException:
        rep.kill()
        raise


def _connect_rank0(rep: RayReplica, topo: Topology, name: str, local: bool) -> ReplicaExecutor:
    """Listens on the coordinator's address, lets rank 0 connect back, checks its token."""
    import ray

    host = "127.0.0.1" if local else node_ip()
    token = secrets.token_hex(16)
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen(1)
        listener.settimeout(topo.restart_timeout_s)
        ref = rep.actors[0].connect.remote(host, listener.getsockname()[1], token, topo.heartbeat_s)
        deadline = time.monotonic() + topo.restart_timeout_s
        while True:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                ok = recv_frame(conn) == token.encode()
            except (OSError, ConnectionError):
                ok = False
            if ok:
                break
            conn.close()
            if time.monotonic() > deadline:
                raise LaunchError(f"{name}: rank 0 did not connect back to {host}")
        ray.get(ref, timeout=topo.restart_timeout_s)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ReplicaExecutor(conn, name)


class RayReplicaStarter:
    """Starts replica ``index`` on the cluster and wraps it in an ``LLMEngine``; the DP
    coordinator calls it at start-up and again to restart a replica that failed."""

    def __init__(self, engine_dir: str, topology, *, device: str | None = None, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, max_num_tokens: int | None = None, max_batch_size: int | None = None,
                 seed: int | None = None, verify: bool = True):
        from kiln.runtime.builder import read_engine_config
        from kiln.runtime.loader import EngineLoadError, _limits, load_tokenizer, verify_files

        self.engine_dir = engine_dir
        self.config = read_engine_config(engine_dir)
        self.topology = resolve_topology(topology, self.config.build, self.config.device_class)
        self.topology.check_engine(self.config.build)
        want = device or self.topology.device
        if want != self.config.device_class or self.topology.device != self.config.device_class:
            raise EngineLoadError(
                f"engine was built for {self.config.device_class} but topology '{self.topology.name}' runs on "
                f"{self.topology.device}: rebuild the engine or pick a matching topology"
            )
        if verify:
            verify_files(engine_dir, self.config, [n for n in self.config.files if not n.startswith("rank")])
        self.tokenizer = load_tokenizer(engine_dir, self.config)
        self.max_num_tokens, self.max_batch_size = _limits(self.config, max_num_tokens, max_batch_size)
        self.eos = list(self.config.tokenizer.eos_token_ids or self.config.model.eos_token_id)
        self.num_kv_blocks = num_kv_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.seed = seed
        self.run_id = uuid.uuid4().hex[:8]
        self._starts = 0
        connect_ray(self.topology)

    def loaded(self, executor, num_blocks: int):
        from kiln.runtime.loader import LoadedEngine

        c = self.config
        return LoadedEngine(c, self.tokenizer, executor, num_blocks, self.max_num_tokens, self.max_batch_size, self.eos,
                            c.tokenizer.add_bos_token, c.tokenizer.chat_template)

    def start(self, index: int) -> tuple[RayReplica, int]:
        self._starts += 1
        name = f"kiln-{self.run_id}-replica{index}-{self._starts}"
        return start_replica(self.engine_dir, self.topology, name, num_kv_blocks=self.num_kv_blocks,
                             max_num_tokens=self.max_num_tokens, max_batch_size=self.max_batch_size, eos=self.eos, seed=self.seed)

    def __call__(self, index: int):
        from kiln.runtime.engine import LLMEngine

        rep, nb = self.start(index)
        try:
            engine = LLMEngine(loaded=self.loaded(rep.executor, nb), enable_prefix_caching=self.enable_prefix_caching)
        except BaseException:
            rep.kill()
            raise
        return engine, rep


def make_ray_engine(engine_dir: str, topology=None, **kw):
    """A coordinator over ``layout.dp`` replicas of the engine placed on a Ray cluster."""
    from kiln.launch.dp import DPEngine

    starter = RayReplicaStarter(engine_dir, topology, **kw)
    t = starter.topology
    return DPEngine(starter, t.layout.dp, starter.tokenizer, starter.config, add_bos=starter.config.tokenizer.add_bos_token,
                    heartbeat_s=t.heartbeat_s, resume_timeout_s=t.resume_timeout_s, check_timeout_s=max(10.0, 5 * t.heartbeat_s))


def load_ray_engine(engine_dir: str, *, topology=None, device=None, num_kv_blocks=None, max_num_tokens=None,
                    max_batch_size=None, seed=None, verify: bool = True):
    """One replica as a ``LoadedEngine`` (``load_engine(..., launcher="ray")``); no failover. Use
    ``LLM(..., launcher="ray")`` for data parallelism, health checks and restarts."""
    starter = RayReplicaStarter(engine_dir, topology, device=device, num_kv_blocks=num_kv_blocks, max_num_tokens=max_num_tokens,
                                max_batch_size=max_batch_size, seed=seed, verify=verify)
    if starter.topology.layout.dp != 1:
        raise TopologyError(
            f"topology '{starter.topology.name}' has dp={starter.topology.layout.dp}: load_engine runs one replica; "
            "use LLM(..., launcher='ray') or kiln.launch.ray_launcher.make_ray_engine for data parallelism"
        )
    rep, nb = starter.start(0)
    return starter.loaded(_OwningExecutor(rep), nb)


class _OwningExecutor:
    """A replica's executor that also releases its actors and placement groups on shutdown."""

    def __init__(self, rep: RayReplica):
        self.rep = rep

    def execute(self, plan, allowed_masks=None):
        return self.rep.executor.execute(plan, allowed_masks)

    def shutdown(self) -> None:
        self.rep.shutdown()


def cluster_async_engine(engine, **kw):
    """An ``AsyncEngine`` whose liveness (and so ``/health``) also needs a healthy replica."""
    from kiln.runtime.async_engine import AsyncEngine

    class ClusterAsyncEngine(AsyncEngine):
        def is_alive(self) -> bool:
            return super().is_alive() and self.engine.is_healthy()

    return ClusterAsyncEngine(engine, **kw)
