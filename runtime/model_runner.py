"""The worker side of a step: turns a ``StepPlan`` into model inputs, runs the forward pass,
samples, and returns a ``StepResult``.

The runner keeps a mirror of each running sequence's state (tokens, block table, sampling
parameters, generator), updated by the plan's deltas. Inputs are staged in persistent
buffers sized for ``max_num_tokens`` so a GPU path can capture graphs over fixed addresses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.kernels.attention import AttentionMetadata
from kiln.runtime.kv_cache import KVCache
from kiln.runtime.model import DecoderModel
from kiln.runtime.plan import SampledToken, StepPlan, StepResult, params_from_wire
from kiln.runtime.sampler import Sampler, SampleRow
from kiln.runtime.sampling_params import SamplingParams


@dataclass
class SeqState:
    token_ids: list[int]
    num_prompt: int
    num_computed: int
    block_table: list[int]
    params: SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, model: DecoderModel, kv: KVCache, max_num_tokens: int, max_batch_size: int, eos_token_ids=(), seed=None):
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.block_size = kv.block_size
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampler = Sampler(seed)
        self.keep_logits = False  # tests: keep every row's logits of the last step in last_logits
        self.last_logits: torch.Tensor | None = None
        self._fork_parent: dict[int, int] = {}
        self.seqs: dict[int, SeqState] = {}
        dev = self.device
        self.input_ids = torch.zeros(max_num_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_num_tokens, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_num_tokens,), -1, dtype=torch.long, device=dev)

    # --- state mirror -------------------------------------------------------------------------
    def _apply(self, plan: StepPlan) -> list[tuple[int, int, bool]]:
        for sid in plan.finished:
            self.seqs.pop(sid, None)
        work: list[tuple[int, int, bool]] = []
        for s in plan.new:
            params = params_from_wire(s.params)
            gen = Sampler.make_generator(s.seed, self.device) if s.seed is not None else None
            self.seqs[s.seq_id] = SeqState(list(s.token_ids), s.num_prompt_tokens, s.num_computed, list(s.block_table), params, gen)
            work.append((s.seq_id, s.num_tokens, s.sample))
        self._fork_parent = {}
        for parent, child, seed in plan.forks:
            p = self.seqs[parent]
            gen = Sampler.make_generator(seed, self.device) if seed is not None else None
            self.seqs[child] = SeqState(list(p.token_ids), p.num_prompt, p.num_computed, list(p.block_table), p.params, gen)
            self._fork_parent[child] = parent
        for c in plan.cached:
            st = self.seqs[c.seq_id]
            st.token_ids.extend(c.new_token_ids)
            del st.block_table[c.block_start :]
            st.block_table.extend(c.new_blocks)
            work.append((c.seq_id, c.num_tokens, c.sample))
        if plan.copies:
            self.kv.copy_blocks(plan.copies)
        return work

    def set_seed(self, seq_id: int, seed: int) -> None:
        self.seqs[seq_id].generator = Sampler.make_generator(seed, self.device)

    # --- inputs -------------------------------------------------------------------------------
    def _prepare(self, work: list[tuple[int, int, bool]]) -> tuple[int, AttentionMetadata, list[int]]:
        ids, pos, slots, qlens, slens, tables = [], [], [], [], [], []
        self._last_row: dict[int, int] = {}
        bs = self.block_size
        for sid, n, sample in work:
            st = self.seqs[sid]
            if n == 0:
                continue  # a fork child: samples from its parent's row
            start = st.num_computed
            end = start + n
            if end > len(st.token_ids):
                raise RuntimeError(f"sequence {sid}: asked to run {n} tokens past its {len(st.token_ids)}")
            ids.extend(st.token_ids[start:end])
            pos.extend(range(start, end))
            tbl = st.block_table
            slots.extend(tbl[p // bs] * bs + p % bs for p in range(start, end))
            qlens.append(n)
            slens.append(end)
            tables.append(tbl)
            if sample:
                self._last_row[sid] = len(ids) - 1
        t = len(ids)
        if t > self.max_num_tokens:
            raise RuntimeError(f"step of {t} tokens exceeds max_num_tokens {self.max_num_tokens}")
        dev = self.device
        self.input_ids[:t].copy_(torch.tensor(ids, dtype=torch.long))
        self.positions[:t].copy_(torch.tensor(pos, dtype=torch.long))
        self.slot_mapping[:t].copy_(torch.tensor(slots, dtype=torch.long))
        width = max((len(x) for x in tables), default=1) or 1
        bt = torch.zeros(len(tables), width, dtype=torch.int32)
        for i, x in enumerate(tables):
            if x:
                bt[i, : len(x)] = torch.tensor(x, dtype=torch.int32)
        qsl = [0]
        for q in qlens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev),
            block_tables=bt.to(dev),
            slot_mapping=self.slot_mapping[:t],
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            max_query_len=max(qlens, default=0),
            max_seq_len=max(slens, default=0),
            sliding_window=self.model.cfg.sliding_window,
        )
        sample_rows = [
            self._last_row[sid] if n else self._last_row[self._fork_parent[sid]] for sid, n, s in work if s
        ]
        return t, meta, sample_rows

    # --- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan, allowed_masks: dict[int, torch.Tensor] | None = None) -> StepResult:
        work = self._apply(plan)
        result = StepResult(step_id=plan.step_id)
        if not work:
            return result
        t0 = time.perf_counter()
        t, meta, sample_rows = self._prepare(work)
        hidden, _ = self.model(self.input_ids[:t], self.positions[:t], self.kv.layers, meta)
        if self.keep_logits:
            self.last_logits = self.model.compute_logits(hidden)
        sampled_ids = [sid for sid, _, s in work if s]
        for sid, n, _ in work:
            self.seqs[sid].num_computed += n
        for child, parent in self._fork_parent.items():
            self.seqs[child].num_computed = self.seqs[parent].num_computed
        if sampled_ids:
            idx = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, idx))
            rows = []
            for sid in sampled_ids:
                st = self.seqs[sid]
                rows.append(
                    SampleRow(
                        params=st.params,
                        prompt_token_ids=st.token_ids[: st.num_prompt],
                        output_token_ids=st.token_ids[st.num_prompt :],
                        generator=st.generator,
                        eos_token_ids=self.eos_token_ids,
                        allowed_mask=(allowed_masks or {}).get(sid),
                    )
                )
            for sid, r in zip(sampled_ids, self.sampler(logits, rows)):
                result.sampled.append(SampledToken(sid, r.token_id, r.logprob, r.rank, r.top_logprobs))
        result.forward_s = time.perf_counter() - t0
        return result
