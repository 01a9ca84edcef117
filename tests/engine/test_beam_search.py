"""server/beam_search.py against a fake engine whose next-token logprobs are a fixed table:
the search's bookkeeping (steps, ended beams, vLLM's score, admission places, shutdown)
without a model. Over HTTP, with the model: tests/api/test_beam_search.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from server.beam_search import BeamSearch
from server.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob

EOS = 9
# Next-token probabilities after each last token (the prompt ends with 0)
TABLE = {0: {1: 0.5, 2: 0.3, EOS: 0.2}, 1: {1: 0.1, 2: 0.1, EOS: 0.8},
         2: {1: 0.6, 2: 0.3, EOS: 0.1}, EOS: {1: 0.5, 2: 0.5}}


class FakeEngine:
    """What a beam search calls of EngineFront."""

    max_model_len = 64

    def __init__(self, table: dict[int, dict[int, float]] = TABLE) -> None:
        self.table = table
        self.beam_searches, self.aborted_all = 0, False
        self.asked: list[tuple[list[int], int | None]] = []  # (prompt, places)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 places: int | None = None) -> AsyncIterator[RequestOutput]:
        self.asked.append((prompt_ids, places))
        likeliest = sorted(self.table[prompt_ids[-1]].items(), key=lambda kv: -kv[1])
        top = tuple((t, math.log(p)) for t, p in likeliest)[:params.logprobs]

        async def stream() -> AsyncIterator[RequestOutput]:
            yield RequestOutput(request_id, 0, token_ids=[top[0][0]],
                                logprobs=[TokenLogprob(top[0][0], top[0][1], top)],
                                finish_reason=FinishReason.LENGTH)
        return stream()

    def abort(self, request_id: str) -> None:
        pass


def search(engine: FakeEngine, n: int, max_tokens: int, **extra: object) -> list[RequestOutput]:
    params = SamplingParams(n=n, max_tokens=max_tokens, **extra)  # type: ignore[arg-type]
    beams = BeamSearch(engine, [0], params, "bs", 1.0,  # type: ignore[arg-type]
                       frozenset({EOS}), lambda ids: " ".join(map(str, ids)))

    async def run() -> list[RequestOutput]:
        beams.start()
        return [out async for out in beams]
    return asyncio.run(run())


def test_beams_end_and_rank_by_vllms_score() -> None:
    """Two beams, three steps, worked by hand: the score is the summed logprob over the
    length, the prompt's token counted and an end not. "1 EOS" (log .5 + log .8, over 2)
    is -0.458, "2 1 EOS" (log .3 + log .6 + log .8, over 3) -0.646; the best running beam
    after three steps, "2 2 1", only -0.730; and "EOS" at once, -1.609."""
    outs = search(FakeEngine(), n=2, max_tokens=3)
    assert [o.text for o in outs] == ["1", "2 1"]
    assert [o.token_ids for o in outs] == [[1, EOS], [2, 1, EOS]]
    assert [o.finish_reason for o in outs] == [FinishReason.STOP] * 2
    kept_on = search(FakeEngine(), n=2, max_tokens=3, ignore_eos=True)  # eos ends none
    assert [len(o.token_ids) for o in kept_on] == [3, 3]
    assert {o.finish_reason for o in kept_on} == {FinishReason.LENGTH}


def test_a_stop_token_ends_beams_even_under_ignore_eos() -> None:
    """An infill's end-of-middle comes as a stop token id (beam search refuses the client's
    own): it ends a beam as eos does, and ignore_eos does not keep it running."""
    for extra in ({}, {"ignore_eos": True}):
        outs = search(FakeEngine(), n=2, max_tokens=3, stop_token_ids=(EOS,), **extra)
        assert [o.token_ids for o in outs] == [[1, EOS], [2, 1, EOS]], extra
        assert [o.finish_reason for o in outs] == [FinishReason.STOP] * 2


def test_logprobs_shown_do_not_widen_the_search() -> None:
    """One beam grows from its 2 likeliest tokens, however many logprobs the client asks to
    see: here the third at the start, an end scoring log .25 over 1, would beat the only
    beam that runs (log .4 + log .01, over 3: -1.84) were it a candidate."""
    table = {0: {1: 0.4, 2: 0.35, EOS: 0.25}, 1: {1: 0.01, 2: 0.01, EOS: 0.01},
             2: {1: 0.01, 2: 0.01, EOS: 0.01}}
    for shown in (None, 0, 3):
        [out] = search(FakeEngine(table), n=1, max_tokens=2, logprobs=shown)
        assert out.token_ids[0] == 1 and out.finish_reason is FinishReason.LENGTH, shown
        if shown:
            assert [len(lp.top) for lp in out.logprobs or ()] == [3, 3]  # (all 3 shown)


def test_the_first_step_asks_room_for_every_beam_the_rest_none() -> None:
    engine = FakeEngine()
    search(engine, n=3, max_tokens=3)
    assert engine.asked[0] == ([0], 3)
    assert {places for _, places in engine.asked[1:]} == {0} and len(engine.asked) > 1
    assert engine.beam_searches == 0  # (counted while it ran)


def test_no_step_starts_after_abort_all() -> None:
    """Shutting down between steps: the search stops, its beams so far are "abort"."""
    engine = FakeEngine()
    real = engine.generate

    def then_shut_down(*args: object, **kwargs: object) -> AsyncIterator[RequestOutput]:
        engine.aborted_all = True  # (as abort_all sets it, after this first step)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    engine.generate = then_shut_down  # type: ignore[method-assign]
    outs = search(engine, n=2, max_tokens=10)
    assert len(engine.asked) == 1  # the first step's two best continuations, "abort"
    assert [o.token_ids for o in outs] == [[1], [2]]
    assert [o.finish_reason for o in outs] == [FinishReason.ABORT] * 2
