"""The engine loop: requests in, step plans to the workers, sampled tokens back, outputs out.

``LLMEngine`` is synchronous: ``add_request`` and ``abort_request`` at any time, ``step`` runs one
scheduler step and returns the requests whose state changed. The async engine and ``LLM`` both
drive it.
"""

from __future__ import annotations

import itertools
import time

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.detokenizer import IncrementalDetokenizer, find_stop
from kiln.runtime.loader import LoadedEngine, load_engine
from kiln.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from kiln.runtime.plan import CachedSeq, StepResult
from kiln.runtime.prompt_logprobs import add_prompt_logprobs
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Request, Sequence
from kiln.runtime.speculative import (
    GPU_STEP_TOKEN_BUDGET,
    NGRAM_MISS_LIMIT,
    NgramProposer,
    ProposalLength,
    parse_config,
    within_budget,
)


HOST_PHASES = ("schedule", "launch", "result", "process", "outputs")


def _no_text(token_ids) -> None:
    """A logprob's decoded token when the caller decodes them itself."""
    return None


class RequestError(ValueError):
    """A request that cannot be accepted; the message says why."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class LLMEngine:
    def __init__(
        self,
        engine_dir: str | None = None,
        *,
        loaded: LoadedEngine | None = None,
        launcher: str = "local",
        device: str | None = None,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_tokens: int | None = None,
        max_batch_size: int | None = None,
        seed: int | None = None,
        executor=None,
        scheduler_policy: str = "guaranteed_no_evict",
        async_scheduling: bool | None = None,
        speculative_config=None,
    ):
        self.loaded = loaded or load_engine(
            engine_dir, launcher=launcher, device=device, num_kv_blocks=num_kv_blocks, max_num_tokens=max_num_tokens,
            max_batch_size=max_batch_size, seed=seed,
        )
        ld = self.loaded
        self.config = ld.config
        self.tokenizer = ld.tokenizer
        self.max_seq_len = ld.config.build.max_seq_len
        self.max_num_tokens = ld.max_num_tokens
        self.executor = executor or ld.executor
        self.eos_token_ids = set(ld.eos_token_ids)
        self.block_manager = BlockManager(ld.num_kv_blocks, ld.config.build.tokens_per_block, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, ld.max_num_tokens, ld.max_batch_size, scheduler_policy, self.max_seq_len)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._changed: dict[str, Request] = {}
        self.num_steps = 0
        self.forward_s = 0.0
        # Launched steps planned while the previous step's tokens were still on the device, and
        # those planned with every token on the host.
        self.overlapped_steps = 0
        self.synced_steps = 0
        self._seqs_by_id: dict[int, Sequence] = {}
        self._grammars = None
        self.spec = parse_config(speculative_config)
        self.proposer = self.draft = self.heads = None
        self._q_sink = None  # the runner that verifies on this process (draft distributions go to it)
        self._hidden_src = None  # the runner whose hidden states the heads read
        if self.spec is not None and self.spec.method in ("draft", "medusa", "eagle"):
            try:
                if self.spec.method == "draft":
                    self._load_draft(seed)
                else:
                    self._load_heads()
            except BaseException:
                self.shutdown()
                raise
        elif self.spec is not None:
            self.proposer = NgramProposer(self.spec.prompt_lookup_max, self.spec.prompt_lookup_min)
        self.spec_proposed = self.spec_accepted = 0
        self.spec_cut = 0  # proposals the step budget did not make room for
        self._step_budget = None
        runner = getattr(self.executor, "runner", None)
        on_gpu = getattr(getattr(runner, "device", None), "type", None) == "cuda" or ld.config.device_class == "cuda"
        if self.spec is not None:
            self._step_budget = self.spec.step_token_budget or (GPU_STEP_TOKEN_BUDGET if on_gpu else None)
        # Overlapped scheduling: step N+1 is planned and launched before step N's tokens are read
        # back, so the host's work (scheduling, input preparation, detokenization) runs while the
        # device computes. Needs an executor that can launch without waiting; on by default on a GPU.
        can_launch = hasattr(self.executor, "launch")
        if async_scheduling is None:
            async_scheduling = can_launch and getattr(getattr(self.executor, "runner", None), "device", None) is not None \
                and self.executor.runner.device.type == "cuda"
        if async_scheduling and not can_launch:
            raise ValueError("async_scheduling needs an executor that can launch a step without waiting for it")
        self.async_scheduling = bool(async_scheduling)
        # n-gram lookups that keep missing wait for probe steps where steps overlap, so that a batch
        # with nothing to propose runs planned ahead like one without speculation
        misses = NGRAM_MISS_LIMIT if self.async_scheduling and self.proposer is not None else None
        self.proposal_length = ProposalLength(self.spec.num_speculative_tokens, self.spec.min_acceptance,
                                              miss_limit=misses) if self.spec else None
        self._probe = False  # this step is a probe step (see ProposalLength)
        if self.spec is not None and runner is not None and getattr(runner, "graphs", None) is not None:
            self._graphs_for_verification(runner)
        # A grammar sequence whose last token is in flight runs in the next step with its mask
        # applied after the launch (once that token is seen) where the executor can take late
        # masks; elsewhere it sits out that step.
        self.scheduler.grammar_waits = not getattr(self.executor, "late_masks", False)
        self._inflight = None  # the launched step whose tokens are not processed yet
        self.inflight_prefills = False  # the launched step runs prompt tokens (not only decodes)
        self.added_since_plan = 0  # requests added since the last step was planned
        # Streaming callers get every request's state after each step that changed it; offline
        # callers (LLM.generate) set this False and get finished requests only, and the text is
        # decoded once at the end instead of token by token.
        self.stream_outputs = True
        # False: output text and logprob tokens are left to the caller (the API server processes
        # detokenize), except for requests with stop strings, which are matched on text here.
        self.detokenize = True
        # True: ``step`` returns ``(Request, finished)`` pairs instead of ``RequestOutput``s, for a
        # caller that reads the state itself on this thread before the next step (the engine
        # core encodes its wire deltas straight from them).
        self.raw_outputs = False
        # Host seconds per phase of ``step`` (summed over steps; ``stats()["host_s"]``): scheduling,
        # launching (input preparation and kernel launches; the whole step without overlap), waiting
        # for the launched step and reading its tokens back, processing them (stop checks, text),
        # and building the outputs. With overlap on, the device idles only where the host phases
        # of a step add up to more than its device time; ``device_wait`` (where the runner is in
        # this process) is the part of ``result`` spent blocked on the device.
        self.host_s = {k: 0.0 for k in HOST_PHASES}
        if on_gpu and self.spec is None and self.max_seq_len > 8:
            self._warm_up()

    def _warm_up(self) -> None:
        """Two short requests (greedy, and sampled with top-p) through the whole step loop at load,
        on a GPU: the first user request then finds the kernels of its path loaded (CUDA loads a
        kernel's module at its first launch: sampling, the LM head on prefill rows, the copies)
        and the host code warm. Nothing stays behind: three prompt tokens and two outputs fill no
        KV block at 8 or more tokens per block (no prefix-cache entry), and the counts start from
        zero."""
        for i, sp in enumerate((SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                SamplingParams(max_tokens=2, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True))):
            self.add_request(f"kiln-warm-up-{i}", [0, 1, 2], sp)
        while self.has_unfinished():
            self.step()
        self._changed.clear()
        self.num_steps = self.overlapped_steps = self.synced_steps = 0
        self.forward_s = 0.0
        self.host_s = {k: 0.0 for k in HOST_PHASES}
        runner = getattr(self.executor, "runner", None)
        if runner is not None and hasattr(runner, "device_wait_s"):
            runner.device_wait_s = 0.0

    # --- requests ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=self.loaded.add_bos)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> Request:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use", code="duplicate_request_id")
        if isinstance(prompt, str):
            text, ids = prompt, self.encode_prompt(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty", code="empty_prompt", param="prompt")
        vocab = self.config.model.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise RequestError(f"logit_bias token ids must be in 0..{vocab - 1}", param="logit_bias")
        if len(ids) >= self.max_seq_len or len(ids) + (params.min_tokens or 0) > self.max_seq_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the prompt has {len(ids)} tokens",
                code="context_length_exceeded", param="prompt",
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_seq_len:
            raise RequestError(
                f"this model's maximum context length is {self.max_seq_len} tokens; the prompt ({len(ids)} tokens) "
                f"plus max_tokens ({params.max_tokens}) exceeds it",
                code="context_length_exceeded", param="max_tokens",
            )
        self.added_since_plan += 1
        req = Request(request_id, text, ids, params, priority=priority)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # the first prompt token has no log-probability
        seq = self._new_seq(req, 0)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return req

    def _new_seq(self, req: Request, index: int, token_ids: list[int] | None = None) -> Sequence:
        seq = Sequence(next(self._seq_ids), req, index, list(token_ids or req.prompt_token_ids), len(req.prompt_token_ids))
        seq.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
        seq.logprobs = [] if req.params.logprobs is not None else None
        if req.params.response_format is not None:
            try:
                seq.grammar = self.grammars().matcher(req.params.response_format)
            except ValueError as e:
                raise RequestError(str(e), code="invalid_response_format", param="response_format") from None
        self._seqs_by_id[seq.seq_id] = seq
        return seq

    def grammars(self):
        """The grammar compiler for this engine's tokenizer, made on first use."""
        if self._grammars is None:
            from kiln.runtime.grammar import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.config.model.vocab_size)
        return self._grammars

    def abort_request(self, request_id: str) -> bool:
        """Ends a request at once; its blocks return to the cache. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self._drop_pending(seq)
                self.scheduler.finish(seq)
        req.forked = True
        self._finish_request(req)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    def has_pending_outputs(self) -> bool:
        """Outputs (an abort's, say) that the next ``step`` returns even with nothing to run."""
        return bool(self._changed)

    # --- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.spec is not None:
            self._probe = self.proposal_length.probe_step(self.num_steps)
        overlap = self._can_overlap()  # scheduling below only removes requests: it stays valid
        if self._inflight is not None and (not overlap or self._all_wait_for_host()):
            self._drain()
        clock = time.perf_counter
        hs = self.host_s
        if self.spec is not None:
            self._propose()
        t = clock()
        plan = self.scheduler.schedule()
        self.added_since_plan = 0
        if self.draft is not None:  # sequences preempted just now give their draft KV back too
            self.draft.retain({s.seq_id for s in self.scheduler.running})
        if self.heads is not None:
            self.heads.retain({s.seq_id for s in self.scheduler.running})
        for seq, msg in self.scheduler.failed:
            req = seq.request
            req.error = msg
            for s in req.seqs:
                if not s.finished:
                    s.finish_reason = "error"
                    self._drop_pending(s)
                    self.scheduler.finish(s)
            req.forked = True
            self._finish_request(req)
        self.scheduler.failed.clear()
        self._fork_children(plan)
        hs["schedule"] += clock() - t
        if plan.num_seqs or plan.finished:
            masks, late = self._grammar_masks(plan)
            if plan.num_seqs:
                if self._inflight is not None:
                    self.overlapped_steps += 1
                else:
                    self.synced_steps += 1
            if self.async_scheduling:
                t = clock()
                if late:
                    pending = self.executor.launch(plan, masks, late_masks=late)
                else:
                    pending = self.executor.launch(plan, masks) if masks else self.executor.launch(plan)
                if overlap:
                    self._add_placeholders(plan)
                hs["launch"] += clock() - t
                prefills = plan.num_tokens > plan.num_seqs
                self._drain()
                if late:  # their last tokens are on the host now: so are their masks
                    pending.apply_masks(self._late_grammar_masks(late))
                self._inflight = pending
                self.inflight_prefills = prefills
                if not overlap:
                    self._drain()
            else:
                t = clock()
                result = self.executor.execute(plan, masks) if masks else self.executor.execute(plan)
                t1 = clock()
                hs["launch"] += t1 - t
                self.forward_s += result.forward_s
                self._process(result)
                hs["process"] += clock() - t1
        elif self._inflight is not None:
            self._drain()
        self.num_steps += 1
        t = clock()
        if self.raw_outputs:
            reqs = self.requests
            out = [(r, r.request_id not in reqs) for r in self._changed.values()]
        else:
            out = [self._output(r) for r in self._changed.values()]
        self._changed.clear()
        hs["outputs"] += clock() - t
        return out

    # --- overlapped scheduling ------------------------------------------------------------------
    def _can_overlap(self) -> bool:
        """Whether the next step may be planned before the last one's tokens are seen: always with
        overlapped scheduling on, except where a sequence looks up proposals in it (a lookup needs
        the last token). n-gram speculation overlaps the steps where no lookup is due (see
        ``ProposalLength``); the other proposers never overlap.

        Nothing else needs the host to have every token: the workers count the in-flight tokens
        (still on the device) into penalties and min_tokens, a fork (n > 1) happens on the step
        that samples the first token, when nothing of its parent is in flight, and a sequence
        under a grammar, whose next mask needs its last token on the host, is launched with the
        rest and draws its token once the mask is known (``late_masks``), or, where the executor
        cannot do that, sits out the steps planned while its token is in flight."""
        if not self.async_scheduling:
            return False
        return self.spec is None or (self.proposal_length.miss_limit is not None and not self._spec_wanted())

    def _spec_wanted(self) -> bool:
        """Whether some running sequence would look up proposals in the next step (its last token
        must be on the host for that), with room in the step's budget for at least one."""
        running = self.scheduler.running
        if self._step_budget is not None and self._step_budget <= len(running):
            return False
        pl, probe = self.proposal_length, self._probe
        return any(self._may_speculate(seq) and pl.k(seq.spec_rate, seq.spec_misses, probe) > 0 for seq in running)

    def _all_wait_for_host(self) -> bool:
        """True when every sequence that could run next needs a token still in flight (grammar
        sequences where the executor cannot take late masks): planning ahead would launch an
        empty step, so wait for the tokens."""
        if not self.scheduler.grammar_waits or self.scheduler.waiting:
            return False
        return all(s.grammar is not None and s.num_pending for s in self.scheduler.running)

    def _add_placeholders(self, plan) -> None:
        """Each sequence that samples in the launched step gets a placeholder for its token."""
        for e in (*plan.new, *plan.cached):
            if e.sample:
                seq = self._seqs_by_id.get(e.seq_id)
                if seq is not None and not seq.finished:
                    seq.token_ids.append(-1)
                    seq.num_pending += 1

    def finish_inflight(self) -> None:
        """Waits for the launched step and processes its tokens now; its outputs come with the
        next ``step``. A server calls it when requests are arriving while a prefill step runs:
        planning the next step after that one ends, instead of at once, gathers every request
        that arrived meanwhile into it (a burst becomes a few full prefill steps instead of many
        small ones queued behind each other)."""
        self._drain()

    def _drain(self) -> None:
        """Waits for the launched step and processes its tokens."""
        pending, self._inflight = self._inflight, None
        self.inflight_prefills = False
        if pending is not None:
            t = time.perf_counter()
            result = pending.result()
            t1 = time.perf_counter()
            self.forward_s += result.forward_s
            self._process(result)
            self.host_s["result"] += t1 - t
            self.host_s["process"] += time.perf_counter() - t1

    def _drop_pending(self, seq: Sequence) -> None:
        if seq.num_pending:
            del seq.token_ids[len(seq.token_ids) - seq.num_pending :]
            seq.num_pending = 0

    def _grammar_masks(self, plan) -> tuple[dict, list[int]]:
        """Allowed-token masks of the sequences that sample this step under a grammar, and the
        sequences whose mask waits for their token in flight (``late_masks`` of the launch)."""
        masks, late = {}, []
        for e in (*plan.new, *plan.cached):
            if e.sample:
                seq = self._seqs_by_id.get(e.seq_id)
                if seq is not None and seq.grammar is not None:
                    if seq.num_pending:
                        late.append(e.seq_id)
                    else:
                        masks[e.seq_id] = seq.grammar.allowed_mask()
        return masks, late

    def _late_grammar_masks(self, late: list[int]) -> dict:
        """The masks of the launched step's late-mask sequences, now that their last tokens are
        processed (a sequence that finished meanwhile gets none: its token is not used)."""
        masks = {}
        for sid in late:
            seq = self._seqs_by_id.get(sid)
            if seq is not None and not seq.finished:
                masks[sid] = seq.grammar.allowed_mask()
        return masks

    def _fork_children(self, plan) -> None:
        sampling = {e.seq_id for e in plan.new if e.sample} | {e.seq_id for e in plan.cached if e.sample}
        for seq in list(self.scheduler.running):
            req = seq.request
            if req.params.n == 1 or req.forked or seq.index != 0 or seq.seq_id not in sampling or seq.num_output:
                continue
            for i in range(1, req.params.n):
                child = self._new_seq(req, i)
                req.seqs.append(child)
                self.scheduler.fork(seq, child, plan)
                seed = None if req.params.seed is None else req.params.seed + i
                plan.forks[-1] = (seq.seq_id, child.seq_id, seed)
                plan.cached.append(CachedSeq(child.seq_id, [], 0, len(child.sent_table), [], True))
            req.forked = True

    # --- speculative decoding --------------------------------------------------------------------
    def _load_draft(self, seed) -> None:
        """The draft-model proposer, on the device of the runner in this process."""
        from kiln.runtime.draft import DraftProposer

        runner = getattr(self.executor, "runner", None)
        if runner is None:
            raise ValueError("speculative method 'draft' needs the target's runner in this process "
                             "(launcher local or torchrun)")
        ld = self.loaded
        self.draft = DraftProposer(
            self.spec.draft_engine, ld.config, ld.tokenizer, runner.device,
            num_tokens=ld.num_kv_blocks * ld.config.build.tokens_per_block, max_num_tokens=ld.max_num_tokens,
            max_batch_size=ld.max_batch_size, seed=seed,
        )
        # Sampled requests need their draft distributions where verification runs: the runner here
        # when it samples (one rank, or tensor parallel without pipeline stages); else only greedy
        # requests speculate.
        self._q_sink = runner if runner.samples else None

    def _load_heads(self) -> None:
        """Medusa heads or an EAGLE layer beside the target's runner in this process; the runner
        then hands over the hidden states they read after each step."""
        from kiln.runtime.heads import EagleProposer, MedusaProposer

        method = self.spec.method
        runner = getattr(self.executor, "runner", None)
        if runner is None:
            raise ValueError(f"speculative method '{method}' needs the target's runner in this process "
                             "(launcher local or torchrun)")
        mp = runner.model.mapping
        if mp.pp > 1:
            raise ValueError(f"speculative method '{method}' reads the target's hidden states on the rank that samples: "
                             "it runs without pipeline stages (build the target with --pp 1)")
        if method == "eagle" and mp.tp > 1:
            raise ValueError("speculative method 'eagle' reads the target's embedding table and LM head whole: "
                             "it runs with a one-rank target (build it with --tp 1)")
        ld, k = self.loaded, self.spec.num_speculative_tokens
        if method == "medusa":
            self.heads = MedusaProposer(self.spec.heads_dir, runner.model, k)
        else:
            self.heads = EagleProposer(
                self.spec.heads_dir, runner.model, k, num_tokens=ld.num_kv_blocks * ld.config.build.tokens_per_block,
                max_num_tokens=ld.max_num_tokens, max_batch_size=ld.max_batch_size,
                block_size=ld.config.build.tokens_per_block, max_seq_len=self.max_seq_len,
            )
        runner.hidden_mode = self.heads.hidden_mode
        self._hidden_src = runner

    @staticmethod
    def _may_speculate(seq: Sequence) -> bool:
        p = seq.request.params
        return p.n == 1 and seq.grammar is None and p.logprobs is None and p.speculative

    def _observe_hidden(self) -> None:
        """The last step's hidden states go to the heads, for the sequences that may speculate."""
        feats = self._hidden_src.take_hidden()
        keep = {}
        for sid, f in feats.items():
            seq = self._seqs_by_id.get(sid)
            if seq is not None and not seq.finished and self._may_speculate(seq):
                keep[sid] = f
        self.heads.observe(keep)

    def _propose(self) -> None:
        """Proposals for each running sequence that decodes next step (the scheduler takes them).
        Not for n > 1, grammars, logprobs or ``SamplingParams(speculative=False)``; never past
        max_tokens or the context length."""
        wanted: list[tuple[Sequence, int]] = []
        for seq in self.scheduler.running:
            seq.draft = None  # one left by a step that did not schedule the sequence is stale
            if seq.sent_table is None or seq.uncomputed != 1 or seq.num_pending:
                continue
            p = seq.request.params
            if not self._may_speculate(seq):
                continue
            if self.draft is not None and not p.greedy and self._q_sink is None:
                continue
            left = self.max_seq_len - len(seq.token_ids)
            if p.max_tokens is not None:
                left = min(left, p.max_tokens - seq.num_output)
            k = min(self.proposal_length.k(seq.spec_rate, seq.spec_misses, self._probe), left - 1)
            wanted.append((seq, k))
        if self._step_budget is not None and wanted:
            # the decode rows of this step come first; proposals share what is left
            room = self._step_budget - len(self.scheduler.running)
            ks = within_budget([(seq.spec_rate, k) for seq, k in wanted], max(0, room), self.proposal_length.prior)
            self.spec_cut += sum(max(0, k) for _, k in wanted) - sum(ks)
            wanted = [(seq, k) for (seq, _), k in zip(wanted, ks)]
        if self.heads is not None:
            # every sequence that may speculate takes in its features, k = 0 included
            got = self.heads.propose([(seq.seq_id, seq.token_ids, max(0, k)) for seq, k in wanted])
            for seq, _ in wanted:
                seq.draft = got.get(seq.seq_id) or None
        elif self.draft is None:
            for seq, k in wanted:
                if k > 0:
                    seq.draft = self.proposer.propose(seq.token_ids, k) or None
        else:
            self._propose_draft(wanted)
        for seq, k in wanted:
            if k > 0:
                seq.spec_misses = 0 if seq.draft else seq.spec_misses + 1

    def _graphs_for_verification(self, runner) -> None:
        """A verifying step runs as decode rows, one per position (``ModelRunner._rows_as_decode``),
        in the decode graphs where they fit: capture them for as many rows as the step budget lets
        a verifying step hold, and hold the budget to what the graphs take."""
        rows = min(self._step_budget or GPU_STEP_TOKEN_BUDGET, self.max_num_tokens)
        if runner.graphs.buckets[-1] < rows:
            runner.enable_cuda_graphs(self.max_seq_len, rows=rows, warm=False)
        cap = runner.graphs.buckets[-1]
        self._step_budget = cap if self._step_budget is None else min(self._step_budget, cap)

    def _propose_draft(self, wanted) -> None:
        """The draft model's proposals for all speculating sequences at once; the distributions of
        sampled ones go to the verifying runner with the step."""
        from kiln.runtime.draft import DraftRequest, draft_seed

        # Draft KV of sequences no longer running (finished, aborted, preempted) goes first.
        self.draft.retain({s.seq_id for s in self.scheduler.running if s.sent_table is not None})
        reqs = []
        for seq, k in wanted:
            if k > 0:
                p = seq.request.params
                seed = None if p.seed is None else draft_seed(p.seed + seq.index)
                reqs.append(DraftRequest(seq.seq_id, seq.token_ids, seq.num_prompt, k, p, seed))
        got = self.draft.propose(reqs) if reqs else {}
        qs = {}
        for seq, _ in wanted:
            d = got.get(seq.seq_id)
            if d:
                seq.draft = d[0]
                if d[1] is not None:
                    qs[seq.seq_id] = d[1]
        if self._q_sink is not None:
            self._q_sink.next_draft_probs = qs

    def _rollback(self, result: StepResult) -> None:
        """After a speculative step: each such sequence keeps the KV of its last token and of the
        proposals that stand; the block manager drops the rest (their blocks were never cached)."""
        counts: dict[int, int] = {}
        for st in result.sampled:
            counts[st.seq_id] = counts.get(st.seq_id, 0) + 1
        for sid, c in counts.items():
            seq = self._seqs_by_id.get(sid)
            if seq is None or seq.finished or not seq.spec_k:
                continue
            keep = seq.spec_base + c  # the last token and c - 1 proposals
            seq.num_computed = seq.bm_len = keep
            self.block_manager.truncate(sid, keep)
            seq.spec_resync = True
            self.spec_proposed += seq.spec_k
            self.spec_accepted += c - 1
            seq.spec_rate = self.proposal_length.update(seq.spec_rate, seq.spec_k, c - 1)
            seq.spec_k = 0

    def _process(self, result: StepResult) -> None:
        if self.heads is not None:
            self._observe_hidden()
        if self.spec is not None:
            self._rollback(result)
        for pl in result.prompt_logprobs:  # before the tokens: a request may finish on this step's token
            seq = self._seqs_by_id.get(pl.seq_id)
            if seq is not None and seq.request.prompt_logprobs is not None:
                add_prompt_logprobs(seq.request.prompt_logprobs, pl, self._decode_each)
        now = time.monotonic()
        for st in result.sampled:
            seq = self._seqs_by_id.get(st.seq_id)
            if seq is None or seq.finished:
                continue
            req = seq.request
            if req.first_token_time is None:
                req.first_token_time = now
            self._append_token(seq, st)
            if self.stream_outputs:
                self._changed[req.request_id] = req
            if seq.finished and req.finished:
                self._finish_request(req)

    def _append_token(self, seq: Sequence, st) -> None:
        p = seq.request.params
        tok = st.token_id
        if seq.num_pending:  # overlapped scheduling: the token's slot was taken at launch
            at = len(seq.token_ids) - seq.num_pending
            seq.token_ids[at] = tok
            seq.num_pending -= 1
            bm = self.block_manager
            if bm.has_seq(seq.seq_id) and at < bm.num_tokens(seq.seq_id):
                bm.set_token(seq.seq_id, at, tok)
        else:
            seq.token_ids.append(tok)
        if st.logprob is not None:
            seq.cumulative_logprob += st.logprob
        if seq.logprobs is not None:
            dec = self.tokenizer.decode if self.detokenize else _no_text
            entry = {tok: Logprob(st.logprob, st.rank, dec([tok]))}
            for t, lp in (st.top_logprobs or {}).items():
                if t != tok:
                    entry[t] = Logprob(lp, None, dec([t]))
            seq.logprobs.append(entry)
        new_start = len(seq.text)
        text_here = (self.stream_outputs and self.detokenize) or bool(p.stop)
        if text_here:
            seq.text += seq.detok.add(tok)
        n_out = seq.num_output - seq.num_pending
        reason, stop = None, None
        if seq.grammar is not None:
            if not seq.grammar.accept(tok):
                reason = "error"  # the token left the grammar (no allowed token was left to sample)
            elif seq.grammar.is_terminated():
                reason = "stop"
        if reason is None and n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                reason = "stop"
            elif tok in p.stop_token_ids:
                reason, stop = "stop", tok
        if reason is None and p.stop and n_out >= p.min_tokens:
            hit = find_stop(seq.text, new_start, p.stop)
            if hit is not None:
                idx, s = hit
                seq.text = seq.text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
                reason, stop = "stop", s
        if reason is None and p.max_tokens is not None and n_out >= p.max_tokens:
            reason = "length"
        if reason is None and len(seq.token_ids) - seq.num_pending >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self._drop_pending(seq)
            if not isinstance(stop, str):
                if text_here:
                    seq.text += seq.detok.flush()
                elif self.detokenize:  # nothing was streamed: decode the whole output once
                    seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=p.skip_special_tokens,
                                                     clean_up_tokenization_spaces=False)
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq)

    def _decode_each(self, token_ids: list[int]) -> list[str]:
        """Each token's text on its own (the ``decoded_token`` of a logprob)."""
        return self.tokenizer.batch_decode([[t] for t in token_ids])

    def _finish_request(self, req: Request) -> None:
        for s in req.seqs:
            self._seqs_by_id.pop(s.seq_id, None)
            if self.draft is not None:
                self.draft.release(s.seq_id)
            if self.heads is not None:
                self.heads.release(s.seq_id)
        req.finish_time = time.monotonic()
        self._changed[req.request_id] = req
        self.requests.pop(req.request_id, None)

    # --- outputs --------------------------------------------------------------------------------
    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.visible_text(),
                    token_ids=seq.output_ids,  # a new list (a slice)
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.request_id not in self.requests,
            error=req.error,
            num_cached_tokens=req.num_cached_tokens,
            metrics=req.timings(),
            prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        )

    def shutdown(self) -> None:
        """Stops the workers of a multi-rank engine (a no-op for one rank)."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

    def stats(self) -> dict:
        s = self.scheduler.stats()
        s["steps"] = self.num_steps
        s["overlapped_steps"] = self.overlapped_steps
        s["synced_steps"] = self.synced_steps
        s["host_s"] = dict(self.host_s)
        wait = getattr(getattr(self.executor, "runner", None), "device_wait_s", None)
        if wait is not None:
            s["host_s"]["device_wait"] = wait
        if self.spec is not None:
            s["spec_proposed_tokens"] = self.spec_proposed
            s["spec_accepted_tokens"] = self.spec_accepted
            s["spec_acceptance_rate"] = self.spec_accepted / self.spec_proposed if self.spec_proposed else 0.0
            s["spec_budget_cut_tokens"] = self.spec_cut
            s["spec_step_token_budget"] = self._step_budget
            if self.draft is not None:
                s.update(self.draft.stats())
            if self.heads is not None:
                s.update(self.heads.stats())
        return s
