"""Every bad input gets its documented status and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; never a 5xx, never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import (
    API_KEY,
    Server,
    assert_openai_error,
    free_port,
    run_server,
    sse_data,
    wait_idle,
    wait_until,
)

USER = [{"role": "user", "content": "Hello"}]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


# --- 400: the request itself is wrong ----------------------------------------------------------

BAD_COMPLETIONS = [  # (name, fields added to a valid request, param that names the field)
    ("prompt_type", {"prompt": 5}, "prompt"),
    ("prompt_empty_list", {"prompt": []}, "prompt"),
    ("prompt_id_outside_vocab", {"prompt": [1, 2, 5000]}, "prompt"),
    ("max_tokens_type", {"max_tokens": "many"}, "max_tokens"),
    ("max_tokens_negative", {"max_tokens": -1}, "max_tokens"),
    ("temperature_type", {"temperature": "hot"}, "temperature"),
    ("temperature_negative", {"temperature": -0.5}, "temperature"),
    ("top_p_zero", {"top_p": 0}, "top_p"),
    ("top_p_above_one", {"top_p": 1.01}, "top_p"),
    ("n_zero", {"n": 0}, "n"),
    ("n_above_max_n", {"n": 5}, "n"),
    ("n_fraction", {"n": 1.5}, "n"),
    ("stop_type", {"stop": 7}, "stop"),
    ("stop_too_many", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("stop_too_long", {"stop": "x" * 257}, "stop"),
    ("logprobs_21", {"logprobs": 21}, "logprobs"),
    ("logit_bias_101", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias_id_outside_vocab", {"logit_bias": {"1024": 1}}, "logit_bias"),
    ("logit_bias_key_not_id", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("suffix_without_infilling_tokens", {"suffix": "the end"}, "suffix"),
    ("best_of_not_n", {"best_of": 2}, "best_of"),
    ("stream_options_without_stream", {"stream_options": {"include_usage": True}},
     "stream_options"),
    ("seed_beyond_int64", {"seed": 2**64}, "seed"),
    ("stop_token_id_outside_vocab", {"stop_token_ids": [4096]}, "stop_token_ids"),
]

BAD_CHATS = [
    ("messages_empty", {"messages": []}, "messages"),
    ("messages_type", {"messages": "Hello"}, "messages"),
    ("messages_missing", {"messages": None}, "messages"),
    ("role_empty", {"messages": [{"role": "", "content": "x"}]}, "messages"),
    ("content_missing", {"messages": [{"role": "user"}]}, "messages"),
    ("image_part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages"),
    ("tools_auto_without_a_parser",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tool_choice"),
    ("functions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("tool_choice_without_tools", {"tool_choice": "required"}, None),
    ("response_format_unknown", {"response_format": {"type": "grammar"}}, "response_format"),
    ("guided_regex_bad", {"guided_regex": "(unclosed"}, "guided_regex"),
    ("two_constraints", {"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    ("temperature_negative", {"temperature": -1}, "temperature"),
    ("top_p_zero", {"top_p": 0}, "top_p"),
    ("n_above_max_n", {"n": 5}, "n"),
    ("max_tokens_zero", {"max_tokens": 0}, "max_tokens"),
    ("top_logprobs_21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs_without_logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("logit_bias_101", {"logit_bias": {"5": -101}}, "logit_bias"),
    ("stop_too_many", {"stop": ["a"] * 17}, "stop"),
]


@pytest.mark.parametrize("fields,param", [c[1:] for c in BAD_COMPLETIONS],
                         ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_is_400(client: httpx.Client, fields: dict[str, Any], param: str) -> None:
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                       **fields})
    error = assert_openai_error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize("fields,param", [c[1:] for c in BAD_CHATS], ids=[c[0] for c in BAD_CHATS])
def test_bad_chat_is_400(client: httpx.Client, fields: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 2, **fields}
    r = client.post(CHAT, json={k: v for k, v in body.items() if v is not None})
    error = assert_openai_error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_400_with_numbers(client: httpx.Client, stream: bool) -> None:
    n_prompt = client.post("/tokenize", json={"prompt": "Hi there"}).json()["count"]
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hi there", "max_tokens": 600,
                                       "stream": stream})
    error = assert_openai_error(r, 400)
    message = error["message"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "512" in message and "600" in message and str(n_prompt + 600) in message, message
    assert str(n_prompt) in message


def test_chat_context_overflow_is_400(client: httpx.Client) -> None:
    long_prompt = [{"role": "user", "content": "word " * 600}]
    r = client.post(CHAT, json={"model": "tiny", "messages": long_prompt, "max_tokens": 1})
    assert "512" in assert_openai_error(r, 400)["message"]
    r = client.post(CHAT, json={"model": "tiny", "messages": USER, "max_completion_tokens": 510})
    error = assert_openai_error(r, 400)
    assert "512" in error["message"] and error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"  # OpenAI's; completions name "prompt"


def test_min_tokens_past_the_context_is_400(client: httpx.Client) -> None:
    """Without max_tokens the budget is the rest of the context; a min_tokens beyond it can
    never be met (it used to end at the context with finish_reason "length")."""
    for path, body in [(CHAT, {"messages": USER}),
                       (COMPLETIONS, {"prompt": "Hi", "max_tokens": None})]:
        r = client.post(path, json={"model": "tiny", "min_tokens": 600, **body})
        error = assert_openai_error(r, 400)
        assert error["code"] == "context_length_exceeded" and "min_tokens" in error["message"]
    # A prompt filling the context leaves no room for the one token every request makes
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": [5] * 512, "max_tokens": None})
    message = assert_openai_error(r, 400)["message"]
    assert "at least 1 in the completion" in message and "min_tokens" not in message


@pytest.mark.parametrize("content", [b"{\"prompt\": \"Hi\", ", b"", b"[1, 2]", b"null",
                                     b"\xff\xfe"],
                         ids=["truncated", "empty", "array", "null", "not_utf8"])
def test_malformed_body_is_400(client: httpx.Client, content: bytes) -> None:
    r = client.post(COMPLETIONS, content=content, headers={"Content-Type": "application/json"})
    assert assert_openai_error(r, 400)["type"] == "invalid_request_error"


def test_tokenize_needs_prompt_or_messages(client: httpx.Client) -> None:
    assert_openai_error(client.post("/tokenize", json={}), 400)
    assert_openai_error(client.post("/tokenize", json={"prompt": "a", "messages": USER}), 400)


REJECTED = "llama_serve_requests_rejected_total"


def rejected(server: Server, reason: str) -> float:
    return server.metrics().get(f'{REJECTED}{{reason="{reason}"}}', 0)


def all_rejected(server: Server) -> dict[str, float]:
    """Every reason's count, as series names."""
    return {k: v for k, v in server.metrics().items() if k.startswith(REJECTED + "{")}


def test_rejections_are_counted(server: Server, client: httpx.Client) -> None:
    """Each refused request under its reason: a bad request, an unknown model, a missing key.
    Lookups are not counted (scanners would fill the series): an unknown path, an unknown
    model's card, a GET without the key."""
    before = all_rejected(server)
    assert_openai_error(client.post(COMPLETIONS, json={"prompt": "Hi", "temperature": -1}), 400)
    assert_openai_error(client.post(COMPLETIONS, json={"model": "nope", "prompt": "Hi"}), 404)
    assert_openai_error(httpx.post(server.base_url + COMPLETIONS, json={"prompt": "Hi"}), 401)
    assert_openai_error(client.get("/v1/no/such/path"), 404)
    assert_openai_error(client.get("/v1/models/nope"), 404)
    assert_openai_error(httpx.get(server.base_url + "/v1/models"), 401)
    after = all_rejected(server)
    grown = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert grown == {f'{REJECTED}{{reason="{reason}"}}': 1
                     for reason in ("invalid_request", "model_not_found", "invalid_api_key")}


# --- 401: the API key --------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None),
    ("POST", COMPLETIONS, {"model": "tiny", "prompt": "Hi", "max_tokens": 1}),
    ("POST", CHAT, {"model": "tiny", "messages": USER, "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("GET", "/slots", None),
]
BAD_KEYS = {
    "missing": {},
    "wrong": {"Authorization": "Bearer sk-not-the-key"},
    "prefix_of_key": {"Authorization": f"Bearer {API_KEY[:-1]}"},
    "not_bearer": {"Authorization": f"Basic {API_KEY}"},
    "bare_key": {"Authorization": API_KEY},
}


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[p[1] for p in PROTECTED])
@pytest.mark.parametrize("headers", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_protected_routes_need_key(server: Server, method: str, path: str,
                                   body: dict[str, Any] | None, headers: dict[str, str]) -> None:
    r = httpx.request(method, server.base_url + path, json=body, headers=headers)
    error = assert_openai_error(r, 401)
    assert error["code"] == "invalid_api_key"
    ok = httpx.request(method, server.base_url + path, json=body,
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_bad_body_without_key_is_401_not_400(server: Server) -> None:
    r = httpx.post(server.base_url + COMPLETIONS, json={"prompt": "Hi", "temperature": -1})
    assert_openai_error(r, 401)


def test_malformed_body_without_key_is_401(server: Server) -> None:
    r = httpx.post(server.base_url + COMPLETIONS, content=b"{oops",
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 401)


@pytest.mark.parametrize("path", ["/health", "/live", "/metrics", "/version"])
def test_open_routes_need_no_key(server: Server, path: str) -> None:
    r = httpx.get(server.base_url + path)
    assert r.status_code == 200, r.text


# --- 404, 405 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", [
    ("POST", COMPLETIONS, {"model": "nope", "prompt": "Hi"}),
    ("POST", CHAT, {"model": "nope", "messages": USER}),
    ("POST", "/tokenize", {"model": "nope", "prompt": "Hi"}),
    ("GET", "/v1/models/nope", None),
], ids=["completions", "chat", "tokenize", "models"])
def test_unknown_model_is_404(client: httpx.Client, method: str, path: str,
                              body: dict[str, Any] | None) -> None:
    error = assert_openai_error(client.request(method, path, json=body), 404)
    assert error["code"] == "model_not_found" and "nope" in error["message"]


def test_models_path_with_no_id_is_404(client: httpx.Client) -> None:
    """`/v1/models/` names no model: not a card with an empty id."""
    error = assert_openai_error(client.get("/v1/models/"), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize("method,path", [("GET", "/v1/nope"), ("POST", "/v1/engines"),
                                         ("GET", "/nope")])
@pytest.mark.parametrize("with_key", [True, False])
def test_unknown_route_is_404(server: Server, auth: dict[str, str], method: str, path: str,
                              with_key: bool) -> None:
    """With the key: 404. Without: 401 under /v1/ (the key is checked before routing, as
    OpenAI does), 404 elsewhere."""
    r = httpx.request(method, server.base_url + path, headers=auth if with_key else {})
    assert_openai_error(r, 401 if path.startswith("/v1/") and not with_key else 404)


def test_wrong_method_is_405_with_allow(client: httpx.Client) -> None:
    r = client.get(COMPLETIONS)
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 lists the methods the path takes


# --- padded vocabulary ids: in the model's embedding, outside the tokenizer --------------------


@pytest.mark.parametrize("stream", [False, True])
def test_echo_of_padded_vocab_id_is_not_a_server_error(client: httpx.Client,
                                                       stream: bool) -> None:
    body = {"model": "tiny", "prompt": [5, 6, 1000], "echo": True, "max_tokens": 2,
            "stream": stream}
    with client.stream("POST", COMPLETIONS, json=body) as r:
        if r.status_code != 200:
            r.read()
            assert_openai_error(r, 400)
            return
        if stream:
            assert sse_data(r)[-1] == "[DONE]"
        else:
            r.read()
            assert r.json()["choices"][0]["text"]


def test_deeply_nested_body_is_never_a_server_error(client: httpx.Client) -> None:
    """Around 960 levels (an ignored field) the request-side Unicode check, then recursive,
    ran out of stack: a 500 with a long traceback in the log, or a dropped connection."""
    for depth in range(940, 1000, 6):
        nested = "[" * depth + "1" + "]" * depth
        content = f'{{"model": "tiny", "prompt": "Hi", "max_tokens": 1, "x": {nested}}}'
        r = client.post(COMPLETIONS, content=content,
                        headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            assert_openai_error(r, 400)


@pytest.mark.parametrize("where", ["chat_template_kwargs", "arguments object",
                                   "arguments text"])
def test_deeply_nested_chat_data_is_a_400(client: httpx.Client, where: str) -> None:
    """Nesting the body parser lets through (a few hundred levels, or any depth inside the
    JSON text of a tool call's arguments) overflowed the stack converting it for the chat
    template, or parsing the arguments: a 500, and a traceback in the log."""
    nested = json.loads("[" * 600 + "]" * 600)
    messages: list[dict] = [{"role": "user", "content": "hi"}]
    body: dict = {"model": "tiny", "max_tokens": 1, "messages": messages}
    if where == "chat_template_kwargs":
        body["chat_template_kwargs"] = {"x": nested}
    else:
        text = '{"a":' * 1000 + "1" + "}" * 1000
        arguments = {"x": nested} if where == "arguments object" else text
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": arguments}}]})
        messages.append({"role": "user", "content": "and?"})
    for path in (CHAT, "/tokenize"):
        r = client.post(path, json=body)
        assert "too deeply" in assert_openai_error(r, 400)["message"], (path, r.text)


def test_many_bad_token_ids_give_a_short_error(client: httpx.Client) -> None:
    """250000 negative ids are one error, not 250000 (a 15 MB answer, seconds of the event
    loop); a body with many invalid items of another kind names five and counts the rest."""
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": [5, -1] * 125_000})
    error = assert_openai_error(r, 400)
    assert error["param"] == "prompt" and len(r.content) < 1000
    assert "token id at index 1: Input should be greater than or equal to 0" in error["message"]
    r = client.post(CHAT, json={"model": "tiny", "messages": [1] * 1000})
    error = assert_openai_error(r, 400)
    assert error["param"] == "messages" and len(r.content) < 2000
    assert error["message"].endswith("and 995 more errors")


HUGE = 300_000  # items in a ~1 MB body; each used to be its own validation error
HUGE_BODIES = {
    "negative_ids": (COMPLETIONS, {"prompt": [5, -1] * (HUGE // 2)}),
    "text_in_ids": (COMPLETIONS, {"prompt": [5, "x"] * (HUGE // 2)}),
    "ids_in_texts": (COMPLETIONS, {"prompt": ["x", 5] * (HUGE // 2)}),
    "stop": (COMPLETIONS, {"prompt": "Hi", "stop": [5] * HUGE}),
    "stop_token_ids": (COMPLETIONS, {"prompt": "Hi", "stop_token_ids": [0.5] * HUGE}),
    "logit_bias": (COMPLETIONS, {"prompt": "Hi", "logit_bias": {str(i): "x" for i in range(HUGE)}}),
    "messages": (CHAT, {"messages": [1] * HUGE}),
    "content_parts": (CHAT, {"messages": [{"role": "user", "content": [1] * HUGE}]}),
    "detokenize": ("/detokenize", {"tokens": ["x"] * HUGE}),
}


@pytest.mark.parametrize("path,body", HUGE_BODIES.values(), ids=list(HUGE_BODIES))
def test_huge_invalid_body_is_one_short_error(client: httpx.Client, path: str,
                                              body: dict[str, Any]) -> None:
    """A list (or map) is refused as a whole, before its items, or at its first bad item:
    2 million invalid items in a 4 MB body had held the event loop (every stream) for 15 s."""
    r = client.post(path, json={"model": "tiny", **body})
    error = assert_openai_error(r, 400)
    assert "more errors" not in error["message"], error["message"][:300]  # not item by item
    assert len(r.content) < 1000


@pytest.mark.parametrize("stream", [False, True])
def test_echo_logprobs_request_aborted_before_its_prefill_ends(long_context_checkpoint: Path,
                                                               tmp_path: Path,
                                                               stream: bool) -> None:
    """A scoring request (echo + logprobs) still queued when the server shuts down gets its
    abort like any other (it was a 500: no prompt logprobs to pair with its prompt ids). The
    hog holding the only slot runs to the 4096-token context: about a second here, which the
    queued request and the shutdown must fit in (the tiny model's 1024 took a quarter)."""
    with run_server(long_context_checkpoint, tmp_path, "--max-num-seqs", "1",
                    "--max-model-len", "4096", "--shutdown-timeout", "0") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as c, \
                c.stream("POST", COMPLETIONS, json={"prompt": "Hi", "max_tokens": None,
                                                    "ignore_eos": True, "stream": True}) as hog:
            lines = hog.iter_lines()
            while not next(lines).startswith("data:"):  # the only slot is taken
                pass
            result: dict[str, Any] = {}

            def score() -> None:
                body = {"prompt": "hello world", "max_tokens": 0, "echo": True, "logprobs": 1,
                        "stream": stream}
                with httpx.stream("POST", f"{server.base_url}{COMPLETIONS}", json=body,
                                  timeout=60) as r:
                    r.read()
                    result["status"], result["text"] = r.status_code, r.text

            waiter = threading.Thread(target=score)
            waiter.start()
            assert wait_until(lambda: server.metric("llama_serve_requests_waiting") >= 1)
            server.process.terminate()  # no drain time: everything in flight is aborted
            waiter.join(30)
            hog_events = [line for line in lines if line.startswith("data: {")]
    # Else the hog ended before the shutdown, and the queued request may have run.
    assert json.loads(hog_events[-1][len("data: "):])["choices"][0]["finish_reason"] == "abort"
    assert result["status"] == 200, result
    if stream:
        events = [line[len("data:"):].strip() for line in result["text"].splitlines()
                  if line.startswith("data:")]
        assert events[-1] == "[DONE]" and '"error"' not in result["text"], result["text"]
        final = json.loads(events[-2])["choices"][0]
    else:
        final = json.loads(result["text"])["choices"][0]
    assert final["finish_reason"] == "abort"


# --- sampling controls that break the step -----------------------------------------------------


def test_huge_top_k_fails_only_itself(client: httpx.Client) -> None:
    victim_events: list[str] = []
    with client.stream("POST", COMPLETIONS, json={"model": "tiny", "prompt": "Hi",
                                                  "max_tokens": 200, "ignore_eos": True,
                                                  "stream": True}) as victim:
        lines = victim.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                           "top_k": 2**63})
        victim_events = [line for line in lines if line.startswith("data:")]
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_openai_error(r, 400)
    assert victim_events[-1] == "data: [DONE]"
    assert '"error"' not in victim_events[-2]


def test_tiny_temperature_is_greedy(client: httpx.Client) -> None:
    def text(temperature: float) -> str:
        r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hi", "max_tokens": 6,
                                           "temperature": temperature, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert text(1e-45) == text(0)


def test_temperature_beyond_float32_with_min_tokens_is_served(client: httpx.Client) -> None:
    """Found by the fuzz test: 7e307 is inf in float32, and min_tokens bans eos with -inf;
    -inf / inf = NaN took the sampler out of range (a 500)."""
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hi", "max_tokens": 3,
                                       "min_tokens": 3, "temperature": 7.05e307, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


# --- 413 and 503: a second server with small limits --------------------------------------------


@pytest.fixture(scope="module")
def limited(long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Server]:
    """One slot, no waiting room, bodies up to 2000 bytes; a 4096-token context, so that a
    held stream outlasts the requests sent beside it."""
    with run_server(long_context_checkpoint, tmp_path_factory.mktemp("limited"),
                    "--api-key", API_KEY, "--served-model-name", "tiny", "--max-num-seqs", "1",
                    "--max-waiting", "0", "--max-request-bytes", "2000") as s:
        yield s


def test_body_over_limit_is_413(limited: Server, auth: dict[str, str]) -> None:
    url = limited.v1 + "/completions"
    # `user` pads the body without adding prompt tokens
    small = httpx.post(url, headers=auth,
                       json={"prompt": "Hi", "max_tokens": 1, "user": "x" * 1500})
    assert small.status_code == 200, small.text
    before = rejected(limited, "request_too_large")
    big = httpx.post(url, headers=auth, json={"prompt": "Hi", "max_tokens": 1, "user": "x" * 2500})
    assert "content-length" in big.request.headers
    error = assert_openai_error(big, 413)
    assert "2000" in error["message"]
    assert rejected(limited, "request_too_large") == before + 1


def test_chunked_body_over_limit_is_413(limited: Server, auth: dict[str, str]) -> None:
    body = json.dumps({"prompt": "x" * 6000, "max_tokens": 1}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 500):
            yield body[i:i + 500]

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as c:
            return await c.post(limited.v1 + "/completions", content=chunks(),
                                headers={**auth, "Content-Type": "application/json"})

    before = rejected(limited, "request_too_large")
    r = asyncio.run(post())
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(r, 413)
    assert rejected(limited, "request_too_large") == before + 1


def test_small_chunked_body_is_accepted(limited: Server, auth: dict[str, str]) -> None:
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as c:
            return await c.post(limited.v1 + "/completions", content=chunks(),
                                headers={**auth, "Content-Type": "application/json"})

    r = asyncio.run(post())
    assert r.status_code == 200, r.text


def test_full_queue_is_503_with_retry_after(limited: Server, auth: dict[str, str]) -> None:
    wait_idle(limited)
    url = limited.v1 + "/completions"
    with httpx.Client(headers=auth, timeout=60) as client:
        with client.stream("POST", url, json={"prompt": "Hi", "max_tokens": 4000,
                                              "ignore_eos": True, "stream": True}) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # held open: closing it would abort the request
            seen = 0
            while seen < 2:  # two steps done: the slot is taken and the stats say so
                seen += next(lines).startswith("data:")
            for path, body in [("/completions", {"prompt": "Hi", "max_tokens": 2}),
                               ("/chat/completions", {"messages": USER, "max_tokens": 2,
                                                      "stream": True})]:
                r = client.post(limited.v1 + path, json=body)
                error = assert_openai_error(r, 503)
                assert error["type"] == "server_error" and error["code"] == "overloaded"
                assert int(r.headers["retry-after"]) >= 1
    wait_idle(limited)  # closing the held stream freed the slot
    after = httpx.post(url, headers=auth, json={"prompt": "Hi", "max_tokens": 2})
    assert after.status_code == 200, after.text


def test_slots_show_the_task_in_flight_and_fail_on_no_slot_is_503(
        limited: Server, auth: dict[str, str]) -> None:
    """llama.cpp's GET /slots while a stream holds the only slot: it runs, its progress
    adds up to its max_tokens; `fail_on_no_slot` turns "every slot busy" into a 503. Once
    the stream is closed (an abort) the slot is idle and shows the task it ran."""
    wait_idle(limited)
    slots_url = limited.base_url + "/slots"
    with httpx.Client(headers=auth, timeout=60) as client:
        with client.stream("POST", limited.v1 + "/completions", json={
                "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True, "stream": True,
                "temperature": 0.5, "top_k": 9, "seed": 4}) as held:
            lines = held.iter_lines()
            seen = 0
            while seen < 3:
                seen += next(lines).startswith("data:")
            [slot] = client.get(slots_url).json()
            assert (slot["id"], slot["is_processing"], slot["n_ctx"]) == (0, True, 4096)
            [progress] = slot["next_token"]
            assert progress["has_next_token"] is True
            assert progress["n_decoded"] >= 2  # (streamed before it: one chunk may wait)
            assert progress["n_decoded"] + progress["n_remain"] == 4000
            params = slot["params"]
            assert (params["temperature"], params["top_k"], params["seed"],
                    params["n_predict"]) == (0.5, 9, 4, 4000)
            assert slot["n_prompt_tokens"] == (
                slot["n_prompt_tokens_processed"] + slot["n_prompt_tokens_cache"]) > 0
            error = assert_openai_error(client.get(slots_url + "?fail_on_no_slot=1"), 503)
            assert error["message"] == "no slot available"
            task = slot["id_task"]
    wait_idle(limited)
    [slot] = httpx.get(slots_url, headers=auth).json()
    assert (slot["is_processing"], slot["id_task"]) == (False, task)
    assert slot["next_token"][0]["has_next_token"] is False
    r = httpx.get(slots_url + "?fail_on_no_slot=1", headers=auth)
    assert r.status_code == 200, r.text


def test_more_prompts_than_the_server_holds_is_400_not_503(limited: Server,
                                                          auth: dict[str, str]) -> None:
    """Two prompts where one slot and no waiting room exist can never be taken: a 503 would
    have the client retry in vain."""
    wait_idle(limited)
    r = httpx.post(limited.v1 + "/completions", headers=auth, timeout=60,
                   json={"prompt": ["Hi", "there"], "max_tokens": 2})
    error = assert_openai_error(r, 400)
    assert error["param"] == "prompt" and "at most 1 samples at once" in error["message"]
    one = httpx.post(limited.v1 + "/completions", headers=auth, timeout=60,
                     json={"prompt": ["Hi"], "max_tokens": 2})
    assert one.status_code == 200, one.text


def test_overloaded_does_not_leak_queue_places(limited: Server, auth: dict[str, str]) -> None:
    """Requests refused with 503, then one at a time: all are served (no stuck counter)."""
    wait_idle(limited)
    results: list[int] = []

    def post() -> None:
        r = httpx.post(limited.v1 + "/completions", headers=auth, timeout=60,
                       json={"prompt": "Hi", "max_tokens": 4})
        results.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) <= {200, 503} and 200 in results
    wait_idle(limited)
    for _ in range(3):
        post()
    assert results[-3:] == [200, 200, 200]


def test_an_unexpected_error_is_one_500_and_the_connection_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a route (here, a route made to raise) is answered with OpenAI's 500 and logged
    once; the keep-alive connection stays usable. (Starlette's catch-all re-raised after
    answering: uvicorn logged the error a second time and closed the connection, and the
    client's next request on it failed with a reset.) The app is the real one, served by
    uvicorn on 127.0.0.1 in this process, without an engine."""
    import uvicorn

    from server.app import ErrorAnsweringRoute, create_app
    from server.config import ServerConfig

    def no_engine() -> Any:
        raise ValueError("no engine in this test")

    async def boom() -> None:
        raise RuntimeError("a bug")

    app = create_app(ServerConfig(), no_engine)
    app.router.add_api_route("/boom", boom, route_class_override=ErrorAnsweringRoute)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=20)
        url = f"http://127.0.0.1:{server.config.port}"
        ports = []
        with httpx.Client(base_url=url) as client:
            for _ in range(3):
                r = client.get("/boom")
                assert assert_openai_error(r, 500)["message"] == "internal server error"
                assert client.get("/version").status_code == 200  # the same connection
                ports.append(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        assert len(set(ports)) == 1
        errors = [rec for rec in caplog.records if rec.levelname == "ERROR"]
        assert [rec.getMessage() for rec in errors].count("unhandled error") == 3
        assert not any("Exception in ASGI application" in rec.getMessage() for rec in errors)
    finally:
        server.should_exit = True
        thread.join(10)


# --- HTTP that uvicorn cannot parse ------------------------------------------------------------

MALFORMED_HTTP = {
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "header_without_colon": b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "bad_chunk_size": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                       b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"ZZ\r\n{}\r\n0\r\n\r\n"),
}


def raw_exchange(port: int, request: bytes) -> httpx.Response:
    """Send raw bytes; read the response until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


@pytest.mark.parametrize("request_bytes", list(MALFORMED_HTTP.values()), ids=list(MALFORMED_HTTP))
def test_unparseable_http_is_an_openai_400(server: Server, request_bytes: bytes) -> None:
    """uvicorn answers what it cannot parse before the app sees it: in OpenAI's format here
    (it was plain text), the connection closed; the server goes on serving."""
    port = int(server.base_url.rsplit(":", 1)[1])
    r = raw_exchange(port, request_bytes)
    error = assert_openai_error(r, 400)
    assert error["type"] == "invalid_request_error" and "Invalid HTTP request" in error["message"]
    assert r.headers["content-type"] == "application/json"
    assert r.headers["connection"] == "close" and r.headers["content-length"] == str(len(r.content))
    assert httpx.get(f"{server.base_url}/version").status_code == 200


@pytest.mark.parametrize("base", ["httptools", "h11"])
def test_both_uvicorn_protocols_answer_unparseable_http_in_openai_format(base: str) -> None:
    """The mixin on either of uvicorn's protocols (h11 where httptools is not installed),
    with the real app served in this process, without an engine."""
    import uvicorn

    from server.app import create_app
    from server.config import ServerConfig
    from server.http_protocol import _OpenAIErrors

    if base == "httptools":
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as protocol

    def no_engine() -> Any:
        raise ValueError("no engine in this test")

    app = create_app(ServerConfig(), no_engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                            http=type("P", (_OpenAIErrors, protocol), {}))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=20)
        for request_bytes in MALFORMED_HTTP.values():
            assert_openai_error(raw_exchange(config.port, request_bytes), 400)
        assert httpx.get(f"http://127.0.0.1:{config.port}/version").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
