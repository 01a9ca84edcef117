"""A checkpoint folder and an EngineConfig -> a ready Engine.

Chooses device and dtype, loads the tokenizer and weights, sizes the KV-cache pool (slots from
--max-num-seqs or from a memory budget), refuses to start when the pool cannot fit, and logs
the pool's size with the formula behind it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.decode_graphs import DecodeGraphs
from model.kv_cache import KVCachePool
from model.lora import LoraAdapter, LoraError, load_adapter
from model.source import ModelSourceError, resolve_model
from model.tokenizer import Tokenizer
from model.weights import load_checkpoint, resolve_device, resolve_dtype
from server.config import (
    DEFAULT_MAX_MODEL_LEN,
    MAX_SCORED_TOKENS_PER_STEP,
    EngineConfig,
    kv_cache_budget,
)
from server.engine import Engine
from server.guided.masks import GuideMasks, TokenTable
from server.memory import keep_freed_memory, release_free_memory
from server.runner import ModelRunner
from server.scheduler import Scheduler

logger = logging.getLogger(__name__)


class StartupError(ValueError):
    """The server cannot start as configured; the message says why (a ValueError: like a
    bad flag's, it is logged without a traceback)."""


@dataclass(frozen=True, slots=True)
class PoolPlan:
    n_slots: int
    max_len: int
    nbytes: int
    formula: str


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise StartupError("cannot read available memory from /proc/meminfo")


def device_size_and_name(device: torch.device) -> tuple[int, str]:
    """A GPU's total memory and name (the default step size depends on them); 0 and "" on CPU."""
    if device.type != "cuda":
        return 0, ""
    props = torch.cuda.get_device_properties(device)
    return props.total_memory, props.name


def step_activation_bytes(model: ModelConfig, tokens: int, dtype: torch.dtype,
                          logit_rows: int, lora: bool = False) -> int:
    """About the most memory a step of `tokens` tokens holds besides weights and pool, kept
    free when the pool is sized (an estimate from the shapes; vLLM measures a dummy step).
    Per token: the residual stream, its delta and norm, q/k/v and the attention output, the
    MLP's gate/up and their product, and with LoRA adapters the delta of the widest packed
    linear (gate/up). Per row of logits (`logit_rows`, at most `tokens`): float32 logits
    twice over (the logits, and their log-softmax or probabilities)."""
    itemsize = torch.finfo(dtype).bits // 8
    widths = (3 * model.dim + (2 * model.n_heads + 2 * model.n_kv_heads) * model.head_dim
              + (5 if lora else 3) * model.hidden_dim)
    return tokens * widths * itemsize + min(logit_rows, tokens) * 2 * model.vocab_size * 4


def plan_pool(model: ModelConfig, config: EngineConfig, dtype: torch.dtype,
              free_bytes: int, step_tokens: int = 0) -> PoolPlan:
    """The pool's slots and length; refused when it and a step of `step_tokens` tokens
    (step_activation_bytes) do not fit in `free_bytes`."""
    max_len = config.max_model_len or min(model.max_seq_len, DEFAULT_MAX_MODEL_LEN)
    # Rows with logits: a sampled one per sequence, and the prompt tokens scored in a step
    reserve = step_activation_bytes(model, step_tokens, dtype,
                                    logit_rows=config.max_num_seqs + MAX_SCORED_TOKENS_PER_STEP,
                                    lora=config.enable_lora)
    if config.kv_cache_memory is None:
        n_slots = config.max_num_seqs
    else:
        # "100%" means all that is free once a step has its room.
        budget = min(kv_cache_budget(config.kv_cache_memory, free_bytes), free_bytes - reserve)
        n_slots = min(config.max_num_seqs,
                      KVCachePool.slots_for_budget(model, budget, max_len, dtype))
        if n_slots < 1:
            per_slot = KVCachePool.bytes_needed(model, 1, max_len, dtype)
            raise StartupError(
                f"--kv-cache-memory {config.kv_cache_memory} ({_size(budget)}) holds no slot "
                f"of {max_len} tokens ({_size(per_slot)} each); lower --max-model-len or "
                f"raise the budget")
    nbytes = KVCachePool.bytes_needed(model, n_slots, max_len, dtype)
    if nbytes + reserve > free_bytes:
        raise StartupError(
            f"the KV-cache pool needs {nbytes / 2**30:.2f} GiB "
            f"({KVCachePool.formula(model, n_slots, max_len, dtype)}) and a step of "
            f"{step_tokens} tokens about {reserve / 2**30:.2f} GiB more, but only "
            f"{free_bytes / 2**30:.2f} GiB is free; lower --max-num-seqs, --max-model-len or "
            f"--max-num-batched-tokens")
    return PoolPlan(n_slots, max_len, nbytes, KVCachePool.formula(model, n_slots, max_len, dtype))


def load_adapters(config: EngineConfig, model: ModelConfig, dtype: torch.dtype,
                  device: torch.device) -> dict[str, LoraAdapter]:
    """--lora-modules' adapters, each read whole now (StartupError naming what is wrong)."""
    adapters = {}
    for name, path in config.lora_adapters:
        try:  # (a folder, or a hub id as for MODEL)
            adapter = load_adapter(name, resolve_model(path), model, dtype, device,
                                   config.max_lora_rank)
        except (LoraError, ModelSourceError) as e:
            raise StartupError(f"LoRA adapter {name!r}: {e}" if isinstance(
                e, ModelSourceError) else str(e)) from None
        except torch.cuda.OutOfMemoryError as e:  # (torch.OutOfMemoryError from torch 2.5)
            raise StartupError(f"LoRA adapter {name!r} does not fit in device memory beside "
                               f"the model ({e})") from None
        adapters[name] = adapter
        logger.info("LoRA adapter %s: %s, rank %d, %d of %d layers", name, path, adapter.rank,
                    len({layer for layer, _ in adapter.deltas}), model.n_layers)
    return adapters


def build_engine(folder: Path, config: EngineConfig, chat_template: str | None = None) -> Engine:
    # Process-wide, before any tensor or the engine's thread exists: the engine hands freed
    # memory back when idle (release_free_memory), not after every step.
    keep_freed_memory()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = Tokenizer.for_model(folder, config.tokenizer, chat_template)
    model = load_checkpoint(folder, dtype, device, config.load_format)
    if config.load_format == "dummy":
        logger.warning("--load-format dummy: random weights, for benchmarks only")
    if config.max_model_len is not None and config.max_model_len > model.config.max_seq_len:
        raise StartupError(
            f"--max-model-len {config.max_model_len} is beyond the model's context length "
            f"{model.config.max_seq_len}" + (
                " (its sliding window: attention over a window is not implemented, and up to "
                "the window's length it is attention over everything)"
                if model.config.context_is_window else ""))
    # Fused, pre-transposed weights: the fast path (tests pin it to the reference).
    model.pack(use_cpu_kernels=config.cpu_kernels, use_gpu_kernels=config.gpu_kernels)
    release_free_memory()  # the dense weights that packing replaced
    if device.type == "cuda":  # ...and on the GPU, with what the matmuls' timing held
        torch.cuda.empty_cache()  # (the pool is sized from what the device reports free)
    # The adapters before the pool is sized: what they take is not free for it
    adapters = load_adapters(config, model.config, dtype, device)
    batched_tokens = config.batched_tokens(device.type, *device_size_and_name(device))
    plan = plan_pool(model.config, config, dtype, free_memory_bytes(device), batched_tokens)
    logger.info("loaded %s: %d layers, dim %d, vocab %d; dtype=%s device=%s", folder,
                model.config.n_layers, model.config.dim, model.config.vocab_size,
                str(dtype).removeprefix("torch."), device)
    if model.config.context_is_window:
        logger.warning("the model's context stops at its sliding window of %d tokens "
                       "(sliding-window attention is not implemented)", model.config.max_seq_len)
    logger.info("KV-cache pool: %s", plan.formula)
    pool = KVCachePool(model.config, plan.n_slots, plan.max_len, dtype, device)
    graphs = None
    if device.type == "cuda" and not config.enforce_eager:
        graphs = DecodeGraphs(model, pool, capture=True)
        try:
            graphs.capture_all()
        except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError from torch 2.5
            raise StartupError(f"capturing {graphs.num_graphs} CUDA graphs for decode ran out "
                               f"of device memory ({e}); leave more room beside the KV cache "
                               f"(--kv-cache-memory, --max-num-seqs) or pass --enforce-eager"
                               ) from None
    vocab_size = model.config.vocab_size
    guides = GuideMasks(lambda: TokenTable(tokenizer.token_bytes(range(tokenizer.vocab_size)),
                                           vocab_size, tokenizer.special_ids, tokenizer.eos_ids))
    runner = ModelRunner(model, pool, tokenizer.eos_ids, seed=config.seed, graphs=graphs,
                         guides=guides, adapters=adapters)
    logger.info("scheduler: up to %d sequences, %d tokens per step", plan.n_slots, batched_tokens)
    # A CUDA graph's rows are the slots below its bucket, and PyTorch's decode attention
    # reads a run of slots: keep the slots in use packed at the low end for both
    scheduler = Scheduler(plan.n_slots, plan.max_len, batched_tokens, eos_ids=tokenizer.eos_ids,
                          eos_id=tokenizer.eos_id, prefix_caching=config.prefix_caching,
                          packed_slots=graphs is not None or not model.attends_by_slot)
    return Engine(runner, scheduler, tokenizer, config.max_waiting,
                  async_output_proc=config.async_output_proc, warmup=config.warmup,
                  async_scheduling=config.async_scheduling and graphs is not None,
                  max_lora_rank=config.max_lora_rank, max_loras=config.max_loras)
