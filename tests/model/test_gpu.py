"""CUDA parity and decoding; skipped without a GPU (CI has none: run these on a GPU host)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from model.weights import load_checkpoint
from server.config import EngineConfig
from server.request import SamplingParams
from server.startup import build_engine
from tests.engine.test_engine import (
    check_async_scheduling_ends_like_steps_in_turn,
    check_prefix_caching_changes_no_token,
)
from tests.model.test_decode_graphs import check_graph_steps

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_cuda_logits_match_cpu(tiny_checkpoint: Path, dtype: torch.dtype, tol: float) -> None:
    ids = torch.arange(3, 203) % 1000
    cpu = load_checkpoint(tiny_checkpoint, torch.float32, "cpu")(ids, torch.arange(200))
    gpu = load_checkpoint(tiny_checkpoint, dtype, "cuda")
    gpu.pack()
    got = gpu(ids.cuda(), torch.arange(200, device="cuda")).cpu()
    assert (got - cpu).abs().max().item() < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_cuda_graph_decode_matches_eager(tiny_checkpoint: Path, dtype: torch.dtype,
                                         tol: float) -> None:
    """Captured graphs replay the eager per-request layout's logits (see
    test_decode_graphs.py, which runs the same check eagerly on CPU)."""
    model = load_checkpoint(tiny_checkpoint, dtype, "cuda")
    model.pack()
    check_graph_steps(model, capture=True, atol=tol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graphs_on_a_second_gpu(tiny_checkpoint: Path) -> None:
    model = load_checkpoint(tiny_checkpoint, torch.float32, "cuda:1")
    model.pack()
    check_graph_steps(model, capture=True, atol=1e-4)


@pytest.mark.parametrize("enforce_eager, async_output_proc, async_scheduling",
                         [(False, False, False), (True, False, False), (False, True, False),
                          (False, True, True)],
                         ids=["graphs", "eager", "graphs-async-output", "graphs-ahead"])
def test_cuda_engine_decodes_like_cpu(tiny_checkpoint: Path, enforce_eager: bool,
                                      async_output_proc: bool, async_scheduling: bool) -> None:
    """Greedy float32 tokens on CUDA (with and without CUDA graphs, with async output
    processing, and with async scheduling too: the defaults) equal the CPU engine's, for a
    batch of requests."""
    def run(device: str) -> list[list[int]]:
        engine = build_engine(tiny_checkpoint, EngineConfig(
            device=device, dtype="float32", max_model_len=512, enforce_eager=enforce_eager,
            async_output_proc=async_output_proc, async_scheduling=async_scheduling))
        if device == "cuda":
            assert (engine.runner.graphs is None) == enforce_eager
            assert engine._defer_outputs == async_output_proc
            assert engine._async_scheduling == async_scheduling
        engine.start()

        async def one(i: int) -> list[int]:
            tokens: list[int] = []
            params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
            async for out in engine.generate([5 + i, 6, 7] * (i + 1), params, f"r{i}"):
                tokens += out.token_ids
            return tokens

        async def main() -> list[list[int]]:
            return await asyncio.gather(*(one(i) for i in range(8)))
        try:
            return asyncio.run(main())
        finally:
            engine.stop()

    assert run("cuda") == run("cpu")


def test_cuda_half_precision_rms_norm_is_transformers() -> None:
    """On CUDA our bf16 norm rounds where transformers' does (tested bit for bit on CPU in
    test_parity.py); here the two kernels may sum in another order, so allow one bf16 step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from model.llama import RMSNorm
    theirs, ours = LlamaRMSNorm(4096, eps=1e-5), RMSNorm(4096, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(1 + 0.1 * torch.randn(4096))
        ours.weight.copy_(theirs.weight)
    theirs, ours = theirs.to("cuda", torch.bfloat16), ours.to("cuda", torch.bfloat16)
    x = (torch.randn(64, 4096, device="cuda") * 3).to(torch.bfloat16)
    want, got = theirs(x).float(), ours(x).float()
    assert ((got - want).abs() <= want.abs() * 2**-7).all()
    assert (got != want).float().mean().item() < 0.01


def test_cuda_engine_process_decodes_like_cpu(tiny_checkpoint: Path) -> None:
    """--engine-process on CUDA: graphs captured and async output processing on in the child,
    its greedy float32 tokens equal the CPU engine's on a thread."""
    from server.engine_process import EngineProcess

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5 + i, 6, 7] * (i + 1) for i in range(8)]

    def run(engine) -> list[list[int]]:  # noqa: ANN001 - Engine or EngineProcess
        engine.start()

        async def one(i: int) -> list[int]:
            return [t async for out in engine.generate(prompts[i], params, f"r{i}")
                    for t in out.token_ids]

        async def main() -> list[list[int]]:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))
        try:
            return asyncio.run(main())
        finally:
            engine.stop()

    config = {"dtype": "float32", "max_model_len": 512}
    on_gpu = run(EngineProcess(tiny_checkpoint, EngineConfig(device="cuda", **config)))  # type: ignore[arg-type]
    assert on_gpu == run(build_engine(tiny_checkpoint, EngineConfig(device="cpu", **config)))  # type: ignore[arg-type]


@pytest.mark.parametrize("enforce_eager, async_output_proc", [(False, True), (True, False)],
                         ids=["graphs-async-output", "eager"])
def test_cuda_prefix_caching_changes_no_token(tiny_checkpoint: Path, enforce_eager: bool,
                                              async_output_proc: bool) -> None:
    """Prefix copies on CUDA (queued on the engine's stream before an eager step's forward,
    beside graphed decode steps whose outputs are posted a step late, as served by default,
    or eagerly) change no greedy or seeded token."""
    check_prefix_caching_changes_no_token(tiny_checkpoint, device="cuda", dtype="float32",
                                          enforce_eager=enforce_eager,
                                          async_output_proc=async_output_proc)


def test_cuda_async_scheduling_ends_like_steps_in_turn(tiny_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps launched ahead on CUDA graphs (fed the sampled ids on the GPU, read back from
    pinned copies while the next step runs) end every kind of request as steps in turn do."""
    check_async_scheduling_ends_like_steps_in_turn(tiny_checkpoint, monkeypatch, device="cuda",
                                                   dtype="float32", async_output_proc=True)
