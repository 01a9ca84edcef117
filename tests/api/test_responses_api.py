"""OpenAI's Responses API (POST /v1/responses) over HTTP, through the OpenAI SDK where it can:
the request read as a chat completion (same prompt, same answer), the answer as output items
(a message, or function calls), streamed as named events the SDK's stream helper assembles."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel

from server.guided.spec import GuideSpec, compile_guide
from server.protocol.responses_api import MessageItem, ResponseObject, ResponsesRequest
from server.response_store import ResponseNotFound, ResponseStore, StoredResponse
from tests.api.conftest import Server, assert_openai_error

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Rome"]},
               "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}
CALL_REGEX = r'\{"name": "get_weather", "parameters": \{"city": "(Paris|Rome)", "unit": "c"\}\}'
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def sdk(tools_server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=tools_server.v1, api_key="none", max_retries=0, timeout=60) as c:
        yield c


def _post(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.v1}/responses", json={"model": "tiny", **body}, timeout=60)


def _events(r: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event, checking that the name is the data's type."""
    events, name = [], None
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data = json.loads(line[len("data:"):])
            assert data["type"] == name, (name, data)
            events.append((name, data))
    return events


def _prompt_tokens(server: Server, messages: list[dict[str, Any]], **extra: Any) -> int:
    r = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", "messages": messages,
                                                         **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_a_text_answer_is_chats_answer(sdk: OpenAI, tools_server: Server) -> None:
    """instructions + input are chat's system + user messages: the same prompt (its token
    count) and, greedy, the same answer; usage counts it; the budget's end is "incomplete"."""
    r = sdk.responses.create(model="tiny", instructions="Be brief.", input=ASK, temperature=0,
                             max_output_tokens=12)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}]
    chat = sdk.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                       temperature=0, max_completion_tokens=12)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert r.usage is not None and r.usage.input_tokens == _prompt_tokens(tools_server, messages)
    assert r.usage.output_tokens == 12 and r.usage.total_tokens == r.usage.input_tokens + 12
    assert r.status == "incomplete" and item.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.instructions == "Be brief." and r.max_output_tokens == 12 and r.temperature == 0
    assert r.store is True and r.previous_response_id is None  # (--responses-store)


def test_a_finished_answer_is_completed(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=40,
                             extra_body={"structured_outputs": {"regex": "It is sunny\\."}},
                             metadata={"run": "7"})
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output_text == "It is sunny." and r.output[0].status == "completed"
    assert r.metadata == {"run": "7"}


def test_the_stream_is_the_sdks(sdk: OpenAI) -> None:
    """The SDK's stream helper assembles the events into the same response as its final
    one: created, in_progress, the message item and its part, one delta per token, done
    events, completed; numbered in order."""
    with sdk.responses.stream(model="tiny", input=ASK, temperature=0,
                              max_output_tokens=10) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == len(kinds) - 8 and len(deltas) > 1  # each token as it comes
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in deltas) == final.output_text
    [item] = final.output
    assert all(e.item_id == item.id for e in deltas)
    plain = sdk.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=10)
    assert final.output_text == plain.output_text and final.status == "incomplete"
    assert final.usage is not None and final.usage.output_tokens == 10


def test_raw_stream_names_each_event_and_sends_no_done(tools_server: Server) -> None:
    """Also: the response is named after the request's X-Request-Id, as vLLM names it."""
    r = httpx.post(f"{tools_server.v1}/responses", headers={"X-Request-Id": "abc-1"},
                   json={"input": ASK, "max_output_tokens": 3, "stream": True}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert "[DONE]" not in r.text and events[-1][0] == "response.completed"
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    # (with a random tag where responses are stored: a stored id must be unique)
    assert completed["id"] == created["id"] and created["id"].startswith("resp_abc-1_")
    assert completed["usage"]["output_tokens"] == 3


def test_logprobs_come_when_included(sdk: OpenAI) -> None:
    r = sdk.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=4,
                             include=["message.output_text.logprobs"], top_logprobs=2)
    [part] = r.output[0].content  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert len(part.logprobs) == 4 and "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:
        assert len(lp.top_logprobs) == 2 and lp.logprob <= 0
        assert lp.logprob == max(lp.logprob, *(t.logprob for t in lp.top_logprobs))  # greedy
    plain = sdk.responses.create(model="tiny", input=ASK, max_output_tokens=2)
    assert plain.output[0].content[0].logprobs is None  # type: ignore[union-attr]



def test_streamed_logprobs_are_every_tokens(sdk: OpenAI) -> None:
    """Streamed, each token's logprob comes with its delta, also a token of no text (the eos
    a guide ends with): the same entries as the whole response's."""
    kwargs: dict[str, Any] = dict(
        model="tiny", input=ASK, temperature=0, max_output_tokens=40, top_logprobs=1,
        include=["message.output_text.logprobs"],
        extra_body={"structured_outputs": {"regex": "It is sunny\\."}})
    whole = sdk.responses.create(**kwargs)
    with sdk.responses.stream(**kwargs) as s:
        streamed = [lp for e in s if e.type == "response.output_text.delta"
                    for lp in e.logprobs]
        final = s.get_final_response()
    expected = whole.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert whole.status == "completed" and expected is not None and whole.usage is not None
    assert len(expected) == whole.usage.output_tokens  # the eos's included
    assert [(lp.token, lp.logprob) for lp in streamed] == [
        (lp.token, lp.logprob) for lp in expected]
    assert final.output[0].content[0].logprobs == expected  # type: ignore[union-attr]


def test_a_conversation_with_calls_is_chats(sdk: OpenAI, tools_server: Server) -> None:
    """Earlier turns as items: a developer message is the system's, a function_call an
    assistant turn's tool call, its output a tool message; the prompt is chat's."""
    call_args = '{"city": "Paris", "unit": "c"}'
    items = [{"role": "developer", "content": "Use tools."},
             {"role": "user", "content": [{"type": "input_text", "text": ASK}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": call_args},
             {"type": "function_call_output", "call_id": "call_1", "output": "21 C, sunny"}]
    r = sdk.responses.create(model="tiny", input=items, tools=[WEATHER],  # type: ignore
                             tool_choice="none", max_output_tokens=1)
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": ASK},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": call_args}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}]
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert r.usage is not None
    assert r.usage.input_tokens == _prompt_tokens(tools_server, messages, tools=tools)


def test_an_answers_items_go_back_as_input(sdk: OpenAI, tools_server: Server) -> None:
    """The SDK's way through a tool call: the output items sent back as they came (ids,
    statuses, annotations and all), the call's output after them; a text answer too."""
    r = sdk.responses.create(model="tiny", input=ASK, tools=[WEATHER], max_output_tokens=60,
                             tool_choice={"type": "function", "name": "get_weather"})
    [call] = r.output
    assert call.type == "function_call"
    items: list[Any] = [{"role": "user", "content": ASK}, *[i.model_dump() for i in r.output],
                        {"type": "function_call_output", "call_id": call.call_id,
                         "output": "sunny"}]
    then = sdk.responses.create(model="tiny", input=items, tools=[WEATHER],
                                tool_choice="none", max_output_tokens=4)
    assert then.status == "incomplete" and then.usage is not None
    messages = [{"role": "user", "content": ASK},
                {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert then.usage.input_tokens == _prompt_tokens(tools_server, messages, tools=tools)
    items = [*items, *[i.model_dump() for i in then.output], {"role": "user", "content": "ok"}]
    last = sdk.responses.create(model="tiny", input=items, tools=[WEATHER], tool_choice="none",
                                max_output_tokens=1)
    messages += [{"role": "assistant", "content": then.output_text},
                 {"role": "user", "content": "ok"}]
    assert last.usage is not None
    assert last.usage.input_tokens == _prompt_tokens(tools_server, messages, tools=tools)


def test_an_unfinished_answer_is_continued(sdk: OpenAI, tools_server: Server) -> None:
    """An assistant message in progress at the end of the input is continued (chat's
    continue_final_message), not answered in a new turn."""
    items = [{"role": "user", "content": ASK},
             {"role": "assistant", "status": "incomplete",
              "content": [{"type": "output_text", "text": "It is"}]}]
    r = sdk.responses.create(model="tiny", input=items, max_output_tokens=1)  # type: ignore
    messages = [{"role": "user", "content": ASK}, {"role": "assistant", "content": "It is"}]
    assert r.usage is not None and r.usage.input_tokens == _prompt_tokens(
        tools_server, messages, add_generation_prompt=False, continue_final_message=True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_is_a_function_call(sdk: OpenAI, stream: bool) -> None:
    """Its arguments follow the tool's schema; streamed, they come as they are made."""
    kwargs: dict[str, Any] = dict(model="tiny", input=ASK, tools=[WEATHER, TIME],
                                  tool_choice={"type": "function", "name": "get_weather"},
                                  temperature=0.9, max_output_tokens=60)
    if stream:
        with sdk.responses.stream(**kwargs) as s:
            events = list(s)
            r = s.get_final_response()
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert len(deltas) > 1 and "".join(deltas) == r.output[0].arguments  # type: ignore
        [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.arguments == "".join(deltas)
    else:
        r = sdk.responses.create(**kwargs)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")  # type: ignore
    arguments = json.loads(call.arguments)
    assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("c", "f")
    assert r.status == "completed" and call.status == "completed" and r.output_text == ""


@pytest.mark.parametrize("stream", [False, True])
def test_required_is_calls_whole(sdk: OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model="tiny", input=ASK, tools=[WEATHER, TIME],
                                  tool_choice="required", parallel_tool_calls=False,
                                  temperature=0, max_output_tokens=300)
    if stream:
        with sdk.responses.stream(**kwargs) as s:
            events = list(s)
            r = s.get_final_response()
        deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
        assert len(deltas) == 1  # found in the finished answer: one piece
    else:
        r = sdk.responses.create(**kwargs)
    [call] = r.output
    assert call.type == "function_call" and call.name in ("get_weather", "get_time")
    assert set(json.loads(call.arguments)) == (
        {"city", "unit"} if call.name == "get_weather" else {"zone"})


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_a_call_in_the_answer(sdk: OpenAI, stream: bool) -> None:
    """With --tool-call-parser llama3_json, an answer that is a call (made one, here, by a
    regex) is a function_call item; other text a message."""
    for regex, kind in ((CALL_REGEX, "function_call"), ("It is sunny\\.", "message")):
        kwargs: dict[str, Any] = dict(model="tiny", input=ASK, tools=[WEATHER], temperature=0,
                                      max_output_tokens=60,
                                      extra_body={"structured_outputs": {"regex": regex}})
        if stream:
            with sdk.responses.stream(**kwargs) as s:
                kinds = [e.type for e in s]
                response = s.get_final_response().model_dump()
            assert kinds.count("response.output_item.added") == 1, kinds
        else:
            response = sdk.responses.create(**kwargs).model_dump()
        [item] = response["output"]
        assert item["type"] == kind and response["status"] == "completed"
        if kind == "function_call":
            assert item["name"] == "get_weather"
            assert json.loads(item["arguments"]) in ({"city": "Paris", "unit": "c"},
                                                     {"city": "Rome", "unit": "c"})
        else:
            assert item["content"][0]["text"] == "It is sunny."


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    celsius: int


def test_text_format_json_schema(sdk: OpenAI) -> None:
    """The SDK's parse(): the output follows the schema and parses into the model."""
    r = sdk.responses.parse(model="tiny", input=ASK, text_format=Weather, temperature=0.8,
                            max_output_tokens=200)
    assert isinstance(r.output_parsed, Weather)
    assert r.text is not None and r.text.format.type == "json_schema"  # echoed
    # Any object: a random model rarely closes one soon; what came must start one
    obj = sdk.responses.create(model="tiny", input=ASK, temperature=0, max_output_tokens=10,
                               text={"format": {"type": "json_object"}})
    any_object = compile_guide(GuideSpec("json_object", None, "test")).dfa
    assert obj.output_text.startswith("{") and any_object.walk(0, obj.output_text.encode()) >= 0


def test_truncation_auto_keeps_the_prompts_end(tools_server: Server) -> None:
    """A prompt longer than the context keeps its last tokens, room left for the output: the
    greedy answer is that of a completion of the chat prompt's last 4096 - 8 ids."""
    long = " ".join(f"weather{i % 89} city{i % 7}" for i in range(2500))
    assert_openai_error(_post(tools_server, {"input": long, "max_output_tokens": 8}), 400)
    r = _post(tools_server, {"input": long, "max_output_tokens": 8, "truncation": "auto",
                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == 4096 - 8
    ids = httpx.post(f"{tools_server.base_url}/tokenize", json={
        "model": "tiny", "messages": [{"role": "user", "content": long}]},
        timeout=60).json()["tokens"]
    assert len(ids) > 4096
    same = httpx.post(f"{tools_server.v1}/completions", json={
        "model": "tiny", "prompt": ids[-(4096 - 8):], "max_tokens": 8, "temperature": 0},
        timeout=60).json()["choices"][0]["text"]
    text = "".join(part["text"] for item in r.json()["output"] for part in item["content"])
    assert text == same
    # Without a budget, the room is what min_tokens asks for (the output then has the rest)
    r = _post(tools_server, {"input": long, "min_tokens": 5, "truncation": "auto"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == 4096 - 5


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"background": True}, "background", "not supported"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input", "no message"),
    ({"input": [{"type": "reasoning", "summary": [], "content": [{"type": "summary_text"}]}]},
     "input", "reasoning_text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "'input_image'"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
     "input", "JSON object"),
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     "nope"),
    ({"tools": [WEATHER], "tool_choice": "required", "text": {"format": {
        "type": "json_object"}}}, "text.format", "only one constraint"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "$ref": "#/nowhere"}}}}, "text.format", "text.format"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"max_output_tokens": 5000}, "input", "maximum context length"),
    ({"input": []}, "input", "at least 1"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
    ({"conversation": "conv_1"}, "conversation", "not supported"),
    ({"min_tokens": 5, "max_output_tokens": 2}, "min_tokens", "<= max_output_tokens (2)"),
])
def test_requests_that_cannot_be_served(tools_server: Server, body: dict[str, Any],
                                        param: str, words: str) -> None:
    error = assert_openai_error(_post(tools_server, {"input": ASK, **body}), 400)
    assert error["param"] == param and words in error["message"], error
    assert "response_format" not in error["message"]
    assert "max_completion_tokens" not in error["message"] and "max_tokens" not in error["message"]


def test_auto_needs_the_parser(server: Server, auth: dict[str, str]) -> None:
    """As chat: tools with tool_choice "auto" (the default) need --enable-auto-tool-choice;
    "none" answers text."""
    url, body = f"{server.v1}/responses", {"model": "tiny", "input": ASK, "tools": [WEATHER],
                                           "max_output_tokens": 3}
    error = assert_openai_error(httpx.post(url, json=body, headers=auth, timeout=60), 400)
    assert error["param"] == "tool_choice" and "--enable-auto-tool-choice" in error["message"]
    r = httpx.post(url, json={**body, "tool_choice": "none"}, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["output"][0]["type"] == "message"


def test_the_input_as_chat_messages() -> None:
    """The request's reading as chat: instructions first; calls in a row share one assistant
    turn; parts joined by newlines; the sampling controls (chat's own fields) pass through;
    reasoning.effort reaches the template."""
    request = ResponsesRequest.model_validate({
        "instructions": "sys", "top_k": 5, "seed": 3, "stop": ["x"], "temperature": 0.3,
        "reasoning": {"effort": "low"},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                               {"type": "input_text", "text": "b"}]},
                  {"type": "function_call", "call_id": "1", "name": "f", "arguments": "{}"},
                  {"type": "function_call", "call_id": "2", "name": "g", "arguments": ""},
                  {"type": "function_call_output", "call_id": "1", "output": "r1"},
                  {"type": "function_call_output", "call_id": "2",
                   "output": [{"type": "input_text", "text": "r2"}]}]})
    messages = request.messages()
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[1] == {"role": "user", "content": "a\nb"}
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["1", "2"]
    assert messages[3:] == [{"role": "tool", "content": "r1", "tool_call_id": "1"},
                            {"role": "tool", "content": "r2", "tool_call_id": "2"}]
    chat = request.chat_request()
    assert (chat.top_k, chat.seed, chat.stop, chat.temperature, chat.tool_mode) == (
        5, 3, ["x"], 0.3, "none")
    assert chat.chat_template_kwargs == {"reasoning_effort": "low"}  # (as vLLM passes it)
    assert chat.add_generation_prompt and not chat.continue_final_message
    # "auto" is OpenAI's default, sent without tools too: it asks for nothing
    plain = ResponsesRequest.model_validate({"input": "x", "tool_choice": "auto"})
    assert plain.chat_request().tool_mode == "none"


# --- stored responses (--responses-store 4 on tools_server) ----------------------------------


def test_previous_response_id_continues_the_conversation(sdk: OpenAI,
                                                         tools_server: Server) -> None:
    """A turn after a stored response is read as the whole conversation: its turns' input
    and output, then the new input; each turn's instructions its own (not carried over)."""
    first = sdk.responses.create(model="tiny", instructions="Be brief.", input=ASK,
                                 max_output_tokens=3)
    second = sdk.responses.create(model="tiny", instructions="Answer in French.",
                                  input="And Rome?", previous_response_id=first.id,
                                  max_output_tokens=3)
    assert second.previous_response_id == first.id and second.store is True
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And Rome?"}]
    assert second.usage is not None and second.usage.input_tokens == _prompt_tokens(
        tools_server, [{"role": "system", "content": "Answer in French."}, *history])
    with sdk.responses.stream(model="tiny", input="Thanks.", previous_response_id=second.id,
                              max_output_tokens=2) as stream:
        third = stream.get_final_response()
    history += [{"role": "assistant", "content": second.output_text},
                {"role": "user", "content": "Thanks."}]
    assert third.usage is not None
    assert third.usage.input_tokens == _prompt_tokens(tools_server, history)
    kept = sdk.responses.retrieve(third.id)  # a streamed response is stored too
    assert kept.output_text == third.output_text and kept.usage == third.usage
    assert kept.previous_response_id == second.id and kept.status == third.status


def test_a_call_and_its_output_across_turns(sdk: OpenAI, tools_server: Server) -> None:
    """The SDK's tool loop with stored responses: the call's output is the next input."""
    r = sdk.responses.create(model="tiny", input=ASK, tools=[WEATHER], max_output_tokens=60,
                             tool_choice={"type": "function", "name": "get_weather"})
    [call] = r.output
    assert call.type == "function_call"
    then = sdk.responses.create(
        model="tiny", previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        max_output_tokens=1)
    messages = [{"role": "user", "content": ASK},
                {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                 "function": {"name": "get_weather", "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert then.usage is not None
    assert then.usage.input_tokens == _prompt_tokens(tools_server, messages, tools=tools)


def test_input_items_are_listed_as_openai_pages_them(sdk: OpenAI,
                                                     tools_server: Server) -> None:
    """GET /v1/responses/{id}/input_items through the SDK: the request's own input (not
    an earlier turn's, not instructions), newest first by default, paged by `after`."""
    first = sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1)
    r = sdk.responses.create(
        model="tiny", previous_response_id=first.id, instructions="Be brief.",
        max_output_tokens=1, input=[
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Rome"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"role": "assistant", "content": "It rains."},
            {"role": "user", "content": [{"type": "input_text", "text": "And tomorrow?"}]}])
    newest = list(sdk.responses.input_items.list(r.id))
    assert [item.type for item in newest] == [
        "message", "message", "function_call_output", "function_call"]
    assert newest[0].content[0].text == "And tomorrow?" and newest[0].role == "user"
    assert newest[1].role == "assistant" and newest[1].content[0].type == "output_text"
    assert newest[2].output == "rain" and newest[3].name == "get_weather"
    paged = list(sdk.responses.input_items.list(r.id, order="asc", limit=1))  # 4 pages
    assert [item.id for item in paged] == [item.id for item in reversed(newest)]
    assert len({item.id for item in paged}) == 4
    [asked] = sdk.responses.input_items.list(first.id).data  # a string input: one message
    assert asked.type == "message" and asked.content[0].text == ASK
    url = f"{tools_server.v1}/responses/{r.id}/input_items"
    page = httpx.get(url, params={"limit": 2}, timeout=60).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert page["first_id"] == newest[0].id and page["last_id"] == newest[1].id
    assert assert_openai_error(httpx.get(url, params={"after": "msg_x"}, timeout=60),
                               400)["param"] == "after"
    assert_openai_error(httpx.get(url, params={"limit": 0}, timeout=60), 400)
    assert_openai_error(httpx.get(f"{tools_server.v1}/responses/resp_gone/input_items",
                                  timeout=60), 404)


def test_store_false_and_delete(sdk: OpenAI, tools_server: Server) -> None:
    unstored = sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1, store=False)
    assert unstored.store is False
    r = httpx.get(f"{tools_server.v1}/responses/{unstored.id}", timeout=60)
    assert "not found" in assert_openai_error(r, 404)["message"]
    kept = sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1)
    assert sdk.responses.retrieve(kept.id).id == kept.id
    r = httpx.delete(f"{tools_server.v1}/responses/{kept.id}", timeout=60)
    assert r.status_code == 200 and r.json() == {
        "id": kept.id, "object": "response.deleted", "deleted": True}
    assert_openai_error(httpx.get(f"{tools_server.v1}/responses/{kept.id}", timeout=60), 404)
    assert_openai_error(httpx.delete(f"{tools_server.v1}/responses/{kept.id}", timeout=60), 404)
    error = assert_openai_error(_post(tools_server, {
        "input": "more", "previous_response_id": kept.id}), 404)
    assert error["param"] == "previous_response_id" and kept.id in error["message"]
    assert error["code"] == "previous_response_not_found"


def test_the_store_keeps_the_last_n(sdk: OpenAI, tools_server: Server) -> None:
    """Four kept: older responses go; a turn continuing one whose earlier turn has gone
    says so."""
    first = sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1)
    second = sdk.responses.create(model="tiny", input="more", max_output_tokens=1,
                                  previous_response_id=first.id)
    for _ in range(3):
        sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1)
    assert_openai_error(httpx.get(f"{tools_server.v1}/responses/{first.id}", timeout=60), 404)
    assert sdk.responses.retrieve(second.id).id == second.id
    error = assert_openai_error(_post(tools_server, {
        "input": "again", "previous_response_id": second.id}), 404)
    assert "no longer stored" in error["message"] and first.id in error["message"]


def test_without_a_store(long_server: Server, auth: dict[str, str]) -> None:
    """The default (vLLM's): nothing kept, store answered false, the response named after
    the X-Request-Id as vLLM names it; previous_response_id is a 400 that names the flag; a
    lookup a 404 that says why. (long_server has neither store nor embeddings: the shared
    server has both, for the fuzzer.)"""
    url = f"{long_server.v1}/responses"
    r = httpx.post(url, json={"model": "tiny", "input": ASK, "max_output_tokens": 1},
                   headers={**auth, "X-Request-Id": "abc-2"}, timeout=60)
    assert r.status_code == 200 and r.json()["store"] is False
    assert r.json()["id"] == "resp_abc-2"
    error = assert_openai_error(httpx.post(url, json={
        "model": "tiny", "input": ASK, "previous_response_id": r.json()["id"]},
        headers=auth, timeout=60), 400)
    assert error["param"] == "previous_response_id" and "--responses-store" in error["message"]
    for method in ("GET", "DELETE"):
        error = assert_openai_error(httpx.request(method, f"{url}/{r.json()['id']}",
                                                  headers=auth, timeout=60), 404)
        assert "--responses-store" in error["message"]


def test_the_store_alone() -> None:
    """Least recently used goes first; a chain is rebuilt oldest turn first, and then is the
    most recently used, oldest first (dropped, it loses its first turn, not a middle one);
    the text held is capped too; an id is stored once."""
    def response(id_: str, previous: str | None = None, text: str = "") -> StoredResponse:
        return StoredResponse(ResponseObject(id=id_, model="m", previous_response_id=previous),
                              [MessageItem(role="user", content=id_ + text)])

    store = ResponseStore(3)
    store.put(response("a"))
    store.put(response("b", "a"))
    store.put(response("c", "b"))
    assert [item.text for item in store.conversation("c", "p")] == ["a", "b", "c"]  # type: ignore
    store.put(response("d", "c"))  # the chain's first turn goes
    assert "a" not in store and all(x in store for x in "bcd")
    with pytest.raises(ResponseNotFound, match="continues 'a', which is no longer stored"):
        store.conversation("d", "p")
    store.get("b")
    store.put(response("e"))  # c is now the least recently used
    assert "c" not in store and "b" in store and len(store) == 3
    with pytest.raises(ValueError, match="stored already"):
        store.put(response("e"))
    store.delete("e")
    with pytest.raises(ResponseNotFound, match="deleted, or dropped"):
        store.get("e")
    small = ResponseStore(10, text_budget=2 * response("x", text="y" * 1000).size)
    for id_ in "xyz":
        small.put(response(id_, text="y" * 1000))
    assert len(small) == 2 and "x" not in small


def test_stored_ids_are_unique(sdk: OpenAI, tools_server: Server) -> None:
    """Two responses of one X-Request-Id are two stored responses."""
    ids = [sdk.responses.create(model="tiny", input=ASK, max_output_tokens=1,
                                extra_headers={"X-Request-Id": "same/id"}).id
           for _ in range(2)]
    assert ids[0] != ids[1] and all(i.startswith("resp_same/id_") for i in ids)
    for response_id in ids:  # (an id with a "/" is found too)
        r = httpx.get(f"{tools_server.v1}/responses/{response_id}", timeout=60)
        assert r.status_code == 200 and r.json()["id"] == response_id


def test_a_continued_answer_is_one_message_in_the_next_turn(sdk: OpenAI,
                                                            tools_server: Server) -> None:
    items = [{"role": "user", "content": ASK},
             {"role": "assistant", "status": "incomplete", "content": "It is"}]
    r = sdk.responses.create(model="tiny", input=items, max_output_tokens=2)  # type: ignore
    then = sdk.responses.create(model="tiny", input="Thanks.", previous_response_id=r.id,
                                max_output_tokens=1)
    messages = [{"role": "user", "content": ASK},
                {"role": "assistant", "content": "It is" + r.output_text},
                {"role": "user", "content": "Thanks."}]
    assert then.usage is not None
    assert then.usage.input_tokens == _prompt_tokens(tools_server, messages)


def test_history_comes_before_the_input() -> None:
    """The earlier turns' items, then the input; only this request's instructions."""
    request = ResponsesRequest.model_validate({"instructions": "now", "input": "third"})
    history = [MessageItem(role="user", content="first"),
               MessageItem(role="assistant", content="second")]
    assert request.messages(history) == [
        {"role": "system", "content": "now"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"}, {"role": "user", "content": "third"}]
