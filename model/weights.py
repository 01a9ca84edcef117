"""Checkpoint files -> a LlamaModel on the target device and dtype.

Hugging Face safetensors (one file or sharded with `model.safetensors.index.json`) are read
memory-mapped, one tensor at a time, straight into parameters allocated on the target device,
so the host never holds a second full copy. Meta's `consolidated.*.pth` shards are merged and
renamed through one table, with the q/k rotary permutation applied. Loading is strict: a
missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ModelConfig
from model.llama import LlamaModel

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

# Meta name -> (HF name, dim along which model-parallel shards are concatenated; None: copies).
_META_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_META_TOP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", -1),  # -1: vocab or dim, see below
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
_META_IGNORED = {"rope.freqs"}  # precomputed frequencies some Meta checkpoints carry


class CheckpointError(ValueError):
    """The checkpoint's files do not match its config."""


def load_model(folder: Path, config: ModelConfig, dtype: torch.dtype,
               device: torch.device | str) -> LlamaModel:
    """Build the model without initialising it, then copy each checkpoint tensor in place."""
    model = _empty_model(config, dtype, device)
    params = dict(model.named_parameters())  # tied weights appear once, under model.*
    if (folder / "params.json").is_file() and not (folder / "config.json").is_file():
        tensors = _meta_tensors(folder, config)
    else:
        tensors = _safetensors(folder)
    seen: set[str] = set()
    stored_head = None
    for name, tensor in tensors:
        if name not in params:
            if config.tie_embeddings and name == "lm_head.weight":
                stored_head = tensor  # some tied checkpoints store the copy anyway
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older HF exports saved the rope buffer
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(param.shape)} from the config")
        with torch.no_grad():
            param.copy_(tensor)
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s) in checkpoint: {missing[:5]}{more}")
    embedding = model.lm_head.weight
    if stored_head is not None and not torch.equal(  # on the stored copy's device (the CPU)
            stored_head, embedding.to(stored_head.device, stored_head.dtype)):
        logger.warning("config.json ties the output layer to the embedding, but the checkpoint's "
                       "lm_head.weight differs from it: it is left unused, as vLLM and "
                       "transformers 4 leave it (transformers 5 would use it)")
    return model.eval().requires_grad_(False)


def _empty_model(config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str) -> LlamaModel:
    """The model's tensors allocated on `device`, uninitialised (built on meta: no init cost)."""
    with torch.device("meta"):
        model = LlamaModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:  # to_empty() unties; tie again before filling
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(device)
    return model


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> LlamaModel:
    """Random weights of the config's shapes, drawn on the device (`--load-format dummy`, as
    vLLM's): benchmark a model's shape without its weights. Normal(0, 0.02) like HF's init,
    norms at 1; reproducible for a seed on a given device."""
    model = _empty_model(config, dtype, device)
    gen = torch.Generator(device=model.inv_freq.device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def _safetensors(folder: Path) -> Iterator[tuple[str, Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint shard {name} listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {name}: {e}") from e


def meta_names(n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Every Meta tensor name -> (HF name, shard concatenation dim)."""
    names = dict(_META_TOP)
    for i in range(n_layers):
        for meta, (hf, dim) in _META_LAYER.items():
            names[f"layers.{i}.{meta}"] = (f"model.layers.{i}.{hf}", dim)
    return names


def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Meta's q/k rows rotate interleaved pairs (2i, 2i+1); HF's pair i with i + D/2.

    Regroup each head's rows from [pair][2] to [2][pair] (gpt-fast's `permute`).
    """
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_qk(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of `meta_to_hf_qk` (used to write Meta-layout checkpoints)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_tensors(folder: Path, config: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    shard_paths = sorted(folder.glob("consolidated.*.pth"))
    if not shard_paths:
        raise CheckpointError(f"no consolidated.*.pth in {folder}")
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True)
              for p in shard_paths]
    table = meta_names(config.n_layers)
    for key in shards[0]:
        if key in _META_IGNORED:
            continue
        if key not in table:
            raise CheckpointError(f"unexpected tensor {key!r} in Meta checkpoint")
        hf_name, dim = table[key]
        parts = [s[key] for s in shards]
        if dim == -1:  # Llama 2 splits the embedding by dim, Llama 3 by vocab
            dim = 0 if parts[0].shape[0] * len(parts) == config.vocab_size else 1
        tensor = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        if hf_name.endswith("q_proj.weight"):
            tensor = meta_to_hf_qk(tensor, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = meta_to_hf_qk(tensor, config.n_kv_heads)
        yield hf_name, tensor


def meta_vocab_size(folder: Path) -> int | None:
    """Vocabulary size from a Meta checkpoint's embedding (params.json may say -1)."""
    shard_paths = sorted(folder.glob("consolidated.*.pth"))
    if not shard_paths:
        return None
    shard = torch.load(shard_paths[0], map_location="cpu", mmap=True, weights_only=True)
    emb = shard.get("tok_embeddings.weight")
    if emb is None:
        return None
    output = shard.get("output.weight")
    # `output` is split by vocab in every Meta release, so shards x rows is the vocabulary.
    return output.shape[0] * len(shard_paths) if output is not None else emb.shape[0]


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. A CUDA device always comes back with its index
    (plain `cuda`: the current one here, at start-up): the engine thread makes it current
    there, and the current device is per thread (torch 2.11 also refuses `set_device` without
    an index)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA that supports it, float16 on older CUDA, float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def load_checkpoint(folder: Path, dtype: torch.dtype, device: torch.device | str,
                    load_format: str = "auto") -> LlamaModel:
    """Config and weights from a HF or Meta checkpoint folder; with load_format "dummy", the
    config only and random weights (see random_model)."""
    is_meta = (folder / "params.json").is_file() and not (folder / "config.json").is_file()
    config = ModelConfig.from_dir(folder, meta_vocab_size(folder) if is_meta else None)
    if load_format == "dummy":
        return random_model(config, dtype, device)
    return load_model(folder, config, dtype, device)
