"""The worker side of a step: turns a ``StepPlan`` into model inputs, runs the forward pass,
samples, and returns a ``StepResult``.

The runner keeps a mirror of each running sequence's state (tokens, block table, sampling
parameters, generator), updated by the plan's deltas. Inputs are staged in persistent
buffers sized for ``max_num_tokens`` so a GPU path can capture graphs over fixed addresses.
Sequences listed in ``plan.prompt_logprobs`` also have their prompt rows scored
(``runtime/prompt_logprobs.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kiln.kernels.attention import AttentionMetadata, step_layout
from kiln.runtime.kv_cache import KVCache
from kiln.runtime.model import DecoderModel
from kiln.runtime.plan import SampledToken, StepPlan, StepResult, params_from_wire
from kiln.runtime.prompt_logprobs import finish_prompt_logprobs, launch_prompt_logprobs, prompt_spans
from kiln.runtime.sampler import Sampler, SampleRow
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import verify
from kiln.runtime.transfer import h2d

log = logging.getLogger("kiln.runner")


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
        mp = model.mapping
        self.samples = mp.is_last_stage and mp.tp_rank == 0  # the rank that samples and reports tokens
        self.keep_logits = False  # tests: keep every row's logits of the last step in last_logits
        # Verifying steps as decode rows (one per position): None where the decode graphs take
        # them; True or False forces it (tests check the rows without graphs on a CPU).
        self.verify_as_decode: bool | None = None
        self.last_logits: torch.Tensor | None = None
        self._fork_parent: dict[int, int] = {}
        self.graphs = None  # DecodeGraphs once enable_cuda_graphs() has captured them
        # Benchmarks: with time_gpu set, each step records the GPU time between its first and last
        # kernel (CUDA events) in last_gpu_s.
        self.time_gpu = False
        self.last_gpu_s = 0.0
        self.device_wait_s = 0.0  # host seconds blocked on launched steps (PendingStep.result)
        self._kept_generators: dict[int, torch.Generator] = {}  # preempted seeded sequences' generators
        self.gpu_spans: list[tuple[bool, int, object, object]] = []  # (decode only, seqs, start, end event) per timed step
        self.last_step_decode_only = False
        self.last_step_seqs = 0
        self.seqs: dict[int, SeqState] = {}
        self._drafts: dict[int, tuple[int, list[int]]] = {}  # seq id -> (tokens before the proposals, proposals)
        # Draft-model proposals of sampled requests: the distributions they were drawn from, set by
        # the coordinator in this process before the step ([proposals, vocab] per seq id).
        self.next_draft_probs: dict[int, torch.Tensor] = {}
        self._draft_probs: dict[int, torch.Tensor] = {}
        # Proposers that read the target's hidden states (Medusa and EAGLE heads) set this: "last"
        # keeps, per sequence that sampled, the final hidden state whose logits gave its newest
        # token; "all" keeps every row whose KV stands after the step (prefill chunks, the decode
        # row, the last token and the proposals that stood). ``take_hidden`` hands them over.
        self.hidden_mode: str | None = None
        self._hidden: dict[int, tuple[int, torch.Tensor]] = {}
        self._prev_tokens: torch.Tensor | None = None  # the last launched step's sampled tokens (device)
        self._prev_rows: dict[int, tuple[int, int]] = {}  # seq id -> (row in _prev_tokens, position)
        self._fix = None
        self.num_device_inputs = 0  # input tokens taken from the device (overlapped scheduling)
        dev = self.device
        self.input_ids = torch.zeros(max_num_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_num_tokens, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_num_tokens,), -1, dtype=torch.long, device=dev)

    # --- state mirror -------------------------------------------------------------------------
    def _apply(self, plan: StepPlan) -> list[tuple[int, int, bool]]:
        preempted = set(plan.preempted)
        for sid in plan.finished:
            st = self.seqs.pop(sid, None)
            if sid in preempted:
                if st is not None and st.generator is not None:
                    self._kept_generators[sid] = st.generator  # it comes back as a new sequence
            else:
                self._kept_generators.pop(sid, None)
        work: list[tuple[int, int, bool]] = []
        for s in plan.new:
            params = params_from_wire(s.params)
            gen = self._kept_generators.pop(s.seq_id, None)
            if gen is None and s.seed is not None:
                gen = Sampler.make_generator(s.seed, self.device)
            self.seqs[s.seq_id] = SeqState(list(s.token_ids), s.num_prompt_tokens, s.num_computed, list(s.block_table), params, gen)
            work.append((s.seq_id, s.num_tokens, s.sample))
        self._fork_parent = {}
        for parent, child, seed in plan.forks:
            p = self.seqs[parent]
            gen = Sampler.make_generator(seed, self.device) if seed is not None else None
            self.seqs[child] = SeqState(list(p.token_ids), p.num_prompt, p.num_computed, list(p.block_table), p.params, gen)
            self._fork_parent[child] = parent
        self._drafts = {}
        probs, self.next_draft_probs = self.next_draft_probs, {}
        self._draft_probs = {}
        for c in plan.cached:
            st = self.seqs[c.seq_id]
            st.token_ids.extend(c.new_token_ids)
            if c.num_computed >= 0:
                st.num_computed = c.num_computed
            if c.draft_token_ids:
                self._drafts[c.seq_id] = (len(st.token_ids), list(c.draft_token_ids))
                q = probs.get(c.seq_id)
                if q is not None:  # the scheduler may have cut the proposals short
                    self._draft_probs[c.seq_id] = q[: len(c.draft_token_ids)]
                st.token_ids.extend(c.draft_token_ids)
            del st.block_table[c.block_start :]
            st.block_table.extend(c.new_blocks)
            work.append((c.seq_id, c.num_tokens, c.sample))
        if plan.copies:
            self.kv.copy_blocks(plan.copies)
        return work

    # --- inputs -------------------------------------------------------------------------------
    def _gather(self, work: list[tuple[int, int, bool]]):
        """Python lists of this step's inputs; also records each sampling sequence's last row."""
        ids, pos, slots, qlens, slens, tables = [], [], [], [], [], []
        self._last_row: dict[int, int] = {}
        self._chunks: dict[int, tuple[int, int, int]] = {}  # seq id -> (first row, first position, tokens)
        fix_dst: list[int] = []  # rows whose input token is still on the device (sampled last step)
        fix_src: list[int] = []
        bs = self.block_size
        for sid, n, sample in work:
            st = self.seqs[sid]
            if n == 0:
                continue  # a fork child: samples from its parent's row
            start = st.num_computed
            end = start + n
            if end > len(st.token_ids):
                raise RuntimeError(f"sequence {sid}: asked to run {n} tokens past its {len(st.token_ids)}")
            tbl = st.block_table
            self._chunks[sid] = (len(ids), start, n)
            if n == 1:
                tok = st.token_ids[start]
                if tok < 0:
                    fix_dst.append(len(ids))
                    fix_src.append(self._device_token_row(sid, start))
                    tok = 0
                ids.append(tok)
                pos.append(start)
                slots.append(tbl[start // bs] * bs + start % bs)
            else:
                chunk = st.token_ids[start:end]
                for j, tok in enumerate(chunk):
                    if tok < 0:
                        fix_dst.append(len(ids) + j)
                        fix_src.append(self._device_token_row(sid, start + j))
                ids.extend(max(tok, 0) for tok in chunk)
                pos.extend(range(start, end))
                slots.extend(tbl[p // bs] * bs + p % bs for p in range(start, end))
            qlens.append(n)
            slens.append(end)
            tables.append(tbl)
            if sample:
                self._last_row[sid] = len(ids) - 1
        if len(ids) > self.max_num_tokens:
            raise RuntimeError(f"step of {len(ids)} tokens exceeds max_num_tokens {self.max_num_tokens}")
        sample_rows = [self._last_row[sid] if n else self._last_row[self._fork_parent[sid]] for sid, n, s in work if s]
        self._fix = (fix_dst, fix_src) if fix_dst else None
        self.num_device_inputs += len(fix_dst)
        return ids, pos, slots, qlens, slens, tables, sample_rows

    def _device_token_row(self, sid: int, position: int) -> int:
        """The row of the previous step's sampled tokens that holds ``sid``'s token at ``position``
        (overlapped scheduling: the coordinator planned this step before it saw that token)."""
        row = self._prev_rows.get(sid)
        if row is None or row[1] != position:
            raise RuntimeError(f"sequence {sid}: token at position {position} is not known to this worker")
        return row[0]

    def _inflight_tokens(self, sid: int, st: SeqState) -> torch.Tensor | None:
        """The device copies of ``sid``'s output tokens the coordinator has not seen yet (its
        placeholders), for a sampler that counts the history: penalties. None when there are none
        or nothing reads them."""
        p = st.params
        if not p.needs_penalties:
            return None
        first = len(st.token_ids)
        while first > st.num_prompt and st.token_ids[first - 1] < 0:  # placeholders are trailing
            first -= 1
        if first == len(st.token_ids):
            return None
        rows = [self._device_token_row(sid, i) for i in range(first, len(st.token_ids))]
        return self._prev_tokens.index_select(0, h2d(rows, torch.long, self.device))

    def _apply_fix(self, input_ids: torch.Tensor) -> None:
        """Writes the device-resident tokens of the previous step into this step's input ids."""
        if self._fix is None:
            return
        dst, src = self._fix
        dev = self.device
        input_ids.index_copy_(0, h2d(dst, torch.long, dev), self._prev_tokens.index_select(0, h2d(src, torch.long, dev)))

    def _prepare(self, ids, pos, slots, qlens, slens, tables, offset: int = 0) -> tuple[int, AttentionMetadata]:
        """Stages inputs at ``offset`` in the persistent buffers and builds the attention metadata."""
        t = len(ids)
        dev = self.device
        o = offset
        self.input_ids[o : o + t].copy_(h2d(ids, torch.long, dev), non_blocking=True)
        self.positions[o : o + t].copy_(h2d(pos, torch.long, dev), non_blocking=True)
        self.slot_mapping[o : o + t].copy_(h2d(slots, torch.long, dev), non_blocking=True)
        bt, qsl = step_layout(qlens, tables)
        meta = AttentionMetadata(
            query_start_loc=h2d(qsl, torch.int32, dev),
            seq_lens=h2d(slens, torch.int32, dev),
            block_tables=h2d(bt, torch.int32, dev),
            slot_mapping=self.slot_mapping[o : o + t],
            query_lens_cpu=qlens,
            seq_lens_cpu=slens,
            max_query_len=max(qlens, default=0),
            max_seq_len=max(slens, default=0),
            sliding_window=self.model.cfg.sliding_window,
        )
        return t, meta

    def tune_attention(self) -> dict | None:
        """On a GPU with an FP8 KV cache, times the decode attention's (context tile, warps)
        configs on this cache and keeps the fastest (``triton_attention.tune_decode``); before
        graph capture. Returns ``{"BLOCK_Nxwarps": microseconds}`` or None where there is
        nothing to choose."""
        from kiln.kernels import triton_ops

        if self.device.type != "cuda" or not triton_ops.available() or not self.kv.layers:
            return None
        from kiln.kernels import triton_attention

        layer = next(iter(self.model.model.layers.values()))
        attn = layer.self_attn
        if attn.k_scale is None:
            return None
        k_cache, v_cache = self.kv.layers[0]
        if triton_attention.decode_config_chosen(k_cache.device, k_cache.shape[-1]):
            return None  # restored from the engine's tuning file
        times = triton_attention.tune_decode(k_cache, v_cache, attn.k_scale, attn.v_scale, attn.nh, self.model.dtype)
        if times:
            log.info("event=decode_attention_tuned times_us=%s chosen=%s",
                     {k: round(v, 1) if isinstance(v, float) else v for k, v in times.items()},
                     triton_attention.decode_tuned_table())
        return times

    def enable_cuda_graphs(self, max_seq_len: int, rows: int | None = None, warm: bool = True) -> None:
        """Captures decode graphs for row buckets up to ``rows`` (default max_batch_size; one
        pipeline stage only). A speculating engine asks for more rows than sequences: its
        verifying steps run as decode rows, one per position (see ``_rows_as_decode``)."""
        from kiln.kernels import triton_ops
        from kiln.runtime.cuda_graph import DecodeGraphs

        if self.device.type != "cuda" or self.model.mapping.pp > 1 or not triton_ops.available():
            return
        self.graphs = None  # the old graphs' memory goes back before the new ones are captured
        self.graphs = DecodeGraphs(self.model, self.kv, rows or self.max_batch_size, max_seq_len, self.block_size)
        self.graphs.capture()
        if warm:
            self.warm_kernels(max_seq_len)

    def warm_kernels(self, max_seq_len: int, force: bool = False) -> None:
        """Compiles at load what the decode graphs do not: the kernels of a prefill step and of a
        mixed step (prefill beside decode), the decode kernel in its direct and split variants.
        No kernel specializes on a token count or context length, so every later length runs
        these. Runs on every rank in step (tensor-parallel layers all-reduce); blocks 0 and 1 are
        written, which no sequence holds before the engine serves. ``force`` runs the steps off a
        GPU too (a check of the steps themselves)."""
        from kiln.kernels import triton_ops

        gpu = self.device.type == "cuda" and triton_ops.available()
        if self.model.mapping.pp > 1 or not (gpu or force):
            return
        bs = self.block_size
        cases = [([3], [3], [[0]], 3),  # prefill alone
                 ([2, 1], [2, 1], [[0], [1]], 2),  # prefill beside a decode, one context slice
                 ([2, 1], [2, 1], [[0], [1]], max_seq_len)]  # the decode split over slices
        for qlens, slens, tables, span in cases:
            pos = [p for q, s in zip(qlens, slens) for p in range(s - q, s)]
            slots = [tables[i][0] * bs + p for i, (q, s) in enumerate(zip(qlens, slens)) for p in range(s - q, s)]
            t, meta = self._prepare([0] * len(pos), pos, slots, qlens, slens, tables)
            meta.max_seq_len = span
            self._forward(t, meta)
        self._warm_row_counts(max_seq_len)
        if gpu:
            torch.cuda.synchronize(self.device)

    def _warm_row_counts(self, max_seq_len: int) -> None:
        """Prefill steps of 16, 24, 32, 48, ... up to max_num_tokens tokens, and the LM head on 1,
        2, 4, ... up to max_batch_size rows. cuBLAS picks a GEMM kernel by the row count and CUDA
        loads a kernel's module at its first launch (tens of milliseconds for a new prompt length
        otherwise). The steps write no KV (slot -1) and read block 0."""
        bs = self.block_size
        cap = self.max_num_tokens
        counts = sorted({c for k in range(4, 24) for c in (1 << k, 3 << (k - 1)) if c <= cap} | {cap})
        hidden = None
        for n in counts:
            qlens, left = [], n
            while left:
                q = min(left, max_seq_len - 1)
                qlens.append(q)
                left -= q
            pos = [p for q in qlens for p in range(q)]
            tables = [[0] * -(-q // bs) for q in qlens]
            t, meta = self._prepare([0] * n, pos, [-1] * n, qlens, qlens, tables)
            hidden = self._forward(t, meta)
        if hidden is None or self.model.mapping.pp > 1:
            return
        m = 1
        while m <= min(self.max_batch_size, hidden.shape[0]):
            self.model.compute_logits(hidden[:m])
            m *= 2

    def _plain_greedy(self, sid: int, masks) -> bool:
        """Greedy with nothing that needs the full logits row (the same answer on every rank)."""
        st = self.seqs[sid]
        p = st.params
        if not p.greedy or p.needs_penalties or p.logit_bias or p.logprobs is not None or (masks and sid in masks):
            return False
        return not (st.token_ids and len(st.token_ids) - st.num_prompt < p.min_tokens)

    def _forward_microbatched(self, ids, pos, slots, qlens, slens, tables) -> torch.Tensor | None:
        """Pipeline stages overlap: the batch is cut into micro-batches of whole sequences; a stage
        sends micro-batch i on without waiting and starts on i + 1 while the next stage runs i."""
        m = self.model
        n = len(qlens)
        k = min(m.mapping.pp, n)
        total = len(ids)
        cuts, acc, target = [0], 0, total / k
        for i, q in enumerate(qlens):
            acc += q
            if len(cuts) < k and acc >= target * len(cuts) and i + 1 < n:
                cuts.append(i + 1)
        cuts.append(n)
        outs, pending, keep = [], [], []
        tok = 0
        for a, b in zip(cuts, cuts[1:]):
            t_mb = sum(qlens[a:b])
            sl = slice(tok, tok + t_mb)
            t, meta = self._prepare(ids[sl], pos[sl], slots[sl], qlens[a:b], slens[a:b], tables[a:b], offset=tok)
            hidden = residual = None
            if not m.mapping.is_first_stage:
                hidden, residual = m.comm.recv_hidden(t, m.cfg.hidden_size, m.dtype, self.device)
            h, res = m(self.input_ids[tok : tok + t], self.positions[tok : tok + t], self.kv.layers, meta, hidden, residual)
            if m.mapping.is_last_stage:
                outs.append(h)
            else:
                pending.extend(m.comm.isend_hidden(h, res))
                keep.append((h, res))
            tok += t_mb
        for w in pending:
            w.wait()
        return torch.cat(outs) if outs else None

    def _forward(self, t: int, meta: AttentionMetadata) -> torch.Tensor | None:
        """This stage's layers; None on a stage that handed its output to the next one."""
        m = self.model
        hidden = residual = None
        if not m.mapping.is_first_stage:
            hidden, residual = m.comm.recv_hidden(t, m.cfg.hidden_size, m.dtype, self.device)
        h, res = m(self.input_ids[:t], self.positions[:t], self.kv.layers, meta, hidden, residual)
        if not m.mapping.is_last_stage:
            m.comm.send_hidden(h, res)
            return None
        return h

    # --- speculative verification ------------------------------------------------------------------
    def _launch_verify(self, hidden: torch.Tensor):
        """Logits at every position of each speculating sequence: its last token's and one per
        proposal (computed on every rank: the vocabulary may be split); what ``_finish_verify``
        needs on the sampling rank, None elsewhere."""
        order = list(self._drafts)
        rows = []
        for sid in order:
            first, _, n = self._chunks[sid]
            rows.extend(range(first, first + n))
        logits = self.model.compute_logits(hidden.index_select(0, h2d(rows, torch.long, self.device)))
        if not self.samples:
            return None
        return order, [self._drafts[sid][1] for sid in order], logits, [self._draft_probs.get(sid) for sid in order]

    def _verify_as_decode(self, work, plan: StepPlan, num_rows: int) -> bool:
        """Whether this verifying step runs as decode rows: every chunk of more than one token is
        a speculating sequence's (no prompt in the step), one pipeline stage, and the rows fit
        the decode graphs (or ``verify_as_decode`` asks for it without graphs)."""
        want = self.verify_as_decode
        if want is None:
            want = self.graphs is not None and self.graphs.fits(num_rows)
        if not want or self.model.mapping.pp > 1 or self.keep_logits or plan.prompt_logprobs:
            return False
        return all(n <= 1 or sid in self._drafts for sid, n, _ in work)

    @staticmethod
    def _rows_as_decode(qlens: list[int], slens: list[int], tables: list[list[int]]):
        """A chunk of ``n`` tokens ending at context ``end`` as ``n`` decode rows: row ``j`` has
        context ``end - n + j + 1`` and the sequence's block table. Each layer writes every row's
        K and V before any row attends, so a row sees the proposals before it and not those after:
        the chunk's causal mask, with the decode kernels (and their CUDA graphs)."""
        q1, s1, t1 = [], [], []
        for n, end, tbl in zip(qlens, slens, tables):
            for j in range(n):
                q1.append(1)
                s1.append(end - n + j + 1)
                t1.append(tbl)
        return q1, s1, t1

    def _drop_drafts(self) -> None:
        """Proposals live for one step: the sequences lose them once the forward pass has run."""
        for sid, (base, _) in self._drafts.items():
            del self.seqs[sid].token_ids[base:]

    def _finish_verify(self, spec) -> list[SampledToken]:
        """Each speculating sequence's tokens this step: the proposals that stand, then the
        target's next token (``speculative.verify`` on the distributions the sampler draws from,
        against the draft model's distributions where it proposed for a sampled request)."""
        order, drafts, logits, qs = spec
        rows = []
        for sid, draft in zip(order, drafts):
            st = self.seqs[sid]
            prompt, outputs = st.token_ids[: st.num_prompt], st.token_ids[st.num_prompt :]
            rows.extend(SampleRow(st.params, prompt, outputs + draft[:j], st.generator, self.eos_token_ids)
                        for j in range(len(draft) + 1))
        dist = self.sampler.distributions(logits, rows)
        out, r = [], 0
        for sid, draft, q in zip(order, drafts, qs):
            st = self.seqs[sid]
            k = len(draft)
            gen = st.generator if st.generator is not None else self.sampler.shared_generator(dist.device)
            a, nxt = verify(dist[r : r + k + 1], draft, st.params.greedy, gen, q)
            r += k + 1
            out.extend(SampledToken(sid, t) for t in (*draft[:a], nxt))
        return out

    # --- hidden states for proposers that read them ---------------------------------------------------
    def _launch_hidden(self, hidden: torch.Tensor, work):
        """The rows ``hidden_mode`` asks for, gathered once: (rows, seq id -> (first row in them,
        first position, count), the speculating seq ids). A speculating sequence's rows are all k + 1; ``_finish_hidden``
        keeps those that stood once verification is known."""
        rows, spans = [], {}
        for sid, n, sample in work:
            if n == 0 or sid not in self._chunks:
                continue
            first, start, n = self._chunks[sid]
            if self.hidden_mode == "last" and sid not in self._drafts:
                if not sample:
                    continue
                first, start, n = first + n - 1, start + n - 1, 1
            spans[sid] = (len(rows), start, n)
            rows.extend(range(first, first + n))
        got = hidden.index_select(0, h2d(rows, torch.long, self.device)) if rows else hidden[:0]
        return got, spans, set(self._drafts)

    def _finish_hidden(self, feats, sampled: list[SampledToken]) -> None:
        """Keeps the rows of positions whose KV stands: a speculating sequence's last token and the
        proposals that stood (its tokens this step less one)."""
        got, spans, drafted = feats
        counts: dict[int, int] = {}
        for st in sampled:
            counts[st.seq_id] = counts.get(st.seq_id, 0) + 1
        out = {}
        for sid, (r, start, n) in spans.items():
            if sid in drafted:
                n = counts.get(sid, 1)  # the last token and the proposals that stood
                if self.hidden_mode == "last":
                    r, start, n = r + n - 1, start + n - 1, 1
            out[sid] = (start, got[r : r + n])
        self._hidden = out

    def take_hidden(self) -> dict[int, tuple[int, torch.Tensor]]:
        """seq id -> (first position, final hidden states [n, hidden]) of the last step (see
        ``hidden_mode``); each step's are handed over once."""
        out, self._hidden = self._hidden, {}
        return out

    # --- one step -------------------------------------------------------------------------------
    def execute(self, plan: StepPlan, allowed_masks: dict[int, torch.Tensor] | None = None) -> StepResult:
        return self.launch(plan, allowed_masks).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan, allowed_masks: dict[int, torch.Tensor] | None = None,
               late_masks: list[int] | tuple[int, ...] = ()) -> "PendingStep":
        """Enqueues one step and returns without waiting for the device.

        The sampled tokens stay on the device for the next step's inputs (a sequence whose last
        token the coordinator has not seen yet arrives with a negative placeholder); their host
        copies are in flight until ``PendingStep.result()``.

        Sequences in ``late_masks`` sample under an allowed-token mask the coordinator cannot know
        yet (a grammar's next mask needs the token in flight): their logits are computed now and
        their draw is enqueued by ``PendingStep.apply_masks`` once the masks are known, on the
        device after this step's forward pass, before the next step reads their tokens."""
        work = self._apply(plan)
        result = StepResult(step_id=plan.step_id)
        if not work:
            return PendingStep(result)
        t0 = time.perf_counter()
        ids, pos, slots, qlens, slens, tables, sample_rows = self._gather(work)
        if self._drafts and self._verify_as_decode(work, plan, len(ids)):
            qlens, slens, tables = self._rows_as_decode(qlens, slens, tables)
        self.last_step_decode_only = len(ids) == len(qlens)
        self.last_step_seqs = len(qlens)
        ev = None
        if self.time_gpu and self.device.type == "cuda":
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        graph_logits = None
        if (self.graphs is not None and len(ids) == len(qlens) and self.graphs.fits(len(ids)) and not self.keep_logits
                and not plan.prompt_logprobs):
            hidden = self.graphs.run(ids, pos, slots, slens, tables, fix=self._apply_fix if self._fix else None)
            graph_logits = self.graphs.last_logits
        elif self.model.mapping.pp > 1 and len(qlens) > 1:
            if self._fix:
                raise RuntimeError("a pipeline-parallel step cannot take device-resident input tokens")
            hidden = self._forward_microbatched(ids, pos, slots, qlens, slens, tables)
        else:
            t, meta = self._prepare(ids, pos, slots, qlens, slens, tables)
            self._apply_fix(self.input_ids[:t])
            hidden = self._forward(t, meta)
        for sid, n, _ in work:
            self.seqs[sid].num_computed += n
        for child, parent in self._fork_parent.items():
            self.seqs[child].num_computed = self.seqs[parent].num_computed
        if hidden is None:  # not the last pipeline stage: the hidden states went on to the next
            self._drop_drafts()
            result.forward_s = time.perf_counter() - t0
            return PendingStep(result)
        prompt_lp = None
        if plan.prompt_logprobs:
            spans = prompt_spans(plan.prompt_logprobs, self._chunks, self.seqs)
            prompt_lp = launch_prompt_logprobs(self.model, hidden, spans, self.samples)
        if self.keep_logits:
            self.last_logits = self.model.compute_logits(hidden)
        sampled_ids = [sid for sid, _, s in work if s]
        feats = self._launch_hidden(hidden, work) if self.hidden_mode and self.samples else None
        spec = None
        if self._drafts:
            spec = self._launch_verify(hidden)
            keep = [i for i, sid in enumerate(sampled_ids) if sid not in self._drafts]
            sampled_ids, sample_rows = [sampled_ids[i] for i in keep], [sample_rows[i] for i in keep]
            self._drop_drafts()
        # Where each sampled token will sit in its sequence: the next step may read it from here.
        prev_rows = {sid: (i, len(self.seqs[sid].token_ids)) for i, sid in enumerate(sampled_ids)}
        tokens = draw = None
        late_ids = set(late_masks) & set(sampled_ids) if late_masks and self.samples else set()
        late = None  # [indices in sampled_ids, their logits, their rows, the indices on the device, their draw]
        plain = bool(sampled_ids) and not late_ids and all(self._plain_greedy(sid, allowed_masks) for sid in sampled_ids)
        if plain and self.model.mapping.tp > 1:
            idx = h2d(sample_rows, torch.long, self.device)
            tokens = self.model.greedy_tokens(hidden.index_select(0, idx))
            host = tokens.to("cpu", non_blocking=True)
            sampled_ids_host = sampled_ids if self.samples else []
        elif sampled_ids:
            if sample_rows == list(range(hidden.shape[0])):
                logits = graph_logits if graph_logits is not None else self.model.compute_logits(hidden)
            else:
                logits = self.model.compute_logits(hidden.index_select(0, h2d(sample_rows, torch.long, self.device)))
            if self.samples and plain:
                draw = self.sampler.launch_greedy(logits)
                tokens = draw.token_ids
            elif self.samples:
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
                            inflight_token_ids=self._inflight_tokens(sid, st),
                        )
                    )
                if late_ids:
                    now = [i for i, sid in enumerate(sampled_ids) if sid not in late_ids]
                    later = [i for i, sid in enumerate(sampled_ids) if sid in late_ids]
                    tokens = torch.zeros(len(sampled_ids), dtype=torch.long, device=self.device)
                    if now:
                        now_idx = h2d(now, torch.long, self.device)
                        draw = self.sampler.launch(logits.index_select(0, now_idx), [rows[i] for i in now])
                        tokens.index_copy_(0, now_idx, draw.token_ids)
                    later_idx = h2d(later, torch.long, self.device)
                    late = [later, logits.index_select(0, later_idx), [rows[i] for i in later], later_idx, None]
                else:
                    draw = self.sampler.launch(logits, rows)
                    tokens = draw.token_ids
        if tokens is not None:
            self._prev_tokens, self._prev_rows = tokens, prev_rows
        else:
            self._prev_rows = {}
        if ev is not None:
            ev[1].record()
            self.gpu_spans.append((self.last_step_decode_only, self.last_step_seqs, ev[0], ev[1]))
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()

        def apply_masks(masks: dict[int, torch.Tensor] | None) -> None:
            """Draws the late-mask sequences' tokens under ``masks`` (a sequence left out samples
            unmasked: one that finished meanwhile, whose token is not used)."""
            if late is None or late[4] is not None:
                return
            later, lg, lrows, later_idx, _ = late
            for i, row in zip(later, lrows):
                row.allowed_mask = (masks or {}).get(sampled_ids[i])
            with torch.inference_mode():
                d = self.sampler.launch(lg, lrows)
                tokens.index_copy_(0, later_idx, d.token_ids)
            late[4] = d
            if done is not None:
                done.record()

        def finish() -> None:
            if late is not None:
                apply_masks(None)
            if done is not None:
                tw = time.perf_counter()
                done.synchronize()
                self.device_wait_s += time.perf_counter() - tw
            if ev is not None:
                self.last_gpu_s = ev[0].elapsed_time(ev[1]) / 1000
            if late is not None:
                got: list = [None] * len(sampled_ids)
                if draw is not None:
                    now = [i for i, sid in enumerate(sampled_ids) if sid not in late_ids]
                    for i, r in zip(now, self.sampler.finish(draw)):
                        got[i] = r
                for i, r in zip(late[0], self.sampler.finish(late[4])):
                    got[i] = r
                for sid, r in zip(sampled_ids, got):
                    result.sampled.append(SampledToken(sid, r.token_id, r.logprob, r.rank, r.top_logprobs))
            elif draw is not None:
                for sid, r in zip(sampled_ids, self.sampler.finish(draw)):
                    result.sampled.append(SampledToken(sid, r.token_id, r.logprob, r.rank, r.top_logprobs))
            elif tokens is not None:
                result.sampled = [SampledToken(sid, t) for sid, t in zip(sampled_ids_host, host.tolist())]
            if spec:
                result.sampled.extend(self._finish_verify(spec))
            if feats is not None:
                self._finish_hidden(feats, result.sampled)
            result.prompt_logprobs = finish_prompt_logprobs(prompt_lp)
            # Placeholders this worker holds for those tokens become the tokens themselves.
            for st_tok in result.sampled:
                row = prev_rows.get(st_tok.seq_id)
                st = self.seqs.get(st_tok.seq_id)
                if row is not None and st is not None and row[1] < len(st.token_ids) and st.token_ids[row[1]] < 0:
                    st.token_ids[row[1]] = st_tok.token_id
            result.forward_s = time.perf_counter() - t0

        return PendingStep(result, finish, apply_masks if late is not None else None)


class PendingStep:
    """A launched step; ``result()`` waits for the device and returns the sampled tokens.
    ``apply_masks`` hands over the masks of the sequences launched with late masks."""

    def __init__(self, result: StepResult, finish=None, apply_masks=None):
        self._result = result
        self._finish = finish
        self._apply_masks = apply_masks

    def apply_masks(self, masks: dict[int, torch.Tensor] | None) -> None:
        if self._apply_masks is not None:
            f, self._apply_masks = self._apply_masks, None
            f(masks)

    def result(self) -> StepResult:
        if self._finish is not None:
            f, self._finish = self._finish, None
            f()
        return self._result
