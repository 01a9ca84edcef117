"""vLLM's beam search (`use_beam_search`), as vLLM runs it: above the engine, in steps of
one-token requests, one per beam, each asking for its 2 x width likeliest next tokens (raw
logprobs); the width best of all those continuations go on. A continuation that ends (an
end-of-sequence token, unless ignore_eos) is kept aside; at the end the width best of the
ended and the running beams are the answer, ranked by vLLM's score: the cumulative logprob
over the sequence's length (prompt included, the final end not) to the `length_penalty`.

Each step's requests share the batch with everything else, and the prefix cache gives each
its beam's tokens but the last: a step computes about one token a beam. No torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from model.tokenizer import Tokenizer
from server.engine_front import EngineFront, RequestRejected, RequestStream
from server.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from server.serving import SampleGroup, Submitted, check_capacity


@dataclass(slots=True)
class Beam:
    token_ids: list[int] = field(default_factory=list)  # generated, a final end included
    cum_logprob: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ended: bool = False  # by an end-of-sequence token


def beam_score(beam: Beam, prompt_len: int, length_penalty: float) -> float:
    """vLLM's get_beam_search_score."""
    length = prompt_len + len(beam.token_ids) - beam.ended
    return beam.cum_logprob / length ** length_penalty


class BeamSearch:
    """One prompt's beam search, read as an engine request's stream (RequestStream's
    interface): it yields, once the search is over, each of the `params.n` best beams as
    a finished output of index 0, 1, ... (the best first)."""

    def __init__(self, engine: EngineFront, prompt_ids: list[int], params: SamplingParams,
                 request_id: str, length_penalty: float, eos_ids: frozenset[int],
                 decode: Callable[[list[int]], str]) -> None:
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        self.request_id, self.length_penalty = request_id, length_penalty
        self.decode = decode
        # What ends a beam: eos unless ignore_eos; a stop token id always (a request's
        # only one is an infill's end-of-middle: beam search refuses stop_token_ids)
        self.end_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_ids)
        self.width = params.n
        self._first: list[RequestStream] = []  # step 0's request (start)
        # The steps' requests: the 2w likeliest next tokens, raw (the drawn token is moot)
        self.step_params = SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True,
            logprobs=max(2 * self.width, params.logprobs or 0),
            skip_special_tokens=params.skip_special_tokens, lora=params.lora)

    def start(self) -> None:
        """Queue the first step (the prompt alone), past the admission check for the n beams'
        places (EngineOverloaded, before a response starts); the later steps are the
        admitted search's, queued whatever the queue holds then."""
        self._first = [self.engine.generate(self.prompt_ids, self.step_params,
                                            f"{self.request_id}-0-0", places=self.width)]

    def abort_start(self) -> None:
        """Abort the first step (a request whose other searches could not start)."""
        for stream in self._first:
            self.engine.abort(stream.request_id)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._run()

    def _score(self, beam: Beam) -> float:
        return beam_score(beam, len(self.prompt_ids), self.length_penalty)

    async def _run(self) -> AsyncIterator[RequestOutput]:
        self.engine.beam_searches += 1  # (a drain waits for it, between steps too)
        try:
            async for out in self._search():
                yield out
        finally:
            self.engine.beam_searches -= 1

    async def _search(self) -> AsyncIterator[RequestOutput]:
        beams, ended = [Beam()], []
        ending: FinishReason | None = None  # set when a step's request did not finish well
        error = None
        steps = self.params.max_tokens_within(self.engine.max_model_len - len(self.prompt_ids))
        for step in range(steps):
            if step and self.engine.aborted_all:  # (shutting down: no more steps)
                ending = FinishReason.ABORT
                break
            try:
                outs = await self._step(step, beams)
            except RequestRejected as e:  # a later step's: its LoRA adapter was unloaded
                ending, error = FinishReason.ERROR, f"the search could not go on: {e}"
                break
            failed = [o for o in outs if o.finish_reason in (FinishReason.ABORT,
                                                                FinishReason.ERROR)]
            if failed:
                ending, error = failed[0].finish_reason, failed[0].error
                break
            candidates = []
            for beam, out in zip(beams, outs, strict=True):
                assert out.logprobs  # (the step asked for its 2n likeliest)
                chosen = out.logprobs[0]
                shown = chosen.top[:self.params.logprobs or 0]
                for token, logprob in chosen.top[:2 * self.width]:  # (more, when shown)
                    new = Beam([*beam.token_ids, token], beam.cum_logprob + logprob,
                               [*beam.logprobs, TokenLogprob(token, logprob, shown)],
                               token in self.end_ids)
                    (ended if new.ended else candidates).append(new)
            beams = sorted(candidates, key=self._score, reverse=True)[:self.width]
            if not beams:
                break
        best = sorted([*ended, *beams], key=self._score, reverse=True)[:self.width]
        for index, beam in enumerate(best):
            yield self._output(index, beam, ending, error)

    async def _step(self, step: int, beams: list[Beam]) -> list[RequestOutput]:
        """Each beam's next-token request, run together; their final outputs."""
        streams: list[RequestStream] = self._first if step == 0 else []
        try:
            for j, beam in enumerate(beams if step else []):
                streams.append(self.engine.generate(
                    [*self.prompt_ids, *beam.token_ids], self.step_params,
                    f"{self.request_id}-{step}-{j}", places=0))
            return await asyncio.gather(*(_last(s) for s in streams))
        except BaseException:  # the client went away, the server is full or stopping
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise

    def _output(self, index: int, beam: Beam, ending: FinishReason | None,
                error: str | None) -> RequestOutput:
        ids = beam.token_ids[:-1] if beam.ended else beam.token_ids  # the end has no text
        finish = ending or (FinishReason.STOP if beam.ended else FinishReason.LENGTH)
        return RequestOutput(
            self.request_id, index, text=self.decode(ids), token_ids=list(beam.token_ids),
            logprobs=beam.logprobs if self.params.logprobs is not None else None,
            finish_reason=finish, error=error, num_prompt_tokens=len(self.prompt_ids),
            num_output_tokens=len(beam.token_ids))


async def _last(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    assert last is not None  # (a stream ends with its finished output)
    return last


def submit_beam_searches(engine: EngineFront, prompts: list[tuple[list[int], str | None]],
                         params: SamplingParams, request_id: str, length_penalty: float,
                         tokenizer: Tokenizer, prompt_param: str = "prompt") -> list[Submitted]:
    """Each prompt's beam search, as `submit` queues prompts (checked first, all of them);
    the searches start when their outputs are read."""
    check_capacity(engine, len(prompts), params.n, prompt_param)
    for ids, _ in prompts:  # (the n beams of a step need not run at once)
        engine.validate(ids, replace(params, n=1))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    searches = [BeamSearch(engine, ids, params, f"{request_id}-{i}", length_penalty,
                           tokenizer.eos_ids, decode) for i, (ids, _) in enumerate(prompts)]
    try:
        for search in searches:
            search.start()
    except Exception:  # (the queue filled up: none of them runs)
        for search in searches:
            search.abort_start()
        raise
    return [Submitted(ids, text, [SampleGroup(search, 0)], params.lora)
            for (ids, text), search in zip(prompts, searches, strict=True)]
