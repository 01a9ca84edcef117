"""Attention over a flat batch of tokens from many sequences, each in its own KV-cache slot.

A step's tokens are laid out decode rows first (one token per decoding sequence), then the
prefill chunks, each contiguous. Every token carries its own slot and position: its K and V are
written at `cache[slot, :, position]` and it attends to `cache[slot, :, :position + 1]`. Reads
cover only the filled part of the slots in use, so the cost follows the lengths in use.

Cache layout (see kv_cache.py): (n_slots, KVH, max_len, D). Grouped-query heads are never
expanded: queries are viewed as (…, KVH, G, D) against their shared K/V head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    Built by the runner. `slot_ids` and `positions` have one entry per token (T,); the first
    `n_decode` tokens are single-token decode rows, described by `decode_slots` and
    `decode_lens` (the slot length *including* the new token); then come `prefills`.
    `decode_slot_lo`/`decode_slot_hi` (host ints) bound the decode slots, so that a packed run
    of slots is read as one strided view instead of being gathered.
    """

    slot_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    n_decode: int = 0
    decode_slots: Tensor | None = None  # (n_decode,) int64
    decode_lens: Tensor | None = None  # (n_decode,) int64
    decode_max_len: int = 0  # host copy of decode_lens.max(), so no device sync is needed
    decode_slot_lo: int = 0
    decode_slot_hi: int = -1
    prefills: tuple[PrefillSpan, ...] = ()

    @classmethod
    def build(cls, decode_slots: list[int], decode_positions: list[int],
              prefills: list[PrefillSpan], device: torch.device | str) -> AttentionBatch:
        """From host lists: decode rows (slot, position of the new token), then prefill spans
        whose offsets follow the decode rows in the flat batch."""
        slots, positions = list(decode_slots), list(decode_positions)
        for span in prefills:
            slots += [span.slot] * span.n_tokens
            positions += range(span.start, span.start + span.n_tokens)
        lens = [p + 1 for p in decode_positions]

        def tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(slot_ids=tensor(slots), positions=tensor(positions),
                   n_decode=len(decode_slots), decode_slots=tensor(decode_slots),
                   decode_lens=tensor(lens), decode_max_len=max(lens, default=0),
                   decode_slot_lo=min(decode_slots, default=0),
                   decode_slot_hi=max(decode_slots, default=-1), prefills=tuple(prefills))


def attend_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One sequence without a cache. q (T, H, D), k/v (T, KVH, D) -> (T, H, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def attend_cached(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> Tensor:
    """Attention for a step whose K/V are already written to the cache.

    q (T, H, D); k_cache/v_cache (n_slots, KVH, max_len, D) -> (T, H, D).
    """
    out = torch.empty_like(q)
    if batch.n_decode:
        out[: batch.n_decode] = _attend_decode(q[: batch.n_decode], k_cache, v_cache, batch)
    for span in batch.prefills:
        end = span.start + span.n_tokens
        rows = slice(span.offset, span.offset + span.n_tokens)
        # Query i sits at position start + i and sees keys 0..start + i.
        q_pos = torch.arange(span.start, end, device=q.device)
        mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]  # (n, end)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1),  # (H, n, D)
            k_cache[span.slot, :, :end], v_cache[span.slot, :, :end],  # (KVH, end, D)
            attn_mask=mask, enable_gqa=q.shape[1] != k_cache.shape[1]).transpose(0, 1)
    return out


def _attend_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> Tensor:
    """One query per row, all rows in one batched product over their first decode_max_len keys.

    When the rows' slots form a packed run [lo, hi] (the scheduler hands out the lowest free
    slot), the run is a strided view of the cache and nothing is copied; slots in the run that
    are not decoding this step are computed and dropped. A sparse set of slots is gathered.
    """
    assert batch.decode_slots is not None and batch.decode_lens is not None
    n_rows, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    n_len = batch.decode_max_len
    lo, hi = batch.decode_slot_lo, batch.decode_slot_hi
    if hi - lo + 1 <= 2 * n_rows:
        ks, vs = k_cache[lo:hi + 1, :, :n_len], v_cache[lo:hi + 1, :, :n_len]  # (S, KVH, L, D)
        rows = batch.decode_slots - lo  # each row's index in the run
        lens = torch.zeros(hi - lo + 1, dtype=torch.long, device=q.device)
        lens[rows] = batch.decode_lens
        qs = q.new_zeros(hi - lo + 1, n_heads, head_dim)
        qs[rows] = q
    else:
        ks, vs = k_cache[batch.decode_slots, :, :n_len], v_cache[batch.decode_slots, :, :n_len]
        rows, lens, qs = None, batch.decode_lens, q
    n_seq = qs.shape[0]
    qs = qs.view(n_seq, n_kv, n_heads // n_kv, head_dim)  # (S, KVH, G, D)
    scores = (qs @ ks.transpose(-1, -2)).float() * (1.0 / math.sqrt(head_dim))  # (S, KVH, G, L)
    # Keys past a row's own length are masked out, never averaged in.
    valid = torch.arange(n_len, device=q.device)[None, :] < lens[:, None]  # (S, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    # Slots in the run with no row this step have no valid key: their NaN rows are dropped.
    out = (probs @ vs).view(n_seq, n_heads, head_dim)  # (S, H, D)
    return out if rows is None else out[rows]
