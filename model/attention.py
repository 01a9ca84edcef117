"""Attention over a flat batch of tokens from many sequences, each in its own KV-cache slot.

A step's tokens are laid out decode rows first (one token per decoding sequence), then the
prefill chunks, each contiguous. Every token carries its own slot and position: its K and V are
written at `cache[slot, :, position]` and it attends to `cache[slot, :, :position + 1]`. Reads
cover only the filled part of the slots in use, so the cost follows the lengths in use.

Cache layout (see kv_cache.py): (n_slots, KVH, max_len, D). Grouped-query heads are never
expanded: queries are viewed as (…, KVH, G, D) against their shared K/V head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.cpu_kernels import CpuKernels

Tensor = torch.Tensor


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    """A run of consecutive tokens of one sequence, at positions start..start+n_tokens-1."""

    slot: int
    start: int  # position of the first token; the slot already holds [0, start)
    n_tokens: int
    offset: int  # index of the first token in the flat batch


@dataclass(slots=True)
class AttentionBatch:
    """Where each token of a step goes in the KV cache and what it may attend to.

    Built by the runner with `build`. `slot_ids` and `positions` have one entry per token
    (T,); the first `n_decode` tokens are single-token decode rows of `decode_slots`; then
    come the `prefills`. How the decode rows read the cache is decided here, once per step
    rather than per layer: when their slots form a packed enough run [lo, hi] (under CUDA
    graphs the scheduler hands out the lowest free slot) the run is read as one strided view
    (`decode_run`), else the slots are gathered. (The C and Triton kernels read each row's
    own slot.)
    """

    slot_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    n_decode: int = 0
    decode_slots: Tensor | None = None  # (n_decode,) int64
    decode_lens: Tensor | None = None  # (n_decode,) int64: keys each row sees, its own included
    decode_max_len: int = 0  # longest decode row, keys included: how far the rows read
    decode_run: tuple[int, int] | None = None  # (lo, hi) slots read as one view; None: gather
    decode_rows: Tensor | None = None  # each row's index in the run; None: the run is the rows
    # Keys each row of the read (run or gather) sees; a hole in a run sees none. The decode
    # mask is built from them on first use (decode_bias): the C kernel reads decode_lens.
    decode_read_lens: Tensor | None = None  # (S,) int64
    prefills: tuple[PrefillSpan, ...] = ()
    _decode_bias: Tensor | None = None

    @classmethod
    def build(cls, decode_slots: list[int], decode_positions: list[int],
              prefills: list[PrefillSpan], device: torch.device | str) -> AttentionBatch:
        """From host lists: decode rows (slot, position of the new token), then prefill spans
        whose offsets follow the decode rows in the flat batch."""
        slots, positions = list(decode_slots), list(decode_positions)
        for span in prefills:
            slots += [span.slot] * span.n_tokens
            positions += range(span.start, span.start + span.n_tokens)
        lens = row_lens = [p + 1 for p in decode_positions]  # keys each row sees, its own too

        def tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        run = rows = None
        if decode_slots:
            lo, hi = min(decode_slots), max(decode_slots)
            if hi - lo + 1 <= 2 * len(decode_slots):  # dense enough: compute the holes, drop them
                run = (lo, hi)
                if decode_slots != list(range(lo, hi + 1)):
                    rows = [s - lo for s in decode_slots]
                    run_lens = [0] * (hi - lo + 1)  # a hole sees no key
                    for row, n in zip(rows, lens, strict=True):
                        run_lens[row] = n
                    lens = run_lens
        max_len = max(lens, default=0)
        decode_lens = tensor(row_lens)
        slot_ids = tensor(slots)
        return cls(slot_ids=slot_ids, positions=tensor(positions),
                   n_decode=len(decode_slots),
                   # a decode-only step's tokens are its decode rows: one tensor for both
                   decode_slots=slot_ids if not prefills else tensor(decode_slots),
                   decode_lens=decode_lens, decode_max_len=max_len, decode_run=run,
                   decode_rows=tensor(rows) if rows is not None else None,
                   # the rows' own lengths unless the run has holes
                   decode_read_lens=decode_lens if lens is row_lens else tensor(lens),
                   prefills=tuple(prefills))

    @classmethod
    def slot_rows(cls, positions: Tensor, seq_lens: Tensor, n_len: int) -> AttentionBatch:
        """A decode-only step whose row i is slot i, built from device tensors alone (no host
        values but `n_len`), so a CUDA graph can capture it: every row writes at its position
        and reads its first `seq_lens[i]` keys out of `n_len`. See decode_graphs.py."""
        n_rows = positions.shape[0]
        slots = torch.arange(n_rows, device=positions.device)
        return cls(slot_ids=slots, positions=positions, n_decode=n_rows, decode_slots=slots,
                   decode_lens=seq_lens, decode_max_len=n_len, decode_run=(0, n_rows - 1),
                   decode_read_lens=seq_lens)

    def decode_bias(self, dtype: torch.dtype) -> Tensor:
        """(S, 1, 1, decode_max_len) additive mask of the decode rows: 0 on the keys a row
        sees, -inf past its length. Built once a step and shared by every layer: a boolean
        mask is turned into this by SDPA on every call (two more kernels a layer, which on a
        GPU cost more than they compute)."""
        if self._decode_bias is None or self._decode_bias.dtype != dtype:
            lens = self.decode_read_lens
            assert lens is not None
            visible = torch.arange(self.decode_max_len, device=lens.device) < lens[:, None]
            bias = torch.full(visible.shape, float("-inf"), dtype=dtype, device=lens.device)
            self._decode_bias = bias.masked_fill_(visible, 0.0)[:, None, None]
        return self._decode_bias


def check_rope_store_args(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                          v_cache: Tensor, slots: Tensor, positions: Tensor, n_heads: int,
                          supported: bool) -> None:
    """The layout every rope_store kernel (C, Triton) takes on trust: qkv (T, H + 2 KVH, D),
    cos and sin (T, D), caches (n_slots, KVH, max_len, D), one dtype, all contiguous; slots
    and positions (T,) int64. `supported`: the kernel's own dtype and head-size terms."""
    n_tokens, n_all, head_dim = qkv.shape
    if not (supported and qkv.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype
            and all(t.is_contiguous() for t in (qkv, cos, sin, k_cache, v_cache))
            and cos.shape == sin.shape == (n_tokens, head_dim)
            and v_cache.shape == k_cache.shape and k_cache.shape[3] == head_dim
            and n_all == n_heads + 2 * k_cache.shape[1]
            and slots.dtype == positions.dtype == torch.int64
            and slots.shape == positions.shape == (n_tokens,)):
        raise ValueError("rope_store: unexpected shapes, dtypes or layout")


def check_decode_attention_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                                lens: Tensor, longest: int, supported: bool) -> None:
    """The layout every decode_attention kernel (C, Triton) takes on trust: q (R, H, D),
    caches (n_slots, KVH, max_len, D) contiguous in q's dtype, H a multiple of KVH; slots and
    lens (R,) int64; 0 <= longest <= max_len. `supported`: the kernel's own terms."""
    n_rows, n_heads, head_dim = q.shape
    n_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if not (supported and q.dtype == k_cache.dtype == v_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.shape == k_cache.shape and k_cache.shape[3] == head_dim
            and n_heads % n_kv_heads == 0 and slots.dtype == lens.dtype == torch.int64
            and slots.shape == lens.shape == (n_rows,) and 0 <= longest <= max_len):
        raise ValueError("decode_attention: unexpected shapes, dtypes or layout")


def attend_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One sequence without a cache. q (T, H, D), k/v (T, KVH, D) -> (T, H, D)."""
    out = F.scaled_dot_product_attention(
        _heads_first(q), _heads_first(k), _heads_first(v), is_causal=True,
        enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def _heads_first(x: Tensor) -> Tensor:
    """(T, heads, D) -> (1, heads, T, D). SDPA's fused kernels take 4-D inputs only: given 3-D
    ones it falls back to the unfused product, which on CPU measured 1.5x (128 tokens) to 1.7x
    (a 256-token chunk after 1792 cached) slower and materialises every score."""
    return x.transpose(0, 1)[None]


def attend_cached(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch,
                  kernels: CpuKernels | None = None) -> Tensor:
    """Attention for a step whose K/V are already written to the cache.

    q (T, H, D); k_cache/v_cache (n_slots, KVH, max_len, D) -> (T, H, D). With `kernels`
    (the packed CPU float32 path) the decode rows run its decode attention.
    """
    if not batch.prefills:  # a decode-only step: no output buffer to assemble
        return _attend_decode(q, k_cache, v_cache, batch, kernels)
    out = torch.empty_like(q)
    if batch.n_decode:
        out[: batch.n_decode] = _attend_decode(q[: batch.n_decode], k_cache, v_cache, batch,
                                               kernels)
    gqa = q.shape[1] != k_cache.shape[1]
    for span in batch.prefills:
        end = span.start + span.n_tokens
        rows = slice(span.offset, span.offset + span.n_tokens)
        qs = _heads_first(q[rows])  # (1, H, n, D)
        ks = k_cache[span.slot:span.slot + 1, :, :end]  # (1, KVH, end, D)
        vs = v_cache[span.slot:span.slot + 1, :, :end]
        if span.start == 0:  # a whole prompt (or its first chunk): plain causal attention
            span_out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        else:  # query i sits at position start + i and sees keys 0..start + i
            q_pos = torch.arange(span.start, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]  # (n, end)
            span_out = masked_attention(qs, ks, vs, mask, repeat_kv=gqa and q.is_cuda)
        out[rows] = span_out[0].transpose(0, 1)
    return out


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, repeat_kv: bool) -> Tensor:
    """SDPA of q (1, H, n, D) over k/v (1, KVH, end, D) under a boolean mask (n, end). With
    `repeat_kv` each query head gets its K/V head repeated instead of SDPA's `enable_gqa`: on
    CUDA, a mask with grouped heads has no fused kernel (flash takes no mask, the
    memory-efficient one no GQA) and SDPA falls back to its math path, whose fp32 scores
    (H x n x end) run to gigabytes for a long prompt's later chunks; transformers repeats
    K/V there for the same reason. (CPU keeps `enable_gqa`: its fused kernel takes both.)"""
    gqa = q.shape[1] != k.shape[1]
    if gqa and repeat_kv:
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _attend_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch,
                   kernels: CpuKernels | None) -> Tensor:
    """One query per row, all rows in one batched product over their first decode_max_len keys.

    A packed run of slots is a strided view of the cache, so nothing is copied; slots in the
    run that are not decoding this step (holes) are computed and dropped. Otherwise the rows'
    slots are gathered. The CPU kernel reads each row's own slot and length directly.
    """
    assert batch.decode_slots is not None
    if kernels is not None:
        assert batch.decode_lens is not None
        return kernels.decode_attention(q, k_cache, v_cache, batch.decode_slots,
                                        batch.decode_lens, batch.decode_max_len)
    n_rows, n_heads, head_dim = q.shape
    n_kv, n_len, rows = k_cache.shape[1], batch.decode_max_len, batch.decode_rows
    if batch.decode_run is not None:
        lo, hi = batch.decode_run
        ks, vs = k_cache[lo:hi + 1, :, :n_len], v_cache[lo:hi + 1, :, :n_len]  # (S, KVH, L, D)
        if rows is not None:  # place each row's query at its slot's place in the run
            qs = q.new_zeros(hi - lo + 1, n_heads, head_dim)
            qs[rows] = q
            q = qs
    else:
        ks, vs = k_cache[batch.decode_slots, :, :n_len], v_cache[batch.decode_slots, :, :n_len]
    n_seq = q.shape[0]
    # Each row's G query heads per KV head act as a G-long query against that head's keys:
    # no expanded K/V, and SDPA's fused CPU kernel (1.5x the explicit product at 64 rows
    # with the cache warm; a few % of a whole step, where K/V come from memory).
    qs = q.view(n_seq, n_kv, n_heads // n_kv, head_dim)  # (S, KVH, G, D)
    # Keys past a row's own length are masked out, never averaged in; a hole sees none and
    # its row (zeros or NaN, by backend) is dropped below.
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=batch.decode_bias(q.dtype))
    out = out.reshape(n_seq, n_heads, head_dim)  # (S, H, D)
    return out if rows is None else out[rows]
