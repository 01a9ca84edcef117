"""SageMaker's two paths, as vLLM serves them: GET/POST /ping is the health check, POST
/invocations sends a body to the endpoint whose request it is."""

from __future__ import annotations

import httpx

from tests.api.conftest import Server, assert_openai_error


def test_ping_is_the_health_check(server: Server) -> None:
    for method in ("GET", "POST"):
        r = httpx.request(method, f"{server.base_url}/ping")  # (open, as /health)
        assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_invocations_route_each_body_to_its_endpoint(client: httpx.Client) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    r = client.post("/invocations", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"] == client.post("/v1/chat/completions",
                                              json=chat).json()["choices"]
    completion = {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}
    r = client.post("/invocations", json=completion)
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["text"] == client.post(
        "/v1/completions", json=completion).json()["choices"][0]["text"]
    r = client.post("/invocations", json={"input": ["a cat", "a dog"]})  # (embeddings on)
    assert r.json()["object"] == "list" and len(r.json()["data"]) == 2
    r = client.post("/invocations", json={"query": "q", "documents": ["a", "b"]})
    assert len(r.json()["results"]) == 2
    with client.stream("POST", "/invocations", json={**chat, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_invocations_refuse_what_no_endpoint_takes(client: httpx.Client,
                                                   server: Server) -> None:
    error = assert_openai_error(client.post("/invocations", json={"nothing": 1}), 400)
    assert "ChatCompletionRequest" in error["message"]
    assert_openai_error(client.post("/invocations", content=b"{not json"), 400)
    # a body of an endpoint's, refused there: its own error
    bad = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000}
    assert "context" in assert_openai_error(client.post("/invocations", json=bad), 400)[
        "message"]
    assert httpx.post(f"{server.base_url}/invocations", json=bad).status_code == 401
