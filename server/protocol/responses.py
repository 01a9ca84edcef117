"""OpenAI's response bodies and stream chunks for /v1/models, completions and chat completions.

Serialize responses with plain `model_dump_json()`: `null` fields stay (OpenAI sends
`"finish_reason": null` and `"logprobs": null`), except a stream chunk's `usage` and unset
`DeltaMessage` keys, which are omitted when None.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from json.encoder import encode_basestring
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from server.protocol.base import ResponseModel
from server.protocol.logprobs import ChatCompletionLogprobs, CompletionLogprobs, PromptLogprobs
from server.request import FinishReason

# OpenAI's reasons, plus vLLM's "abort" for requests cut off by a server shutdown.
OpenAIFinishReason = Literal["stop", "length", "abort"]
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]  # chat's: calls too
# vLLM's extra field: the stop string or stop token id that ended a choice; null otherwise
# (eos, length, abort, and every chunk before the last)
StopReason = str | int | None


def random_id(prefix: str, separator: str = "-") -> str:
    """A unique id, `cmpl-<hex>` or `chatcmpl-<hex>` (`resp_<hex>`): engine requests' (and a
    response's outside an HTTP request)."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


def to_openai_finish_reason(reason: FinishReason | None) -> OpenAIFinishReason | None:
    """OpenAI's finish_reason ("abort" as vLLM sends it); None for ERROR, which the route
    reports as an error instead."""
    if reason is FinishReason.STOP:
        return "stop"
    if reason is FinishReason.LENGTH:
        return "length"
    if reason is FinishReason.ABORT:
        return "abort"
    return None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "llama-serve"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's model (vLLM's field)
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class PromptTokensDetails(ResponseModel):
    cached_tokens: int  # prompt tokens taken from the prefix cache


class CompletionTokensDetails(ResponseModel):
    reasoning_tokens: int  # the answer's tokens of thinking (--reasoning-parser)


class CompletionUsage(ResponseModel):
    """`prompt_tokens_details` is sent only with --enable-prompt-tokens-details (vLLM's
    flag), on a response's usage and a stream's final usage chunk; `completion_tokens_details`
    only under --reasoning-parser, on a chat answer's (as vLLM's)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(
        default=None, exclude_if=lambda details: details is None)
    completion_tokens_details: CompletionTokensDetails | None = Field(
        default=None, exclude_if=lambda details: details is None)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int,
           cached_tokens: int | None = None) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=(None if cached_tokens is None
                                   else PromptTokensDetails(cached_tokens=cached_tokens)),
        )


class _OmitNullUsage(ResponseModel):
    """Stream chunks: `usage` is sent on the final usage chunk only (as vLLM does)."""

    @model_serializer(mode="wrap")
    def _omit_null_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage", ...) is None:
            del data["usage"]
        return data


class StreamEnvelope:
    """What every chunk of a stream shares (id, created, model), serialized once by the chunk
    model itself; each chunk is then that text around its one choice. Building and
    serializing the whole chunk model per token was the largest Python cost of streaming.

    The chunk of almost every token holds nothing but text: `text_chunk` writes it from
    `text_choice(index, text)`'s JSON, serialized once per index with a marker for the text,
    so that only the text is encoded per token (building and dumping the choice model was
    still a sixth of the event loop's time in a c=16 stream). `encode_basestring` escapes
    strings as pydantic does, byte for byte (tests/api/test_protocol.py checks every code
    point)."""

    def __init__(self, empty_chunk: _OmitNullUsage,
                 text_choice: Callable[[int, str], ResponseModel]) -> None:
        # A JSON string cannot hold an unescaped `"choices":[]`, so the split is the key's.
        head, key, self._tail = empty_chunk.model_dump_json().rpartition('"choices":[]')
        if not key:
            raise ValueError("the chunk must have an empty choices list")
        self._head = head + '"choices":['
        self._text_choice = text_choice
        self._around_text: dict[int, tuple[str, str]] = {}  # by choice index

    def text_chunk(self, index: int, text: str) -> str:
        """`render(text_choice(index, text))`, without building the choice."""
        around = self._around_text.get(index)
        if around is None:
            marker = f'"{uuid.uuid4().hex}"'  # appears nowhere else in the choice's JSON
            before, _, after = self._text_choice(index, marker[1:-1]).model_dump_json(
                ).partition(marker)
            around = self._around_text[index] = (self._head + before, after + "]" + self._tail)
        return f"{around[0]}{encode_basestring(text)}{around[1]}"

    def render(self, choice: ResponseModel, usage: CompletionUsage | None = None) -> str:
        if usage is None:
            return f"{self._head}{choice.model_dump_json()}]{self._tail}"
        # The tail opens with `,` or `}`, so a key can go right after the choices.
        return (f'{self._head}{choice.model_dump_json()}],"usage":{usage.model_dump_json()}'
                f"{self._tail}")

    def usage_chunk(self, usage: CompletionUsage) -> str:
        """The stream's last chunk before [DONE] when usage is asked for: no choices."""
        return f'{self._head}],"usage":{usage.model_dump_json()}{self._tail}'


class CompletionResponseChoice(ResponseModel):
    """A completion choice, in responses and (with null `finish_reason`) in stream chunks."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None
    stop_reason: StopReason = None
    # vLLM's, where asked for (its prompt's, on each of its choices)
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: CompletionUsage


class CompletionStreamResponse(_OmitNullUsage):
    """A completions stream chunk: same object and choice shape as the response (OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: CompletionUsage | None = None


class FunctionCall(ResponseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(ResponseModel):
    """The response message; `tool_calls` only where the answer is calls (as OpenAI's)."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    # Under --reasoning-parser, the thinking (not sent without one): see _with_reasoning
    reasoning: str | None = None

    @model_serializer(mode="wrap")
    def _omit_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = _with_reasoning(handler(self))
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


def _with_reasoning(body: dict[str, Any]) -> dict[str, Any]:
    """A message's or delta's `reasoning` (vLLM's field since 0.11) sent under DeepSeek's
    API's (and earlier vLLM's) name `reasoning_content` too, so clients of either read it;
    neither where there is none."""
    reasoning = body.pop("reasoning", None)
    if reasoning is not None:
        body["reasoning"] = body["reasoning_content"] = reasoning
    return body


class DeltaFunctionCall(ResponseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(ResponseModel):
    """One call in a stream: its first delta has the id, type and name; a named call's later
    deltas add pieces of its arguments, other calls come whole in one delta."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionResponseChoice(ResponseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: StopReason = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: CompletionUsage
    # vLLM's, where asked for
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=lambda v: v is None)


class DeltaMessage(ResponseModel):
    """A stream delta: only the keys that are set are sent (`{}` on the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning: str | None = None  # (under both names, as ChatCompletionMessage's)

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _with_reasoning(
            {key: value for key, value in handler(self).items() if value is not None})


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: StopReason = None


class ChatCompletionChunk(_OmitNullUsage):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: CompletionUsage | None = None
