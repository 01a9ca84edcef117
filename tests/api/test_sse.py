"""Server-sent events read raw with httpx: framing, chunk order, ids, usage, `[DONE]`, headers;
and greedy chat == greedy completion of the rendered chat template."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sse_starlette.event import ensure_bytes
from starlette.types import Message

from server.routes import _frame, _sse
from tests.api.conftest import Server, sse_data, wait_idle

USER = [{"role": "user", "content": "Tell me about rivers."}]
GREEDY = {"model": "tiny", "temperature": 0, "ignore_eos": True}
# Chat, and completions with two prompts (usage adds up over prompts and samples)
BOTH_ENDPOINTS = pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": USER}),
    ("/v1/completions", {"prompt": ["Rivers", "Mountains are"]}),
], ids=["chat", "completions"])


def stream(client: httpx.Client, path: str, body: dict[str, Any],
           headers: dict[str, str] | None = None) -> tuple[httpx.Response, list[str]]:
    with client.stream("POST", path, json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, r.read()
        return r, sse_data(r)


def check_framing(events: list[str]) -> list[dict[str, Any]]:
    """`[DONE]` is the last event and only there; every other event is a JSON chunk sharing one
    id and `created`. Returns the chunks."""
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert "[DONE]" not in events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    return chunks


def finish_positions(chunks: list[dict[str, Any]]) -> dict[int, list[int]]:
    """choice index -> positions of that choice's chunks that carry a finish_reason."""
    seen: dict[int, list[int]] = {}
    for pos, chunk in enumerate(chunks):
        for choice in chunk["choices"]:
            seen.setdefault(choice["index"], [])
            if choice["finish_reason"] is not None:
                seen[choice["index"]].append(pos)
    return seen


def last_positions(chunks: list[dict[str, Any]]) -> dict[int, int]:
    last: dict[int, int] = {}
    for pos, chunk in enumerate(chunks):
        for choice in chunk["choices"]:
            last[choice["index"]] = pos
    return last


@pytest.mark.parametrize("n", [1, 3])
def test_chat_stream_chunk_order(client: httpx.Client, n: int) -> None:
    _, events = stream(client, "/v1/chat/completions",
                       {"model": "tiny", "messages": USER, "max_tokens": 6, "n": n, "seed": 5,
                        "ignore_eos": True})
    chunks = check_framing(events)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-")
    deltas: dict[int, list[dict]] = {}
    for chunk in chunks:
        [choice] = chunk["choices"]
        deltas.setdefault(choice["index"], []).append(choice["delta"])
    assert sorted(deltas) == list(range(n))
    for index, ds in deltas.items():
        assert ds[0].get("role") == "assistant", (index, ds[0])
        assert all("role" not in d for d in ds[1:]), index
    # exactly one finishing chunk per choice, and it is that choice's last chunk
    finishes, lasts = finish_positions(chunks), last_positions(chunks)
    assert finishes == {i: [lasts[i]] for i in range(n)}
    assert all(chunks[lasts[i]]["choices"][0]["finish_reason"] == "length" for i in range(n))


@pytest.mark.parametrize("n", [1, 2])
def test_completion_stream_chunk_order(client: httpx.Client, n: int) -> None:
    _, events = stream(client, "/v1/completions",
                       {"model": "tiny", "prompt": "Rivers", "max_tokens": 5, "n": n, "seed": 2})
    chunks = check_framing(events)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["id"].startswith("cmpl-")
    finishes, lasts = finish_positions(chunks), last_positions(chunks)
    assert finishes == {i: [lasts[i]] for i in range(n)}
    assert all("usage" not in c for c in chunks)  # no include_usage, no usage chunk


@BOTH_ENDPOINTS
def test_usage_chunk_matches_unstreamed_usage(client: httpx.Client, path: str,
                                             body: dict[str, Any]) -> None:
    request = {**GREEDY, **body, "max_tokens": 7, "n": 2}
    plain = client.post(path, json=request)
    assert plain.status_code == 200, plain.text
    _, events = stream(client, path, {**request, "stream_options": {"include_usage": True}})
    chunks = check_framing(events)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain.json()["usage"]
    assert all("usage" not in c for c in chunks[:-1])
    assert plain.json()["usage"]["completion_tokens"] == 7 * 2 * (2 if "prompt" in body else 1)


@BOTH_ENDPOINTS
def test_continuous_usage_counts_each_choice_so_far(client: httpx.Client, path: str,
                                                    body: dict[str, Any]) -> None:
    """vLLM's `continuous_usage_stats`: every chunk carries its prompt's tokens and its own
    choice's tokens so far; the final usage chunk still totals every choice."""
    request = {**GREEDY, **body, "max_tokens": 7, "n": 2}
    plain = client.post(path, json=request).json()["usage"]
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events = stream(client, path, {**request, "stream_options": options})
    *chunks, final = check_framing(events)
    assert final["choices"] == [] and final["usage"] == plain
    counts: dict[int, list[int]] = {}
    prompt_tokens: dict[int, set[int]] = {}  # by prompt (choice index // n)
    for chunk in chunks:
        [choice], usage = chunk["choices"], chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        counts.setdefault(choice["index"], []).append(usage["completion_tokens"])
        prompt_tokens.setdefault(choice["index"] // 2, set()).add(usage["prompt_tokens"])
    assert sorted(counts) == ([0, 1, 2, 3] if "prompt" in body else [0, 1])
    for index, seen in counts.items():
        assert seen == sorted(seen) and seen[-1] == 7, (index, seen)
        if "messages" in body:
            assert seen[0] == 0  # the role chunk, before any token
    assert all(len(tokens) == 1 for tokens in prompt_tokens.values())
    assert sum(tokens.pop() for tokens in prompt_tokens.values()) == plain["prompt_tokens"]


def test_continuous_usage_needs_include_usage(client: httpx.Client) -> None:
    """As in vLLM: without include_usage, no chunk carries usage."""
    _, events = stream(client, "/v1/completions",
                       {**GREEDY, "prompt": "Rivers", "max_tokens": 3,
                        "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in c for c in check_framing(events))


def test_streamed_text_equals_unstreamed(client: httpx.Client) -> None:
    """Concatenated deltas == the response text, per choice, for both endpoints."""
    body = {**GREEDY, "prompt": ["Rivers", "Mountains are"], "max_tokens": 10}
    plain = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    texts: dict[int, str] = {}
    for chunk in check_framing(stream(client, "/v1/completions", body)[1]):
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(2)] == plain

    body = {**GREEDY, "messages": USER, "max_tokens": 10}
    plain_chat = client.post("/v1/chat/completions", json=body).json()
    chunks = check_framing(stream(client, "/v1/chat/completions", body)[1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain_chat["choices"][0]["message"]["content"]


def test_stream_headers(client: httpx.Client) -> None:
    r, events = stream(client, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-accel-buffering"] == "no"
    assert check_framing(events)[0]["id"] == f"cmpl-{r.headers['x-request-id']}"
    r2, events = stream(client, "/v1/chat/completions",
                        {"model": "tiny", "messages": USER, "max_tokens": 2})
    assert r2.headers["content-type"].startswith("text/event-stream")
    assert r2.headers["x-request-id"] != r.headers["x-request-id"]
    assert check_framing(events)[0]["id"] == f"chatcmpl-{r2.headers['x-request-id']}"


def test_stream_leaves_the_connection_header_to_the_server(client: httpx.Client) -> None:
    """sse-starlette's `Connection: keep-alive` is dropped: beside uvicorn's `close` for a
    client that asked to close, the response said both."""
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True}
    with client.stream("POST", "/v1/completions", json=body,
                       headers={"Connection": "close"}) as r:
        r.read()
    assert r.headers.get_list("connection") == ["close"]
    r, _ = stream(client, "/v1/completions", body)
    assert "connection" not in r.headers  # HTTP/1.1: open by default


def test_request_id_echoed(client: httpx.Client) -> None:
    """The header comes back, and names the response as vLLM's does (`chatcmpl-<id>`)."""
    mine = {"X-Request-Id": "trace-4711-abc"}
    r, events = stream(client, "/v1/chat/completions",
                       {"model": "tiny", "messages": USER, "max_tokens": 2}, headers=mine)
    assert r.headers["x-request-id"] == "trace-4711-abc"
    assert check_framing(events)[0]["id"] == "chatcmpl-trace-4711-abc"
    plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1},
                        headers=mine)
    assert plain.headers["x-request-id"] == "trace-4711-abc"
    assert plain.json()["id"] == "cmpl-trace-4711-abc"
    error = client.post("/v1/completions", json={"prompt": 5}, headers=mine)
    assert error.status_code == 400 and error.headers["x-request-id"] == "trace-4711-abc"


def test_a_repeated_request_id_keeps_requests_apart(long_server: Server,
                                                     auth: dict[str, str]) -> None:
    """Two requests in flight under one X-Request-Id (a client retrying, a proxy reusing
    ids) are still two engine requests: each gets its own whole output. The first is still
    generating (4000 tokens, about a second) when the second is done."""
    wait_idle(long_server)  # shared: the running count below is these requests'
    mine = {"X-Request-Id": "same"}
    bodies = [{**GREEDY, "prompt": p, "max_tokens": m}  # the first runs long: both in flight
              for p, m in (("Rivers", 4000), ("Mountains are", 24))]
    # (a generous read timeout: 4000 tokens in one response took over 60 s on a loaded
    # 2-core machine)
    with httpx.Client(base_url=long_server.base_url, headers=auth, timeout=240) as client:
        alone = [client.post("/v1/completions", json=b).json()["choices"][0]["text"]
                 for b in bodies]
        with client.stream("POST", "/v1/completions", json={**bodies[0], "stream": True},
                           headers=mine) as first:
            # (data lines: a slow stream carries sse-starlette's ": ping" comments too)
            events = (line for line in first.iter_lines() if line.startswith("data: "))
            lines = [next(events)]  # the first request is in flight...
            second = client.post("/v1/completions", json=bodies[1], headers=mine)  # meanwhile
            assert long_server.metric("llama_serve_requests_running") == 1  # still is
            lines += events
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone[0]
    assert second.json()["choices"][0]["text"] == alone[1]
    assert second.json()["id"] == chunks[0]["id"] == "cmpl-same"


def test_stream_with_logprobs(client: httpx.Client) -> None:
    _, events = stream(client, "/v1/chat/completions",
                       {**GREEDY, "messages": USER, "max_tokens": 4, "logprobs": True,
                        "top_logprobs": 1})
    chunks = check_framing(events)
    entries = [e for c in chunks if c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == 4
    _, events = stream(client, "/v1/completions",
                       {**GREEDY, "prompt": "Rivers", "max_tokens": 4, "logprobs": 1})
    tokens = [t for c in check_framing(events) if c["choices"][0]["logprobs"]
              for t in c["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 4


def test_greedy_chat_equals_completion_of_template(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "You are terse."}, *USER]
    r = client.post("/tokenize", json={"model": "tiny", "messages": messages,
                                       "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    chat = client.post("/v1/chat/completions",
                       json={"model": "tiny", "messages": messages, "max_tokens": 20,
                             "temperature": 0})
    completion = client.post("/v1/completions",
                             json={"model": "tiny", "prompt": ids, "max_tokens": 20,
                                   "temperature": 0})
    assert chat.status_code == completion.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == completion.json()["usage"]["prompt_tokens"]
    assert chat.json()["choices"][0]["message"]["content"] == \
        completion.json()["choices"][0]["text"]
    assert chat.json()["choices"][0]["finish_reason"] == \
        completion.json()["choices"][0]["finish_reason"]


@pytest.mark.parametrize("event", ['{"a":"b c","d":null}', "[DONE]", "two\nlines", "cr\r"])
def test_events_are_framed_as_sse_starlette_frames_them(event: str) -> None:
    """The route frames one-line events itself (once, as bytes) and leaves others to
    sse-starlette: the bytes on the wire are the same either way."""
    assert ensure_bytes(_frame(event), "\n") == ensure_bytes(event, "\n")
    assert isinstance(_frame(event), bytes) == ("\n" not in event and "\r" not in event)


RESPONSE_COMPLETED = b'event: response.completed\ndata: {"type":"response.completed"}\n\n'


@pytest.mark.parametrize(("fails", "last"), [(False, "[DONE]"), (True, "[DONE]"),
                                             (False, RESPONSE_COMPLETED)],
                         ids=["done", "in-band-error", "responses-completed"])
def test_the_body_ends_with_the_done_event(fails: bool, last: str | bytes) -> None:
    """The ASGI message carrying [DONE] (the Responses API's response.completed) ends the
    body (more_body False) and nothing follows it, so a client reading to the end (the
    OpenAI SDKs do) has it with that event itself; on the error path too. sse-starlette
    alone sends the end in a message of its own later."""
    async def events() -> AsyncIterator[str | bytes]:
        yield '{"a":1}'
        if fails:
            raise RuntimeError("boom")
        yield last

    async def run() -> list[Message]:
        sent: list[Message] = []
        never = asyncio.Event()

        async def receive() -> Message:
            await never.wait()  # the client stays
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await asyncio.wait_for(_sse(events())(scope, receive, send), 10)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start"
    bodies = sent[1:]
    assert all(m["type"] == "http.response.body" for m in bodies)
    last_frame = last if isinstance(last, bytes) else b"data: [DONE]\n\n"
    assert bodies[-1] == {"type": "http.response.body", "body": last_frame, "more_body": False}
    assert all(m["more_body"] for m in bodies[:-1])
    assert len(bodies) == 3 if fails else 2  # (an error event before [DONE])
