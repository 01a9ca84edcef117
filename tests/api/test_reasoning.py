"""--reasoning-parser deepseek_r1 over HTTP: a chat answer's thinking (up to the first
</think>) as the message's `reasoning` (and `reasoning_content`), the rest as its content;
the oracle is the same greedy generation through /v1/completions, which splits nothing.
A structured output's guide starts past </think>; a prompt that closed the thinking leaves
the answer all content."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.api.conftest import Server, assert_openai_error, run_server, sse_data
from tests.conftest import THINK_TAGS

MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
SCHEMA = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}


@pytest.fixture(scope="module")
def thinker(reasoning_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Server]:
    with run_server(reasoning_checkpoint, tmp_path_factory.mktemp("reasoning"),
                    "--served-model-name", "r1", "--max-model-len", "256",
                    "--reasoning-parser", "deepseek_r1") as s:
        yield s


@pytest.fixture
def client(thinker: Server) -> Iterator[httpx.Client]:
    with thinker.client() as c:
        yield c


def end_id(client: httpx.Client) -> int:
    [token] = client.post("/tokenize", json={"prompt": THINK_TAGS[1],
                                             "add_special_tokens": False}).json()["tokens"]
    return token


def raw_text(client: httpx.Client, **fields: object) -> str:
    """The generation itself, unsplit: the chat prompt's ids through /v1/completions."""
    ids = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    r = client.post("/v1/completions", json={"prompt": ids, "temperature": 0,
                                             "skip_special_tokens": False, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def thought_tokens(client: httpx.Client, **fields: object) -> int:
    """How many tokens of the generation come before its first </think> (all: none)."""
    ids = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    r = client.post("/v1/completions", json={"prompt": ids, "temperature": 0, "logprobs": 0,
                                             "return_tokens_as_token_ids": True, **fields})
    out = [int(t.removeprefix("token_id:"))
           for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    return out.index(end_id(client)) if end_id(client) in out else len(out)


def chat(client: httpx.Client, **fields: object) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0,
                                                  **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def streamed(client: httpx.Client, **fields: object) -> tuple[str, str, list[dict]]:
    """A chat stream's reasoning and content, joined, and its deltas."""
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": MESSAGES, "temperature": 0, "stream": True, **fields}) as r:
        assert r.status_code == 200
        deltas = [json.loads(d)["choices"][0]["delta"] for d in sse_data(r) if d != "[DONE]"]
    for delta in deltas:
        assert delta.get("reasoning") == delta.get("reasoning_content")
    return ("".join(d.get("reasoning") or "" for d in deltas),
            "".join(d.get("content") or "" for d in deltas), deltas)


@pytest.mark.parametrize("bias", [
    None,  # the random model never closes its thinking: all reasoning, no content
    0.4,  # </think> a little likelier: one token of thinking, then content (more tags in it)
    8.0,  # </think> first: no thinking, all content
])
def test_the_thinking_is_the_answer_up_to_the_first_end_tag(client: httpx.Client,
                                                            bias: float | None) -> None:
    fields: dict = {"max_tokens": 12}
    if bias is not None:
        fields["logit_bias"] = {str(end_id(client)): bias}
    raw = raw_text(client, **fields)
    assert (THINK_TAGS[1] in raw) is (bias is not None)
    message = chat(client, **fields)["message"]
    reasoning, closed, content = raw.partition(THINK_TAGS[1])
    assert bool(reasoning and content) is (bias == 0.4)  # (each case what it says)
    assert message["reasoning"] == message["reasoning_content"] == reasoning
    assert message["content"] == ((content or None) if closed else None)
    usage = client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "temperature": 0, **fields}).json()["usage"]
    assert usage["completion_tokens_details"] == {
        "reasoning_tokens": thought_tokens(client, **fields)}
    # streamed: the same two texts, the thinking's chunks first
    got_reasoning, got_content, deltas = streamed(client, **fields)
    assert (got_reasoning, got_content or None) == (reasoning, message["content"])
    kinds = [("reasoning" in d) for d in deltas if d.get("reasoning") or d.get("content")]
    assert kinds == sorted(kinds, reverse=True)


def test_a_structured_output_starts_past_the_thinking(client: httpx.Client) -> None:
    """</think> first (made certain), then the schema's JSON: unguided, the JSON guide would
    have refused the tag."""
    fields = {"max_tokens": 40, "logit_bias": {str(end_id(client)): 100.0},
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "a", "schema": SCHEMA}}}
    message = chat(client, **fields)["message"]
    assert message["reasoning"] == ""
    assert json.loads(message["content"])["a"] in (1, 2)
    reasoning, content, _ = streamed(client, **fields)
    assert (reasoning, content) == ("", message["content"])


@pytest.mark.parametrize(("bias", "max_tokens"), [(0.4, 12), (8.0, 1)])  # (1: the tag alone)
def test_a_streams_logprobs_are_every_tokens(client: httpx.Client, bias: float,
                                             max_tokens: int) -> None:
    """Each token's logprob goes out once, with the delta its text shows in: the thinking's,
    the content's, and a tag's, the last token's too (a text of nothing)."""
    fields = {"max_tokens": max_tokens, "logit_bias": {str(end_id(client)): bias},
              "logprobs": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": MESSAGES, "temperature": 0, "stream": True, **fields}) as r:
        chunks = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    entries = [entry for c in chunks for choice in c["choices"]
               for entry in (choice.get("logprobs") or {}).get("content") or ()]
    assert len(entries) == chunks[-1]["usage"]["completion_tokens"] == max_tokens
    whole = chat(client, **{k: v for k, v in fields.items() if k != "stream_options"})
    assert [e["token"] for e in entries] == [e["token"] for e in whole["logprobs"]["content"]]


def test_a_guide_without_the_reasoning_still_starts_past_it(client: httpx.Client) -> None:
    """include_reasoning false: the thinking is left out, not guided (vLLM's guide would
    start at once, write the schema into the thinking and leave no content)."""
    fields = {"max_tokens": 40, "logit_bias": {str(end_id(client)): 100.0},
              "include_reasoning": False, "response_format": {
                  "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
    message = chat(client, **fields)["message"]
    assert "reasoning" not in message and json.loads(message["content"])["a"] in (1, 2)


def test_a_continued_answer_is_content(client: httpx.Client) -> None:
    """A prefilled final message that opened no thinking: its continuation is content."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    ids = client.post("/tokenize", json={"messages": prefill, "continue_final_message": True,
                                         "add_generation_prompt": False}).json()["tokens"]
    raw = client.post("/v1/completions", json={"prompt": ids, "temperature": 0,
                                               "max_tokens": 8}).json()["choices"][0]["text"]
    r = client.post("/v1/chat/completions", json={
        "messages": prefill, "continue_final_message": True, "add_generation_prompt": False,
        "temperature": 0, "max_tokens": 8})
    message = r.json()["choices"][0]["message"]
    assert "reasoning" not in message and message["content"] == raw
    assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_include_reasoning_false_leaves_it_out(client: httpx.Client) -> None:
    bias = {"max_tokens": 12, "logit_bias": {str(end_id(client)): 8.0}}
    with_it = chat(client, **bias)["message"]
    without = chat(client, **bias, include_reasoning=False)["message"]
    assert "reasoning" not in without and "reasoning_content" not in without
    assert without["content"] == with_it["content"]
    reasoning, content, _ = streamed(client, **bias, include_reasoning=False)
    assert (reasoning, content or None) == ("", with_it["content"])


def test_a_prompt_that_closed_the_thinking_leaves_all_content(client: httpx.Client) -> None:
    """The template's thinking off: <think>\\n\\n</think> in the prompt; the answer is all
    content, and a guide applies from its first token."""
    off = {"chat_template_kwargs": {"thinking": False}, "max_tokens": 12}
    ids = client.post("/tokenize", json={"messages": MESSAGES, **off}).json()["tokens"]
    raw = client.post("/v1/completions", json={"prompt": ids, "temperature": 0,
                                               "max_tokens": 12}).json()["choices"][0]["text"]
    message = chat(client, **off)["message"]
    assert "reasoning" not in message and message["content"] == raw
    schema = {**off, "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
    assert json.loads(chat(client, **schema)["message"]["content"])["a"] in (1, 2)


def test_a_model_without_think_tags_refuses_the_parser(tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    with run_server(tiny_checkpoint, tmp_path, "--reasoning-parser", "deepseek_r1",
                    wait=False) as server:
        assert server.process.wait(timeout=90) != 0
    assert "could not locate the think start/end tokens" in server.log()


def test_the_responses_api_gives_the_thinking_its_own_item(thinker: Server,
                                                          client: httpx.Client) -> None:
    """A reasoning item (its text one reasoning_text part), then the message; streamed as
    vLLM streams it (reasoning_text deltas on their own item); sent back as input, it is
    taken (its text reaches the template as the assistant turn's reasoning_content)."""
    fields = {"model": "r1", "input": MESSAGES[0]["content"], "temperature": 0,
              "max_output_tokens": 12, "logit_bias": {str(end_id(client)): 0.4}}
    raw = raw_text(client, max_tokens=12, logit_bias=fields["logit_bias"])
    reasoning, _, content = raw.partition(THINK_TAGS[1])
    whole = client.post("/v1/responses", json=fields).json()
    thought, message = whole["output"]
    assert (thought["type"], thought["summary"]) == ("reasoning", [])
    assert thought["content"] == [{"type": "reasoning_text", "text": reasoning}]
    assert message["content"][0]["text"] == content
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] == thought_tokens(
        client, max_tokens=12, logit_bias=fields["logit_bias"]) == 1
    with client.stream("POST", "/v1/responses", json={**fields, "stream": True}) as r:
        events = [json.loads(d) for d in sse_data(r)]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index(
        "response.output_text.delta")
    assert "".join(e["delta"] for e in events
                   if e["type"] == "response.reasoning_text.delta") == reasoning
    final = events[-1]["response"]["output"]
    assert [item["type"] for item in final] == ["reasoning", "message"]
    assert final[0]["content"] == thought["content"] and final[0]["status"] == "completed"
    assert final[1]["content"][0]["text"] == content
    again = client.post("/v1/responses", json={
        **fields, "input": [MESSAGES[0], *whole["output"],
                            {"role": "user", "content": "And three plus three?"}]})
    assert again.status_code == 200, again.text
    sdk = openai.OpenAI(base_url=thinker.v1, api_key="unused")
    with sdk.responses.stream(model="r1", input=MESSAGES[0]["content"], temperature=0,
                              max_output_tokens=12,
                              extra_body={"logit_bias": fields["logit_bias"]}) as stream:
        response = stream.get_final_response()
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output_text == content


def test_anthropics_messages_api_gives_a_thinking_block(thinker: Server,
                                                        client: httpx.Client) -> None:
    """The random model never closes its thinking in 12 tokens: one thinking block of it
    all (no signature: none is checked here), streamed as thinking_delta; `thinking`
    disabled leaves it out; a thinking block sent back in the history is taken."""
    raw = raw_text(client, max_tokens=12)
    sdk = anthropic.Anthropic(base_url=thinker.base_url, api_key="unused")
    ask = {"model": "r1", "max_tokens": 12, "messages": MESSAGES,
           "extra_body": {"temperature": 0}}
    message = sdk.messages.create(**ask)  # type: ignore[arg-type]
    [block] = message.content
    assert block.type == "thinking" and block.thinking == raw and block.signature == ""
    assert message.stop_reason == "max_tokens"
    with sdk.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None)) for b in streamed.content] == [
        ("thinking", raw)]
    off = sdk.messages.create(**ask, thinking={"type": "disabled"})  # type: ignore[arg-type]
    assert off.content == [] and off.usage.output_tokens == 12
    again = client.post("/v1/messages", json={
        "model": "r1", "max_tokens": 4, "messages": [
            *MESSAGES, {"role": "assistant", "content": [
                {"type": "thinking", "thinking": raw, "signature": ""},
                {"type": "text", "text": "4"}]},
            {"role": "user", "content": "And three plus three?"}]})
    assert again.status_code == 200, again.text


@pytest.mark.parametrize("budget", [0, 3])
def test_a_thinking_budget_ends_the_thinking(client: httpx.Client, budget: int) -> None:
    """vLLM's thinking_token_budget: the random model never closes its thinking in 12
    tokens; with a budget it thinks that many (the unbounded thinking's first ones), then
    </think> is forced and the answer goes on as content. -1 bounds nothing."""
    free = chat(client, max_tokens=12)["message"]
    r = client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "temperature": 0, "max_tokens": 12,
        "thinking_token_budget": budget})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert r.json()["usage"]["completion_tokens_details"] == {"reasoning_tokens": budget}
    assert free["reasoning"].startswith(message["reasoning"])
    assert bool(message["reasoning"]) is (budget > 0) and message["content"]
    reasoning, content, _ = streamed(client, max_tokens=12, thinking_token_budget=budget)
    assert (reasoning, content) == (message["reasoning"], message["content"])
    assert chat(client, max_tokens=12, thinking_token_budget=-1)["message"] == free


def test_anthropics_budget_tokens_bound_the_thinking_block(thinker: Server,
                                                          client: httpx.Client) -> None:
    bounded = chat(client, max_tokens=12, thinking_token_budget=3)["message"]
    sdk = anthropic.Anthropic(base_url=thinker.base_url, api_key="unused")
    message = sdk.messages.create(  # type: ignore[call-overload]
        model="r1", max_tokens=12, messages=MESSAGES, extra_body={"temperature": 0},
        thinking={"type": "enabled", "budget_tokens": 3})
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None))
            for b in message.content] == [("thinking", bounded["reasoning"]),
                                          ("text", bounded["content"])]
    # Anthropic's API asks for an integer budget below max_tokens
    for thinking in ({"budget_tokens": "many"}, {}, {"budget_tokens": 4}):
        r = client.post("/v1/messages", json={
            "model": "r1", "max_tokens": 4, "messages": MESSAGES,
            "thinking": {"type": "enabled", **thinking}})
        assert r.status_code == 400 and "budget_tokens" in r.text, r.text


def test_a_thinking_budget_needs_the_parser(server: Server, auth: dict[str, str]) -> None:
    """Without --reasoning-parser a chat request's budget has nothing to bound: a clear
    400; Anthropic's thinking (budget included) is ignored there, as its thinking is."""
    with server.client(**auth) as c:
        r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2,
                                                 "thinking_token_budget": 5})
        error = assert_openai_error(r, 400)
        assert error["param"] == "thinking_token_budget" and "--reasoning-parser" in \
            error["message"]
        assert c.post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 2, "thinking_token_budget": -1}
        ).status_code == 200
        for bad in (True, 2.5, "3", -2):  # (an integer, as vLLM's)
            assert_openai_error(c.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 2, "thinking_token_budget": bad}), 400)
        error = assert_openai_error(c.post("/v1/chat/completions", json={
            "messages": MESSAGES, "max_tokens": 2, "n": 2, "use_beam_search": True,
            "thinking_token_budget": 3}), 400)
        assert error["param"] == "thinking_token_budget"
        r = c.post("/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": MESSAGES,
                                         "thinking": {"type": "enabled", "budget_tokens": 1}})
        assert r.status_code == 200, r.text
