"""OpenAI completions and chat on top of the engine: prompts in, response objects or SSE out.

Shared by both endpoints: each prompt becomes one engine request with `n` samples (or, when
`n` is more than the server's slots, one a group of samples that fits); their outputs are
merged into choices (index = prompt * n + sample), streamed as chunks or gathered into one
response. Abandoning a stream (client gone) aborts every engine request behind it. No FastAPI
and no tensors here.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from model.infill import InfillError
from model.tokenizer import Tokenizer
from server.engine_front import EngineFront, RequestRejected
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionLogprobs,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatFinishReason,
    ChatMessage,
    ChatTemplateControls,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    CompletionTokensDetails,
    CompletionUsage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    FunctionCall,
    NamedToolChoice,
    PromptLogprobs,
    RequestError,
    StreamEnvelope,
    ToolCallOut,
    chat_logprobs,
    completion_logprobs,
    logprob_token_ids,
    prompt_logprobs,
    to_openai_finish_reason,
)
from server.reasoning import ReasoningParser, ReasoningStream
from server.request import (
    FinishReason,
    RequestOutput,
    SamplingParams,
    ThinkingBudget,
    TokenLogprob,
)
from server.tool_calls import (
    PARSERS,
    ParsedCall,
    ToolParser,
    named_call,
    required_calls,
    tool_call_id,
)

DONE = "[DONE]"
logger = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    """The engine failed a request after it was accepted (reported as a server error)."""


class OutputStream(Protocol):
    """What a sample group reads: an engine request's stream, or a beam search's (whose
    request id is its own: aborting it does nothing; leaving its loop aborts its steps)."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...


@dataclass(slots=True)
class SampleGroup:
    """An engine request for samples `first`, `first` + 1, ... of a prompt."""

    stream: OutputStream
    first: int


@dataclass(slots=True)
class Submitted:
    """One prompt's engine requests: one for all `n` samples, unless they need more slots
    than the server has (a request's samples run together, one slot each)."""

    prompt_ids: list[int]
    prompt_text: str | None  # as the client sent it, for echo
    groups: list[SampleGroup]
    lora: str | None = None  # the LoRA adapter it runs on, which its response names


@dataclass(slots=True)
class Choice:
    """Everything one choice has produced so far."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # its engine request's prompt tokens from the prefix cache

    def absorb(self, out: RequestOutput) -> None:
        """Add an output of the choice's engine request."""
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.finish_reason = out.finish_reason
        self.stop_reason = out.stop_reason


_UTF8 = codecs.getincrementaldecoder("utf-8")


@dataclass(slots=True)
class TextOffset:
    """Where a completion choice's next token starts in its text (logprobs' `text_offset`):
    the characters so far, counted by decoding the tokens' bytes as they come, so that a
    character spread over several tokens (byte fallback's <0xE2>...) counts once, where it
    starts. (Bytes that never make a character count as U+FFFD, as in the text, by Python's
    count, which byte fallback's may exceed.)"""

    chars: int = 0
    _decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8("replace"))

    def take(self, raw: bytes) -> int:
        """Where the next token, of these bytes, starts; the offset moves past it. A piece of a
        character starts where the character does (which it moves past once complete); a
        token after pieces that made no character, after their U+FFFD."""
        text = self._decoder.decode(raw)
        # What the token's own bytes make: the rest stands for the pieces before it
        own = len(_UTF8("replace").decode(raw))
        start = self.chars + max(0, len(text) - own)
        self.chars += len(text)
        return start


def sample_groups(n: int, num_slots: int) -> list[tuple[int, int]]:
    """(first sample, count) of each engine request for `n` samples, at most a slot each."""
    return [(first, min(num_slots, n - first)) for first in range(0, n, num_slots)]


def check_capacity(engine: EngineFront, num_prompts: int, n: int, prompt_param: str) -> None:
    """A request of more samples than the server holds at once is a 400 (a 503 would have
    the client retry in vain)."""
    needed = num_prompts * n  # samples: admission counts them (a slot each)
    if needed > engine.max_queued:
        what = (f"has {needed} prompts" if n == 1 else
                f"asks for {needed} samples ({num_prompts} prompt(s) x n={n})")
        raise RequestRejected(
            f"the request {what}, and this server holds at most {engine.max_queued} samples "
            f"at once ({engine.num_slots} running, {engine.max_waiting} waiting: "
            "--max-num-seqs, --max-waiting)",
            prompt_param if num_prompts > engine.max_queued else "n")


def submit(engine: EngineFront, prompts: list[tuple[list[int], str | None]], params: SamplingParams,
           request_id: str, prompt_param: str = "prompt") -> list[Submitted]:
    """Queue every prompt, or none: every prompt is checked before any is queued (so that a
    bad one costs the others nothing, not even an abort in the metrics), and a later refusal
    (the queue filling up) aborts the ones already queued. Prompt i's
    engine request is `<request_id>-<i>` (`-<i>-<first sample>` for each group of samples,
    when `n` is more than the slots: the groups queue one after another, each prefilling the
    prompt again (from the prefix cache, where it is on), its seed moved on by its first
    sample's index so that sample k is drawn with seed + k either way). `prompt_param` is
    the field a prompt's refusal is blamed on ("messages" for chat)."""
    groups = sample_groups(params.n, engine.num_slots)
    check_capacity(engine, len(prompts), params.n, prompt_param)
    planned = []
    for i, (ids, text) in enumerate(prompts):
        runs = _engine_requests(f"{request_id}-{i}", params, groups)
        try:
            engine.validate(ids, runs[0][1])  # (the groups differ in n and seed only)
        except RequestRejected as e:
            e.param = e.param or prompt_param  # as OpenAI names it
            raise
        planned.append((ids, text, runs))
    submitted: list[Submitted] = []
    try:
        for ids, text, runs in planned:
            s = Submitted(ids, text, [], params.lora)
            submitted.append(s)
            for rid, run_params, first in runs:
                s.groups.append(SampleGroup(engine.generate(ids, run_params, rid), first))
    except Exception:
        for s in submitted:
            for group in s.groups:
                engine.abort(group.stream.request_id)
        raise
    return submitted


def _engine_requests(request_id: str, params: SamplingParams, groups: list[tuple[int, int]]
                     ) -> list[tuple[str, SamplingParams, int]]:
    """(engine request id, its params, its first sample) for each group of a prompt's samples;
    one group is the request as it came."""
    if len(groups) == 1:
        return [(request_id, params, groups[0][0])]
    return [(f"{request_id}-{first}",
             replace(params, n=count, seed=None if params.seed is None else params.seed + first),
             first) for first, count in groups]


async def merged(engine: EngineFront, submitted: list[Submitted]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all prompts' streams as they arrive, each output's `index`
    its sample's within the prompt; aborts on exit."""
    groups = [(i, group) for i, s in enumerate(submitted) for group in s.groups]
    if len(groups) == 1:  # one engine request (chat, most completions): no pump task, no queue
        stream, finished = groups[0][1].stream, False
        try:
            async for out in stream:
                yield 0, out
            finished = True
        finally:
            if not finished:
                engine.abort(stream.request_id)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()

    async def pump(i: int, group: SampleGroup) -> None:
        async for out in group.stream:
            out.index += group.first  # each output is this stream's alone
            queue.put_nowait((i, out))
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, group)) for i, group in groups]
    open_streams = len(tasks)
    try:
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        if open_streams:  # left early: the client went away or something failed
            for _, group in groups:
                engine.abort(group.stream.request_id)


def abort_all(engine: EngineFront, submitted: list[Submitted]) -> None:
    """Abort every engine request behind a response (one that ended finished: a no-op)."""
    for s in submitted:
        for group in s.groups:
            engine.abort(group.stream.request_id)


def raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise GenerationFailed(out.error or "generation failed")


@dataclass(slots=True)
class HeldAnswer:
    """What of a streamed answer goes out as text now. `held`: False, text, streamed as it
    comes; True, held back to the end (calls: tool_choice "required", or found under
    "auto"); None, not known yet.

    Under "auto", a parser whose calls are the whole answer (llama3_json, pythonic) holds it
    back while it may still be calls, then streams it or keeps it to the end. One whose calls
    may follow text (hermes) streams the text, all but a tail that may begin the calls'
    opening, until the opening shows; from there on it is held. What is held goes out at the
    end (ChatService.answer: the calls, or text after all)."""

    parser: ToolParser | None  # "auto"'s; None: `held` never changes
    held: bool | None = None
    sent: int = 0  # the answer's characters sent as text
    sent_logprobs: int = 0  # its tokens' logprobs sent

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser.after_text is not None:
            self.held = False  # (text until the opening shows)

    def release(self, choice: Choice, out: RequestOutput) -> RequestOutput:
        """`out` as it goes out now, once `choice` has absorbed it: the text released (and
        its tokens' logprobs), nothing while it is held."""
        text, parser = choice.text, self.parser
        if self.held is False and (parser is None or parser.after_text is None):
            # streaming text (most answers): `out` is all that is new
            self.sent, self.sent_logprobs = len(text), len(choice.logprobs)
            return out
        if self.held is None:
            assert parser is not None  # (not known only under "auto")
            self.held = parser.may_be_calls(text)
        if self.held is not False or parser is None or parser.after_text is None:
            upto = len(text) if self.held is False else self.sent
        elif (start := parser.calls_start(text, self.sent)) is not None:
            self.held, upto = True, start
        else:
            upto = len(text) - (0 if out.finished else parser.opening_tail(text))
        piece = text[self.sent:max(upto, self.sent)]
        self.sent += len(piece)
        if not piece and (self.held is not False or not out.finished):
            # (nothing to show: its logprobs wait for the text they belong with, so that no
            # chunk, no Responses message, opens on a tail that may turn out to be calls)
            return replace(out, text="", logprobs=None)
        logprobs = choice.logprobs[self.sent_logprobs:]
        self.sent_logprobs = len(choice.logprobs)
        return replace(out, text=piece, logprobs=logprobs)

    def rest(self, content: str | None, choice: Choice
             ) -> tuple[str | None, list[TokenLogprob]]:
        """What a finished answer's `content` adds to the text sent, and the logprobs not
        sent yet."""
        return (content[self.sent:] or None if content else content,
                choice.logprobs[self.sent_logprobs:])


def failure_message(error: Exception) -> str:
    """What a stream tells its client of a failure after the 200 went out: the engine's
    reason, or (a bug, logged here) no details."""
    if isinstance(error, GenerationFailed):
        return str(error)
    logger.error("stream failed", exc_info=error)
    return "internal server error"


UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but "
                      "--trust-request-chat-template is not set. Refused request with untrusted "
                      "chat template.")  # vLLM's words


def model_of(submitted: list[Submitted], model_name: str) -> str:
    """The model a response names: the LoRA adapter its requests were admitted on (as vLLM
    names it; even if unloaded since), else `model_name`."""
    return next((s.lora for s in submitted if s.lora is not None), model_name)


def encode_messages(tokenizer: Tokenizer, messages: list[ChatMessage],
                    controls: ChatTemplateControls, add_special_tokens: bool,
                    trust_template: bool = False) -> list[int]:
    """A chat prompt's ids, as chat completions and /tokenize make them; a template of the
    request's own only where the server trusts them (--trust-request-chat-template)."""
    if controls.request_template is not None and not trust_template:
        raise RequestError(UNTRUSTED_TEMPLATE, "chat_template")
    return tokenizer.encode_chat([m.template_dict() for m in messages],
                                 add_special_tokens=add_special_tokens,
                                 **controls.template_args())


def _delta_call(index: int, call: ParsedCall) -> DeltaToolCall:
    return DeltaToolCall(index=index, id=tool_call_id(), type="function",
                         function=DeltaFunctionCall(name=call.name, arguments=call.arguments))


def error_event(message: str) -> str:
    return ErrorResponse.of(message, "server_error").model_dump_json()


def _at_most(logprobs: list[TokenLogprob | None] | None, num_top: int
             ) -> list[TokenLogprob | None] | None:
    """Prompt logprobs with at most `num_top` alternatives each: the engine found as many as
    the widest ask of the request (an echo's logprobs, prompt_logprobs)."""
    if logprobs is None:
        return None
    return [lp if lp is None or len(lp.top) <= num_top else replace(lp, top=lp.top[:num_top])
            for lp in logprobs]


def bad_words_token_ids(tokenizer: Tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's reading of bad_words: each word's tokens as it starts a text, and with a space
    before it where that makes other tokens of the same count (a word mid-text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out += [bare] if bare else []
        if spaced and bare and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(out)


class _Service:
    """What both endpoints' services hold, and the token texts their logprobs show."""

    def __init__(self, engine: EngineFront, tokenizer: Tokenizer, model_name: str,
                 prompt_tokens_details: bool = False) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.prompt_tokens_details = prompt_tokens_details  # usage's cached_tokens

    def model_of(self, submitted: list[Submitted]) -> str:
        return model_of(submitted, self.model_name)

    def _usage(self, submitted: list[Submitted], choices: dict[int, Choice],
               n: int) -> CompletionUsage:
        """Each prompt counted once, its cached tokens as its first sample's engine request
        (the first group, which prefills it first) reports them."""
        cached = (sum(c.num_cached_tokens for i, c in choices.items() if i % n == 0)
                  if self.prompt_tokens_details else None)
        return CompletionUsage.of(sum(len(s.prompt_ids) for s in submitted),
                                  sum(c.num_output_tokens for c in choices.values()), cached)

    def with_bad_words(self, request: CompletionRequest | ChatCompletionRequest,
                       params: SamplingParams) -> SamplingParams:
        if not request.bad_words:
            return params
        return replace(params, bad_words=bad_words_token_ids(self.tokenizer, request.bad_words))

    def _prompt_logprobs(self, logprobs: list[TokenLogprob | None] | None,
                         num_top: int | None) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs, where asked for (`num_top` not None); token texts as the
        tokenizer has them (vLLM's, return_tokens_as_token_ids or not)."""
        if num_top is None or logprobs is None:
            return None
        return prompt_logprobs(logprobs, num_top, self._token_texts(logprob_token_ids(logprobs)))

    def _token_texts(self, ids: Iterable[int], as_ids: bool = False) -> dict[int, str]:
        """Each id's text as logprobs show it; `as_ids`: "token_id:<id>" instead (vLLM's
        return_tokens_as_token_ids, for clients that must know the exact ids)."""
        wanted = sorted(set(ids))
        if as_ids:
            return {i: f"token_id:{i}" for i in wanted}
        return dict(zip(wanted, self.tokenizer.token_texts(wanted), strict=True))


# ---------------------------------------------------------------------- completions


class CompletionService(_Service):

    def prompts(self, request: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """Each prompt's ids and its text as sent (None for ids, or once truncated: the echo
        then decodes the ids kept). A fill-in-the-middle prompt is laid out around its
        suffix (model/infill.py); truncation drops its prefix's start."""
        special = request.add_special_tokens
        keep = request.prompt_tokens_kept(self.engine.max_model_len)
        out: list[tuple[list[int], str | None]] = []
        for p in request.prompts:
            if (parts := self._infill_parts(request, p)) is not None:
                assert self.tokenizer.infill is not None
                try:
                    ids = self.tokenizer.infill.encode(*parts, special, keep)
                except InfillError as e:
                    raise RequestError(str(e), "truncate_prompt_tokens") from None
                out.append((ids, None))
                continue
            ids, text = ((self.tokenizer.encode(p, add_special_tokens=special), p)
                         if isinstance(p, str) else (list(p), None))
            if keep is not None and len(ids) > keep:
                ids, text = ids[-keep:], None
            out.append((ids, text))
        return out

    def _infill_parts(self, request: CompletionRequest, prompt: str | list[int]
                      ) -> tuple[str, str] | None:
        """(prefix, suffix) of a fill-in-the-middle prompt: the request's `suffix`, or the
        tokenizer's fill marker in the text ("<FILL_ME>", as transformers splits it); None
        for a plain prompt."""
        if request.suffix is None and not isinstance(prompt, str):
            return None  # (token ids: a plain prompt)
        infill = self.tokenizer.infill
        if request.suffix is None:
            if infill is None:
                return None
            try:
                parts = infill.split(prompt)
            except InfillError as e:
                raise RequestError(str(e), "prompt") from None
        elif infill is None:
            raise RequestError("this model has no fill-in-the-middle tokens (Code Llama's "
                               "▁<PRE>, ▁<SUF> and ▁<MID>): suffix needs a model trained for "
                               "infilling", "suffix")
        elif not isinstance(prompt, str):
            raise RequestError("suffix needs text prompts: token ids cannot be laid out "
                               "around it", "suffix")
        elif infill.tokens.fill_token is not None and infill.tokens.fill_token in prompt:
            raise RequestError(f"the prompt marks the gap with {infill.tokens.fill_token} and "
                               "the request sends a suffix: give one of the two", "suffix")
        else:
            parts = prompt, request.suffix
        if parts is not None and request.echo:
            raise RequestError("echo cannot be used with a fill-in-the-middle prompt (a "
                               "suffix): the prompt is not one text", "echo")
        return parts

    def with_infill_stop(self, request: CompletionRequest, params: SamplingParams
                         ) -> SamplingParams:
        """`params`, ending at the model's end-of-middle token where a prompt is a
        fill-in-the-middle one (Meta's code stops infilling on it)."""
        infill = self.tokenizer.infill
        if infill is None:
            return params
        kinds = [self._infill_parts(request, p) is not None for p in request.prompts]
        if any(kinds) and not all(kinds):  # (the stop is the request's, for all its prompts)
            raise RequestError(f"some prompts mark a gap with {infill.tokens.fill_token} and "
                               "others do not: fill in the middle in every prompt or in none",
                               "prompt")
        if not any(kinds) or infill.tokens.eot_id is None:
            return params
        return replace(params, stop_token_ids=(*params.stop_token_ids, infill.tokens.eot_id))

    def _echo_text(self, s: Submitted) -> str:
        return s.prompt_text if s.prompt_text is not None else self.tokenizer.decode(s.prompt_ids)

    def _logprobs(self, s: Submitted, new_ids: list[int],
                  new_lps: list[TokenLogprob], echo: list[TokenLogprob | None] | None,
                  offset: TextOffset, skip_special_tokens: bool, as_ids: bool = False
                  ) -> CompletionLogprobs:
        """The logprobs of `new_ids` (after the prompt's, when echoing); `offset` moves on
        past them."""
        ids: list[int] = list(new_ids)
        lps: list[TokenLogprob | None] = list(new_lps)
        if echo is not None:
            ids, lps = s.prompt_ids + ids, list(echo) + lps
        texts = self._token_texts(set(ids) | logprob_token_ids(lps), as_ids)
        # text_offset passes over the special tokens the text leaves out (an echoed prompt
        # never shows them), so that each offset points into the text returned.
        special = self.tokenizer.special_ids
        shown = [not (skip_special_tokens and t in special) for t in new_ids]
        if echo is not None:
            shown = self._prompt_shown(s) + shown
        raws = self.tokenizer.token_bytes(ids)
        first = next((i for i, show in enumerate(shown) if show), None)
        if (echo is not None and first is not None and first < len(s.prompt_ids)
                and raws[first].startswith(b" ") and not self._echo_text(s).startswith(" ")):
            # SentencePiece's dummy prefix: the first token's space is not in the echoed text
            raws[first] = raws[first][1:]
        starts = [offset.take(raw) if show else offset.chars
                  for raw, show in zip(raws, shown, strict=True)]
        return completion_logprobs(ids, lps, texts, starts)

    def _prompt_shown(self, s: Submitted) -> list[bool]:
        """Which prompt tokens the echoed text shows. A text prompt is echoed as sent: all but
        what the tokenizer added around it (BOS), even special tokens written in it. Token
        ids are echoed decoded, without special tokens."""
        ids = s.prompt_ids
        if s.prompt_text is not None:
            plain = self.tokenizer.encode(s.prompt_text, add_special_tokens=False)
            for start in range(len(ids) - len(plain) + 1):
                if ids[start:start + len(plain)] == plain:
                    return [start <= i < start + len(plain) for i in range(len(ids))]
        return [t not in self.tokenizer.special_ids for t in ids]

    async def create(self, request: CompletionRequest, submitted: list[Submitted],
                     response_id: str) -> CompletionResponse:
        n = request.n
        choices: dict[int, Choice] = {}
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        async for i, out in merged(self.engine, submitted):
            raise_if_failed(out)
            if out.prompt_logprobs is not None:
                prompt_lps[i] = out.prompt_logprobs
            choices.setdefault(i * n + out.index, Choice()).absorb(out)
        result = []
        shown = {i: self._prompt_logprobs(lps, request.shown_prompt_logprobs)  # its choices'
                 for i, lps in prompt_lps.items()}
        for index in sorted(choices):
            choice, s = choices[index], submitted[index // n]
            echo = self._echo_text(s) if request.echo else ""
            logprobs = None
            if request.logprobs is not None:
                echoed = (_at_most(prompt_lps.get(index // n), request.logprobs)
                          if request.echo else None)
                logprobs = self._logprobs(
                    s, choice.token_ids[:len(choice.logprobs)], choice.logprobs, echoed,
                    TextOffset(), request.skip_special_tokens,
                    request.return_tokens_as_token_ids)
            result.append(CompletionResponseChoice(
                index=index, text=echo + choice.text, logprobs=logprobs,
                finish_reason=to_openai_finish_reason(choice.finish_reason),
                stop_reason=choice.stop_reason, prompt_logprobs=shown.get(index // n)))
        return CompletionResponse(id=response_id, model=self.model_of(submitted), choices=result,
                                  usage=self._usage(submitted, choices, request.n))

    async def stream(self, request: CompletionRequest, submitted: list[Submitted],
                     response_id: str) -> AsyncIterator[str]:
        n, created = request.n, int(time.time())
        choices: dict[int, Choice] = {}
        offsets: dict[int, TextOffset] = {}

        envelope = StreamEnvelope(
            CompletionStreamResponse(id=response_id, created=created,
                                     model=self.model_of(submitted), choices=[]),
            text_choice=lambda index, text: CompletionResponseChoice(index=index, text=text))
        continuous_usage = request.continuous_usage

        def chunk(index: int, text: str, logprobs: CompletionLogprobs | None,
                  out: RequestOutput) -> str:
            if logprobs is None and out.finish_reason is None and not continuous_usage:
                return envelope.text_chunk(index, text)  # most tokens' chunk
            usage = (CompletionUsage.of(out.num_prompt_tokens, out.num_output_tokens)
                     if continuous_usage else None)  # this choice's, as vLLM's
            return envelope.render(CompletionResponseChoice(
                index=index, text=text, logprobs=logprobs,
                finish_reason=to_openai_finish_reason(out.finish_reason),
                stop_reason=out.stop_reason), usage)

        async for i, out in merged(self.engine, submitted):
            raise_if_failed(out)  # reported in the stream by the route, which ends it
            index = i * n + out.index
            s, first = submitted[i], index not in choices
            choice = choices.setdefault(index, Choice())
            choice.absorb(out)
            text, echo_lps = out.text, None
            if first and request.echo:
                text = self._echo_text(s) + text
                echo_lps = out.prompt_logprobs or []
            logprobs = None
            if request.logprobs is not None:
                logprobs = self._logprobs(
                    s, out.token_ids, out.logprobs or [], echo_lps,
                    offsets.setdefault(index, TextOffset()), request.skip_special_tokens,
                    request.return_tokens_as_token_ids)
            if text or out.token_ids or out.finished:
                yield chunk(index, text, logprobs, out)
        if request.include_usage:
            yield envelope.usage_chunk(self._usage(submitted, choices, n))
        yield DONE


# ---------------------------------------------------------------------- chat


class ChatService(_Service):

    def __init__(self, engine: EngineFront, tokenizer: Tokenizer, model_name: str,
                 prompt_tokens_details: bool = False, tool_call_parser: str | None = None,
                 trust_request_templates: bool = False,
                 reasoning_parser: str | None = None) -> None:
        super().__init__(engine, tokenizer, model_name, prompt_tokens_details)
        self.tool_parser = PARSERS[tool_call_parser] if tool_call_parser else None
        self.trust_request_templates = trust_request_templates
        # --reasoning-parser: the thinking set apart (server/reasoning.py), and the token
        # that ends it, past which a guide starts (as vLLM applies structured outputs)
        self.reasoning = ReasoningParser.named(reasoning_parser) if reasoning_parser else None
        self.reasoning_start_id = self.reasoning_end_id = None
        if self.reasoning is not None:
            self.reasoning_start_id = tokenizer.token_id(self.reasoning.start)
            self.reasoning_end_id = tokenizer.token_id(self.reasoning.end)
            if self.reasoning_start_id is None or self.reasoning_end_id is None:
                raise ValueError(f"the {reasoning_parser} reasoning parser could not locate "
                                 f"the think start/end tokens {self.reasoning.start!r} and "
                                 f"{self.reasoning.end!r} in the tokenizer")  # (vLLM's words)
            if max(self.reasoning_start_id, self.reasoning_end_id) >= engine.vocab_size:
                raise ValueError(f"the think tags' ids ({self.reasoning_start_id}, "
                                 f"{self.reasoning_end_id}) are beyond the model's vocabulary "
                                 f"of {engine.vocab_size}: the model cannot write them")

    def check_thinking_budget(self, request: ChatCompletionRequest) -> None:
        """A chat request's thinking_token_budget needs a thinking to bound."""
        if self.reasoning is None and request.thinking_token_budget not in (None, -1):
            raise RequestError("thinking_token_budget bounds a reasoning model's thinking: "
                               "serve it with --reasoning-parser", "thinking_token_budget")

    def with_reasoning(self, params: SamplingParams, request: ChatCompletionRequest,
                       prompt_ids: list[int]) -> SamplingParams:
        """Where the answer starts in its thinking (under a parser): a guided request's
        guide starts past the reasoning's end, so that the thinking is free and the content
        guided (vLLM guides from the first token once `include_reasoning` is false, which
        forces the thinking's own text into the schema and leaves the answer empty; not
        here); and a thinking_token_budget bounds the thinking."""
        if not self.starts_thinking(request, prompt_ids):
            return params
        assert self.reasoning_start_id is not None and self.reasoning_end_id is not None
        if params.guide is not None:
            params = replace(params, guide_after=self.reasoning_end_id)
        budget = request.thinking_token_budget
        if budget is not None and budget >= 0:
            params = replace(params, thinking_budget=ThinkingBudget(
                budget, self.reasoning_start_id, self.reasoning_end_id))
        return params

    def starts_thinking(self, request: ChatCompletionRequest, prompt_ids: list[int]) -> bool:
        """Whether the answer starts inside the thinking (False without a parser): unless the
        prompt's last think tag closes it (a template that turns thinking off; vLLM's
        is_reasoning_end), or the answer continues a final message that opened none (a
        prefill: its text is the answer's content)."""
        if self.reasoning is None:
            return False
        for token_id in reversed(prompt_ids):
            if token_id in (self.reasoning_start_id, self.reasoning_end_id):
                return token_id == self.reasoning_start_id
        return not request.continue_final_message

    def reasoning_split(self, request: ChatCompletionRequest, prompt_ids: list[int]
                        ) -> ReasoningSplit | None:
        """A stream's splitter of one choice's outputs into thinking and the rest; None
        where the answer does not start thinking."""
        if self.reasoning is None or not self.starts_thinking(request, prompt_ids):
            return None
        return ReasoningSplit(self.reasoning.stream())

    def reasoning_tokens(self, request: ChatCompletionRequest, token_ids: list[int],
                         prompt_ids: list[int]) -> int:
        """How many of an answer's tokens are its thinking, as vLLM counts them: from past
        an opening start tag (else the first) to before the first end tag (else the last)."""
        if not self.starts_thinking(request, prompt_ids):
            return 0
        start_id = self.reasoning_start_id
        start = token_ids.index(start_id) + 1 if start_id in token_ids else 0
        return max(0, self._content_start(token_ids) - 1 - start)

    def _content_start(self, token_ids: list[int]) -> int:
        """Where the content's tokens start: past the first end tag (past the end: none)."""
        if self.reasoning_end_id in token_ids:
            return token_ids.index(self.reasoning_end_id) + 1
        return len(token_ids) + 1

    def _chat_usage(self, request: ChatCompletionRequest, submitted: list[Submitted],
                    choices: dict[int, Choice]) -> CompletionUsage:
        """The usage, with a reasoning parser the thinking's tokens too
        (completion_tokens_details, as vLLM's)."""
        usage = self._usage(submitted, choices, request.n)
        if self.reasoning is not None:
            usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=sum(
                self.reasoning_tokens(request, c.token_ids, submitted[0].prompt_ids)
                for c in choices.values()))
        return usage

    def split_reasoning(self, request: ChatCompletionRequest, choice: Choice,
                        prompt_ids: list[int]) -> tuple[str | None, Choice]:
        """A finished choice's reasoning (None where the answer does not start thinking),
        and the choice with its content alone as its text ("" where the thinking never
        closed) and its content tokens' logprobs (those past the end tag's)."""
        if self.reasoning is None or not self.starts_thinking(request, prompt_ids):
            return None, choice
        reasoning, content = self.reasoning.split(choice.text)
        logprobs = choice.logprobs
        if len(logprobs) == len(choice.token_ids):
            logprobs = logprobs[self._content_start(choice.token_ids):]
        return reasoning, replace(choice, text=content or "", logprobs=logprobs)

    def prepare_tools(self, request: ChatCompletionRequest) -> None:
        """tool_choice "auto" needs a parser (vLLM's answer, word for word); a parser whose
        tags are special tokens has them kept in the text (as vLLM's adjust_request)."""
        if request.tool_mode != "auto":
            return
        if self.tool_parser is None:
            raise RequestError('"auto" tool choice requires --enable-auto-tool-choice and '
                               '--tool-call-parser to be set', "tool_choice")
        if self.tool_parser.special_tokens:
            request.skip_special_tokens = False

    def prompt_ids(self, request: ChatCompletionRequest) -> list[int]:
        ids = encode_messages(self.tokenizer, request.messages, request,
                              request.add_special_tokens, self.trust_request_templates)
        keep = request.prompt_tokens_kept(self.engine.max_model_len)  # vLLM's: the last k
        return ids[-keep:] if keep is not None else ids

    def logprobs(self, request: ChatCompletionRequest, lps: list[TokenLogprob]
                  ) -> ChatCompletionLogprobs:
        as_ids = request.return_tokens_as_token_ids
        texts = self._token_texts(logprob_token_ids(lps), as_ids)
        raw = ({i: text.encode() for i, text in texts.items()} if as_ids else
               dict(zip(texts, self.tokenizer.token_bytes(list(texts)), strict=True)))
        return chat_logprobs(lps, texts, raw)

    @staticmethod
    def echoed(request: ChatCompletionRequest) -> str:
        """vLLM's chat echo: the last message's content, which the answer goes on from, where
        that message is the answer's own turn (an assistant's, or any once
        add_generation_prompt is off: vLLM then answers in the last message's role); else
        nothing."""
        last = request.messages[-1]
        if not request.echo or (request.add_generation_prompt and last.role != "assistant"):
            return ""
        return last.text

    def answer(self, request: ChatCompletionRequest, choice: Choice
                ) -> tuple[str | None, list[ParsedCall] | None, ChatFinishReason | None]:
        """A finished choice's content, tool calls and finish_reason, as vLLM gives them:
        a named tool's call (content "", finish as it came), the calls "required" asked for
        or the parser found ("tool_calls" for a finished answer), or the text."""
        finish, mode = to_openai_finish_reason(choice.finish_reason), request.tool_mode
        calls, content = None, None
        if mode == "named":
            assert isinstance(request.tool_choice, NamedToolChoice)
            calls, content = named_call(request.tool_choice.function.name, choice.text), ""
        elif mode == "required":
            calls, content = required_calls(choice.text), ""
        elif mode == "auto" and self.tool_parser is not None:
            content, calls = self.tool_parser.read(choice.text)
            names = request.tool_names
            if calls is not None and any(call.name not in names for call in calls):
                calls = None  # JSON that names no tool of the request's: an answer in text
            if calls and request.parallel_tool_calls is False:
                calls = calls[:1]
        if calls is None:
            return choice.text, None, finish
        if mode != "named" and finish == "stop":
            finish = "tool_calls"
        return content, calls, finish

    def holds_back(self, request: ChatCompletionRequest) -> HeldAnswer:
        """A streamed choice's HeldAnswer: held to the end for a required list of calls,
        as the parser reads it under "auto", never otherwise (a named call streams its
        arguments)."""
        mode = request.tool_mode
        if mode == "auto" and self.tool_parser is not None:
            return HeldAnswer(self.tool_parser)
        return HeldAnswer(None, held=mode == "required")

    async def create(self, request: ChatCompletionRequest, submitted: list[Submitted],
                     response_id: str) -> ChatCompletionResponse:
        choices: dict[int, Choice] = {}
        prompt_lps = None
        async for _, out in merged(self.engine, submitted):
            raise_if_failed(out)
            prompt_lps = out.prompt_logprobs or prompt_lps
            choices.setdefault(out.index, Choice()).absorb(out)
        result, echoed = [], self.echoed(request)
        for i, whole in sorted(choices.items()):
            reasoning, c = self.split_reasoning(request, whole, submitted[0].prompt_ids)
            content, calls, finish = self.answer(request, c)
            if reasoning is not None and not c.text and calls is None:
                content = None  # (all of it thinking, as vLLM's)
            if not request.include_reasoning:
                reasoning = None
            if echoed:  # (before calls' content too, as vLLM puts it)
                content = echoed + (content or "")
            tool_calls = None if calls is None else [
                ToolCallOut(id=tool_call_id(), function=FunctionCall(name=call.name,
                                                                     arguments=call.arguments))
                for call in calls]
            result.append(ChatCompletionResponseChoice(
                index=i, message=ChatCompletionMessage(
                    content=content, tool_calls=tool_calls, reasoning=reasoning),
                logprobs=self.logprobs(request, whole.logprobs) if request.logprobs else None,
                finish_reason=finish, stop_reason=c.stop_reason))
        return ChatCompletionResponse(
            id=response_id, model=self.model_of(submitted), choices=result,
            usage=self._chat_usage(request, submitted, choices),
            prompt_logprobs=self._prompt_logprobs(prompt_lps, request.prompt_logprobs))

    async def stream(self, request: ChatCompletionRequest, submitted: list[Submitted],
                     response_id: str) -> AsyncIterator[str]:
        """Each choice's role with the first token, as vLLM sends it (not before: a client
        timing the stream takes the first chunk for the first token); then, as the answer
        is read: a named tool's arguments as they come, text token by token, or an answer
        held back while it may be calls (tool_choice "required", "auto"), whole at its end."""
        chunks = _ChatChunks(self, request, response_id, submitted)
        choices: dict[int, Choice] = {}
        held = {index: self.holds_back(request) for index in range(len(submitted) * request.n)}
        named = (request.tool_choice.function.name
                 if isinstance(request.tool_choice, NamedToolChoice) else None)
        thinking = None  # each choice's splitter, where the answer starts thinking
        if self.reasoning is not None and self.starts_thinking(request,
                                                               submitted[0].prompt_ids):
            thinking = {index: ReasoningSplit(self.reasoning.stream()) for index in held}
        started = False
        async for _, out in merged(self.engine, submitted):
            raise_if_failed(out)  # reported in the stream by the route, which ends it
            if not started:
                for index in range(request.n):
                    yield chunks.role(index)
                if echoed := self.echoed(request):  # a chunk of its own, as vLLM sends it
                    for index in range(request.n):
                        yield chunks.chunk(index, DeltaMessage(content=echoed))
                started = True
            if thinking is not None:  # the thinking goes out as it comes; the rest is `out`
                reasoning, lps, out = thinking[out.index].split(out)
                if reasoning and request.include_reasoning:
                    yield chunks.reasoning(out.index, reasoning, lps, out.num_output_tokens)
            choice = choices.setdefault(out.index, Choice())
            choice.absorb(out)
            if named is not None:
                parts = chunks.named_call(out, named)
            else:
                answer = held[out.index]
                piece = answer.release(choice, out)
                if answer.held is False:
                    parts = chunks.text(piece)
                else:  # (the text before calls that show at this token, then the calls)
                    parts = chunks.text(replace(piece, finish_reason=None)) if piece.text else []
                    parts += chunks.whole(choice, out, answer)
            for part in parts:
                yield part
        if request.include_usage:
            yield chunks.envelope.usage_chunk(self._chat_usage(request, submitted, choices))
        yield DONE


@dataclass(slots=True)
class ReasoningSplit:
    """One streamed choice's outputs split into its thinking and the rest (what the chat
    stream goes on with as before). A token's logprobs go with the text it shows in: held
    while its text is (a tag cut across tokens), with the thinking where that is all it
    shows, else with the rest."""

    stream: ReasoningStream
    pending: list[TokenLogprob] = field(default_factory=list)

    @property
    def in_content(self) -> bool:
        """The thinking has ended: what comes now is the rest."""
        return self.stream.in_content

    def split(self, out: RequestOutput
              ) -> tuple[str, list[TokenLogprob] | None, RequestOutput]:
        reasoning, content = self.stream.feed(out.text, final=out.finished)
        self.pending += out.logprobs or []
        lps = None
        if content or reasoning or out.finished:  # (the last token's, eos too, go out)
            lps, self.pending = self.pending, []
        to_rest = bool(content) or (out.finished and not reasoning)
        rest = replace(out, text=content, logprobs=lps if to_rest else None)
        return reasoning, None if to_rest else lps, rest


class _ChatChunks:
    """A chat stream's chunks: what every chunk shares (serialized once, StreamEnvelope),
    and the shapes of an answer's chunks."""

    def __init__(self, service: ChatService, request: ChatCompletionRequest, response_id: str,
                 submitted: list[Submitted]) -> None:
        self.service, self.request = service, request
        self.num_prompt = len(submitted[0].prompt_ids)
        self.envelope = StreamEnvelope(
            ChatCompletionChunk(id=response_id, created=int(time.time()),
                                model=service.model_of(submitted), choices=[]),
            text_choice=lambda index, text: ChatCompletionStreamChoice(
                index=index, delta=DeltaMessage(content=text)))
        self.continuous_usage = request.continuous_usage
        self._opened: set[int] = set()  # choices whose named call has been opened

    def chunk(self, index: int, delta: DeltaMessage,
              logprobs: ChatCompletionLogprobs | None = None, finish: RequestOutput | None = None,
              num_output: int = 0, reason: ChatFinishReason | None = None) -> str:
        usage = (CompletionUsage.of(self.num_prompt, num_output)
                 if self.continuous_usage else None)  # this choice's, as vLLM's
        return self.envelope.render(ChatCompletionStreamChoice(
            index=index, delta=delta, logprobs=logprobs,
            finish_reason=reason or to_openai_finish_reason(finish and finish.finish_reason),
            stop_reason=finish and finish.stop_reason), usage)

    def role(self, index: int) -> str:
        return self.chunk(index, DeltaMessage(role="assistant", content=""))

    def reasoning(self, index: int, text: str, lps: list[TokenLogprob] | None,
                  num_output: int) -> str:
        return self.chunk(index, DeltaMessage(reasoning=text),
                          self._logprobs(lps) if lps else None, num_output=num_output)

    def _logprobs(self, lps: list[TokenLogprob]) -> ChatCompletionLogprobs | None:
        return self.service.logprobs(self.request, lps) if self.request.logprobs else None

    def text(self, out: RequestOutput) -> list[str]:
        """A token's text; the last token's chunk carries the finish reason (a finish
        alone: an empty delta), as vLLM's does."""
        if (out.text and not self.request.logprobs and not self.continuous_usage
                and not out.finished):
            return [self.envelope.text_chunk(out.index, out.text)]  # most tokens' chunk
        token = bool(out.text or out.logprobs)
        if not (token or out.finished):
            return []
        delta = DeltaMessage(content=out.text) if token else DeltaMessage()
        return [self.chunk(out.index, delta, self._logprobs(out.logprobs or []) if token else
                           None, finish=out if out.finished else None,
                           num_output=out.num_output_tokens)]

    def whole(self, choice: Choice, out: RequestOutput, answer: HeldAnswer) -> list[str]:
        """A held-back answer, once finished: its calls, or its text (what of it `answer`
        has not sent); then the finish on a chunk of its own, as OpenAI's (the SDK's stream
        helper closes a call when a later chunk starts, not on its own finish)."""
        if not out.finished:
            return []
        content, calls, finish = self.service.answer(self.request, choice)
        content, lps = answer.rest(content, choice)
        tool_calls = (None if calls is None else
                      [_delta_call(k, call) for k, call in enumerate(calls)])
        logprobs = self._logprobs(lps) if lps else None
        return [self.chunk(out.index, DeltaMessage(content=content or None,
                                                   tool_calls=tool_calls), logprobs,
                           num_output=out.num_output_tokens),
                self.chunk(out.index, DeltaMessage(), finish=out,
                           num_output=out.num_output_tokens, reason=finish)]

    def named_call(self, out: RequestOutput, name: str) -> list[str]:
        """A named call's stream, as vLLM's: its first delta opens the call (id, type, name)
        with the first piece of its arguments, later ones add pieces; the finish follows on a
        chunk of its own."""
        parts = []
        if out.text or out.logprobs:
            first = out.index not in self._opened
            self._opened.add(out.index)
            call = DeltaToolCall(
                index=0, id=tool_call_id() if first else None,
                type="function" if first else None,
                function=DeltaFunctionCall(name=name if first else None, arguments=out.text))
            parts.append(self.chunk(out.index, DeltaMessage(tool_calls=[call]),
                                    self._logprobs(out.logprobs or []),
                                    num_output=out.num_output_tokens))
        if out.finished:
            parts.append(self.chunk(out.index, DeltaMessage(), finish=out,
                                    num_output=out.num_output_tokens))
        return parts
