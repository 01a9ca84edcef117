"""The CUDA-graph decode layout (row i = slot i, bucketed batch and length, pad rows), run
eagerly on CPU: same logits as the per-request layout, and pad rows disturb no slot.
Capture and replay themselves need a GPU: tests/model/test_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.attention import AttentionBatch, PrefillSpan
from model.config import ModelConfig
from model.decode_graphs import DecodeGraphs, batch_buckets, length_buckets
from model.kv_cache import KVCachePool
from model.llama import LlamaModel
from model.weights import load_model

MAX_LEN = 600


@pytest.mark.parametrize("n_slots, want", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (64, [1, 2, 4, 8, 16, 24, 32, 48, 64]),
    (100, [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100])])
def test_batch_buckets(n_slots: int, want: list[int]) -> None:
    assert batch_buckets(n_slots) == want


def test_batch_buckets_stop_at_the_largest_graph() -> None:
    assert batch_buckets(1000)[-3:] == [192, 224, 256]


@pytest.mark.parametrize("max_len, want", [
    (100, [100]), (256, [256]), (600, [256, 512, 600]), (2048, [256, 512, 1024, 2048])])
def test_length_buckets(max_len: int, want: list[int]) -> None:
    assert length_buckets(max_len) == want


def load(folder: Path, device: str = "cpu", pack: bool = True) -> LlamaModel:
    model = load_model(folder, ModelConfig.from_dir(folder), torch.float32, device)
    if pack:
        model.pack()
    return model


def test_bucket_choice(tiny_checkpoint: Path) -> None:
    model = load(tiny_checkpoint)
    graphs = DecodeGraphs(model, KVCachePool(model.config, 64, MAX_LEN, torch.float32, "cpu"),
                          capture=False)
    assert graphs.bucket([0], [0]) == (1, 256)
    assert graphs.bucket([2, 0], [255, 3]) == (4, 256)  # row 2 sees keys 0..255
    assert graphs.bucket([0, 1, 2], [256, 9, 9]) == (4, 512)
    assert graphs.bucket(list(range(20)), [599] * 20) == (24, 600)
    assert graphs.bucket([0, 40], [5, 5]) is None  # 2 rows in a bucket of 48: eager
    assert graphs.bucket(list(range(0, 64, 2)), [5] * 32) == (64, 256)


def test_slot_rows_match_per_request_layout(tiny_checkpoint: Path) -> None:
    check_graph_steps(load(tiny_checkpoint), capture=False)


@torch.inference_mode()
def check_graph_steps(model: LlamaModel, capture: bool, atol: float = 1e-5,
                      prompt_lens: dict[int, int] | None = None) -> None:
    """Decode steps through the graph layout give the per-request layout's logits, across a
    length bucket boundary (with the default `prompt_lens`, slot: length), while other slots
    hold sequences that are not decoding (their rows are padding); those sequences then
    continue exactly as if nothing had happened; every other step takes its token ids from
    the device (`feed`, as async scheduling does). Also run on CUDA with capture=True by
    tests/model/test_gpu.py."""
    config, device = model.config, model.inv_freq.device
    dtype = model.model.embed_tokens.weight.dtype
    eager = KVCachePool(config, 8, MAX_LEN, dtype, device)
    graphed = KVCachePool(config, 8, MAX_LEN, dtype, device)
    graphs = DecodeGraphs(model, graphed, capture=capture)
    graphs.capture_all()
    gen = torch.Generator().manual_seed(0)
    prompt_lens = prompt_lens or {0: 250, 1: 40, 2: 7, 3: 120, 4: 251, 5: 1}
    last: dict[int, int] = {}
    for slot, n in prompt_lens.items():
        ids = torch.randint(3, 1000, (n,), generator=gen).to(device)
        batch = AttentionBatch.build([], [], [PrefillSpan(slot, 0, n, 0)], device)
        for pool in (eager, graphed):
            logits = model(ids, batch.positions, pool, batch, torch.tensor([n - 1], device=device))
        last[slot] = int(logits.argmax())
    lengths = dict(prompt_lens)

    def step_both(slots: list[int], feed: bool = False) -> None:
        ids, pos = [last[s] for s in slots], [lengths[s] for s in slots]
        batch = AttentionBatch.build(slots, pos, [], device)
        want = model(torch.tensor(ids, device=device), batch.positions, eager, batch)
        if feed:  # as async scheduling feeds them: on the device, each row's index into it
            on_device = torch.tensor([*reversed(ids), 7], device=device)
            got = graphs.run(slots, [len(ids) - 1 - i for i in range(len(ids))], pos,
                             feed=on_device)
        else:
            got = graphs.run(slots, ids, pos)
        assert got is not None
        assert torch.allclose(got, want, atol=atol), (got - want).abs().max()
        for s, row in zip(slots, want, strict=True):
            last[s], lengths[s] = int(row.argmax()), lengths[s] + 1

    decoding = [5, 0, 2, 3]  # slots 1 and 4 hold sequences but sit out: pad rows
    for i in range(10):  # by default slot 0 crosses from the 256 bucket into the 512 one
        step_both(decoding, feed=i % 2 == 1)
    assert lengths[0] == prompt_lens[0] + 10
    for slot in (1, 4):  # the pad rows wrote nowhere these sequences read
        n = lengths[slot]
        assert torch.equal(graphed.k[0][slot, :, :n], eager.k[0][slot, :, :n])
        assert torch.equal(graphed.v[-1][slot, :, :n], eager.v[-1][slot, :, :n])
    for i in range(3):
        step_both([0, 1, 2, 3, 4, 5], feed=i == 1)
