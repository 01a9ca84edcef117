"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, length bucket).

A decode step of a small model on a GPU is a few hundred tiny kernels; launching them one by
one from Python costs more than running them. A CUDA graph records the step once and replays
it with one launch, but everything it does must have fixed shapes and live at fixed addresses.
So a graphed step is laid out by slot, not by request: row i is KV-cache slot i, for every
slot below a batch bucket B (1, 2, 4, 8, 16, 24, 32, 48, 64, ...), and attention reads the
first L keys of each slot, L a length bucket (256, 512, ... up to max_len) masked per row by
the slot's own length. Inputs are copied into static buffers, the graph for (B, L) replays,
and the logits rows of the slots actually decoding are returned.

Rows of slots that are not decoding this step are padding. They must not disturb anything: a
pad row feeds token 0 at position max_len - 1 of its slot and attends to key 0 only. A slot
reads position max_len - 1 only in the step that writes its own token there (a token's K/V
are written before attention reads them), so the garbage is overwritten before it is ever
read; and only decode-only steps are graphed (a request mid-prefill always has a chunk in
the step), so no real write to a pad slot happens in the same step.

Mixed steps (prefill chunks plus decode rows), sparse slot sets and batches beyond the largest
bucket run eagerly. Without CUDA (`capture=False`, the CPU tests) the same static buffers and
slot-row layout run eagerly, which is how this layout is tested where CI has no GPU.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from model.attention import AttentionBatch
from model.kv_cache import KVCachePool
from model.llama import LlamaModel, graph_step

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

MIN_LENGTH_BUCKET = 256


def batch_buckets(n_slots: int, max_batch: int = 256) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 32, of 16 to 64, of 32 beyond; capped at the slot count."""
    sizes, b = [1, 2, 4], 8
    while b < min(n_slots, max_batch):
        sizes.append(b)
        b += 8 if b < 32 else 16 if b < 64 else 32
    return [s for s in sizes if s < n_slots] + [min(n_slots, max_batch)]


def length_buckets(max_len: int) -> list[int]:
    """Powers of two from 256, capped at max_len: a row never reads more than 2x its keys."""
    lengths, n = [], MIN_LENGTH_BUCKET
    while n < max_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_len]


class DecodeGraphs:
    def __init__(self, model: LlamaModel, pool: KVCachePool, capture: bool,
                 max_batch: int = 256) -> None:
        self.model = model
        self.pool = pool
        self.capture = capture
        self.batch_sizes = batch_buckets(pool.n_slots, max_batch)
        self.lengths = length_buckets(pool.max_len)
        n, device = self.batch_sizes[-1], pool.device
        # Static inputs and output: graphs read and write these addresses on every replay.
        # Rows of `inputs`: token id, position, length, and which rows the caller wants. Each
        # is contiguous: the kernels take positions and lengths as plain vectors, and columns
        # of a (n, 4) block cost two copies a layer (on an H100 at 64 rows, 64 kernels a
        # step). The whole block, 32 bytes a row, is copied each step.
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.seq_lens, self.rows = self.inputs.unbind(0)
        # Staged on the host, pinned where that allows one asynchronous copy per step; the
        # event says when the device has read it (normally long ago: the step's sampled
        # tokens were read back, unless that step failed).
        self.staging = torch.zeros(4, n, dtype=torch.long, pin_memory=device.type == "cuda")
        self._staging_read = torch.cuda.Event() if device.type == "cuda" else None
        self.logits = torch.zeros(n, model.config.vocab_size, dtype=torch.float32,
                                  device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    @property
    def num_graphs(self) -> int:
        return len(self.batch_sizes) * len(self.lengths)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Record every (batch, length) graph; largest first, so smaller ones fit in the memory
        pool the largest left. Nothing else may run on the device meanwhile (start-up)."""
        if not self.capture:
            return
        start, device = time.perf_counter(), self.pool.device
        # Everything on the pool's device (cuda:N too) and on one private stream: a stream
        # per capture would leave a cuBLAS workspace behind for each, and a capture on a
        # stream shared with other graphs can lose its workspace when they are freed.
        with torch.cuda.device(device):
            if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # so they land in the pool
                torch._C._cuda_clearCublasWorkspaces()
            stream = torch.cuda.Stream(device)
            mempool = torch.cuda.graph_pool_handle()
            for batch in reversed(self.batch_sizes):
                self._pad_rows(self.inputs[:, :batch])
                # Warm up outside the capture: lazy initialisation must not be recorded, and
                # Triton compiles a kernel variant on its first launch (decode attention's
                # depends on the length: see triton_kernels.attention_splits).
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for length in self.lengths:
                        self.forward(batch, length)
                torch.cuda.current_stream(device).wait_stream(stream)
                for length in reversed(self.lengths):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=mempool, stream=stream):
                        self.forward(batch, length)
                    self.graphs[batch, length] = graph
            torch.cuda.synchronize(device)
        logger.info("captured %d CUDA graphs for decode (batch %s x length %s) in %.1f s",
                    len(self.graphs), self.batch_sizes, self.lengths,
                    time.perf_counter() - start)

    def bucket(self, slots: list[int], positions: list[int]) -> tuple[int, int] | None:
        """The (batch, length) graph that covers these decode rows, or None to run eagerly."""
        rows_needed = max(slots) + 1
        i = bisect.bisect_left(self.batch_sizes, rows_needed)
        j = bisect.bisect_left(self.lengths, max(positions) + 1)
        if i == len(self.batch_sizes) or j == len(self.lengths):
            return None
        batch = self.batch_sizes[i]
        if batch > 8 and 4 * len(slots) < batch:  # mostly padding: eager reads less
            return None
        return batch, self.lengths[j]

    @torch.inference_mode()
    def run(self, slots: list[int], token_ids: list[int], positions: list[int],
            feed: Tensor | None = None) -> Tensor | None:
        """Logits (len(slots), vocab) of one decode step, rows in the order given; each row
        feeds `token_ids[i]` at `positions[i]` of slot `slots[i]`. With `feed` (token ids on
        the device: the step before's, not yet read back), `token_ids[i]` is the row of
        `feed` to take instead. None: not graphable."""
        key = self.bucket(slots, positions)
        if key is None:
            return None
        batch, length = key
        if self._staging_read is not None:
            self._staging_read.synchronize()
        staging = self._pad_rows(self.staging[:, :batch])
        if feed is not None:
            staging[0] = len(feed)  # a pad row's index: the 0 appended to `feed` below
        slot_ids = torch.tensor(slots, dtype=torch.long)
        staging[0, slot_ids] = torch.tensor(token_ids, dtype=torch.long)
        at = torch.tensor(positions, dtype=torch.long)
        staging[1, slot_ids], staging[2, slot_ids] = at, at + 1
        staging[3, :len(slots)] = slot_ids
        # Whole, as one transfer (the rows past `batch` are stale; this graph reads none)
        self.inputs.copy_(self.staging, non_blocking=True)
        if self._staging_read is not None:
            self._staging_read.record()
        if feed is not None:  # the rows' indices into feed become its ids, on the device
            padded = torch.cat([feed, feed.new_zeros(1)])
            self.input_ids[:batch] = padded[self.input_ids[:batch]]
        if self.capture:
            self.graphs[key].replay()
        else:
            self.forward(batch, length)
        return self.logits[self.rows[:len(slots)]]  # a copy: the next replay overwrites logits

    def _pad_rows(self, block: Tensor) -> Tensor:
        """Make every row of an inputs block (4, batch) a pad row: token 0 at max_len - 1,
        one key (see the module docstring). Capture warms up with these."""
        block[0], block[1], block[2] = 0, self.pool.max_len - 1, 1
        return block

    def forward(self, batch: int, length: int) -> None:
        """One step of the first `batch` static rows over `length` keys, run eagerly: what a
        graph records, and what runs in its place without CUDA."""
        positions = self.positions[:batch]
        attention = AttentionBatch.slot_rows(positions, self.seq_lens[:batch], length)
        with graph_step():
            logits = self.model(self.input_ids[:batch], positions, self.pool, attention)
        self.logits[:batch].copy_(logits)
