"""Attention over a flat batch of tokens from many sequences, each in its own KV-cache slot.

A step's tokens are laid out decode rows first (one token per decoding sequence), then the
prefill chunks, each contiguous. Every token carries its own slot and position: its K and V are
written at `cache[slot, position]` and it attends to `cache[slot, :position + 1]`. Reads cover
only the filled part of the slots in use, so the cost follows the lengths actually in use.

This plain-PyTorch path is the reference; faster kernels must match it.
"""

from __future__ import annotations

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
    """

    slot_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    n_decode: int = 0
    decode_slots: Tensor | None = None  # (n_decode,) int64
    decode_lens: Tensor | None = None  # (n_decode,) int64
    decode_max_len: int = 0  # host copy of decode_lens.max(), so no device sync is needed
    prefills: tuple[PrefillSpan, ...] = ()


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
    """q (B, H, Q, D), k/v (B, KVH, L, D); grouped-query heads share their K/V head."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def attend_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One sequence without a cache. q (T, H, D), k/v (T, KVH, D) -> (T, H, D)."""
    out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                None, causal=True)
    return out[0].transpose(0, 1)


def attend_cached(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> Tensor:
    """Attention for a step whose K/V are already written to the cache.

    q (T, H, D); k_cache/v_cache (n_slots, max_len, KVH, D) -> (T, H, D).
    """
    out = torch.empty_like(q)
    if batch.n_decode:
        out[: batch.n_decode] = _attend_decode(q[: batch.n_decode], k_cache, v_cache, batch)
    for span in batch.prefills:
        end = span.start + span.n_tokens
        rows = slice(span.offset, span.offset + span.n_tokens)
        # (1, H, n, D) queries against the slot's (1, KVH, end, D) keys.
        qs = q[rows].transpose(0, 1)[None]
        ks = k_cache[span.slot, :end].transpose(0, 1)[None]
        vs = v_cache[span.slot, :end].transpose(0, 1)[None]
        # Query i sits at position start + i and sees keys 0..start + i.
        q_pos = torch.arange(span.start, end, device=q.device)
        mask = torch.arange(end, device=q.device)[None, :] <= q_pos[:, None]  # (n, end)
        out[rows] = _sdpa(qs, ks, vs, mask)[0].transpose(0, 1)
    return out


def _attend_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, batch: AttentionBatch) -> Tensor:
    """One query per row; all rows in one batched call over their first decode_max_len keys."""
    assert batch.decode_slots is not None and batch.decode_lens is not None
    n_len = batch.decode_max_len
    ks = k_cache[batch.decode_slots, :n_len].transpose(1, 2)  # (B, KVH, L, D)
    vs = v_cache[batch.decode_slots, :n_len].transpose(1, 2)
    # Keys past a row's own length are masked out, never averaged in.
    mask = torch.arange(n_len, device=q.device)[None, :] < batch.decode_lens[:, None]  # (B, L)
    out = _sdpa(q[:, :, None, :], ks, vs, mask[:, None, None, :])  # (B, H, 1, D)
    return out[:, :, 0, :]
