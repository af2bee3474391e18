"""The rank mapping: one immutable object owns all tensor / pipeline / expert-parallel arithmetic.

Ranks are laid out with tensor parallelism innermost: ``rank = pp_rank * tp + tp_rank``. Inside a
tensor-parallel group, MoE layers split as ``moe_tp x moe_ep = tp`` with ``ep`` setting moe_ep, and
moe_tp innermost: ``tp_rank = moe_ep_rank * moe_tp + moe_tp_rank``. An expert-parallel group is the
``ep`` ranks of one tensor-parallel group that hold the same moe_tp slice of different experts; a
moe_tp group is the ``moe_tp`` ranks that hold the slices of the same experts.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Mapping(BaseModel):
    """Who holds what, for one rank of a ``tp x pp`` world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp: int = Field(1, ge=1, le=1024, description="tensor-parallel size")
    pp: int = Field(1, ge=1, le=1024, description="pipeline-parallel size")
    ep: int = Field(1, ge=1, le=1024, description="expert-parallel size inside a tensor-parallel group")
    rank: int = Field(0, ge=0, description="global rank")

    @model_validator(mode="after")
    def _check(self) -> "Mapping":
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if self.tp % self.ep:
            raise ValueError(f"tp ({self.tp}) must be a multiple of ep ({self.ep})")
        return self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank // self.moe_tp

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank % self.moe_tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def tp_group_ranks(self) -> list[int]:
        base = self.pp_rank * self.tp
        return list(range(base, base + self.tp))

    def pp_group_ranks(self) -> list[int]:
        return [s * self.tp + self.tp_rank for s in range(self.pp)]

    def ep_group_ranks(self) -> list[int]:
        """Global ranks of this rank's expert-parallel group, in moe_ep_rank order."""
        base = self.pp_rank * self.tp + self.moe_tp_rank
        return [base + e * self.moe_tp for e in range(self.ep)]

    def moe_tp_group_ranks(self) -> list[int]:
        """Global ranks that hold the other moe_tp slices of this rank's experts, in moe_tp_rank order."""
        base = self.pp_rank * self.tp + self.moe_ep_rank * self.moe_tp
        return list(range(base, base + self.moe_tp))

    def for_rank(self, rank: int) -> "Mapping":
        return Mapping(tp=self.tp, pp=self.pp, ep=self.ep, rank=rank)

    def layer_range(self, num_layers: int) -> range:
        """Balanced contiguous decoder layers of this pipeline stage (earlier stages take the extra)."""
        if num_layers < self.pp:
            raise ValueError(f"{num_layers} layers cannot be split over {self.pp} pipeline stages")
        base, extra = divmod(num_layers, self.pp)
        s = self.pp_rank
        start = s * base + min(s, extra)
        return range(start, start + base + (1 if s < extra else 0))

    def heads(self, num_heads: int) -> tuple[int, int]:
        """(first head, count) of this rank's query heads."""
        if num_heads % self.tp:
            raise ValueError(f"{num_heads} attention heads do not split over tp={self.tp}")
        n = num_heads // self.tp
        return self.tp_rank * n, n

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first head, count) of this rank's KV heads; replicated when tp exceeds their number."""
        if num_kv_heads >= self.tp:
            if num_kv_heads % self.tp:
                raise ValueError(f"{num_kv_heads} KV heads do not split over tp={self.tp}")
            n = num_kv_heads // self.tp
            return self.tp_rank * n, n
        if self.tp % num_kv_heads:
            raise ValueError(f"tp={self.tp} must be a multiple of the {num_kv_heads} KV heads")
        return self.tp_rank // (self.tp // num_kv_heads), 1

    def experts(self, num_experts: int) -> tuple[int, int]:
        """(first expert, count) held by this rank's expert-parallel slot."""
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts do not split over ep={self.ep}")
        n = num_experts // self.ep
        return self.moe_ep_rank * n, n
