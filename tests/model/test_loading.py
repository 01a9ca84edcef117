"""Checkpoint layouts, hub resolution and load errors that name what is wrong."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, RopeScaling, meta_hidden_dim
from model.demo import write_meta_checkpoint
from model.source import ModelSourceError, resolve_model
from model.weights import CheckpointError, load_checkpoint
from tests.conftest import TINY

META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1024,
               "multiple_of": 32, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
               "rope_theta": 10000.0}
META_CONFIG = replace(TINY, hidden_dim=meta_hidden_dim(64, 32, None))


def logits(folder: Path, n: int = 40) -> torch.Tensor:
    model = load_checkpoint(folder, torch.float32, "cpu")
    ids = torch.arange(3, 3 + n) % 1000
    return model(ids, torch.arange(n))


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("scaled", [False, True])
def test_meta_layout_equals_hf_layout(n_shards: int, scaled: bool, make_checkpoint,
                                      tmp_path: Path) -> None:
    params = dict(META_PARAMS, use_scaled_rope=scaled)
    config = replace(META_CONFIG, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
                     if scaled else None)
    write_meta_checkpoint(tmp_path, config, params, seed=0, n_shards=n_shards)
    assert ModelConfig.from_dir(tmp_path).rope_scaling == config.rope_scaling
    hf = make_checkpoint(config)
    assert (logits(tmp_path) - logits(hf)).abs().max().item() < 1e-5


def test_meta_rope_factor_named_in_params_reaches_the_model(make_checkpoint,
                                                           tmp_path: Path) -> None:
    """A params.json that names the llama3 factor (llama-models' newer layout) is read as the
    same model as a config.json saying it: the logits match a HF checkpoint's at factor 32
    (over a long prompt: the factor slows the slowest rotations, which short distances
    barely turn)."""
    params = dict(META_PARAMS, use_scaled_rope=True, rope_scaling_factor=32.0)
    config = replace(META_CONFIG, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    write_meta_checkpoint(tmp_path, config, params, seed=0)
    assert ModelConfig.from_dir(tmp_path).rope_scaling == config.rope_scaling
    hf = make_checkpoint(config)
    assert (logits(tmp_path, 1000) - logits(hf, 1000)).abs().max().item() < 1e-5


# params.json as Meta ships them (the factor unsaid): Llama 3.2 1B and 3B, Llama 3.1 8B.
LLAMA_3_PARAMS = {"n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256,
                  "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}


@pytest.mark.parametrize("shape, factor", [
    ({"dim": 2048, "n_layers": 16, "ffn_dim_multiplier": 1.5}, 32.0),  # 3.2 1B
    ({"dim": 3072, "n_layers": 28, "n_heads": 24, "ffn_dim_multiplier": 1.0}, 32.0),  # 3.2 3B
    ({"dim": 4096, "n_layers": 32, "ffn_dim_multiplier": 1.3, "multiple_of": 1024}, 8.0),
])
def test_meta_llama3_rope_factor_is_the_published_one(shape: dict, factor: float) -> None:
    """As the config.json Meta published on the Hub for each says."""
    config = ModelConfig.from_meta(LLAMA_3_PARAMS | shape)
    assert config.rope_scaling == RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    assert config.max_seq_len == 131072
    hidden = {2048: 8192, 3072: 8192, 4096: 14336}[shape["dim"]]  # their intermediate_size
    assert config.hidden_dim == hidden


def test_meta_vocab_minus_one_is_inferred(tmp_path: Path, make_checkpoint) -> None:
    write_meta_checkpoint(tmp_path, META_CONFIG, dict(META_PARAMS, vocab_size=-1), n_shards=2)
    model = load_checkpoint(tmp_path, torch.float32, "cpu")
    assert model.config.vocab_size == 1024


@pytest.mark.parametrize("params, context", [
    ({}, 4096),  # Llama 2
    ({"rope_theta": 1_000_000.0}, 16384),  # Code Llama, as transformers' converter sets it
    ({"rope_theta": 500000.0}, 8192),  # Llama 3
    ({"rope_theta": 500000.0, "use_scaled_rope": True}, 131072),  # Llama 3.1
    ({"max_seq_len": 2048}, 2048),
])
def test_meta_layouts_published_context(params: dict, context: int) -> None:
    assert ModelConfig.from_meta(META_PARAMS | params).max_seq_len == context


def test_meta_hidden_dim_rule() -> None:
    # Llama 2 7B / 70B and Llama 3 8B published widths.
    assert meta_hidden_dim(4096, 256, None) == 11008
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(folder, torch.float32, "cpu")


def test_unexpected_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        load_checkpoint(folder, torch.float32, "cpu")


def test_wrong_shape_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        load_checkpoint(folder, torch.float32, "cpu")


def test_corrupt_safetensors_header(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder, torch.float32, "cpu")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": "4096"}, "sliding_window"),
    ({"architectures": None, "model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}},
     "low_freq_factor"),
])
def test_unsupported_config_is_named(change: dict, message: str, tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(raw)


def test_mistral_without_sliding_window_loads(tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    raw |= {"architectures": ["MistralForCausalLM"], "sliding_window": None}
    config = ModelConfig.from_hf(raw)
    assert config.architecture == "MistralForCausalLM"
    assert (config.sliding_window, config.max_seq_len) == (None, TINY.max_seq_len)


@pytest.mark.parametrize("change, read", [
    # Mistral v0.1's window: the context stops there (attention over a window of 4096 tokens
    # is attention over everything up to 4096)
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096,
      "max_position_embeddings": 32768}, ("MistralForCausalLM", 4096, 4096)),
    # keys left out read as transformers' MistralConfig defaults: a window of 4096 ...
    ({"architectures": ["MistralForCausalLM"]}, ("MistralForCausalLM", 4096, 2048)),
    # ... and 131072 positions
    ({"architectures": ["MistralForCausalLM"], "sliding_window": None,
      "max_position_embeddings": None}, ("MistralForCausalLM", None, 131072)),
    ({"architectures": ["LlamaForCausalLM"], "sliding_window": 64},
     ("LlamaForCausalLM", 64, 64)),
    # older conversions' name, and a config with only a model_type, as transformers reads them
    ({"architectures": ["LLaMAForCausalLM"]}, ("LlamaForCausalLM", None, 2048)),
    ({"architectures": None, "model_type": "mistral", "sliding_window": None},
     ("MistralForCausalLM", None, 2048)),
    # Llama 2's first configs: it only sliced the same matmuls (transformers 5 ignores it)
    ({"pretraining_tp": 2}, ("LlamaForCausalLM", None, 2048)),
])
def test_configs_read_as_transformers_reads_them(change: dict, read: tuple,
                                                 tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    raw["max_position_embeddings"] = 2048
    raw = {k: v for k, v in (raw | change).items() if v is not None or k == "sliding_window"}
    config = ModelConfig.from_hf(raw)
    assert (config.architecture, config.sliding_window, config.max_seq_len) == read


def test_hub_downloads_skip_mistrals_own_layout() -> None:
    """A Mistral repo holds its weights twice: Hugging Face shards and Mistral's own
    consolidated.safetensors (as large), which the loader never reads."""
    from huggingface_hub.utils import filter_repo_objects

    from model.source import HUB_ALLOW, HUB_IGNORE

    mistral = ["config.json", "consolidated.safetensors", "params.json",
               "model-00001-of-00003.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model.v3", "tokenizer_config.json", "README.md"]
    meta = ["params.json", "consolidated.00.pth", "consolidated.01.pth", "tokenizer.model"]
    pick = lambda names: sorted(filter_repo_objects(  # noqa: E731
        names, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE))
    assert pick(mistral) == ["config.json", "model-00001-of-00003.safetensors",
                             "model.safetensors.index.json", "params.json", "tokenizer.json",
                             "tokenizer_config.json"]
    assert pick(meta) == sorted(meta)


def test_transformers5_rope_parameters(tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    del raw["rope_theta"], raw["rope_scaling"]
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    config = ModelConfig.from_hf(raw)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_yarn_configs_read_as_transformers_reads_them(tiny_checkpoint: Path) -> None:
    """Yarn-Llama-2's shape (its `finetuned` flag changes nothing); the original context
    from max_position_embeddings where left out, from the top level where Phi-3 puts it;
    no factor: the ratio of the two (DeepSeek-V3's); the mscales give cos and sin's factor;
    to_hf writes what from_hf reads."""
    raw = json.loads((tiny_checkpoint / "config.json").read_text()) | {
        "max_position_embeddings": 1024}
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
            "finetuned": True}
    config = ModelConfig.from_hf(raw | {"rope_scaling": yarn})
    assert config.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=256)
    assert config.rope_scaling.cos_sin_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert ModelConfig.from_hf(config.to_hf()) == config
    unsaid = ModelConfig.from_hf(raw | {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert unsaid.rope_scaling is not None
    assert unsaid.rope_scaling.original_max_position_embeddings == 1024
    top = ModelConfig.from_hf(raw | {"rope_scaling": yarn, "original_max_position_embeddings": 128})
    assert top.rope_scaling is not None and top.rope_scaling.original_max_position_embeddings == 128
    derived = ModelConfig.from_hf(raw | {"rope_scaling": {
        "rope_type": "yarn", "original_max_position_embeddings": 256, "mscale": 1.0,
        "mscale_all_dim": 0.5, "beta_fast": 8, "truncate": False}})
    scaling = derived.rope_scaling
    assert scaling is not None and (scaling.factor, scaling.beta_fast, scaling.truncate) == (
        4.0, 8, False)
    assert scaling.cos_sin_factor == pytest.approx(
        (0.1 * math.log(4.0) + 1.0) / (0.05 * math.log(4.0) + 1.0))
    assert ModelConfig.from_hf(derived.to_hf()) == derived
    zeros = ModelConfig.from_hf(raw | {"rope_scaling": {**yarn, "beta_fast": 0,
                                                        "beta_slow": None, "truncate": None}})
    assert zeros.rope_scaling is not None  # (transformers': `or 32`, `or 1`; null: falsy)
    assert (zeros.rope_scaling.beta_fast, zeros.rope_scaling.beta_slow,
            zeros.rope_scaling.truncate) == (32.0, 1.0, False)


def test_hub_id_resolves_offline_from_cache(tiny_checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-populated HF cache (refs/main -> snapshot) serves `org/name` with HF_HUB_OFFLINE."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    folder = resolve_model("acme/tiny-llama")
    assert folder.name == commit
    assert torch.equal(logits(folder), logits(tiny_checkpoint))
    with pytest.raises(ModelSourceError, match="acme/absent"):
        resolve_model("acme/absent")


def test_missing_folder_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))


def config_only(checkpoint: Path, out: Path) -> Path:
    """A folder with the checkpoint's config.json and tokenizer but no weights."""
    out.mkdir()
    for f in checkpoint.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def test_dummy_load_format_needs_only_the_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--load-format dummy: random weights of the config's shapes, the same for a seed, norms at
    1, finite logits; the real loader refuses the same folder."""
    folder = config_only(tiny_checkpoint, tmp_path / "cfg")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(folder, torch.float32, "cpu")
    a = load_checkpoint(folder, torch.float32, "cpu", load_format="dummy")
    b = load_checkpoint(folder, torch.float32, "cpu", load_format="dummy")
    real = load_checkpoint(tiny_checkpoint, torch.float32, "cpu")
    assert a.state_dict().keys() == real.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert tensor.shape == real.state_dict()[name].shape
        assert torch.equal(tensor, b.state_dict()[name])
        if name.endswith("norm.weight"):
            assert torch.all(tensor == 1)
        else:
            assert 0.015 < tensor.std().item() < 0.025
    ids = torch.arange(3, 40)
    logits = a(ids, torch.arange(len(ids)))
    assert torch.isfinite(logits).all() and not torch.allclose(logits, real(ids, torch.arange(37)))


@pytest.mark.parametrize("same", [True, False])
def test_tied_checkpoint_that_stores_the_head_too(same: bool, make_checkpoint, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Some tied checkpoints store lm_head.weight anyway: the embedding serves as the head (as
    in vLLM), and a stored head that differs from it is named in a warning."""
    folder = copy_checkpoint(make_checkpoint(replace(TINY, tie_embeddings=True)), tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed.clone() if same else torch.randn_like(embed)
    save_file(state, folder / "model.safetensors")
    with caplog.at_level("WARNING", logger="model.weights"):
        model = load_checkpoint(folder, torch.float32, "cpu")
    assert torch.equal(model.lm_head.weight, embed)
    assert ("lm_head.weight differs" in caplog.text) != same
