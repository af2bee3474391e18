import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kiln.runtime import block_manager as bm_mod
from kiln.runtime.block_manager import BlockManager, BlockManagerError


def snapshot(bm: BlockManager, seq_ids):
    return (bm.num_free_blocks, bm.num_used_blocks, bm.stats(),
            {s: (bm.block_table(s), bm.num_cached_tokens(s), sealed(bm, s)) for s in seq_ids})


def sealed(bm: BlockManager, seq_id) -> int:
    """Leading full blocks of the sequence registered in the prefix cache."""
    return bm._seqs[seq_id].sealed


# ---------------------------------------------------------------- unit tests
def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    assert bm.allocate("a", list(range(6))) == 0
    assert len(bm.block_table("a")) == 2
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 6
    assert bm.append_slots("a", [6, 7]) == []
    assert len(bm.block_table("a")) == 2
    assert bm.append_slots("a", [8]) == []
    assert len(bm.block_table("a")) == 3
    assert bm.can_append("a", 3) and bm.can_append("a", 3 + 5 * 4)
    assert not bm.can_append("a", 3 + 5 * 4 + 1)
    bm.check_invariants()
    bm.free("a")
    bm.check_invariants()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    with pytest.raises(BlockManagerError):
        bm.free("a")
    with pytest.raises(BlockManagerError):
        bm.block_table("a")


def test_prefix_reuse_shares_blocks():
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    prefix = list(range(100, 100 + 3 * bs))
    assert bm.allocate("a", prefix + [1, 2]) == 0
    bm.mark_computed("a", len(prefix) + 2)
    assert bm.allocate("b", prefix + [3, 4, 5]) == 3 * bs
    assert bm.num_cached_tokens("b") == 3 * bs
    assert bm.num_cached_tokens("a") == 0
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert ta[:3] == tb[:3] and ta[3] != tb[3]
    assert bm.num_used_blocks == 5
    st_ = bm.stats()
    assert st_["prefix_hits"] == 3 and st_["prefix_queries"] == 3 + 3
    bm.check_invariants()
    # a different prefix that shares only the second block's tokens must not hit
    other = [7] * bs + prefix[bs:]
    assert bm.allocate("c", other + [9]) == 0
    assert not set(bm.block_table("c")) & set(ta)
    bm.check_invariants()


def test_prefix_hit_after_preemption_and_on_appended_blocks():
    bs = 2
    bm = BlockManager(num_blocks=10, block_size=bs)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", 3)
    bm.append_slots("a", [4])
    bm.mark_computed("a", 4)
    bm.append_slots("a", [5, 6, 7])  # blocks [1,2] [3,4] [5,6] [7]
    assert sealed(bm, "a") == 2
    bm.mark_computed("a", 7)
    assert sealed(bm, "a") == 3
    table = bm.block_table("a")
    bm.free("a")
    assert bm.stats()["cached_evictable"] == 3
    assert bm.num_free_blocks == 10
    # resume with prompt + generated tokens
    assert bm.allocate("a2", [1, 2, 3, 4, 5, 6, 7, 8]) == 6
    assert bm.block_table("a2")[:3] == table[:3]
    assert bm.stats()["cached_evictable"] == 0
    bm.check_invariants()


def test_hash_collision_does_not_share(monkeypatch):
    monkeypatch.setattr(bm_mod, "hash_block_tokens", lambda parent, tokens: 42)
    bs = 2
    bm = BlockManager(num_blocks=12, block_size=bs)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 5)
    bm.check_invariants()
    assert bm.allocate("b", [6, 7, 3, 4, 5]) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.mark_computed("b", 5)
    bm.check_invariants()
    bm.free("a")
    bm.check_invariants()
    # the one registered block (tokens [1, 2]) is still reusable for identical tokens
    assert bm.allocate("c", [1, 2, 9]) == 2
    assert bm.allocate("d", [9, 9, 9]) == 0
    assert not set(bm.block_table("d")) & set(bm.block_table("c"))
    bm.check_invariants()


def test_collision_on_stale_chain_is_a_miss(monkeypatch):
    """A block whose parent was evicted and replaced must not be matched via its old chain."""
    monkeypatch.setattr(bm_mod, "hash_block_tokens", lambda parent, tokens: hash(tuple(tokens)))
    bs = 2
    bm = BlockManager(num_blocks=6, block_size=bs)
    bm.allocate("a", [1, 2, 3, 4, 0])
    bm.mark_computed("a", 5)
    bm.free("a")
    bm.allocate("b", [5, 6, 3, 4, 0])  # block [3,4] hashes the same but has another parent
    assert bm.num_cached_tokens("b") == 0
    bm.check_invariants()


def test_copy_on_write_after_fork():
    bs = 4
    bm = BlockManager(num_blocks=8, block_size=bs)
    bm.allocate("p", [1, 2, 3, 4, 5, 6])
    bm.fork("p", "c")
    assert bm.block_table("c") == bm.block_table("p")
    assert bm.num_used_blocks == 2
    parent_table = bm.block_table("p")
    copies = bm.append_slots("c", [7])
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == parent_table[1] and dst not in parent_table
    assert bm.block_table("p") == parent_table
    assert bm.block_table("c") == [parent_table[0], dst]
    # the parent is now the only owner of its last block: no further copy
    assert bm.append_slots("p", [8]) == []
    assert bm.block_table("p") == parent_table
    bm.check_invariants()
    bm.free("p")
    bm.abort("c")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants()


def test_fork_with_full_last_block_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("p", [1, 2, 3, 4])
    bm.fork("p", "c")
    assert bm.append_slots("c", [5]) == []
    assert bm.block_table("c")[:2] == bm.block_table("p")
    bm.check_invariants()


def test_lru_eviction_order():
    bs = 2
    bm = BlockManager(num_blocks=4, block_size=bs)
    bm.allocate("a", [1, 2, 3, 4, 0])
    bm.mark_computed("a", 5)
    ta = bm.block_table("a")
    bm.free("a")  # [1,2] and [3,4] evictable; the partial one is plain free
    bm.allocate("b", [5, 6, 7])
    bm.mark_computed("b", 3)
    tb = bm.block_table("b")
    bm.free("b")  # [5,6] evictable, newer than a's blocks
    assert bm.stats()["cached_evictable"] == 3
    assert bm.num_free_blocks == 4
    bm.allocate("x", [9, 9])  # plain free block first: nothing evicted
    assert bm.stats()["cached_evictable"] == 3
    bm.allocate("y", [8, 8])  # evicts the oldest: a's tail block [3,4]
    assert bm.block_table("y") == [ta[1]]
    bm.allocate("z", [8, 7])  # then a's head block [1,2]
    assert bm.block_table("z") == [ta[0]]
    bm.check_invariants()
    # b's block is still cached
    bm.free("x")
    assert bm.allocate("w", [5, 6, 0]) == 2
    assert bm.block_table("w")[0] == tb[0]
    bm.check_invariants()


def test_hit_revives_evictable_and_touch_order():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", [1, 2, 0])
    bm.allocate("b", [3, 4, 0])
    bm.mark_computed("a", 3)
    bm.mark_computed("b", 3)
    ta, tb = bm.block_table("a"), bm.block_table("b")
    bm.free("a")
    bm.free("b")
    assert bm.allocate("a2", [1, 2, 5]) == 2  # revives a's block
    assert bm.block_table("a2")[0] == ta[0]
    assert bm.stats()["cached_evictable"] == 1
    bm.free("a2")  # a's block becomes the most recently used
    bm.allocate("n", [7] * 6)  # two plain free blocks, then evicts b's older block
    assert tb[0] in bm.block_table("n") and ta[0] not in bm.block_table("n")
    bm.check_invariants()
    bm.free("n")
    assert bm.allocate("a3", [1, 2, 9]) == 2


def test_out_of_blocks_raises_and_changes_nothing():
    bs = 2
    bm = BlockManager(num_blocks=4, block_size=bs)
    bm.allocate("a", [1, 2, 3])
    bm.fork("a", "b")
    before = snapshot(bm, ["a", "b"])
    assert not bm.can_allocate([0] * 7)
    with pytest.raises(BlockManagerError):
        bm.allocate("c", [0] * 7)
    assert snapshot(bm, ["a", "b"]) == before
    with pytest.raises(BlockManagerError):
        bm.block_table("c")
    # appending 4 tokens to b needs a copy of its shared last block plus 2 more: 3 > 2 free
    assert not bm.can_append("b", 4)
    with pytest.raises(BlockManagerError):
        bm.append_slots("b", [4, 5, 6, 7])
    assert snapshot(bm, ["a", "b"]) == before
    assert bm.can_append("b", 2)
    bm.check_invariants()
    with pytest.raises(BlockManagerError):
        bm.allocate("a", [1])
    with pytest.raises(BlockManagerError):
        bm.fork("a", "b")


def test_fully_cached_never_reports_all_tokens():
    for n in (4, 5, 8):
        bm = BlockManager(num_blocks=8, block_size=4)
        toks = list(range(n))
        bm.allocate("a", toks)
        bm.mark_computed("a", n)
        cached = bm.allocate("b", toks)
        assert cached < n and cached % 4 == 0
        assert cached == min(n // 4 * 4, (n - 1) // 4 * 4)
        # the block holding the last token is never a shared hit
        assert bm.block_table("b")[-1] != bm.block_table("a")[-1]
        bm.check_invariants()


def test_can_allocate_counts_hits_and_revival():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    assert not bm.can_allocate([1, 2, 3, 4, 6])
    bm.mark_computed("a", 5)
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate([1, 2, 3, 4, 6])  # hits 2, needs 1 fresh
    bm.free("a")
    assert bm.can_allocate([1, 2, 3, 4, 6])
    assert not bm.can_allocate([9] * 7)
    assert bm.allocate("b", [1, 2, 3, 4, 6]) == 4
    bm.check_invariants()


def test_disabled_prefix_caching_and_reset():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 5)
    assert bm.allocate("b", [1, 2, 3, 4, 5]) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    assert bm.stats()["cached_evictable"] == 0
    bm.check_invariants()

    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.allocate("b", [7, 8, 0])
    bm.mark_computed("a", 5)
    bm.mark_computed("b", 3)
    bm.free("a")
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.stats()["cached_evictable"] == 0
    assert bm.allocate("c", [1, 2, 3, 4, 5]) == 0
    assert bm.allocate("d", [7, 8, 1]) == 0
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 8 - len(bm.block_table("c")) - len(bm.block_table("d"))
    s = bm.stats()
    assert set(s) >= {"num_blocks", "used", "free", "cached_evictable",
                      "prefix_queries", "prefix_hits", "hit_rate"}
    assert 0.0 <= s["hit_rate"] <= 1.0


def test_uncomputed_blocks_are_not_shared():
    """A prompt still being prefilled in chunks must not be read by another sequence."""
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    prompt = list(range(100, 100 + 3 * bs)) + [1, 2]
    assert bm.allocate("a", prompt) == 0
    assert sealed(bm, "a") == 0
    assert bm.allocate("b", prompt[:3 * bs] + [3]) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    assert bm.stats()["prefix_hits"] == 0
    bm.check_invariants()
    bm.free("b")
    assert bm.stats()["cached_evictable"] == 0
    # first chunk: less than one block computed registers nothing
    bm.mark_computed("a", bs - 1)
    assert sealed(bm, "a") == 0
    assert bm.allocate("c", prompt[:3 * bs] + [4]) == 0
    bm.free("c")
    # 2 of the 3 full blocks computed (plus part of the third)
    bm.mark_computed("a", 2 * bs + 1)
    assert sealed(bm, "a") == 2
    bm.check_invariants()
    assert bm.allocate("d", prompt[:3 * bs] + [5]) == 2 * bs
    assert bm.block_table("d")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("d")[2] != bm.block_table("a")[2]
    # the rest of the prompt computed: the third block becomes shareable too
    bm.mark_computed("a", len(prompt))
    assert sealed(bm, "a") == 3
    assert bm.allocate("e", prompt[:3 * bs] + [6]) == 3 * bs
    assert bm.block_table("e")[:3] == bm.block_table("a")[:3]
    bm.check_invariants()


def test_mark_computed_never_unseals():
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 4)
    assert sealed(bm, "a") == 2
    bm.mark_computed("a", 1)
    bm.mark_computed("a", 0)
    assert sealed(bm, "a") == 2
    bm.check_invariants()
    assert bm.allocate("b", [1, 2, 3, 4, 9]) == 4
    with pytest.raises(BlockManagerError):
        bm.mark_computed("zzz", 2)


def test_fork_keeps_sealed_count():
    bs = 2
    bm = BlockManager(num_blocks=16, block_size=bs)
    bm.allocate("p", [1, 2, 3, 4, 5, 6, 7])
    bm.mark_computed("p", 4)
    assert sealed(bm, "p") == 2
    bm.fork("p", "c")
    assert sealed(bm, "c") == 2
    assert bm.block_table("c") == bm.block_table("p")
    bm.check_invariants()
    table = bm.block_table("p")
    # the child alone keeps the shared blocks registered
    bm.free("p")
    assert sealed(bm, "c") == 2
    assert bm.allocate("x", [1, 2, 3, 4, 5, 6, 0]) == 2 * bs
    assert bm.block_table("x")[:2] == table[:2]
    bm.free("x")
    bm.mark_computed("c", 7)
    assert sealed(bm, "c") == 3
    bm.check_invariants()
    bm.free("c")
    assert bm.allocate("y", [1, 2, 3, 4, 5, 6, 0]) == 3 * bs
    assert bm.block_table("y")[:3] == table[:3]
    bm.check_invariants()


def test_fork_of_unsealed_blocks_then_both_mark_computed():
    bs = 2
    bm = BlockManager(num_blocks=16, block_size=bs)
    bm.allocate("p", [1, 2, 3, 4, 5])
    bm.fork("p", "c")
    assert sealed(bm, "c") == 0
    bm.mark_computed("p", 5)
    bm.mark_computed("c", 5)
    assert sealed(bm, "p") == sealed(bm, "c") == 2
    bm.check_invariants()
    bm.free("p")
    bm.free("c")
    assert bm.stats()["cached_evictable"] == 2
    assert bm.allocate("x", [1, 2, 3, 4, 0]) == 2 * bs
    bm.check_invariants()


def test_child_catching_up_after_fork_keeps_parent_chain():
    bs = 2
    bm = BlockManager(num_blocks=16, block_size=bs)
    bm.allocate("p", [1, 2, 3, 4, 5])
    bm.fork("p", "c")  # forked before the prompt's KV was marked computed
    bm.mark_computed("p", 5)
    bm.append_slots("p", [6])
    bm.mark_computed("p", 6)  # [5, 6] registered with [3, 4] as its parent
    bm.mark_computed("c", 5)  # the child catches up on its shared blocks
    bm.check_invariants()
    assert bm.allocate("x", [1, 2, 3, 4, 5, 6, 7]) == 3 * bs


def test_mark_computed_beyond_length_is_clamped():
    bs = 2
    bm = BlockManager(num_blocks=8, block_size=bs)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.mark_computed("a", 100)
    assert sealed(bm, "a") == 2  # the partial block is not registered
    bm.check_invariants()
    bm.append_slots("a", [6])
    assert sealed(bm, "a") == 2  # appending does not register the now full block
    bm.check_invariants()
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6, 0]) == 2 * bs
    bm.free("b")
    bm.mark_computed("a", 10**9)
    assert sealed(bm, "a") == 3
    bm.check_invariants()
    assert bm.allocate("c", [1, 2, 3, 4, 5, 6, 0]) == 3 * bs
    bm.check_invariants()


def test_preempted_sequence_hits_everything_marked_computed():
    bs = 2
    bm = BlockManager(num_blocks=12, block_size=bs)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate("a", prompt)
    bm.mark_computed("a", 3)  # first prefill chunk
    bm.mark_computed("a", 5)
    generated = [6, 7, 8, 9]
    for i, t in enumerate(generated):
        bm.append_slots("a", [t])
        bm.mark_computed("a", len(prompt) + i)  # the newest token's KV comes next step
    assert bm.num_tokens("a") == 9 and sealed(bm, "a") == 4
    table = bm.block_table("a")
    bm.free("a")
    assert bm.stats()["cached_evictable"] == 4
    assert bm.allocate("a", prompt + generated) == 4 * bs
    assert bm.block_table("a")[:4] == table[:4]
    assert sealed(bm, "a") == 4
    bm.check_invariants()
    # preempted again with only part of its KV reported computed
    more = [10, 11, 12, 13]
    bm.append_slots("a", more)  # blocks [9,10] and [11,12] full, [13] partial
    bm.mark_computed("a", 10)
    assert sealed(bm, "a") == 5
    table = bm.block_table("a")
    bm.free("a")
    assert bm.stats()["cached_evictable"] == 5
    assert bm.allocate("a", prompt + generated + more) == 5 * bs  # not [11,12]
    assert bm.block_table("a")[:5] == table[:5]
    bm.check_invariants()


# ---------------------------------------------------------------- stateful test
class BlockManagerMachine(RuleBasedStateMachine):
    """Simulates the KV cache: a token's KV is written only when its sequence is marked computed,
    so a prefix hit on a block whose KV was never written reads garbage and is caught."""

    prefix_caching = True

    def __init__(self):
        super().__init__()
        self.bm = None
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}  # leading tokens whose KV has been written
        self.kv: dict[int, list] = {}
        self.next_id = 0

    @initialize(num_blocks=st.integers(1, 16), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size, self.prefix_caching)
        self.bs = block_size

    # -- helpers
    def _owners(self, block):
        return [s for s in self.tokens if block in self.bm.block_table(s)]

    def _read(self, sid, n):
        table = self.bm.block_table(sid)
        return [self.kv.get(b, [None] * self.bs)[p % self.bs]
                for p, b in ((p, table[p // self.bs]) for p in range(n))]

    def _fresh(self, sid, blocks):
        """Newly taken blocks: owned by ``sid`` alone, holding no valid KV."""
        for b in blocks:
            assert self._owners(b) == [sid], f"fresh block {b} is shared"
            self.kv[b] = [None] * self.bs

    def _compute(self, sid, n):
        """The engine runs the model over tokens [computed, n) and writes their KV."""
        table = self.bm.block_table(sid)
        toks = self.tokens[sid]
        n = min(n, len(toks))
        for p in range(self.computed[sid], n):
            i = p // self.bs
            b = table[i]
            slot = self.kv[b][p % self.bs]
            for o in self._owners(b):
                # sharers of a block agree on its content, so the write is the same for all
                assert self.bm.block_table(o).index(b) == i
                assert len(self.tokens[o]) > p and self.tokens[o][p] == toks[p]
                if self.computed[o] > p:
                    assert slot == toks[p]
            self.kv[b][p % self.bs] = toks[p]
        self.computed[sid] = max(self.computed[sid], n)

    def _mark(self, sid, n):
        old = sealed(self.bm, sid)
        self._compute(sid, n)
        self.bm.mark_computed(sid, n)
        assert sealed(self.bm, sid) == max(old, min(n, len(self.tokens[sid])) // self.bs)

    def _mark_all(self):
        for sid in sorted(self.tokens):
            self._mark(sid, len(self.tokens[sid]))

    def _snapshot(self):
        return snapshot(self.bm, list(self.tokens))

    def _allocate(self, toks):
        sid = self.next_id
        self.next_id += 1
        ok = self.bm.can_allocate(toks)
        before = self._snapshot()
        if not ok:
            with pytest.raises(BlockManagerError):
                self.bm.allocate(sid, toks)
            assert self._snapshot() == before
            return
        cached = self.bm.allocate(sid, toks)
        assert cached % self.bs == 0
        assert cached == 0 or cached < len(toks)
        if not self.prefix_caching:
            assert cached == 0
        assert self.bm.num_cached_tokens(sid) == cached
        assert sealed(self.bm, sid) == cached // self.bs
        self.tokens[sid] = list(toks)
        self.computed[sid] = cached
        self._fresh(sid, self.bm.block_table(sid)[cached // self.bs:])
        got = self._read(sid, cached)
        assert got == toks[:cached], f"prefix hit reads {got}, expected {toks[:cached]}"

    # -- rules
    @rule(toks=st.lists(st.integers(0, 2), max_size=14),
          settle=st.sampled_from([True, True, True, False]))
    def allocate(self, toks, settle):
        if settle:  # usually every earlier step has completed, so its KV is computed
            self._mark_all()
        self._allocate(toks)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def mark_computed(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        lo = sealed(self.bm, sid) * self.bs
        n = data.draw(st.integers(lo, len(self.tokens[sid])))
        self._mark(sid, n)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data, new):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        before = self._snapshot()
        if not self.bm.can_append(sid, len(new)):
            with pytest.raises(BlockManagerError):
                self.bm.append_slots(sid, new)
            assert self._snapshot() == before
            return
        old_len = len(self.tokens[sid])
        old_table = self.bm.block_table(sid)
        old_sealed = sealed(self.bm, sid)
        copies = self.bm.append_slots(sid, new)
        assert sealed(self.bm, sid) == old_sealed
        table = self.bm.block_table(sid)
        for src, dst in copies:
            assert src in old_table and dst not in old_table
            assert table.index(dst) == old_table.index(src)
            self.kv[dst] = list(self.kv[src])
        dsts = {dst for _, dst in copies}
        self.tokens[sid].extend(new)
        self._fresh(sid, [b for b in table if b not in old_table and b not in dsts])
        for p in range(old_len, len(self.tokens[sid])):
            b = table[p // self.bs]
            assert self._owners(b) == [sid], f"write into shared block {b}"

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(sid, child)
        self.tokens[child] = list(self.tokens[sid])
        self.computed[child] = self.computed[sid]
        assert self.bm.block_table(child) == self.bm.block_table(sid)
        assert sealed(self.bm, child) == sealed(self.bm, sid)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), use_abort=st.booleans())
    def free(self, data, use_abort):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        (self.bm.abort if use_abort else self.bm.free)(sid)
        del self.tokens[sid], self.computed[sid]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def preempt_and_resume(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[sid]
        self._mark(sid, self.computed[sid])
        self.bm.free(sid)
        del self.tokens[sid], self.computed[sid]
        self._allocate(toks)

    @rule()
    def finish_all(self):
        for sid in list(self.tokens):
            self.bm.free(sid)
        self.tokens.clear()
        self.computed.clear()
        self.bm.check_invariants()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks

    @rule()
    def reset_cache(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        if self.bm is None:
            return
        self.bm.check_invariants()
        used = set()
        for sid, toks in self.tokens.items():
            table = self.bm.block_table(sid)
            assert len(table) == -(-len(toks) // self.bs)
            used.update(table)
            n = self.computed[sid]
            assert sealed(self.bm, sid) * self.bs <= n <= len(toks)
            got = self._read(sid, n)
            assert got == toks[:n], f"seq {sid} reads {got}, expected {toks[:n]}"
        assert self.bm.num_used_blocks == len(used)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(used)

    def teardown(self):
        if self.bm is None:
            return
        for sid in list(self.tokens):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks


class NoPrefixCacheMachine(BlockManagerMachine):
    prefix_caching = False


class WeakHashMachine(BlockManagerMachine):
    """Hashes that ignore the parent and collide often: sharing must stay correct."""

    def __init__(self):
        super().__init__()
        self._orig_hash = bm_mod.hash_block_tokens
        bm_mod.hash_block_tokens = lambda parent, tokens: hash(tuple(tokens)) % 3

    def teardown(self):
        try:
            super().teardown()
        finally:
            bm_mod.hash_block_tokens = self._orig_hash


_settings = settings(max_examples=200, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = _settings
TestBlockManagerNoPrefixStateful = NoPrefixCacheMachine.TestCase
TestBlockManagerNoPrefixStateful.settings = _settings
TestBlockManagerWeakHashStateful = WeakHashMachine.TestCase
TestBlockManagerWeakHashStateful.settings = _settings


def test_cpu_kv_capacity_counts_reclaimable_page_cache():
    """The CPU KV cache is sized from what the host can give (MemAvailable), not from free pages
    alone: a machine busy writing files has little free memory but much reclaimable cache."""
    import os

    from kiln.runtime.kv_cache import host_available_memory, memory_block_capacity

    avail = host_available_memory()
    assert avail > 0
    if os.path.exists("/proc/meminfo"):
        assert avail >= os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.9
    per_block = 2 * 4 * 16 * 2 * 64 * 4  # K and V, 4 layers, 16 slots, 2 heads of 64 floats
    cap = memory_block_capacity(4, 2, 64, 16, __import__("torch").float32, "cpu")
    assert abs(cap * per_block - avail / 4) < 0.05 * avail / 4
