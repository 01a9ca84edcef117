"""The start-up warm-up (server/warmup.py's phases, run by Engine.start on the engine thread
unless --no-warmup): which steps it runs, that it leaves no trace (slots, counters, the queue limit,
outputs, the shared generator), and that a failing warm-up refuses to start with what to
change."""

from __future__ import annotations

import threading

import pytest
import torch

from server.engine import Engine, WarmUpFailed
from server.engine_front import EngineStats
from server.request import SamplingParams
from server.runner import ModelRunner
from tests.conftest import LoraFixture
from tests.engine.conftest import CpuEngine, generate_all, started


def assert_untouched(engine: Engine) -> None:
    sched, stats = engine.scheduler, engine.stats()
    assert not sched.has_work() and not sched.requests
    assert sorted(sched.free_slots) == list(range(sched.n_slots))
    assert not sched.cached and stats.prefix_cache_queries_total == 0  # nor the cache
    assert stats.prompt_tokens_total == stats.generation_tokens_total == 0
    assert sum(stats.steps_total.values()) == 0
    assert not stats.finished_total and stats.slots_used == stats.tokens_used == 0
    assert engine.num_unfinished() == 0
    assert engine.stats().num_queued == 0  # what generate() holds against --max-waiting


@pytest.mark.parametrize("seqs, max_len, budget, cap", [
    (4, 256, 64, 1024),  # one prompt fills the step
    (4, 40, 64, 1024),  # prompts shorter than the step (a slot's length bounds them): two fill it
    (2, 10, 64, 1024),  # two slots of 10 tokens: 18 prompt tokens is the largest step there is
    (1, 256, 32, 1024),  # one slot: no step can mix, the warm-up still ends
    (2, 2, 8, 1024),  # room for a prompt token and one output: no decode step
    # A step may score fewer tokens than it has: the largest unscored, then the most scored
    (4, 256, 64, 24),  # a scored prompt cut at the cap, another fills the step
    (1, 256, 32, 24),  # one slot: its prompt scored only up to the cap
    (2, 40, 64, 24),  # two slots, the scored one cut at the cap
    (8, 100, 512, 150),  # two scored prompts (the second cut at the cap), four others
])
def test_warm_up_runs_the_largest_step_then_mixed_and_decode_steps(
        cpu_engine: CpuEngine, seqs: int, max_len: int, budget: int, cap: int) -> None:
    engine = cpu_engine(warmup=False, max_num_seqs=seqs, max_model_len=max_len,
                        max_num_batched_tokens=budget)
    engine.scheduler.max_scored_tokens = cap
    logit_rows: list[int] = []
    forward = engine.runner.model.forward
    engine.runner.model.forward = lambda *a, **k: (  # type: ignore[method-assign]
        lambda out: logit_rows.append(out.shape[0]) or out)(forward(*a, **k))
    plans: list[tuple[int, int]] = []  # (tokens, scored tokens) a step
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (  # type: ignore[method-assign]
        lambda plan: plans.append((plan.num_tokens, plan.num_scored_tokens)) or plan)(schedule())
    steps = engine.warm_up()
    length = min(budget, max_len - 1)
    largest = min(budget, seqs * length)
    assert steps[0] == (0, largest)
    assert len(logit_rows) == len(plans)
    # The most memory a step takes: as many tokens scored as a step may (every token's
    # logits when it may score them all), with as many other tokens beside them as there is
    # room for in the step and the slots
    scored = min(cap, largest)
    step = max(range(len(plans)), key=lambda i: plans[i][1])
    beside = min(budget - scored, (seqs - -(-scored // length)) * length)
    assert plans[step] == (scored + beside, scored)
    assert logit_rows[step] >= scored
    if cap >= largest:
        assert step == 0 and logit_rows[0] == largest  # one step, every row's logits
    if max_len > 3:
        assert (seqs, 0) in steps  # decode rows alone, every slot
        if seqs > 1:  # a prompt chunk beside every other slot's decode row
            assert any(decodes == seqs - 1 and prompt for decodes, prompt in steps)
    assert_untouched(engine)
    engine.warm_up()  # and again: nothing of the first run is in the way
    assert_untouched(engine)


def test_the_largest_step_runs_on_a_lora_adapter(cpu_engine: CpuEngine,
                                                lora: LoraFixture) -> None:
    """With adapters, the warm-up's largest step carries an adapter's deltas (memory on top
    of the base model's step); the rest runs on the base model; nothing is left behind (nor
    an adapter's cached prefix)."""
    engine = cpu_engine(warmup=False, max_num_seqs=4, max_model_len=128,
                        max_num_batched_tokens=64, enable_lora=True,
                        lora_modules=(f"sql={lora.adapter}",))
    batches: list[bool] = []
    forward = engine.runner.model.forward
    engine.runner.model.forward = lambda *a, **k: (  # type: ignore[method-assign]
        batches.append(k.get("lora") is not None) or forward(*a, **k))
    engine.warm_up()
    assert batches[0] and not any(batches[1:])
    assert_untouched(engine)
    assert not engine.scheduler.cached_lora


def test_start_warms_up_on_the_engine_thread_unless_told_not_to(
        cpu_engine: CpuEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    warm_up = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up",
                        lambda self: threads.append(threading.current_thread().name)
                        or warm_up(self))
    engine = cpu_engine()
    assert threads == []  # building does not run it
    engine.start()
    try:
        assert threads == ["engine"]  # start() returned after it
        assert_untouched(engine)
        engine.check_health()
        with pytest.raises(RuntimeError, match="before serving"):
            warm_up(engine)  # not beside the running loop
    finally:
        engine.stop()
    quiet = cpu_engine(warmup=False)
    quiet.start()
    quiet.stop()
    assert threads == ["engine"]


def generated_ids(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]
                  ) -> tuple[list[list[int]], EngineStats]:
    """Each job's token ids, and the engine's stats after them."""
    with started(engine):
        outputs = generate_all(engine, jobs)
        return [[t for out in outs for t in out.token_ids] for outs in outputs], engine.stats()


def test_warm_up_changes_no_output_and_no_count(cpu_engine: CpuEngine) -> None:
    """Greedy, seeded and unseeded sampling (the shared generator, seeded by --seed) give the
    same tokens with and without the warm-up: it draws from no generator the requests use,
    and what it wrote in the KV cache is never read. The counters then count the requests
    alone."""
    jobs = [([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
            ([8, 9], SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)),
            ([10, 11, 12, 13], SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))]
    config = {"max_num_seqs": 4, "max_model_len": 128, "max_num_batched_tokens": 64, "seed": 7}
    warm, stats = generated_ids(cpu_engine(**config), jobs)
    cold, _ = generated_ids(cpu_engine(warmup=False, **config), jobs)
    assert warm == cold and all(len(tokens) == 8 for tokens in warm)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (9, 24)
    assert +stats.finished_total == {"length": 3}  # (stopping adds an "error" of 0)


@pytest.mark.parametrize("error, says, advice", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)",
     "up to 64 tokens; lower --max-num-batched-tokens, --max-num-seqs or --kv-cache-memory"),
    (RuntimeError("device-side assert"), "failed (device-side assert)", "would fail requests"),
])
def test_a_warm_up_that_fails_refuses_to_start(cpu_engine: CpuEngine, error: Exception,
                                               says: str, advice: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory gets what to lower; anything else only what it was."""
    def failing(self: ModelRunner, plan: object, **kwargs: object) -> None:
        raise error

    engine = cpu_engine(max_num_batched_tokens=64)
    monkeypatch.setattr(ModelRunner, "launch", failing)
    with pytest.raises(WarmUpFailed) as failure:
        engine.start()
    message = str(failure.value)
    assert says in message and advice in message and "--no-warmup" in message
    assert ("--kv-cache-memory" in message) == isinstance(error, torch.OutOfMemoryError)
    with pytest.raises(Exception, match="not running"):
        engine.check_health()
