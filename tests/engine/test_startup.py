"""Start-up: KV-cache pool sizing (slots from a count or a memory budget, a clear refusal) and
the memory handed back once loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import server.startup as startup_module
from model.kv_cache import KVCachePool
from model.llama import LlamaModel
from model.weights import resolve_device
from server.config import MAX_SCORED_TOKENS_PER_STEP, EngineConfig, kv_cache_budget
from server.startup import (
    StartupError,
    build_engine,
    plan_pool,
    step_activation_bytes,
)
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]

PER_SLOT = KVCachePool.bytes_needed(TINY, 1, 1024, torch.float32)  # 2*2*1024*2*16*4 bytes


def test_pool_formula_and_size() -> None:
    plan = plan_pool(TINY, EngineConfig(max_num_seqs=5, max_model_len=1024), torch.float32,
                     free_bytes=2**40)
    assert plan.n_slots == 5 and plan.max_len == 1024
    assert plan.nbytes == 2 * TINY.n_layers * 5 * 1024 * TINY.n_kv_heads * TINY.head_dim * 4
    assert plan.formula.startswith("2 x 2 layers x 5 slots x 1024 tokens x 2 kv_heads x 16 "
                                   "head_dim x 4 bytes")


def test_default_length_is_the_models_capped() -> None:
    plan = plan_pool(TINY, EngineConfig(), torch.float32, free_bytes=2**40)
    assert plan.max_len == TINY.max_seq_len == 1024


def test_memory_budget_sets_the_slot_count() -> None:
    config = EngineConfig(max_num_seqs=64, max_model_len=1024,
                          kv_cache_memory=f"{3.5 * PER_SLOT / 2**30}")
    assert plan_pool(TINY, config, torch.float32, free_bytes=2**40).n_slots == 3
    half = EngineConfig(max_num_seqs=64, max_model_len=1024, kv_cache_memory="50%")
    assert plan_pool(TINY, half, torch.float32, free_bytes=8 * PER_SLOT).n_slots == 4


def test_tokens_per_step_default_by_device_and_never_below_the_slots() -> None:
    assert EngineConfig().batched_tokens("cpu") == 256
    assert EngineConfig().batched_tokens("cuda") == 2048
    # vLLM's default on GPUs of 70 GiB or more, but the A100
    assert EngineConfig().batched_tokens("cuda", 80 * 2**30, "NVIDIA H100 80GB HBM3") == 8192
    assert EngineConfig().batched_tokens("cuda", 80 * 2**30, "NVIDIA A100-SXM4-80GB") == 2048
    assert EngineConfig().batched_tokens("cuda", 24 * 2**30, "NVIDIA L4") == 2048
    assert EngineConfig().batched_tokens("cpu", 80 * 2**30) == 256
    assert EngineConfig(max_num_seqs=300).batched_tokens("cpu") == 300
    assert EngineConfig(max_num_batched_tokens=100).batched_tokens("cuda") == 100  # given: kept
    with pytest.raises(ValueError, match="must be >= max_num_seqs"):
        EngineConfig(max_num_seqs=32, max_num_batched_tokens=16)


def test_cuda_devices_are_resolved_with_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain `cuda` becomes the device current at start-up: the engine thread makes exactly
    that one current (the current device is per thread), and torch 2.11's `set_device`
    refuses a device without an index, which killed the CUDA engine at start on an H100."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_pool_larger_than_free_memory_is_refused_with_both_numbers() -> None:
    config = EngineConfig(max_num_seqs=10, max_model_len=1024)
    with pytest.raises(StartupError, match=r"needs 0\.00 GiB .* but only 0\.00 GiB is free"):
        plan_pool(TINY, config, torch.float32, free_bytes=9 * PER_SLOT)


def test_the_pool_leaves_room_for_a_step() -> None:
    """A pool that fits only if a step's activations had no room is refused at start-up
    (else the first long prefill would run out of memory), and "100%" leaves that room."""
    step = step_activation_bytes(TINY, 256, torch.float32, logit_rows=4 + 1024)
    # Per token: 3 x 64 + (2 x 4 + 2 x 2) x 16 + 3 x 160 float32 values, and (every token of
    # the 256 having a row of logits) 2 x 1024 logits.
    assert step == 256 * ((3 * 64 + 12 * 16 + 3 * 160) * 4 + 2 * 1024 * 4)
    config = EngineConfig(max_num_seqs=4, max_model_len=1024)
    assert plan_pool(TINY, config, torch.float32, 4 * PER_SLOT, step_tokens=0).n_slots == 4
    with pytest.raises(StartupError, match="step of 256 tokens about .* --max-num-batched-tok"):
        plan_pool(TINY, config, torch.float32, 4 * PER_SLOT + step - 1, step_tokens=256)
    assert plan_pool(TINY, config, torch.float32, 4 * PER_SLOT + step, step_tokens=256)
    everything = EngineConfig(max_num_seqs=64, max_model_len=1024, kv_cache_memory="100%")
    plan = plan_pool(TINY, everything, torch.float32, 4 * PER_SLOT + step, step_tokens=256)
    assert plan.n_slots == 4


def test_a_step_holds_logits_for_its_sequences_and_scored_prompt_tokens_only() -> None:
    """Past a sampled row per sequence and the prompt tokens a step may score (the scheduler's
    cap), a step's tokens hold no logits: a big step size no longer takes 2 x vocab floats a
    token from the KV cache."""
    big = 8192
    rows = 4 + MAX_SCORED_TOKENS_PER_STEP
    step = step_activation_bytes(TINY, big, torch.float32, logit_rows=rows)
    assert step == (step_activation_bytes(TINY, big, torch.float32, logit_rows=big)
                    - (big - rows) * 2 * TINY.vocab_size * 4)
    assert step_activation_bytes(TINY, 256, torch.float32, logit_rows=rows) == (
        step_activation_bytes(TINY, 256, torch.float32, logit_rows=256))  # no more than tokens
    config = EngineConfig(max_num_seqs=4, max_model_len=1024)
    assert plan_pool(TINY, config, torch.float32, 4 * PER_SLOT + step, step_tokens=big)
    with pytest.raises(StartupError, match="step of 8192 tokens"):
        plan_pool(TINY, config, torch.float32, 4 * PER_SLOT + step - 1, step_tokens=big)


@pytest.mark.parametrize("spec", ["lots", "-1", "0", "150%", "0%", "inf", "nan%"])
def test_bad_memory_spec_is_refused_with_the_config(spec: str) -> None:
    """Before anything loads: the CLI reports it as a bad flag, in one line."""
    with pytest.raises(ValueError, match="kv-cache-memory"):
        EngineConfig(kv_cache_memory=spec)


def test_memory_spec() -> None:
    assert kv_cache_budget("4", 2**30) == kv_cache_budget("4GiB", 0) == 4 * 2**30
    assert kv_cache_budget(" 50% ", 2**30) == 2**29


def test_a_budget_too_small_for_a_slot_says_so_in_mib() -> None:
    config = EngineConfig(max_num_seqs=4, max_model_len=1024, kv_cache_memory="0.0001")
    with pytest.raises(StartupError, match=r"\(0\.1 MiB\) holds no slot of 1024 tokens "
                                           r"\(\d+\.\d MiB each\)"):
        plan_pool(TINY, config, torch.float32, free_bytes=2**30)


def test_freeze_startup_objects_leaves_them_out_of_collections() -> None:
    """In a fresh interpreter: what is alive is frozen, start-up garbage is freed first, and
    a full collection afterwards walks only what came later."""
    probe = """
import gc, json
from server.memory import freeze_startup_objects
class Cycle:
    pass
garbage = Cycle(); garbage.me = garbage; del garbage  # freed by the collect, not frozen
alive = len(gc.get_objects())
frozen = freeze_startup_objects()
print(json.dumps([alive, frozen, len(gc.get_objects()), gc.collect()]))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    alive, frozen, tracked_after, collected = json.loads(out)
    assert frozen > 1000 and frozen <= alive
    assert tracked_after < 100 and collected == 0


def test_memory_freed_by_packing_goes_back_at_start_up(tiny_checkpoint: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense weights that packing replaces are freed into the heap, which keeps freed
    memory while serving (server/memory.py): start-up hands it back once, after packing."""
    calls: list[str] = []
    pack = LlamaModel.pack
    monkeypatch.setattr(LlamaModel, "pack",
                        lambda self, **kw: calls.append("pack") or pack(self, **kw))
    monkeypatch.setattr(startup_module, "release_free_memory",
                        lambda: calls.append("release") or True)
    build_engine(tiny_checkpoint, EngineConfig(device="cpu"))
    assert calls == ["pack", "release"]


def test_a_sliding_window_caps_the_context(make_checkpoint, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    """Attention over a window is attention over everything up to the window's length: a model
    with one serves up to there, says so, and refuses a longer --max-model-len naming it."""
    folder = make_checkpoint(replace(TINY, architecture="MistralForCausalLM",
                                     sliding_window=48, max_seq_len=1024))
    with caplog.at_level("WARNING", logger="server.startup"):
        engine = build_engine(folder, EngineConfig(device="cpu", max_num_seqs=2))
    assert engine.max_model_len == 48
    assert "context stops at its sliding window of 48 tokens" in caplog.text
    with pytest.raises(StartupError, match=r"--max-model-len 64 is beyond the model's context "
                                           r"length 48 \(its sliding window"):
        build_engine(folder, EngineConfig(device="cpu", max_model_len=64))
