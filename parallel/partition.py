"""Partition specs: how each engine tensor of one rank is cut from the checkpoint's tensors.

The checkpoint speaks Hugging Face names (separate q/k/v, gate/up, one tensor per expert); the
engine stores fused tensors (see ``kiln.runtime.model``). ``rank_slice`` produces one engine
tensor for one rank from a ``fetch(name)`` callable that reads a checkpoint tensor.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from kiln.parallel.mapping import Mapping
from kiln.runtime.config import ModelConfig

Fetch = Callable[[str], torch.Tensor]


class ReadOnce:
    """A ``Fetch`` over ``get`` that reads each checkpoint tensor once until ``clear()``: a fused
    engine tensor (qkv, gate/up) reads several, and every rank's slice reads the same ones."""

    def __init__(self, get: Fetch):
        self._get = get
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._get(name)
        return self._cache[name]

    def clear(self) -> None:
        self._cache.clear()

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return t.narrow(0, start, count)


def _cols(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return t.narrow(-1, start, count)


def _vocab_rows(t: torch.Tensor, cfg: ModelConfig, m: Mapping) -> torch.Tensor:
    local = -(-cfg.vocab_size // m.tp)
    start = m.tp_rank * local
    part = t[start : start + local]
    if part.shape[0] < local:
        pad = torch.zeros(local - part.shape[0], *t.shape[1:], dtype=t.dtype)
        part = torch.cat([part, pad])
    return part


def _qkv(fetch: Fetch, prefix: str, suffix: str, cfg: ModelConfig, m: Mapping) -> torch.Tensor:
    d = cfg.head_dim
    h0, nh = m.heads(cfg.num_attention_heads)
    k0, nk = m.kv_heads(cfg.num_key_value_heads)
    q = _rows(fetch(f"{prefix}.q_proj.{suffix}"), h0 * d, nh * d)
    k = _rows(fetch(f"{prefix}.k_proj.{suffix}"), k0 * d, nk * d)
    v = _rows(fetch(f"{prefix}.v_proj.{suffix}"), k0 * d, nk * d)
    return torch.cat([q, k, v])


def _gate_up(gate: torch.Tensor, up: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    n = gate.shape[0] // parts
    return torch.cat([_rows(gate, index * n, n), _rows(up, index * n, n)])


def rank_slice(name: str, fetch: Fetch, cfg: ModelConfig, m: Mapping) -> torch.Tensor:
    """The engine tensor ``name`` as rank ``m.rank`` holds it."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        src = "model.embed_tokens.weight" if (name == "lm_head.weight" and cfg.tie_word_embeddings) else name
        return _vocab_rows(fetch(src), cfg, m)
    if name == "model.norm.weight":
        return fetch(name)
    mt = _LAYER.match(name)
    if mt is None:
        raise KeyError(f"no partition rule for tensor '{name}'")
    prefix, rest = f"model.layers.{mt.group(1)}", mt.group(2)
    if rest in ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias"):
        return _qkv(fetch, f"{prefix}.self_attn", rest.rsplit(".", 1)[1], cfg, m)
    if rest == "self_attn.o_proj.weight":
        h0, nh = m.heads(cfg.num_attention_heads)
        return _cols(fetch(f"{prefix}.{rest}"), h0 * cfg.head_dim, nh * cfg.head_dim)
    if rest == "mlp.gate_up_proj.weight":
        gate, up = fetch(f"{prefix}.mlp.gate_proj.weight"), fetch(f"{prefix}.mlp.up_proj.weight")
        return _gate_up(gate, up, m.tp, m.tp_rank)
    if rest == "mlp.down_proj.weight":
        n = cfg.intermediate_size // m.tp
        return _cols(fetch(f"{prefix}.{rest}"), m.tp_rank * n, n)
    if rest == "mlp.experts.w13":
        e0, ne = m.experts(cfg.num_experts)
        return torch.stack(
            [
                _gate_up(
                    fetch(f"{prefix}.mlp.experts.{e}.gate_proj.weight"),
                    fetch(f"{prefix}.mlp.experts.{e}.up_proj.weight"),
                    m.moe_tp,
                    m.moe_tp_rank,
                )
                for e in range(e0, e0 + ne)
            ]
        )
    if rest == "mlp.experts.w2":
        e0, ne = m.experts(cfg.num_experts)
        n = cfg.moe_intermediate_size // m.moe_tp
        return torch.stack(
            [_cols(fetch(f"{prefix}.mlp.experts.{e}.down_proj.weight"), m.moe_tp_rank * n, n) for e in range(e0, e0 + ne)]
        )
    # Replicated: norms, qk norms, the router.
    return fetch(name)
