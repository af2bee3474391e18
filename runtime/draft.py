"""The draft-model proposer: a smaller kiln engine, with its own paged KV cache on the target's
device, proposes the next tokens of every speculating sequence in batched forward passes.

Each engine step (``DraftProposer.propose``), for the sequences that speculate:

1. **Sync.** The draft remembers, per sequence, the tokens whose KV it holds. The longest common
   prefix with the sequence's tokens now is kept (the accepted proposals are in it, the rejected
   ones are not); the rest is dropped (``BlockManager.truncate``). Full blocks of that prefix are
   verified tokens and join the draft's prefix cache.
2. **Catch-up.** One forward pass over the tokens the draft has not seen, all sequences together:
   the accepted proposals and the target's last token (a whole prompt for a sequence new to the
   draft; cut into passes of ``max_num_tokens`` rows when longer).
3. **Proposals.** Its last row gives each sequence's first proposal; then one forward pass per
   further position, one row per sequence still proposing. A greedy request takes the argmax of
   the draft's processed logits; a sampled one draws from the draft's distribution under the
   request's own temperature, top-k, top-p and min-p, and that distribution goes to
   ``speculative.verify`` as ``q`` (exact rejection sampling).

A sequence that does not fit in the draft's cache (or past the draft's context length) simply does
not speculate that step. The engine frees a sequence's draft state when it finishes, is aborted
or is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.parallel.mapping import Mapping
from kiln.runtime.block_manager import BlockManager, BlockManagerError
from kiln.runtime.builder import BuildError, read_engine_config
from kiln.runtime.config import EngineConfig
from kiln.runtime.kv_cache import KVCache, memory_block_capacity
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.sampler import Sampler, SampleRow
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import _draw

PROBE = "Speculative decoding: the quick brown fox jumps over 13 lazy dogs!\n\tÉlan, naïve, 東京, 🙂 <s></s>"
"""Text both tokenizers must cut into the same ids."""


class DraftEngineError(ValueError):
    """A draft engine that cannot serve this target; the message is one line naming the problem."""


def check_draft_config(draft_dir: str, target: EngineConfig, device: torch.device) -> EngineConfig:
    """The draft's engine.json, checked against the target and the device it runs on."""
    try:
        cfg = read_engine_config(draft_dir)
    except BuildError as e:
        raise DraftEngineError(f"draft engine: {e}") from None
    b = cfg.build
    if b.world_size != 1:
        raise DraftEngineError(f"draft engine '{draft_dir}' was built for tp={b.tp} pp={b.pp} ep={b.ep}; the draft runs "
                               "on one device beside the target: rebuild it with --tp 1 --pp 1")
    if cfg.device_class != device.type:
        raise DraftEngineError(f"draft engine '{draft_dir}' was built for {cfg.device_class} but the target runs on "
                               f"{device.type}: rebuild the draft for {device.type}")
    if cfg.model.vocab_size != target.model.vocab_size:
        raise DraftEngineError(f"draft engine '{draft_dir}' has a vocabulary of {cfg.model.vocab_size} tokens but the "
                               f"target's has {target.model.vocab_size}: the draft must use the target's tokenizer")
    return cfg


def check_tokenizers(draft_dir: str, draft_tok, target_tok) -> None:
    """The draft's tokenizer is the target's: the same token -> id table and the same ids for a probe text."""
    same = draft_tok.get_vocab() == target_tok.get_vocab()
    if same:
        same = draft_tok.encode(PROBE, add_special_tokens=False) == target_tok.encode(PROBE, add_special_tokens=False)
    if not same:
        raise DraftEngineError(f"draft engine '{draft_dir}' has another tokenizer than the target: "
                               "the draft must be built with the target's tokenizer")


@dataclass
class DraftRequest:
    """One sequence that speculates this step."""

    seq_id: int
    token_ids: list[int]          # prompt + output so far (the last one has no KV in the target yet)
    num_prompt: int
    k: int                        # proposals wanted
    params: SamplingParams
    seed: int | None = None       # the draft's own generator for a seeded sampled request


@dataclass
class _State:
    tokens: list[int]                   # tokens whose KV the draft holds, in order
    generator: torch.Generator | None   # seeded sampled requests: the draft's draws
    verified: int = 0                   # leading tokens known to be the sequence's own


class DraftProposer:
    """Owns the draft model, its KV cache, a block manager for it and a model runner whose input
    staging and forward pass it reuses (the runner never samples here)."""

    def __init__(self, draft_dir: str, target: EngineConfig, target_tokenizer, device: torch.device, *,
                 num_tokens: int, max_num_tokens: int, max_batch_size: int, seed: int | None = None):
        from kiln.runtime.loader import check_complete, kv_cache_dtype, load_rank, load_tokenizer, tune_for_device, verify_files

        cfg = check_draft_config(draft_dir, target, device)
        try:
            check_complete(draft_dir, cfg)
            verify_files(draft_dir, cfg, [n for n in cfg.files if not n.startswith("rank")])
            tok = load_tokenizer(draft_dir, cfg)
        except BuildError as e:
            raise DraftEngineError(f"draft engine: {e}") from None
        check_tokenizers(draft_dir, tok, target_tokenizer)
        try:
            model = load_rank(draft_dir, cfg, Mapping(), device)
        except BuildError as e:
            raise DraftEngineError(f"draft engine: {e}") from None
        tune_for_device(model, draft_dir)
        self.config = cfg
        self.device = device
        self.max_seq_len = cfg.build.max_seq_len
        bs = cfg.build.tokens_per_block
        ls = model.ls
        dtype = kv_cache_dtype(cfg)
        # As many token slots as the target's cache, and room for every sequence's proposals.
        want = -(-num_tokens // bs) + max_batch_size
        cap = memory_block_capacity(len(ls.layers), ls.num_kv_heads, ls.head_dim, bs, dtype, device, utilization=1.0)
        if device.type == "cuda":
            cap = int(cap * 0.9)
        nb = min(want, cap)
        if nb < -(-min(self.max_seq_len, target.build.max_seq_len) // bs):
            raise DraftEngineError(f"the draft's KV cache fits {nb} blocks of {bs} tokens, less than one sequence: "
                                   "free memory for the draft (KILN_GPU_MEMORY_UTILIZATION lower) or shorten --max-seq-len")
        kv = KVCache(len(ls.layers), nb, bs, ls.num_kv_heads, ls.head_dim, dtype, device)
        self.runner = ModelRunner(model, kv, max_num_tokens, max_batch_size)
        self.block_manager = BlockManager(nb, bs, enable_prefix_caching=True)
        self.sampler = Sampler(None if seed is None else draft_seed(seed))  # not the target's stream
        self.eos_token_ids = tuple(target.tokenizer.eos_token_ids or target.model.eos_token_id)
        self.seqs: dict[int, _State] = {}
        self._reserved = 0  # free blocks promised to proposals of sequences synced this step
        self.num_forwards = 0
        self.num_unfit = 0  # proposals skipped because the sequence did not fit in the draft's cache

    # --- per-sequence state ------------------------------------------------------------------------
    def release(self, seq_id: int) -> None:
        """Frees a sequence's draft KV (finished, aborted or preempted)."""
        if self.seqs.pop(seq_id, None) is not None:
            self.block_manager.free(seq_id)

    def retain(self, seq_ids: set[int]) -> None:
        """Frees every sequence's draft state but those in ``seq_ids``."""
        for sid in [s for s in self.seqs if s not in seq_ids]:
            self.release(sid)

    def _sync(self, r: DraftRequest) -> int | None:
        """Drops what the draft holds beyond the sequence's tokens and makes room for the catch-up
        and for ``k - 1`` proposals (held back from the sequences synced after it); the first
        position to run, or None when the sequence does not fit."""
        toks, bm = r.token_ids, self.block_manager
        if len(toks) + r.k > self.max_seq_len:
            self.release(r.seq_id)
            return None
        blocks = lambda n: -(-n // bm.block_size)  # noqa: E731
        later = blocks(len(toks) + r.k - 1) - blocks(len(toks))  # blocks the proposals will take
        st = self.seqs.get(r.seq_id)
        if st is not None:
            limit = min(len(st.tokens), len(toks) - 1)  # at least the last token runs: its logits are needed
            c = min(st.verified, limit)  # the sequence's tokens never change: compare only the newer ones
            while c < limit and st.tokens[c] == toks[c]:
                c += 1
            try:
                bm.truncate(r.seq_id, c)
            except BlockManagerError:  # the sequence's tokens changed under a cached block: start over
                self.release(r.seq_id)
                st = None
            else:
                del st.tokens[c:]
                st.verified = c
                bm.mark_computed(r.seq_id, c)
                if blocks(len(toks) + r.k - 1) - blocks(c) > bm.num_free_blocks - self._reserved:
                    return None
                bm.append_slots(r.seq_id, toks[c:])
                st.tokens.extend(toks[c:])
                self._reserved += later
                return c
        if not bm.can_allocate(toks):
            return None
        c = bm.allocate(r.seq_id, toks)
        if bm.num_free_blocks - self._reserved < later:
            bm.free(r.seq_id)
            return None
        self._reserved += later
        gen = Sampler.make_generator(r.seed, self.device) if r.seed is not None and not r.params.greedy else None
        self.seqs[r.seq_id] = _State(list(toks), gen, len(toks))
        return c

    # --- forward passes ----------------------------------------------------------------------------
    def _run(self, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Runs each ``(seq id, first position, tokens)`` through the draft (KV written at those
        positions), in passes of at most ``max_num_tokens`` rows; the logits at each entry's last
        token, [len(rows), vocab]."""
        runner, bm = self.runner, self.block_manager
        bs = bm.block_size
        budget = runner.max_num_tokens
        last: list[torch.Tensor | None] = [None] * len(rows)
        todo = [(i, sid, start, toks) for i, (sid, start, toks) in enumerate(rows)]
        while todo:
            ids, pos, slots, qlens, slens, tables, ends = [], [], [], [], [], [], []
            rest = []
            for i, sid, start, toks in todo:
                room = budget - len(ids)
                if room <= 0:
                    rest.append((i, sid, start, toks))
                    continue
                n = min(room, len(toks))
                tbl = bm.live_table(sid)
                ids.extend(toks[:n])
                pos.extend(range(start, start + n))
                slots.extend(tbl[p // bs] * bs + p % bs for p in range(start, start + n))
                qlens.append(n)
                slens.append(start + n)
                tables.append(tbl)
                if n == len(toks):
                    ends.append((i, len(ids) - 1))
                else:
                    rest.append((i, sid, start + n, toks[n:]))
            t, meta = runner._prepare(ids, pos, slots, qlens, slens, tables)
            hidden = runner._forward(t, meta)
            self.num_forwards += 1
            if ends:
                sel = hidden.index_select(0, torch.tensor([e[1] for e in ends], dtype=torch.long, device=self.device))
                for (i, _), h in zip(ends, sel):
                    last[i] = h
            todo = rest
        return runner.model.compute_logits(torch.stack(last))

    # --- proposals ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, reqs: list[DraftRequest]) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """Proposals for each sequence that fits: seq id -> (at most k tokens, their draft
        distributions [len, vocab] for a sampled request, None for a greedy one)."""
        live = []
        self._reserved = 0
        for r in reqs:
            if r.k < 1:
                continue
            c = self._sync(r)
            if c is not None:
                live.append((r, c))
            else:
                self.num_unfit += 1
        if not live:
            return {}
        logits = self._run([(r.seq_id, c, r.token_ids[c:]) for r, c in live])
        active = [r for r, _ in live]
        drafts: dict[int, list[int]] = {r.seq_id: [] for r in active}
        probs: dict[int, list[torch.Tensor]] = {r.seq_id: [] for r in active}
        while True:
            toks, qs = self._choose(logits, active, drafts)
            nxt, rows = [], []
            for r, t, q in zip(active, toks, qs):
                drafts[r.seq_id].append(t)
                if q is not None:
                    probs[r.seq_id].append(q)
                if len(drafts[r.seq_id]) < r.k:
                    st = self.seqs[r.seq_id]
                    rows.append((r.seq_id, len(st.tokens), [t]))
                    self.block_manager.append_slots(r.seq_id, [t])  # room was made in _sync
                    st.tokens.append(t)
                    nxt.append(r)
            if not nxt:
                break
            logits = self._run(rows)
            active = nxt
        return {sid: (d, torch.stack(probs[sid]) if probs[sid] else None) for sid, d in drafts.items()}

    def _choose(self, logits: torch.Tensor, active: list[DraftRequest], drafts: dict[int, list[int]]):
        """Each row's proposal, and for a sampled request the distribution it was drawn from."""
        rows = []
        for r in active:
            rows.append(SampleRow(r.params, r.token_ids[: r.num_prompt], r.token_ids[r.num_prompt :] + drafts[r.seq_id],
                                  None, self.eos_token_ids))
        dist = self.sampler.distributions(logits, rows)
        toks = dist.argmax(dim=-1).tolist()  # greedy rows' proposals
        qs: list[torch.Tensor | None] = [None] * len(active)
        shared = []  # sampled rows without a seed: one draw for all of them
        for j, r in enumerate(active):
            if r.params.greedy:
                continue
            qs[j] = dist[j]
            gen = self.seqs[r.seq_id].generator
            if gen is None:
                shared.append(j)
            else:
                toks[j] = _draw(dist[j], gen)
        if shared:
            w = dist.index_select(0, torch.tensor(shared, dtype=torch.long, device=dist.device))
            e = torch.empty_like(w).exponential_(generator=self.sampler.shared_generator(dist.device))
            e.clamp_min_(torch.finfo(torch.float32).tiny)
            for j, t in zip(shared, (w / e).argmax(dim=-1).tolist()):
                toks[j] = t
        return toks, qs

    def stats(self) -> dict:
        return {"spec_draft_kv_blocks_used": self.block_manager.num_used_blocks,
                "spec_draft_kv_blocks_total": self.block_manager.num_blocks}


def draft_seed(seed: int) -> int:
    """The draft's generator seed for a seeded request: another stream than the target's."""
    return (seed * 0x9E3779B1 + 0x5EED) % (1 << 63)
