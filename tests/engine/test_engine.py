"""The engine loop on a real tiny checkpoint: batching never changes a request's tokens,
chunking never changes logits, stops and aborts behave, failures stay contained."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import server.engine as engine_module
import server.outputs as outputs_module
import server.sampling as sampling_module
import server.startup as startup_module
from model.decode_graphs import DecodeGraphs
from model.llama import LlamaModel
from model.weights import load_checkpoint
from server.config import EngineConfig
from server.engine import Engine
from server.engine_front import Add, EngineOverloaded, RequestRejected, SlotsUnavailable
from server.request import (
    Dry,
    FinishReason,
    LlamaCppSamplers,
    Request,
    SamplingParams,
    ThinkingBudget,
)
from server.runner import ModelRunner
from server.sampling_dry import dry_penalties
from server.startup import build_engine
from tests.conftest import LoraFixture, indent_cut

ASYNC_OUTPUT_PROC = False  # set per test by output_mode; running() builds with it

# How a step's outputs reach the streams: at once (`--no-async-output-proc`), held until
# the next step is launched (async output processing as on a GPU: `asynchronous` forced,
# since CPU has no such device), or held until the next step's forward starts (the same on
# CPU, as served)
AT_ONCE, AFTER_LAUNCH, IN_FORWARD = "posted-at-once", "deferred", "held-for-the-forward"


@pytest.fixture(autouse=True, params=[AT_ONCE, AFTER_LAUNCH, IN_FORWARD])
def output_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every engine test runs in each way of posting outputs."""
    monkeypatch.setattr(ModelRunner, "asynchronous",
                        property(lambda _: request.param == AFTER_LAUNCH))
    monkeypatch.setattr(sys.modules[__name__], "ASYNC_OUTPUT_PROC", request.param != AT_ONCE)
    return request.param


@dataclass
class Result:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, FinishReason | None] = field(default_factory=dict)
    stop_reason: dict[int, str | int | None] = field(default_factory=dict)
    prompt_logprobs: list | None = None
    error: str | None = None
    cached: set[int] = field(default_factory=set)  # num_cached_tokens, as every output said


@contextmanager
def running(folder: Path, graph_layout: bool = False, **config: object) -> Iterator[Engine]:
    config.setdefault("async_output_proc", ASYNC_OUTPUT_PROC)
    config.setdefault("device", "cpu")
    engine = build_engine(folder, EngineConfig(**config))  # type: ignore[arg-type]
    if graph_layout:  # the CUDA-graph decode layout, run eagerly (no capture on CPU)
        runner = engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.pool, capture=False)
        engine.scheduler.packed_slots = True  # as start-up sets it with graphs
        engine._async_scheduling = EngineConfig(**config).async_scheduling  # ... and this
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, rid: str,
                  delay: float = 0.0) -> Result:
    await asyncio.sleep(delay)
    res = Result()
    async for out in engine.generate(prompt, params, rid):
        res.tokens.setdefault(out.index, []).extend(out.token_ids)
        res.text[out.index] = res.text.get(out.index, "") + out.text
        res.cached.add(out.num_cached_tokens)
        if out.prompt_logprobs is not None:
            res.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            res.finish[out.index] = out.finish_reason
            res.stop_reason[out.index] = out.stop_reason
            res.error = res.error or out.error
    return res


async def collect_aborted(engine: Engine, prompt: list[int], params: SamplingParams, rid: str,
                          after: int) -> Result:
    """Like `collect`, aborting the request once `after` tokens have arrived."""
    res = Result()
    async for out in engine.generate(prompt, params, rid):
        res.tokens.setdefault(0, []).extend(out.token_ids)
        res.text[0] = res.text.get(0, "") + out.text
        if len(res.tokens[0]) == after:
            engine.abort(rid)
        if out.finished:
            res.finish[0] = out.finish_reason
    return res


def run(engine: Engine, *jobs: tuple) -> list[Result]:
    async def main() -> list[Result]:
        return await asyncio.gather(*(collect(engine, *job) for job in jobs))
    return asyncio.run(main())


def prompts(n: int, seed: int = 0, max_len: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 2, max_len] + [rng.randint(1, max_len) for _ in range(n - 3)]
    return [[rng.randrange(3, 1000) for _ in range(k)] for k in lengths]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_batch_invariance(tiny_checkpoint: Path, sampled: bool) -> None:
    """Every request's tokens are the same alone and among 32 staggered concurrent ones."""
    rng = random.Random(1)
    jobs = []
    for i, prompt in enumerate(prompts(32)):
        params = SamplingParams(temperature=0.9 if sampled else 0.0, top_p=0.95, seed=100 + i,
                                max_tokens=rng.randint(1, 24), ignore_eos=True)
        jobs.append((prompt, params, f"r{i}", rng.random() * 0.3))
    with running(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=128,
                 max_model_len=1024) as engine:
        together = run(engine, *jobs)
        alone = [run(engine, (p, params, f"alone-{rid}"))[0] for p, params, rid, _ in jobs]
    for job, a, t in zip(jobs, alone, together, strict=True):
        assert t.tokens == a.tokens, f"{job[2]} changed when batched"
        assert len(a.tokens[0]) == job[1].max_tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["in-turn", "ahead"])
def test_graph_decode_layout_changes_no_token(tiny_checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              async_scheduling: bool) -> None:
    """Decode steps in the CUDA-graph layout (slot rows, buckets, pad rows; eager on CPU)
    give every one of 24 staggered requests, greedy and seeded, the tokens it gets alone;
    also with async scheduling (steps launched ahead, fed the tokens of the step before on
    the device)."""
    rng = random.Random(3)
    jobs = []
    for i, prompt in enumerate(prompts(24, seed=3, max_len=300)):
        params = SamplingParams(temperature=0.8 if i % 2 else 0.0, seed=i,
                                max_tokens=rng.randint(1, 30), ignore_eos=True)
        jobs.append((prompt, params, f"r{i}", rng.random() * 0.3))
    graphed_steps, fed = [], []
    run_graphs = DecodeGraphs.run

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        logits = run_graphs(self, *args, **kwargs)
        graphed_steps.append(logits is not None)
        fed.append(kwargs.get("feed") is not None)
        return logits
    monkeypatch.setattr(DecodeGraphs, "run", counting)
    config = {"max_num_seqs": 12, "max_num_batched_tokens": 96, "max_model_len": 512}
    with running(tiny_checkpoint, graph_layout=True, async_scheduling=async_scheduling,
                 **config) as engine:
        together = run(engine, *jobs)
    with running(tiny_checkpoint, **config) as engine:
        alone = [run(engine, (p, params, rid))[0] for p, params, rid, _ in jobs]
    assert sum(graphed_steps) >= 20
    assert (sum(fed) >= 10) if async_scheduling else not any(fed)
    for job, a, t in zip(jobs, alone, together, strict=True):
        assert t.tokens == a.tokens, f"{job[2]} changed in the graph layout"


def test_async_scheduling_ends_like_steps_in_turn(tiny_checkpoint: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    check_async_scheduling_ends_like_steps_in_turn(tiny_checkpoint, monkeypatch)


def check_async_scheduling_ends_like_steps_in_turn(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                   **engine_config: object) -> None:
    """Steps launched ahead end every kind of request as steps taken in turn do: stop
    tokens and stop strings (found only after the next step was launched: its row is
    dropped), max_tokens and the context's end (never launched ahead), logprobs, n=2, an
    abort, and penalties and min_tokens (which keep a step from going ahead while they need
    the tokens it does not know). On CPU in the graph layout run eagerly;
    tests/model/test_gpu.py runs it on CUDA's graphs."""
    graph_layout = engine_config.get("device", "cpu") == "cpu"
    config = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 160,
              **engine_config}
    base = [prompts(12, seed=9, max_len=100)[i] for i in range(12)]
    with running(folder, graph_layout=graph_layout, async_scheduling=False, **config) as e:
        greedy = run(e, *((p, replace(GREEDY, max_tokens=20), f"g{i}")
                          for i, p in enumerate(base)))
        tok = e.tokenizer
    stop_text = tok.decode(greedy[3].tokens[0][6:8]).strip()[:2]
    assert stop_text
    jobs = [
        (base[0], SamplingParams(temperature=0.0, max_tokens=30,
                                 stop_token_ids=(greedy[0].tokens[0][5],)), "stop-token", 0.0),
        (base[1], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), "length", 0.01),
        (base[2], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), "context",
         0.02),
        (base[3], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                 stop=(stop_text,)), "stop-string", 0.03),
        (base[4], SamplingParams(temperature=0.8, seed=4, max_tokens=15, ignore_eos=True,
                                 logprobs=2, n=2), "seeded-n2", 0.0),
        (base[5], SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True,
                                 presence_penalty=0.5, frequency_penalty=0.3), "penalties",
         0.05),
        # The stop token forced every step: it ends the request at the first step min_tokens
        # allows it (a ban counted one token behind would run one step on)
        (base[6], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6,
                                 logit_bias=((7, 100.0),), stop_token_ids=(7,)), "min-tokens",
         0.02),
        # The thinking's end forced once 4 tokens are spent (a step planned ahead would not
        # know they are)
        (base[8], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                 thinking_budget=ThinkingBudget(4, 5, 7)), "thinking", 0.01),
    ]
    ahead_steps: list[int] = []  # each step launched ahead, as it is read back
    still = engine_module._still_running
    monkeypatch.setattr(engine_module, "_still_running",
                        lambda plan, result: ahead_steps.append(1) or still(plan, result))

    def both(engine: Engine) -> list[Result]:
        async def main() -> list[Result]:
            aborted = collect_aborted(engine, base[7], replace(GREEDY, max_tokens=40), "abort",
                                      after=5)
            return await asyncio.gather(*(collect(engine, *job) for job in jobs), aborted)
        return asyncio.run(main())
    with running(folder, graph_layout=graph_layout, async_scheduling=False, **config) as e:
        in_turn = both(e)
    assert not ahead_steps
    with running(folder, graph_layout=graph_layout, async_scheduling=True, **config) as e:
        ahead = both(e)
    assert len(ahead_steps) >= 20  # (else the comparison shows nothing)
    for job, a, b in zip(jobs, in_turn, ahead, strict=False):
        assert (a.tokens, a.text, a.finish) == (b.tokens, b.text, b.finish), job[2]
    assert in_turn[0].finish[0] == FinishReason.STOP and len(in_turn[0].tokens[0]) < 30
    assert in_turn[3].finish[0] == FinishReason.STOP and stop_text not in in_turn[3].text[0]
    assert len(in_turn[2].tokens[0]) + len(base[2]) == 160
    assert len(in_turn[6].tokens[0]) == 7 and in_turn[6].finish[0] == FinishReason.STOP
    assert in_turn[7].tokens[0][4] == 7
    assert ahead[-1].finish[0] == FinishReason.ABORT
    assert ahead[-1].tokens[0][:5] == in_turn[-1].tokens[0][:5]


def test_lora_rows_never_replay_the_base_models_graphs(tiny_checkpoint: Path,
                                                       lora: LoraFixture) -> None:
    """In the CUDA-graph layout (run eagerly on CPU: the graphs hold the base model alone)
    with async scheduling, a decode step with an adapter's row runs layer by layer: the
    adapter's tokens are those of the plain layout, beside base-model requests that replay."""
    config = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 160,
              "enable_lora": True, "lora_modules": (f"sql={lora.adapter}",)}
    base = prompts(6, seed=5, max_len=40)
    jobs = [(p, replace(GREEDY, max_tokens=16, lora="sql" if i % 2 else None), f"j{i}")
            for i, p in enumerate(base)]
    with running(tiny_checkpoint, **config) as e:
        plain = run(e, *jobs)
    with running(tiny_checkpoint, graph_layout=True, async_scheduling=True, **config) as e:
        graphed = run(e, *jobs)
    assert [r.tokens for r in graphed] == [r.tokens for r in plain]
    assert plain[1].tokens != run_base(tiny_checkpoint, config, base[1])  # (the adapter acts)


def run_base(folder: Path, config: dict, prompt: list[int]) -> dict[int, list[int]]:
    with running(folder, **config) as e:
        [result] = run(e, (prompt, replace(GREEDY, max_tokens=16), "b"))
    return result.tokens


def test_async_scheduling_launches_the_next_step_before_reading(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step is launched before the one in flight is read back, except where the
    sequence ends by length in the step in flight (its last token is never run ahead); one
    that ends on a stop token had its next step launched, whose row is dropped."""
    dropped: list[int] = []
    still = engine_module._still_running

    def recording(plan, result):  # noqa: ANN001, ANN202
        kept = still(plan, result)
        dropped.append(len(plan.decodes) - len(kept[0].decodes))
        return kept
    monkeypatch.setattr(engine_module, "_still_running", recording)
    with running(tiny_checkpoint, graph_layout=True, max_model_len=1024,
                 async_scheduling=True) as engine:
        full = run(engine, ([5, 6], replace(GREEDY, max_tokens=12), "full"))[0].tokens[0]
        k = next(i for i in range(2, 12) if full[i] not in full[:i])
        cut = run(engine, ([5, 6], replace(GREEDY, max_tokens=12, ignore_eos=False,
                                           stop_token_ids=(full[k],)), "cut"))[0]
        run(engine, ([5], replace(GREEDY, max_tokens=1), "after"))  # (the dropped step first)
    assert cut.tokens[0] == full[:k + 1] and cut.finish[0] == FinishReason.STOP
    assert sum(dropped) == 1
    events: list[str] = []
    with running(tiny_checkpoint, graph_layout=True, max_model_len=1024,
                 async_scheduling=True) as engine:
        launch, finish = engine.runner.launch, engine.runner.finish

        def recording_launch(plan, feed=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
            events.append("launch" if feed is None else "ahead")
            return launch(plan, feed, **kwargs)

        def recording_finish(step):  # noqa: ANN001, ANN202
            events.append("read")
            return finish(step)

        engine.runner.launch, engine.runner.finish = recording_launch, recording_finish  # type: ignore
        res = run(engine, ([5, 6], replace(GREEDY, max_tokens=5), "r"))[0]
    assert len(res.tokens[0]) == 5
    # prefill (token 1); decode 2, with 3 ahead; 3, with 4 ahead; 4, with 5 ahead; 5 alone
    assert events == ["launch", "read", "launch", "ahead", "read", "ahead", "read", "ahead",
                      "read", "read"]


def test_chunked_prefill_gives_same_logits(tiny_checkpoint: Path) -> None:
    prompt = prompts(3, seed=2)[2]  # 500 tokens
    params = SamplingParams(max_tokens=0, prompt_logprobs=5)
    results = []
    for budget in (16, 100, 1024):
        with running(tiny_checkpoint, max_num_batched_tokens=budget, max_model_len=1024) as e:
            results.append(run(e, (prompt, params, "p"))[0].prompt_logprobs)
    for other in results[1:]:
        assert len(other) == len(results[0]) == len(prompt)
        for a, b in zip(results[0][1:], other[1:], strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_prompt_logprobs_score_the_prompt(tiny_checkpoint: Path) -> None:
    """max_tokens=0 scoring: logprob (and vocabulary rank) of token i given tokens < i, from
    one full forward."""
    prompt = prompts(4, seed=3)[3]
    with running(tiny_checkpoint, max_num_batched_tokens=64, max_model_len=1024) as engine:
        res = run(engine, (prompt, SamplingParams(max_tokens=0, prompt_logprobs=2), "s"))[0]
    model = load_checkpoint(tiny_checkpoint, torch.float32, "cpu")
    expected = torch.log_softmax(model(torch.tensor(prompt), torch.arange(len(prompt))), -1)
    assert res.prompt_logprobs[0] is None
    assert res.finish == {0: FinishReason.LENGTH} and res.tokens.get(0, []) == []
    for i, lp in enumerate(res.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i]
        assert math.isclose(lp.logprob, expected[i - 1, prompt[i]].item(), abs_tol=1e-4)
        assert len(lp.top) == 2 and lp.top[0][0] == expected[i - 1].argmax().item()
        # its rank: the tokens at least as likely, itself included (the reference's, within
        # rounding: surely more likely ones below it, ones not surely less likely above)
        reference, own = expected[i - 1], expected[i - 1, prompt[i]]
        more, at_least = (reference > own + 1e-4).sum().item(), (reference >= own - 1e-4).sum()
        assert lp.rank is not None and more + 1 <= lp.rank <= at_least.item(), (lp.rank, more)


def test_n_samples_share_one_prefill(tiny_checkpoint: Path) -> None:
    """n=3 greedy samples all equal the n=1 output (the copied slot is the real prompt)."""
    prompt = prompts(5, seed=4)[4]
    with running(tiny_checkpoint, max_num_seqs=4, max_model_len=1024) as engine:
        one = run(engine, (prompt, GREEDY, "one"))[0]
        three = run(engine, (prompt, SamplingParams(n=3, temperature=0.0, max_tokens=12,
                                                    ignore_eos=True), "three"))[0]
        seeded = run(engine, (prompt, SamplingParams(n=3, seed=7, max_tokens=12,
                                                     ignore_eos=True), "seeded"))[0]
    assert three.tokens == {i: one.tokens[0] for i in range(3)}
    assert len({tuple(t) for t in seeded.tokens.values()}) == 3


def test_stop_string_spanning_tokens(tiny_checkpoint: Path) -> None:
    prompt = prompts(6, seed=5)[5]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        full = run(engine, (prompt, params, "full"))[0]
        text = full.text[0]
        tok = engine.tokenizer
        # A stop string that starts inside one token's text and ends inside a later one.
        pieces = [tok.decode(full.tokens[0][:k]) for k in range(1, 31)]
        start = next(i for i in range(1, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) > 1)
        begin = len(pieces[start]) - 1
        stop = text[begin:begin + 4]
        assert len(stop) == 4
        cut = run(engine, (prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                  ignore_eos=True, stop=(stop,)), "cut"))[0]
        kept = run(engine, (prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                   ignore_eos=True, stop=(stop,),
                                                   include_stop_str_in_output=True), "kept"))[0]
    first = text.index(stop)
    assert cut.text[0] == text[:first]
    assert kept.text[0] == text[:first + len(stop)]
    assert cut.finish[0] == FinishReason.STOP
    assert len(cut.tokens[0]) < 30


# The tiny tokenizer's "\n", " ", "a", " a": text of lines and indents only
LINES_AND_INDENTS = (204, 226, 70, 274)


def test_llamacpps_editor_limits_end_the_output(tiny_checkpoint: Path) -> None:
    """n_indent cuts the text before an under-indented line's first other character (a
    blank line's newline too); t_max_predict_ms ends it once a line is complete and the
    time is past (1 ms: a few tokens later). Both as the length does; the tokens until then
    are the unlimited run's (same seed)."""
    prompt = prompts(3, seed=2)[2][:20]
    plain = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True,
                           allowed_token_ids=LINES_AND_INDENTS)
    with running(tiny_checkpoint, max_model_len=256) as engine:
        full, indented, timed, one_line = run(
            engine, (prompt, plain, "full"), (prompt, replace(plain, n_indent=2), "indent"),
            (prompt, replace(plain, t_max_predict_ms=1), "timed"),
            (prompt, replace(plain, t_max_predict_ms=1, allowed_token_ids=(70, 226)), "one"))
    text = full.text[0]
    assert indent_cut(text, 2) != text  # (the run has an under-indented line to cut)
    assert indented.text[0] == indent_cut(text, 2)
    assert indented.finish[0] == FinishReason.LENGTH
    assert indented.tokens[0] == full.tokens[0][:len(indented.tokens[0])]
    assert len(indented.tokens[0]) < 60
    assert timed.finish[0] == FinishReason.LENGTH and len(timed.tokens[0]) < 60
    assert text.startswith(timed.text[0]) and "\n" in timed.text[0]
    assert len(one_line.tokens[0]) == 60  # no line complete: no time limit


def test_stops_at_max_model_len(tiny_checkpoint: Path) -> None:
    with running(tiny_checkpoint, max_model_len=64) as engine:
        res = run(engine, ([5] * 60, SamplingParams(max_tokens=None, ignore_eos=True), "r"))[0]
        run(engine, ([5] * 59, SamplingParams(max_tokens=5), "fits"))
        with pytest.raises(RequestRejected, match=r"is 64 tokens.*65 tokens \(60 in the prompt"):
            run(engine, ([5] * 60, SamplingParams(max_tokens=5), "too-long"))
        with pytest.raises(RequestRejected, match=r"is 64 tokens"):
            run(engine, ([5] * 64, SamplingParams(max_tokens=None), "full"))
    assert len(res.tokens[0]) == 4 and res.finish[0] == FinishReason.LENGTH


def test_min_tokens_and_ignore_eos(tiny_checkpoint: Path) -> None:
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        eos = min(engine.tokenizer.eos_ids)
        force_eos = ((eos, 100.0),)
        plain = run(engine, ([5, 6], SamplingParams(logit_bias=force_eos, max_tokens=10), "a"))[0]
        least = run(engine, ([5, 6], SamplingParams(logit_bias=force_eos, max_tokens=10,
                                                    min_tokens=5), "b"))[0]
        ignore = run(engine, ([5, 6], SamplingParams(logit_bias=force_eos, max_tokens=8,
                                                     ignore_eos=True), "c"))[0]
    assert plain.tokens[0] == [eos] and plain.finish[0] == FinishReason.STOP
    assert len(least.tokens[0]) == 6 and eos not in least.tokens[0][:5]
    assert least.tokens[0][5] == eos and least.finish[0] == FinishReason.STOP
    assert ignore.tokens[0] == [eos] * 8 and ignore.finish[0] == FinishReason.LENGTH


def test_sampling_controls_follow_the_outputs(tiny_checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner reuses a step's sampling controls while the same rows decode, but not where
    they read the outputs: a frequency penalty counts every token so far (t1 leads t2 by 1
    logit, each occurrence costs 2, so they alternate), and min_tokens' ban ends on time
    (test above)."""
    built = []
    from_params = sampling_module.SamplingBatch.from_params
    monkeypatch.setattr(sampling_module.SamplingBatch, "from_params",
                        lambda *a, **k: built.append(1) or from_params(*a, **k))
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        t1, t2 = 100, 101
        bias = ((t1, 100.0), (t2, 99.0))
        penalised = run(engine, ([5, 6], SamplingParams(
            temperature=0.0, logit_bias=bias, frequency_penalty=2.0, max_tokens=6), "p"))[0]
        assert penalised.tokens[0] == [t1, t2] * 3
        built.clear()
        plain = run(engine, *[([5, 6 + i], SamplingParams(temperature=0.0, max_tokens=20,
                                                          ignore_eos=True), f"r{i}")
                              for i in range(3)])
    assert all(len(r.tokens[0]) == 20 for r in plain)
    assert len(built) <= 6  # three rows decoding 19 steps together: built as they join


def test_dry_and_mirostat_state_follows_each_sequence(tiny_checkpoint: Path) -> None:
    """The runner's DRY context, kept token by token, gives every step the penalties of the
    sequence's last last_n tokens of prompt and output (sample siblings and neighbours apart,
    a window shorter than the prompt); its DRY contexts and mirostat mus go with the request."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        runner, seen = engine.runner, []
        dry_penalties_of = runner._dry_penalties

        def recording(seq: object) -> object:
            penalties = dry_penalties_of(seq)  # type: ignore[arg-type]
            if penalties is not None:
                seen.append((list(seq.request.prompt_ids) + list(seq.output_ids),  # type: ignore[attr-defined]
                             seq.request.params.dry, penalties))  # type: ignore[attr-defined]
            return penalties

        runner._dry_penalties = recording  # type: ignore[method-assign]
        rng = random.Random(4)
        loop = [rng.randrange(3, 40) for _ in range(5)] * 8  # (repeats for DRY to find)

        def dry_params(last_n: int, **samplers: object) -> SamplingParams:
            return SamplingParams(
                temperature=1.0, top_k=0, top_p=1.0, seed=3, n=2, max_tokens=16,
                ignore_eos=True, temperature_last=True, llamacpp=LlamaCppSamplers(
                    dry=Dry(0.8, 1.75, 2, last_n, ((999, ()),)), **samplers))

        results = run(engine, (loop, dry_params(12), "a"),
                      (loop[5:], dry_params(4096, mirostat=2), "b"),
                      ([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=16), "c"))
        assert all(len(tokens) == 16 for r in results for tokens in r.tokens.values())
        assert len(seen) >= 2 * 2 * 16 and any(penalties for _, _, penalties in seen)
        for tokens, dry, penalties in seen:
            assert penalties == pytest.approx(dry_penalties(tokens, dry))
        assert runner.dry_contexts == {} and runner.mirostat_mus == {}


def forced_token(engine: Engine, prompt: list[int]) -> tuple[int, str]:
    """A token id whose text after `prompt` is at least two visible characters."""
    tok = engine.tokenizer
    base = tok.decode(prompt)
    for t in range(100, 1000):
        piece = tok.decode([*prompt, t])[len(base):]
        if len(piece.strip()) >= 2 and t not in tok.special_ids:
            return t, piece
    raise AssertionError("no such token")


def test_stop_token_text_is_left_out(tiny_checkpoint: Path) -> None:
    """As in vLLM: a stop token id (or eos) ends the text before it unless
    include_stop_str_in_output; it still counts as an output token."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        t, piece = forced_token(engine, [5, 6])
        force = ((t, 100.0),)
        cut, kept = run(
            engine,
            ([5, 6], SamplingParams(logit_bias=force, max_tokens=5, stop_token_ids=(t,)), "cut"),
            ([5, 6], SamplingParams(logit_bias=force, max_tokens=5, stop_token_ids=(t,),
                                    include_stop_str_in_output=True), "kept"))
        eos = min(engine.tokenizer.eos_ids)
        shown = run(engine, ([5, 6], SamplingParams(logit_bias=((eos, 100.0),), max_tokens=5,
                                                    skip_special_tokens=False), "eos"))[0]
    assert cut.tokens[0] == [t] and cut.text[0] == "" and cut.finish[0] == FinishReason.STOP
    assert kept.tokens[0] == [t] and kept.text[0] == piece
    assert shown.tokens[0] == [eos] and shown.text[0] == ""
    # vLLM's stop_reason: the stop token id, and null for the tokenizer's eos
    assert cut.stop_reason[0] == kept.stop_reason[0] == t and shown.stop_reason[0] is None


def test_stop_reason_names_a_second_eos_but_not_the_tokenizers(tiny_checkpoint: Path) -> None:
    """generation_config.json's other eos ids (Llama 3's <|eot_id|>) are stop token ids to
    vLLM, which reports them in stop_reason; the tokenizer's own eos is null there."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        t, _ = forced_token(engine, [5, 6])
        tok = engine.tokenizer
        assert tok.eos_id is not None and tok.eos_id in tok.eos_ids
        assert engine.scheduler.eos_id == tok.eos_id  # the tokenizer's, from start-up
        engine.scheduler.eos_ids = frozenset({*tok.eos_ids, t})  # as generation_config adds
        second, own, ignored = run(
            engine, ([5, 6], SamplingParams(logit_bias=((t, 100.0),), max_tokens=5), "second"),
            ([5, 6], SamplingParams(logit_bias=((tok.eos_id, 100.0),), max_tokens=5), "own"),
            ([5, 6], SamplingParams(logit_bias=((t, 100.0),), max_tokens=3, ignore_eos=True),
             "ignored"))
    assert second.finish[0] == FinishReason.STOP and second.stop_reason[0] == t
    assert own.finish[0] == FinishReason.STOP and own.stop_reason[0] is None
    assert ignored.finish[0] == FinishReason.LENGTH and ignored.stop_reason[0] is None


def test_stop_strings_wait_for_min_tokens(tiny_checkpoint: Path) -> None:
    """As in vLLM: no stop string ends in the text of the first min_tokens tokens."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        t, piece = forced_token(engine, [5, 6])
        params = SamplingParams(logit_bias=((t, 100.0),), max_tokens=10, ignore_eos=True,
                                stop=(piece,), min_tokens=3)
        res = run(engine, ([5, 6], params, "r"))[0]
    assert res.tokens[0] == [t] * 4 and res.finish[0] == FinishReason.STOP
    assert res.text[0] == engine.tokenizer.decode([5, 6, t, t, t])[len(
        engine.tokenizer.decode([5, 6])):]


def test_stop_string_on_the_last_allowed_token_is_a_stop(tiny_checkpoint: Path) -> None:
    """The scheduler had already finished the sequence for length; the stop string matched
    by the same token is the reason, as in vLLM (it was reported as "length")."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        t, piece = forced_token(engine, [5, 6])
        res = run(engine, ([5, 6], SamplingParams(logit_bias=((t, 100.0),), max_tokens=1,
                                                  ignore_eos=True, stop=(piece,)), "r"))[0]
    assert res.tokens[0] == [t] and res.text[0] == "" and res.finish[0] == FinishReason.STOP


def test_abort_returns_the_text_held_back_for_stop_strings(tiny_checkpoint: Path) -> None:
    """Text held back in case it starts a stop string is the request's own: an abort still
    delivers it (vLLM's finished flush)."""
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True,
                            stop=("\x00never in the output\x00",))
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        res = asyncio.run(collect_aborted(engine, [5, 6, 7], params, "held", after=12))
        tok = engine.tokenizer
        full = tok.decode([5, 6, 7, *res.tokens[0]])[len(tok.decode([5, 6, 7])):]
    assert res.finish[0] == FinishReason.ABORT
    assert res.text[0] == full and len(full) > 0


def test_abort_frees_slot(tiny_checkpoint: Path) -> None:
    with running(tiny_checkpoint, max_num_seqs=2, max_model_len=1024) as engine:
        params = SamplingParams(max_tokens=500, ignore_eos=True)
        res = asyncio.run(collect_aborted(engine, [5, 6, 7], params, "long", after=3))
        assert res.finish[0] == FinishReason.ABORT
        assert len(res.tokens[0]) < 50
        for _ in range(100):
            if engine.stats().slots_used == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.stats().slots_used == 0 and engine.stats().tokens_used == 0


def test_slots_are_read_between_steps_and_a_failed_read_fails_only_its_query(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /slots' query: answered by the engine loop while a request runs (its slot busy,
    with its progress); if reading them fails, that query fails (503) and the engine goes on
    serving; once the request is done its slot shows it idle."""
    with running(tiny_checkpoint, max_num_seqs=2, max_model_len=1024) as engine:
        params = SamplingParams(max_tokens=300, ignore_eos=True)

        async def main() -> None:
            stream = engine.generate([5, 6, 7], params, "slow")
            outputs = aiter(stream)
            for _ in range(3):
                await anext(outputs)
            busy = [slot for slot in await engine.slot_states() if slot.processing]
            assert [(slot.request_id, slot.prompt_tokens) for slot in busy] == [("slow", 3)]
            assert busy[0].decoded >= 3 and busy[0].decoded + busy[0].remaining == 300
            with monkeypatch.context() as patch:
                patch.setattr(engine.scheduler, "slot_states", lambda: 1 / 0)
                with pytest.raises(SlotsUnavailable):
                    await engine.slot_states()
            async for _ in outputs:
                pass
            idle = [slot for slot in await engine.slot_states() if slot.request_id == "slow"]
            assert [(slot.processing, slot.decoded, slot.remaining) for slot in idle] == [
                (False, 300, 0)]

        asyncio.run(main())
        engine.check_health()


def test_one_request_failure_leaves_others_running(tiny_checkpoint: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = outputs_module.IncrementalDetokenizer

    class Exploding(real):  # type: ignore[misc, valid-type]
        def add(self, ids: list[int]) -> str:
            if self._explode:
                raise RuntimeError("boom")
            return super().add(ids)

        def __init__(self, tokenizer, prompt_ids, **kw) -> None:  # noqa: ANN001
            super().__init__(tokenizer, prompt_ids, **kw)
            self._explode = prompt_ids[:1] == [999]

    monkeypatch.setattr(outputs_module, "IncrementalDetokenizer", Exploding)
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        good, bad = run(engine, ([5, 6], GREEDY, "good"), ([999, 6], GREEDY, "bad"))
        engine.check_health()
    assert bad.finish[0] == FinishReason.ERROR and "boom" in (bad.error or "")
    assert good.finish[0] == FinishReason.LENGTH and len(good.tokens[0]) == 12


def test_a_sample_failing_fails_its_siblings_once(tiny_checkpoint: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """n=2, the first sample's output fails: both samples end with the error, one final output
    each (its sibling's turn in the same step builds nothing more), counted once each."""
    real = outputs_module.IncrementalDetokenizer
    made: list[bool] = []

    class FirstExplodes(real):  # type: ignore[misc, valid-type]
        def __init__(self, tokenizer, prompt_ids, **kw) -> None:  # noqa: ANN001
            super().__init__(tokenizer, prompt_ids, **kw)
            mine = prompt_ids == [998, 997]
            self._explode = mine and not made
            if mine:
                made.append(True)

        def add(self, ids: list[int]) -> str:
            if self._explode:
                raise RuntimeError("boom")
            return super().add(ids)

    monkeypatch.setattr(outputs_module, "IncrementalDetokenizer", FirstExplodes)
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        (bad,) = run(engine, ([998, 997], replace(GREEDY, n=2), "bad"))
        assert engine.stats().finished_total == {"error": 2}
    assert bad.finish == {0: FinishReason.ERROR, 1: FinishReason.ERROR}
    assert len(made) == 1  # the sibling's output was never begun


def test_admission_counts_a_requests_samples(tiny_checkpoint: Path) -> None:
    """A request of n takes n slots, so it takes n places: with 2 slots and --max-waiting 0
    one request of n=2 runs and nothing waits (the next is refused, whatever its n), where
    counting requests let a second wait."""
    with running(tiny_checkpoint, max_num_seqs=2, max_waiting=0, max_model_len=1024) as engine:
        async def main() -> None:
            busy = engine.generate([5], SamplingParams(n=2, max_tokens=300, ignore_eos=True),
                                   "busy")
            for n in (2, 1):
                with pytest.raises(EngineOverloaded, match=f"this request has {n}"):
                    engine.generate([6], SamplingParams(n=n, max_tokens=1), f"n{n}")
            engine.abort("busy")
            async for _ in busy:
                pass
            while engine.stats().slots_used:
                await asyncio.sleep(0.01)
            outputs = [out async for out in engine.generate([6], SamplingParams(
                n=2, max_tokens=1), "after")]
            assert {out.index for out in outputs if out.finished} == {0, 1}
        asyncio.run(main())
    assert engine.stats().num_queued == 0


def test_the_models_max_new_tokens_stands_in_where_the_context_has_room(
        tiny_checkpoint: Path) -> None:
    """A max_tokens left to the context takes the model's max_new_tokens (default_max_tokens),
    but never past the context (vLLM takes the smaller) nor below min_tokens."""
    left = SamplingParams(max_tokens=None, default_max_tokens=20, ignore_eos=True)
    with running(tiny_checkpoint, max_model_len=64) as engine:
        fits, long, at_least = run(engine, ([5] * 10, left, "fits"), ([5] * 50, left, "long"),
                                   ([5] * 10, replace(left, min_tokens=30), "at-least"))
    assert [len(r.tokens[0]) for r in (fits, long, at_least)] == [20, 64 - 50, 30]


async def occupy_the_slot(engine: Engine) -> None:
    """A request of 300 tokens in the engine's one slot, running (abort "busy" after)."""
    await anext(aiter(engine.generate([5], SamplingParams(max_tokens=300, ignore_eos=True),
                                      "busy")))
    while engine.stats().slots_used != 1:
        await asyncio.sleep(0.01)


def test_overload_is_rejected(tiny_checkpoint: Path) -> None:
    with running(tiny_checkpoint, max_num_seqs=1, max_waiting=1, max_model_len=1024) as engine:
        async def main() -> None:
            await occupy_the_slot(engine)
            engine.generate([5], SamplingParams(max_tokens=1), "queued")
            with pytest.raises(EngineOverloaded):
                engine.generate([5], SamplingParams(max_tokens=1), "rejected")
            engine.abort("busy")
        asyncio.run(main())


def test_places_asked_of_the_admission_check(tiny_checkpoint: Path) -> None:
    """A beam search's first step asks room for its n beams (places=n), its later steps for
    none (places=0): queued whatever the queue holds."""
    with running(tiny_checkpoint, max_num_seqs=1, max_waiting=1, max_model_len=1024) as engine:
        async def main() -> None:
            await occupy_the_slot(engine)
            one = SamplingParams(max_tokens=1)
            with pytest.raises(EngineOverloaded, match="this request has 2"):
                engine.generate([5], one, "first-step", places=2)
            engine.generate([5], one, "queued")  # the one waiting place
            for k in range(3):  # a running search's steps: past the full queue
                engine.generate([5], one, f"later-step-{k}", places=0)
            assert engine.stats().num_queued == 4
            engine.abort("busy")
        asyncio.run(main())


def test_allowed_token_ids_that_only_end_it_win_over_min_tokens(tiny_checkpoint: Path) -> None:
    """allowed_token_ids of eos alone, min_tokens 3: banning eos until then would leave no
    token to draw (one outside the set came out); the set wins, and eos ends it at 3."""
    with running(tiny_checkpoint, max_model_len=256) as engine:
        eos = engine.tokenizer.eos_id
        params = SamplingParams(temperature=1.0, seed=1, allowed_token_ids=(eos,),
                                min_tokens=3, max_tokens=8)
        [result] = run(engine, ([5, 6, 7], params, "only-eos"))
    assert result.tokens[0] == [eos] * 3 and result.finish[0] == FinishReason.STOP


def test_admitted_requests_hold_their_slots_from_the_moment_they_are_scheduled(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-waiting 0: while the step that admitted two requests to the two slots runs,
    a third is refused (the queue had let it in, seeing free slots until the step ended)."""
    with running(tiny_checkpoint, max_num_seqs=2, max_waiting=0, max_model_len=1024) as engine:
        in_step, release = threading.Event(), threading.Event()
        real = engine.runner.launch

        def held(plan, **kwargs):  # noqa: ANN001, ANN003, ANN202
            if plan.admitted:
                in_step.set()
                release.wait(10)
            return real(plan, **kwargs)
        monkeypatch.setattr(engine.runner, "launch", held)

        async def main() -> None:
            params = SamplingParams(max_tokens=2, ignore_eos=True)
            streams = [engine.generate([5, 6], params, f"r{i}") for i in range(2)]
            assert await asyncio.to_thread(in_step.wait, 10)
            try:
                with pytest.raises(EngineOverloaded):
                    engine.generate([5], params, "third")
            finally:
                release.set()
            for stream in streams:
                assert [out async for out in stream][-1].finish_reason == FinishReason.LENGTH
        asyncio.run(main())


def test_engine_that_keeps_failing_reports_dead(tiny_checkpoint: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A step failure fails that step's requests; repeated failures mark the engine dead."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        def broken(plan, **kwargs):  # noqa: ANN001, ANN003, ANN202
            raise RuntimeError("device lost")
        monkeypatch.setattr(engine.runner, "launch", broken)
        first = run(engine, ([5, 6], GREEDY, "first"))[0]
        assert first.finish[0] == FinishReason.ERROR and "device lost" in (first.error or "")
        engine.check_health()  # one failure is not death
        for i in range(2):
            run(engine, ([5, 6], GREEDY, f"again-{i}"))
        for _ in range(100):
            if engine._dead is not None:
                break
            asyncio.run(asyncio.sleep(0.01))
        with pytest.raises(engine_module.EngineDeadError, match="device lost"):
            engine.check_health()
        with pytest.raises(engine_module.EngineDeadError):
            run(engine, ([5, 6], GREEDY, "after"))


def test_requests_not_yet_scheduled_fail_when_the_engine_dies(
        tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request accepted by generate() but still in the inbox when the loop dies gets an
    error output, not a stream that never ends; nothing is accepted afterwards."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        def broken(request):  # noqa: ANN001, ANN202
            raise RuntimeError("scheduler bug")
        monkeypatch.setattr(engine.scheduler, "add", broken)

        async def main() -> Result:
            return await asyncio.wait_for(collect(engine, [5, 6], GREEDY, "orphan"), 20)
        res = asyncio.run(main())
        assert res.finish[0] == FinishReason.ERROR and "scheduler bug" in (res.error or "")
        assert engine.stats().finished_total["error"] == 1
        with pytest.raises(engine_module.EngineDeadError):
            run(engine, ([5, 6], GREEDY, "after"))


def test_building_an_engine_keeps_freed_memory_under_load(tiny_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The other half of the memory policy (server/memory.py; its effect is tested in
    test_memory.py): set before the model loads."""
    order: list[str] = []
    monkeypatch.setattr(startup_module, "keep_freed_memory", lambda: order.append("keep"))
    load = startup_module.load_checkpoint
    monkeypatch.setattr(startup_module, "load_checkpoint",
                        lambda *a: order.append("load") or load(*a))
    build_engine(tiny_checkpoint, EngineConfig(device="cpu"))
    assert order == ["keep", "load"]


def test_engine_returns_free_memory_when_it_goes_idle(tiny_checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Once per busy -> idle transition, not per step (see server/memory.py)."""
    calls: list[float] = []
    monkeypatch.setattr(engine_module, "release_free_memory", lambda: calls.append(1) or True)

    def settle(n: int) -> None:
        for _ in range(200):
            if len(calls) >= n:
                break
            asyncio.run(asyncio.sleep(0.01))
        asyncio.run(asyncio.sleep(0.1))  # and no more follow
        assert len(calls) == n

    with running(tiny_checkpoint, max_model_len=256) as engine:
        settle(0)
        run(engine, ([5, 6], GREEDY, "a"), ([7, 8, 9], GREEDY, "b"))
        settle(1)
        run(engine, ([5, 6], GREEDY, "c"))
        settle(2)


def test_release_free_memory_works_on_glibc() -> None:
    import platform

    from server.memory import release_free_memory

    assert release_free_memory() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("enabled", [True, False])
def test_engine_config_switches_the_cpu_kernels(tiny_checkpoint: Path, enabled: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-cpu-kernels` reaches the model and the sampler; on, the engine's steps use the
    kernels (their build and equality with PyTorch's ops: tests/model/test_cpu_kernels.py,
    tests/engine/test_sampling.py)."""
    kernels = SimpleNamespace(linear_is_tuned=False,  # a marker; the linears stay oneDNN's
                              handles_head_dim=lambda head_dim: True)
    monkeypatch.setattr("model.cpu_kernels.load", lambda: kernels)
    # No warm-up: the marker cannot run a step.
    engine = build_engine(tiny_checkpoint, EngineConfig(device="cpu", cpu_kernels=enabled,
                                                        warmup=False))
    want = kernels if enabled else None
    assert all(layer.self_attn.kernels is want for layer in engine.runner.model.model.layers)
    assert engine.runner.sampler.kernels is want


@pytest.mark.parametrize("enabled", [True, False])
def test_engine_config_switches_the_gpu_kernels(tiny_checkpoint: Path, enabled: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-gpu-kernels` reaches the model's pack (the kernels themselves:
    tests/model/test_triton_kernels.py); on CPU the C kernels stay the choice either way."""
    calls: list[dict] = []
    pack = LlamaModel.pack
    monkeypatch.setattr(LlamaModel, "pack", lambda self, **kw: calls.append(kw) or pack(self, **kw))
    build_engine(tiny_checkpoint, EngineConfig(device="cpu", gpu_kernels=enabled))
    assert [c["use_gpu_kernels"] for c in calls] == [enabled]


def test_deferred_outputs_go_out_after_the_next_launch(tiny_checkpoint: Path,
                                                       output_mode: str) -> None:
    """With async output processing a graphed step's launch comes before the last step's
    tokens are posted (the event loop streams them while the device computes); the prefill
    (eager) step and the final tokens post at once; without it, every step posts at once.
    (On CPU the launch posts them itself: the next test.)"""
    events: list[str] = []
    with running(tiny_checkpoint, graph_layout=True, max_model_len=1024,
                 async_scheduling=False) as engine:
        launch, post = engine.runner.launch, engine._post

        def recording_launch(plan, **kwargs):  # noqa: ANN001, ANN003, ANN202
            events.append("launch")
            return launch(plan, **kwargs)

        def recording_post(outputs: list) -> None:
            n = sum(len(o.token_ids) for o in engine._deferred + outputs)
            events.extend(["token"] * n)
            post(outputs)

        engine.runner.launch, engine._post = recording_launch, recording_post  # type: ignore
        res = run(engine, ([5, 6], replace(GREEDY, max_tokens=4), "r"))[0]
    assert len(res.tokens[0]) == 4
    if output_mode == AT_ONCE:
        assert events == ["launch", "token"] * 4
    else:  # the graphed steps' launches (their stand-in's, here) come first
        assert events == ["launch", "launch", "token", "launch", "token", "launch", "token",
                          "token"]


def test_held_outputs_go_out_as_the_next_forward_starts(tiny_checkpoint: Path,
                                                        output_mode: str) -> None:
    """On CPU (where a launch computes the whole step) async output processing posts a
    step's tokens from inside the next step's forward, once its inputs are built (the C
    decode step then runs without the GIL, beside the event loop streaming them); the last
    tokens, with nothing to follow, at once. Without it, or with a device that computes
    after its launch returns, every token is out before the next forward."""
    events: list[str] = []
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        model, post = engine.runner.model, engine._post
        forward = model.forward

        def recording_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            events.append("forward")
            logits = forward(*args, **kwargs)
            events.append("end")
            return logits

        def recording_post(outputs: list) -> None:
            n = sum(len(o.token_ids) for o in engine._deferred + outputs)
            events.extend(["token"] * n)
            post(outputs)

        model.forward, engine._post = recording_forward, recording_post  # type: ignore
        try:
            res = run(engine, ([5, 6], replace(GREEDY, max_tokens=4), "r"))[0]
        finally:
            del model.forward
    assert len(res.tokens[0]) == 4
    if output_mode == IN_FORWARD:
        assert events == ["forward", "end"] + ["forward", "token", "end"] * 3 + ["token"]
    else:
        assert events == ["forward", "end", "token"] * 4


@pytest.mark.parametrize("computing", [False, True], ids=["before-compute", "computing"])
def test_tokens_held_for_a_step_that_fails_come_before_its_error(tiny_checkpoint: Path,
                                                                 computing: bool) -> None:
    """A step that fails before its forward computes, or once it has begun (the last step's
    tokens, held for it, then gone out): the request gets every token sampled before it,
    then the error."""
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        model, calls = engine.runner.model, [0]
        forward = model.forward

        def failing_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[0] += 1
            if calls[0] < 3:
                return forward(*args, **kwargs)
            if computing:
                kwargs["before_compute"]()
            raise RuntimeError("device lost")

        model.forward = failing_third  # type: ignore[method-assign]
        try:
            [res] = run(engine, ([5, 6], replace(GREEDY, max_tokens=8), "r"))
        finally:
            del model.forward
    assert res.finish[0] == FinishReason.ERROR and "device lost" in (res.error or "")
    assert len(res.tokens[0]) == 2  # the prefill's and the first decode step's


def test_arrivals_leave_held_outputs_held(tiny_checkpoint: Path, output_mode: str) -> None:
    """A request taken between two steps posts nothing: outputs held for the next step go out
    as it computes (or, at once, before it), not with the arrival."""
    engine = build_engine(tiny_checkpoint, EngineConfig(device="cpu", warmup=False,
                                                        async_output_proc=ASYNC_OUTPUT_PROC))
    posted: list[list[str]] = []  # the request ids of each post with outputs
    engine.output_sink = lambda outputs: outputs and posted.append(  # type: ignore[assignment]
        [o.request_id for o in outputs])
    params = replace(GREEDY, max_tokens=8)
    engine.scheduler.add(Request("a", [5, 6, 7, 8], params))
    engine._step()  # the engine thread's steps, run here (the thread is not started)
    held = [o.request_id for o in engine._deferred]
    assert held == ([] if output_mode == AT_ONCE else ["a"])
    before = list(posted)
    engine.put(Add(Request("b", [9, 10, 11], params)))
    assert engine._drain_inbox(block=False)
    assert posted == before and [o.request_id for o in engine._deferred] == held
    engine._step()  # a's first decode beside b's prompt
    assert posted == ([["a"], ["a", "b"]] if output_mode == AT_ONCE else [["a"]])


def test_prefix_caching_changes_no_token(tiny_checkpoint: Path) -> None:
    check_prefix_caching_changes_no_token(tiny_checkpoint)


def check_prefix_caching_changes_no_token(folder: Path, **engine_config: object) -> None:
    """A chat's next turn (the conversation so far, and more) and a prompt sharing a running
    request's long system prompt get the tokens they get computed whole, greedy and seeded,
    while most of their prompts come from the cache (and n > 1 samples, from one copy).
    (tests/model/test_gpu.py runs it on CUDA.)"""
    rng = random.Random(3)
    system = [rng.randrange(3, 1000) for _ in range(150)]
    first = system + [rng.randrange(3, 1000) for _ in range(30)]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=24, ignore_eos=True)

    def conversation(engine: Engine) -> tuple[list[Result], int]:
        [one] = run(engine, (first, greedy, "turn-1"))
        turn = first + one.tokens[0] + [7, 8, 9]
        # Admitted in one step: the turn starts in its own slot (the first turn's), the
        # other gets the system prompt copied from there
        results = run(engine, (turn, greedy, "turn-2"), (system + [11, 12] * 20, seeded, "beside"))
        return [one, *results], engine.stats().prefix_cache_hits_total

    config = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 512,
              **engine_config}
    with running(folder, prefix_caching=False, **config) as engine:
        whole, no_hits = conversation(engine)
    with running(folder, **config) as engine:
        cached, hits = conversation(engine)
        assert engine.stats().prompt_tokens_total == sum(  # taken, cached or not
            len(p) for p in (first, first + whole[0].tokens[0] + [7, 8, 9], system + [11, 12] * 20))
    assert [r.tokens for r in cached] == [r.tokens for r in whole]
    assert no_hits == 0 and engine.stats().num_queued == 0  # every admission counted off
    # The turn: all it repeats but the last output token (never fed); beside it: the system
    # prompt. Each request's outputs say so (usage's cached_tokens), and no output of the
    # requests computed whole
    assert hits == (len(first) + 24 - 1) + len(system)
    assert [r.cached for r in cached] == [{0}, {len(first) + 24 - 1}, {len(system)}]
    assert [r.cached for r in whole] == [{0}] * 3


def test_slots_stay_packed_where_decode_attention_reads_a_run(tiny_checkpoint: Path) -> None:
    """The C kernels read each row's own slot; PyTorch's ops read the slots in use as one
    run (idle ones included) or gather them, so without the kernels slots stay packed."""
    with running(tiny_checkpoint, max_model_len=256) as engine:
        assert engine.runner.model.attends_by_slot and not engine.scheduler.packed_slots
    with running(tiny_checkpoint, max_model_len=256, cpu_kernels=False) as engine:
        assert not engine.runner.model.attends_by_slot and engine.scheduler.packed_slots


def test_a_failed_step_leaves_no_prefix_claimed(tiny_checkpoint: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What a failed step wrote or copied is unknown, in its own requests' slots too: after
    it no slot is trusted, and its lookups are not counted."""
    prompt = list(range(100, 140))
    with running(tiny_checkpoint, max_model_len=1024) as engine:
        run(engine, (prompt + [11], GREEDY, "first"))
        hits = engine.stats().prefix_cache_hits_total
        real = engine.runner.launch

        def failing(plan: object, **kwargs: object) -> object:
            monkeypatch.setattr(engine.runner, "launch", real)  # once
            raise MemoryError("no room for the step")
        monkeypatch.setattr(engine.runner, "launch", failing)
        [failed] = run(engine, (prompt + [21], GREEDY, "failed"))  # would reuse 40 tokens
        assert failed.finish[0] == FinishReason.ERROR
        assert engine.scheduler.cached == {}
        assert engine.stats().prefix_cache_hits_total == hits
        assert engine.stats().num_queued == 0
        [after] = run(engine, (prompt + [31], GREEDY, "after"))
        assert engine.stats().prefix_cache_hits_total == hits  # computed whole
    with running(tiny_checkpoint, max_model_len=1024, prefix_caching=False) as engine:
        [whole] = run(engine, (prompt + [31], GREEDY, "after"))
    assert after.tokens == whole.tokens


def test_bad_words_are_never_written(tiny_checkpoint: Path) -> None:
    """vLLM's bad_words: a one-token word is never sampled; a word of several tokens loses
    its last token where the output ends with the others. Greedy, so the first output is
    what the model writes unbanned, and the bans change exactly that."""
    from server.serving import bad_words_token_ids

    prompt = prompts(1, seed=3)[0]

    def greedy(engine: Engine, words: tuple[tuple[int, ...], ...] = ()) -> list[int]:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, bad_words=words)
        return run(engine, (prompt, params, f"r{len(words)}{words[:1]}"))[0].tokens[0]

    with running(tiny_checkpoint) as engine:
        free = greedy(engine)
        banned_first = greedy(engine, ((free[0],),))
        pair = (free[1], free[2])
        banned_pair = greedy(engine, (pair,))
        tok = engine.tokenizer
    assert free[0] not in banned_first
    assert banned_pair[:2] == free[:2] and banned_pair[2] != free[2]  # the last token only
    assert all(tuple(banned_pair[i:i + 2]) != pair for i in range(len(banned_pair) - 1))
    # Words as text, as vLLM reads them: each as a text's start, and mid-text where a space
    # makes other tokens of the same count
    def enc(text: str) -> tuple[int, ...]:
        return tuple(tok.encode(text, add_special_tokens=False))

    # "and" / " and": one token each (a word and its mid-text form): both banned. "the"
    # is two tokens but " the" one: only the text's start form, as vLLM keeps it
    assert len(enc("and")) == len(enc(" and")) == 1 and enc("and") != enc(" and")
    assert bad_words_token_ids(tok, ["and"]) == (enc("and"), enc(" and"))
    assert len(enc("the")) != len(enc(" the"))
    assert bad_words_token_ids(tok, [" the"]) == (enc("the"),)


def test_a_thinking_budget_forces_the_thinkings_end(tiny_checkpoint: Path) -> None:
    """vLLM's thinking_token_budget: once the thinking has spent its tokens the end tag
    comes next, even where the request bans it; the count starts again past the first start
    tag written (as usage's reasoning_tokens counts); an end the model writes first ends the
    count. On greedy outputs, so the unbudgeted answer shows where each budget bites."""
    prompt = prompts(1, seed=5)[0]

    def greedy(budget: ThinkingBudget | None, name: str, **params: object) -> list[int]:
        sampling = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                  thinking_budget=budget, **params)  # type: ignore[arg-type]
        return run(engine, (prompt, sampling, name))[0].tokens[0]

    with running(tiny_checkpoint) as engine:
        free = greedy(None, "free")
        start, end = [t for t in range(3, 1000) if t not in free][:2]
        assert greedy(ThinkingBudget(0, start, end), "zero")[0] == end
        three = greedy(ThinkingBudget(3, start, end), "three")
        banned = greedy(ThinkingBudget(3, start, end), "banned", bad_words=((end,),))
        # free[1] as the start tag: the count starts again past it
        tagged = greedy(ThinkingBudget(3, free[1], end), "tagged")
        # The model's own end (free[2]) before the budget is spent: nothing forced after it
        ended = greedy(ThinkingBudget(3, start, free[2]), "ended")
    assert three[:4] == banned[:4] == free[:3] + [end]
    assert tagged[:6] == free[:5] + [end]
    assert ended == free
