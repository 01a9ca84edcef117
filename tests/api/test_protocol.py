"""server/protocol/ without a server: validation, limits, SamplingParams mapping, and
response shapes checked against the `openai` SDK's own types."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import Any

import openai.types
import openai.types.chat
import pytest
from pydantic import BaseModel, ValidationError

from server.config import GenerationDefaults
from server.protocol import (
    LOGPROB_FLOOR,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    CompletionUsage,
    DeltaMessage,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestError,
    RequestLimits,
    StreamEnvelope,
    TokenizeRequest,
    TokenizeResponse,
    chat_logprobs,
    completion_logprobs,
    describe_validation_errors,
    logprob_token_ids,
    prompt_logprobs,
    random_id,
    to_openai_finish_reason,
)
from server.request import FinishReason, SamplingParams, TokenLogprob

USER = [{"role": "user", "content": "Hello"}]
VOCAB = 1000
MAX_MODEL_LEN = 2048


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "Hello", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def wire(model: BaseModel) -> dict[str, Any]:
    """What a client receives."""
    return json.loads(model.model_dump_json())


def assert_invalid(build: Any, fields: dict[str, Any], param: str | None, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        build(**fields)
    message, got_param = describe_validation_errors(info.value.errors())
    assert got_param == param
    assert fragment in message


# --- base behaviour ---------------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="server.protocol"):
        request = chat(service_tier="auto", metadata={"a": "b"})
    assert "service_tier" not in request.model_dump()
    assert "service_tier" in caplog.text and "metadata" in caplog.text
    message = ChatMessage.model_validate({"role": "user", "content": "x", "refusal": None})
    assert message.content == "x"


def test_null_means_default_for_non_nullable_fields() -> None:
    request = completion(temperature=None, n=None, stream=None, top_k=None, echo=None, stop=None)
    assert (request.n, request.stream, request.echo, request.stop) == (1, False, False, None)
    # sampling controls left out (or null) are the model's defaults', else the neutral ones
    assert (request.temperature, request.top_k) == (None, None)
    params = request.to_sampling_params()
    assert (params.temperature, params.top_k) == (1.0, 0)
    assert completion().max_tokens == 16
    assert completion(max_tokens=None).max_tokens is None  # explicit null: rest of the context
    assert chat(logprobs=None, top_logprobs=None).logprobs is False


def test_model_is_optional() -> None:
    assert completion().model is None
    assert completion(model="llama").model == "llama"


# --- completions validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ""},
        {"prompt": ["a", "b"]},
        {"prompt": [0, 1, 2]},
        {"prompt": [[1, 2], [3]]},
        {"max_tokens": 0, "echo": True, "logprobs": 0},
        {"logprobs": 20},
        {"temperature": 0.0},
        {"temperature": 3.5},
        {"top_p": 1.0},
        {"top_p": 0.01},
        {"n": 3, "best_of": 3},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"logit_bias": {"0": -100, "50": 100}},
        {"stop": "\n"},
        {"stop": ["a", "b"]},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"seed": -1},
        {"top_k": -1},
        {"top_k": 40, "min_p": 1.0, "repetition_penalty": 0.5},
        {"min_tokens": 16, "max_tokens": 16},
        {"stop_token_ids": [0, 2], "ignore_eos": True, "skip_special_tokens": False},
        {"user": "u1", "include_stop_str_in_output": True},
    ],
)
def test_completion_accepts(fields: dict[str, Any]) -> None:
    completion(**fields)


def test_body_nested_beyond_the_recursion_limit_is_validated() -> None:
    """The Unicode check walks a body without recursion: an ignored field nested 100000
    levels deep is just ignored (recursion made a RecursionError, a 500 over HTTP)."""
    def nest(leaf: object) -> list:
        nested = [leaf]
        for _ in range(100_000):
            nested = [nested]
        return nested

    assert completion(x=nest("fine")).prompt == "Hello"
    with pytest.raises(ValidationError, match="lone surrogate"):  # and it reaches the bottom
        completion(x=nest("\ud800"))


def test_token_ids_are_read_as_pydantic_ints() -> None:
    """The one-pass token-id check still takes what pydantic's lax int takes (5.0 and "5",
    as vLLM does), and refuses a fractional or negative id with one error, and booleans."""
    assert completion(prompt=[5.0, "6", 7]).prompt == [5, 6, 7]
    assert completion(prompt=[[5.0], [6]], stop_token_ids=["2"]).stop_token_ids == [2]
    with pytest.raises(ValidationError) as e:
        completion(prompt=[5, 1.5] * 1000)
    assert len(e.value.errors()) == 1 and "index 1" in e.value.errors()[0]["msg"]
    for fields in ({"prompt": [5, True]}, {"prompt": [[False]]}, {"stop_token_ids": [True]}):
        with pytest.raises(ValidationError, match="a boolean is not a token id"):
            completion(**fields)
    with pytest.raises(ValidationError, match="a boolean is not a token id"):
        DetokenizeRequest(model="m", tokens=[1, True])


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"prompt": None}, "prompt", "prompt must be"),
        ({"prompt": 5}, "prompt", "prompt must be"),
        ({"prompt": []}, "prompt", "prompt must be"),
        ({"prompt": [[]]}, "prompt", "at least 1"),
        ({"prompt": [1, -1]}, "prompt", "greater than or equal to 0"),
        ({"prompt": ["a", 1]}, "prompt", "valid string"),
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": math.nan}, "temperature", "finite"),
        ({"top_p": 0.0}, "top_p", "greater than 0"),
        ({"top_p": 1.1}, "top_p", "less than or equal to 1"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
        ({"logit_bias": {"5": -101}}, "logit_bias", "greater than or equal to -100"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"hello": 1}}, "logit_bias", "not a token id"),
        ({"logit_bias": {"1_000": 1}}, "logit_bias", "not a token id"),
        ({"best_of": 2}, "best_of", "best_of != n is not supported"),
        ({"n": 2, "best_of": 1}, "best_of", "best_of != n is not supported"),
        ({"stop": ""}, "stop", "at least 1 character"),
        ({"stop": ["a", ""]}, "stop", "at least 1 character"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "greater than or equal to 0"),
        ({"seed": 2**63}, "seed", "less than or equal to"),
    ],
)
def test_completion_rejects(fields: dict[str, Any], param: str | None, fragment: str) -> None:
    assert_invalid(completion, fields, param, fragment)


def test_completion_prompts_normalised() -> None:
    assert completion(prompt="a").prompts == ["a"]
    assert completion(prompt=["a", "b"]).prompts == ["a", "b"]
    assert completion(prompt=[1, 2]).prompts == [[1, 2]]
    assert completion(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]


# --- chat validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": r, "content": "x"} for r in ("system", "developer", "user")]},
        {"messages": [*USER, {"role": "assistant", "content": None}]},
        {"messages": [*USER, {"role": "assistant"}]},
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "t1"}]},
        {"messages": [{"role": "ipython", "content": "42"}]},  # any role a template knows
        {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        {"messages": [{"role": "user", "name": "ann", "content": "hi"}]},
        {"max_tokens": 1},
        {"max_completion_tokens": 100},
        {"logprobs": True},
        {"logprobs": True, "top_logprobs": 20},
        {"top_logprobs": 0},
        {"response_format": {"type": "text"}},
        {"tools": [], "functions": []},
        {"tool_choice": "none", "function_call": "none"},
        {"stream": True, "stream_options": {"include_usage": False}},
        {"temperature": 0, "top_p": 0.5, "n": 4, "seed": 7, "stop": ["x"], "user": "u"},
        {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2},
    ],
)
def test_chat_accepts(fields: dict[str, Any]) -> None:
    chat(**fields)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": None}, "messages", "valid list"),
        ({"messages": [{"role": "", "content": "x"}]}, "messages", "role"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}]}, "messages",
         "arguments must be JSON text"),
        ({"messages": [{"role": "user"}]}, "messages", "content is required for role 'user'"),
        ({"messages": [{"role": "system", "content": None}]}, "messages", "content is required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
            "'image_url' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages",
            "'input_audio' is not supported",
        ),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "'json_schema'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "needs json_schema.schema",
        ),
        ({"tool_choice": "required"}, None, "tool_choice 'required' needs tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         None, "names 'g', which is not among the tools (f)"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools",
         "at least 1 character"),
        ({"tool_choice": "auto"}, None, "tool_choice 'auto' needs tools"),
        ({"tool_choice": "sometimes"}, "tool_choice", "'required'"),
        ({"functions": [TOOL["function"]]}, "functions", "functions are not supported"),
        ({"function_call": "auto"}, "function_call", "function_call is not supported"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ],
)
def test_chat_rejects(fields: dict[str, Any], param: str | None, fragment: str) -> None:
    assert_invalid(chat, fields, param, fragment)


def test_chat_message_text_and_template_dict() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    message = ChatMessage.model_validate({"role": "user", "content": parts, "name": "ann"})
    assert message.text == "a\nb"
    assert message.template_dict() == {"role": "user", "content": "a\nb", "name": "ann"}
    assistant = ChatMessage.model_validate({"role": "assistant", "content": None})
    assert assistant.template_dict() == {"role": "assistant", "content": ""}
    # An assistant's refusal part reads as its text, as vLLM reads it
    refused = ChatMessage.model_validate({"role": "assistant", "content": [
        {"type": "refusal", "refusal": "No."}, {"type": "text", "text": "Sorry"}]})
    assert refused.text == "No.\nSorry"
    with pytest.raises(ValidationError, match="a 'refusal' content part needs `refusal`"):
        ChatMessage.model_validate({"role": "assistant", "content": [{"type": "refusal"}]})
    # A tool call's arguments: JSON text parsed, missing or empty as no arguments
    calls = ChatMessage.model_validate({"role": "assistant", "tool_calls": [
        {"function": {"name": "f"}}, {"function": {"name": "g", "arguments": ""}},
        {"function": {"name": "h", "arguments": '{"x": [1]}'}}]}).template_dict()["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == [{}, {}, {"x": [1]}]


def test_requested_max_tokens() -> None:
    assert chat().requested_max_tokens is None
    assert chat(max_tokens=5).requested_max_tokens == 5
    assert chat(max_tokens=5, max_completion_tokens=7).requested_max_tokens == 7
    assert completion().requested_max_tokens == 16


def test_include_usage() -> None:
    assert not completion(stream=True).include_usage
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={}).include_usage


# --- configurable limits ----------------------------------------------------------------------

LIMITS = RequestLimits(
    max_n=4,
    max_prompts=2,
    max_messages=2,
    max_stop_strings=2,
    max_stop_string_length=5,
    max_stop_token_ids=2,
    max_logit_bias=2,
)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (completion(n=5, best_of=5), "n"),
        (completion(stop=["a", "b", "c"]), "stop"),
        (completion(stop="abcdef"), "stop"),
        (completion(stop_token_ids=[1, 2, 3]), "stop_token_ids"),
        (completion(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (completion(logit_bias={"1": 1, "2": 1, "3": 1}), "logit_bias"),
        (completion(logit_bias={str(VOCAB): 1}), "logit_bias"),
        (completion(prompt=["a", "b", "c"]), "prompt"),
        (completion(prompt=[[1], [2], [3]]), "prompt"),
        (completion(prompt=[1, VOCAB]), "prompt"),
        (completion(prompt=[[1], [VOCAB + 5]]), "prompt"),
        (chat(messages=USER * 3), "messages"),
        (chat(n=5), "n"),
        (chat(logit_bias={str(VOCAB): 1}), "logit_bias"),
        (completion(min_tokens=5, max_tokens=4), "min_tokens"),
        (chat(min_tokens=3, max_completion_tokens=2), "min_tokens"),
        (TokenizeRequest(messages=USER * 3), "messages"),
        (DetokenizeRequest(tokens=[1, VOCAB]), "tokens"),
        (chat(allowed_token_ids=[1, VOCAB]), "allowed_token_ids"),
    ],
)
def test_check_limits_rejects(request_: Any, param: str) -> None:
    with pytest.raises(RequestError) as info:
        request_.check_limits(LIMITS, VOCAB, MAX_MODEL_LEN)
    assert info.value.param == param
    assert str(info.value).startswith(param)


@pytest.mark.parametrize(
    "request_",
    [
        completion(n=4, best_of=4, stop=["a", "abcde"], stop_token_ids=[0, VOCAB - 1]),
        completion(prompt=[[1], [VOCAB - 1]], logit_bias={"0": 1, str(VOCAB - 1): -1}),
        chat(messages=USER * 2),
        TokenizeRequest(prompt="x"),
        DetokenizeRequest(tokens=[0, VOCAB - 1]),
    ],
)
def test_check_limits_accepts(request_: Any) -> None:
    request_.check_limits(LIMITS, VOCAB, MAX_MODEL_LEN)


def test_allowed_token_ids_reach_the_sampling_params() -> None:
    """vLLM's: sample only these (repeats once); an empty list allows nothing, a 400."""
    for build in (completion, chat):
        params = build(allowed_token_ids=[5, 3, 5]).to_sampling_params()
        assert params.allowed_token_ids == (5, 3)
        assert build().to_sampling_params().allowed_token_ids == ()
        assert_invalid(build, {"allowed_token_ids": []}, "allowed_token_ids", "at least 1")
        assert_invalid(build, {"allowed_token_ids": [1, -1]}, "allowed_token_ids",
                       "greater than or equal to 0")


REFUSED = ["logits_processors"]


@pytest.mark.parametrize("field", REFUSED)
def test_vllm_extensions_not_implemented_are_refused_by_name(field: str) -> None:
    """Unknown fields are ignored, but a vLLM field this server does not implement is a 400
    naming it whenever it asks for something; its neutral values pass."""
    for build in (completion, chat):
        assert_invalid(build, {field: [1]}, field, f"{field}: not supported by this server")
        for neutral in (None, False, []):
            build(**{field: neutral})
    assert_invalid(completion, {"structured_outputs": {"structural_tag": "x"}},
                   "structured_outputs", "structural_tag: not supported")


def test_chat_template_controls() -> None:
    default = chat()
    assert default.template_args() == {"add_generation_prompt": True,
                                       "continue_final_message": False, "variables": {},
                                       "template": None}
    assert not default.add_special_tokens and completion().add_special_tokens
    cont = chat(add_generation_prompt=False, continue_final_message=True,
                chat_template_kwargs={"enable_thinking": False})
    assert cont.template_args() == {"add_generation_prompt": False,
                                    "continue_final_message": True,
                                    "variables": {"enable_thinking": False}, "template": None}
    # a request's own template, either field (vLLM's kwargs are the template's arguments)
    assert chat(chat_template="A").template_args()["template"] == "A"
    moved = chat(chat_template_kwargs={"chat_template": "B", "x": 1}).template_args()
    assert (moved["template"], moved["variables"]) == ("B", {"x": 1})
    with pytest.raises(RequestError, match="must be a template's text"):
        chat(chat_template_kwargs={"chat_template": 5}).template_args()
    assert_invalid(chat, {"continue_final_message": True}, "continue_final_message",
                   "cannot both be true")
    assert_invalid(chat, {"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs",
                   "cannot be a chat template variable")
    assert TokenizeRequest(messages=USER, add_generation_prompt=False,
                           continue_final_message=True).template_args()[
        "continue_final_message"]


def test_request_limits_defaults_and_checks() -> None:
    completion(n=16, best_of=16).check_limits(RequestLimits(), VOCAB, MAX_MODEL_LEN)
    with pytest.raises(ValueError, match="max_n"):
        RequestLimits(max_n=0)


# --- SamplingParams mapping -------------------------------------------------------------------

EVERY_SAMPLING_FIELD = dict(
    n=2,
    best_of=2,
    min_tokens=3,
    temperature=0.5,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    repetition_penalty=1.2,
    presence_penalty=0.5,
    frequency_penalty=-0.5,
    logit_bias={"7": 5.0, "11": -100},
    seed=1234,
    stop=["###", "\n\n"],
    stop_token_ids=[2, 3],
    ignore_eos=True,
    include_stop_str_in_output=True,
    skip_special_tokens=False,
    allowed_token_ids=[7, 9, 11],
)


def test_completion_to_sampling_params_maps_every_field() -> None:
    request = completion(**EVERY_SAMPLING_FIELD, echo=True, logprobs=3, max_tokens=50)
    params = request.to_sampling_params(GenerationDefaults(max_tokens=99))  # the model's
    default = SamplingParams()
    unchanged = [
        f.name
        for f in dataclasses.fields(params)
        if getattr(params, f.name) == getattr(default, f.name)
    ]
    # set by the route: the guide compiled from guide_spec() (below), bad words tokenized,
    # the LoRA adapter the model names; pooling: the embeddings service's; llama.cpp's chain
    # and penalty window, its infill sampler, editor limits and other samplers: its native
    # API's (server/protocol/llamacpp.py); where a guide starts and the thinking's budget:
    # the chat service's
    assert unchanged == ["guide", "guide_after", "thinking_budget", "pooling", "bad_words",
                         "lora",
                         "temperature_last",
                         "penalty_last_n", "infill_sampler", "n_indent", "t_max_predict_ms",
                         "llamacpp"]
    assert params.logit_bias == ((7, 5.0), (11, -100.0))
    assert params.stop == ("###", "\n\n")
    assert params.stop_token_ids == (2, 3)
    assert params.allowed_token_ids == (7, 9, 11)
    assert (params.logprobs, params.prompt_logprobs, params.max_tokens) == (3, 3, 50)


def test_chat_to_sampling_params_maps_every_field() -> None:
    request = chat(**{**EVERY_SAMPLING_FIELD, "best_of": None}, logprobs=True, top_logprobs=4)
    params = request.to_sampling_params(GenerationDefaults(max_tokens=99))
    default = SamplingParams()
    unchanged = {
        f.name
        for f in dataclasses.fields(params)
        if getattr(params, f.name) == getattr(default, f.name)
    }
    # chat has no echo (prompt_logprobs below); the guide, bad words and LoRA adapter: the
    # route's; pooling: the embeddings service's
    assert unchanged == {"prompt_logprobs", "guide", "guide_after", "thinking_budget",
                         "pooling", "bad_words",
                         "lora", "temperature_last", "penalty_last_n", "infill_sampler", "n_indent",
                         "t_max_predict_ms", "llamacpp"}
    assert chat(prompt_logprobs=3).to_sampling_params().prompt_logprobs == 3
    assert params.max_tokens is None and params.logprobs == 4
    assert params.default_max_tokens == 99


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


GBNF = 'root ::= "yes" | "no"'


@pytest.mark.parametrize(("fields", "kind", "value", "field"), [
    ({"response_format": {"type": "json_object"}}, "json_object", None, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
     "json", SCHEMA, "response_format"),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA, "structured_outputs.json"),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, "json", SCHEMA,
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a+"}}, "regex", "a+", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["x", "y"]}}, "choice", ["x", "y"],
     "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": True}}, "json_object", None,
     "structured_outputs.json_object"),
    ({"guided_json": SCHEMA}, "json", SCHEMA, "guided_json"),
    ({"guided_regex": "a+"}, "regex", "a+", "guided_regex"),
    ({"guided_choice": ["x"]}, "choice", ["x"], "guided_choice"),
    ({"structured_outputs": {"grammar": GBNF}}, "grammar", GBNF, "structured_outputs.grammar"),
    ({"guided_grammar": GBNF}, "grammar", GBNF, "guided_grammar"),
    ({"grammar": GBNF}, "grammar", GBNF, "grammar"),  # llama.cpp's two
    ({"json_schema": SCHEMA}, "json", SCHEMA, "json_schema"),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, "json", SCHEMA,
     "response_format"),  # llama.cpp's
    ({"grammar": ""}, None, None, None),  # (llama.cpp's clients send "" for none)
    ({"response_format": {"type": "text"}}, None, None, None),
])
def test_guide_spec_from_each_field(fields: dict[str, Any], kind: str | None, value: Any,
                                    field: str | None) -> None:
    """vLLM's fields and OpenAI's response_format, on both endpoints."""
    for build in (completion, chat):
        spec = build(**fields).guide_spec()
        got = None if spec is None else (spec.kind, spec.value, spec.field)
        assert got == (None if kind is None else (kind, value, field))


def test_guide_spec_refusals() -> None:
    with pytest.raises(RequestError, match="only one constraint") as info:
        chat(guided_regex="a", response_format={"type": "json_object"}).guide_spec()
    assert info.value.param == "response_format"
    with pytest.raises(RequestError, match="not valid JSON"):
        chat(guided_json="{nope").guide_spec()
    with pytest.raises(RequestError, match="non-empty strings"):
        chat(guided_choice=["a", ""]).guide_spec()
    assert_invalid(chat, {"structured_outputs": {"structural_tag": {"x": 1}}},
                   "structured_outputs", "structural_tag: not supported")


@pytest.mark.parametrize(
    ("fields", "logprobs", "prompt_logprobs"),
    [
        ({}, None, None),
        ({"logprobs": 0}, 0, None),
        ({"echo": True}, None, None),
        ({"echo": True, "logprobs": 2}, 2, 2),
        ({"prompt_logprobs": 0}, None, 0),
        # the engine finds the widest ask; the echo's are cut to its own
        ({"echo": True, "logprobs": 2, "prompt_logprobs": 5}, 2, 5),
        ({"echo": True, "logprobs": 4, "prompt_logprobs": 1}, 4, 4),
        ({"prompt_logprobs": 0, "stream": True}, None, None),  # (as vLLM: let through, unused)
    ],
)
def test_completion_logprobs_mapping(
    fields: dict[str, Any], logprobs: int | None, prompt_logprobs: int | None
) -> None:
    params = completion(**fields).to_sampling_params()
    assert (params.logprobs, params.prompt_logprobs) == (logprobs, prompt_logprobs)


@pytest.mark.parametrize(
    ("fields", "logprobs"),
    [({}, None), ({"logprobs": False, "top_logprobs": 0}, None), ({"logprobs": True}, 0)],
)
def test_chat_logprobs_mapping(fields: dict[str, Any], logprobs: int | None) -> None:
    assert chat(**fields).to_sampling_params().logprobs == logprobs


def test_prompt_logprobs_shape() -> None:
    """vLLM's: the first null; the token's own entry with its rank, then the k likeliest
    ranked 1..k (the token's own entry theirs where it is among them), each cut to k;
    -inf clamped."""
    entries = [None, TokenLogprob(5, -2.0, ((7, -0.5), (5, -2.0), (9, -3.0)), rank=2),
               TokenLogprob(3, float("-inf"), ((7, -0.1), (8, -0.2)), rank=900)]
    texts = {3: "c", 5: "e", 7: "g", 8: "h", 9: "i"}
    shown = prompt_logprobs(entries, 2, texts)
    assert shown[0] is None
    assert {k: (v.logprob, v.rank, v.decoded_token) for k, v in shown[1].items()} == {
        "5": (-2.0, 2, "e"), "7": (-0.5, 1, "g")}
    assert {k: (v.logprob, v.rank) for k, v in shown[2].items()} == {
        "3": (LOGPROB_FLOOR, 900), "7": (-0.1, 1), "8": (-0.2, 2)}
    assert all(len(position) == 1 for position in prompt_logprobs(entries, 0, texts)[1:])


def test_prompt_logprobs_checks() -> None:
    """vLLM's rules: at most the logprobs ceiling, none below 0, and none streamed."""
    for build in (completion, chat):
        assert_invalid(build, {"prompt_logprobs": 21}, "prompt_logprobs", "less than or equal")
        assert_invalid(build, {"prompt_logprobs": -1}, "prompt_logprobs", "greater than")
        assert_invalid(build, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs",
                       "not available when `stream=True`")


def test_sampling_params_small_cases() -> None:
    assert completion(top_k=-1).to_sampling_params().top_k == 0
    assert completion(stop="END").to_sampling_params().stop == ("END",)
    assert completion().to_sampling_params().stop == ()
    assert completion(max_tokens=0, echo=True).to_sampling_params().max_tokens == 0


# --- tokenize / detokenize --------------------------------------------------------------------


def test_tokenize_request_defaults() -> None:
    assert TokenizeRequest.model_validate({"prompt": "x"}).add_special_tokens is True
    by_messages = TokenizeRequest.model_validate({"messages": USER})
    assert by_messages.add_special_tokens is False and by_messages.add_generation_prompt
    explicit = TokenizeRequest.model_validate({"messages": USER, "add_special_tokens": True})
    assert explicit.add_special_tokens is True
    assert TokenizeRequest.model_validate({"prompt": "", "add_special_tokens": None}).prompt == ""


@pytest.mark.parametrize(
    "body", [{}, {"prompt": "x", "messages": USER}, {"messages": []}, {"prompt": 3}]
)
def test_tokenize_request_rejects(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate(body)


def test_detokenize_and_tokenize_shapes() -> None:
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": [-1]})
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]
    response = TokenizeResponse(tokens=[1, 2], count=2, max_model_len=128)
    assert wire(response) == {"tokens": [1, 2], "token_strs": None, "count": 2,
                              "max_model_len": 128}  # vLLM's shape: token_strs on request


# --- logprob builders -------------------------------------------------------------------------

TEXTS = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "é", 6: "!"}
BYTES = {i: text.encode() for i, text in TEXTS.items()}


def test_completion_logprobs_shape() -> None:
    entries = [
        TokenLogprob(3, -0.5, top=((3, -0.5), (6, -1.5))),
        TokenLogprob(4, float("-inf"), top=()),
    ]
    result = completion_logprobs([3, 4], entries, TEXTS, [5, 9])
    assert result.tokens == [" wor", "ld"]
    assert result.text_offset == [5, 9]
    assert result.token_logprobs == [-0.5, -9999.0]
    assert result.top_logprobs == [{" wor": -0.5, "!": -1.5}, {"ld": -9999.0}]


def test_completion_logprobs_echo_first_token_is_null() -> None:
    entries = [None, TokenLogprob(2, -1.0, top=((5, -0.25),))]
    result = completion_logprobs([1, 2], entries, TEXTS, [0, 3])
    assert result.token_logprobs == [None, -1.0]
    assert result.top_logprobs == [None, {"lo": -1.0, "é": -0.25}]
    assert wire(result)["token_logprobs"][0] is None
    with pytest.raises(ValueError):
        completion_logprobs([1], entries, TEXTS, [0])


def test_chat_logprobs_shape() -> None:
    entries = [TokenLogprob(5, -0.1, top=((5, -0.1), (6, -2.5))), TokenLogprob(6, math.nan)]
    result = wire(chat_logprobs(entries, TEXTS, BYTES))
    assert result == {
        "content": [
            {
                "token": "é",
                "logprob": -0.1,
                "bytes": [0xC3, 0xA9],
                "top_logprobs": [
                    {"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9]},
                    {"token": "!", "logprob": -2.5, "bytes": [0x21]},
                ],
            },
            {"token": "!", "logprob": -9999.0, "bytes": [0x21], "top_logprobs": []},
        ]
    }
    openai.types.chat.chat_completion.ChoiceLogprobs.model_validate(result)


def test_logprob_token_ids() -> None:
    entries = [None, TokenLogprob(1, -1.0, top=((2, -2.0), (3, -3.0))), TokenLogprob(4, -1.0)]
    assert logprob_token_ids(entries) == {1, 2, 3, 4}


# --- responses against the openai SDK ---------------------------------------------------------

USAGE = CompletionUsage.of(prompt_tokens=5, completion_tokens=2)


def test_completion_response_parses_with_openai_sdk() -> None:
    logprobs = completion_logprobs([1, 2], [TokenLogprob(1, -0.5), TokenLogprob(2, -0.7)],
                                   TEXTS, [0, 3])
    response = CompletionResponse(
        id=random_id("cmpl"),
        model="llama",
        choices=[
            CompletionResponseChoice(
                index=0, text="Hello", logprobs=logprobs, finish_reason="length"
            )
        ],
        usage=USAGE,
    )
    parsed = openai.types.Completion.model_validate(wire(response))
    assert parsed.choices[0].logprobs.tokens == ["Hel", "lo"]
    assert parsed.usage.total_tokens == 7
    assert parsed.object == "text_completion"


def test_chat_response_parses_with_openai_sdk() -> None:
    response = ChatCompletionResponse(
        id=random_id("chatcmpl"),
        model="llama",
        choices=[
            ChatCompletionResponseChoice(
                index=0,
                message=ChatCompletionMessage(content="Hello"),
                logprobs=chat_logprobs([TokenLogprob(1, -0.5, top=((1, -0.5),))], TEXTS, BYTES),
                finish_reason="stop",
            )
        ],
        usage=USAGE,
    )
    parsed = openai.types.chat.ChatCompletion.model_validate(wire(response))
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].token == "Hel"


def chat_chunk(delta: DeltaMessage, **choice: Any) -> ChatCompletionChunk:
    choices = [ChatCompletionStreamChoice(index=0, delta=delta, **choice)]
    return ChatCompletionChunk(id="chatcmpl-1", created=1, model="llama", choices=choices)


def test_chat_chunks_keep_nulls_and_parse_with_openai_sdk() -> None:
    first = wire(chat_chunk(DeltaMessage(role="assistant", content="")))
    middle = wire(chat_chunk(DeltaMessage(content="Hi")))
    last = wire(chat_chunk(DeltaMessage(), finish_reason="length"))
    usage = wire(
        ChatCompletionChunk(id="chatcmpl-1", created=1, model="llama", choices=[], usage=USAGE)
    )
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert middle["choices"][0] == {
        "index": 0,
        "delta": {"content": "Hi"},
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,  # vLLM's, null until a stop string or stop token id ends it
    }
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in middle and usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert middle["object"] == "chat.completion.chunk"
    for chunk in (first, middle, last, usage):
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)


def test_completion_chunks_keep_nulls() -> None:
    choice = CompletionResponseChoice(index=1, text="lo")
    chunk = wire(CompletionStreamResponse(id="cmpl-1", created=1, model="m", choices=[choice]))
    assert chunk == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 1, "text": "lo", "logprobs": None, "finish_reason": None,
                     "stop_reason": None}],
    }
    final = CompletionResponseChoice(index=1, text="", finish_reason="stop")
    usage = CompletionStreamResponse(id="cmpl-1", model="m", choices=[final], usage=USAGE)
    parsed = openai.types.Completion.model_validate(wire(usage))
    assert parsed.usage.completion_tokens == 2


def _completion_text(index: int, text: str) -> CompletionResponseChoice:
    return CompletionResponseChoice(index=index, text=text)


def _chat_text(index: int, text: str) -> ChatCompletionStreamChoice:
    return ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text))


@pytest.mark.parametrize("model", ["m", 'a "choices":[] model', "模型\\"])
def test_stream_envelope_renders_the_whole_chunk(model: str) -> None:
    """The envelope (shared fields serialized once) gives the chunk model's own JSON, byte for
    byte, whatever the choice and whatever the strings hold."""
    lps = CompletionLogprobs(tokens=[" é"], token_logprobs=[-0.5], top_logprobs=[{" é": -0.5}],
                             text_offset=[3])
    completion = StreamEnvelope(
        CompletionStreamResponse(id="cmpl-1", created=7, model=model, choices=[]),
        _completion_text)
    for choice in (CompletionResponseChoice(index=2, text='a "quoted"\n line'),
                   CompletionResponseChoice(index=0, text="", logprobs=lps, finish_reason="stop")):
        whole = CompletionStreamResponse(id="cmpl-1", created=7, model=model, choices=[choice])
        assert completion.render(choice) == whole.model_dump_json()
    chat = StreamEnvelope(ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[]),
                          _chat_text)
    deltas = [(DeltaMessage(role="assistant", content=""), None),
              (DeltaMessage(content="\u2028"), None), (DeltaMessage(), "length")]
    for delta, finish in deltas:
        choice = ChatCompletionStreamChoice(index=1, delta=delta, finish_reason=finish)
        whole = ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[choice])
        assert chat.render(choice) == whole.model_dump_json()
    with pytest.raises(ValueError, match="empty choices"):
        StreamEnvelope(ChatCompletionChunk(id="x", model="m", choices=[choice]), _chat_text)


# Every Unicode scalar value, in runs, and the strings whose escapes differ most between JSON
# writers: quotes, backslashes, control characters, line separators, astral characters.
ALL_CHARACTERS = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
CHUNK_TEXTS = ["", " hello", 'a "quoted"\\ path\n', "\x00\x01\x1f\x7f\b\f\r\t", "\u2028\u2029",
         "é 模型 🦙", "</script>", *(ALL_CHARACTERS[i:i + 4096]
                                    for i in range(0, len(ALL_CHARACTERS), 4096))]


@pytest.mark.parametrize("index", [0, 3])
def test_text_chunks_are_the_choice_models_json(index: int) -> None:
    """The per-token path (the choice's JSON around its text, the text encoded alone) writes
    exactly what building and serializing the chunk model would, for every character."""
    for make, chunk_model in ((_completion_text, CompletionStreamResponse),
                              (_chat_text, ChatCompletionChunk)):
        envelope = StreamEnvelope(chunk_model(id="id-1", created=7, model='m "x"', choices=[]),
                                  make)
        for text in CHUNK_TEXTS:
            whole = chunk_model(id="id-1", created=7, model='m "x"', choices=[make(index, text)])
            assert envelope.text_chunk(index, text) == whole.model_dump_json()


def test_models_list_and_error_shapes() -> None:
    listing = wire(
        ModelList(data=[ModelCard(id="llama", root="/models/llama", max_model_len=4096)])
    )
    assert listing["object"] == "list" and listing["data"][0]["object"] == "model"
    assert listing["data"][0]["max_model_len"] == 4096
    openai.types.Model.model_validate(listing["data"][0])
    error = wire(ErrorResponse.of("too long", "invalid_request_error", param="messages",
                                  code="context_length_exceeded"))
    assert error == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    assert wire(ErrorResponse.of("x", "server_error"))["error"]["param"] is None


def test_describe_validation_errors_drops_body_prefix() -> None:
    errors = [{"loc": ("body", "n"), "msg": "Input should be greater than or equal to 1"}]
    assert describe_validation_errors(errors) == (
        "n: Input should be greater than or equal to 1",
        "n",
    )
    assert describe_validation_errors([{"loc": ("body",), "msg": "Value error, bad"}]) == (
        "bad",
        None,
    )


def test_describe_validation_errors_speaks_of_the_request_not_pydantic() -> None:
    bad_json = [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                 "ctx": {"error": "Expecting property name enclosed in double quotes"}}]
    assert describe_validation_errors(bad_json) == (
        "the body is not valid JSON: Expecting property name enclosed in double quotes "
        "(at character 1)", None)
    no_body = [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
    assert describe_validation_errors(no_body) == ("the request needs a JSON body", None)
    for fields, expected in [({"stop": [1]}, "stop: Input should be a valid string"),
                             ({"prompt": [[1, "a"]]}, "prompt.0: token id at index 1")]:
        with pytest.raises(ValidationError) as info:
            completion(**fields)
        assert describe_validation_errors(info.value.errors())[0].startswith(expected)
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "user", "content": 5}])
    message, param = describe_validation_errors(info.value.errors())
    assert param == "messages" and "[" not in message and ".str" not in message
    assert message.startswith("messages.0.content: Input should be a valid string")


def test_random_id_and_finish_reason() -> None:
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", random_id("cmpl"))
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", random_id("chatcmpl"))
    assert random_id("cmpl") != random_id("cmpl")
    assert to_openai_finish_reason(FinishReason.STOP) == "stop"
    assert to_openai_finish_reason(FinishReason.LENGTH) == "length"
    assert to_openai_finish_reason(FinishReason.ABORT) == "abort"
    assert to_openai_finish_reason(None) is None


def test_response_models_reject_unknown_finish_reason() -> None:
    with pytest.raises(ValidationError):
        CompletionResponseChoice(index=0, text="", finish_reason="tool_calls")
    assert CompletionLogprobs().model_dump() == {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }


def test_usage_details_are_openais_and_named_in_the_schema() -> None:
    usage = CompletionUsage.of(5, 2, cached_tokens=3)
    parsed = openai.types.CompletionUsage.model_validate_json(usage.model_dump_json())
    assert parsed.prompt_tokens_details is not None
    assert parsed.prompt_tokens_details.cached_tokens == 3
    assert "prompt_tokens_details" not in CompletionUsage.of(5, 2).model_dump_json()
    # Omitting the key keeps the model's fields in its schema (the OpenAPI document's)
    schema = CompletionUsage.model_json_schema(mode="serialization")
    assert {"prompt_tokens", "completion_tokens", "total_tokens",
            "prompt_tokens_details"} <= schema["properties"].keys()
