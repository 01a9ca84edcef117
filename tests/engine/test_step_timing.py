"""Where a step's time goes (ModelRunner's ForwardTiming, the step_*_seconds metrics): the
forward, and the gap since the last forward of the same kind, on a clock that ticks once a
reading so that every figure is exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import server.runner as runner_module
from server.outputs import IterationStats
from server.request import Request, SamplingParams
from tests.engine.conftest import CpuEngine

TICK = 0.001  # each reading of the runner's clock is one tick after the last


def test_forward_and_gap_by_kind(cpu_engine: CpuEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1, 10_000))
    monkeypatch.setattr(runner_module, "time",
                        SimpleNamespace(monotonic=lambda: next(clock) * TICK))
    engine = cpu_engine(warmup=False)
    seen: list[IterationStats] = []
    engine.add_listener(seen.append)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)

    def step() -> tuple[str, float | None, float | None]:
        engine._step()  # the engine thread's step, run here (the thread is not started)
        timing = seen[-1].timing
        assert timing is not None
        return timing.kind, timing.forward_seconds, timing.gap_seconds

    def approx(kind: str, gap: float | None) -> tuple[str, object, object]:
        return kind, pytest.approx(TICK), None if gap is None else pytest.approx(gap)

    engine.scheduler.add(Request("a", [5, 6, 7, 8], params))
    assert step() == approx("prefill", None)  # nothing before it
    assert step() == approx("decode", None)  # after a prefill: another kind
    assert step() == approx("decode", TICK)  # start is one tick after the last end
    engine.scheduler.add(Request("b", [9, 10, 11], params))
    assert step() == approx("mixed", None)
    assert step() == approx("decode", None)
    assert step() == approx("decode", TICK)
    engine.runner.idle()  # the engine waited for work
    assert step() == approx("decode", None)
    assert step() == approx("decode", TICK)
