"""llama.cpp's native API on top of the engine: /completion and /infill bodies in, llama.cpp's
result objects or SSE out (server/protocol/llamacpp.py holds the shapes). No FastAPI and no
tensors here.

A body's prompts (and `n_cmpl` samples of each) become engine requests as OpenAI's do
(serving.submit); each sample answers with one result. A stream sends one event per engine
output, `{"content", "tokens", "stop": false, ...}`, then the sample's whole result with
`stop: true` (its content already sent), and no `[DONE]`: llama.cpp's stream just ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from model.tokenizer import Tokenizer
from server.engine_front import EngineFront
from server.protocol.llamacpp import (
    LlamaCppCompletionRequest,
    LlamaCppInfillRequest,
    LlamaCppResult,
    Prompt,
    Timings,
    TokenProb,
    TokenProbs,
    select_fields,
    slot_settings,
)
from server.request import (
    Breakers,
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from server.sampling_dry import MAX_BREAKER_BYTES, VocabText, breaker_found
from server.scheduler import SlotState
from server.serving import (
    Choice,
    Submitted,
    error_event,
    failure_message,
    merged,
    model_of,
    raise_if_failed,
)

# llama.cpp's default logical batch (-b), which /infill's layout sizes its parts by: the
# prefix keeps its last 3/4 of it, the suffix the first 1/4 (less the prompt)
INFILL_BATCH = 2048
SNIPPET = "\n\n--- snippet ---\n\n"  # llama.cpp's separator of input_extra's chunks
DRY_BREAKERS_KEPT = 256  # the most DRY breakers kept found (the oldest goes first)
# The most sets of breakers kept whole, so that requests with the same breakers share one
# tuple (the engine indexes each tuple once: server/sampling_dry.py)
DRY_BREAKER_SETS_KEPT = 16


@dataclass(slots=True)
class _Progress:
    """One sample's answer so far, and when its tokens came."""

    choice: Choice = field(default_factory=Choice)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def absorb(self, out: RequestOutput) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.choice.absorb(out)


class LlamaCppService:
    """Prompts -> engine requests -> llama.cpp's results."""

    def __init__(self, engine: EngineFront, tokenizer: Tokenizer, model_name: str) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        # DRY's breakers found in the vocabulary, by breaker (most requests ask for llama.cpp's
        # defaults: one search of the vocabulary serves them all)
        self._breaker_searches: dict[bytes, asyncio.Future[Breakers]] = {}
        self._breaker_sets: dict[tuple[bytes, ...], Breakers] = {}  # (the oldest first)
        self._vocab_text: VocabText | None = None

    # ------------------------------------------------------------------ requests

    def prompts(self, request: LlamaCppCompletionRequest) -> list[tuple[list[int], str | None]]:
        """Each prompt's ids: texts tokenized in place, BOS where a prompt begins with text
        (llama.cpp's: token ids are taken as they are)."""
        return [(tokenize_parts(self.tokenizer, prompt, add_special=True), None)
                for prompt in request.prompt]

    def logit_bias(self, request: LlamaCppCompletionRequest) -> tuple[tuple[int, float], ...]:
        """(token id, bias) pairs: a string's every token gets its bias (llama.cpp's)."""
        pairs: list[tuple[int, float]] = []
        for key, bias in request.logit_bias:
            ids = [key] if isinstance(key, int) else self.tokenizer.encode(
                key, add_special_tokens=False)
            pairs.extend((token_id, bias) for token_id in ids)
        return tuple(pairs)

    async def dry_breakers(self, request: LlamaCppCompletionRequest) -> Breakers:
        """The request's DRY sequence breakers as llama.cpp finds them in the vocabulary
        (server/sampling_dry.py). Each breaker is looked for once, on a worker thread, and
        kept: requests asking for one already being looked for wait for that search."""
        if not request.dry_on:
            return ()
        wanted = tuple(dict.fromkeys(text.encode()[:MAX_BREAKER_BYTES]
                                     for text in request.dry_sequence_breakers))
        if (kept := self._breaker_sets.get(wanted)) is not None:
            return kept
        found: dict[tuple[int, tuple[int, ...]], None] = {}
        for breaker in wanted:
            search = self._breaker_searches.get(breaker)
            if search is None:
                if len(self._breaker_searches) >= DRY_BREAKERS_KEPT:
                    self._breaker_searches.pop(next(iter(self._breaker_searches)))
                search = asyncio.ensure_future(asyncio.to_thread(self._find_breaker, breaker))
                search.add_done_callback(partial(self._forget_failed, breaker))
                self._breaker_searches[breaker] = search
            # (shielded: a client that leaves cancels its wait, not the search others share)
            found.update(dict.fromkeys(await asyncio.shield(search)))
        if len(self._breaker_sets) >= DRY_BREAKER_SETS_KEPT:
            self._breaker_sets.pop(next(iter(self._breaker_sets)))
        return self._breaker_sets.setdefault(wanted, tuple(found))

    def _forget_failed(self, breaker: bytes, search: asyncio.Future[Breakers]) -> None:
        """A search that failed is not kept: the next request looks again."""
        if ((search.cancelled() or search.exception() is not None)
                and self._breaker_searches.get(breaker) is search):
            del self._breaker_searches[breaker]

    def _find_breaker(self, breaker: bytes) -> Breakers:
        if self._vocab_text is None:  # (two first searches at once both build it: harmless)
            tokenizer = self.tokenizer
            self._vocab_text = VocabText.of(tokenizer.token_bytes(range(tokenizer.vocab_size)))
        return breaker_found(breaker, self._vocab_text,
                             lambda text: self.tokenizer.encode(text, add_special_tokens=False))

    def infill_prompt(self, request: LlamaCppInfillRequest) -> list[tuple[list[int], str | None]]:
        """llama.cpp's infill layout, in the model's tokens (Code Llama's, model/infill.py):
        [extra context] [BOS] PRE prefix+prompt SUF suffix MID. As llama.cpp's default batch
        size sizes them: the prefix keeps its last 1536 tokens, the suffix its first 510 less
        the prompt's, the other files' chunks what the context leaves past a batch and twice
        n_predict."""
        infill = self.tokenizer.infill
        assert infill is not None  # (the route refuses /infill without it)
        typed = "".join(part for part in request.prompt[0] if isinstance(part, str))
        batch = min(INFILL_BATCH, self.engine.max_model_len)
        prefix = infill.encode_prefix(request.input_prefix + typed)[-(3 * (batch // 4)):]
        typed_len = len(infill.encode_suffix(typed)) if typed else 0
        suffix = infill.encode_suffix(request.input_suffix)
        suffix = suffix[:max(0, batch // 4 - 2 - typed_len)]
        extra: list[int] = []
        for chunk in request.input_extra:
            extra += self.tokenizer.encode(SNIPPET, add_special_tokens=False)
            extra += self.tokenizer.encode(chunk.text, add_special_tokens=False)
        n_predict = -1 if request.max_tokens is None else request.max_tokens
        room = self.engine.max_model_len - batch - 2 * n_predict
        extra = extra[len(extra) - min(max(0, room), len(extra)):]
        head = self.tokenizer.encode("", add_special_tokens=True)  # (BOS)
        t = infill.tokens
        return [([*extra, *head, t.prefix_id, *prefix, t.suffix_id, *suffix, t.middle_id],
                 None)]

    def fit(self, params: SamplingParams, prompts: list[tuple[list[int], str | None]],
            infill: bool = False) -> SamplingParams:
        """`params` as llama.cpp runs them: n_predict past the context's end runs to its end
        (then the answer says truncated), and ignore_eos bans every end-of-generation token
        (the infill's EOT too) rather than only not stopping at it."""
        if params.max_tokens is not None:
            room = self.engine.max_model_len - max(len(ids) for ids, _ in prompts)
            if 0 < room < params.max_tokens:  # (no room at all: the prompt's 400)
                params = replace(params, max_tokens=room)
        if params.ignore_eos:
            ends = set(self.tokenizer.eos_ids)
            if infill and self.tokenizer.infill and self.tokenizer.infill.tokens.eot_id:
                ends.add(self.tokenizer.infill.tokens.eot_id)
            params = replace(params, bad_words=(*params.bad_words,
                                                *((t,) for t in sorted(ends))))
        return params

    def infill_stop(self, params: SamplingParams) -> SamplingParams:
        """The model's end-of-middle token ends the answer (an end of generation to
        llama.cpp, so its stop_type is "eos")."""
        infill = self.tokenizer.infill
        if infill is None or infill.tokens.eot_id is None:
            return params
        return replace(params, stop_token_ids=(*params.stop_token_ids, infill.tokens.eot_id))

    # ------------------------------------------------------------------ answers

    async def create(self, request: LlamaCppCompletionRequest, submitted: list[Submitted],
                     params: SamplingParams, arrived: float) -> object:
        """Every sample's result: one object for one, else a list in index order."""
        n = request.n_cmpl
        samples: dict[int, _Progress] = {}
        async for i, out in merged(self.engine, submitted):
            raise_if_failed(out)
            samples.setdefault(i * n + out.index, _Progress()).absorb(out)
        results = [self._result(request, params, submitted[index // n], index, samples[index],
                                arrived, whole=True)
                   for index in sorted(samples)]
        return results[0] if len(results) == 1 else results

    async def stream(self, request: LlamaCppCompletionRequest, submitted: list[Submitted],
                     params: SamplingParams, arrived: float) -> AsyncIterator[str]:
        """One event per output, a sample's result as its last; an error after the first
        event is an `{"error": ...}` event that ends the stream (llama.cpp's)."""
        n = request.n_cmpl
        samples: dict[int, _Progress] = {}
        try:
            async for i, out in merged(self.engine, submitted):
                raise_if_failed(out)
                index = i * n + out.index
                sample = samples.setdefault(index, _Progress())
                sample.absorb(out)
                if out.text or out.token_ids:
                    yield self._partial(request, submitted[i], index, sample, out, arrived)
                if out.finished:
                    yield self._dump(request, self._result(
                        request, params, submitted[i], index, sample, arrived, whole=False))
        except Exception as e:  # (the client's going away is no Exception: it cancels)
            yield error_event(failure_message(e))

    def _partial(self, request: LlamaCppCompletionRequest, s: Submitted, index: int,
                 sample: _Progress, out: RequestOutput, arrived: float) -> str:
        event: dict[str, object] = {
            "index": index, "content": out.text, "tokens": out.token_ids, "stop": False,
            "id_slot": -1, "tokens_predicted": out.num_output_tokens,
            "tokens_evaluated": len(s.prompt_ids)}
        if request.timings_per_token:
            event["timings"] = self._timings(s, sample, arrived).model_dump()
        if request.n_probs and out.logprobs:
            event["completion_probabilities"] = [
                p.model_dump() for p in self._probs(out.token_ids, out.logprobs, request.n_probs)]
        return _json(event)

    def _result(self, request: LlamaCppCompletionRequest, params: SamplingParams, s: Submitted,
                index: int, sample: _Progress, arrived: float, whole: bool) -> LlamaCppResult:
        """A sample's result; `whole`: with its content and tokens (a stream's last event
        has them sent already)."""
        choice = sample.choice
        stop_type, word = _stop_type(choice)
        # The context's end cut it short: the length ended it, at the most fit() let it run
        # (not n_indent's or the time limit's early end), short of n_predict
        asked = request.max_tokens  # (n_predict, before fit() kept it to the context)
        most = params.max_tokens if params.max_tokens is not None else (
            self.engine.max_model_len - len(s.prompt_ids))
        truncated = choice.finish_reason is FinishReason.LENGTH and (
            choice.num_output_tokens >= most) and (asked is None or most < asked)
        probs = None
        if whole and request.n_probs:
            kept = _without_stop_word(self.tokenizer, choice)
            probs = self._probs(choice.token_ids[:kept], choice.logprobs[:kept], request.n_probs)
        return LlamaCppResult(
            index=index, content=choice.text if whole else "",
            tokens=choice.token_ids if whole and request.return_tokens else [],
            id_slot=-1, stop=True, model=model_of([s], self.model_name),
            tokens_predicted=choice.num_output_tokens, tokens_evaluated=len(s.prompt_ids),
            generation_settings=request.settings(params),
            prompt=self.tokenizer.decode(s.prompt_ids, skip_special_tokens=False),
            has_new_line="\n" in choice.text, truncated=truncated, stop_type=stop_type,
            stopping_word=word, tokens_cached=len(s.prompt_ids) + choice.num_output_tokens,
            timings=self._timings(s, sample, arrived), completion_probabilities=probs)

    def dump(self, request: LlamaCppCompletionRequest, answer: object) -> object:
        """The JSON value of `create`'s answer, response_fields applied."""
        if isinstance(answer, list):
            return [self._fields(request, r) for r in answer]
        assert isinstance(answer, LlamaCppResult)
        return self._fields(request, answer)

    def _dump(self, request: LlamaCppCompletionRequest, result: LlamaCppResult) -> str:
        return _json(self._fields(request, result))

    @staticmethod
    def _fields(request: LlamaCppCompletionRequest, result: LlamaCppResult) -> dict:
        body = result.model_dump(exclude_none=True)
        return select_fields(body, request.response_fields) if request.response_fields else body

    @staticmethod
    def _timings(s: Submitted, sample: _Progress, arrived: float) -> Timings:
        first = sample.first_token_at or arrived
        last = sample.last_token_at or first
        cached = sample.choice.num_cached_tokens
        return Timings.of(cache_n=cached, prompt_n=len(s.prompt_ids) - cached,
                          prompt_s=first - arrived, predicted_n=sample.choice.num_output_tokens,
                          predicted_s=last - first)

    def _probs(self, ids: list[int], logprobs: list[TokenLogprob], n_probs: int
               ) -> list[TokenProbs]:
        """completion_probabilities: each token's raw logprob and its n_probs likeliest."""
        wanted = sorted({*ids, *(t for lp in logprobs for t, _ in lp.top[:n_probs])})
        pieces = dict(zip(wanted, self.tokenizer.token_bytes(wanted), strict=True))

        def entry(token_id: int, logprob: float) -> TokenProb:
            raw = pieces[token_id]
            return TokenProb(id=token_id, token=_piece(raw), bytes=list(raw), logprob=logprob)

        return [TokenProbs(**entry(token_id, lp.logprob).model_dump(),
                           top_logprobs=[entry(t, v) for t, v in lp.top[:n_probs]])
                for token_id, lp in zip(ids, logprobs, strict=False)]


def slot_json(slot: SlotState, n_ctx: int) -> dict[str, Any]:
    """One entry of llama.cpp's GET /slots, in the form it shows by default (no prompt or
    output text: its LLAMA_SERVER_SLOTS_DEBUG adds those): a slot that has held nothing
    yet shows its size alone; an idle one, the task it last ran."""
    entry: dict[str, Any] = {"id": slot.slot, "n_ctx": n_ctx, "speculative": False,
                             "is_processing": slot.processing}
    if slot.params is not None:
        entry |= {
            "id_task": slot.task_id,
            "n_prompt_tokens": slot.prompt_tokens,
            "n_prompt_tokens_processed": slot.prompt_computed,
            "n_prompt_tokens_cache": slot.prompt_cached,
            "params": slot_settings(slot.params),
            "next_token": [{"has_next_token": slot.processing,
                            "has_new_line": slot.has_new_line,
                            "n_remain": slot.remaining, "n_decoded": slot.decoded}],
        }
    return entry


def tokenize_parts(tokenizer: Tokenizer, prompt: Prompt, add_special: bool) -> list[int]:
    """A prompt's ids, its texts tokenized in place; with `add_special`, the tokenizer's BOS
    where it begins with text (llama.cpp's tokenize_mixed)."""
    ids: list[int] = []
    for i, part in enumerate(prompt):
        if isinstance(part, int):
            ids.append(part)
        else:
            ids.extend(tokenizer.encode(part, add_special_tokens=add_special and i == 0))
    return ids


def piece_or_bytes(raw: bytes) -> str | list[int]:
    """/tokenize's piece as llama.cpp gives it: the text, or its bytes where it is not UTF-8
    (a byte-fallback token)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _stop_type(choice: Choice) -> tuple[str, str]:
    """llama.cpp's (stop_type, stopping_word): a stop string is a "word", an end of
    generation (eos, the infill's EOT) "eos", the length or the context "limit"."""
    if choice.finish_reason is FinishReason.STOP:
        if isinstance(choice.stop_reason, str):
            return "word", choice.stop_reason
        return "eos", ""
    if choice.finish_reason is FinishReason.LENGTH:
        return "limit", ""
    return "none", ""


def _without_stop_word(tokenizer: Tokenizer, choice: Choice) -> int:
    """How many of a choice's tokens keep their probabilities: llama.cpp drops, for a stop
    word, as many at the end as the word's own tokens (its text is cut from the content)."""
    n = len(choice.token_ids)
    if not isinstance(choice.stop_reason, str):
        return n
    return max(0, n - len(tokenizer.encode(choice.stop_reason, add_special_tokens=False)))


def _piece(raw: bytes) -> str:
    """A token's text as llama.cpp shows it: an incomplete UTF-8 character at its end cut
    off, anything else undecodable replaced."""
    for cut in range(1, min(4, len(raw)) + 1):
        lead = raw[-cut]
        if lead & 0xC0 != 0x80:  # the last character's first byte
            need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else \
                4 if lead & 0xF8 == 0xF0 else 1
            if need > cut:
                raw = raw[:-cut]
            break
    return raw.decode("utf-8", errors="replace")


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
