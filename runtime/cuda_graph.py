"""CUDA graphs for decode steps: captured once at load for padded batch-size buckets, replayed
every decode-only step.

A decode step launches hundreds of small kernels; replaying a graph launches them all at once,
so the GPU never waits on Python between them. Every input lives in a persistent buffer at a
fixed address; a step copies its inputs in (one host-to-device copy per buffer from pinned
staging), replays the graph of the smallest bucket that fits, and reads the hidden states out.
Padding rows write no KV (slot -1) and attend to one token of block 0; their outputs are dropped.
On a one-rank model the graph also holds the LM head: a step's float32 logits come out of the
replay with the hidden states (``last_logits``), so sampling starts straight after it.
"""

from __future__ import annotations

import torch

from kiln.kernels.attention import AttentionMetadata


def buckets_for(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(512, 1 << 16, 256))
    out = [b for b in sizes if b < max_batch_size]
    return out + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model, kv, max_batch_size: int, max_seq_len: int, block_size: int):
        self.model = model
        self.kv = kv
        self.device = kv.device
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        self.buckets = buckets_for(max_batch_size)
        n = self.buckets[-1]
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        # Pinned staging: one packed row of ints per sequence, copied in one transfer. Two buffers
        # used in turn: with overlapped scheduling the host fills one while the previous step's
        # copy from the other may still be queued.
        self._stages = [torch.zeros(n, 4 + self.max_blocks, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.with_logits = model.mapping.tp == 1 and model.mapping.is_last_stage
        self.logits: dict[int, torch.Tensor] = {}
        self.last_logits: torch.Tensor | None = None  # the logits of the last ``run``, or None
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.max_seq_len] * b,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            sliding_window=self.model.cfg.sliding_window,
        )

    def _run(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, _ = self.model(self.input_ids[:b], self.positions[:b], self.kv.layers, self._meta(b))
        return h, (self.model.compute_logits(h) if self.with_logits else None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures the largest bucket first so smaller ones reuse its memory pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(self.buckets[-1])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out, logits = self._run(b)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[b] = g
            self.outputs[b] = out
            if logits is not None:
                self.logits[b] = logits
        torch.cuda.synchronize(self.device)

    def fits(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.buckets[-1]

    def run(self, ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int], tables: list[list[int]],
            fix=None) -> torch.Tensor:
        """One decode step of ``len(ids)`` sequences; returns their final hidden states. ``fix``,
        if given, is called with the staged input ids before the replay (device-resident tokens)."""
        n = len(ids)
        b = next(x for x in self.buckets if x >= n)
        stage = self._stages[self._turn]
        self._turn ^= 1
        st = stage.numpy()
        st[:b, 0] = 0
        st[:b, 1] = 0
        st[:b, 2] = -1
        st[:b, 3] = 1
        st[:n, 0] = ids
        st[:n, 1] = positions
        st[:n, 2] = slots
        st[:n, 3] = seq_lens
        width = 0
        for i, t in enumerate(tables):
            st[i, 4 : 4 + len(t)] = t
            width = max(width, len(t))
        st[n:b, 4] = 0
        dev = stage[:b].to(self.device, non_blocking=True)
        self.input_ids[:b].copy_(dev[:, 0])
        self.positions[:b].copy_(dev[:, 1])
        self.slot_mapping[:b].copy_(dev[:, 2])
        self.seq_lens[:b].copy_(dev[:, 3])
        self.block_tables[:b, : max(width, 1)].copy_(dev[:, 4 : 4 + max(width, 1)])
        if fix is not None:
            fix(self.input_ids[:n])
        self.graphs[b].replay()
        self.last_logits = self.logits[b][:n] if self.with_logits else None
        return self.outputs[b][:n]

