"""Cluster topologies: the YAML files in ``cluster_configs/``.

A topology says what the hardware is (nodes, GPUs per node, GPU type, the links inside a node and
between nodes) and how an engine is laid out on it (tensor x pipeline x expert parallel inside one
replica, and how many data-parallel replicas). ``load_topology`` validates a file and raises
``TopologyError`` with one line naming the file, the field and the fix.

    name: hgx-h100-8gpu
    nodes: 1
    gpus_per_node: 8
    gpu_type: H100-SXM5-80GB
    interconnect: {intra_node: nvlink}
    layout: {tp: 8, pp: 1, ep: 1, dp: 1}

A replica's tensor-parallel group always sits on one node (its all-reduces run every layer);
pipeline stages may sit on different nodes. A topology with ``gpus_per_node: 0`` runs on CPUs
(gloo), one rank per ``cpus_per_rank`` CPUs.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class TopologyError(ValueError):
    """A topology file that cannot be used; the message is one line."""


class Interconnect(BaseModel):
    """The links between the devices of one node and between nodes."""

    model_config = ConfigDict(extra="forbid")
    intra_node: Literal["nvlink", "pcie", "none"] = Field("nvlink", description="GPU-to-GPU link inside a node")
    inter_node: Literal["infiniband", "ethernet", "none"] = Field("none", description="network between nodes")
    bandwidth_gbps: float | None = Field(None, gt=0, le=100_000, description="per-GPU inter-node bandwidth, informational")


class Layout(BaseModel):
    """How one engine is spread: tp x pp (x ep inside tp) ranks per replica, dp replicas."""

    model_config = ConfigDict(extra="forbid")
    tp: int = Field(1, ge=1, le=64, description="tensor-parallel ranks per stage")
    pp: int = Field(1, ge=1, le=64, description="pipeline stages per replica")
    ep: int = Field(1, ge=1, le=64, description="expert-parallel size inside a tensor-parallel group")
    dp: int = Field(1, ge=1, le=1024, description="data-parallel replicas behind one coordinator")

    @model_validator(mode="after")
    def _check(self) -> "Layout":
        if self.tp % self.ep:
            raise ValueError(f"tp ({self.tp}) must be a multiple of ep ({self.ep})")
        return self

    @property
    def ranks_per_replica(self) -> int:
        return self.tp * self.pp


class Topology(BaseModel):
    """One cluster and the layout of the engine on it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, description="a short name for logs")
    description: str | None = Field(None, max_length=2000)
    nodes: int = Field(1, ge=1, le=4096, description="machines in the cluster")
    gpus_per_node: int = Field(8, ge=0, le=64, description="accelerators per node; 0 runs on CPUs")
    gpu_type: str | None = Field(None, max_length=64, description="e.g. H100-SXM5-80GB; required with GPUs")
    gpu_memory_gb: float | None = Field(None, gt=0, le=4096)
    cpus_per_node: int | None = Field(None, ge=1, le=4096, description="CPUs Ray may use per node (local clusters)")
    cpus_per_rank: float = Field(1.0, gt=0, le=256, description="CPUs reserved per rank")
    interconnect: Interconnect = Field(default_factory=Interconnect)
    layout: Layout = Field(default_factory=Layout)
    allow_cross_node_tp: bool = Field(False, description="let a tensor-parallel group span nodes (slow)")
    ray_address: str | None = Field(None, max_length=512, description="an existing cluster ('auto', 'ray://...'); None starts one")
    collective_timeout_s: float = Field(30.0, ge=1, le=3600, description="control-plane collective timeout per rank")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="seconds between worker liveness checks")
    restart_timeout_s: float = Field(120.0, ge=1, le=3600, description="seconds a replica may take to (re)start")
    resume_timeout_s: float = Field(20.0, ge=0, le=3600, description="seconds a request waits for a healthy replica")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_node > 0 else "cpu"

    @property
    def slots_per_node(self) -> int:
        """Ranks one node can hold."""
        if self.gpus_per_node:
            return self.gpus_per_node
        cpus = self.cpus_per_node or os.cpu_count() or 1
        return max(0, int(cpus // self.cpus_per_rank))

    @model_validator(mode="after")
    def _check(self) -> "Topology":
        lay = self.layout
        if self.gpus_per_node and not self.gpu_type:
            raise ValueError("gpu_type is required when gpus_per_node > 0 (e.g. H100-SXM5-80GB)")
        if self.gpus_per_node == 0 and self.interconnect.intra_node == "nvlink":
            self.interconnect.intra_node = "none"
        if self.nodes > 1 and self.interconnect.inter_node == "none":
            raise ValueError(f"{self.nodes} nodes need interconnect.inter_node (infiniband or ethernet)")
        slots = self.slots_per_node
        total = slots * self.nodes
        need = lay.tp * lay.pp * lay.dp
        unit = "GPUs" if self.gpus_per_node else "CPU slots"
        if need > total:
            raise ValueError(
                f"layout tp*pp*dp = {lay.tp}*{lay.pp}*{lay.dp} = {need} ranks exceeds the {total} {unit} of "
                f"{self.nodes} node(s) x {slots}: lower tp/pp/dp or add nodes"
            )
        if lay.tp > slots and not self.allow_cross_node_tp:
            raise ValueError(
                f"tp={lay.tp} does not fit on one node of {slots} {unit}: tensor parallelism stays inside a node "
                "(lower tp and raise pp, or set allow_cross_node_tp: true)"
            )
        if not self.allow_cross_node_tp:
            stages_per_node = slots // lay.tp
            if stages_per_node * self.nodes < lay.pp * lay.dp:
                raise ValueError(
                    f"{lay.pp * lay.dp} pipeline stages of tp={lay.tp} do not pack onto {self.nodes} node(s) holding "
                    f"{stages_per_node} stage(s) each: lower pp/dp or add nodes"
                )
        return self

    def with_layout(self, **kw) -> "Topology":
        """A copy with some layout fields replaced (validated again)."""
        data = self.model_dump()
        data["layout"].update(kw)
        return Topology.model_validate(data)

    def check_engine(self, build) -> None:
        """The engine's build must match the layout's tp/pp/ep and device class."""
        lay = self.layout
        if (build.tp, build.pp, build.ep) != (lay.tp, lay.pp, lay.ep):
            raise TopologyError(
                f"topology '{self.name}' lays out tp={lay.tp} pp={lay.pp} ep={lay.ep} but the engine was built with "
                f"tp={build.tp} pp={build.pp} ep={build.ep}: rebuild the engine or use a matching topology"
            )


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ()))
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if e.get("type") == "extra_forbidden":
        return f"unknown field '{loc}'"
    if e.get("type") in ("missing",):
        return f"missing field '{loc}'"
    return f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg


def parse_topology(data, source: str = "<topology>") -> Topology:
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: a topology must be a mapping of fields, not {type(data).__name__}")
    try:
        return Topology.model_validate(data)
    except ValidationError as e:
        line = _first_error(e).splitlines()[0] if _first_error(e) else "invalid topology"
        raise TopologyError(f"{source}: {line}") from None


def load_topology(path: str) -> Topology:
    """Reads and validates one YAML topology file; raises ``TopologyError`` (one line) when it is unusable."""
    import yaml

    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs", path)
        if os.path.isfile(here):
            path = here
        else:
            raise TopologyError(f"topology file '{path}' does not exist: pass a file from cluster_configs/")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TopologyError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return parse_topology(data, path)


def resolve_topology(topology, build=None, device_class: str = "cpu") -> Topology:
    """A Topology from a path, a dict, a Topology or None (one local node fitting the engine's build)."""
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, str):
        return load_topology(topology)
    if isinstance(topology, dict):
        return parse_topology(topology)
    if topology is None and build is not None:
        import torch

        gpus = torch.cuda.device_count() if device_class == "cuda" else 0
        world = build.tp * build.pp
        return parse_topology({
            "name": "local", "nodes": 1, "gpus_per_node": gpus if gpus >= world else 0,
            "gpu_type": "local" if gpus >= world else None, "cpus_per_node": max(world, os.cpu_count() or 1),
            "layout": {"tp": build.tp, "pp": build.pp, "ep": build.ep, "dp": 1},
        })
    raise TopologyError("a topology is needed: pass a file from cluster_configs/")
