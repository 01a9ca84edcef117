"""The shared server answers the two basic requests."""

import httpx

from tests.api.conftest import Server


def test_health_and_completion(server: Server, auth: dict[str, str]) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    r = httpx.post(f"{server.v1}/completions", headers=auth,
                   json={"model": "tiny", "prompt": "def f():", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_openapi_describes_the_real_schemas(server: Server) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                 "/detokenize", "/health"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage"} <= set(schemas)
    assert "top_k" in schemas["CompletionRequest"]["properties"]
    assert httpx.get(f"{server.base_url}/docs").status_code == 200
