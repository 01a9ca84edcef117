"""The start-up warm-up (Engine.warm_up, run by build_engine unless --no-warmup): which steps it
runs, that it leaves no trace (slots, counters, outputs, the shared generator), and that a
failing warm-up refuses to start with what to change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig
from server.engine import Engine
from server.request import SamplingParams
from server.runner import ModelRunner
from server.startup import StartupError, build_engine


def engine_for(folder: Path, **config: object) -> Engine:
    return build_engine(folder, EngineConfig(device="cpu", **config))  # type: ignore[arg-type]


def assert_untouched(engine: Engine) -> None:
    sched, stats = engine.scheduler, engine.stats()
    assert not sched.has_work() and not sched.requests
    assert sorted(sched.free_slots) == list(range(sched.n_slots))
    assert stats.prompt_tokens_total == stats.generation_tokens_total == stats.steps_total == 0
    assert not stats.finished_total and stats.slots_used == stats.tokens_used == 0
    assert engine.num_unfinished() == 0


@pytest.mark.parametrize("config, first", [
    # One prompt fills the step; a short one is prefilled beside its decode row.
    ({"max_num_seqs": 4, "max_model_len": 256, "max_num_batched_tokens": 64}, (0, 64)),
    # Prompts shorter than the step (the slot length bounds them): several fill it.
    ({"max_num_seqs": 4, "max_model_len": 40, "max_num_batched_tokens": 64}, (0, 64)),
    # One slot: no step can mix, the warm-up still ends.
    ({"max_num_seqs": 1, "max_model_len": 256, "max_num_batched_tokens": 32}, (0, 32)),
    # Room for a prompt token and one output only: both prompts in one step, no decode step.
    ({"max_num_seqs": 2, "max_model_len": 2, "max_num_batched_tokens": 8}, (0, 2)),
])
def test_warm_up_runs_a_full_step_then_mixed_and_decode_steps(tiny_checkpoint: Path,
                                                              config: dict, first: tuple) -> None:
    engine = engine_for(tiny_checkpoint, warmup=False, **config)
    shapes = engine.warm_up()
    assert shapes[0] == first
    if config["max_model_len"] > 2:
        assert shapes[-1][1] == 0 and shapes[-1][0] > 0  # decode rows alone
    if config["max_num_seqs"] > 1 and config["max_model_len"] > 2:
        assert any(decodes and prompt for decodes, prompt in shapes)  # decode rows + a chunk
    assert_untouched(engine)
    engine.warm_up()  # and again: nothing of the first run is in the way
    assert_untouched(engine)


def test_build_engine_warms_up_unless_told_not_to(tiny_checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Engine] = []
    warm_up = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", lambda self: calls.append(self) or warm_up(self))
    engine = engine_for(tiny_checkpoint)
    assert calls == [engine]
    assert_untouched(engine)
    engine_for(tiny_checkpoint, warmup=False)
    assert len(calls) == 1


def generate_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    async def one(i: int, prompt: list[int], params: SamplingParams) -> list[int]:
        return [t async for out in engine.generate(prompt, params, f"r{i}")
                for t in out.token_ids]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def test_warm_up_changes_no_output(tiny_checkpoint: Path) -> None:
    """Greedy, seeded and unseeded sampling (the shared generator, seeded by --seed) give the
    same tokens with and without the warm-up: it draws from no generator the requests use,
    and what it wrote in the KV cache is never read."""
    jobs = [([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
            ([8, 9], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)),
            ([10, 11, 12, 13], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))]
    config = {"max_num_seqs": 4, "max_model_len": 128, "max_num_batched_tokens": 64, "seed": 7}
    warm = generate_all(engine_for(tiny_checkpoint, **config), jobs)
    cold = generate_all(engine_for(tiny_checkpoint, warmup=False, **config), jobs)
    assert warm == cold and all(len(tokens) == 8 for tokens in warm)


def test_a_warm_up_that_fails_refuses_to_start(tiny_checkpoint: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(self: ModelRunner, plan: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ModelRunner, "launch", out_of_memory)
    with pytest.raises(StartupError) as failure:
        engine_for(tiny_checkpoint, max_num_batched_tokens=64)
    message = str(failure.value)
    assert "warm-up step of 64 tokens failed" in message and "Tried to allocate" in message
    assert "--max-num-batched-tokens" in message and "--no-warmup" in message
