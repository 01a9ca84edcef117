"""The shared server answers the two basic requests; a model may answer to several names."""

from pathlib import Path

import httpx

from tests.api.conftest import Server, assert_openai_error, run_server


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


def test_aliases_answer_as_the_first_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """vLLM's `--served-model-name A B C`: requests may name any, responses carry A."""
    with run_server(tiny_checkpoint, tmp_path, "--served-model-name", "tiny-v2", "tiny",
                    "latest") as server:
        cards = httpx.get(f"{server.v1}/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny-v2", "tiny", "latest"]
        assert {c["root"] for c in cards} == {"tiny-v2"}
        assert httpx.get(f"{server.v1}/models/latest").json()["id"] == "latest"
        for name in ("tiny", "latest"):
            r = httpx.post(f"{server.v1}/completions",
                           json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "tiny-v2", r.text
        r = httpx.post(f"{server.v1}/completions",
                       json={"model": "tiny-v3", "prompt": "hi", "max_tokens": 2})
        assert assert_openai_error(r, 404)["code"] == "model_not_found"
