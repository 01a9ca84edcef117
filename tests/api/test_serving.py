"""serving.submit and serving.merged against a recording engine: how a request's prompts and
samples become engine requests, and how their outputs come back (no HTTP, no model)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from model.tokenizer import Tokenizer
from server.engine_front import (
    EngineOverloaded,
    RequestRejected,
    RequestStream,
    validate_request,
)
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob
from server.routes import _in_band_errors
from server.serving import (
    ChatService,
    CompletionService,
    Submitted,
    TextOffset,
    merged,
    sample_groups,
    submit,
)


def on_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on an event loop of its own (streams belong to a loop)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


class RecordingEngine:
    """Takes requests as an engine would (up to `refuse_after`, then 503s) and records them."""

    def __init__(self, num_slots: int = 2, max_waiting: int = 8,
                 refuse_after: int | None = None) -> None:
        self.num_slots, self.max_waiting = num_slots, max_waiting
        self.refuse_after = refuse_after
        self.queued: dict[str, tuple[SamplingParams, RequestStream]] = {}
        self.aborted: list[str] = []

    vocab_size, max_model_len, lora_names = 1000, 64, frozenset[str]()

    @property
    def max_queued(self) -> int:
        return self.num_slots + self.max_waiting

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_ids, params, self.vocab_size, self.num_slots, self.max_model_len)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> RequestStream:
        if self.refuse_after is not None and len(self.queued) == self.refuse_after:
            raise EngineOverloaded("the queue is full")
        assert params.n <= self.num_slots and request_id not in self.queued
        stream = RequestStream(request_id, params.n, asyncio.get_running_loop())
        self.queued[request_id] = (params, stream)
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def finish_all(self, cached: Callable[[str], int] = lambda request_id: 0) -> None:
        """One output a sample, `index` as the engine numbers it: within its own request;
        `cached(request_id)` prompt tokens from the prefix cache."""
        for request_id, (params, stream) in self.queued.items():
            for k in reversed(range(params.n)):
                stream.put(RequestOutput(request_id, k, text=f"{request_id}/{k}",
                                         finish_reason=FinishReason.STOP, num_output_tokens=1,
                                         num_cached_tokens=cached(request_id)))


def test_sample_groups() -> None:
    assert sample_groups(3, 4) == [(0, 3)]
    assert sample_groups(4, 4) == [(0, 4)]
    assert sample_groups(5, 2) == [(0, 2), (2, 2), (4, 1)]


@on_a_loop
async def test_samples_beyond_the_slots_become_groups_with_moved_seeds() -> None:
    engine = RecordingEngine(num_slots=2)
    submitted = submit(engine, [([1, 2], None), ([3], "text")],
                       SamplingParams(n=5, seed=10, temperature=1.0), "cmpl-x")
    assert {rid: (p.n, p.seed) for rid, (p, _) in engine.queued.items()} == {
        "cmpl-x-0-0": (2, 10), "cmpl-x-0-2": (2, 12), "cmpl-x-0-4": (1, 14),
        "cmpl-x-1-0": (2, 10), "cmpl-x-1-2": (2, 12), "cmpl-x-1-4": (1, 14)}
    assert [s.prompt_ids for s in submitted] == [[1, 2], [3]]
    assert [[g.first for g in s.groups] for s in submitted] == [[0, 2, 4]] * 2
    engine.finish_all()
    got = [(i, out.index, out.text) async for i, out in merged(engine, submitted)]
    # Each output's index is its sample's within the prompt, whichever group ran it
    assert sorted(got) == sorted(
        (i, first + k, f"cmpl-x-{i}-{first}/{k}")
        for i in range(2) for first, count in sample_groups(5, 2) for k in range(count))
    assert engine.aborted == []  # every stream ran to its end


@on_a_loop
async def test_unseeded_groups_stay_unseeded_and_one_group_keeps_its_params() -> None:
    engine = RecordingEngine(num_slots=4)
    params = SamplingParams(n=3)
    submit(engine, [([1], None)], params, "r")
    assert engine.queued["r-0"][0] is params  # no group: the request as it came
    submit(engine, [([1], None)], SamplingParams(n=6), "s")
    assert [(p.n, p.seed) for p, _ in engine.queued.values()][1:] == [(4, None), (2, None)]


@on_a_loop
async def test_a_refused_group_aborts_every_group_queued() -> None:
    engine = RecordingEngine(num_slots=2, refuse_after=4)
    with pytest.raises(EngineOverloaded):
        submit(engine, [([1], None), ([2], None)], SamplingParams(n=5), "r")
    assert engine.aborted == list(engine.queued) == ["r-0-0", "r-0-2", "r-0-4", "r-1-0"]


@on_a_loop
async def test_leaving_early_aborts_every_group() -> None:
    engine = RecordingEngine(num_slots=2)
    submitted = submit(engine, [([1], None)], SamplingParams(n=4), "r")
    engine.queued["r-0-2"][1].put(RequestOutput("r-0-2", 0, text="a"))
    outputs = merged(engine, submitted)
    assert (await anext(outputs))[1].index == 2
    await outputs.aclose()  # the client went away
    assert sorted(engine.aborted) == ["r-0-0", "r-0-2"]


@pytest.mark.parametrize("prompts,n,param", [(11, 1, "prompt"), (3, 4, "n"), (1, 11, "n"),
                                             (11, 5, "prompt")])
@on_a_loop
async def test_more_than_the_server_holds_is_rejected(prompts: int, n: int, param: str) -> None:
    """2 slots + 8 waiting hold 10 samples (admission counts each, as each takes a slot): 11
    prompts never fit (blame the prompts), 3 prompts of n=4 or one of n=11 neither (blame n),
    a 400 rather than a 503 that the client would retry in vain."""
    engine = RecordingEngine(num_slots=2, max_waiting=8)
    with pytest.raises(RequestRejected) as rejected:
        submit(engine, [([1], None)] * prompts, SamplingParams(n=n), "r")
    assert rejected.value.param == param and "holds at most 10 samples" in str(rejected.value)
    assert engine.queued == {}
    submit(engine, [([1], None)] * 2, SamplingParams(n=5), "fits")  # 10 samples


@pytest.mark.parametrize("bad", [[], [5000], list(range(64))],
                         ids=["empty", "outside-the-vocabulary", "too-long"])
@on_a_loop
async def test_a_bad_prompt_is_refused_before_any_prompt_is_queued(bad: list[int]) -> None:
    """A refused prompt of several costs the others nothing: none was queued (and so none
    aborted, which the metrics would count); the error names the prompt."""
    engine = RecordingEngine(num_slots=2)
    with pytest.raises(RequestRejected) as rejected:
        submit(engine, [([1], None), ([2], None), (bad, None)], SamplingParams(n=3), "r")
    assert rejected.value.param == "prompt"
    assert engine.queued == {} and engine.aborted == []


def group_cache(request_id: str) -> int:
    """A prompt's first group found 3 tokens of it in the cache, the later groups 30."""
    return 3 if request_id.endswith("-0") else 30


@pytest.mark.parametrize("details", [False, True])
@on_a_loop
async def test_usage_reports_each_prompts_cached_tokens_once(details: bool) -> None:
    """Two prompts of n=5 on 2 slots: each prompt counts once, as its first group (which
    prefills it first) found it; only with --enable-prompt-tokens-details."""
    engine = RecordingEngine(num_slots=2)
    service = CompletionService(engine, None, "m", prompt_tokens_details=details)  # type: ignore[arg-type]
    request = CompletionRequest(model="m", prompt=[[1, 2, 3, 4], [5, 6]], n=5, seed=1)
    submitted = submit(engine, service.prompts(request), SamplingParams(n=5, seed=1), "c")
    engine.finish_all(group_cache)
    usage = (await service.create(request, submitted, "c")).usage.model_dump()
    assert usage["prompt_tokens"] == 6 and usage["completion_tokens"] == 10
    assert usage.get("prompt_tokens_details") == ({"cached_tokens": 3 + 3} if details else None)

    chat = ChatService(engine, None, "m", prompt_tokens_details=details)  # type: ignore[arg-type]
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    n=3, stream=True, stream_options={"include_usage": True})
    submitted = submit(engine, [([1, 2, 3], None)], SamplingParams(n=3), "h")
    engine.queued = {k: v for k, v in engine.queued.items() if k.startswith("h")}
    engine.finish_all(group_cache)
    events = [event async for event in chat.stream(request, submitted, "h")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["id"] == "h"
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             **({"prompt_tokens_details": {"cached_tokens": 3}} if details else {})}


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@on_a_loop
async def test_a_failed_request_ends_its_stream_with_the_engines_error(endpoint: str) -> None:
    engine = RecordingEngine(num_slots=2)
    submitted = submit(engine, [([1, 2], None)], SamplingParams(n=2), "r")
    stream = engine.queued["r-0"][1]
    stream.put(RequestOutput("r-0", 1, text="fine"))
    stream.put(RequestOutput("r-0", 0, finish_reason=FinishReason.ERROR, error="out of memory"))
    if endpoint == "chat":
        events = ChatService(engine, None, "m").stream(  # type: ignore[arg-type]
            ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2,
                                  stream=True), submitted, "r")
    else:
        events = CompletionService(engine, None, "m").stream(  # type: ignore[arg-type]
            CompletionRequest(model="m", prompt=[1, 2], n=2, stream=True), submitted, "r")
    frames = [frame async for frame in _in_band_errors(events)]
    assert frames[-1] == b"data: [DONE]\n\n"
    assert json.loads(frames[-2][len(b"data: "):])["error"]["message"] == "out of memory"
    assert b"fine" in frames[-3]  # what came before it was streamed


@on_a_loop
async def test_a_chat_stream_begins_with_its_first_token_and_ends_on_its_last() -> None:
    """As vLLM streams chat: the choices' roles go out with the first token, not before it (a
    client timing the stream, vLLM's benchmark among them, takes the first chunk with choices
    for the first token), and the last token's chunk carries the finish reason."""
    engine = RecordingEngine(num_slots=2)
    submitted = submit(engine, [([1, 2], None)], SamplingParams(n=2), "r")
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    n=2, stream=True)
    events = ChatService(engine, None, "m").stream(request, submitted, "r")  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0.05)
    assert not first.done()  # nothing to send before the first token
    stream = engine.queued["r-0"][1]
    stream.put(RequestOutput("r-0", 1, text="Hi", num_output_tokens=1))
    stream.put(RequestOutput("r-0", 1, text="!", finish_reason=FinishReason.STOP,
                             num_output_tokens=2))
    stream.put(RequestOutput("r-0", 0, text="", finish_reason=FinishReason.LENGTH,
                             num_output_tokens=1))
    chunks = [json.loads(e) for e in [await first] + [e async for e in events] if e != "[DONE]"]
    choices = [(c["choices"][0]["index"], c["choices"][0]["delta"],
                c["choices"][0]["finish_reason"]) for c in chunks]
    assert choices == [(0, {"role": "assistant", "content": ""}, None),
                       (1, {"role": "assistant", "content": ""}, None),
                       (1, {"content": "Hi"}, None), (1, {"content": "!"}, "stop"),
                       (0, {}, "length")]


def test_text_offsets_count_characters_where_they_start() -> None:
    """`aé😀b` in byte pieces (é two, 😀 four) and whole tokens; a lead byte that no piece
    completes is one U+FFFD, before the token that ends it."""
    offset = TextOffset()
    tokens = [b"a", b"\xc3", b"\xa9", b"\xf0", b"\x9f", b"\x98", b"\x80", b" b"]
    assert [offset.take(raw) for raw in tokens] == [0, 1, 1, 2, 2, 2, 2, 3]
    assert offset.chars == len("aé😀 b")
    broken = TextOffset()
    assert [broken.take(raw) for raw in [b"x", b"\xe2", b"\t", b"y"]] == [0, 1, 2, 3]
    assert broken.chars == len("x\ufffd\ty")


@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token-ids"])
def test_echoed_prompt_offsets_with_sentencepieces_dummy_prefix(sp_tokenizer_dir: Path,
                                                                as_ids: bool) -> None:
    """Llama 2's tokenizer writes "The" as "▁The", whose text is " The"; the echoed prompt (as
    sent, or decoded) has no such space, so the next token starts at 3, not 4."""
    tokenizer = Tokenizer.from_dir(sp_tokenizer_dir)
    service = CompletionService(None, tokenizer, "m")  # type: ignore[arg-type]
    text = "The quick brown fox é!"
    ids = tokenizer.encode(text, add_special_tokens=True)
    s = Submitted(ids, None if as_ids else text, [])
    assert service._echo_text(s) == text
    echo = [None] + [TokenLogprob(i, -1.0) for i in ids[1:]]
    logprobs = service._logprobs(s, [], [], echo, TextOffset(), True)
    tokens, offsets = logprobs.tokens, logprobs.text_offset
    assert tokens[1] == " The" and offsets[:3] == [0, 0, 3]
    for token, offset in zip(tokens[2:], offsets[2:], strict=True):
        if token == "\ufffd":  # a piece of é
            assert text[offset] == "é"
        else:
            assert text[offset:offset + len(token)] == token, (token, offset)
