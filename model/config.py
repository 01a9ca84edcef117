"""ModelConfig: the architecture of a Llama-family checkpoint, from either file layout.

Hugging Face `config.json` (LlamaForCausalLM, MistralForCausalLM) and Meta's `params.json` both
become one frozen dataclass with Meta's names. Anything we do not implement exactly (another
activation, biases, another rope type) is refused by name at load, never silently dropped. A
sliding window is not implemented either, but up to the window's length attention over the
window is attention over everything: such a model's context stops at its window (vLLM's
--disable-sliding-window).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Names that older conversions wrote (vLLM's registry knows this one too)
ARCHITECTURE_ALIASES = {"LLaMAForCausalLM": "LlamaForCausalLM"}
# A config.json without `architectures` is read by its model_type, as transformers reads it
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# transformers' MistralConfig defaults, for a config.json that leaves the keys out
MISTRAL_SLIDING_WINDOW = 4096
MISTRAL_MAX_POSITIONS = 4096 * 32
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")
# Each scaling's fields beside rope_type / type / factor / original_max_position_embeddings /
# rope_theta (yarn's `finetuned`, which Yarn-Llama-2's configs carry, changes nothing in
# transformers either)
_ROPE_FIELDS = {
    "linear": set(),
    "llama3": {"low_freq_factor", "high_freq_factor"},
    "yarn": {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
             "truncate", "finetuned"},
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary frequency scaling: `linear` (positions / factor), Llama 3.1's `llama3`, or
    `yarn` (transformers' _compute_yarn_parameters: frequencies blended between the original
    and the interpolated ones along a ramp, cos and sin scaled by `cos_sin_factor`)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn's: the ramp's ends in rotations over the original context, the bounds rounded
    # outward (`truncate`), and cos and sin's factor (None: from factor and the mscales)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    @classmethod
    def from_hf(cls, raw: dict[str, Any], max_position_embeddings: int = 8192,
                original_max_position_embeddings: int | None = None) -> RopeScaling | None:
        """config.json's rope_scaling (or rope_parameters). The original context defaults to
        max_position_embeddings, as transformers 5 sets it; a config.json's top-level
        `original_max_position_embeddings` (Phi-3's place) wins, as there."""
        rope_type = raw.get("rope_type", raw.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {rope_type!r} "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "default":
            return None
        known = {"rope_type", "type", "factor", "original_max_position_embeddings",
                 "rope_theta"} | _ROPE_FIELDS[rope_type]
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unsupported rope_scaling field(s) for {rope_type}: {unknown}")
        original = (original_max_position_embeddings
                    or raw.get("original_max_position_embeddings") or max_position_embeddings)
        kwargs = {k: raw[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                      "attention_factor", "mscale", "mscale_all_dim")
                  if raw.get(k) is not None}
        if rope_type == "yarn":  # (as transformers reads them: a beta of 0 or null is its
            # default, a null truncate is false)
            kwargs |= {k: raw[k] for k in ("beta_fast", "beta_slow") if raw.get(k)}
            kwargs["truncate"] = bool(raw.get("truncate", True))
        if "factor" not in kwargs:
            if rope_type != "yarn":
                raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
            kwargs["factor"] = max_position_embeddings / original  # (DeepSeek-V3's way)
        return cls(rope_type=rope_type, original_max_position_embeddings=original, **kwargs)

    @property
    def cos_sin_factor(self) -> float:
        """What yarn multiplies cos and sin by (so attention logits by its square); 1 for
        the others."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim)
        return mscale(self.factor)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    torch_dtype: str = "float32"  # what the checkpoint was saved in
    architecture: str = "LlamaForCausalLM"
    # config.json's sliding window: max_seq_len is capped at it (the module's docstring)
    sliding_window: int | None = None

    @property
    def context_is_window(self) -> bool:
        """The context stops at the sliding window (is capped by it)."""
        return self.sliding_window == self.max_seq_len

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    # ---------------------------------------------------------------- Hugging Face

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        arch = _architecture(raw)
        mistral = arch == "MistralForCausalLM"
        _refuse(raw, "hidden_act", lambda v: v in (None, "silu"), "only 'silu' is supported")
        _refuse(raw, "attention_bias", lambda v: not v, "biased attention is not supported")
        _refuse(raw, "mlp_bias", lambda v: not v, "biased MLP is not supported")
        # (pretraining_tp, which Llama 2's first configs set to 2, only sliced the same
        # matmuls in transformers 4; transformers 5 ignores it, and so do we.)
        window = raw.get("sliding_window", MISTRAL_SLIDING_WINDOW if mistral else None)
        positions = raw.get("max_position_embeddings", MISTRAL_MAX_POSITIONS if mistral else 2048)
        _refuse(raw, "sliding_window", lambda v: v is None or (type(v) is int and v >= 2),
                "expected null or a number of tokens of at least 2")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "vocab_size"):
            if key not in raw:
                raise ValueError(f"config.json is missing {key!r}")

        # transformers >= 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope = raw.get("rope_parameters") or {}
        rope_theta = raw.get("rope_theta") or rope.get("rope_theta") or 10000.0
        scaling_raw = raw.get("rope_scaling") or (rope if rope else None)
        rope_scaling = RopeScaling.from_hf(
            scaling_raw, positions, raw.get("original_max_position_embeddings")
        ) if scaling_raw else None

        n_heads = raw["num_attention_heads"]
        return cls(
            dim=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            vocab_size=raw["vocab_size"],
            hidden_dim=raw["intermediate_size"],
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_seq_len=positions if window is None else min(positions, window),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            head_dim=raw.get("head_dim") or 0,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            architecture=arch,
            sliding_window=window,
        )

    # ---------------------------------------------------------------- Meta

    @classmethod
    def from_meta(cls, raw: dict[str, Any], vocab_size: int | None = None) -> ModelConfig:
        """Meta's `params.json`. `vocab_size` fills in Llama 2's `-1` from the embedding."""
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope",
                 "rope_scaling_factor", "rope_high_freq_factor", "max_seq_len",
                 "max_batch_size"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unsupported field(s) in params.json: {unknown}")
        for key in ("dim", "n_layers", "n_heads"):
            if key not in raw:
                raise ValueError(f"params.json is missing {key!r}")
        vocab = raw.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size and none was inferred")
            vocab = vocab_size
        rope_theta = float(raw.get("rope_theta", 10000.0))
        scaled = bool(raw.get("use_scaled_rope", False))
        # params.json carries no context length; these are the published ones (Code Llama's
        # theta of 1e6 with 16384, as transformers' converter sets it; Llama 3's 500000, 8192).
        default_len = 131072 if scaled else (16384 if rope_theta >= 1_000_000 else
                                             8192 if rope_theta >= 500000 else 4096)
        return cls(
            dim=raw["dim"],
            n_layers=raw["n_layers"],
            n_heads=raw["n_heads"],
            n_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
            vocab_size=vocab,
            hidden_dim=meta_hidden_dim(raw["dim"], raw.get("multiple_of", 256),
                                       raw.get("ffn_dim_multiplier")),
            norm_eps=raw.get("norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=meta_rope_scaling(raw) if scaled else None,
            max_seq_len=raw.get("max_seq_len", default_len),
            tie_embeddings=False,
            torch_dtype="bfloat16",
            architecture="LlamaForCausalLM",
        )

    @classmethod
    def from_dir(cls, folder: Path, vocab_size: int | None = None) -> ModelConfig:
        if (folder / "config.json").is_file():
            return cls.from_hf(json.loads((folder / "config.json").read_text()))
        if (folder / "params.json").is_file():
            return cls.from_meta(json.loads((folder / "params.json").read_text()), vocab_size)
        raise ValueError(f"{folder} has neither config.json nor params.json")

    def to_hf(self) -> dict[str, Any]:
        """The config.json that describes this model (used to write checkpoints)."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "mistral" if self.architecture.startswith("Mistral") else "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.torch_dtype,
        }
        if self.architecture == "MistralForCausalLM" or self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.rope_scaling is not None:
            s = self.rope_scaling
            out["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor}
            if s.rope_type in ("llama3", "yarn"):
                out["rope_scaling"]["original_max_position_embeddings"] = (
                    s.original_max_position_embeddings)
            if s.rope_type == "llama3":
                out["rope_scaling"].update(low_freq_factor=s.low_freq_factor,
                                           high_freq_factor=s.high_freq_factor)
            if s.rope_type == "yarn":
                out["rope_scaling"].update(beta_fast=s.beta_fast, beta_slow=s.beta_slow,
                                           truncate=s.truncate)
                out["rope_scaling"].update({k: v for k, v in (
                    ("attention_factor", s.attention_factor), ("mscale", s.mscale),
                    ("mscale_all_dim", s.mscale_all_dim)) if v is not None})
        return out


# The widths of Llama 3.2's text models (1B, 3B); no Llama 3.1 model has either.
LLAMA_3_2_TEXT_DIMS = (2048, 3072)


def meta_rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    """The `llama3` scaling of a params.json with `use_scaled_rope`. Llama 3.1's and 3.2's
    params.json do not say the factor: Meta's 3.1 code has 8 built in, and the configs Meta
    published on the Hub (as transformers' converter writes them) say 32 for Llama 3.2 1B and
    3B, 8 for the rest. Later params.json (llama-models' newer ModelArgs) name it."""
    default = 32.0 if raw["dim"] in LLAMA_3_2_TEXT_DIMS else 8.0
    return RopeScaling("llama3", float(raw.get("rope_scaling_factor") or default), 1.0,
                       float(raw.get("rope_high_freq_factor") or 4.0), 8192)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width by Meta's rule (llama `FeedForward.__init__`)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _architecture(raw: dict[str, Any]) -> str:
    """config.json's architecture: the first of `architectures` (an old name read as today's),
    or by `model_type` when the list is missing."""
    archs = raw.get("architectures")
    if not archs:
        if raw.get("model_type") in MODEL_TYPES:
            return MODEL_TYPES[raw["model_type"]]
        raise ValueError(f"config.json names no architecture and its model_type "
                         f"{raw.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    arch = ARCHITECTURE_ALIASES.get(archs[0], archs[0])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {archs[0]!r} in config.json "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _refuse(raw: dict[str, Any], key: str, ok: Any, why: str) -> None:
    if key in raw and not ok(raw[key]):
        raise ValueError(f"unsupported config.json field {key}={raw[key]!r}: {why}")
