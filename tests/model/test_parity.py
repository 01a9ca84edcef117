"""Logits equal transformers' LlamaForCausalLM on the same checkpoint (float32, < 1e-4)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from model import cpu_kernels
from model.attention import AttentionBatch, PrefillSpan, masked_attention
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCachePool
from model.llama import LlamaModel, PackedLinear, RMSNorm
from model.weights import load_model
from tests.conftest import TINY
from tests.model.test_cpu_kernels import HAS_COMPILER

TOL = 1e-4

VARIANTS = {
    "multi_head": replace(TINY, n_kv_heads=4),
    "gqa_4to1": replace(TINY, n_heads=8, n_kv_heads=2, dim=64),
    "llama3_rope": replace(TINY, rope_theta=500000.0, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear_rope": replace(TINY, rope_scaling=RopeScaling("linear", factor=4.0)),
    "yarn_rope": replace(TINY, rope_scaling=RopeScaling(
        "yarn", factor=4.0, original_max_position_embeddings=64)),
    # DeepSeek's mscales, a ramp of other bounds left unrounded
    "yarn_mscale_rope": replace(TINY, rope_theta=50000.0, rope_scaling=RopeScaling(
        "yarn", factor=8.0, original_max_position_embeddings=64, beta_fast=16.0,
        beta_slow=2.0, truncate=False, mscale=0.707, mscale_all_dim=1.0)),
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
    ids = prompt_ids(300)  # past the llama3 and yarn variants' original context of 64
    ours = load_ours(folder)(ids, torch.arange(len(ids)))
    ref = reference_logits(folder, ids)
    assert ours.shape == ref.shape == (len(ids), VARIANTS[variant].vocab_size)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("use_cpu_kernels", [True, False], ids=["c-kernels", "torch-ops"])
@pytest.mark.parametrize("variant", ["gqa_4to1", "tied_embeddings", "llama3_rope",
                                     "yarn_rope"])
def test_packed_fast_path_matches_reference(variant: str, use_cpu_kernels: bool,
                                            make_checkpoint) -> None:
    """Fused weights (what the server runs on CPU) compute the same logits, for decode-sized
    and prefill-sized row counts, with the C kernels (cpu_kernels.py, the linears too where
    they are tuned for the CPU; with a KV cache: tests/model/test_cpu_kernels.py) or with
    oneDNN's linears and PyTorch's ops."""
    folder = make_checkpoint(VARIANTS[variant])
    model = load_ours(folder)
    ids = prompt_ids(200)
    sizes = (1, 2, 3, 4, 5, 200)
    reference = [model(ids[:n], torch.arange(n)) for n in sizes]
    model.pack(use_cpu_kernels=use_cpu_kernels)
    assert model.lm_head_packed is not None and not hasattr(model, "lm_head")
    assert model.lm_head_packed.use_onednn, "this CPU build of torch should have oneDNN"
    with_kernels = use_cpu_kernels and HAS_COMPILER
    kernels = cpu_kernels.load() if with_kernels else None
    linear_in_c = kernels is not None and kernels.linear_is_tuned
    # The speed comes from the packed layouts (C panels or oneDNN's blocked one): a silent
    # fallback to dense weights must show.
    layer = model.model.layers[0]
    for packed in (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down):
        assert packed is not None and packed.kernels is (kernels if linear_in_c else None)
        assert packed.weight.is_mkldnn is not linear_in_c
    # The norms too run a fast path (RMSNorm.pack): C, where a compiler is, or LayerNorm.
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    if with_kernels:
        assert all(m.kernels is not None and m.doubled_weight is None for m in norms)
    else:
        assert all(m.kernels is None and m.doubled_weight is not None for m in norms)
    # A tied lm_head stays dense (repacking would copy the embedding).
    tied = VARIANTS[variant].tie_embeddings
    assert model.lm_head_packed.weight.is_mkldnn is (not tied and not linear_in_c)
    assert (model.lm_head_packed.kernels is not None) is (not tied and linear_in_c)
    for n, ref in zip(sizes, reference, strict=True):
        assert (model(ids[:n], torch.arange(n)) - ref).abs().max().item() < 1e-5, n
    assert (model(ids, torch.arange(200)) - reference_logits(folder, ids)).abs().max() < TOL


def test_packed_linear_pads_few_rows_on_the_blocked_layout() -> None:
    """1-3 rows go through oneDNN's 4-row kernel (faster on the blocked layout) and come
    back as exactly the rows asked for; the plain layout (a tied lm_head) is not padded."""
    weight = torch.randn(96, 64)
    blocked = PackedLinear(weight, use_onednn=True)
    plain = PackedLinear(weight, use_onednn=True, reorder=False)
    assert blocked.weight.is_mkldnn and not plain.weight.is_mkldnn
    for n in (1, 2, 3, 4, 7):
        x = torch.randn(n, 64)
        for layer in (blocked, plain):
            got = layer(x)
            assert got.shape == (n, 96)
            # Relative: sums of 64 products reach ~30, where float32's ulp is ~2e-6.
            assert torch.allclose(got, F.linear(x, weight), rtol=1e-5, atol=1e-5), n
        kernel_rows = (blocked(x)._base if n < PackedLinear.MIN_ROWS else blocked(x)).shape[0]
        assert kernel_rows == max(n, PackedLinear.MIN_ROWS)
        assert plain(x)._base is None


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_packed_rms_norm_is_rms_norm(scale: float) -> None:
    """The CPU fast path (LayerNorm over [x, -x], for a few rows) gives RMSNorm's values to
    rounding, for small values (where eps counts), ordinary and large ones."""
    norm = RMSNorm(512, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512))
    x = torch.randn(300, 512) * scale
    want = norm(x)  # F.rms_norm, the reference path
    norm.pack()
    assert norm.doubled_weight is not None
    for rows in (1, 3, RMSNorm.LAYER_NORM_MAX_ROWS):
        got = norm(x[:rows])
        assert got.shape == (rows, 512)
        assert got.stride(0) == 2 * 512  # the first half of LayerNorm's rows: the fast path ran
        assert torch.allclose(got, want[:rows], rtol=1e-5, atol=1e-6), rows
    assert torch.equal(norm(x), want)  # more rows: F.rms_norm itself


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rms_norm_is_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    """In bf16/fp16 our norm (F.rms_norm, then the weight) rounds where transformers'
    LlamaRMSNorm does: normalised in float32, cast back, then times the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    theirs, ours = LlamaRMSNorm(512, eps=1e-5), RMSNorm(512, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.1 * torch.randn(512))
        ours.weight.copy_(theirs.weight)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    for scale in (1e-3, 1.0, 30.0):
        x = (torch.randn(37, 512) * scale).to(dtype)
        assert torch.equal(ours(x), theirs(x)), scale


def test_decode_mask_is_built_once_a_step_from_each_rows_length() -> None:
    """The decode rows' additive mask: 0 on a row's own keys, -inf past them (a hole in the
    slot run sees none), made once and shared by every layer's attention."""
    batch = AttentionBatch.build([0, 2, 3], [4, 1, 6], [], "cpu")  # slot 1: a hole in the run
    bias = batch.decode_bias(torch.float32)
    assert bias is batch.decode_bias(torch.float32)
    assert bias.shape == (4, 1, 1, 7)
    visible = bias[:, 0, 0] == 0
    assert visible.sum(1).tolist() == [5, 0, 2, 7]
    assert visible[:, 0].tolist() == [True, False, True, True]  # a row's keys come first
    assert torch.isneginf(bias[:, 0, 0][~visible]).all()


def test_sharded_checkpoint_matches_single_file(make_checkpoint) -> None:
    single, sharded = make_checkpoint(TINY), make_checkpoint(TINY, n_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = prompt_ids(50)
    pos = torch.arange(len(ids))
    ours = load_ours(sharded)(ids, pos)
    assert torch.equal(ours, load_ours(single)(ids, pos))
    assert (ours - reference_logits(sharded, ids)).abs().max().item() < TOL


def test_sliding_window_model_matches_transformers_up_to_its_window(make_checkpoint) -> None:
    """A Mistral with a sliding window (v0.1's, scaled down): its context stops at the window,
    and up to there the logits are transformers' MistralForCausalLM's, which applies it."""
    folder = make_checkpoint(replace(TINY, architecture="MistralForCausalLM",
                                     sliding_window=48, max_seq_len=1024))
    config = ModelConfig.from_dir(folder)
    assert (config.sliding_window, config.max_seq_len) == (48, 48)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(ref).__name__ == "MistralForCausalLM" and ref.config.sliding_window == 48
    ids = prompt_ids(48)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
        beyond = ref(prompt_ids(60)[None]).logits[0]
    assert (load_ours(folder)(ids, torch.arange(48)) - expected).abs().max().item() < TOL
    # (past the window transformers' logits do change: the cap is needed, not cautious)
    ours_beyond = load_ours(folder)(prompt_ids(60), torch.arange(60))
    assert (ours_beyond[48:] - beyond[48:]).abs().max().item() > 1e-3


def test_pretraining_tp_is_the_same_model(make_checkpoint, tmp_path: Path) -> None:
    """Llama 2's first configs set pretraining_tp 2: it only sliced the same matmuls."""
    folder = shutil.copytree(make_checkpoint(TINY), tmp_path / "tp2")
    raw = json.loads((folder / "config.json").read_text()) | {"pretraining_tp": 2}
    (folder / "config.json").write_text(json.dumps(raw))
    ids = prompt_ids(30)
    assert (load_ours(folder)(ids, torch.arange(30)) - reference_logits(folder, ids)
            ).abs().max().item() < TOL


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
    batch = AttentionBatch.build([], [], [PrefillSpan(slot, 0, n_prompt, 0)], "cpu")
    got = [model(ids[:n_prompt], batch.positions, pool, batch)]
    for p in range(n_prompt, len(ids)):
        batch = AttentionBatch.build([slot], [p], [], "cpu")
        got.append(model(ids[p:p + 1], batch.positions, pool, batch))
    assert (torch.cat(got) - full).abs().max().item() < TOL


def test_prefill_in_chunks_equals_full_forward(tiny_checkpoint: Path) -> None:
    """A prompt prefilled in chunks (each after the cached ones, with a mask) gives the full
    pass's logits for every token."""
    model = load_ours(tiny_checkpoint)
    ids = prompt_ids(45)
    full = model(ids, torch.arange(len(ids)))
    pool = KVCachePool(model.config, n_slots=2, max_len=64, dtype=torch.float32, device="cpu")
    got = []
    for start, end in [(0, 7), (7, 20), (20, 21), (21, 45)]:
        batch = AttentionBatch.build([], [], [PrefillSpan(1, start, end - start, 0)], "cpu")
        got.append(model(ids[start:end], batch.positions, pool, batch))
    assert (torch.cat(got) - full).abs().max().item() < TOL


def test_prefill_attention_runs_the_fused_kernel(tiny_checkpoint: Path) -> None:
    """Prefill chunks reach SDPA's fused CPU kernel, never the unfused product that 3-D
    inputs fall back to (slower, and it materialises every score)."""
    model = load_ours(tiny_checkpoint)
    pool = KVCachePool(model.config, n_slots=2, max_len=64, dtype=torch.float32, device="cpu")
    ids = prompt_ids(30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for start, end in [(0, 10), (10, 30)]:  # a causal first chunk, then a masked one
            batch = AttentionBatch.build([], [], [PrefillSpan(0, start, end - start, 0)], "cpu")
            model(ids[start:end], batch.positions, pool, batch)
        model(ids, torch.arange(len(ids)))  # no cache
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_masked_attention_with_repeated_kv_heads_is_the_same() -> None:
    """A later chunk's masked attention over grouped K/V heads: repeating each K/V head for its
    query heads (CUDA's path, which keeps a fused kernel) is the same as SDPA's enable_gqa."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 5, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, 12, 16, generator=gen)
    mask = torch.arange(12)[None, :] <= torch.arange(7, 12)[:, None]  # start 7, 5 queries
    grouped = masked_attention(q, k, v, mask, repeat_kv=False)
    assert torch.allclose(masked_attention(q, k, v, mask, repeat_kv=True), grouped, atol=1e-6)
    assert torch.allclose(grouped, F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask), atol=1e-6)


@pytest.mark.parametrize("slots", [(0, 1, 2), (0, 2), (1, 7)], ids=["packed", "hole", "sparse"])
def test_mixed_batch_rows_match_separate_runs(slots: tuple[int, ...], tiny_checkpoint: Path
                                              ) -> None:
    """Decode rows of several slots (packed, with a hole, far apart) and a prefill chunk of
    another slot in one forward: each row's logits as if it ran alone."""
    model = load_ours(tiny_checkpoint)
    pool = KVCachePool(model.config, n_slots=8, max_len=64, dtype=torch.float32, device="cpu")
    seqs = [prompt_ids(20 + 5 * i, seed=10 + i) for i in range(len(slots))]
    for slot, seq in zip(slots, seqs, strict=True):  # each slot holds all but its last token
        batch = AttentionBatch.build([], [], [PrefillSpan(slot, 0, len(seq) - 1, 0)], "cpu")
        model(seq[:-1], batch.positions, pool, batch)
    new = prompt_ids(20, seed=3)
    spare = next(s for s in range(8) if s not in slots)
    batch = AttentionBatch.build(list(slots), [len(s) - 1 for s in seqs],
                                 [PrefillSpan(spare, 0, 20, len(slots))], "cpu")
    ids = torch.cat([torch.stack([s[-1] for s in seqs]), new])
    out = model(ids, batch.positions, pool, batch)
    for row, seq in enumerate(seqs):
        assert (out[row] - model(seq, torch.arange(len(seq)))[-1]).abs().max().item() < TOL
    assert (out[len(slots):] - model(new, torch.arange(20))).abs().max().item() < TOL
