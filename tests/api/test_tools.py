"""Tool calling over HTTP, as vLLM serves it: tools reach the chat template; a named
tool_choice and "required" are guided into calls; "auto" (with --enable-auto-tool-choice
--tool-call-parser llama3_json, pythonic or hermes) parses the answer. The tiny model's
weights are random: to see the parser at work, a structured-outputs regex makes it write a
call (or plain text)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from model.tokenizer import Tokenizer
from server.protocol import ChatCompletionRequest
from server.request import FinishReason, RequestOutput, TokenLogprob
from server.serving import Choice, HeldAnswer
from server.tool_calls import (
    PARSERS,
    hermes_calls,
    llama3_json_calls,
    pythonic_calls,
    required_calls,
)
from tests.api.conftest import Server, assert_openai_error, run_server, sse_data

TEMPLATES = Path(__file__).parents[1] / "model" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_REGEX = r'\{"name": "get_weather", "parameters": \{"city": "(Paris|Rome)", "unit": "c"\}\}'


@pytest.fixture(scope="module")
def sdk(tools_server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=tools_server.v1, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def test_tools_reach_the_chat_template(tiny_checkpoint: Path) -> None:
    """Llama 3.1's template writes the tools' JSON into the prompt, as transformers renders it
    with tools=; without tools it writes none."""
    template = (TEMPLATES / "llama-3.1-instruct.jinja").read_text()
    tokenizer = Tokenizer.from_dir(tiny_checkpoint, chat_template=template)
    request = ChatCompletionRequest(messages=USER, tools=[WEATHER])
    with_tools = tokenizer.apply_chat_template(USER, **request.template_args())
    assert '"name": "get_weather"' in with_tools and "The weather in a city" in with_tools
    plain = ChatCompletionRequest(messages=USER)
    assert "get_weather" not in tokenizer.apply_chat_template(USER, **plain.template_args())


def test_tokenize_counts_the_tools_too(tools_server: Server) -> None:
    """/tokenize renders messages with tools as chat completions do (vLLM's takes tools)."""
    def count(**extra: object) -> int:
        r = httpx.post(f"{tools_server.base_url}/tokenize",
                       json={"model": "tiny", "messages": USER, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["count"]

    with_tools = count(tools=[WEATHER])
    assert with_tools > count()
    r = httpx.post(f"{tools_server.v1}/chat/completions", json={
        "model": "tiny", "messages": USER, "tools": [WEATHER], "tool_choice": "none",
        "max_tokens": 1}, timeout=60)
    assert r.json()["usage"]["prompt_tokens"] == with_tools


def test_named_tool_choice_is_a_call_of_that_tool(sdk: OpenAI) -> None:
    r = sdk.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER, TIME], temperature=0.9, seed=4,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [choice] = r.choices
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("chatcmpl-tool-")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("c", "f")
    assert choice.finish_reason == "stop" and choice.message.content == ""  # vLLM's


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_a_tool_without_parameters_takes_no_arguments(sdk: OpenAI, tool_choice: str) -> None:
    ping = {"type": "function", "function": {"name": "ping"}}
    choice = ("required" if tool_choice == "required" else
              {"type": "function", "function": {"name": "ping"}})
    for seed in (1, 2, 3):
        r = sdk.chat.completions.create(model="tiny", messages=USER, tools=[ping],
                                        tool_choice=choice, parallel_tool_calls=False,
                                        temperature=1.0, seed=seed, max_tokens=60)
        [call] = r.choices[0].message.tool_calls or []
        assert call.function.name == "ping" and json.loads(call.function.arguments) == {}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_is_calls(sdk: OpenAI, seed: int) -> None:
    """A list of calls of the tools; parallel_tool_calls false makes it one (a random model
    would go on listing calls to max_tokens)."""
    r = sdk.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME],
                                    tool_choice="required", parallel_tool_calls=False,
                                    temperature=1.0, seed=seed, max_tokens=300)
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and choice.message.content == ""
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        assert set(arguments) == ({"city", "unit"} if call.function.name == "get_weather"
                                  else {"zone"})


def test_streamed_required_calls_come_whole_then_the_finish(sdk: OpenAI) -> None:
    """A "required" list is held back until it is complete, each call then sent in one delta
    (id, type, name, arguments), then the finish on a chunk of its own, as OpenAI's."""
    stream = sdk.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME],
                                         tool_choice="required", temperature=0, max_tokens=300,
                                         parallel_tool_calls=False, stream=True)
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not any(c.choices[0].delta.content for c in chunks[1:])  # the calls only
    *_, calls, last = chunks
    assert calls.choices[0].finish_reason is None
    assert len(calls.choices[0].delta.tool_calls or []) == 1  # parallel_tool_calls false
    assert not last.choices[0].delta.tool_calls
    assert last.choices[0].finish_reason == "tool_calls"
    for k, call in enumerate(calls.choices[0].delta.tool_calls or []):
        assert call.index == k and call.id and call.type == "function"
        assert call.function and call.function.name and json.loads(call.function.arguments or "")


def test_a_streamed_named_call_sends_its_arguments_as_they_come(sdk: OpenAI) -> None:
    """As vLLM streams a named call: the first delta opens it (id, type, name), every token
    adds a piece of the arguments, the finish comes on a chunk of its own."""
    stream = sdk.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER, TIME], temperature=0, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    chunks = [c for c in stream if c.choices][1:]  # after the role's
    *pieces, last = chunks
    calls = [c.choices[0].delta.tool_calls[0] for c in pieces]  # type: ignore[index]
    assert len(calls) > 1 and calls[0].id and calls[0].function.name == "get_weather"
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in calls[1:])
    arguments = json.loads("".join(c.function.arguments or "" for c in calls))
    assert arguments["city"] in ("Paris", "Rome")
    assert not last.choices[0].delta.tool_calls and last.choices[0].finish_reason == "stop"


def test_the_sdks_stream_helper_closes_each_call(sdk: OpenAI) -> None:
    """`chat.completions.stream` with a strict pydantic tool: the call's arguments.done
    event comes, parsed (it fires when a chunk after the call's starts)."""
    class GetTime(BaseModel):
        zone: Literal["UTC", "CET"]

    with sdk.chat.completions.stream(
            model="tiny", messages=USER, tools=[openai.pydantic_function_tool(GetTime)],
            tool_choice={"type": "function", "function": {"name": "GetTime"}},
            temperature=0) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
    [event] = done
    assert event.name == "GetTime" and isinstance(event.parsed_arguments, GetTime)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_a_call_from_the_answer(tools_server: Server, stream: bool) -> None:
    """The model writes a Llama 3.1 JSON call (made to, here, by a regex): the answer is a
    tool call, finish_reason "tool_calls", and no content."""
    body = {"model": "tiny", "messages": USER, "tools": [WEATHER], "temperature": 0,
            "max_tokens": 60, "structured_outputs": {"regex": CALL_REGEX}, "stream": stream}
    r = httpx.post(f"{tools_server.v1}/chat/completions", json=body, timeout=60)
    content, calls, finish = read_answer(r, stream)
    assert content is None  # (no content, streamed or not)
    [call] = calls
    assert call["function"]["name"] == "get_weather" and finish == "tool_calls"
    assert json.loads(call["function"]["arguments"])["unit"] == "c"


def read_answer(r: httpx.Response, stream: bool) -> tuple[str | None, list[dict], str]:
    """A chat answer's content (None: none came), tool calls and finish_reason, streamed
    (deltas joined) or not."""
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        contents = [d["content"] for d in deltas if d.get("content")]
        calls = [call for d in deltas for call in d.get("tool_calls", [])]
        return ("".join(contents) if contents else None), calls, chunks[-1]["choices"][0][
            "finish_reason"]
    choice = r.json()["choices"][0]
    return (choice["message"]["content"], choice["message"].get("tool_calls") or [],
            choice["finish_reason"])


@pytest.mark.parametrize("stream", [False, True])
def test_auto_answers_text_as_text(tools_server: Server, stream: bool) -> None:
    """An answer that is not a call streams as content, token by token."""
    body = {"model": "tiny", "messages": USER, "tools": [WEATHER], "temperature": 0,
            "max_tokens": 40, "structured_outputs": {"regex": "It is sunny[a-z ]{0,12}\\."},
            "stream": stream}
    r = httpx.post(f"{tools_server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
        contents = [c["choices"][0]["delta"].get("content") for c in chunks]
        assert len([c for c in contents if c]) > 1  # streamed, not held back
        text, finish = "".join(c or "" for c in contents), chunks[-1]["choices"][0][
            "finish_reason"]
        assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    else:
        message = r.json()["choices"][0]["message"]
        assert "tool_calls" not in message
        text, finish = message["content"], r.json()["choices"][0]["finish_reason"]
    assert text.startswith("It is sunny") and text.endswith(".") and finish == "stop"


def test_tool_requests_that_cannot_be_served(tools_server: Server, server: Server,
                                             auth: dict[str, str]) -> None:
    chat = f"{tools_server.v1}/chat/completions"
    both = {"model": "tiny", "messages": USER, "tools": [WEATHER], "tool_choice": "required",
            "response_format": {"type": "json_object"}}
    error = assert_openai_error(httpx.post(chat, json=both, timeout=60), 400)
    assert "only one constraint" in error["message"] and error["param"] == "response_format"
    # Without --enable-auto-tool-choice, tools without a tool_choice are "auto": refused, as
    # vLLM refuses them; "none" answers text
    plain = {"model": "tiny", "messages": USER, "tools": [WEATHER], "max_tokens": 4}
    error = assert_openai_error(httpx.post(f"{server.v1}/chat/completions", json=plain,
                                           headers=auth, timeout=60), 400)
    assert "--enable-auto-tool-choice" in error["message"] and error["param"] == "tool_choice"
    r = httpx.post(f"{server.v1}/chat/completions", json={**plain, "tool_choice": "none"},
                   headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_auto_answers_json_naming_no_tool_as_text(tools_server: Server) -> None:
    """JSON with a "name" is a call only where it names one of the request's tools and
    has arguments: anything else is the answer's text."""
    for regex in (r'\{"name": "Bob", "parameters": \{\}\}', r'\{"name": "get_weather"\}'):
        r = httpx.post(f"{tools_server.v1}/chat/completions", json={
            "model": "tiny", "messages": USER, "tools": [WEATHER], "temperature": 0,
            "max_tokens": 40, "structured_outputs": {"regex": regex}}, timeout=60)
        choice = r.json()["choices"][0]
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"
        assert choice["message"]["content"].startswith('{"name": ')


def test_required_calls_of_tools_with_defs(sdk: OpenAI) -> None:
    """pydantic's nested models put $defs in a tool's parameters: "required" moves them to
    the list's root (as vLLM), where the tools' "#/$defs/..." refs find them."""
    class Place(BaseModel):
        city: Literal["Paris", "Rome"]

    class Visit(BaseModel):
        where: Place
        days: Literal[1, 2]

    tool = openai.pydantic_function_tool(Visit)
    assert "$defs" in tool["function"]["parameters"]
    r = sdk.chat.completions.create(model="tiny", messages=USER, tools=[tool],
                                    tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_tokens=200)
    [call] = r.choices[0].message.tool_calls or []
    assert call.function.name == "Visit"
    assert Visit.model_validate(json.loads(call.function.arguments))


@pytest.mark.parametrize(("tools", "fragment"), [
    ([{"type": "function", "function": {"name": "a", "parameters": {
        "$defs": {"X": {"type": "integer"}}, "properties": {"x": {"$ref": "#/$defs/X"}}}}},
      {"type": "function", "function": {"name": "b", "parameters": {
          "$defs": {"X": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/X"}}}}}],
     "define 'X' differently"),
    ([{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"next": {"$ref": "#"}}}}}], "only its own schema"),
])
def test_required_refuses_refs_it_cannot_move(tools_server: Server, tools: list,
                                              fragment: str) -> None:
    r = httpx.post(f"{tools_server.v1}/chat/completions", json={
        "model": "tiny", "messages": USER, "tools": tools, "tool_choice": "required"},
        timeout=60)
    error = assert_openai_error(r, 400)
    assert fragment in error["message"] and error["param"] == "tools"


@pytest.mark.parametrize(("parser", "text", "decision"), [
    ("llama3_json", "", None), ("llama3_json", "  ", None), ("llama3_json", "<", None),
    ("llama3_json", "<|python", None), ("llama3_json", "<|python_tag|>", True),
    ("llama3_json", " {", True), ("llama3_json", "<b>", False), ("llama3_json", "Hello", False),
    ("llama3_json", "[1]", False),
    ("pythonic", "[", None), ("pythonic", " <|python_st", None), ("pythonic", "{", False),
    ("pythonic", "[get_wea", None), ("pythonic", "[ get_weather(", True),
    ("pythonic", "<|python_start|>[f(", True), ("pythonic", "[1] is a footnote", False),
    ("pythonic", "[see", None), ("pythonic", "[see below]", False),
    ("hermes", "<tool_", None), ("hermes", "<tool_call>", True), ("hermes", "<tool_x", False),
    ("hermes", "{", False), ("llama4_pythonic", "[f(", True), ("llama4_json", "{", True),
])
def test_auto_streaming_holds_back_only_what_may_be_a_call(parser: str, text: str,
                                                           decision: bool | None) -> None:
    assert PARSERS[parser].may_be_calls(text) is decision


@pytest.mark.parametrize(("text", "calls"), [
    ('[get_weather(city="Paris", unit=\'c\')]',
     [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("<|python_start|>[f(a=[1, {'b': None}], c=True), g()]<|python_end|>",
     [("f", '{"a": [1, {"b": null}], "c": true}'), ("g", "{}")]),
    ('[f(x="é")]\n', [("f", '{"x": "é"}')]),
    ("[]", None), ("[f(1)]", None), ("[f(**k)]", None), ("[f(a=b)]", None),  # not literals
    ("[f(a={1, 2})]", None), ("[f(a=1e999)]", None), ("[f(a=1j)]", None),  # not JSON's
    ("[os.system(a='x')]", None), ("[f(a=1)] and more", None), ("[f(a=", None),
    ("[f(a=1, a=2)]", None), ('[f(a="\\d")]', [("f", '{"a": "\\\\d"}')]),
    ("Hello", None), ("[1]", None), ("(" * 500 + "[f()]", None),
])
def test_pythonic_parser(text: str, calls: list[tuple[str, str]] | None) -> None:
    parsed = pythonic_calls(text)
    assert (None if parsed is None else [(c.name, c.arguments) for c in parsed]) == calls


@pytest.mark.parametrize(("text", "calls"), [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', [("f", '{"a": 1}')]),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", '
     '"arguments": {"b": "é"}}</tool_call>', [("f", "{}"), ("g", '{"b": "é"}')]),
    ('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>', None),  # text first
    ('<tool_call>{"name": "f", "arguments": {}}', None),  # not closed (cut by max_tokens)
    ('<tool_call>{"name": "f"}</tool_call>', None), ("<tool_call>{</tool_call>", None),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call> then', None), ("Hello", None),
    ("<tool_call>" * 20000, None),  # (quadratic, read by a lazy regex)
])
def test_hermes_parser(text: str, calls: list[tuple[str, str]] | None) -> None:
    parsed = hermes_calls(text)
    assert (None if parsed is None else [(c.name, c.arguments) for c in parsed]) == calls


CALLS_OF = {  # what each parser reads, as a regex the tiny model is made to write
    "pythonic": r'\[get_weather\(city="(Paris|Rome)", unit="c"\)\]',
    "hermes": r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
              r'"unit": "c"\}\}</tool_call>',
}


@pytest.fixture(scope="module", params=sorted(CALLS_OF))
def parser_server(request: pytest.FixtureRequest, tiny_checkpoint: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server]]:
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp(request.param),
                    "--served-model-name", "tiny", "--enable-auto-tool-choice",
                    "--tool-call-parser", request.param) as s:
        yield request.param, s


@pytest.mark.parametrize("stream", [False, True])
def test_auto_with_the_other_parsers(parser_server: tuple[str, Server], stream: bool) -> None:
    """pythonic and hermes: a call written in the parser's format is a tool call (held back
    while streaming, sent whole); text is text. hermes, as vLLM's, also reads calls after
    text: the text is the content (streamed before them)."""
    parser, server = parser_server
    cases = [(CALLS_OF[parser], None), ("It is sunny[a-z ]{0,12}\\.", "It is sunny")]
    if parser == "hermes":
        cases.append(("Let me check\\. " + CALLS_OF[parser], "Let me check. "))
    for regex, text_first in cases:
        body = {"model": "tiny", "messages": USER, "tools": [WEATHER], "temperature": 0,
                "max_tokens": 150, "structured_outputs": {"regex": regex}, "stream": stream}
        r = httpx.post(f"{server.v1}/chat/completions", json=body, timeout=60)
        content, calls, finish = read_answer(r, stream)
        text = content or ""
        if regex.endswith(CALLS_OF[parser]):
            assert calls, text
            [call] = calls
            assert content == text_first and finish == "tool_calls"
            assert call["function"]["name"] == "get_weather"
            assert json.loads(call["function"]["arguments"])["unit"] == "c"
        else:
            assert not calls and text.startswith("It is sunny") and finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_gives_hermes_text_then_calls(parser_server: tuple[str, Server],
                                                   stream: bool) -> None:
    """The Responses API's items: the text before the calls a message (streamed as it
    comes), then the calls."""
    parser, server = parser_server
    if parser != "hermes":
        pytest.skip("text before calls is hermes' alone")
    body = {"model": "tiny", "input": "Weather in Paris?", "tools": [
        {"type": "function", **WEATHER["function"]}], "temperature": 0,
        "max_output_tokens": 150, "stream": stream,
        "structured_outputs": {"regex": "Let me check\\. " + CALLS_OF["hermes"]}}
    r = httpx.post(f"{server.v1}/responses", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(d) for d in sse_data(r)]
        deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
        assert "".join(deltas) == "Let me check. " and len(deltas) > 1  # as it came
        response = events[-1]["response"]
    else:
        response = r.json()
    message, call = response["output"]
    assert message["content"][0]["text"] == "Let me check. "
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"])["unit"] == "c"


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>', "Sure. ", [("f", "{}")]),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', None, [("f", "{}")]),
    ('\n<tool_call>{"name": "f", "arguments": {}}</tool_call>', "\n", [("f", "{}")]),
    ('Sure. <tool_call>{"name": "f"}</tool_call>', None, None),  # not a call: all text
    ('Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call> done', None, None),
    ("Hello", None, None),
])
def test_hermes_reads_text_before_its_calls(text: str, content: str | None,
                                            calls: list[tuple[str, str]] | None) -> None:
    """vLLM's hermes: the text before the first <tool_call> is the content (None where there
    is none); without calls the whole answer is. The others read calls that are the whole
    answer."""
    got_content, got_calls = PARSERS["hermes"].read(text)
    assert (None if got_calls is None else [(c.name, c.arguments) for c in got_calls]) == calls
    assert got_content == (text if calls is None else content)
    json_call = '{"name": "f", "parameters": {}}'
    assert PARSERS["llama3_json"].read("Sure. " + json_call) == ("Sure. " + json_call, None)
    assert PARSERS["llama3_json"].read(json_call)[0] is None


def stream_through(parser: str, pieces: list[str]) -> tuple[list[str], HeldAnswer]:
    """What HeldAnswer lets out of an answer coming in `pieces` (one token each, the last
    finishing it)."""
    answer, choice, sent = HeldAnswer(PARSERS[parser]), Choice(), []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        out = RequestOutput("r", 0, text=piece, token_ids=[k],
                            logprobs=[TokenLogprob(k, -0.5, ())],
                            finish_reason=FinishReason.STOP if last else None)
        choice.absorb(out)
        released = answer.release(choice, out)
        sent.append(released.text)
        if not released.text and not last:  # (its logprobs go with the text they belong to)
            assert not released.logprobs
        assert [lp.token_id for lp in released.logprobs or ()] == (
            list(range(answer.sent_logprobs - len(released.logprobs or ()),
                       answer.sent_logprobs)))
    return sent, answer


def test_hermes_streams_the_text_before_its_calls() -> None:
    """Text streams as it comes, all but what may begin "<tool_call>"; from the opening on
    it is held; a tail that turns out to be text goes out with the token that tells."""
    call = '{"name": "f", "arguments": {}}</tool_call>'
    sent, answer = stream_through("hermes", ["Let", " me see. <", "tool", "_call>", call])
    assert sent == ["Let", " me see. ", "", "", ""] and answer.held is True
    assert answer.rest("Let me see. ", Choice()) == (None, [])  # the calls follow
    sent, answer = stream_through("hermes", ["a <", "tool_x", " b <tool"])
    assert sent == ["a ", "<tool_x", " b <tool"] and answer.held is False
    sent, answer = stream_through("hermes", ["<tool_call>", "{bad"])
    assert sent == ["", ""] and answer.held is True  # (held: at the end, the text)
    assert answer.rest("<tool_call>{bad", Choice()) == ("<tool_call>{bad", [])
    sent, _ = stream_through("llama3_json", ["Hi", " there"])  # decided by its start
    assert sent == ["Hi", " there"]
    sent, _ = stream_through("llama3_json", [" ", "{", '"a"'])
    assert sent == ["", "", ""]


def test_hermes_keeps_special_tokens_under_auto() -> None:
    """Its tags are special tokens in Hermes 3's vocabulary: kept in the text for the parser
    (vLLM's adjust_request), under "auto" only."""
    from server.serving import ChatService

    service = ChatService.__new__(ChatService)
    service.tool_parser = PARSERS["hermes"]
    auto = ChatCompletionRequest(messages=USER, tools=[WEATHER])
    service.prepare_tools(auto)
    assert auto.skip_special_tokens is False
    assert auto.to_sampling_params().skip_special_tokens is False
    named = ChatCompletionRequest(messages=USER, tools=[WEATHER], tool_choice="none")
    service.prepare_tools(named)
    assert named.skip_special_tokens is True
    service.tool_parser = PARSERS["pythonic"]
    plain = ChatCompletionRequest(messages=USER, tools=[WEATHER])
    service.prepare_tools(plain)
    assert plain.skip_special_tokens is True


@pytest.mark.parametrize(("text", "calls"), [
    ('{"name": "f", "parameters": {"a": 1}}', [("f", '{"a": 1}')]),
    ('<|python_tag|>{"name": "f", "arguments": {}}; {"name": "g", "parameters": {"b": "é"}}',
     [("f", "{}"), ("g", '{"b": "é"}')]),
    ("  {\"name\": \"f\", \"parameters\": {}}\n", [("f", "{}")]),
    ("Hello", None), ('{"name": "f"', None), ('{"parameters": {}}', None),
    ('{"name": "f"}', None),  # no arguments: not a call (vLLM's parser needs them)
    ('{"name": "f", "parameters": [1]}', None), ('{"name": "f", "parameters": {}} trailing', None),
])
def test_llama3_json_parser(text: str, calls: list[tuple[str, str]] | None) -> None:
    parsed = llama3_json_calls(text)
    assert (None if parsed is None else [(c.name, c.arguments) for c in parsed]) == calls


def test_the_guides_of_tool_choices() -> None:
    """named: the tool's parameters (or an empty object); required: a list of calls, one at
    most with parallel_tool_calls false; none and auto: no guide."""
    bare = {"type": "function", "function": {"name": "ping"}}
    named = ChatCompletionRequest(messages=USER, tools=[WEATHER, bare], tool_choice={
        "type": "function", "function": {"name": "ping"}}).guide_spec()
    assert named is not None and named.value == {"type": "object", "properties": {},
                                                 "additionalProperties": False}
    required = ChatCompletionRequest(messages=USER, tools=[WEATHER, TIME],
                                     tool_choice="required").guide_spec()
    assert required is not None and "maxItems" not in required.value
    names = [item["properties"]["name"]["enum"] for item in required.value["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    one = ChatCompletionRequest(messages=USER, tools=[TIME], tool_choice="required",
                                parallel_tool_calls=False).guide_spec()
    assert one is not None and one.value["maxItems"] == 1
    for choice in ("none", "auto", None):
        request = ChatCompletionRequest(messages=USER, tools=[TIME], tool_choice=choice)
        assert request.guide_spec() is None
        assert request.tool_mode == (choice or "auto")


def test_required_calls_parser() -> None:
    parsed = required_calls('[{"name": "f", "parameters": {"x": [1, 2]}}, '
                            '{"name": "g", "parameters": {}}]')
    assert parsed is not None and [(c.name, c.arguments) for c in parsed] == [
        ("f", '{"x": [1, 2]}'), ("g", "{}")]
    assert required_calls('[{"name": "f", "parameters": {"x"') is None  # cut by max_tokens
    assert required_calls("[]") is None
