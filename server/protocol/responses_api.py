"""OpenAI's Responses API (POST /v1/responses) for a chat model, as vLLM serves it: the request,
its reading as a chat completion request, and the response object and stream events.

The request becomes a `ChatCompletionRequest` (`chat_request()`): `instructions` the first
system message, `input` items messages (a `function_call` an assistant turn's tool call, a
`function_call_output` a tool message), `tools` and `tool_choice` their chat forms,
`text.format` the response_format, `max_output_tokens` max_completion_tokens. Everything chat
checks is then checked once, in one place; its errors name the Responses field.
Responses are stored for `previous_response_id` only where the server keeps a store
(server/response_store.py); `conversation`, `prompt` and `background` are refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.protocol.base import (
    MAP_CEILING,
    MAX_ITEMS,
    MAX_ITEMS_FIELD,
    OpenAIBaseModel,
    RequestError,
    ResponseModel,
    describe_validation_errors,
)
from server.protocol.logprobs import ChatCompletionTokenLogprob
from server.protocol.requests import (
    ChatCompletionRequest,
    Refused,
    SamplingControls,
    parse_arguments,
)
from server.request import MAX_LOGPROBS

LOGPROBS_INCLUDE = "message.output_text.logprobs"  # `include`'s ask for the answer's logprobs
_TEXT_PARTS = ("input_text", "output_text", "refusal")
# The chat request's fields, as the Responses request names them (for errors)
_FIELD_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                "response_format": "text.format"}


def _named_types(value: Any, allowed: tuple[str, ...], what: str,
                 default: str | None = None) -> Any:
    """Refuse, with a message naming it, a list entry of a type this server does not serve
    (images, files, hosted tools, ...): pydantic's union error would list every variant."""
    for i, entry in enumerate(value if isinstance(value, list) else ()):
        kind = entry.get("type", default) if isinstance(entry, dict) else None
        if isinstance(entry, dict) and kind not in allowed:
            raise ValueError(f"{what} {i} has type {kind!r}, which this server does not "
                             f"support (only {', '.join(map(repr, allowed))})")
    return value


class InputContentPart(OpenAIBaseModel):
    """A text part of an input message: the user's `input_text`, an earlier answer's
    `output_text` or `refusal`."""

    type: Literal["input_text", "output_text", "refusal"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _has_its_text(self) -> InputContentPart:
        key = "refusal" if self.type == "refusal" else "text"
        if getattr(self, key) is None:
            raise ValueError(f"a {self.type!r} content part needs `{key}`")
        return self

    @property
    def content(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


def _text_parts(value: Any) -> Any:
    return _named_types(value, _TEXT_PARTS, "content part")


InputContent = Annotated[list[InputContentPart], MAX_ITEMS_FIELD]


def _joined(content: str | list[InputContentPart]) -> str:
    """Text parts joined with newlines, as chat's content parts are."""
    return content if isinstance(content, str) else "\n".join(p.content for p in content)


class MessageItem(OpenAIBaseModel):
    """A message of the conversation (`type` may be left out). An assistant message still
    `in_progress` or `incomplete` at the end of the input is continued, not answered."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | InputContent
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_parts(value)

    @property
    def text(self) -> str:
        return _joined(self.content)


class FunctionCallItem(OpenAIBaseModel):
    """A call an earlier answer made (as sent back with its output)."""

    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        parse_arguments(value)
        return value


class FunctionCallOutputItem(OpenAIBaseModel):
    """A call's result."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | InputContent

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _text_parts(value)


class ReasoningText(OpenAIBaseModel):
    """A reasoning item's text (in and out)."""

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(OpenAIBaseModel):
    """An earlier answer's thinking, as a client sends its output back (--reasoning-parser):
    its text reaches the chat template as the next assistant turn's `reasoning_content` (a
    template may show it; R1's distills' leave it out). A `summary` or `encrypted_content`,
    which this server never makes, is ignored."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: Annotated[list[ReasoningText], MAX_ITEMS_FIELD] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or ())


_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _item_tag(value: Any) -> str | None:
    """An item's union tag, from its type (a message's may be left out: OpenAI's "easy"
    input message). Hyphenated, so that errors' locations leave it out (base.py). None for
    what is no item (pydantic's error then says so)."""
    if isinstance(value, dict):
        kind = value.get("type", "message")
    else:
        kind = getattr(value, "type", None)
    return f"{kind}-item".replace("_", "-") if isinstance(kind, str) else None


InputItem = Annotated[Annotated[MessageItem, Tag("message-item")]
                      | Annotated[FunctionCallItem, Tag("function-call-item")]
                      | Annotated[FunctionCallOutputItem, Tag("function-call-output-item")]
                      | Annotated[ReasoningItem, Tag("reasoning-item")],
                      Discriminator(_item_tag, custom_error_type="item_type", custom_error_message=(
                          "an input item must be an object: a message, a function_call, a "
                          "function_call_output or a reasoning item"))]


class FunctionTool(OpenAIBaseModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class FunctionToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIBaseModel):
    """`text.format`: plain text, any JSON object, or JSON following `schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a schema")
        return self

    def response_format(self) -> dict[str, Any] | None:
        """Chat's response_format of the same ask."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {
                "name": self.name, "description": self.description, "schema": self.schema_,
                "strict": self.strict}}
        return {"type": "json_object"} if self.type == "json_object" else None


class TextConfig(OpenAIBaseModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # (no effect here)


class ReasoningConfig(OpenAIBaseModel):
    """Echoed; `effort` reaches the chat template as `reasoning_effort` (as vLLM's)."""

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class _OrText:
    """A list field's JSON schema, widened to take text too (a before-validator makes the
    text a list)."""

    def __get_pydantic_json_schema__(self, core_schema: Any,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, handler(core_schema)]}


class ResponsesRequest(SamplingControls):
    """POST /v1/responses. OpenAI's fields, and the sampling controls chat takes (vLLM's
    extras among them: top_k, min_p, seed, stop, repetition_penalty, ...). `include` asks
    for logprobs with LOGPROBS_INCLUDE; its other values name outputs this server never
    makes, and change nothing."""

    model: str | None = None
    # Text (a user's message) or items; read as items (the text one before validation,
    # so that a bad item's error is not a union's of two), published as either
    input: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS), _OrText()]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: Annotated[list[str], MAX_ITEMS_FIELD] | None = None
    tools: Annotated[list[FunctionTool], MAX_ITEMS_FIELD] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1)  # echoed: it counts hosted tools' calls
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True  # kept where the server keeps responses (--responses-store)
    metadata: Annotated[dict[str, str], MAP_CEILING] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    previous_response_id: str | None = None
    background: bool = False
    service_tier: str | None = None
    prompt: Refused = None  # a stored prompt template
    conversation: Refused = None  # a stored conversation, as previous_response_id

    @field_validator("input", mode="before")
    @classmethod
    def _served_items(cls, value: Any) -> Any:
        if isinstance(value, str):  # one item, its type and union errors not the client's
            return [{"role": "user", "content": value}]
        return _named_types(value, _ITEM_TYPES, "input item", "message")

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        return _named_types(value, ("function",), "tool")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(f"tool_choice of type {value.get('type')!r} is not supported "
                             "(only 'none', 'auto', 'required' or a function)")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, value: Any, info: ValidationInfo) -> Any:
        """(Chat checks it too, as the whole request's fault: here it is this field's.)"""
        names = [tool.name for tool in info.data.get("tools") or ()]
        if isinstance(value, FunctionToolChoice) and value.name not in names:
            raise ValueError(f"tool_choice names {value.name!r}, which is not among the tools "
                             f"({', '.join(names) or 'none given'})")
        if value == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool) -> bool:
        if value:
            raise ValueError("background mode is not supported: the answer comes in the "
                             "response, or streamed")
        return value

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    def messages(self, history: Sequence[InputItem] = ()) -> list[dict[str, Any]]:
        """The conversation (the earlier turns' items, `history`, then the input) as chat
        messages: the instructions as a system message first (this request's only: they are
        not carried over, as OpenAI's), a developer's message as the system's (Llama
        templates know no other); calls in the assistant turn before them (its text's, or
        their own), as vLLM joins them; a call's output as a tool message."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        thought = ""  # a reasoning item's text, for the assistant turn after it
        for item in (*history, *self.input):
            if isinstance(item, ReasoningItem):
                thought += item.text
            elif isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": item.text})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":  # its text's turn
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None,
                                     "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "content": _joined(item.output),
                                 "tool_call_id": item.call_id})
            if thought and not isinstance(item, ReasoningItem):  # (the turn it came with)
                if messages[-1]["role"] == "assistant":
                    messages[-1].setdefault("reasoning_content", thought)
                thought = ""
        if not messages:
            raise RequestError("input holds no message to answer (reasoning items alone)",
                               "input")
        return messages

    @property
    def continues_answer(self) -> bool:
        """The input ends with an unfinished answer of the assistant's: continue it."""
        last = self.input[-1]
        return (isinstance(last, MessageItem) and last.role == "assistant"
                and last.status in ("in_progress", "incomplete"))

    def chat_request(self, history: Sequence[InputItem] = ()) -> ChatCompletionRequest:
        """The same ask as a chat completion request, after the earlier turns' items
        (`history`); a RequestError names this request's field where chat's checks fail."""
        tool_choice: Any = self.tool_choice
        if isinstance(tool_choice, FunctionToolChoice):
            tool_choice = {"type": "function", "function": {"name": tool_choice.name}}
        elif tool_choice == "auto" and not self.tools:  # (OpenAI's default: no tools, no ask)
            tool_choice = None
        fmt = self.text.format if self.text is not None else None
        body: dict[str, Any] = {
            "model": self.model, "messages": self.messages(history),
            "max_completion_tokens": self.max_output_tokens,
            "logprobs": self.wants_logprobs,
            "top_logprobs": self.top_logprobs if self.wants_logprobs else None,
            "tools": [{"type": "function", "function": tool.model_dump(
                exclude={"type"}, exclude_none=True)} for tool in self.tools or ()] or None,
            "tool_choice": tool_choice, "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": fmt.response_format() if fmt is not None else None,
            "user": self.user,
            "add_generation_prompt": not self.continues_answer,
            "continue_final_message": self.continues_answer,
            **self.model_dump(include=set(SamplingControls.model_fields), by_alias=True)}
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["chat_template_kwargs"] = {"reasoning_effort": self.reasoning.effort}
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise as_responses_error(RequestError(*describe_validation_errors(e.errors()))
                                     ) from None


def as_responses_error(error: RequestError) -> RequestError:
    """A chat request's error, naming the Responses request's fields instead (chat's
    messages name max_tokens for the budget, and start with the field at fault)."""
    message = str(error)
    for chat_name, name in (("response_format", "text.format"),
                            ("max_completion_tokens", "max_output_tokens"),
                            ("max_tokens", "max_output_tokens")):
        message = message.replace(chat_name, name)
    if message.startswith("messages"):
        message = "input" + message.removeprefix("messages")
    return RequestError(message, _FIELD_NAMES.get(error.param or "", error.param))


# ---------------------------------------------------------------------- what is sent back


class OutputText(ResponseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[ChatCompletionTokenLogprob] | None = None  # chat's: the same fields


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)

    def as_input(self) -> MessageItem:
        """The message as a later turn's input holds it."""
        return MessageItem(role="assistant", content="".join(p.text for p in self.content),
                           status=self.status)


class OutputFunctionCall(ResponseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"

    def as_input(self) -> FunctionCallItem:
        """The call as a later turn's input holds it."""
        return FunctionCallItem(type="function_call", call_id=self.call_id, name=self.name,
                                arguments=self.arguments)


class OutputReasoning(ResponseModel):
    """The answer's thinking (--reasoning-parser), as vLLM gives it: its text as one
    reasoning_text part, no summary."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus = "in_progress"

    def as_input(self) -> ReasoningItem:
        return ReasoningItem(type="reasoning", id=self.id, content=self.content,
                             status=self.status)


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(ResponseModel):
    cached_tokens: int = 0


class OutputTokensDetails(ResponseModel):
    reasoning_tokens: int = 0


class ResponseUsage(ResponseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, input_tokens: int, output_tokens: int, cached_tokens: int) -> ResponseUsage:
        return cls(input_tokens=input_tokens, output_tokens=output_tokens,
                   total_tokens=input_tokens + output_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=cached_tokens))


class IncompleteDetails(ResponseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


ResponseStatus = Literal["in_progress", "completed", "incomplete", "cancelled"]


class ResponseObject(ResponseModel):
    """The response: its output items, usage, and the request's settings echoed (the
    sampling ones as applied: temperature and top_p after the model's defaults, the output
    budget the engine gave it)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: ResponseStatus = "in_progress"
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    service_tier: str = "default"
    store: bool = False
    background: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None

    @property
    def item_status(self) -> ItemStatus:
        """Its items' status, once it has finished."""
        return "completed" if self.status == "completed" else "incomplete"


class ListedItem(ResponseModel):
    """An input item as GET /v1/responses/{id}/input_items lists it (OpenAI's ResponseItem):
    its id, its type's fields, content as typed parts."""

    id: str
    type: Literal["message", "function_call", "function_call_output", "reasoning"]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    summary: list[Any] | None = Field(default=None, exclude_if=lambda v: v is None)
    role: str | None = None
    content: list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    @classmethod
    def of(cls, item: InputItem, item_id: str) -> ListedItem:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = ([{"type": kind, "text": item.content}] if isinstance(item.content, str)
                     else [p.model_dump(exclude_none=True) for p in item.content])
            if kind == "output_text":  # (OpenAI's output_text parts carry annotations)
                parts = [{**part, "annotations": []} if part["type"] == "output_text" else part
                         for part in parts]
            return cls(id=item_id, type="message", role=item.role, content=parts,
                       status=item.status or "completed")
        if isinstance(item, FunctionCallItem):
            return cls(id=item_id, type="function_call", call_id=item.call_id, name=item.name,
                       arguments=item.arguments)
        if isinstance(item, ReasoningItem):
            return cls(id=item_id, type="reasoning", summary=item.summary,
                       content=[part.model_dump() for part in item.content or ()],
                       status=item.status or "completed")
        return cls(id=item_id, type="function_call_output", call_id=item.call_id,
                   output=_joined(item.output))


class InputItemList(ResponseModel):
    """GET /v1/responses/{id}/input_items: a page of the items, as OpenAI's cursor pages."""

    object: Literal["list"] = "list"
    data: list[ListedItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(ResponseModel):
    """DELETE /v1/responses/{id}'s answer."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True
