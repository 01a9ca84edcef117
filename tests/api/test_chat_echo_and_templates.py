"""vLLM's chat extensions `echo` (the message the answer goes on from begins it) and a chat
template per request (`chat_template`, or `chat_template_kwargs.chat_template`), served only
under --trust-request-chat-template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.serving import UNTRUSTED_TEMPLATE
from tests.api.conftest import assert_openai_error, run_server, sse_data

PREFILLED = [{"role": "user", "content": "Tell me a story"},
             {"role": "assistant", "content": "Once upon a time"}]
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def chat(client: httpx.Client, **fields: Any) -> dict:
    r = client.post("/v1/chat/completions", json={"model": "tiny", "temperature": 0,
                                                  "max_tokens": 6, "ignore_eos": True,
                                                  **fields})
    assert r.status_code == 200, r.text
    return r.json()


def content(answer: dict) -> list[str | None]:
    return [c["message"]["content"] for c in answer["choices"]]


def test_echo_begins_the_answer_with_the_message_it_continues(client: httpx.Client) -> None:
    """An assistant's prefilled turn, continued: its text, then the continuation; the usage
    counts the continuation alone."""
    plain = chat(client, messages=PREFILLED, **CONTINUE, n=2)
    echoed = chat(client, messages=PREFILLED, **CONTINUE, n=2, echo=True)
    assert content(echoed) == ["Once upon a time" + text for text in content(plain)]
    assert echoed["usage"] == plain["usage"]
    # add_generation_prompt off: the last message is the answer's turn whatever its role
    user_last = {"messages": PREFILLED[:1], "add_generation_prompt": False}
    assert content(chat(client, **user_last, echo=True)) == [
        "Tell me a story" + text for text in content(chat(client, **user_last))]


def test_echo_of_another_turn_is_nothing(client: httpx.Client) -> None:
    """A new assistant turn (add_generation_prompt): the user's message is not the answer's."""
    assert content(chat(client, messages=PREFILLED[:1], echo=True)) == content(
        chat(client, messages=PREFILLED[:1]))


def test_a_streamed_echo_comes_after_the_roles(client: httpx.Client) -> None:
    body = {"model": "tiny", "messages": PREFILLED, **CONTINUE, "echo": True, "n": 2,
            "temperature": 0, "max_tokens": 6, "ignore_eos": True}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    deltas = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events]
    assert [d.get("role") for _, d in deltas[:2]] == ["assistant", "assistant"]
    assert deltas[2:4] == [(0, {"content": "Once upon a time"}),
                           (1, {"content": "Once upon a time"})]
    joined = ["".join(d.get("content") or "" for i, d in deltas if i == index)
              for index in (0, 1)]
    assert joined == content(chat(client, **{k: v for k, v in body.items() if k != "model"}))


@pytest.mark.parametrize("fields", [{"chat_template": TEMPLATE},
                                    {"chat_template_kwargs": {"chat_template": TEMPLATE}}])
def test_a_request_template_needs_the_servers_trust(client: httpx.Client,
                                                    fields: dict) -> None:
    for path, body in (("/v1/chat/completions", {"max_tokens": 2}), ("/tokenize", {})):
        error = assert_openai_error(client.post(path, json={
            "model": "tiny", "messages": PREFILLED[:1], **body, **fields}), 400)
        assert error["message"] == UNTRUSTED_TEMPLATE and error["param"] == "chat_template"


@pytest.fixture(scope="module")
def trusting(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[httpx.Client]:
    with (run_server(tiny_checkpoint, tmp_path_factory.mktemp("trusting"),
                     "--trust-request-chat-template", "--served-model-name", "tiny") as server,
          httpx.Client(base_url=server.base_url, timeout=60) as client):
        yield client


@pytest.mark.parametrize("fields", [{"chat_template": TEMPLATE},
                                    {"chat_template_kwargs": {"chat_template": TEMPLATE,
                                                              "unused": 1}}])
def test_a_trusted_request_template_renders_the_prompt(trusting: httpx.Client,
                                                       fields: dict) -> None:
    """The prompt is the request's template's text (not the model's), for /tokenize and
    the chat alike."""
    text = "[user] Tell me a story\n"
    want = trusting.post("/tokenize", json={"prompt": text,
                                            "add_special_tokens": False}).json()["tokens"]
    got = trusting.post("/tokenize", json={"messages": PREFILLED[:1], **fields}).json()
    assert got["tokens"] == want
    answer = chat(trusting, messages=PREFILLED[:1], **fields)
    assert answer["usage"]["prompt_tokens"] == len(want)
    model_template = trusting.post("/tokenize", json={"messages": PREFILLED[:1]}).json()
    assert model_template["tokens"] != want


def test_a_broken_request_template_is_a_400(trusting: httpx.Client) -> None:
    for template in ("{% for m in messages %}", "{{ raise_exception('no system role') }}"):
        error = assert_openai_error(trusting.post("/v1/chat/completions", json={
            "messages": PREFILLED[:1], "chat_template": template}), 400)
        assert "template" in error["message"] or "no system role" in error["message"]
