"""Guided decoding over HTTP: OpenAI's response_format (the SDK's `parse` with a pydantic
model), vLLM's structured_outputs and guided_* fields, streamed and not, on both endpoints,
and the 400s for what cannot be compiled. The tiny model's weights are random: whatever it
would write, the output follows the constraint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel

from server.guided.spec import GuideSpec, compile_guide
from tests.api.conftest import API_KEY, Server, assert_openai_error, sse_data

USER = [{"role": "user", "content": "Describe a pet."}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    indoor: bool
    legs: Literal[0, 2, 4]


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sdk_parse_fills_a_pydantic_model(sdk: OpenAI, temperature: float) -> None:
    """`chat.completions.parse(response_format=Pet)` sends a strict json_schema (all
    properties required, additionalProperties false) and validates the answer into Pet."""
    r = sdk.chat.completions.parse(model="tiny", messages=USER, response_format=Pet,
                                   temperature=temperature, seed=5, max_completion_tokens=60)
    [choice] = r.choices
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Pet)


def test_json_object_on_chat_and_completions(sdk: OpenAI) -> None:
    """Any JSON object: a random model rarely closes one within a few tokens, so what came,
    cut by max_tokens, must be the start of one."""
    chat = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=10,
                                       response_format={"type": "json_object"}, temperature=0)
    completion = sdk.completions.create(model="tiny", prompt="x", max_tokens=10, temperature=1,
                                        extra_body={"response_format": {"type": "json_object"}})
    any_object = compile_guide(GuideSpec("json_object", None, "test")).dfa
    for text in (chat.choices[0].message.content or "", completion.choices[0].text):
        assert text.startswith("{") and any_object.walk(0, text.encode()) >= 0, text


@pytest.mark.parametrize("fields", [
    {"guided_choice": ["red", "green", "blue sky"]},
    {"structured_outputs": {"choice": ["red", "green", "blue sky"]}},
])
def test_choice_completion(sdk: OpenAI, fields: dict) -> None:
    r = sdk.completions.create(model="tiny", prompt="My favourite colour is", max_tokens=20,
                               n=3, temperature=1.0, seed=11, extra_body=fields)
    for choice in r.choices:
        assert choice.text in ("red", "green", "blue sky") and choice.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_regex_streamed_and_not(client: httpx.Client, stream: bool) -> None:
    """The streamed deltas join to a full match; the usage counts the guided tokens."""
    pattern = r"[A-Z][a-z]{2,5} [0-9]{1,2}(?:st|nd|rd|th)"
    body = {"model": "tiny", "prompt": "Date:", "max_tokens": 30, "temperature": 0.7,
            "seed": 2, "guided_regex": pattern, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
        text = "".join(c["choices"][0]["text"] for c in events if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in events if c["choices"]][-1]
        usage = events[-1]["usage"]
    else:
        text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        usage = r.json()["usage"]
    assert re.fullmatch(pattern, text) and finish == "stop", text
    assert usage["completion_tokens"] >= 2


ANSWER = 'root ::= "The answer is " word "."\nword ::= "yes" | "no" | "maybe so"'


@pytest.mark.parametrize("fields", [
    {"grammar": ANSWER},  # llama.cpp's field
    {"guided_grammar": ANSWER},
    {"structured_outputs": {"grammar": ANSWER}},
])
def test_grammar_on_both_endpoints(client: httpx.Client, fields: dict) -> None:
    for path, body in (("/v1/completions", {"prompt": "Q:"}),
                       ("/v1/chat/completions", {"messages": USER})):
        r = client.post(path, json={"model": "tiny", "max_tokens": 30, "temperature": 1.0,
                                    "seed": 3, "n": 2, **body, **fields})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert re.fullmatch(r"The answer is (yes|no|maybe so)\.", text), text
            assert choice["finish_reason"] == "stop"


NESTED = 'root ::= list\nlist ::= "[" (item ("," item)*)? "]"\nitem ::= [0-9]{1,3} | list'


def test_a_recursive_grammar_streamed(client: httpx.Client) -> None:
    """Nested lists on a chat stream (llama.cpp's field), cut by max_tokens: the deltas join
    to the start of what the grammar writes."""
    r = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": 4,
        "stream": True, "grammar": NESTED})
    assert r.status_code == 200, r.text
    events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events)
    dfa = compile_guide(GuideSpec("grammar", NESTED, "test")).dfa
    assert text.startswith("[") and dfa.walk(0, text.encode()) >= 0, text


def test_a_schema_sent_again_is_compiled_once(client: httpx.Client) -> None:
    """Agents send one schema over and over: the second request finds it compiled, and
    guided and unguided requests share the batch."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2, 3]}},
              "required": ["n"]}
    for _ in range(2):
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": USER, "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "n", "schema": schema}}})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["message"]["content"])["n"] in (1, 2, 3)


@pytest.mark.parametrize(("fields", "param", "fragment"), [
    ({"guided_regex": "(?<=a)b"}, "guided_regex", "lookarounds"),
    ({"guided_regex": "[ab]*a[ab]{15}"}, "guided_regex", "too large"),
    ({"guided_json": {"type": "object", "properties": {"a": {"not": {}}}}}, "guided_json",
     "'not'"),
    ({"guided_json": "{"}, "guided_json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice",
     "only one constraint"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "response_format",
     "only one constraint"),
    ({"guided_grammar": "root ::= 'a' b"}, "guided_grammar", "'b', which is not defined"),
    ({"grammar": "start: /a+/"}, "grammar", "regular expressions (/.../, Lark's)"),
    ({"structured_outputs": {"grammar": 'root ::= "a"\nx ::= [b-a]'}},
     "structured_outputs.grammar", "line 2: bad range"),
    ({"guided_json": {"allOf": [True]}}, "guided_json", "not a schema this server can read"),
    ({"guided_json": {"type": "object", "properties": {"a": {}}, "required": 5}},
     "guided_json", "list of property names"),
    ({"structured_outputs": {}}, "structured_outputs", "must give one of"),
    ({"guided_choice": ["a"], "guided_whitespace_pattern": "[ ]*"}, "guided_whitespace_pattern",
     "not supported"),
])
def test_what_cannot_be_compiled_is_a_400(client: httpx.Client, fields: dict, param: str,
                                          fragment: str) -> None:
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": USER})):
        r = client.post(path, json={"model": "tiny", "max_tokens": 4, **body, **fields})
        error = assert_openai_error(r, 400)
        assert error["param"] == param and fragment in error["message"], error
