"""The KV-cache pool: its size formula, slot copies, and host memory that follows use."""

from __future__ import annotations

import torch

from model.kv_cache import KVCachePool
from tests.conftest import TINY


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_bytes_needed_is_the_formula() -> None:
    assert KVCachePool.bytes_needed(TINY, 3, 100, torch.float32) == (
        2 * TINY.n_layers * 3 * 100 * TINY.n_kv_heads * TINY.head_dim * 4)
    assert KVCachePool.bytes_needed(TINY, 3, 100, torch.bfloat16) == (
        2 * TINY.n_layers * 3 * 100 * TINY.n_kv_heads * TINY.head_dim * 2)


def test_cpu_pool_commits_memory_only_where_written() -> None:
    """A 1 GiB pool costs next to nothing until tokens are written, and reads as zeros."""
    before = rss_bytes()
    pool = KVCachePool(TINY, n_slots=256, max_len=8192, dtype=torch.float32, device="cpu")
    assert pool.nbytes == 2**30
    assert rss_bytes() - before < 32 * 2**20
    k = torch.ones(10, TINY.n_kv_heads, TINY.head_dim)
    pool.write(0, torch.full((10,), 7), torch.arange(10), k, 2 * k)
    assert torch.equal(pool.k[0][7, :, :10].transpose(0, 1), k)
    assert torch.equal(pool.v[0][7, :, :10].transpose(0, 1), 2 * k)
    assert pool.k[0][7, :, 10:].abs().sum() == 0 and pool.k[1][7].abs().sum() == 0
    assert rss_bytes() - before < 64 * 2**20


def test_copy_slot() -> None:
    pool = KVCachePool(TINY, n_slots=3, max_len=16, dtype=torch.float32, device="cpu")
    k = torch.randn(5, TINY.n_kv_heads, TINY.head_dim)
    for layer in range(TINY.n_layers):
        pool.write(layer, torch.zeros(5, dtype=torch.long), torch.arange(5), k, -k)
    pool.copy_slot(0, 2, 5)
    for cache in pool.k + pool.v:
        assert torch.equal(cache[2, :, :5], cache[0, :, :5])
        assert cache[1].abs().sum() == 0
