"""Shared by the engine tests: engines of the tiny checkpoint on CPU, built but not started."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.config import EngineConfig
from server.engine import Engine
from server.startup import build_engine

CpuEngine = Callable[..., Engine]


@pytest.fixture
def cpu_engine(tiny_checkpoint: Path) -> CpuEngine:
    """`cpu_engine(**config)`: an engine as `llama-serve serve --device cpu` builds it, with
    EngineConfig's fields as keywords (the start-up warm-up on unless warmup=False)."""
    def build(**config: object) -> Engine:
        return build_engine(tiny_checkpoint, EngineConfig(device="cpu", **config))  # type: ignore[arg-type]

    return build
