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


_PROJ = re.compile(r"^(self_attn\.qkv_proj|self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)\.(\w+)$")
_PACKED_K = {"qweight": 2}  # input columns per stored column: two int4 values a byte
_GROUPED_K = ("scales", "qzeros")
_PER_INPUT = ("input_scale", "input_perm")


def _fused_rows(parts: list[torch.Tensor], part: str) -> torch.Tensor:
    """Column-parallel pieces (q/k/v, gate/up) side by side: rows are concatenated, a static
    activation scale is the largest of the pieces' (one input feeds them all), and an input
    permutation is shared (it must be the same for all)."""
    if part == "input_scale":
        return torch.stack(parts).amax(dim=0)
    if part == "input_perm":
        if any(not torch.equal(p, parts[0]) for p in parts[1:]):
            raise ValueError("fused projections have different input permutations (act-order g_idx): not supported")
        return parts[0]
    return torch.cat(parts)


def _row_part(t: torch.Tensor, part: str, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of an output-channel-indexed tensor; per-input tensors whole."""
    return t if part in _PER_INPUT else _rows(t, start, count)


def _k_part(t: torch.Tensor, part: str, start: int, count: int, k: int) -> torch.Tensor:
    """The input columns [start, start + count) of a row-parallel projection's tensor ``part``
    whose full input width is ``k``: packed and grouped tensors are cut in whole bytes and
    groups; per-output-channel scales and per-tensor input scales are replicated."""
    if part in ("weight_scale", "input_scale", "bias"):
        return t
    if part == "input_perm":
        if start or count != k:
            raise ValueError("an input permutation (act-order g_idx) cannot be split across tensor-parallel ranks")
        return t
    if part in _PACKED_K:
        per = _PACKED_K[part]
        return _cols(t, start // per, count // per)
    if part in _GROUPED_K:
        g = k // t.shape[-1]
        if start % g or count % g:
            raise ValueError(f"the input width {count} per rank is not a whole number of quantization groups of {g}")
        return _cols(t, start // g, count // g)
    return _cols(t, start, count)


def _qkv(fetch: Fetch, prefix: str, part: str, cfg: ModelConfig, m: Mapping) -> torch.Tensor:
    d = cfg.head_dim
    h0, nh = m.heads(cfg.num_attention_heads)
    k0, nk = m.kv_heads(cfg.num_key_value_heads)
    q = _row_part(fetch(f"{prefix}.q_proj.{part}"), part, h0 * d, nh * d)
    k = _row_part(fetch(f"{prefix}.k_proj.{part}"), part, k0 * d, nk * d)
    v = _row_part(fetch(f"{prefix}.v_proj.{part}"), part, k0 * d, nk * d)
    return _fused_rows([q, k, v], part)


def _gate_up(gate: torch.Tensor, up: torch.Tensor, parts: int, index: int, part: str = "weight") -> torch.Tensor:
    if part in _PER_INPUT:
        return _fused_rows([gate, up], part)
    n = gate.shape[0] // parts
    return torch.cat([_rows(gate, index * n, n), _rows(up, index * n, n)])


def _projection(rest: str, prefix: str, fetch: Fetch, cfg: ModelConfig, m: Mapping) -> torch.Tensor | None:
    """A dense layer's projection tensor (16-bit or any quantized part), or None for other names."""
    mt = _PROJ.match(rest)
    if mt is None:
        return None
    proj, part = mt.groups()
    if proj == "self_attn.qkv_proj":
        return _qkv(fetch, f"{prefix}.self_attn", part, cfg, m)
    if proj == "mlp.gate_up_proj":
        gate, up = fetch(f"{prefix}.mlp.gate_proj.{part}"), fetch(f"{prefix}.mlp.up_proj.{part}")
        return _gate_up(gate, up, m.tp, m.tp_rank, part)
    if proj == "self_attn.o_proj":
        h0, nh = m.heads(cfg.num_attention_heads)
        d = cfg.head_dim
        return _k_part(fetch(f"{prefix}.{rest}"), part, h0 * d, nh * d, cfg.num_attention_heads * d)
    n = cfg.intermediate_size // m.tp
    return _k_part(fetch(f"{prefix}.{rest}"), part, m.tp_rank * n, n, cfg.intermediate_size)


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
    proj = _projection(rest, prefix, fetch, cfg, m)
    if proj is not None:
        return proj
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
