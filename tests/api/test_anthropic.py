"""Anthropic's Messages API over HTTP (POST /v1/messages, /v1/messages/count_tokens), through
Anthropic's own Python SDK where it can go: the answers are chat's for the same ask, in
Anthropic's shapes, streamed as its named events; errors are Anthropic's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.api.conftest import API_KEY, Server

HELLO = [{"role": "user", "content": "Say hello"}]
# The SDK's create() no longer takes sampling fields (newer Claude models fix them); the API
# still reads them, as vLLM and llama.cpp do: sent as extra body fields
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Rome"]},
               "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city", "unit"]}}


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[anthropic.Anthropic]:
    """The SDK against the shared server: its key goes as x-api-key."""
    with anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0,
                             timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tool_sdk(tools_server: Server) -> Iterator[anthropic.Anthropic]:
    """The SDK against the server with Llama 3.1's template and a tool parser."""
    with anthropic.Anthropic(base_url=tools_server.base_url, api_key="none", max_retries=0,
                             timeout=60) as c:
        yield c


def chat(client: httpx.Client, **fields: object) -> dict:
    r = client.post("/v1/chat/completions", json={"temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_message_is_chats_answer_in_anthropics_shape(sdk: anthropic.Anthropic,
                                                       client: httpx.Client) -> None:
    raw = sdk.messages.with_raw_response.create(model="tiny", max_tokens=12, messages=HELLO,
                                                extra_body=GREEDY)
    message = raw.parse()
    want = chat(client, messages=HELLO, max_tokens=12)
    [block] = message.content
    assert block.type == "text" and block.text == want["choices"][0]["message"]["content"]
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert message.model == "tiny" and message.type == "message"
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == want["usage"]["prompt_tokens"]
    assert usage.output_tokens == 12
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert message.id == f"msg_{raw.headers['request-id']}"


def test_the_system_prompt_and_turns_are_chats_messages(sdk: anthropic.Anthropic,
                                                        client: httpx.Client) -> None:
    turns = [{"role": "user", "content": [{"type": "text", "text": "Hi. "},
                                          {"type": "text", "text": "Who are you?"}]},
             {"role": "assistant", "content": "A model."},
             {"role": "user", "content": "Say more"}]
    message = sdk.messages.create(model="tiny", max_tokens=8, extra_body=GREEDY, messages=turns,
                                  system=[{"type": "text", "text": "Be brief."}])
    want = chat(client, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi. Who are you?"},
        {"role": "assistant", "content": "A model."}, {"role": "user", "content": "Say more"}])
    assert message.content[0].text == want["choices"][0]["message"]["content"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == \
        want["usage"]["prompt_tokens"]


def test_a_last_assistant_turn_is_a_prefill_the_answer_continues(
        sdk: anthropic.Anthropic, client: httpx.Client) -> None:
    turns = [*HELLO, {"role": "assistant", "content": "Hello, I am"}]
    message = sdk.messages.create(model="tiny", max_tokens=6, extra_body=GREEDY, messages=turns)
    want = chat(client, max_tokens=6, messages=turns, add_generation_prompt=False,
                continue_final_message=True)
    assert message.content[0].text == want["choices"][0]["message"]["content"]


def test_an_empty_last_assistant_turn_is_no_prefill(sdk: anthropic.Anthropic) -> None:
    """Anthropic allows one (or one of thinking alone): the answer opens a turn as usual."""
    plain = sdk.messages.count_tokens(model="tiny", messages=HELLO).input_tokens  # type: ignore
    for content in ([], "", [{"type": "thinking", "thinking": "hm", "signature": "s"}]):
        turns = [*HELLO, {"role": "assistant", "content": content}]
        assert sdk.messages.count_tokens(model="tiny",  # type: ignore
                                         messages=turns).input_tokens == plain


def test_a_stop_sequence_is_named(sdk: anthropic.Anthropic) -> None:
    text = sdk.messages.create(model="tiny", max_tokens=24, extra_body=GREEDY,
                               messages=HELLO).content[0].text
    word = text[8:11]
    assert word.strip(), text
    message = sdk.messages.create(model="tiny", max_tokens=24, extra_body=GREEDY, messages=HELLO,
                                  stop_sequences=[word])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == word
    assert message.content[0].text == text[:text.index(word)]


def test_the_stream_is_anthropics_events_in_order(sdk: anthropic.Anthropic,
                                                  server: Server) -> None:
    whole = sdk.messages.create(model="tiny", max_tokens=10, extra_body=GREEDY, messages=HELLO)
    with sdk.messages.stream(model="tiny", max_tokens=10, extra_body=GREEDY,
                             messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10
    # the usage streamed is the answer's (message_delta's input split by the prefix cache)
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (
        whole.usage.input_tokens, whole.usage.cache_read_input_tokens)
    with httpx.stream("POST", f"{server.base_url}/v1/messages", timeout=60,
                      headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
                      json={"model": "tiny", "max_tokens": 10, "temperature": 0,
                            "messages": HELLO, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines
             if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert datas[0]["message"]["content"] == [] and datas[0]["message"]["usage"][
        "input_tokens"] > 0
    assert datas[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


def test_a_named_tool_is_a_tool_use_block(tool_sdk: anthropic.Anthropic) -> None:
    message = tool_sdk.messages.create(
        model="tiny", max_tokens=60, messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    [block] = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.id.startswith("toolu_")
    assert block.input["city"] in ("Paris", "Rome") and block.input["unit"] in ("c", "f")
    assert message.stop_reason == "tool_use"
    with tool_sdk.messages.stream(
            model="tiny", max_tokens=60, messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    [streamed] = final.content
    assert streamed.type == "tool_use" and set(streamed.input) == {"city", "unit"}
    assert final.stop_reason == "tool_use"


def test_any_tool_gives_whole_tool_use_blocks(tool_sdk: anthropic.Anthropic) -> None:
    for stream in (False, True):
        # (one call, greedy: a list of them may run past max_tokens, sampled where the
        # server's shared generator stands after whichever tests ran before)
        kwargs = dict(model="tiny", max_tokens=80, tools=[WEATHER],
                      tool_choice={"type": "any", "disable_parallel_tool_use": True},
                      messages=[{"role": "user", "content": "Weather in Rome?"}],
                      extra_body={"temperature": 0})
        if stream:
            with tool_sdk.messages.stream(**kwargs) as s:  # type: ignore[arg-type]
                message = s.get_final_message()
        else:
            message = tool_sdk.messages.create(**kwargs)  # type: ignore[arg-type]
        assert message.content and all(b.type == "tool_use" and b.name == "get_weather"
                                       for b in message.content)
        assert message.stop_reason == "tool_use"
        assert set(message.content[0].input) == {"city", "unit"}


def test_tool_results_are_chats_tool_messages(tool_sdk: anthropic.Anthropic,
                                              tools_server: Server) -> None:
    """A tool_use turn and its tool_result read as chat's assistant calls and tool message:
    count_tokens counts the same prompt /tokenize renders from chat's messages."""
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": [
                 {"type": "text", "text": "Let me look."},
                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                  "input": {"city": "Paris", "unit": "c"}}]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": "toolu_1",
                  "content": [{"type": "text", "text": "21 degrees"}]}]}]
    counted = tool_sdk.messages.count_tokens(model="tiny", messages=turns,  # type: ignore
                                             tools=[WEATHER], system="Be brief.")
    chat_messages = [
        {"role": "system", "content": "Be brief."}, turns[0],
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Paris",
                                                                "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21 degrees"}]
    r = httpx.post(f"{tools_server.base_url}/tokenize", json={
        "messages": chat_messages, "add_generation_prompt": True,
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}}]})
    assert counted.input_tokens == r.json()["count"]
    message = tool_sdk.messages.create(model="tiny", max_tokens=4, messages=turns,  # type: ignore
                                       tools=[WEATHER], tool_choice={"type": "none"})
    assert message.content[0].type == "text"


def test_output_config_json_schema_shapes_the_text(server: Server) -> None:
    schema = {"type": "object", "properties": {"ok": {"enum": [True, False]}},
              "required": ["ok"]}
    r = httpx.post(f"{server.base_url}/v1/messages", timeout=60, headers={"x-api-key": API_KEY},
                   json={"model": "tiny", "max_tokens": 40, "messages": HELLO,
                         "output_config": {"format": {"type": "json_schema",
                                                      "schema": schema}}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["content"][0]["text"])["ok"] in (True, False)


def anthropic_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert body["error"]["message"] and "Traceback" not in r.text
    return body["error"]


@pytest.mark.parametrize(("body", "status", "kind", "words"), [
    ({"messages": HELLO}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 0, "messages": HELLO}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}]},
     400, "invalid_request_error", "image blocks are not supported"),
    ({"max_tokens": 5, "messages": HELLO, "tools": [{"type": "web_search_20250305",
                                                      "name": "web_search",
                                                      "input_schema": {}}]},
     400, "invalid_request_error", "Anthropic's own tools"),
    ({"max_tokens": 5, "messages": HELLO, "tools": [WEATHER],
      "tool_choice": {"type": "auto"}}, 400, "invalid_request_error", "tool-call-parser"),
    ({"max_tokens": 5, "messages": HELLO, "stop_sequences": ["x"] * 17}, 400,
     "invalid_request_error", "stop_sequences"),
    ({"max_tokens": 5, "messages": HELLO, "model": "claude-opus"}, 404, "not_found_error",
     "claude-opus"),
    ({"max_tokens": 5000, "messages": HELLO}, 400, "invalid_request_error",
     "maximum context length"),
])
def test_bad_requests_get_anthropics_errors(server: Server, body: dict, status: int,
                                            kind: str, words: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/messages", timeout=60,
                   headers={"x-api-key": API_KEY}, json={"model": "tiny", **body})
    error = anthropic_error(r, status)
    assert error["type"] == kind and words in error["message"], error


def test_the_key_goes_as_x_api_key_or_bearer(server: Server) -> None:
    url = f"{server.base_url}/v1/messages"
    body = {"model": "tiny", "max_tokens": 2, "messages": HELLO}
    assert anthropic_error(httpx.post(url, json=body), 401)["type"] == "authentication_error"
    assert httpx.post(url, json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {API_KEY}"}
                      ).status_code == 200
    with anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError):
            c.messages.create(model="tiny", max_tokens=2, messages=HELLO)  # type: ignore


def test_the_sdk_raises_its_own_errors(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="claude-opus", max_tokens=2, messages=HELLO)  # type: ignore
    with pytest.raises(anthropic.BadRequestError, match="image"):
        sdk.messages.create(model="tiny", max_tokens=2, messages=[  # type: ignore
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
