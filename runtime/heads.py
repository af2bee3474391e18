"""Proposers that read the target's own hidden states: Medusa heads and an EAGLE draft layer.

Both take, from each step's forward pass, the target's final hidden states (after the final norm,
the rows its LM head reads; ``ModelRunner.hidden_mode``), and propose a chain of ``k`` tokens by
argmax. Proposals are deterministic, so ``speculative.verify`` checks them as it checks n-gram
proposals (a one-hot proposal distribution: greedy rows keep the target's tokens, sampled rows
keep the target's distribution).

**Medusa** (the FasterDecoding/Medusa layout). A directory with ``config.json``
(``medusa_num_heads``, ``medusa_num_layers``) and ``medusa_lm_head.safetensors`` or
``medusa_lm_head.pt``, tensors ``{i}.{j}.linear.weight`` / ``.bias`` (ResBlock j of head i,
``x + silu(W x + b)``) and ``{i}.{medusa_num_layers}.weight`` (head i's LM head, no bias). With
``h`` the target's hidden state at position p (whose logits gave the token at p + 1), head i
proposes the token at p + 2 + i: the first ``k`` heads give the ``k`` proposals.

**EAGLE** (the SafeAILab/EAGLE layout of EAGLE-1 and -2). A directory with a llama ``config.json``
(one hidden layer; ``bias`` for ``fc``'s bias, true when absent; ``qkv_bias``) and
``pytorch_model.bin`` or ``model.safetensors``: ``fc.weight`` [hidden, 2 * hidden] (``fc.bias``),
one decoder layer ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.post_attention_layernorm.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight`` (layer 0
has no input norm), and optionally ``embed_tokens.weight`` (a copy of the target's; the target's
own table is used). The draft's row at position j reads ``fc(concat(embed(token j + 1), f_j))``,
``f_j`` the target's hidden state at j, runs the layer (attending to the draft's earlier rows
through its own paged KV cache) and the target's LM head reads its output: the token at j + 2.
Further proposals feed the draft's own output back as ``f``. The features of every position whose
KV stands in the target reach the draft at its next proposal (a catch-up pass over all
sequences); rows of proposals that fell are overwritten there. Positions the target served from
its prefix cache produce no features: the draft starts at the first position it was given.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from kiln.kernels.attention import AttentionMetadata, step_layout
from kiln.kernels.norm import add_rms_norm
from kiln.kernels.rotary import cos_sin_cache
from kiln.runtime.transfer import h2d

MEDUSA_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
EAGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class HeadsError(ValueError):
    """Heads that cannot serve this target; the message is one line naming the problem."""


def _read_config(folder: str, what: str) -> dict:
    if not os.path.isdir(folder):
        raise HeadsError(f"{what} directory '{folder}' does not exist")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise HeadsError(f"{what} directory '{folder}' has no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HeadsError(f"{what} config '{path}' is not readable JSON: {e}") from None


def _read_tensors(folder: str, names: tuple[str, ...], what: str) -> tuple[str, dict[str, torch.Tensor]]:
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return name, load_file(path, device="cpu")
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any reader failure is an unusable file
            raise HeadsError(f"{what} file '{path}' is not readable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if not isinstance(sd, dict):
            raise HeadsError(f"{what} file '{path}' does not hold a state dict")
        return name, sd
    raise HeadsError(f"{what} directory '{folder}' has none of {', '.join(names)}")


def _take(sd: dict, name: str, shape: tuple[int, ...], file: str, what: str) -> torch.Tensor:
    t = sd.get(name)
    if t is None:
        raise HeadsError(f"{what} file '{file}' lacks tensor '{name}'")
    if tuple(t.shape) != shape:
        raise HeadsError(f"{what} tensor '{name}' has shape {tuple(t.shape)}, the target needs {shape}")
    return t


def _positive_int(cfg: dict, key: str, folder: str, what: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise HeadsError(f"{what} config in '{folder}' needs {key} (a positive integer), got {v!r}")
    return v


def check_heads_dir(method: str, folder: str) -> None:
    """The cheap part of loading, for a command line: the directory, its config and a weights file."""
    what = f"{method} heads"
    _read_config(folder, what)
    names = MEDUSA_FILES if method == "medusa" else EAGLE_FILES
    if not any(os.path.isfile(os.path.join(folder, n)) for n in names):
        raise HeadsError(f"{what} directory '{folder}' has none of {', '.join(names)}")


# --- Medusa -----------------------------------------------------------------------------------------
class MedusaHeads(nn.Module):
    """The heads' weights in the target's dtype on its device."""

    def __init__(self, folder: str, hidden: int, vocab: int, dtype, device, k: int):
        super().__init__()
        what = "medusa heads"
        cfg = _read_config(folder, what)
        self.num_heads = _positive_int(cfg, "medusa_num_heads", folder, what)
        nl = cfg.get("medusa_num_layers", 1)
        if not isinstance(nl, int) or isinstance(nl, bool) or nl < 0:
            raise HeadsError(f"{what} config in '{folder}' has medusa_num_layers {nl!r}: a count of ResBlocks is needed")
        self.num_layers = nl
        if k > self.num_heads:
            raise HeadsError(f"num_speculative_tokens {k} exceeds the {self.num_heads} Medusa heads in '{folder}': "
                             f"use at most {self.num_heads}")
        file, sd = _read_tensors(folder, MEDUSA_FILES, what)
        sd = {n.removeprefix("medusa_head."): t for n, t in sd.items()}
        file = os.path.join(folder, file)
        lm = sd.get(f"0.{nl}.weight")
        if lm is not None and lm.dim() == 2 and lm.shape[1] != hidden:
            raise HeadsError(f"{what} in '{folder}' read hidden states of size {lm.shape[1]} but the target's are {hidden}")
        if lm is not None and lm.dim() == 2 and lm.shape[0] != vocab:
            raise HeadsError(f"{what} in '{folder}' have a vocabulary of {lm.shape[0]} tokens but the target's has {vocab}")
        self.res_w, self.res_b, self.lm = [], [], []
        self.head_count = min(k, self.num_heads)  # only the heads that propose are loaded
        for i in range(self.head_count):
            ws, bs = [], []
            for j in range(nl):
                ws.append(_take(sd, f"{i}.{j}.linear.weight", (hidden, hidden), file, what).to(device, dtype))
                bs.append(_take(sd, f"{i}.{j}.linear.bias", (hidden,), file, what).to(device, dtype))
            self.res_w.append(ws)
            self.res_b.append(bs)
            self.lm.append(_take(sd, f"{i}.{nl}.weight", (vocab, hidden), file, what).to(device, dtype))

    def head_logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Head i's float32 logits [N, vocab] of hidden states h [N, hidden]."""
        x = h
        for w, b in zip(self.res_w[i], self.res_b[i]):
            x = x + F.silu(F.linear(x, w, b))
        return F.linear(x, self.lm[i]).float()


class MedusaProposer:
    """Keeps each sequence's newest target hidden state (the one whose logits gave its last
    token); ``propose`` runs the first k heads over all sequences at once."""

    hidden_mode = "last"

    def __init__(self, folder: str, model, k: int):
        cfg = model.cfg
        self.device = next(model.parameters()).device
        self.heads = MedusaHeads(folder, cfg.hidden_size, cfg.vocab_size, model.dtype, self.device, k)
        self.last: dict[int, tuple[int, torch.Tensor]] = {}  # seq id -> (position, hidden [hidden])
        self.num_forwards = 0

    def observe(self, feats: dict[int, tuple[int, torch.Tensor]]) -> None:
        for sid, (start, rows) in feats.items():
            self.last[sid] = (start + rows.shape[0] - 1, rows[-1])

    def release(self, seq_id: int) -> None:
        self.last.pop(seq_id, None)

    def retain(self, seq_ids: set[int]) -> None:
        for sid in [s for s in self.last if s not in seq_ids]:
            self.release(sid)

    @torch.inference_mode()
    def propose(self, reqs: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """``(seq id, tokens, k)`` -> at most k proposals each: the tokens after the last one."""
        live = []
        for sid, toks, k in reqs:
            got = self.last.get(sid)
            if k > 0 and got is not None and got[0] == len(toks) - 2:
                live.append((sid, k, got[1]))
        if not live:
            return {}
        h = torch.stack([x[2] for x in live])
        kmax = max(x[1] for x in live)
        toks = torch.stack([self.heads.head_logits(i, h).argmax(dim=-1) for i in range(kmax)], dim=1).tolist()
        self.num_forwards += 1
        return {sid: row[:k] for (sid, k, _), row in zip(live, toks)}

    def stats(self) -> dict:
        return {}


# --- EAGLE ------------------------------------------------------------------------------------------
class _Blocks:
    """Fixed-size blocks of the draft's KV cache, handed out per sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def ensure(self, sid: int, entries: int) -> bool:
        """Room for ``entries`` rows; False (nothing taken) when the cache is short."""
        tbl = self.tables.setdefault(sid, [])
        need = -(-entries // self.block_size) - len(tbl)
        if need > len(self.free):
            return False
        for _ in range(max(0, need)):
            tbl.append(self.free.pop())
        return True

    def release(self, sid: int) -> None:
        self.free.extend(reversed(self.tables.pop(sid, [])))

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)


class EagleLayer(nn.Module):
    """``fc`` and the one decoder layer, in kiln's layout (q/k/v and gate/up fused)."""

    def __init__(self, folder: str, target_cfg, max_positions: int, dtype, device):
        super().__init__()
        from kiln.parallel.mapping import Mapping
        from kiln.runtime.checkpoint import CheckpointError, model_config_from_hf
        from kiln.runtime.config import LinearQuant
        from kiln.runtime.model import MLP, Attention, LocalShape

        what = "eagle heads"
        raw = _read_config(folder, what)
        if raw.get("model_type", "llama") != "llama":
            raise HeadsError(f"{what} config in '{folder}' has model_type {raw.get('model_type')!r}: kiln reads llama EAGLE layers")
        raw = dict(raw, model_type="llama", attention_bias=bool(raw.get("qkv_bias", raw.get("attention_bias", False))))
        try:
            cfg = model_config_from_hf(raw)
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            raise HeadsError(f"{what} config in '{folder}': {e}") from None
        H = target_cfg.hidden_size
        if cfg.hidden_size != H:
            raise HeadsError(f"{what} in '{folder}' have hidden size {cfg.hidden_size} but the target's is {H}")
        if cfg.vocab_size != target_cfg.vocab_size:
            raise HeadsError(f"{what} in '{folder}' have a vocabulary of {cfg.vocab_size} tokens but the target's has "
                             f"{target_cfg.vocab_size}")
        if cfg.num_hidden_layers != 1:
            raise HeadsError(f"{what} in '{folder}' have {cfg.num_hidden_layers} layers: kiln runs EAGLE layouts of one layer")
        self.cfg = cfg
        ls = LocalShape.of(cfg, Mapping())
        self.num_kv_heads, self.head_dim = ls.num_kv_heads, ls.head_dim
        file, sd = _read_tensors(folder, EAGLE_FILES, what)
        file = os.path.join(folder, file)
        take = lambda n, s: _take(sd, n, s, file, what).to(device, dtype)  # noqa: E731
        emb = sd.get("embed_tokens.weight")
        if emb is not None and tuple(emb.shape) != (target_cfg.vocab_size, H):
            raise HeadsError(f"{what} tensor 'embed_tokens.weight' has shape {tuple(emb.shape)}, the target's table is "
                             f"{(target_cfg.vocab_size, H)}")
        self.fc_w = take("fc.weight", (H, 2 * H))
        self.fc_b = take("fc.bias", (H,)) if raw.get("bias", True) else None
        q, kv, inter = ls.num_heads * ls.head_dim, ls.num_kv_heads * ls.head_dim, cfg.intermediate_size
        p = "layers.0."
        self.attn = Attention(cfg, ls, dtype, device, LinearQuant())
        self.attn.qkv_proj.weight.data.copy_(torch.cat([take(p + "self_attn.q_proj.weight", (q, H)),
                                                        take(p + "self_attn.k_proj.weight", (kv, H)),
                                                        take(p + "self_attn.v_proj.weight", (kv, H))]))
        if cfg.attention_bias:
            self.attn.qkv_proj.bias.data.copy_(torch.cat([take(p + "self_attn.q_proj.bias", (q,)),
                                                          take(p + "self_attn.k_proj.bias", (kv,)),
                                                          take(p + "self_attn.v_proj.bias", (kv,))]))
        self.attn.o_proj.weight.data.copy_(take(p + "self_attn.o_proj.weight", (H, q)))
        self.post_norm = take(p + "post_attention_layernorm.weight", (H,))
        self.mlp = MLP(cfg, ls, dtype, device, LinearQuant())
        self.mlp.gate_up_proj.weight.data.copy_(torch.cat([take(p + "mlp.gate_proj.weight", (inter, H)),
                                                           take(p + "mlp.up_proj.weight", (inter, H))]))
        self.mlp.down_proj.weight.data.copy_(take(p + "mlp.down_proj.weight", (H, inter)))
        self.register_buffer("rope_cache", cos_sin_cache(cfg.head_dim, max(max_positions, cfg.max_position_embeddings),
                                                         cfg.rope_theta, cfg.rope_scaling, device=device), persistent=False)

    def forward(self, emb, feat, positions, kv, meta):
        from kiln.runtime.model import LocalComm

        comm = LocalComm()
        x = F.linear(torch.cat([emb, feat.to(emb.dtype)], dim=-1), self.fc_w, self.fc_b)
        a = self.attn(x, positions, kv, meta, self.rope_cache, comm)
        y, s = add_rms_norm(a, x, self.post_norm, self.cfg.rms_norm_eps)
        return self.mlp(y, comm) + s


class _EagleSeq:
    def __init__(self, origin: int):
        self.origin = origin   # the position of the draft's first row
        self.verified = 0      # rows (from origin on) built from the target's own features
        self.pending: list[tuple[int, torch.Tensor]] = []  # target features not run yet: (first position, rows)


class EagleProposer:
    """The EAGLE draft layer with a paged KV cache of its own (one layer) on the target's device;
    the target's embedding table and LM head (a one-rank target)."""

    hidden_mode = "all"

    def __init__(self, folder: str, model, k: int, *, num_tokens: int, max_num_tokens: int, max_batch_size: int,
                 block_size: int, max_seq_len: int):
        from kiln.runtime.kv_cache import KVCache, memory_block_capacity

        self.model = model
        self.device = next(model.parameters()).device
        self.layer = EagleLayer(folder, model.cfg, max_seq_len + k + 1, model.dtype, self.device)
        self.max_num_tokens = max_num_tokens
        want = -(-num_tokens // block_size) + max_batch_size
        cap = memory_block_capacity(1, self.layer.num_kv_heads, self.layer.head_dim, block_size, model.dtype, self.device,
                                    utilization=1.0)
        if self.device.type == "cuda":
            cap = int(cap * 0.9)
        nb = min(want, cap)
        if nb * block_size < max_seq_len:
            raise HeadsError(f"the EAGLE layer's KV cache fits {nb} blocks of {block_size} tokens, less than one sequence: "
                             "free memory (KILN_GPU_MEMORY_UTILIZATION lower) or shorten --max-seq-len")
        self.kv = KVCache(1, nb, block_size, self.layer.num_kv_heads, self.layer.head_dim, model.dtype, self.device)
        self.blocks = _Blocks(nb, block_size)
        self.seqs: dict[int, _EagleSeq] = {}
        self.num_forwards = 0
        self.num_unfit = 0

    # --- per-sequence state ----------------------------------------------------------------------------
    def observe(self, feats: dict[int, tuple[int, torch.Tensor]]) -> None:
        for sid, (start, rows) in feats.items():
            st = self.seqs.get(sid)
            if st is None:
                st = self.seqs[sid] = _EagleSeq(start)
            st.pending.append((start, rows))

    def release(self, seq_id: int) -> None:
        if self.seqs.pop(seq_id, None) is not None:
            self.blocks.release(seq_id)

    def retain(self, seq_ids: set[int]) -> None:
        for sid in [s for s in self.seqs if s not in seq_ids]:
            self.release(sid)

    def _catch_up_rows(self, sid: int, toks: list[int]):
        """The rows this sequence runs now (first position, features, their tokens), its state set
        to take them; None when its features do not reach its newest token or the cache is short."""
        st = self.seqs.get(sid)
        if st is None or not st.pending:
            return None
        last = len(toks) - 2  # the position whose logits gave the newest token
        # the newest features win where steps overlap (a preempted sequence recomputed)
        start, rows = st.pending[-1]
        parts = [rows]
        for s, r in reversed(st.pending[:-1]):
            if s + r.shape[0] != start:
                break
            parts.insert(0, r)
            start = s
        st.pending = []
        end = start + sum(r.shape[0] for r in parts) - 1
        if end != last:
            self.release(sid)
            return None
        if start != st.origin + st.verified:
            if start < st.origin or start > st.origin + st.verified:  # a gap or a restart: begin again here
                self.blocks.release(sid)
                st.origin, st.verified = start, 0
            else:  # rows the draft holds already (a recomputed position): rebuild from there
                st.verified = start - st.origin
        feat = parts[0] if len(parts) == 1 else torch.cat(parts)
        return start, feat, toks[start + 1 : last + 2]

    # --- forward passes ----------------------------------------------------------------------------------
    def _run(self, rows: list[tuple[int, int, torch.Tensor, list[int]]]) -> torch.Tensor:
        """Runs each ``(seq id, first position, features [n, hidden], tokens [n])`` through the draft
        (KV at its rows from the sequence's origin on), in passes of at most ``max_num_tokens`` rows;
        the output at each entry's last row [len(rows), hidden]."""
        bs = self.blocks.block_size
        last: list[torch.Tensor | None] = [None] * len(rows)
        todo = [(i, sid, start, f, t) for i, (sid, start, f, t) in enumerate(rows)]
        while todo:
            ids, pos, slots, qlens, slens, tables, feats, ends, rest = [], [], [], [], [], [], [], [], []
            for i, sid, start, f, t in todo:
                room = self.max_num_tokens - len(ids)
                if room <= 0:
                    rest.append((i, sid, start, f, t))
                    continue
                n = min(room, len(t))
                st = self.seqs[sid]
                tbl = self.blocks.tables[sid]
                e0 = start - st.origin
                ids.extend(t[:n])
                pos.extend(range(start, start + n))
                slots.extend(tbl[e // bs] * bs + e % bs for e in range(e0, e0 + n))
                qlens.append(n)
                slens.append(e0 + n)
                tables.append(tbl)
                feats.append(f[:n])
                if n == len(t):
                    ends.append((i, len(ids) - 1))
                else:
                    rest.append((i, sid, start + n, f[n:], t[n:]))
            out = self._forward(ids, pos, slots, qlens, slens, tables, torch.cat(feats))
            self.num_forwards += 1
            for i, r in ends:
                last[i] = out[r]
            todo = rest
        return torch.stack(last)

    def _forward(self, ids, pos, slots, qlens, slens, tables, feats) -> torch.Tensor:
        dev = self.device
        bt, qsl = step_layout(qlens, tables)
        meta = AttentionMetadata(
            query_start_loc=h2d(qsl, torch.int32, dev), seq_lens=h2d(slens, torch.int32, dev),
            block_tables=h2d(bt, torch.int32, dev), slot_mapping=h2d(slots, torch.long, dev),
            query_lens_cpu=qlens, seq_lens_cpu=slens, max_query_len=max(qlens), max_seq_len=max(slens),
            sliding_window=self.layer.cfg.sliding_window,
        )
        emb = self.model.embed(h2d(ids, torch.long, dev))
        return self.layer(emb, feats, h2d(pos, torch.long, dev), self.kv.layers[0], meta)

    # --- proposals -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        """``(seq id, tokens, k)`` -> at most k proposals each. Sequences with k = 0 still take in
        their new features (the draft's KV stays current)."""
        rows, ks = [], []
        for sid, toks, k in reqs:
            got = self._catch_up_rows(sid, toks)
            if got is None:
                continue
            start, feat, t = got
            st = self.seqs[sid]
            # the catch-up rows and k - 1 further rows of proposals
            if not self.blocks.ensure(sid, start - st.origin + len(t) + max(0, k - 1)):
                self.num_unfit += 1
                self.release(sid)
                continue
            st.verified = start - st.origin + len(t)
            rows.append((sid, start, feat, t))
            ks.append(k)
        if not rows:
            return {}
        out = self._run(rows)
        live = [(r[0], r[1] + len(r[3]), k) for r, k in zip(rows, ks) if k > 0]  # (sid, next position, k)
        out = out[[j for j, k in enumerate(ks) if k > 0]]
        drafts: dict[int, list[int]] = {sid: [] for sid, _, _ in live}
        step = 0
        while live:
            toks = self.model.compute_logits(out).argmax(dim=-1).tolist()
            nxt, keep = [], []
            for j, ((sid, p, k), t) in enumerate(zip(live, toks)):
                drafts[sid].append(t)
                if len(drafts[sid]) < k:
                    nxt.append((sid, p, k))
                    keep.append(j)
            if not nxt:
                break
            step += 1
            feats = out[keep]
            out = self._run([(sid, p + step - 1, feats[j : j + 1], [drafts[sid][-1]]) for j, (sid, p, _) in enumerate(nxt)])
            live = nxt
        return drafts

    def stats(self) -> dict:
        return {"spec_draft_kv_blocks_used": self.blocks.used, "spec_draft_kv_blocks_total": self.blocks.num_blocks}
