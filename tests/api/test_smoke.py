"""The shared server answers the two basic requests; a model may answer to several names."""

import json
import shutil
from pathlib import Path

import httpx

from tests.api.conftest import Server, assert_openai_error, run_server, sse_data


def test_health_and_completion(server: Server, auth: dict[str, str]) -> None:
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    r = httpx.post(f"{server.v1}/completions", headers=auth,
                   json={"model": "tiny", "prompt": "def f():", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_probes_answer_head(server: Server) -> None:
    """Load balancers' health checks often send HEAD: the status, no body."""
    for path in ("/health", "/live"):
        r = httpx.head(f"{server.base_url}{path}")
        assert r.status_code == 200 and r.content == b"", path


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
    """vLLM's `--served-model-name A B C`: requests may name any, responses carry A. (The
    server also runs with llama.cpp's --no-slots: GET /slots is a 404, and /props says so.)"""
    with run_server(tiny_checkpoint, tmp_path, "--served-model-name", "tiny-v2", "tiny",
                    "latest", "--no-slots") as server:
        assert_openai_error(httpx.get(f"{server.base_url}/slots"), 404)
        assert httpx.get(f"{server.base_url}/props").json()["endpoint_slots"] is False
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


def test_n_beyond_the_slots_runs_in_groups(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """n=5 on 2 slots: three engine requests (2 + 2 + 1 samples) one after another, as vLLM
    queues samples; sample k is drawn with seed + k as when all run at once, so each choice
    is what a one-sample request with that seed gives."""
    with run_server(tiny_checkpoint, tmp_path, "--served-model-name", "tiny",
                    "--max-num-seqs", "2", "--max-n", "8", "--max-waiting", "8") as server:
        url = f"{server.v1}/completions"
        body = {"prompt": "Rivers", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
        alone = [httpx.post(url, json={**body, "seed": 11 + k}).json()["choices"][0]["text"]
                 for k in range(5)]
        assert len(set(alone)) > 1  # the samples differ: the test can tell them apart
        r = httpx.post(url, json={**body, "n": 5, "seed": 11}).json()
        assert [c["index"] for c in r["choices"]] == list(range(5))
        assert [c["text"] for c in r["choices"]] == alone
        assert r["usage"] == {"prompt_tokens": r["usage"]["prompt_tokens"],
                              "completion_tokens": 40,
                              "total_tokens": r["usage"]["prompt_tokens"] + 40}
        assert r["usage"]["prompt_tokens"] == len(
            httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Rivers"}).json()["tokens"])

        # Two prompts, n=3 each (groups of 2 + 1): choice = prompt * n + sample
        two = {**body, "prompt": ["Rivers", "Rivers"], "n": 3, "seed": 11}
        whole = httpx.post(url, json=two, timeout=60).json()["choices"]
        assert [(c["index"], c["text"]) for c in whole] == list(enumerate(alone[:3] * 2))
        with httpx.stream("POST", url, json={**two, "stream": True}, timeout=60) as s:
            chunks = [json.loads(e) for e in sse_data(s)[:-1]]
        texts = {i: "".join(c["choices"][0]["text"] for c in chunks
                            if c["choices"][0]["index"] == i) for i in range(6)}
        assert list(texts.values()) == alone[:3] * 2
        finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert sorted(finished) == list(range(6))

        # Chat likewise, streamed: every sample's role chunk first, then its content
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                "temperature": 1.0, "ignore_eos": True}
        chat_url = f"{server.v1}/chat/completions"
        alone = [httpx.post(chat_url, json={**chat, "seed": 3 + k}).json()
                 ["choices"][0]["message"]["content"] for k in range(3)]
        with httpx.stream("POST", chat_url, json={**chat, "n": 3, "seed": 3, "stream": True},
                          timeout=60) as s:
            choices = [json.loads(e)["choices"][0] for e in sse_data(s)[:-1]]
        assert [c["delta"].get("role") for c in choices[:3]] == ["assistant"] * 3
        assert [c["index"] for c in choices[:3]] == [0, 1, 2]
        assert [
            "".join(c["delta"].get("content") or "" for c in choices if c["index"] == k)
            for k in range(3)] == alone

        # More samples than the server holds at once (2 running + 8 waiting) is a 400, not a
        # 503 to retry in vain
        many = httpx.post(url, json={**body, "prompt": ["a"] * 3, "n": 8})
        error = assert_openai_error(many, 400)
        assert error["param"] == "n" and "asks for 24 samples" in error["message"]


def test_a_tokenizer_from_another_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """vLLM's --tokenizer: a model folder without tokenizer files serves with one from
    elsewhere; the model's generation_config.json still names the end-of-sequence ids (a
    second one, 5, stops the answer as vLLM's stop_reason names it)."""
    model, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    model.mkdir(), tokenizer.mkdir()
    for item in tiny_checkpoint.iterdir():
        kind = "tokenizer" if item.name.startswith(("tokenizer", "special_tokens")) else "model"
        shutil.copy(item, (tokenizer if kind == "tokenizer" else model) / item.name)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config,
                                                              "eos_token_id": [2, 5]}))
    with run_server(model, tmp_path, wait=False) as server:  # (no tokenizer of its own)
        assert server.process.wait(timeout=90) != 0
    assert "has no tokenizer" in server.log()
    with run_server(model, tmp_path, "--tokenizer", str(tokenizer),
                    "--served-model-name", "tiny") as server:
        ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "def f():"}).json()
        with run_server(tiny_checkpoint, tmp_path) as whole:
            assert httpx.post(f"{whole.base_url}/tokenize",
                              json={"prompt": "def f():"}).json() == ids
        r = httpx.post(f"{server.v1}/completions", json={
            "prompt": "hi", "max_tokens": 4, "logit_bias": {"5": 100}}).json()
        assert (r["choices"][0]["finish_reason"], r["choices"][0]["stop_reason"]) == ("stop", 5)
