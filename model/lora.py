"""LoRA adapters in PEFT's layout, served beside the base model (vLLM's multi-LoRA).

An adapter holds, for some of a layer's linears, two low-rank matrices A (r, in) and B (out, r):
the adapted linear is W + (alpha / r) B A (alpha / sqrt(r) under rsLoRA). The base weights
never change: a step's rows that run an adapter add its delta, (x A^T) B^T scaled, to the
base linears' outputs, so one batch mixes any adapters and the base model. The deltas are
grouped as the model packs its linears (q/k/v, o, gate/up, down), one pair of small matmuls
per group and adapter in a step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from model.config import ModelConfig

# A linear's group (the model's packed linear) and its place among the group's outputs
GROUPS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
          "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.default)?\.weight")


PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out


class LoraError(ValueError):
    """An adapter this server cannot load; the message says why."""


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One adapter's deltas: (layer, group) -> (A^T (in, R), (scale B)^T (R, out)), R the
    ranks of the group's adapted linears side by side."""

    name: str
    path: str
    rank: int
    deltas: dict[tuple[int, str], tuple[Tensor, Tensor]]


def _shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each linear's (in, out)."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"q_proj": (config.dim, q), "k_proj": (config.dim, kv), "v_proj": (config.dim, kv),
            "o_proj": (q, config.dim), "gate_proj": (config.dim, config.hidden_dim),
            "up_proj": (config.dim, config.hidden_dim),
            "down_proj": (config.hidden_dim, config.dim)}


def load_adapter(name: str, folder: Path, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str, max_rank: int) -> LoraAdapter:
    """Read PEFT's adapter_config.json and adapter_model.safetensors; LoraError for what
    this server does not serve (DoRA, biases, other modules than the layers' linears, a rank
    above `max_rank`) or for tensors that do not fit the model."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {folder}/adapter_config.json "
                        f"({e})") from None
    if not isinstance(spec, dict):
        raise LoraError(f"LoRA adapter {name!r}: adapter_config.json is not an object")
    _check_spec(name, spec, max_rank)
    rank = int(spec["r"])
    try:
        alpha = float(spec.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    except (TypeError, ValueError):
        raise LoraError(f"LoRA adapter {name!r}: lora_alpha must be a number, got "
                        f"{spec.get('lora_alpha')!r}") from None
    scale = alpha / math.sqrt(rank) if spec.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise LoraError(f"LoRA adapter {name!r}: cannot read {folder}/"
                        f"adapter_model.safetensors ({e}); only safetensors are read") from None
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    shapes = _shapes(config)
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None or match[2] not in GROUPS or int(match[1]) >= config.n_layers:
            raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA matrix of "
                            "a decoder layer's linear (q/k/v/o/gate/up/down_proj)")
        layer, module, which = int(match[1]), match[2], match[3]
        d_in, d_out = shapes[module]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        if tuple(tensor.shape) != want:
            raise LoraError(f"LoRA adapter {name!r}: {key} has shape {tuple(tensor.shape)}, "
                            f"expected {want} for this model and r={rank}")
        pairs.setdefault((layer, module), {})[which] = tensor
    for (layer, module), pair in pairs.items():
        if len(pair) != 2:
            raise LoraError(f"LoRA adapter {name!r}: layer {layer}'s {module} has lora_A or "
                            "lora_B but not both")
    if not pairs:
        raise LoraError(f"LoRA adapter {name!r}: no LoRA matrices in {folder}")
    deltas = {}
    for layer, group in sorted({(layer, GROUPS[m][0]) for layer, m in pairs}):
        members = sorted((GROUPS[m][1], m) for m in GROUPS if GROUPS[m][0] == group)
        outs = [shapes[m][1] for _, m in members]
        present = [(k, m) for k, m in members if (layer, m) in pairs]
        a = torch.cat([pairs[(layer, m)]["A"] for _, m in present])  # (R, in)
        b = torch.zeros(sum(outs), rank * len(present))  # (out, R): blocks on the diagonal
        for j, (k, m) in enumerate(present):
            start = sum(outs[:k])
            b[start:start + outs[k], j * rank:(j + 1) * rank] = pairs[(layer, m)]["B"] * scale
        deltas[(layer, group)] = (a.t().contiguous().to(device, dtype),
                                  b.t().contiguous().to(device, dtype))
    return LoraAdapter(name, str(folder), rank, deltas)


def _check_spec(name: str, spec: dict, max_rank: int) -> None:
    def refuse(why: str) -> LoraError:
        return LoraError(f"LoRA adapter {name!r}: {why}")

    if spec.get("peft_type", "LORA") != "LORA":
        raise refuse(f"peft_type {spec.get('peft_type')!r} is not LORA")
    rank = spec.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise refuse(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise refuse(f"its rank {rank} is above --max-lora-rank ({max_rank})")
    if spec.get("use_dora"):
        raise refuse("DoRA (use_dora) is not served")
    if spec.get("bias", "none") != "none":
        raise refuse(f"bias {spec['bias']!r} is not served (only 'none')")
    if spec.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out (Conv1D layers) does not apply to Llama's linears")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if spec.get(key):
            raise refuse(f"{key} is not served")


@dataclass(frozen=True)
class LoraBatch:
    """A step's rows that run adapters: (adapter, its rows) for each adapter in the step,
    a slice where they are consecutive (a prompt chunk, a step of one adapter alone), else
    their indices; rows of none are left out."""

    segments: tuple[tuple[LoraAdapter, slice | Tensor], ...]

    @classmethod
    def of_rows(cls, adapters: list[LoraAdapter | None], device: torch.device | str
                ) -> LoraBatch | None:
        """The batch of a step whose row i runs adapters[i] (None: the base model alone)."""
        rows: dict[LoraAdapter, list[int]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                rows.setdefault(adapter, []).append(i)
        if not rows:
            return None
        return cls(tuple(
            (adapter, slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r)
             else torch.tensor(r, dtype=torch.long, device=device))
            for adapter, r in rows.items()))

    def add(self, layer: int, group: str, x: Tensor, y: Tensor) -> Tensor:
        """y (the base linears' output for x) plus each row's adapter delta, in place."""
        for adapter, rows in self.segments:
            delta = adapter.deltas.get((layer, group))
            if delta is None:
                continue
            a_t, b_t = delta
            if isinstance(rows, slice):  # (a view: y's rows in place, one fused matmul-add)
                y[rows].addmm_(x[rows] @ a_t, b_t)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a_t) @ b_t)
        return y
