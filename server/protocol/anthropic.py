"""Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens bodies, and
the message objects, stream events and errors they answer with. Not OpenAI's: Anthropic's
shapes, for clients built on its SDKs (Claude Code among them), as vLLM and llama.cpp serve
them.

A request is read as a chat completion (`chat_request()`), as the Responses API's is: the
system prompt a system message, `tool_use` blocks an assistant's tool calls, `tool_result`
blocks tool messages, `tools` functions, `tool_choice` chat's. A last assistant turn is a
prefill the answer continues, as Anthropic's API continues it. What a text model cannot
read (images, documents, server tools) is a 400; a thinking block's text reaches the
template as the assistant turn's reasoning_content, and `thinking` asks nothing a model may
not decline (under --reasoning-parser its "disabled" leaves the answer's thinking out).
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError

from server.protocol.base import (
    MAX_ITEMS_FIELD,
    OpenAIBaseModel,
    RequestError,
    ResponseModel,
    describe_validation_errors,
)
from server.protocol.requests import ChatCompletionRequest

# Anthropic's error types, by HTTP status (what its SDKs read)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`, Anthropic's error."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def new_id(prefix: str) -> str:
    """Anthropic's ids: "msg_..." for a message, "toolu_..." for a tool call."""
    return f"{prefix}_{secrets.token_hex(12)}"


# ---------------------------------------------------------------------- what is sent


class TextBlock(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(OpenAIBaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(OpenAIBaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | Annotated[list[TextBlock], MAX_ITEMS_FIELD] | None = None
    is_error: bool = False

    @property
    def text(self) -> str:
        content = self.content
        # (is_error has no place in chat's tool message: left out, as vLLM and llama.cpp do)
        return content if isinstance(content, str) else "\n".join(
            block.text for block in content or ())


class ThinkingBlock(OpenAIBaseModel):
    """A thinking block in the history: its text reaches the chat template as the assistant
    turn's reasoning_content (R1's distills' template leaves it out); a signature, or a
    redacted block's data, is ignored."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""


class UnreadableBlock(OpenAIBaseModel):
    """An image, a document, a search result: refused (a text model)."""

    type: str


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind in ("text", "tool_use", "tool_result"):
        return kind
    return "thinking" if kind in ("thinking", "redacted_thinking") else "other"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")] | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[UnreadableBlock, Tag("other")],
    Discriminator(_block_kind)]


class InputMessage(OpenAIBaseModel):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], MAX_ITEMS_FIELD]

    def blocks(self) -> list[Any]:
        return [TextBlock(type="text", text=self.content)] if isinstance(
            self.content, str) else list(self.content)


class Tool(OpenAIBaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    type: str | None = None  # "custom" (or none): a function; others are Anthropic's tools


class ToolChoice(OpenAIBaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class OutputFormat(OpenAIBaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIBaseModel):
    format: OutputFormat | None = None


class Metadata(OpenAIBaseModel):
    user_id: str | None = None


class CountTokensRequest(OpenAIBaseModel):
    """POST /v1/messages/count_tokens: the prompt a message request would have."""

    model: str
    messages: Annotated[list[InputMessage], Field(min_length=1), MAX_ITEMS_FIELD]
    system: str | Annotated[list[TextBlock], MAX_ITEMS_FIELD] | None = None
    tools: Annotated[list[Tool], MAX_ITEMS_FIELD] | None = None
    tool_choice: ToolChoice | None = None
    # Anthropic's extended thinking: a reasoning model's thinking comes as a thinking block
    # under --reasoning-parser, at most budget_tokens long (the end tag is forced after
    # them: vLLM's thinking_token_budget); {"type": "disabled"} leaves it out
    # (include_reasoning false). Without a parser there is no thinking to bound.
    thinking: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra

    def chat_messages(self) -> list[dict[str, Any]]:
        """Chat's messages: the system prompt's, then each turn's (tool results first as
        tool messages, as vLLM orders them, then its text; an assistant's calls beside its
        text)."""
        out: list[dict[str, Any]] = []
        system = self.system
        if system:
            out.append({"role": "system", "content": system if isinstance(system, str)
                        else "".join(block.text for block in system)})
        for i, message in enumerate(self.messages):
            texts, calls, thoughts = [], [], []
            for j, block in enumerate(message.blocks()):
                where = f"messages.{i}.content.{j}"
                if isinstance(block, ThinkingBlock):
                    thoughts.append(block.thinking)
                elif isinstance(block, TextBlock):
                    texts.append(block.text)
                elif isinstance(block, ToolUseBlock):
                    if message.role != "assistant":
                        raise RequestError(f"{where}: tool_use blocks belong to assistant "
                                           "turns", "messages")
                    calls.append({"id": block.id, "type": "function", "function": {
                        "name": block.name, "arguments": json.dumps(block.input)}})
                elif isinstance(block, ToolResultBlock):
                    if message.role != "user":
                        raise RequestError(f"{where}: tool_result blocks belong to user "
                                           "turns", "messages")
                    out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                "content": block.text})
                elif isinstance(block, UnreadableBlock):
                    raise RequestError(f"{where}: {block.type} blocks are not supported: "
                                       "this model reads text", "messages")
            text = "".join(texts)
            # (an assistant turn of nothing, as Anthropic allows last: no prefill, no turn)
            if calls or text or (message.role == "user"
                                 and not isinstance(message.content, list)):
                turn: dict[str, Any] = {"role": message.role, "content": text}
                if calls:
                    turn["tool_calls"] = calls
                if message.role == "assistant" and "".join(thoughts):
                    turn["reasoning_content"] = "".join(thoughts)
                out.append(turn)
        return out

    def chat_fields(self) -> dict[str, Any]:
        tools = []
        for tool in self.tools or ():
            if tool.type not in (None, "custom"):
                raise RequestError(f"tools: {tool.type!r} is one of Anthropic's own tools, "
                                   "which this server does not run: give a custom tool "
                                   "(name, description, input_schema)", "tools")
            tools.append({"type": "function", "function": {
                "name": tool.name, "description": tool.description,
                "parameters": {"type": "object", **tool.input_schema}}})
        choice, parallel = self.tool_choice, None
        chat_choice: Any = None
        if choice is not None:
            if choice.type == "tool" and not choice.name:
                raise RequestError("tool_choice: type 'tool' needs the tool's name",
                                   "tool_choice")
            chat_choice = {"auto": "auto", "any": "required", "none": "none"}.get(
                choice.type) or {"type": "function", "function": {"name": choice.name}}
            parallel = False if choice.disable_parallel_tool_use else None
        if tools and chat_choice is None:
            chat_choice = "auto"  # (Anthropic's default with tools)
        messages = self.chat_messages()
        # A last assistant turn of text is a prefill: the answer goes on from it
        prefill = (bool(messages) and messages[-1]["role"] == "assistant"
                   and "tool_calls" not in messages[-1])
        return {
            "model": self.model, "messages": messages, "tools": tools or None,
            "tool_choice": chat_choice, "parallel_tool_calls": parallel,
            "add_generation_prompt": not prefill, "continue_final_message": prefill,
            "chat_template_kwargs": self.chat_template_kwargs,
            "include_reasoning": (self.thinking or {}).get("type") != "disabled",
            "thinking_token_budget": self.thinking_budget(),
        }

    def thinking_budget(self) -> int | None:
        """`thinking`'s budget_tokens where thinking is enabled (which requires one, as
        Anthropic's API does)."""
        thinking = self.thinking or {}
        if thinking.get("type") != "enabled":
            return None
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise RequestError("thinking.enabled.budget_tokens: an integer >= 0 is required",
                               "thinking.budget_tokens")
        return budget

    def chat_request(self) -> ChatCompletionRequest:
        return _validated(self.chat_fields())


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]],
                              MAX_ITEMS_FIELD] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    service_tier: str | None = None  # (one tier here)

    def chat_request(self) -> ChatCompletionRequest:
        budget = self.thinking_budget()
        if budget is not None and budget >= self.max_tokens:  # (Anthropic's rule)
            raise RequestError("`max_tokens` must be greater than `thinking.budget_tokens`",
                               "max_tokens")
        fmt = self.output_config.format if self.output_config else None
        return _validated({
            **self.chat_fields(), "max_completion_tokens": self.max_tokens,
            "stop": self.stop_sequences, "stream": self.stream,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "user": self.metadata.user_id if self.metadata else None,
            "response_format": None if fmt is None else {
                "type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}},
        })


_CHAT_NAMES = (("max_completion_tokens", "max_tokens"), ("response_format", "output_config"))


def as_messages_error(error: RequestError) -> RequestError:
    """A chat request's error, naming the Messages request's fields instead."""
    message = str(error)
    for chat_name, name in _CHAT_NAMES:
        message = message.replace(chat_name, name)
    if message.startswith("stop:"):
        message = "stop_sequences" + message.removeprefix("stop")
    message = message.replace("tool_choice 'required'", "tool_choice 'any'")
    param = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences",
             "response_format": "output_config"}.get(error.param or "", error.param)
    return RequestError(message, param)


def _validated(body: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise as_messages_error(RequestError(*describe_validation_errors(e.errors()))
                                ) from None


# ---------------------------------------------------------------------- what is sent back

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextOut(ResponseModel):
    type: Literal["text"] = "text"
    text: str = ""


class ThinkingOut(ResponseModel):
    """The answer's thinking (--reasoning-parser): no signature, as none is checked here."""

    type: Literal["thinking"] = "thinking"
    thinking: str = ""
    signature: str = ""


class ToolUseOut(ResponseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class Usage(ResponseModel):
    """input_tokens are those computed: the prompt's tokens read from the prefix cache are
    cache_read_input_tokens (Anthropic's total input is the sum)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class AnthropicMessage(ResponseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ThinkingOut | TextOut | ToolUseOut] = Field(default_factory=list)
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(ResponseModel):
    input_tokens: int
