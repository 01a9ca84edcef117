"""KVCachePool: K and V for every layer, one slot per running sequence, allocated once.

Per layer K and V are `[n_slots, n_kv_heads, max_len, head_dim]`: heads before positions, so
one slot's keys for one head are a contiguous `(len, head_dim)` matrix and a run of slots is a
uniformly strided batch of them, which attention multiplies without copying. Token t of a
slot's sequence lives at `[slot, :, t]`. The pool knows slots, not requests: which slot belongs
to whom and how full it is belongs to the scheduler.
"""

from __future__ import annotations

import math
import mmap

import torch

from model.config import ModelConfig

Tensor = torch.Tensor


class KVCachePool:
    def __init__(self, config: ModelConfig, n_slots: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"a KV-cache pool needs n_slots >= 1 and max_len >= 1, "
                             f"got {n_slots} and {max_len}")
        self.n_slots = n_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (n_slots, config.n_kv_heads, max_len, config.head_dim)
        self.k = [_zeros(shape, dtype, self.device) for _ in range(config.n_layers)]
        self.v = [_zeros(shape, dtype, self.device) for _ in range(config.n_layers)]

    @staticmethod
    def bytes_needed(config: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype) -> int:
        """2 (K and V) x layers x slots x len x kv_heads x head_dim x bytes per element."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (2 * config.n_layers * n_slots * max_len * config.n_kv_heads * config.head_dim
                * itemsize)

    @staticmethod
    def formula(config: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype) -> str:
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = KVCachePool.bytes_needed(config, n_slots, max_len, dtype)
        return (f"2 x {config.n_layers} layers x {n_slots} slots x {max_len} tokens x "
                f"{config.n_kv_heads} kv_heads x {config.head_dim} head_dim x {itemsize} bytes "
                f"= {total / 2**30:.3f} GiB")

    @staticmethod
    def slots_for_budget(config: ModelConfig, budget_bytes: int, max_len: int,
                         dtype: torch.dtype) -> int:
        """How many full-length slots fit in `budget_bytes`."""
        per_slot = KVCachePool.bytes_needed(config, 1, max_len, dtype)
        return budget_bytes // per_slot

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slot_ids: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store each token's k/v (T, KVH, D) at [slot_ids[t], :, positions[t]]."""
        self.k[layer][slot_ids, :, positions] = k
        self.v[layer][slot_ids, :, positions] = v

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Duplicate the first `length` positions of a slot (n > 1 samples share a prefill;
        a prompt starts from a cached prefix)."""
        for cache in self.k + self.v:
            cache[dst, :, :length].copy_(cache[src, :, :length])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros, allocated once. On CPU they live in an anonymous mapping, which the kernel
    zero-fills page by page on first write: host memory in use follows the tokens actually
    cached, not the pool's size. (Zeros, not garbage: a masked position still enters the
    attention product as 0 x value, and 0 x NaN would poison the row.)"""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, nbytes)  # anonymous: zero-filled, committed lazily
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
