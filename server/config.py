"""EngineConfig and ServerConfig: every default lives here, and relations are checked once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from server.reasoning import REASONING_TAGS
from server.request import Pooling
from server.tool_calls import PARSERS

DEFAULT_MAX_MODEL_LEN = 4096  # cap on the model's context when --max-model-len is not given
# Tokens per forward pass when --max-num-batched-tokens is not given, by device type. On CPU
# prefill runs at the matmul peak from ~128 rows on, so a bigger chunk buys nothing and stalls
# the streams decoding beside it: on the bench model 256 against 512 kept throughput
# (c=4/16/64) and halved ITL p99 at c=16 (~100 vs ~180 ms). GPUs need bigger chunks to fill:
# a Llama-2-7B shape on an H100 (bf16, 64 slots, 128-token prompts) did c=16 / c=64 at
# 1355 / 1955-2432 output tok/s with 2048 against 422 / 708-1533 with 512 (README).
DEFAULT_BATCHED_TOKENS = {"cpu": 256, "cuda": 2048}
# vLLM's default for its API server on GPUs of 70 GiB or more but the A100 (on which it
# measured lower throughput): on an H100 a burst of 64 prompts then prefills in one step
# instead of four, each of which the streams already decoding waited through (c=64 TPOT mean
# 9.3-9.5 ms against 12.0-17.4 with 2048; README, Performance, GPU).
LARGE_GPU_BATCHED_TOKENS = 8192
LARGE_GPU_BYTES = 70 * 2**30
# Prompt tokens whose logprobs one step computes (prompt_logprobs, echo with logprobs): a chunk
# of such a request is cut to what the step has left of them. Their float32 logits and
# log-softmax, 2 x vocab x 4 bytes a token, are the largest part of a step's activations: at
# 8192 tokens a step, 8.4 GB for a Llama-3 vocabulary held back from the KV cache, against
# 1.05 GB at this cap.
MAX_SCORED_TOKENS_PER_STEP = 1024


def kv_cache_budget(spec: str, free_bytes: int) -> int:
    """--kv-cache-memory in bytes: `4` or `4GiB` is 4 GiB, `50%` half of `free_bytes`."""
    text = spec.strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 < fraction <= 1:
                raise ValueError
            return int(free_bytes * fraction)
        value = float(text.removesuffix("GiB").removesuffix("G"))
        if not 0 < value < float("inf"):
            raise ValueError
        return int(value * 2**30)
    except ValueError:
        raise ValueError(f"--kv-cache-memory {spec!r}: expected GiB above 0 (e.g. 4) or a "
                         f"percentage of free memory above 0 and at most 100 (e.g. 50%)"
                         ) from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 16  # KV-cache slots = sequences decoding at once
    max_model_len: int | None = None  # tokens per slot; None: the model's, capped
    # tokens per forward pass (decode rows + prefill chunks); None: see batched_tokens
    max_num_batched_tokens: int | None = None
    max_waiting: int = 256  # queued requests beyond the slots; more get 503
    kv_cache_memory: str | None = None  # "4" (GiB) or "50%" of free memory: sets the slot count
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enforce_eager: bool = False  # CUDA: no graphs for decode steps (vLLM's flag)
    # CUDA: a step's outputs go to the streams once the next step is launched (Engine._step)
    async_output_proc: bool = True
    # CUDA graphs: the next decode step is launched before this one's tokens are read, and
    # feeds on them on the device (Engine._step; vLLM's --async-scheduling)
    async_scheduling: bool = True
    cpu_kernels: bool = True  # CPU float32: the C kernels of model/cpu_kernels.py
    gpu_kernels: bool = True  # CUDA: the Triton kernels of model/triton_kernels.py
    load_format: str = "auto"  # "dummy": random weights of config.json's shapes (benchmarks)
    warmup: bool = True  # run a full step, a mixed one and a decode one before serving
    # Copy a prompt's prefix from a slot that holds it instead of computing it (vLLM's
    # automatic prefix caching, llama.cpp's cache_prompt): server/scheduler.py
    prefix_caching: bool = True
    # LoRA adapters served beside the model (vLLM's --enable-lora --lora-modules): each
    # "name=path" or {"name": ..., "path": ...}; a request names one as its model
    enable_lora: bool = False
    lora_modules: tuple[str, ...] = ()
    max_lora_rank: int = 16
    # The most adapters loaded at once (vLLM's --max-loras caps those in a batch; here every
    # loaded adapter may share a step, so the cap is on those loaded); None: no cap
    max_loras: int | None = None
    # The tokenizer's folder where it is not the model's (vLLM's --tokenizer, resolved by the
    # CLI); None: the model's. The model's generation_config.json still gives the eos ids.
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        modules = self.lora_modules
        if isinstance(modules, str):  # (its environment variable: specs apart by spaces)
            modules = modules.split()
        object.__setattr__(self, "lora_modules", tuple(modules or ()))
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora (vLLM's pair of flags)")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_loras is not None and len(self.lora_modules) > self.max_loras:
            raise ValueError(f"--lora-modules names {len(self.lora_modules)} adapters, more "
                             f"than --max-loras ({self.max_loras})")
        names = [name for name, _ in self.lora_adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora-modules names an adapter twice: {names}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if (self.max_num_batched_tokens is not None
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token "
                f"per step")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.kv_cache_memory is not None:
            kv_cache_budget(self.kv_cache_memory, 2**30)  # its syntax, before anything loads

    @property
    def lora_adapters(self) -> tuple[tuple[str, str], ...]:
        """(name, path) of each --lora-modules spec: "name=path", or vLLM's JSON form."""
        out = []
        for spec in self.lora_modules:
            if spec.lstrip().startswith("{"):
                try:
                    item = json.loads(spec)
                    name, path = item["name"], item["path"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"--lora-modules {spec!r}: expected name=path or "
                                     '{"name": ..., "path": ...}') from None
            else:
                name, sep, path = spec.partition("=")
                if not sep:
                    raise ValueError(f"--lora-modules {spec!r}: expected name=path")
            if not (isinstance(name, str) and name and isinstance(path, str) and path):
                raise ValueError(f"--lora-modules {spec!r}: the name and the path must be "
                                 "non-empty")
            out.append((name, path))
        return tuple(out)

    def batched_tokens(self, device_type: str, device_bytes: int = 0,
                       device_name: str = "") -> int:
        """max_num_batched_tokens, or the device's default (DEFAULT_BATCHED_TOKENS; on a GPU of
        `device_bytes` >= 70 GiB but an A100, LARGE_GPU_BATCHED_TOKENS), raised to
        max_num_seqs so every running sequence gets its token each step."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        default = DEFAULT_BATCHED_TOKENS.get(device_type, DEFAULT_BATCHED_TOKENS["cuda"])
        if (device_type == "cuda" and device_bytes >= LARGE_GPU_BYTES
                and "a100" not in device_name.lower()):
            default = LARGE_GPU_BATCHED_TOKENS
        return max(default, self.max_num_seqs)


def _number(low: float, high: float = math.inf, low_open: bool = False
            ) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return (isinstance(v, int | float) and not isinstance(v, bool)
                and (low < v if low_open else low <= v) and v <= high)
    return check


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


# generation_config.json's sampling fields that vLLM reads (ModelConfig.get_diff_sampling_param):
# key, our name, the check, what it must be
GENERATION_FIELDS: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("temperature", "temperature", _number(0.0), "a number >= 0"),
    ("top_p", "top_p", _number(0.0, 1.0, low_open=True), "a number in (0, 1]"),
    ("top_k", "top_k", _count(-1), "an integer >= -1 (0 or -1: off)"),
    ("min_p", "min_p", _number(0.0, 1.0), "a number in [0, 1]"),
    ("repetition_penalty", "repetition_penalty", _number(0.0, low_open=True), "a number > 0"),
    ("max_new_tokens", "max_tokens", _count(1), "an integer >= 1"),
)


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """What a request that leaves a sampling field out gets instead of the neutral default
    (temperature 1, no top-p/top-k/min-p, no repetition penalty): the model's own, from its
    generation_config.json, as vLLM reads them (--generation-config auto; Llama 3.1 Instruct
    asks for temperature 0.6 and top_p 0.9). `max_tokens` is its max_new_tokens, for requests
    that leave max_tokens to the context. None: not set."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def load(cls, source: str, model_dir: Path) -> GenerationDefaults:
        """--generation-config: "auto" (the model's file, if it has one), "vllm" (none), or a
        folder holding a generation_config.json."""
        if source == "vllm":
            return cls()
        path = (model_dir if source == "auto" else Path(source).expanduser()
                ) / "generation_config.json"
        if not path.is_file():
            if source == "auto":
                return cls()
            raise ValueError(f"--generation-config {source!r}: there is no {path} (expected "
                             f"auto, vllm or a folder with a generation_config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} cannot be read: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object")
        values = {}
        for key, name, ok, expected in GENERATION_FIELDS:
            value = raw.get(key)
            if value is not None:
                if not ok(value):
                    raise ValueError(f"{path}: {key}={value!r}, expected {expected}")
                values[name] = value
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


TOOL_CALL_PARSERS = tuple(PARSERS)  # --tool-call-parser's choices
REASONING_PARSERS = tuple(REASONING_TAGS)  # --reasoning-parser's


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "model"  # what responses and metrics name
    # More names requests may use (vLLM's `--served-model-name A B`: both answer, as A)
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_request_bytes: int = 4 * 2**20
    max_n: int = 16
    chat_template: str | None = None  # template text (read from --chat-template FILE by the CLI)
    # A chat request's own chat_template rendered (vLLM's --trust-request-chat-template)
    trust_request_chat_template: bool = False
    # LoRA (EngineConfig's): on, the adapters (name, path) requests may name as their model,
    # the most loaded at once
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_loras: int | None = None
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's, behind its
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    runtime_lora_updating: bool = False
    # Sampling defaults for fields a request leaves out (read per --generation-config by the CLI)
    generation_defaults: GenerationDefaults = GenerationDefaults()
    log_level: str = "info"
    metrics_compat: str | None = None  # "vllm": also export vLLM's metric names
    prompt_tokens_details: bool = False  # usage's prompt_tokens_details.cached_tokens
    # tool_choice "auto": the model's answer parsed for tool calls by this parser (vLLM's
    # --enable-auto-tool-choice --tool-call-parser); None: "auto" is refused
    tool_call_parser: str | None = None
    # A reasoning model's thinking set apart in chat answers (server/reasoning.py), vLLM's
    # --reasoning-parser; None: answers are all content
    reasoning_parser: str | None = None
    # The Responses API's stored responses (server/response_store.py): the last N; 0: none
    responses_store: int = 0
    # POST /v1/embeddings, and how it pools a prompt's hidden states (last token, or mean)
    enable_embeddings: bool = False
    pooling: Pooling = "last"
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    slots_endpoint: bool = True  # GET /slots (llama.cpp's, on by default as in its server)
    # The engine in a process of its own (server/engine_process.py), not on a thread beside
    # the event loop. Off by default: on a 2-core CPU the two processes fight over the cores
    # the forward needs (slower at c=16, README); it is meant for GPU hosts with cores to spare.
    engine_process: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"--tool-call-parser must be one of {TOOL_CALL_PARSERS}, got "
                             f"{self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {REASONING_PARSERS}, got "
                             f"{self.reasoning_parser!r}")
        if self.pooling not in get_args(Pooling):
            raise ValueError(f"--pooling must be one of {get_args(Pooling)}, got "
                             f"{self.pooling!r}")
        if self.responses_store < 0:
            raise ValueError(f"--responses-store must be >= 0, got {self.responses_store}")
        if taken := set(self.lora_names) & set(self.model_names):
            raise ValueError(f"LoRA adapter names {sorted(taken)} are the model's own names")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.model_aliases)

    @property
    def lora_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.lora_modules)
