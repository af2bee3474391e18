"""Paged KV cache bookkeeping: which block ids each sequence uses.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a block
table (a list of block ids, in token order). Blocks are reference counted so that forked
sequences and prefix-cache hits share them; a shared partially filled block that is about to be
written is copied on write, which is reported to the caller as ``(src, dst)`` pairs. This module
never touches tensors.

Prefix caching: every full block gets a chain hash ``hash_block_tokens(parent_hash, tokens)``.
Registered blocks whose refcount drops to zero are kept as evictable (LRU) and revived on a hit.
A hit is accepted only when the stored tokens equal the looked-up tokens and the stored block's
parent is the block matched one position earlier (tracked by a never-reused content serial), so
hash collisions can never cause a wrong block to be shared.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence


class BlockManagerError(RuntimeError):
    """Raised on an impossible request: out of blocks, unknown or duplicate sequence id."""


def hash_block_tokens(parent_hash: Optional[int], tokens: Sequence[int]) -> int:
    """Chain hash of one full block given the hash of the block before it (None for the first)."""
    return hash((parent_hash, tuple(tokens)))


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain hash of each full block, in order
    num_cached: int = 0
    sealed: int = 0  # leading full blocks registered in the prefix cache (their KV is computed)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 0 or block_size < 1:
            raise ValueError("num_blocks must be >= 0 and block_size >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        # per-block content metadata; set for full blocks while prefix caching is on
        self._hash: list[Optional[int]] = [None] * num_blocks  # registered hash, or None
        self._parent_hash: list[Optional[int]] = [None] * num_blocks
        self._tokens: list[Optional[tuple[int, ...]]] = [None] * num_blocks
        self._serial: list[Optional[int]] = [None] * num_blocks
        self._parent_serial: list[Optional[int]] = [None] * num_blocks
        self._next_serial = 0
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._hash_map: dict[int, int] = {}
        self._seqs: dict[Hashable, _Seq] = {}
        self._num_used = 0
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used

    def _seq(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise BlockManagerError(f"unknown sequence {seq_id!r}") from None

    def has_seq(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).table)

    def live_table(self, seq_id) -> list[int]:
        """The sequence's block table itself (not a copy; do not modify). It only ever grows at
        its end or has its last entry replaced by copy-on-write."""
        return self._seq(seq_id).table

    def num_tokens(self, seq_id) -> int:
        return len(self._seq(seq_id).tokens)

    def num_cached_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_cached

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookup(self, token_ids: Sequence[int], max_hit_tokens: Optional[int] = None) -> tuple[list[int], list[int]]:
        """Chain hashes of every full block, and the ids of the leading blocks found cached.

        Lookup stops before the block holding the last token, so at least one token is computed,
        and takes no more than ``max_hit_tokens`` tokens from the cache when that is given.
        """
        bs = self.block_size
        hashes: list[int] = []
        hits: list[int] = []
        parent: Optional[int] = None
        for i in range(len(token_ids) // bs):
            h = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            parent = h
        if not self.enable_prefix_caching:
            return hashes, hits
        max_hits = max(0, (len(token_ids) - 1) // bs)
        if max_hit_tokens is not None:
            max_hits = min(max_hits, max(0, max_hit_tokens) // bs)
        prev_serial: Optional[int] = None
        for i in range(max_hits):
            b = self._hash_map.get(hashes[i])
            if b is None:
                break
            if self._tokens[b] != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            if self._parent_serial[b] != prev_serial:
                break
            hits.append(b)
            prev_serial = self._serial[b]
        return hashes, hits

    def can_allocate(self, token_ids: list[int], max_hit_tokens: Optional[int] = None) -> bool:
        _, hits = self._lookup(token_ids, max_hit_tokens)
        need = self._blocks_for(len(token_ids)) - len(hits)
        revived = sum(1 for b in hits if self._ref[b] == 0)
        return self.num_free_blocks - revived >= need

    def _cow_needed(self, s: _Seq, num_new_tokens: int) -> bool:
        return (num_new_tokens > 0 and len(s.tokens) % self.block_size != 0
                and self._ref[s.table[-1]] > 1)

    def _append_need(self, s: _Seq, num_new_tokens: int) -> int:
        grow = self._blocks_for(len(s.tokens) + num_new_tokens) - len(s.table)
        return grow + (1 if self._cow_needed(s, num_new_tokens) else 0)

    def can_append(self, seq_id, num_new_tokens: int) -> bool:
        s = self._seq(seq_id)
        if num_new_tokens == 1:  # a decode step's token that fits the last block, held by this sequence alone
            n = len(s.tokens)
            if n % self.block_size and len(s.table) * self.block_size > n and self._ref[s.table[-1]] == 1:
                return True
        return self._append_need(s, num_new_tokens) <= self.num_free_blocks

    # ------------------------------------------------------------------ block pool
    def _clear_meta(self, b: int) -> None:
        self._hash[b] = None
        self._parent_hash[b] = None
        self._tokens[b] = None
        self._serial[b] = None
        self._parent_serial[b] = None

    def _take_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self._hash_map[self._hash[b]]
            self._clear_meta(b)
        else:
            raise BlockManagerError("out of KV cache blocks")
        self._ref[b] = 1
        self._num_used += 1
        return b

    def _incref(self, b: int) -> None:
        if self._ref[b] == 0:
            self._evictable.pop(b)
            self._num_used += 1
        self._ref[b] += 1

    def _decref(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] > 0:
            return
        self._num_used -= 1
        if self._hash[b] is not None:
            self._evictable[b] = None
        else:
            self._clear_meta(b)
            self._free.append(b)

    def _seal(self, s: _Seq, i: int) -> None:
        """Block ``i`` of ``s`` just became full: record its content and register it."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        b = s.table[i]
        if self._tokens[b] is not None:
            return  # already sealed through another sequence sharing it (a fork)
        h = s.hashes[i]
        self._tokens[b] = tuple(s.tokens[i * bs:(i + 1) * bs])
        self._parent_hash[b] = s.hashes[i - 1] if i > 0 else None
        self._parent_serial[b] = self._serial[s.table[i - 1]] if i > 0 else None
        self._serial[b] = self._next_serial
        self._next_serial += 1
        other = self._hash_map.get(h)
        if other is not None:
            if self._ref[other] > 0:
                return  # an in-use block holds this hash; leave this one unregistered
            self._evictable.pop(other)
            del self._hash_map[h]
            self._clear_meta(other)
            self._free.append(other)
        self._hash[b] = h
        self._hash_map[h] = b

    # ------------------------------------------------------------------ mutations
    def allocate(self, seq_id, token_ids: list[int], max_hit_tokens: Optional[int] = None) -> int:
        """Blocks for a new sequence, reusing cached leading blocks (at most ``max_hit_tokens``
        tokens of them when given); returns how many tokens came from the cache."""
        if seq_id in self._seqs:
            raise BlockManagerError(f"sequence {seq_id!r} already allocated")
        token_ids = list(token_ids)
        hashes, hits = self._lookup(token_ids, max_hit_tokens)
        total = self._blocks_for(len(token_ids))
        revived = sum(1 for b in hits if self._ref[b] == 0)
        if self.num_free_blocks - revived < total - len(hits):
            raise BlockManagerError(
                f"out of KV cache blocks: need {total - len(hits)}, "
                f"have {self.num_free_blocks - revived}")
        s = _Seq(tokens=token_ids, hashes=hashes, num_cached=len(hits) * self.block_size)
        for b in hits:  # revive hits before taking fresh blocks so none of them is evicted
            self._incref(b)
            s.table.append(b)
        for _ in range(total - len(hits)):
            s.table.append(self._take_block())
        s.sealed = len(hits)
        if self.enable_prefix_caching:
            self._prefix_queries += max(0, (len(token_ids) - 1) // self.block_size)
            self._prefix_hits += len(hits)
        self._seqs[seq_id] = s
        return s.num_cached

    def append_slots(self, seq_id, new_token_ids: list[int]) -> list[tuple[int, int]]:
        s = self._seq(seq_id)
        bs = self.block_size
        if len(new_token_ids) == 1:
            # A decode step's token: it fits the last block, which this sequence alone holds.
            n = len(s.tokens)
            r = n % bs
            if r and len(s.table) * bs > n and self._ref[s.table[-1]] == 1:
                s.tokens.append(new_token_ids[0])
                if r == bs - 1:
                    i = n // bs
                    s.hashes.append(hash_block_tokens(s.hashes[i - 1] if i > 0 else None, s.tokens[i * bs:]))
                return []
        new_token_ids = list(new_token_ids)
        need = self._append_need(s, len(new_token_ids))
        if need > self.num_free_blocks:
            raise BlockManagerError(
                f"out of KV cache blocks: need {need}, have {self.num_free_blocks}")
        copies: list[tuple[int, int]] = []
        if self._cow_needed(s, len(new_token_ids)):
            src = s.table[-1]
            dst = self._take_block()
            self._decref(src)
            s.table[-1] = dst
            copies.append((src, dst))
        for _ in range(self._blocks_for(len(s.tokens) + len(new_token_ids)) - len(s.table)):
            s.table.append(self._take_block())
        first_new_full = len(s.tokens) // bs
        s.tokens.extend(new_token_ids)
        for i in range(first_new_full, len(s.tokens) // bs):
            parent = s.hashes[i - 1] if i > 0 else None
            s.hashes.append(hash_block_tokens(parent, s.tokens[i * bs:(i + 1) * bs]))
        return copies

    def set_token(self, seq_id, position: int, token_id: int) -> None:
        """Replaces a placeholder token (overlapped scheduling) and rehashes the blocks from it on.
        The block must not be in the prefix cache yet."""
        s = self._seq(seq_id)
        bs = self.block_size
        i = position // bs
        if i < s.sealed:
            raise BlockManagerError(f"sequence {seq_id!r}: position {position} is in a cached block")
        s.tokens[position] = token_id
        if i < len(s.hashes):
            del s.hashes[i:]
            for j in range(i, len(s.tokens) // bs):
                parent = s.hashes[j - 1] if j > 0 else None
                s.hashes.append(hash_block_tokens(parent, s.tokens[j * bs:(j + 1) * bs]))

    def mark_computed(self, seq_id, num_tokens: int) -> None:
        """The first ``num_tokens`` tokens of the sequence have their KV in the cache: full blocks
        among them join the prefix cache. Until then no other sequence can hit them, so a
        prompt prefilled in chunks is never read before it is written."""
        s = self._seq(seq_id)
        upto = min(num_tokens // self.block_size, len(s.hashes))
        if upto <= s.sealed:
            return
        for i in range(s.sealed, upto):
            self._seal(s, i)
        s.sealed = max(s.sealed, upto)

    def fork(self, parent_seq_id, child_seq_id) -> None:
        p = self._seq(parent_seq_id)
        if child_seq_id in self._seqs:
            raise BlockManagerError(f"sequence {child_seq_id!r} already allocated")
        for b in p.table:
            self._incref(b)
        self._seqs[child_seq_id] = _Seq(table=list(p.table), tokens=list(p.tokens),
                                        hashes=list(p.hashes), num_cached=p.num_cached, sealed=p.sealed)

    def free(self, seq_id) -> None:
        s = self._seq(seq_id)
        del self._seqs[seq_id]
        # tail blocks first, so they are evicted before the (more shareable) head blocks
        for b in reversed(s.table):
            self._decref(b)

    abort = free

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Drops the sequence's tokens from ``num_tokens`` on (rejected speculative proposals) and
        the blocks no token needs any more. The dropped tokens must not be in cached blocks."""
        s = self._seq(seq_id)
        bs = self.block_size
        if num_tokens > len(s.tokens):
            raise BlockManagerError(f"sequence {seq_id!r}: cannot truncate {len(s.tokens)} tokens to {num_tokens}")
        if num_tokens < s.sealed * bs:
            raise BlockManagerError(f"sequence {seq_id!r}: position {num_tokens} is in a cached block")
        del s.tokens[num_tokens:]
        del s.hashes[num_tokens // bs :]
        keep = self._blocks_for(num_tokens)
        for b in reversed(s.table[keep:]):
            self._decref(b)
        del s.table[keep:]

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; evictable blocks become plainly free."""
        for b in list(self._evictable):
            self._clear_meta(b)
            self._free.append(b)
        self._evictable.clear()
        for b in self._hash_map.values():
            self._hash[b] = None
        self._hash_map.clear()

    def stats(self) -> dict:
        """Counters; ``prefix_queries`` and ``prefix_hits`` count full blocks."""
        q = self._prefix_queries
        return {
            "num_blocks": self.num_blocks,
            "used": self._num_used,
            "free": self.num_free_blocks,
            "cached_evictable": len(self._evictable),
            "prefix_queries": q,
            "prefix_hits": self._prefix_hits,
            "hit_rate": self._prefix_hits / q if q else 0.0,
        }

    def check_invariants(self) -> None:
        bs = self.block_size
        counts = [0] * self.num_blocks
        for sid, s in self._seqs.items():
            assert len(s.table) == self._blocks_for(len(s.tokens)), sid
            assert len(set(s.table)) == len(s.table), sid
            assert len(s.hashes) == len(s.tokens) // bs, sid
            for b in s.table:
                counts[b] += 1
            if self.enable_prefix_caching:
                for i in range(s.sealed):
                    b = s.table[i]
                    assert self._tokens[b] == tuple(s.tokens[i * bs:(i + 1) * bs]), (sid, i)
        assert counts == self._ref, "refcounts disagree with block tables"
        used = sum(1 for c in counts if c > 0)
        assert used == self._num_used
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "duplicate in free list"
        assert not free_set & set(self._evictable), "block both free and evictable"
        for b in free_set | set(self._evictable):
            assert self._ref[b] == 0, f"free block {b} is referenced"
        assert len(self._free) + len(self._evictable) + used == self.num_blocks
        for b in self._free:
            assert self._hash[b] is None and self._tokens[b] is None
        for b in self._evictable:
            assert self._hash[b] is not None and self._hash_map.get(self._hash[b]) == b
        registered = 0
        for b in range(self.num_blocks):
            if self._hash[b] is not None:
                registered += 1
                assert self._hash_map.get(self._hash[b]) == b
        assert registered == len(self._hash_map)
        for h, b in self._hash_map.items():
            toks = self._tokens[b]
            assert toks is not None and len(toks) == bs
            assert self._hash[b] == h
            assert hash_block_tokens(self._parent_hash[b], toks) == h
        if not self.enable_prefix_caching:
            assert not self._hash_map and not self._evictable
