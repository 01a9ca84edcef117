"""Logits equal transformers' LlamaForCausalLM on the same checkpoint (float32, < 1e-4)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from model.attention import AttentionBatch, PrefillSpan
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCachePool
from model.llama import LlamaModel
from model.weights import load_model
from tests.conftest import TINY

TOL = 1e-4

VARIANTS = {
    "multi_head": replace(TINY, n_kv_heads=4),
    "gqa_4to1": replace(TINY, n_heads=8, n_kv_heads=2, dim=64),
    "llama3_rope": replace(TINY, rope_theta=500000.0, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear_rope": replace(TINY, rope_scaling=RopeScaling("linear", factor=4.0)),
    "tied_embeddings": replace(TINY, tie_embeddings=True),
    "odd_vocab": replace(TINY, vocab_size=1001),
    "explicit_head_dim": replace(TINY, head_dim=32),
}


def load_ours(folder: Path) -> LlamaModel:
    return load_model(folder, ModelConfig.from_dir(folder), torch.float32, "cpu")


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


def prompt_ids(n: int, vocab: int = 1000, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant: str, make_checkpoint) -> None:
    folder = make_checkpoint(VARIANTS[variant])
    ids = prompt_ids(300)  # past the llama3 variant's original context of 64
    ours = load_ours(folder)(ids, torch.arange(len(ids)))
    ref = reference_logits(folder, ids)
    assert ours.shape == ref.shape == (len(ids), VARIANTS[variant].vocab_size)
    assert (ours - ref).abs().max().item() < TOL


def test_sharded_checkpoint_matches_single_file(make_checkpoint) -> None:
    single, sharded = make_checkpoint(TINY), make_checkpoint(TINY, n_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = prompt_ids(50)
    pos = torch.arange(len(ids))
    ours = load_ours(sharded)(ids, pos)
    assert torch.equal(ours, load_ours(single)(ids, pos))
    assert (ours - reference_logits(sharded, ids)).abs().max().item() < TOL


def test_tied_checkpoint_shares_one_tensor(make_checkpoint) -> None:
    model = load_ours(make_checkpoint(VARIANTS["tied_embeddings"]))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_prefill_then_decode_equals_full_forward(tiny_checkpoint: Path) -> None:
    """Prefill a prompt into a slot, then one-token steps: logits equal the full pass's."""
    model = load_ours(tiny_checkpoint)
    ids = prompt_ids(40)
    full = model(ids, torch.arange(len(ids)))
    pool = KVCachePool(model.config, n_slots=3, max_len=64, dtype=torch.float32, device="cpu")
    slot, n_prompt = 2, 25
    pos = torch.arange(n_prompt)
    batch = AttentionBatch(slot_ids=torch.full((n_prompt,), slot), positions=pos,
                           prefills=(PrefillSpan(slot, 0, n_prompt, 0),))
    got = [model(ids[:n_prompt], pos, pool, batch)]
    for p in range(n_prompt, len(ids)):
        one = torch.tensor([p])
        batch = AttentionBatch(slot_ids=torch.tensor([slot]), positions=one, n_decode=1,
                               decode_slots=torch.tensor([slot]), decode_lens=one + 1,
                               decode_max_len=p + 1)
        got.append(model(ids[p:p + 1], one, pool, batch))
    assert (torch.cat(got) - full).abs().max().item() < TOL


def test_mixed_batch_rows_match_separate_runs(tiny_checkpoint: Path) -> None:
    """Decode rows and a prefill chunk of other slots in one forward: each row as if alone."""
    model = load_ours(tiny_checkpoint)
    a, b = prompt_ids(30, seed=2), prompt_ids(20, seed=3)
    pool = KVCachePool(model.config, n_slots=2, max_len=64, dtype=torch.float32, device="cpu")
    # Slot 0 holds a[:29]; slot 1 is empty. One step: a's last token + b's whole prompt.
    pos = torch.arange(29)
    model(a[:29], pos, pool, AttentionBatch(torch.zeros(29, dtype=torch.long), pos,
                                            prefills=(PrefillSpan(0, 0, 29, 0),)))
    ids = torch.cat([a[29:], b])
    positions = torch.cat([torch.tensor([29]), torch.arange(20)])
    slots = torch.cat([torch.tensor([0]), torch.ones(20, dtype=torch.long)])
    batch = AttentionBatch(slots, positions, n_decode=1, decode_slots=torch.tensor([0]),
                           decode_lens=torch.tensor([30]), decode_max_len=30,
                           prefills=(PrefillSpan(1, 0, 20, 1),))
    out = model(ids, positions, pool, batch)
    assert (out[0] - model(a, torch.arange(30))[-1]).abs().max().item() < TOL
    assert (out[1:] - model(b, torch.arange(20))).abs().max().item() < TOL
