"""OpenAI's generation requests: POST /v1/completions and POST /v1/chat/completions.

Requests check ranges with `Field` constraints and validators (a `ValidationError` is a 400);
limits that depend on server configuration are checked by `check_limits()`, which raises
`RequestError`; `to_sampling_params()` maps a request onto the engine's `SamplingParams`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from server.config import GenerationDefaults
from server.guided.spec import GuideSpec
from server.protocol.base import (
    MAP_CEILING,
    MAX_ITEMS,
    MAX_ITEMS_FIELD,
    OpenAIBaseModel,
    RequestError,
    RequestLimits,
    TokenIdList,
    _check_count,
    _check_token_ids,
)
from server.request import MAX_LOGPROBS, SamplingParams

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,18}")  # fits an int64; int() refuses > 4300 digits

TokenIds = Annotated[TokenIdList, Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1)]
MAX_BAD_WORDS = 256
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], MAP_CEILING]
NO_DEFAULTS = GenerationDefaults()  # --generation-config vllm: the neutral ones


# Fields of vLLM's requests that this server does not implement. Unknown fields are ignored
# (as vLLM ignores them); these are refused instead, with a 400 naming the field, whenever
# they ask for something (a value other than null, false or empty): a vLLM user sending one
# means it, and a silent default would answer a different question.
def _refuse(value: Any) -> Any:
    neutral = value is None or value is False or (isinstance(value, list | dict | str)
                                                  and not value)
    if not neutral:  # 0 asks for something (a width of none, a seed of 0)
        raise ValueError("not supported by this server")  # the message names the field
    return value


Refused = Annotated[SkipJsonSchema[Any], AfterValidator(_refuse)]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk too


class JsonSchemaFormat(OpenAIBaseModel):
    """response_format's `json_schema`: OpenAI's structured outputs (`strict` changes nothing
    here: the output always follows the schema as far as it is supported)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    # llama.cpp's server's: `{"type": "json_object", "schema": {...}}` asks for the schema's
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self


class StructuredOutputs(OpenAIBaseModel):
    """vLLM's `structured_outputs`: one of a JSON schema, a regex, choices, a grammar (GBNF)
    or any JSON object."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], MAX_ITEMS_FIELD] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: Refused = None

    def specs(self) -> list[GuideSpec]:
        field = "structured_outputs"
        specs = _guide_specs(self.json_, self.regex, self.choice, f"{field}.", self.grammar)
        if self.json_object:
            specs.append(GuideSpec("json_object", None, f"{field}.json_object"))
        if not specs:
            raise RequestError(f"{field} must give one of json, regex, choice, grammar or "
                               "json_object", field)
        return specs


def _guide_specs(schema: dict[str, Any] | bool | str | None, regex: str | None,
                 choice: list[str] | None, prefix: str, grammar: str | None
                 ) -> list[GuideSpec]:
    """The constraints given in one place (vLLM's fields json, regex, choice, grammar,
    named `prefix` + the field: "guided_json", "structured_outputs.json")."""
    specs = []
    if grammar:  # (llama.cpp's clients send "" for none)
        specs.append(GuideSpec("grammar", grammar, f"{prefix}grammar"))
    if schema is not None:
        if isinstance(schema, str):  # vLLM takes the schema as JSON text too
            try:
                schema = json.loads(schema)
            except ValueError:
                raise RequestError(f"{prefix}json is not valid JSON", f"{prefix}json") from None
        specs.append(GuideSpec("json", schema, f"{prefix}json"))
    if regex is not None:
        specs.append(GuideSpec("regex", regex, f"{prefix}regex"))
    if choice is not None:
        if not choice or not all(choice):
            raise RequestError(f"{prefix}choice must be a list of non-empty strings",
                               f"{prefix}choice")
        specs.append(GuideSpec("choice", choice, f"{prefix}choice"))
    return specs


class PromptTruncation(OpenAIBaseModel):
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens; -1: the last
    max_model_len (prompt_tokens_kept)."""

    truncate_prompt_tokens: int | None = Field(None, ge=-1)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be an integer >= 1, or -1 for the model's context length")
        return value

    def prompt_tokens_kept(self, max_model_len: int) -> int | None:
        """How many of the prompt's last tokens truncate_prompt_tokens keeps (None: all)."""
        keep = self.truncate_prompt_tokens
        return max_model_len if keep == -1 else keep

    def _check_truncation(self, max_model_len: int) -> None:
        keep = self.truncate_prompt_tokens
        if keep is not None and keep > max_model_len:
            raise RequestError(  # vLLM's answer too, whatever the prompt's length
                f"truncate_prompt_tokens ({keep}) is greater than max_model_len "
                f"({max_model_len}): select a smaller truncation size", "truncate_prompt_tokens")


class SamplingControls(OpenAIBaseModel):
    """The sampling fields every generation request takes (the Responses API's too):
    OpenAI's, then vLLM's extras. Those left out (None) take the model's defaults
    (GenerationDefaults), else the neutral ones: temperature 1, top_p 1, top_k off, min_p 0,
    repetition_penalty 1."""

    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: StopString | Annotated[list[StopString], MAX_ITEMS_FIELD] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    # vLLM's; checked every step for every word: at most MAX_BAD_WORDS
    bad_words: Annotated[list[StopString], Field(max_length=MAX_BAD_WORDS)] | None = None
    # Guided decoding (vLLM's): structured_outputs (and, on completions and chat, the older
    # guided_* fields)
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise ValueError(f"key {key!r} is not a token id (an integer >= 0)")
        return value


class _SamplingRequest(PromptTruncation, SamplingControls):
    """Fields shared by both generation requests besides the sampling controls."""

    model: str | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop_token_ids: TokenIdList | None = None
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    allowed_token_ids: TokenIds | None = None  # vLLM's: sample only these
    # vLLM's: each prompt token's logprob and rank, and its k likeliest alternatives (not
    # streamed, as in vLLM)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], MAX_ITEMS_FIELD] | None = None
    guided_grammar: str | None = None
    # llama.cpp's server's: a GBNF grammar, a JSON schema
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    guided_whitespace_pattern: Refused = None  # JSON's whitespace here is fixed: [ ]?
    logits_processors: Refused = None
    # vLLM's beam search: n beams (server/beam_search.py), ranked by logprob / length **
    # length_penalty
    use_beam_search: bool = False
    length_penalty: float = 1.0
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:<id>" (vLLM's)

    def _check_beam_search(self) -> None:
        """What beam search cannot honour is refused, not ignored (vLLM ignores it): it ranks
        whole sequences by their raw logprobs, under no constraint; the sampling controls
        (temperature, top_p, penalties, seed) have nothing to act on and are left be."""
        if self.n > MAX_LOGPROBS // 2:  # each beam asks for its 2n likeliest next tokens
            raise RequestError(f"use_beam_search takes at most {MAX_LOGPROBS // 2} beams (n), "
                               f"got {self.n}", "n")
        if self.requested_max_tokens == 0:  # (a search of no steps answers no beams)
            raise RequestError("max_tokens 0 is not supported with use_beam_search",
                               "max_tokens")
        for name in ("stop", "stop_token_ids", "bad_words", "logit_bias", "allowed_token_ids",
                     "min_tokens", "echo", "prompt_logprobs"):
            if getattr(self, name, None):  # (echo: completions')
                raise RequestError(f"{name} is not supported with use_beam_search", name)
        if (spec := self.guide_spec()) is not None:
            raise RequestError(f"{spec.field}: a constraint is not supported with "
                               "use_beam_search", spec.field)
        if getattr(self, "thinking_token_budget", None) not in (None, -1):  # (chat's)
            raise RequestError("thinking_token_budget is not supported with use_beam_search",
                               "thinking_token_budget")

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and info.data.get("stream"):  # (0 is let through, as vLLM lets it)
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    def guide_spec(self) -> GuideSpec | None:
        """What the output must follow (response_format json_object / json_schema, vLLM's
        structured_outputs or guided_*, llama.cpp's grammar or json_schema), or None; at most
        one may be given."""
        specs = _guide_specs(self.guided_json, self.guided_regex, self.guided_choice, "guided_",
                             self.guided_grammar)
        if self.grammar:  # llama.cpp's two
            specs.append(GuideSpec("grammar", self.grammar, "grammar"))
        if self.json_schema is not None:
            specs.append(GuideSpec("json", self.json_schema, "json_schema"))
        if self.structured_outputs is not None:
            specs += self.structured_outputs.specs()
        rf = self.response_format
        if rf is not None and rf.type == "json_object":  # (llama.cpp's may hold a schema)
            specs.append(GuideSpec("json_object", None, "response_format") if rf.schema_ is None
                         else GuideSpec("json", rf.schema_, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None  # (the validator)
            specs.append(GuideSpec("json", rf.json_schema.schema_, "response_format"))
        if len(specs) > 1:
            raise RequestError(f"only one constraint may be given, got {specs[0].field} and "
                               f"{specs[1].field}", specs[1].field)
        return specs[0] if specs else None

    @property
    def requested_max_tokens(self) -> int | None:
        """The client's output budget; None: the rest of the context."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk carries the usage so far (vLLM's; with include_usage only)."""
        options = self.stream_options
        return self.include_usage and options is not None and options.continuous_usage_stats

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def _check_sampling_limits(self, limits: RequestLimits, vocab_size: int,
                               max_model_len: int) -> None:
        stops, stop_ids, bias = self.stop_strings, self.stop_token_ids or [], self.logit_bias or {}
        if self.use_beam_search:
            self._check_beam_search()
        _check_count(self.n, limits.max_n, "n")
        self._check_truncation(max_model_len)
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                               f"({max_tokens})", "min_tokens")
        check_stops(stops, limits)
        _check_count(len(stop_ids), limits.max_stop_token_ids, "stop_token_ids")
        _check_token_ids(stop_ids, vocab_size, "stop_token_ids")
        _check_count(len(bias), limits.max_logit_bias, "logit_bias")
        _check_token_ids((int(key) for key in bias), vocab_size, "logit_bias")
        _check_token_ids(self.allowed_token_ids or [], vocab_size, "allowed_token_ids")

    def _sampling_kwargs(self, max_tokens: int | None,
                         defaults: GenerationDefaults) -> dict[str, Any]:
        """SamplingParams' fields, with `defaults` for the sampling controls left out."""
        def pick(name: str, neutral: float) -> Any:
            value = getattr(self, name)
            if value is None:
                value = getattr(defaults, name)
            return neutral if value is None else value

        return dict(
            n=self.n,
            max_tokens=max_tokens,
            default_max_tokens=defaults.max_tokens,
            min_tokens=self.min_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=max(pick("top_k", 0), 0),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items()),
            allowed_token_ids=tuple(dict.fromkeys(self.allowed_token_ids or ())),
            seed=self.seed,
            stop=self.stop_strings,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


def check_stops(stops: Sequence[str], limits: RequestLimits, param: str = "stop") -> None:
    """At most max_stop_strings stop strings, none longer than max_stop_string_length."""
    _check_count(len(stops), limits.max_stop_strings, param)
    longest = max(map(len, stops), default=0)
    if longest > limits.max_stop_string_length:
        raise RequestError(f"{param}: strings may have at most "
                           f"{limits.max_stop_string_length} characters, got {longest}", param)


def _prompt_kind(value: Any) -> str | None:
    """The prompt's shape, as a tag error messages leave out (hyphenated, like pydantic's)."""
    if isinstance(value, str):
        return "prompt-text"
    if not isinstance(value, list) or not value:
        return None
    return {str: "prompt-texts", list: "prompt-batch"}.get(type(value[0]), "prompt-ids")


def prompt_input(field: str) -> Any:
    """The type of a prompt field (completions' `prompt`, embeddings' `input`): a text, a
    list of texts, token ids or a list of token id lists."""
    return Annotated[
        Annotated[str, Tag("prompt-text")]
        | Annotated[list[str], MAX_ITEMS_FIELD, Tag("prompt-texts")]
        | Annotated[TokenIds, Tag("prompt-ids")]
        | Annotated[list[TokenIds], MAX_ITEMS_FIELD, Tag("prompt-batch")],
        Discriminator(
            _prompt_kind,
            custom_error_type="invalid_prompt",
            custom_error_message=f"{field} must be a string, or a non-empty list of strings, "
            "of token ids or of token id lists",
        ),
    ]


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt field's prompts, one entry each: a text or its token ids."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)


CompletionPrompt = prompt_input("prompt")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `best_of != n` is refused; a `suffix` makes the prompt a
    fill-in-the-middle one (model/infill.py), where the model has the tokens."""

    prompt: CompletionPrompt
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(16, ge=0)  # explicit null: the rest of the context
    suffix: str | None = None  # fill in the middle: the text after it (model/infill.py)
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS before a text prompt

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of != n is not supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or its token ids; choice index = prompt * n + sample."""
        return prompt_list(self.prompt)

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` where the request exceeds `limits`, the vocabulary or the
        context."""
        self._check_sampling_limits(limits, vocab_size, max_model_len)
        prompts = self.prompts
        _check_count(len(prompts), limits.max_prompts, "prompt")
        for prompt in prompts:
            if not isinstance(prompt, str):
                _check_token_ids(prompt, vocab_size, "prompt")

    @property
    def shown_prompt_logprobs(self) -> int | None:
        """prompt_logprobs' width, as vLLM's: as asked, or, with echo, logprobs' (vLLM's
        default); None: none shown (nor streamed)."""
        if self.stream:
            return None
        return self.prompt_logprobs if self.prompt_logprobs is not None else (
            self.logprobs if self.echo else None)

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token the engine must find: the echo's (logprobs)
        and prompt_logprobs', the larger; None: no prompt logprobs."""
        echoed = self.logprobs if self.echo else None
        shown = self.shown_prompt_logprobs
        return echoed if shown is None else max(shown, echoed or 0)

    def to_sampling_params(self, defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
        """The engine's parameters, with `defaults` for what the request leaves out;
        max_tokens None is filled in once the prompt's length is known (SamplingParams)."""
        return SamplingParams(
            **self._sampling_kwargs(self.requested_max_tokens, defaults),
            logprobs=self.logprobs,
            prompt_logprobs=self.engine_prompt_logprobs,
        )


class ContentPart(OpenAIBaseModel):
    """A message content part: text, or an assistant's refusal (OpenAI's; its text is the
    refusal, as vLLM reads it). Images, audio and files are not supported."""

    type: Literal["text", "refusal"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _has_its_text(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} content part needs `{self.type}`")
        return self

    @property
    def content(self) -> str:
        return (self.text if self.type == "text" else self.refusal) or ""


ContentParts = Annotated[list[ContentPart], MAX_ITEMS_FIELD]


def parse_arguments(text: str) -> dict[str, Any]:
    """A call's arguments, sent as JSON text: an object ("" for none)."""
    try:
        parsed = json.loads(text) if text.strip() else {}
    except ValueError:
        raise ValueError("arguments must be JSON text") from None
    except RecursionError:  # nesting inside a string escapes the body parser's limit
        raise ValueError("arguments are nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ValueError("arguments must be a JSON object")
    return parsed


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str | dict[str, Any] = Field("", validate_default=True)  # OpenAI's: JSON text

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str | dict[str, Any]) -> dict[str, Any]:
        """Parsed, as vLLM hands them to templates (Llama 3.1's writes them out again)."""
        return value if isinstance(value, dict) else parse_arguments(value)


class ToolCall(OpenAIBaseModel):
    """A call an earlier assistant turn made: history for the template, as vLLM passes it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIBaseModel):
    """A request message. `content` may be null only for the assistant. Any role a template
    knows may come (Llama 3.1's `ipython`), as vLLM takes them; an assistant turn's
    `tool_calls` and reasoning, and a tool result's `tool_call_id`, reach the template."""

    role: str = Field(min_length=1, max_length=64)
    content: str | ContentParts | None = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], MAX_ITEMS_FIELD] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
            if kind not in ("text", "refusal"):
                raise ValueError(f"content part type {kind!r} is not supported, only 'text' "
                                 f"(and an assistant's 'refusal')")
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
        return "\n".join(part.content for part in self.content)

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template sees it (the fields given, and `content`)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text}
        for key in ("name", "tool_call_id", "reasoning_content", "reasoning"):
            if (value := getattr(self, key)) is not None:
                message[key] = value
        if self.tool_calls is not None:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64)  # OpenAI's pattern is not vLLM's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def _check_refs(node: Any, tool: str) -> None:
    """Only "#/$defs/..." and "#/definitions/..." refs survive a tool's parameters moving
    into the list of calls (tool_choice "required"); others would point elsewhere."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith(("#/$defs/", "#/definitions/")):
            raise RequestError(f"tool_choice required: tool {tool!r} has $ref {ref!r}, which "
                               "only its own schema can resolve (name the tool instead)",
                               "tools")
        for value in node.values():
            _check_refs(value, tool)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, tool)


def _choice_name(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice.function.name)


def special_tokens_by_form(data: Any) -> Any:
    """A body of a text or of chat `messages` (/tokenize, embeddings): add_special_tokens left
    out is on for a text (the tokenizer's BOS) and off for messages (the template writes
    its own), as vLLM's two requests default it."""
    if isinstance(data, dict) and data.get("add_special_tokens") is None:
        data = {**data, "add_special_tokens": data.get("messages") is None}
    return data


class ChatTemplateControls(OpenAIBaseModel):
    """vLLM's controls of the chat template, for chat completions and /tokenize:
    `add_generation_prompt` (open the assistant's turn), `continue_final_message` (continue
    the last message instead, e.g. a prefilled answer), `chat_template_kwargs` (more template
    variables), `tools` (the tools the template describes), and `chat_template` (a template
    of the request's own, or `chat_template_kwargs.chat_template`, as vLLM reads it: served
    only under --trust-request-chat-template)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Annotated[dict[str, Any], MAP_CEILING] | None = None
    chat_template: str | None = None
    tools: Annotated[list[Tool], MAX_ITEMS_FIELD] | None = None  # for the template too

    @field_validator("continue_final_message")
    @classmethod
    def _one_turn_choice(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "true (send add_generation_prompt: false to continue the last "
                             "message)")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = {"messages", "add_generation_prompt", "continue_final_message"}
        for key in value or {}:
            if key in reserved or not key.isidentifier():
                raise ValueError(f"{key!r} cannot be a chat template variable")
        return value

    @property
    def request_template(self) -> str | None:
        """The request's own template: `chat_template`, else chat_template_kwargs'
        `chat_template` (vLLM passes the kwargs on as the template's arguments)."""
        if self.chat_template is not None:
            return self.chat_template
        template = (self.chat_template_kwargs or {}).get("chat_template")
        if template is not None and not isinstance(template, str):
            raise RequestError("chat_template_kwargs.chat_template must be a template's text",
                               "chat_template_kwargs")
        return template

    def template_args(self) -> dict[str, Any]:
        """Keyword arguments of Tokenizer.apply_chat_template / encode_chat: the tools too,
        as vLLM passes them (also with tool_choice none), and the request's template."""
        variables = {k: v for k, v in (self.chat_template_kwargs or {}).items()
                     if k != "chat_template"}
        args = {"add_generation_prompt": self.add_generation_prompt,
                "continue_final_message": self.continue_final_message,
                "variables": variables, "template": self.request_template}
        if self.tools:
            args["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        return args


NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # {} only


class ChatCompletionRequest(ChatTemplateControls, _SamplingRequest):
    """POST /v1/chat/completions. `tools` reach the chat template; `tool_choice` names one
    (its arguments are guided by its parameters' schema), asks for some ("required": a list
    of calls, guided) or leaves it to the model ("auto", the default with tools: the answer is
    parsed for calls by the server's --tool-call-parser). The deprecated `functions` are
    refused. `add_special_tokens` adds the tokenizer's BOS on top of the template's own (off,
    as in vLLM)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_ITEMS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for the next field
    max_completion_tokens: int | None = Field(None, ge=1)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: one call at most
    # Under --reasoning-parser: false leaves the reasoning out of the answer (vLLM's)
    include_reasoning: bool = True
    # vLLM's: at most this many tokens of thinking, then its end tag is forced (-1: no bound)
    thinking_token_budget: int | None = Field(None, ge=-1, strict=True)
    functions: Annotated[list[Any], MAX_ITEMS_FIELD] | None = None
    function_call: Any = None
    add_special_tokens: bool = False
    # vLLM's chat echo: the last message's content begins the answer, where that message is
    # the answer's own turn (ChatService.echoed)
    echo: bool = False

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("functions are not supported (send tools)")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        if value is not None and value != "none":
            raise ValueError("function_call is not supported (send tool_choice)")
        return value

    @model_validator(mode="after")
    def _tool_choice_among_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is None or choice == "none":
            return self
        names = self.tool_names
        if not names:
            raise ValueError(f"tool_choice {_choice_name(choice)} needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among "
                             f"the tools ({', '.join(names)})")
        return self

    @property
    def tool_names(self) -> list[str]:
        return [tool.function.name for tool in self.tools or ()]

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """What the answer is: text ("none"), text or calls the model chose ("auto", the
        default with tools, as OpenAI's), calls ("required"), one call of the named tool."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        if choice is None:
            return "auto" if self.tools else "none"
        return choice

    def tool_spec(self) -> GuideSpec | None:
        """The guide of a required or named tool call: the tool's parameters (named), or a
        list of calls of any tool, each {"name", "parameters"} (required), as vLLM's; of one
        call with parallel_tool_calls false (which vLLM ignores)."""
        mode, tools = self.tool_mode, self.tools or []
        if mode == "named":
            assert isinstance(self.tool_choice, NamedToolChoice)
            name = self.tool_choice.function.name
            tool = next(t for t in tools if t.function.name == name)
            return GuideSpec("json", tool.function.parameters or NO_ARGUMENTS, "tool_choice")
        if mode == "required":
            # Each tool's $defs move to the list's root, where its "#/$defs/..." now point
            # (as vLLM does); two tools defining one name differently cannot share it
            defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
            calls = []
            for t in tools:
                parameters = dict(t.function.parameters or NO_ARGUMENTS)
                for key, merged in defs.items():
                    for name, definition in (parameters.pop(key, None) or {}).items():
                        if merged.setdefault(name, definition) != definition:
                            raise RequestError(f"tool_choice required: tools define {name!r} "
                                               f"differently in their {key}", "tools")
                _check_refs(parameters, t.function.name)
                calls.append({"type": "object", "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": parameters}, "required": ["name", "parameters"]})
            most = {"maxItems": 1} if self.parallel_tool_calls is False else {}
            schema = {"type": "array", "minItems": 1, **most, "items": {"anyOf": calls},
                      **{key: merged for key, merged in defs.items() if merged}}
            return GuideSpec("json", schema, "tool_choice")
        return None

    def guide_spec(self) -> GuideSpec | None:
        spec, tool = super().guide_spec(), self.tool_spec()
        if spec is not None and tool is not None:
            raise RequestError(f"only one constraint may be given, got tool_choice and "
                               f"{spec.field}", spec.field)
        return spec or tool

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` where the request exceeds `limits`, the vocabulary or the
        context."""
        self._check_sampling_limits(limits, vocab_size, max_model_len)
        _check_count(len(self.messages), limits.max_messages, "messages")

    def to_sampling_params(self, defaults: GenerationDefaults = NO_DEFAULTS) -> SamplingParams:
        """The engine's parameters, with `defaults` for what the request leaves out;
        max_tokens None is filled in once the prompt's length is known (SamplingParams)."""
        return SamplingParams(
            **self._sampling_kwargs(self.requested_max_tokens, defaults),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            prompt_logprobs=None if self.stream else self.prompt_logprobs,
        )
