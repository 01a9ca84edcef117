"""OpenAI's wire format: request and response models, per-server limits, response builders.

Requests check ranges with `Field` constraints and validators (a `ValidationError` is a 400);
limits that depend on server configuration are checked by `check_limits()`, which raises
`RequestError`; `to_sampling_params()` maps a request onto the engine's `SamplingParams`.
Serialize responses with plain `model_dump_json()`: `null` fields stay (OpenAI sends
`"finish_reason": null` and `"logprobs": null`), except a stream chunk's `usage` and unset
`DeltaMessage` keys, which are omitted when None. No torch, no FastAPI: pydantic only.
"""

from __future__ import annotations

import logging
import re
import time
import types
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from server.request import MAX_LOGPROBS, FinishReason, SamplingParams, TokenLogprob

logger = logging.getLogger(__name__)

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same floor
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,18}")  # fits an int64; int() refuses > 4300 digits

TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# OpenAI's reasons, plus vLLM's "abort" for requests cut off by a server shutdown.
OpenAIFinishReason = Literal["stop", "length", "abort"]


# --- base, errors, limits ---------------------------------------------------------------------


def _admits_none(annotation: Any) -> bool:
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_none(arg) for arg in typing.get_args(annotation))
    return False


def _check_unicode(value: Any) -> None:
    """Refuse lone surrogates: JSON can carry "\\ud800", but it is no text a tokenizer (or a
    JSON response echoing it) can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (found a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


class OpenAIBaseModel(BaseModel):
    """Base of every API model: unknown fields are ignored and logged (vLLM `OpenAIBaseModel`).

    OpenAI documents most parameters as "X or null, defaults to D" and clients do send `null`:
    a `null` for a field whose type excludes None means its default.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="wrap")
    @classmethod
    def _drop_unknown_and_null(cls, data: Any, handler: Any) -> Any:
        _check_unicode(data)
        if isinstance(data, dict):
            model_fields = cls.model_fields
            unknown = sorted(str(key) for key in data if key not in model_fields)
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, unknown)
            data = {
                key: value
                for key, value in data.items()
                if not (
                    value is None
                    and key in model_fields
                    and not model_fields[key].is_required()
                    and not _admits_none(model_fields[key].annotation)
                )
            }
        return handler(data)


class RequestError(ValueError):
    """A request refused under the server's configured limits; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request caps that depend on server configuration, checked by `check_limits()`."""

    max_n: int = 16
    max_prompts: int = 64
    max_messages: int = 2048
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")


def _check_count(count: int, maximum: int, param: str) -> None:
    if count > maximum:
        raise RequestError(f"{param}: at most {maximum} allowed, got {count}", param)


def _check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    for token_id in ids:
        if token_id >= vocab_size:
            raise RequestError(
                f"{param}: token id {token_id} is out of range (vocab_size {vocab_size})", param
            )


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """OpenAI's (message, param) from pydantic's `errors()`; FastAPI's leading "body" dropped.

    `param` is the top-level field of the first error, None for whole-request errors.
    """
    parts: list[str] = []
    param: str | None = None
    for i, error in enumerate(errors):
        loc = list(error.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        if i == 0 and loc and isinstance(loc[0], str):
            param = loc[0]
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        path = ".".join(str(part) for part in loc)
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(parts) or "invalid request", param


# --- requests ---------------------------------------------------------------------------------


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class _SamplingRequest(OpenAIBaseModel):
    """Fields shared by both generation requests: OpenAI's, then vLLM's extras."""

    model: str | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # vLLM extras
    top_k: int = Field(0, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"key {key!r} is not a token id (an integer >= 0)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> _SamplingRequest:
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({max_tokens})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """The client's output budget; None: the rest of the context."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _check_sampling_limits(self, limits: RequestLimits, vocab_size: int) -> None:
        stops, stop_ids, bias = self.stop_strings, self.stop_token_ids or [], self.logit_bias or {}
        _check_count(self.n, limits.max_n, "n")
        _check_count(len(stops), limits.max_stop_strings, "stop")
        longest = max(map(len, stops), default=0)
        if longest > limits.max_stop_string_length:
            raise RequestError(
                f"stop: strings may have at most {limits.max_stop_string_length} characters, "
                f"got {longest}",
                "stop",
            )
        _check_count(len(stop_ids), limits.max_stop_token_ids, "stop_token_ids")
        _check_token_ids(stop_ids, vocab_size, "stop_token_ids")
        _check_count(len(bias), limits.max_logit_bias, "logit_bias")
        _check_token_ids((int(key) for key in bias), vocab_size, "logit_bias")

    def _sampling_kwargs(self, max_tokens: int | None) -> dict[str, Any]:
        return dict(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items()),
            seed=self.seed,
            stop=self.stop_strings,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


def _prompt_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list) or not value:
        return None
    return {str: "texts", list: "batch"}.get(type(value[0]), "ids")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `suffix` and `best_of != n` are refused."""

    prompt: Annotated[
        Annotated[str, Tag("text")]
        | Annotated[list[str], Tag("texts")]
        | Annotated[TokenIds, Tag("ids")]
        | Annotated[list[TokenIds], Tag("batch")],
        Discriminator(
            _prompt_kind,
            custom_error_type="invalid_prompt",
            custom_error_message="prompt must be a string, or a non-empty list of strings, "
            "of token ids or of token id lists",
        ),
    ]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(16, ge=0)  # explicit null: the rest of the context
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of != n is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("suffix is not supported")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or its token ids; choice index = prompt * n + sample."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def check_limits(self, limits: RequestLimits, vocab_size: int) -> None:
        """Raise `RequestError` where the request exceeds `limits` or the vocabulary."""
        self._check_sampling_limits(limits, vocab_size)
        prompts = self.prompts
        _check_count(len(prompts), limits.max_prompts, "prompt")
        for prompt in prompts:
            if not isinstance(prompt, str):
                _check_token_ids(prompt, vocab_size, "prompt")

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """`max_tokens`: the caller's budget, from `requested_max_tokens` or the context left."""
        return SamplingParams(
            **self._sampling_kwargs(max_tokens),
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
        )


class ContentPart(OpenAIBaseModel):
    """A message content part; only `{"type": "text", "text": ...}` is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    """A request message. `content` may be null only for the assistant."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind != "text":
                raise ValueError(f"content part type {kind!r} is not supported, only 'text'")
        return value

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError(f"content is required for role {info.data.get('role')!r}")
        return value

    @property
    def text(self) -> str:
        """The content as one string; text parts are joined with newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def template_dict(self) -> dict[str, str]:
        """The message as a chat template sees it."""
        message = {"role": self.role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(OpenAIBaseModel):
    type: str


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. Tools, functions and JSON response formats are refused."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for the next field
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise ValueError(f"response_format type {value.type!r} is not supported, only 'text'")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if value:
            raise ValueError(f"{info.field_name} are not supported")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != "none":
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def check_limits(self, limits: RequestLimits, vocab_size: int) -> None:
        """Raise `RequestError` where the request exceeds `limits` or the vocabulary."""
        self._check_sampling_limits(limits, vocab_size)
        _check_count(len(self.messages), limits.max_messages, "messages")

    def to_sampling_params(self, max_tokens: int | None) -> SamplingParams:
        """`max_tokens`: the caller's budget, from `requested_max_tokens` or the context left."""
        return SamplingParams(
            **self._sampling_kwargs(max_tokens),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


class TokenizeRequest(OpenAIBaseModel):
    """POST /tokenize: exactly one of `prompt` or chat `messages` (vLLM's two requests in one).

    `add_special_tokens` defaults to True for a prompt and False for messages, whose chat
    template adds them.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_special_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("add_special_tokens") is None:
            data = {**data, "add_special_tokens": data.get("messages") is None}
        return data

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        return self

    def check_limits(self, limits: RequestLimits, vocab_size: int) -> None:
        """Raise `RequestError` where the request exceeds `limits`."""
        _check_count(len(self.messages or ()), limits.max_messages, "messages")


class TokenizeResponse(OpenAIBaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[TokenId]

    def check_limits(self, limits: RequestLimits, vocab_size: int) -> None:
        """Raise `RequestError` for token ids outside the vocabulary."""
        _check_token_ids(self.tokens, vocab_size, "tokens")


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


# --- responses --------------------------------------------------------------------------------


def random_id(prefix: str) -> str:
    """A response id, `cmpl-<hex>` or `chatcmpl-<hex>`; the engine's request id too."""
    return f"{prefix}-{uuid.uuid4().hex}"


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


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None  # vLLM: the HTTP status; OpenAI: a string code or null


class ErrorResponse(OpenAIBaseModel):
    """`{"error": {"message", "type", "param", "code"}}`, every key always present."""

    error: ErrorInfo

    @classmethod
    def of(
        cls, message: str, type: str, param: str | None = None, code: int | str | None = None
    ) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "llama-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class CompletionUsage(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class _OmitNullUsage(OpenAIBaseModel):
    """Stream chunks: `usage` is sent on the final usage chunk only (as vLLM does)."""

    @model_serializer(mode="wrap")
    def _omit_null_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage", ...) is None:
            del data["usage"]
        return data


class CompletionLogprobs(OpenAIBaseModel):
    """Legacy completions shape; an echoed first prompt token has null logprobs."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    """A completion choice, in responses and (with null `finish_reason`) in stream chunks."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class CompletionResponse(OpenAIBaseModel):
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


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(OpenAIBaseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionMessage(OpenAIBaseModel):
    """The response message."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: CompletionUsage


class DeltaMessage(OpenAIBaseModel):
    """A stream delta: only the keys that are set are sent (`{}` on the last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(_OmitNullUsage):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: CompletionUsage | None = None


# --- logprob builders: token texts come decoded from the caller, who owns the tokenizer ---------


def _clamp(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf and NaN -> floor


def logprob_token_ids(logprobs: Iterable[TokenLogprob | None]) -> set[int]:
    """Every token id (chosen and alternatives) whose text the builders will look up."""
    ids: set[int] = set()
    for entry in logprobs:
        if entry is not None:
            ids.add(entry.token_id)
            ids.update(token_id for token_id, _ in entry.top)
    return ids


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob | None],
    token_texts: Mapping[int, str],
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The completions shape for `token_ids` (prompt ids first when echoing).

    `text_offset` is the length of the text already returned before the first token; offsets
    run over the token texts. `top_logprobs` holds the chosen token and its alternatives, so up
    to logprobs + 1 entries (vLLM's documented behaviour).
    """
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} logprobs")
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text = token_texts[token_id]
        result.tokens.append(text)
        result.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_clamp(entry.logprob))
        top = {text: _clamp(entry.logprob)}
        for alt_id, alt_logprob in entry.top:
            top.setdefault(token_texts[alt_id], _clamp(alt_logprob))
        result.top_logprobs.append(top)
    return result


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(
    logprobs: Sequence[TokenLogprob], token_texts: Mapping[int, str]
) -> ChatCompletionLogprobs:
    """The chat shape: per token its text, logprob, UTF-8 bytes and top alternatives."""
    content = []
    for entry in logprobs:
        text = token_texts[entry.token_id]
        top = [
            TopLogprob(token=token_texts[i], logprob=_clamp(lp), bytes=_utf8(token_texts[i]))
            for i, lp in entry.top
        ]
        content.append(
            ChatCompletionTokenLogprob(
                token=text, logprob=_clamp(entry.logprob), bytes=_utf8(text), top_logprobs=top
            )
        )
    return ChatCompletionLogprobs(content=content)
