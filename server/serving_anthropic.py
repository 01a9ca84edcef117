"""Anthropic's Messages API on top of the chat service: a request's answer as content blocks
(thinking under --reasoning-parser, text, then tool_use), gathered into a message or
streamed as Anthropic's named events.

The answer is read as chat reads it (ChatService.answer: a named tool's arguments, the calls
"any" asked for or the parser found, or text). A stream is message_start, ping, each block
(content_block_start, its deltas, content_block_stop; one open at a time, indices in the
order they start, as the SDKs accumulate them), message_delta (stop_reason, usage),
message_stop. Text streams as it comes (a tail that may begin a call held back, as chat's);
a named tool's arguments stream as input_json_delta; calls found in a finished answer go out
whole. No FastAPI and no tensors here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.protocol.anthropic import (
    AnthropicMessage,
    MessagesRequest,
    StopReason,
    TextOut,
    ThinkingOut,
    ToolUseOut,
    Usage,
    error_body,
    new_id,
)
from server.request import FinishReason, SamplingParams
from server.serving import (
    ChatService,
    Choice,
    Submitted,
    abort_all,
    failure_message,
    merged,
    model_of,
    raise_if_failed,
)
from server.tool_calls import ParsedCall

# How the stream's last event starts (the HTTP layer ends the body with it)
LAST_MESSAGE_EVENT = b"event: message_stop\n"


@dataclass(slots=True)
class MessagesJob:
    """A Messages request, the chat request it reads as, and its sampling parameters."""

    request: MessagesRequest
    chat: ChatCompletionRequest
    params: SamplingParams


def _input(call: ParsedCall) -> dict[str, Any]:
    """A call's arguments as tool_use's input object ({} where they are not one)."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MessagesService:
    """/v1/messages: the chat service's prompt, generation and reading of the answer, in
    Anthropic's shapes."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    @staticmethod
    def _stop(choice: Choice, calls: list[ParsedCall] | None) -> tuple[StopReason, str | None]:
        """Anthropic's stop_reason and stop_sequence: a stop sequence the client gave, the
        length, calls, else the end of the turn."""
        if choice.finish_reason is FinishReason.LENGTH:
            return "max_tokens", None
        if calls:
            return "tool_use", None
        if isinstance(choice.stop_reason, str):
            return "stop_sequence", choice.stop_reason
        return "end_turn", None

    def _usage(self, submitted: list[Submitted], choice: Choice) -> Usage:
        cached = choice.num_cached_tokens
        return Usage(input_tokens=len(submitted[0].prompt_ids) - cached,
                     output_tokens=choice.num_output_tokens, cache_read_input_tokens=cached)

    def _blocks(self, job: MessagesJob, choice: Choice, prompt_ids: list[int]
                ) -> tuple[list[ThinkingOut | TextOut | ToolUseOut], list[ParsedCall] | None]:
        """A finished answer's blocks: its thinking (under --reasoning-parser), its text,
        its calls."""
        reasoning, choice = self.chat.split_reasoning(job.chat, choice, prompt_ids)
        content, calls, _ = self.chat.answer(job.chat, choice)
        blocks: list[ThinkingOut | TextOut | ToolUseOut] = []
        if reasoning and job.chat.include_reasoning:
            blocks.append(ThinkingOut(thinking=reasoning))
        if content:
            blocks.append(TextOut(text=content))
        blocks += [ToolUseOut(id=new_id("toolu"), name=call.name, input=_input(call))
                   for call in calls or ()]
        return blocks, calls

    async def create(self, job: MessagesJob, submitted: list[Submitted],
                     message_id: str) -> AnthropicMessage:
        choice = Choice()
        async for _, out in merged(self.chat.engine, submitted):
            raise_if_failed(out)
            choice.absorb(out)
        blocks, calls = self._blocks(job, choice, submitted[0].prompt_ids)
        stop_reason, stop_sequence = self._stop(choice, calls)
        return AnthropicMessage(id=message_id, content=blocks,
                                model=model_of(submitted, self.chat.model_name),
                                stop_reason=stop_reason, stop_sequence=stop_sequence,
                                usage=self._usage(submitted, choice))

    async def stream(self, job: MessagesJob, submitted: list[Submitted],
                     message_id: str) -> AsyncIterator[bytes]:
        """The message's events; a failure after the first is an `error` event (Anthropic's)
        that ends the stream."""
        start = AnthropicMessage(id=message_id,
                                 model=model_of(submitted, self.chat.model_name),
                                 usage=Usage(input_tokens=len(submitted[0].prompt_ids),
                                             output_tokens=0))
        read = False
        try:
            yield _event("message_start", message=start.model_dump())
            yield _event("ping")
            try:
                async for frame in self._blocks_streamed(job, submitted):
                    yield frame
            except Exception as e:  # noqa: BLE001 - after the 200, told in the stream
                yield _event("error", error=error_body(500, failure_message(e))["error"])
            read = True
        finally:
            if not read:  # (closed before its outputs were read: merged() never ran)
                abort_all(self.chat.engine, submitted)

    async def _blocks_streamed(self, job: MessagesJob, submitted: list[Submitted]
                               ) -> AsyncIterator[bytes]:
        request, choice = job.chat, Choice()
        named = (request.tool_choice.function.name
                 if isinstance(request.tool_choice, NamedToolChoice) else None)
        held = self.chat.holds_back(request)
        blocks = _Blocks()
        thinking = self.chat.reasoning_split(request, submitted[0].prompt_ids)
        async for _, out in merged(self.chat.engine, submitted):
            raise_if_failed(out)
            if thinking is not None:  # the thinking as its block; the rest is `out`
                reasoning, _, out = thinking.split(out)
                if reasoning and request.include_reasoning:
                    if blocks.open_kind is None:
                        yield blocks.open(ThinkingOut())
                    yield blocks.delta({"type": "thinking_delta", "thinking": reasoning})
                if blocks.open_kind == "thinking" and thinking.in_content:
                    yield blocks.close()
            choice.absorb(out)
            if named is not None:  # the named tool's arguments, as they come
                if out.text:
                    if blocks.open_kind is None:
                        yield blocks.open(ToolUseOut(id=new_id("toolu"), name=named))
                    yield blocks.delta({"type": "input_json_delta", "partial_json": out.text})
                continue
            text = held.release(choice, out).text
            if text:
                if blocks.open_kind is None:
                    yield blocks.open(TextOut())
                yield blocks.delta({"type": "text_delta", "text": text})
        if blocks.open_kind == "thinking":  # (cut while thinking)
            yield blocks.close()
        content, calls, _ = self.chat.answer(request, choice)
        if named is not None:
            if blocks.open_kind is None:  # (no arguments at all)
                yield blocks.open(ToolUseOut(id=new_id("toolu"), name=named))
            calls = calls or []
        else:
            rest, _ = held.rest(content, choice)
            if rest:  # text held back that turned out to be text after all
                if blocks.open_kind is None:
                    yield blocks.open(TextOut())
                yield blocks.delta({"type": "text_delta", "text": rest})
            if blocks.open_kind is not None:
                yield blocks.close()
            for call in calls or ():  # found in the finished answer: each whole
                yield blocks.open(ToolUseOut(id=new_id("toolu"), name=call.name))
                yield blocks.delta({"type": "input_json_delta",
                                    "partial_json": json.dumps(_input(call))})
                yield blocks.close()
        if blocks.open_kind is not None:
            yield blocks.close()
        stop_reason, stop_sequence = self._stop(choice, calls)
        # (the input's split between computed and cached is known now: message_start
        # counted it all as input; the SDKs take the later counts)
        yield _event("message_delta",
                     delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                     usage=self._usage(submitted, choice).model_dump(
                         exclude={"cache_creation_input_tokens"}))
        yield _event("message_stop")


class _Blocks:
    """The stream's content blocks: one open at a time, numbered as they start."""

    def __init__(self) -> None:
        self.index = -1
        self.open_kind: str | None = None

    def open(self, block: ThinkingOut | TextOut | ToolUseOut) -> bytes:
        self.index += 1
        self.open_kind = block.type
        return _event("content_block_start", index=self.index,
                      content_block=block.model_dump())

    def delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", index=self.index, delta=delta)

    def close(self) -> bytes:
        self.open_kind = None
        return _event("content_block_stop", index=self.index)


def _event(kind: str, **fields: Any) -> bytes:
    """`event: <kind>` and `data: {"type": <kind>, ...}`, one SSE frame."""
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()
