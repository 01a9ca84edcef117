"""Shared by the engine tests: engines of the tiny checkpoint on CPU, built but not started."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.config import EngineConfig
from server.engine import Engine
from server.engine_front import EngineFront
from server.request import RequestOutput, SamplingParams
from server.startup import build_engine

CpuEngine = Callable[..., Engine]


@pytest.fixture
def cpu_engine(tiny_checkpoint: Path) -> CpuEngine:
    """`cpu_engine(**config)`: an engine as `llama-serve serve --device cpu` builds it, with
    EngineConfig's fields as keywords (the start-up warm-up on unless warmup=False)."""
    def build(**config: object) -> Engine:
        return build_engine(tiny_checkpoint, EngineConfig(device="cpu", **config))  # type: ignore[arg-type]

    return build


@contextmanager
def started(engine: EngineFront) -> Iterator[EngineFront]:
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def generate_all(engine: EngineFront, jobs: list[tuple[list[int], SamplingParams]]
                 ) -> list[list[RequestOutput]]:
    """Each job's outputs, the jobs submitted together (request ids r0, r1, ...) to a
    started engine."""
    async def one(i: int, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
        return [out async for out in engine.generate(prompt, params, f"r{i}")]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    return asyncio.run(main())
