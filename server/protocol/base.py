"""What every API model shares: `OpenAIBaseModel`, per-server limits, OpenAI's error body.

Unknown fields are ignored and logged, `null` means the default, text must be valid Unicode.
Limits that depend on server configuration raise `RequestError`, which `app.py` maps to a 400
naming the field. Imports nothing else of the package.
"""

from __future__ import annotations

import logging
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

logger = logging.getLogger(__name__)

# Every list (and map) of a request has this ceiling, which pydantic checks before any item:
# a 4 MB body of 2 million invalid items was 2 million errors and 15 s of the event loop. The
# per-request limits (RequestLimits, far lower) then give the precise message.
MAX_ITEMS = 4096
MAX_ITEMS_FIELD = Field(max_length=MAX_ITEMS)


def _map_ceiling(value: Any) -> Any:
    """MAX_ITEMS for a map, checked first (pydantic checks a dict's length after its items)."""
    if isinstance(value, dict) and len(value) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} entries allowed, got {len(value)}")
    return value


MAP_CEILING = BeforeValidator(_map_ceiling)
TokenId = Annotated[int, Field(ge=0)]
_TOKEN_ID = TypeAdapter(TokenId)


def _token_ids(value: Any) -> Any:
    """Token-id lists may be as long as a context, so they get no ceiling: they are checked in
    one pass that stops at the first bad id (one error, not one per item). What is not a
    plain int is validated as pydantic would (5.0 and "5" are 5, as in vLLM), but for
    booleans, which pydantic would take as 0 and 1: `true` is no token id."""
    if not isinstance(value, list):
        return value
    converted = None
    for i, token_id in enumerate(value):
        if type(token_id) is int and token_id >= 0:
            continue
        if isinstance(token_id, bool):
            raise ValueError(f"token id at index {i}: a boolean is not a token id")
        try:
            token_id = _TOKEN_ID.validate_python(token_id)
        except ValidationError as e:
            raise ValueError(f"token id at index {i}: {e.errors()[0]['msg']}") from None
        if converted is None:
            converted = list(value)
        converted[i] = token_id
    return value if converted is None else converted


# The items are checked again by pydantic (fast, and never failing): that keeps the schema's
# `minimum: 0`.
TokenIdList = Annotated[list[TokenId], BeforeValidator(_token_ids)]


def _admits_none(annotation: Any) -> bool:
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_none(arg) for arg in typing.get_args(annotation))
    return False


def _check_unicode(value: Any) -> None:
    """Refuse lone surrogates: JSON can carry "\\ud800", but it is no text a tokenizer (or a
    JSON response echoing it) can encode. A loop, not recursion: a body nested a thousand
    levels deep must not exhaust the stack (RecursionError became a 500)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (found a lone surrogate)") from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


class OpenAIBaseModel(BaseModel):
    """Base of every request model: unknown fields are ignored and logged (vLLM
    `OpenAIBaseModel`). Responses use `ResponseModel`.

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


class ResponseModel(BaseModel):
    """Base of the bodies and chunks the server sends. Built from values already checked,
    so without OpenAIBaseModel's cleaning of client input: that validator ran on every
    streamed chunk and was a fifth of the event loop's time per token at 32 streams."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class RequestError(ValueError):
    """A request refused under the server's configured limits; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
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


MAX_REPORTED_ERRORS = 5


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """OpenAI's (message, param) from pydantic's `errors()`; FastAPI's leading "body" dropped.

    `param` is the top-level field of the first error, None for whole-request errors. Only the
    first few errors are described: a list of 100000 bad ids must not become a 6 MB answer.
    """
    parts: list[str] = []
    param: str | None = None
    for i, error in enumerate(errors[:MAX_REPORTED_ERRORS]):
        loc = list(error.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        if error.get("type") == "json_invalid":  # loc holds the offset into the body
            reason = (error.get("ctx") or {}).get("error", "")
            return f"the body is not valid JSON: {reason} (at character {loc[0]})", None
        if not loc and error.get("type") == "missing":
            return "the request needs a JSON body", None
        # Which member of a union failed is pydantic's business, not the client's
        loc = [part for part in loc if not _union_member(part)]
        if i == 0 and loc and isinstance(loc[0], str):
            param = loc[0]
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        path = ".".join(str(part) for part in loc)
        parts.append(f"{path}: {msg}" if path else msg)
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    return "; ".join(parts) or "invalid request", param


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
# pydantic's schema names: "constrained-str", "function-wrap[...]", "list[...]"
_SCHEMA_TAG = re.compile(r"[a-z]+(-[a-z]+)+|[a-z-]+\[.*\]")


def _union_member(part: Any) -> bool:
    """A union member's tag in an error's location ("str", "list[function-wrap[...]]")."""
    return isinstance(part, str) and (part in _TYPE_TAGS or bool(_SCHEMA_TAG.fullmatch(part)))


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None  # OpenAI's: a string code ("model_not_found") or null


class ErrorResponse(ResponseModel):
    """`{"error": {"message", "type", "param", "code"}}`, every key always present."""

    error: ErrorInfo

    @classmethod
    def of(
        cls, message: str, type: str, param: str | None = None, code: str | None = None
    ) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))
