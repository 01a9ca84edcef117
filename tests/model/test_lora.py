"""LoRA adapters (model/lora.py): rows that run an adapter compute what transformers computes
on the checkpoint with the adapter merged into its weights; rows of the base model beside
them are unchanged; what cannot be served is a LoraError that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from model.config import ModelConfig
from model.lora import LoraBatch, LoraError, load_adapter
from model.weights import load_model
from tests.conftest import LoraFixture, write_lora

TOL = 1e-4


def ours(folder: Path, pack: bool, use_cpu_kernels: bool = True):  # noqa: ANN201
    model = load_model(folder, ModelConfig.from_dir(folder), torch.float32, "cpu")
    if pack:
        model.pack(use_cpu_kernels=use_cpu_kernels)
    return model


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


def adapter_of(tiny_checkpoint: Path, lora: LoraFixture, name: str = "a"):  # noqa: ANN201
    config = ModelConfig.from_dir(tiny_checkpoint)
    return load_adapter(name, lora.adapter, config, torch.float32, "cpu", max_rank=16)


@pytest.mark.parametrize(("pack", "use_cpu_kernels"), [(False, False), (True, False),
                                                       (True, True)],
                         ids=["reference", "packed-torch-ops", "packed-c-kernels"])
def test_adapter_rows_are_the_merged_models(tiny_checkpoint: Path, lora: LoraFixture,
                                            pack: bool, use_cpu_kernels: bool) -> None:
    """One forward of 40 tokens, every row on the adapter, against the merged model; the
    same tokens without it, against the base model. (A row's logits depend on the rows
    before it: a batch that mixes models is one of several sequences, below.)"""
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2))
    model = ours(tiny_checkpoint, pack, use_cpu_kernels)
    adapter = adapter_of(tiny_checkpoint, lora)
    batch = LoraBatch.of_rows([adapter] * len(ids), "cpu")
    with torch.no_grad():
        adapted = model(ids, torch.arange(len(ids)), lora=batch)
        base = model(ids, torch.arange(len(ids)))
    assert (adapted - reference_logits(lora.merged, ids)).abs().max() < TOL
    assert (base - reference_logits(tiny_checkpoint, ids)).abs().max() < TOL
    assert (adapted - base).abs().max() > 1e-2  # (the adapter changes something)
    assert LoraBatch.of_rows([None] * 3, "cpu") is None


def test_a_batch_mixes_adapters_and_the_base_model(tiny_checkpoint: Path, lora: LoraFixture,
                                                   tmp_path: Path) -> None:
    """Three sequences in the KV cache, prefilled together and then decoded together, on
    the adapter, on the base model and on a second adapter: each matches its own model."""
    from model.attention import AttentionBatch, PrefillSpan
    from model.kv_cache import KVCachePool

    other = write_lora(tiny_checkpoint, tmp_path / "other", seed=12, rank=2, rslora=True)
    config = ModelConfig.from_dir(tiny_checkpoint)
    model = ours(tiny_checkpoint, pack=True)
    first = adapter_of(tiny_checkpoint, lora)
    second = load_adapter("b", other.adapter, config, torch.float32, "cpu", max_rank=16)
    models = [first, None, second]
    oracles = [lora.merged, tiny_checkpoint, other.merged]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=g) for n in (9, 13, 6)]
    pool = KVCachePool(config, n_slots=3, max_len=64, dtype=torch.float32, device="cpu")
    spans, rows, offset = [], [], 0
    for slot, prompt in enumerate(prompts):
        spans.append(PrefillSpan(slot, 0, len(prompt), offset))
        rows += [models[slot]] * len(prompt)
        offset += len(prompt)
    ids = torch.cat(prompts)
    batch = AttentionBatch.build([], [], spans, "cpu")
    with torch.no_grad():
        logits = model(ids, batch.positions, pool, batch, lora=LoraBatch.of_rows(rows, "cpu"))
        nxt = [int(torch.randint(0, 1000, (1,), generator=g)) for _ in prompts]
        decode = AttentionBatch.build([0, 1, 2], [len(p) for p in prompts], [], "cpu")
        step = model(torch.tensor(nxt), decode.positions, pool, decode,
                     lora=LoraBatch.of_rows(models, "cpu"))
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    for k, prompt in enumerate(prompts):
        want = reference_logits(oracles[k], torch.cat([prompt, torch.tensor([nxt[k]])]))
        assert (logits[ends[k]] - want[-2]).abs().max() < TOL, k
        assert (step[k] - want[-1]).abs().max() < TOL, k


@pytest.mark.parametrize("targets", [
    [(0, "self_attn.q_proj"), (0, "self_attn.v_proj"), (1, "self_attn.k_proj"),
     (1, "mlp.up_proj")],  # PEFT's usual q and v; a group's other members alone
    [(1, "self_attn.o_proj"), (1, "mlp.gate_proj")],
], ids=["q-v-k-up", "o-gate"])
def test_groups_of_some_adapted_linears(tiny_checkpoint: Path, tmp_path: Path,
                                        targets: list[tuple[int, str]]) -> None:
    """Adapted linears that are only some of their packed group: the others' outputs keep
    the base model's (lora_alpha left out: PEFT's 8)."""
    partial = write_lora(tiny_checkpoint, tmp_path / "partial", seed=14, alpha=None,
                         targets=targets)
    config = ModelConfig.from_dir(tiny_checkpoint)
    adapter = load_adapter("p", partial.adapter, config, torch.float32, "cpu", max_rank=16)
    ids = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(4))
    model = ours(tiny_checkpoint, pack=True)
    with torch.no_grad():
        got = model(ids, torch.arange(len(ids)), lora=LoraBatch.of_rows([adapter] * 30, "cpu"))
    assert (got - reference_logits(partial.merged, ids)).abs().max() < TOL


def test_a_batchs_rows_take_their_own_adapters_delta(tiny_checkpoint: Path,
                                                      lora: LoraFixture) -> None:
    """Rows apart (indices) and consecutive (a slice) add their adapter's delta, each row
    its own; rows of no adapter keep the base output."""
    a = adapter_of(tiny_checkpoint, lora, "a")
    b = adapter_of(tiny_checkpoint, lora, "b")
    batch = LoraBatch.of_rows([a, None, a, b, b], "cpu")
    assert batch is not None
    kinds = {adapter.name: type(rows).__name__ for adapter, rows in batch.segments}
    assert kinds == {"a": "Tensor", "b": "slice"}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))  # q, k, v: 64 + 2 x 32
    want = y.clone()
    for row, adapter in ((0, a), (2, a), (3, b), (4, b)):
        a_t, b_t = adapter.deltas[(0, "qkv")]
        want[row] += (x[row] @ a_t) @ b_t
    assert torch.allclose(batch.add(0, "qkv", x, y.clone()), want, atol=1e-6)


def _variant(lora: LoraFixture, tmp_path: Path, **spec: object) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(lora.adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **spec}))
    return folder


@pytest.mark.parametrize(("spec", "words"), [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias 'all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"r": 32}, "above --max-lora-rank"),
    ({"r": 8}, "has shape"), ({"peft_type": "IA3"}, "not LORA"),
])
def test_what_cannot_be_served_says_why(tiny_checkpoint: Path, lora: LoraFixture,
                                        tmp_path: Path, spec: dict, words: str) -> None:
    config = ModelConfig.from_dir(tiny_checkpoint)
    with pytest.raises(LoraError, match=words):
        load_adapter("x", _variant(lora, tmp_path, **spec), config, torch.float32, "cpu", 16)


def test_other_modules_and_missing_files_are_refused(tiny_checkpoint: Path,
                                                     lora: LoraFixture, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = ModelConfig.from_dir(tiny_checkpoint)
    folder = _variant(lora, tmp_path)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="lm_head"):
        load_adapter("x", folder, config, torch.float32, "cpu", 16)
    with pytest.raises(LoraError, match="adapter_config.json"):
        load_adapter("x", tmp_path / "nowhere", config, torch.float32, "cpu", 16)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraError, match="only safetensors"):
        load_adapter("x", folder, config, torch.float32, "cpu", 16)
