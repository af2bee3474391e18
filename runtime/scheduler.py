"""The token-budget scheduler: at every step, which sequences run and how many tokens each gets.

There are no prefill and decode phases. Each step has a budget of ``max_num_tokens`` tokens and
``max_batch_size`` sequences. Running sequences go first (a decode needs one token; a prompt in
the middle of its chunked prefill takes what the budget leaves), then waiting ones in priority
and arrival order. A long prompt is cut into chunks that ride along with the decodes, so running
decodes never stall behind it.

When blocks run out, the lowest-priority (latest) running sequence is preempted by recompute:
its blocks are freed and it returns to the front of the waiting queue with its tokens so far;
when it is scheduled again its prompt and output are prefilled together (prefix-cache hits
make that cheap) and it continues exactly where it stopped. A request that asks for prompt
logprobs takes prefix-cache hits only over prompt positions it has scored already, since every
other prompt row must run; its own full blocks still join the cache for others.
"""

from __future__ import annotations

import bisect

from kiln.runtime.block_manager import BlockManager
from kiln.runtime.plan import CachedSeq, NewSeq, StepPlan
from kiln.runtime.sequence import Sequence, SeqStatus


class Scheduler:
    POLICIES = ("guaranteed_no_evict", "max_utilization")

    def __init__(self, block_manager: BlockManager, max_num_tokens: int, max_batch_size: int,
                 policy: str = "guaranteed_no_evict", max_seq_len: int = 1 << 30):
        if policy not in self.POLICIES:
            raise ValueError(f"scheduler policy must be one of {self.POLICIES}, got {policy!r}")
        self.policy = policy
        self.max_seq_len = max_seq_len
        self.bm = block_manager
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._finished_ids: list[int] = []
        self._preempted_ids: list[int] = []
        self._step = 0
        self.num_preemptions = 0
        self.failed: list[tuple[Sequence, str]] = []
        # Overlapped scheduling: a grammar sequence whose last token is in flight skips the step
        # (its mask needs that token) unless the executor applies masks after the launch.
        self.grammar_waits = True

    # --- queues ---------------------------------------------------------------------------------
    @staticmethod
    def _key(seq: Sequence) -> tuple:
        return (*seq.request.sort_key(), seq.index)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort_right(self.waiting, seq, key=self._key)

    def add_running(self, seq: Sequence) -> None:
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence wherever it is and returns its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.bm.has_seq(seq.seq_id):
            self.bm.mark_computed(seq.seq_id, seq.num_computed)
            self.bm.free(seq.seq_id)
        if seq.sent_table is not None or seq.num_preemptions:
            self._finished_ids.append(seq.seq_id)  # a preempted one: the workers drop what they kept
        seq.sent_table = None
        seq.status = SeqStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.mark_computed(seq.seq_id, seq.num_computed)
        self.bm.free(seq.seq_id)
        if seq.sent_table is not None:
            self._finished_ids.append(seq.seq_id)
            self._preempted_ids.append(seq.seq_id)
        seq.sent_table = None
        seq.num_computed = 0
        seq.bm_len = 0
        seq.draft, seq.spec_k, seq.spec_resync = None, 0, False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step += 1
        plan = StepPlan(step_id=self._step)
        budget = self.max_num_tokens
        scheduled: set[int] = set()
        self.running.sort(key=self._key)

        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if budget == 0 or len(scheduled) >= self.max_batch_size:
                break
            if seq.num_pending and self._ends_by_length(seq):
                i += 1  # its last token is in flight: it finishes when that token is seen
                continue
            if seq.num_pending and seq.grammar is not None and self.grammar_waits:
                i += 1  # its next mask needs the token in flight: it runs once that token is seen
                continue
            draft, seq.draft = seq.draft or [], None
            draft = draft[: max(0, budget - seq.uncomputed)] if seq.uncomputed == 1 else []
            pending = seq.token_ids[seq.bm_len :]
            if (pending or draft) and not self._make_room(seq, len(pending) + len(draft)):
                continue  # seq itself was preempted; the list shifted
            if pending or draft:
                plan.copies.extend(self.bm.append_slots(seq.seq_id, pending + draft))
                seq.bm_len = len(seq.token_ids)
            n = min(seq.uncomputed, budget) + len(draft)
            if n > 0:
                self._emit(plan, seq, n, draft)
                scheduled.add(seq.seq_id)
                budget -= n
            i += 1

        reserved = None  # the running sequences' claim on free blocks, summed when a waiting one is weighed
        while self.waiting and budget > 0 and len(scheduled) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token in flight: it returns once that token is known
            need = -(-len(seq.token_ids) // self.bm.block_size)
            if need > self.bm.num_blocks:
                self.waiting.pop(0)
                self.failed.append(
                    (seq, f"request needs {need} KV cache blocks but the cache has {self.bm.num_blocks}: "
                          "raise num_kv_blocks or shorten the prompt")
                )
                continue
            limit = seq.request.max_hit_tokens()
            if not self.bm.can_allocate(seq.token_ids, limit):
                break
            if self.policy == "guaranteed_no_evict":
                if reserved is None:
                    reserved = self._reserved()
                growth = self._growth(seq) * (seq.request.params.n if seq.index == 0 and not seq.request.forked else 1)
                if self.running and self.bm.num_free_blocks - need - growth < reserved:
                    break  # admitting it could force a preemption later
                reserved += growth
            self.waiting.pop(0)
            cached = self.bm.allocate(seq.seq_id, seq.token_ids, limit)
            seq.num_computed = cached
            seq.bm_len = len(seq.token_ids)
            if seq.index == 0 and seq.num_preemptions == 0:
                seq.request.num_cached_tokens = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.uncomputed, budget)
            self._emit(plan, seq, n)
            scheduled.add(seq.seq_id)
            budget -= n

        plan.finished = self._finished_ids
        self._finished_ids = []
        plan.preempted = self._preempted_ids
        self._preempted_ids = []
        return plan

    def _ends_by_length(self, seq: Sequence) -> bool:
        """The sequence holds all the tokens it may have (max_tokens or the context length)."""
        p = seq.request.params
        return len(seq.token_ids) >= self.max_seq_len or (p.max_tokens is not None and seq.num_output >= p.max_tokens)

    def _growth(self, seq: Sequence) -> int:
        """Blocks the sequence may still need beyond those holding its tokens now."""
        p = seq.request.params
        left = self.max_seq_len - len(seq.token_ids)
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output)
        bs = self.bm.block_size
        have = -(-len(seq.token_ids) // bs)
        return max(0, -(-(len(seq.token_ids) + max(left, 0)) // bs) - have)

    def _reserved(self) -> int:
        """Blocks the running sequences may still claim (TensorRT-LLM's guaranteed-no-evict rule)."""
        return sum(self._growth(s) for s in self.running)

    def _make_room(self, seq: Sequence, num_new: int) -> bool:
        """Preempts from the back of ``running`` until ``seq`` can grow; False if ``seq`` itself went."""
        while not self.bm.can_append(seq.seq_id, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _emit(self, plan: StepPlan, seq: Sequence, n: int, draft: list[int] = ()) -> None:
        table = self.bm.live_table(seq.seq_id)
        sample = seq.num_computed + n == len(seq.token_ids) + len(draft)
        if seq.sent_table is None:
            req = seq.request
            seed = None if req.params.seed is None else req.params.seed + seq.index
            plan.new.append(
                NewSeq(
                    seq_id=seq.seq_id,
                    token_ids=list(seq.token_ids),
                    num_prompt_tokens=seq.num_prompt,
                    num_computed=seq.num_computed,
                    num_tokens=n,
                    block_table=list(table),
                    params=req.params.model_dump(),
                    seed=seed,
                    sample=sample,
                )
            )
            seq.sent_table = list(table)
        else:
            # A live table only grows at its end or has its last entry replaced (copy-on-write):
            # where the workers' last entry still stands, only the new entries need sending.
            old = seq.sent_table
            start = len(old)
            if start > len(table) or (start and table[start - 1] != old[-1]):
                start = 0
                while start < min(len(old), len(table)) and old[start] == table[start]:
                    start += 1
            plan.cached.append(
                CachedSeq(
                    seq_id=seq.seq_id,
                    new_token_ids=seq.token_ids[seq.sent_len :],
                    num_tokens=n,
                    block_start=start,
                    new_blocks=list(table[start:]),
                    sample=sample,
                    draft_token_ids=list(draft),
                    num_computed=seq.num_computed if seq.spec_resync else -1,
                )
            )
            seq.spec_resync = False
            del old[start:]
            old.extend(table[start:])
        if seq.request.wants_prompt_logprobs(seq.num_computed, n, seq.num_prompt):
            plan.prompt_logprobs.append(seq.seq_id)
        seq.sent_len = len(seq.token_ids)
        self.bm.mark_computed(seq.seq_id, seq.num_computed)  # KV of earlier steps is in the cache now
        seq.spec_base, seq.spec_k = seq.num_computed, len(draft)
        seq.num_computed += n

    def fork(self, parent: Sequence, child: Sequence, plan: StepPlan) -> None:
        """``child`` shares ``parent``'s blocks and state (n > 1 sampling after the prompt)."""
        self.bm.fork(parent.seq_id, child.seq_id)
        plan.forks.append((parent.seq_id, child.seq_id))
        child.num_computed = parent.num_computed
        child.bm_len = parent.bm_len
        child.sent_len = parent.sent_len
        child.sent_table = list(parent.sent_table)
        child.status = SeqStatus.RUNNING
        self.running.append(child)

    def stats(self) -> dict:
        s = self.bm.stats()
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_used": s["used"],
            "kv_blocks_free": s["free"],
            "kv_blocks_total": self.bm.num_blocks,
            "prefix_cache_hit_rate": s.get("hit_rate", 0.0),
            "preemptions": self.num_preemptions,
        }
