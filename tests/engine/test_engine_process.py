"""The engine in a child process (server/engine_process.py), through its proxy: the same outputs
as the engine on a thread, admission counted across the pipe, and death, start-up failure and
stop reported rather than hung on."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from server.config import EngineConfig
from server.engine_front import Add, EngineDeadError, EngineOverloaded
from server.engine_process import AddGuided, EngineProcess, EngineStartFailed, HeldGuides
from server.guided.spec import GuideSpec, compile_guide
from server.outputs import IterationStats
from server.request import FinishReason, Request, RequestOutput, SamplingParams
from tests.engine.conftest import CpuEngine, generate_all, started

CONFIG = {"max_model_len": 1024, "warmup": False}


def proxy(folder: Path, **config: object) -> EngineProcess:
    return EngineProcess(folder, EngineConfig(device="cpu", **{**CONFIG, **config}))  # type: ignore[arg-type]


JOBS = [  # (prompt, params): greedy, seeded sampling with logprobs, n=2, a stop string
    ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0)),
    ([9, 8, 7, 6], SamplingParams(max_tokens=10, temperature=0.8, seed=3, logprobs=2)),
    ([11, 12], SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=5)),
    ([5, 6, 7], SamplingParams(max_tokens=20, temperature=0, stop=("e",),
                               prompt_logprobs=1)),
]


def test_outputs_match_the_engine_on_a_thread(tiny_checkpoint: Path,
                                              cpu_engine: CpuEngine) -> None:
    with started(cpu_engine(**CONFIG)) as engine:
        local = generate_all(engine, JOBS)
    with started(proxy(tiny_checkpoint)) as engine:
        remote = generate_all(engine, JOBS)
    assert remote == local  # every output: text, ids, logprobs, finish and stop reasons


def test_listeners_and_stats_hear_every_step(tiny_checkpoint: Path) -> None:
    heard: list[IterationStats] = []
    with started(proxy(tiny_checkpoint)) as engine:
        engine.add_listener(heard.append)
        outputs = generate_all(engine, JOBS)
        stats = engine.stats()  # as of the last step: its report came with the last outputs
    finals = [out for outs in outputs for out in outs if out.finished]
    assert len(finals) == 5  # one per sample
    assert stats.generation_tokens_total == sum(out.num_output_tokens for out in finals)
    assert sum(it.num_generation_tokens for it in heard) == stats.generation_tokens_total
    assert stats.prompt_tokens_total == sum(len(p) for p, _ in JOBS)
    assert sum(len(it.finished) for it in heard) == 5
    assert stats.slots_used == stats.num_queued == 0
    assert stats.num_received == sum(params.n for _, params in JOBS)  # samples


def test_admission_counts_requests_the_engine_has_not_seen(tiny_checkpoint: Path) -> None:
    """The proxy admits against the engine's last report plus what it sent since: two
    requests sent in one breath fill one slot and one waiting place before any report."""
    with started(proxy(tiny_checkpoint, max_num_seqs=1, max_waiting=1)) as engine:
        async def main() -> None:
            busy = engine.generate([5], SamplingParams(max_tokens=300, ignore_eos=True), "busy")
            queued = engine.generate([5], SamplingParams(max_tokens=1), "queued")
            with pytest.raises(EngineOverloaded, match="samples are queued"):
                engine.generate([5], SamplingParams(max_tokens=1), "rejected")
            engine.abort("busy")
            outs = [out async for out in busy] + [out async for out in queued]
            assert [o.finish_reason for o in outs if o.finished] == [FinishReason.ABORT,
                                                                      FinishReason.LENGTH]
            again = engine.generate([5], SamplingParams(max_tokens=1), "again")
            assert [o.finish_reason async for o in again] == [FinishReason.LENGTH]

        asyncio.run(main())
        assert engine.num_unfinished() == 0


def test_admission_counts_samples_the_engine_has_not_seen(tiny_checkpoint: Path) -> None:
    """A request of n=2 sent to 2 slots with no waiting places leaves room for nothing more,
    before any report says it took them."""
    with started(proxy(tiny_checkpoint, max_num_seqs=2, max_waiting=0)) as engine:
        async def main() -> None:
            busy = engine.generate([5], SamplingParams(n=2, max_tokens=300, ignore_eos=True),
                                   "busy")
            with pytest.raises(EngineOverloaded, match="this request has 1"):
                engine.generate([5], SamplingParams(max_tokens=1), "rejected")
            engine.abort("busy")
            assert len([o async for o in busy if o.finished]) == 2

        asyncio.run(main())
        assert engine.num_unfinished() == 0


def test_a_dead_engine_process_fails_streams_and_health(long_context_checkpoint: Path) -> None:
    with started(proxy(long_context_checkpoint, max_model_len=4096)) as engine:
        assert isinstance(engine, EngineProcess)

        async def main() -> RequestOutput:
            stream = engine.generate([5], SamplingParams(max_tokens=4000, ignore_eos=True), "r")
            outs = aiter(stream)
            await anext(outs)
            os.kill(engine._process.pid, signal.SIGKILL)  # type: ignore[arg-type]
            return [out async for out in outs][-1]

        last = asyncio.run(main())
        assert last.finish_reason is FinishReason.ERROR
        assert "engine process exited with code -9" in (last.error or "")
        with pytest.raises(EngineDeadError, match="exited"):
            engine.check_health()

        async def late() -> None:
            engine.generate([5], SamplingParams(max_tokens=1), "late")

        with pytest.raises(EngineDeadError):
            asyncio.run(late())


def core_whose_steps_fail(*args: object) -> None:
    """run_core, with every step failing from the third forward on: the engine loop dies
    after MAX_CONSECUTIVE_STEP_FAILURES of them (runs in the child)."""
    from server.engine_process import run_core
    from server.runner import ModelRunner

    launch, calls = ModelRunner.launch, [0]

    def failing(self: ModelRunner, plan: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] > 2:
            raise RuntimeError("device lost")
        return launch(self, plan, **kwargs)  # type: ignore[arg-type]

    ModelRunner.launch = failing  # type: ignore[method-assign]
    run_core(*args)


def test_a_dead_engine_loop_is_seen_under_steady_traffic(tiny_checkpoint: Path) -> None:
    """The engine process notices its loop died even while requests keep arriving (it used to
    look only when its pipe was quiet), so /health fails and no request is left waiting."""
    engine = EngineProcess(tiny_checkpoint, EngineConfig(device="cpu", **CONFIG),  # type: ignore[arg-type]
                           core=core_whose_steps_fail)
    with started(engine):
        async def main() -> list[RequestOutput]:
            streams, deadline = [], asyncio.get_running_loop().time() + 30
            while True:  # a request every 50 ms until the engine is reported dead
                try:
                    engine.check_health()
                    streams.append(engine.generate([5, 6], SamplingParams(max_tokens=4),
                                                   f"r{len(streams)}"))
                except EngineDeadError:
                    break
                assert asyncio.get_running_loop().time() < deadline, "never reported dead"
                await asyncio.sleep(0.05)
            lasts = []
            for stream in streams:  # every one ends: none is left waiting on a dead engine
                lasts.append([out async for out in stream][-1])
            return lasts

        lasts = asyncio.run(main())
    assert lasts and all(out.finished for out in lasts)
    assert lasts[-1].finish_reason is FinishReason.ERROR
    assert any("device lost" in (out.error or "") for out in lasts)


def test_start_failure_is_reported_with_its_reason(tiny_checkpoint: Path) -> None:
    engine = proxy(tiny_checkpoint, max_model_len=99999)
    with pytest.raises(EngineStartFailed, match="beyond the model's context length"):
        engine.start()
    assert not engine._process.is_alive()


def test_stop_ends_open_streams_and_the_process(long_context_checkpoint: Path) -> None:
    engine = proxy(long_context_checkpoint, max_model_len=4096)
    engine.start()

    async def main() -> list[RequestOutput]:
        stream = engine.generate([5], SamplingParams(max_tokens=4000, ignore_eos=True), "r")
        outs = aiter(stream)
        await anext(outs)
        await asyncio.to_thread(engine.stop)
        return [out async for out in outs]

    rest = asyncio.run(main())
    assert rest[-1].finish_reason is FinishReason.ERROR
    assert not engine._process.is_alive() and engine._process.exitcode == 0


def test_guides_go_by_key_once_the_core_holds_them() -> None:
    """Proxy and core record the same guided Adds in the pipe's order, so a guide the core
    still holds goes by key, and one it has dropped goes whole: through pickling, over a
    random run that keeps dropping some (capacity 3 of 5 guides)."""
    import pickle
    import random

    guides = [compile_guide(GuideSpec("regex", f"[a-z]{{{k}}}", "x")) for k in range(1, 6)]
    proxy_side, core_side = HeldGuides(capacity=3), HeldGuides(capacity=3)
    rng, by_key = random.Random(0), 0
    for i in range(200):
        guide = rng.choice([*guides, None])
        add = Add(Request(f"r{i}", [1, 2], SamplingParams(max_tokens=3, guide=guide)))
        sent = proxy_side.outgoing(add)
        if guide is not None:
            proxy_side.hold(guide.key)
        by_key += isinstance(sent, AddGuided)
        received = core_side.incoming(pickle.loads(pickle.dumps(sent)))
        assert received.request.request_id == f"r{i}"
        assert received.request.params.guide == guide  # (equal by key)
        if guide is not None:
            assert received.request.params.guide.dfa.num_states == guide.dfa.num_states
        assert received.request.arrival_time == add.request.arrival_time
    assert 50 < by_key < 150  # both ways taken
