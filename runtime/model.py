"""One decoder for Llama, Mistral, Qwen2, Qwen3 and their MoE variants (Mixtral, Qwen3-MoE).

The model works on a flattened batch of tokens (prefill chunks and decodes mixed) and reads
K/V through block tables; attention metadata is passed in, never read from module state. It
holds only its rank's partition: sizes come from the ``Mapping``, and the two row-parallel
projections (attention output, MLP down) end in an all-reduce across the tensor-parallel group.

Engine tensor names (what the builder writes; q/k/v and gate/up are fused):
``model.embed_tokens.weight``, ``model.layers.{i}.input_layernorm.weight``,
``model.layers.{i}.self_attn.qkv_proj.{weight,bias}``, ``...self_attn.{q,k}_norm.weight``,
``...self_attn.o_proj.weight``, ``...post_attention_layernorm.weight``,
``...mlp.gate_up_proj.weight``, ``...mlp.down_proj.weight`` (dense) or ``...mlp.gate.weight``,
``...mlp.experts.w13``, ``...mlp.experts.w2`` (MoE), ``model.norm.weight``, ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.attention import AttentionMetadata, paged_attention, rotary_write_kv
from kiln.kernels.gemv import linear
from kiln.kernels.moe import grouped_mm_usable, moe_forward, route
from kiln.kernels.norm import add_rms_norm, rms_norm
from kiln.kernels.rotary import cos_sin_cache
from kiln.parallel.expert_parallel import ep_moe_forward, ep_moe_forward_static
from kiln.parallel.mapping import Mapping
from kiln.runtime.config import LinearQuant, ModelConfig
from kiln.runtime.linear import Projection


@dataclass(frozen=True)
class LocalShape:
    """This rank's slice of the model's dimensions."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    moe_intermediate: int
    num_local_experts: int
    first_expert: int
    vocab_start: int
    vocab_local: int
    layers: range

    @classmethod
    def of(cls, cfg: ModelConfig, mapping: Mapping) -> "LocalShape":
        _, nh = mapping.heads(cfg.num_attention_heads)
        _, nkv = mapping.kv_heads(cfg.num_key_value_heads)
        if cfg.intermediate_size % mapping.tp:
            raise ValueError(f"intermediate_size {cfg.intermediate_size} does not split over tp={mapping.tp}")
        first_e, ne = mapping.experts(cfg.num_experts) if cfg.is_moe else (0, 0)
        moe_i = cfg.moe_intermediate_size // mapping.moe_tp if cfg.is_moe else 0
        vlocal = -(-cfg.vocab_size // mapping.tp)
        return cls(
            num_heads=nh,
            num_kv_heads=nkv,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size // mapping.tp,
            moe_intermediate=moe_i,
            num_local_experts=ne,
            first_expert=first_e,
            vocab_start=mapping.tp_rank * vlocal,
            vocab_local=vlocal,
            layers=mapping.layer_range(cfg.num_hidden_layers),
        )


def _param(*shape: int, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ls: LocalShape, dtype, device, quant: LinearQuant):
        super().__init__()
        d, h = ls.head_dim, cfg.hidden_size
        self.nh, self.nkv, self.d = ls.num_heads, ls.num_kv_heads, d
        self.q_size, self.kv_size = ls.num_heads * d, ls.num_kv_heads * d
        self.scale = d**-0.5
        self.eps = cfg.rms_norm_eps
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = Projection(self.q_size + 2 * self.kv_size, h, dtype=dtype, device=device, quant=quant,
                                   bias=cfg.attention_bias)
        self.o_proj = Projection(h, self.q_size, dtype=dtype, device=device, quant=quant)
        # An FP8 KV cache: the per-layer scales keys and values are stored with (see docs/quantization.md).
        self.k_scale = self.v_scale = None
        if quant.kv_fp8:
            self.k_scale = _param(1, dtype=torch.float32, device=device)
            self.v_scale = _param(1, dtype=torch.float32, device=device)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = nn.Module()
            self.q_norm.weight = _param(d, dtype=dtype, device=device)
            self.k_norm = nn.Module()
            self.k_norm.weight = _param(d, dtype=dtype, device=device)

    def forward(self, x, positions, kv, meta: AttentionMetadata, rope_cache, comm):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.nh, self.d)
        k = k.reshape(t, self.nkv, self.d)
        v = v.reshape(t, self.nkv, self.d)
        if self.qk_norm:
            q = rms_norm(q, self.q_norm.weight, self.eps)
            k = rms_norm(k, self.k_norm.weight, self.eps)
        k_cache, v_cache = kv
        if self.k_scale is None:
            q = rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, meta.slot_mapping)
            o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        else:
            ks, vs = self.k_scale, self.v_scale
            q = rotary_write_kv(q, k, v, positions, rope_cache, k_cache, v_cache, meta.slot_mapping, k_scale=ks, v_scale=vs)
            o = paged_attention(q, k_cache, v_cache, meta, self.scale, k_scale=ks, v_scale=vs)
        return comm.all_reduce(self.o_proj(o.reshape(t, self.q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ls: LocalShape, dtype, device, quant: LinearQuant):
        super().__init__()
        self.gate_up_proj = Projection(2 * ls.intermediate, cfg.hidden_size, dtype=dtype, device=device, quant=quant)
        self.down_proj = Projection(cfg.hidden_size, ls.intermediate, dtype=dtype, device=device, quant=quant)

    def forward(self, x, comm):
        return comm.all_reduce(self.down_proj(self.gate_up_proj.silu_mul(x)))


class MoE(nn.Module):
    """Top-k routed experts; this rank holds ``num_local_experts`` of them, each split moe_tp ways.

    With one expert-parallel rank (``ep == 1``) every rank runs the local experts' moe_tp slices on
    all tokens and the tensor-parallel all-reduce sums the slices. With ``ep > 1`` the tokens are
    dispatched to the ranks holding their experts and combined with all-to-all (see
    ``kiln.parallel.expert_parallel``). Eager steps size the all-to-alls exactly (their split sizes
    are read on the host); a step captured in a CUDA graph sends fixed-capacity buffers instead
    (``ep_moe_forward_static``), so decode graphs keep the all-to-all.
    """

    def __init__(self, cfg: ModelConfig, ls: LocalShape, dtype, device):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.first_expert = ls.first_expert
        self.ep = cfg.num_experts // ls.num_local_experts
        self.gate = nn.Module()
        self.gate.weight = _param(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device)
        self.experts = nn.Module()
        self.experts.w13 = _param(ls.num_local_experts, 2 * ls.moe_intermediate, cfg.hidden_size, dtype=dtype, device=device)
        self.experts.w2 = _param(ls.num_local_experts, cfg.hidden_size, ls.moe_intermediate, dtype=dtype, device=device)

    def forward(self, x, comm):
        router_logits = F.linear(x, self.gate.weight)
        if self.ep > 1:
            weights, ids = route(router_logits, self.top_k, self.renormalize)
            w13, w2 = self.experts.w13, self.experts.w2
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return ep_moe_forward_static(x, weights, ids, w13, w2, comm, grouped=grouped_mm_usable(x, w13, w2))
            return ep_moe_forward(x, weights, ids, w13, w2, comm)
        out = moe_forward(
            x, router_logits, self.experts.w13, self.experts.w2, self.top_k, self.renormalize, self.first_expert
        )
        return comm.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ls: LocalShape, dtype, device, quant: LinearQuant | None = None):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = _param(cfg.hidden_size, dtype=dtype, device=device)
        quant = quant or LinearQuant()
        self.self_attn = Attention(cfg, ls, dtype, device, quant)
        self.mlp = MoE(cfg, ls, dtype, device) if cfg.is_moe else MLP(cfg, ls, dtype, device, quant)

    def forward(self, h, residual, positions, kv, meta, rope_cache, comm):
        if residual is None:
            residual = h
            x = rms_norm(h, self.input_layernorm.weight, self.eps)
        else:
            x, residual = add_rms_norm(h, residual, self.input_layernorm.weight, self.eps)
        h = self.self_attn(x, positions, kv, meta, rope_cache, comm)
        x, residual = add_rms_norm(h, residual, self.post_attention_layernorm.weight, self.eps)
        return self.mlp(x, comm), residual


class LocalComm:
    """Collectives of a one-rank group: every operation is the identity."""

    world_size = 1
    ep_size = 1
    ep_rank = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_to_all(self, x: torch.Tensor, output_split_sizes: list[int] | None = None,
                   input_split_sizes: list[int] | None = None) -> torch.Tensor:
        return x

    def ep_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def moe_tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DecoderModel(nn.Module):
    """This rank's part of the decoder: embeddings on the first stage, the LM head on the last."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping | None = None, dtype=torch.float32, device="cpu", comm=None,
                 quant: LinearQuant | None = None):
        super().__init__()
        self.cfg = cfg
        self.quant = quant or LinearQuant()
        self.mapping = mapping or Mapping()
        self.ls = LocalShape.of(cfg, self.mapping)
        self.comm = comm or LocalComm()
        self.dtype = dtype
        self.eps = cfg.rms_norm_eps
        self.model = nn.Module()
        m = self.model
        if self.mapping.is_first_stage:
            m.embed_tokens = nn.Module()
            m.embed_tokens.weight = _param(self.ls.vocab_local, cfg.hidden_size, dtype=dtype, device=device)
        m.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, self.ls, dtype, device, self.quant) for i in self.ls.layers})
        if self.mapping.is_last_stage:
            m.norm = nn.Module()
            m.norm.weight = _param(cfg.hidden_size, dtype=dtype, device=device)
            self.lm_head = nn.Module()
            if cfg.tie_word_embeddings and self.mapping.is_first_stage:
                self.lm_head.weight = m.embed_tokens.weight
            else:
                self.lm_head.weight = _param(self.ls.vocab_local, cfg.hidden_size, dtype=dtype, device=device)
        self.register_buffer(
            "rope_cache",
            cos_sin_cache(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device=device),
            persistent=False,
        )

    def tune_linears(self, m_values=(1, 2)) -> list[dict]:
        """On a GPU, picks the fastest kernel (Triton GEMV or cuBLAS) for each projection's shape at
        the decode batch sizes ``m_values``, and for the MLP's gate/up projection the fused
        ``silu(gate) * up`` GEMV against the product plus the activation kernel
        (``kiln.kernels.gemv``); KILN_GEMV=0 skips it."""
        from kiln.kernels import gemv, triton_ops

        dev = next(self.parameters()).device
        if dev.type != "cuda" or not triton_ops.available() or not gemv._enabled():
            return []
        names = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight", "lm_head.weight")
        plain = [(n, p) for n, p in self.named_parameters() if p.dtype == self.dtype]  # quantized weights tune apart
        shapes = sorted({tuple(p.shape) for n, p in plain if p.dim() == 2 and n.endswith(names)})
        dt = str(self.dtype).removeprefix("torch.")
        glu_shapes = sorted({tuple(p.shape) for n, p in plain if n.endswith("gate_up_proj.weight")})
        rows = []
        for glu, group in ((False, shapes), (True, glu_shapes)):
            op = "glu" if glu else "linear"
            done = {tuple(r["shape"]) for r in gemv.tuned_table() if r.get("dtype") == dt and r.get("op", "linear") == op}
            todo = [s for s in group if any((m, *s) not in done for m in m_values)]
            if todo:
                rows += gemv.tune(todo, dtype=self.dtype, device=dev, m_values=m_values, glu=glu)
        torch.cuda.empty_cache()
        return rows

    def prepare_quantized(self, tune_m=(1, 2, 4, 64, 256), warm_m=(1, 2, 3, 4, 5, 8, 16, 64, 256)) -> list[dict]:
        """On a GPU, chooses (by timing, at the row counts ``tune_m``) and compiles (at ``warm_m``)
        the kernels of the quantized projections for each of their shapes
        (``kiln.kernels.quant_triton``): nothing compiles on a request's path."""
        dev = next(self.parameters()).device
        q = self.quant
        if q.method == "none" or dev.type != "cuda":
            return []
        from kiln.kernels import quant_triton

        op = {"fp8": "fp8-static" if q.static_activations else "fp8", "int8-weight": "int8", "int4": "int4"}[q.method]
        specs = set()
        for name, p in self.named_modules():
            if isinstance(p, Projection):
                glu = name.endswith("gate_up_proj")
                specs.add((f"{op}-glu" if glu else op, p.out_features, p.in_features) + ((q.group_size,) if op == "int4" else ()))
        specs = sorted(specs)
        dt = str(self.dtype).removeprefix("torch.")
        done = {(r["op"], *r["shape"]) for r in quant_triton.tuned_table() if r["dtype"] == dt}
        todo = [s for s in specs if any((s[0], m, s[1], s[2]) not in done for m in tune_m)]  # not restored
        rows = quant_triton.tune(todo, self.dtype, dev, m_values=tune_m) if todo else []
        quant_triton.warmup(specs, self.dtype, dev, m_values=warm_m, bias="both" if self.cfg.attention_bias else False)
        torch.cuda.empty_cache()
        return rows

    def engine_state_names(self) -> set[str]:
        """The tensor names this rank's weights file must hold (a tied LM head is stored once)."""
        return {n for n, _ in self.named_parameters()}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        for name in params:
            if name not in tensors:
                raise KeyError(f"weights file lacks tensor '{name}'")
        for name, p in params.items():
            self.load_weight(name, tensors[name], p)

    def load_weight(self, name: str, src: torch.Tensor, param: torch.Tensor | None = None) -> None:
        """Copies one tensor in (loading tensor by tensor keeps the peak at the model plus one tensor)."""
        p = param if param is not None else self.get_parameter(name)
        if tuple(src.shape) != tuple(p.shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
        p.data.copy_(src)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens.weight
        if self.mapping.tp == 1:
            return F.embedding(input_ids, w)
        local = input_ids - self.ls.vocab_start
        inside = (local >= 0) & (local < w.shape[0])
        e = F.embedding(local.clamp(0, w.shape[0] - 1), w) * inside.unsqueeze(-1).to(w.dtype)
        return self.comm.all_reduce(e)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs this stage's layers. The first stage embeds ``input_ids``; later stages continue
        from ``hidden``/``residual``. The last stage returns the final-normed hidden states."""
        h = self.embed(input_ids) if self.mapping.is_first_stage else hidden
        for j, layer in enumerate(self.model.layers.values()):
            h, residual = layer(h, residual, positions, kv_caches[j], meta, self.rope_cache, self.comm)
        if self.mapping.is_last_stage:
            h, _ = add_rms_norm(h, residual, self.model.norm.weight, self.eps)
            residual = None
        return h, residual

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens [N] without gathering the vocabulary: each tensor-parallel rank
        finds the best token of its vocabulary slice, and only (value, index) pairs are gathered."""
        local = linear(hidden, self.lm_head.weight).float()
        first = self.ls.vocab_start
        valid = self.cfg.vocab_size - first
        if valid < local.shape[-1]:
            local[:, max(valid, 0):] = float("-inf")  # padding rows of the last slice
        val, idx = local.max(dim=-1)
        if self.mapping.tp == 1:
            return idx
        vals = self.comm.all_gather_last(val.unsqueeze(-1))          # [N, tp]
        ids = self.comm.all_gather_last((idx + first).unsqueeze(-1))  # [N, tp]
        best = vals.argmax(dim=-1, keepdim=True)                       # ties: the lowest rank, the lowest id
        return ids.gather(-1, best).squeeze(-1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given final hidden states (gathered across tp)."""
        logits = linear(hidden, self.lm_head.weight).float()
        if self.mapping.tp > 1:
            logits = self.comm.all_gather_last(logits)
        return logits[..., : self.cfg.vocab_size]
