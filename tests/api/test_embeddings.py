"""POST /v1/embeddings (--enable-embeddings): a prompt's final normalized hidden state, its
last token's (or every token's mean, --pooling mean), at unit length; the oracle is
transformers' LlamaModel on the same checkpoint."""

from __future__ import annotations

import base64
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from openai import OpenAI

from tests.api.conftest import Server, assert_openai_error, run_server

TEXTS = ["The quick brown fox", "jumps over the lazy dog and keeps running far away"]


@pytest.fixture(scope="module")
def embed_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """Embeddings on, small prefill chunks (a prompt spans several steps)."""
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("embed"), "--served-model-name",
                    "tiny", "--enable-embeddings", "--max-num-batched-tokens", "16",
                    "--max-model-len", "512") as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> transformers.LlamaModel:
    return transformers.LlamaModel.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def expected(reference: transformers.LlamaModel, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        hidden = reference(torch.tensor([ids])).last_hidden_state[0]  # after the final norm
    vector = hidden[-1] if pooling == "last" else hidden.mean(0)
    return torch.nn.functional.normalize(vector, dim=0)


def tokens(server: Server, text: str) -> list[int]:
    r = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}, timeout=60)
    return r.json()["tokens"]


def test_embeddings_are_the_models_last_hidden_state(embed_server: Server,
                                                     reference: transformers.LlamaModel
                                                     ) -> None:
    """Texts and token ids, in order, each as transformers computes it (its prompt in
    several chunks here: 16 tokens a step); usage counts the prompts' tokens."""
    ids = [tokens(embed_server, text) for text in TEXTS]
    assert len(ids[1]) > 16
    for body in ({"input": TEXTS}, {"input": ids}):
        r = httpx.post(f"{embed_server.v1}/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "list" and answer["model"] == "tiny"
        assert [d["index"] for d in answer["data"]] == [0, 1]
        for d, prompt in zip(answer["data"], ids, strict=True):
            vector = torch.tensor(d["embedding"])
            assert d["object"] == "embedding" and abs(vector.norm().item() - 1) < 1e-5
            assert (vector - expected(reference, prompt, "last")).abs().max().item() < 1e-4
        total = sum(map(len, ids))
        assert answer["usage"] == {"prompt_tokens": total, "total_tokens": total}


def test_messages_are_embedded_as_the_chat_template_renders_them(
        embed_server: Server, reference: transformers.LlamaModel) -> None:
    """vLLM's chat form: the conversation rendered (no assistant turn opened, unless asked),
    its ids as /tokenize gives them for the same messages and controls, embedded as any
    prompt; the template's own errors and a request's template need what chat needs."""
    messages = [{"role": "system", "content": "Represent the query."},
                {"role": "user", "content": "where do foxes live"}]
    for controls in ({}, {"add_generation_prompt": True}):
        ids = httpx.post(f"{embed_server.base_url}/tokenize", timeout=60, json={
            "messages": messages, "add_generation_prompt": False, **controls}).json()["tokens"]
        r = httpx.post(f"{embed_server.v1}/embeddings", timeout=60,
                       json={"messages": messages, **controls})
        assert r.status_code == 200, r.text
        [d] = r.json()["data"]
        assert (torch.tensor(d["embedding"]) - expected(reference, ids, "last")).abs().max() < 1e-4
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
    for body, param in (({"input": "x", "messages": messages}, None),
                        ({}, None),
                        ({"messages": messages, "chat_template": "{{ 1 }}"}, "chat_template")):
        error = assert_openai_error(httpx.post(f"{embed_server.v1}/embeddings", json=body,
                                               timeout=60), 400)
        if param is not None:
            assert error["param"] == param


def test_the_sdk_reads_them(embed_server: Server) -> None:
    """The OpenAI SDK asks for base64 (little-endian float32) and decodes it: the floats'."""
    with OpenAI(base_url=embed_server.v1, api_key="none", max_retries=0) as client:
        r = client.embeddings.create(model="tiny", input=TEXTS)
    floats = httpx.post(f"{embed_server.v1}/embeddings", json={"input": TEXTS},
                        timeout=60).json()["data"]
    for got, want in zip(r.data, floats, strict=True):
        assert got.embedding == pytest.approx(want["embedding"], abs=1e-6)
    raw = httpx.post(f"{embed_server.v1}/embeddings", timeout=60,
                     json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(
        floats[0]["embedding"], abs=1e-6)


def test_mean_pooling(tiny_checkpoint: Path, tmp_path: Path,
                      reference: transformers.LlamaModel) -> None:
    """--pooling mean: every token's, over chunks; a prompt seen before (whose prefix a slot
    holds) is computed whole again: the prefix cache would leave tokens out of the mean."""
    with run_server(tiny_checkpoint, tmp_path, "--enable-embeddings", "--pooling", "mean",
                    "--max-num-batched-tokens", "16", "--max-model-len", "512") as server:
        text = TEXTS[1] * 3
        ids = tokens(server, text)
        want = expected(reference, ids, "mean")
        for _ in range(2):
            r = httpx.post(f"{server.v1}/embeddings", json={"input": text}, timeout=60)
            vector = torch.tensor(r.json()["data"][0]["embedding"])
            assert (vector - want).abs().max().item() < 1e-4


def test_generation_beside_embeddings_is_unchanged(embed_server: Server) -> None:
    """A greedy stream with embedding requests coming and going in its steps (prompt chunks
    beside its decode rows: "mixed" steps) writes what it writes alone, and the embeddings
    are what they are alone."""
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}
    url = f"{embed_server.v1}/embeddings"
    alone = httpx.post(f"{embed_server.v1}/completions", json=body, timeout=60).json()
    vectors = httpx.post(url, json={"input": TEXTS}, timeout=60).json()["data"]
    mixed = 'llama_serve_engine_steps_total{kind="mixed"}'
    before = embed_server.metric(mixed)
    stop, answering, answers = threading.Event(), threading.Event(), []

    def embed() -> None:
        # One client for the loop: a fresh one per request costs tens of milliseconds on a
        # loaded machine (its TLS context), a gap long enough to miss a short generation.
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                answers.append(client.post(url, json={"input": TEXTS}))
                answering.set()

    worker = threading.Thread(target=embed)
    worker.start()
    try:  # the generation starts once the embeddings are flowing, so they overlap it
        assert answering.wait(60)
        beside = httpx.post(f"{embed_server.v1}/completions", json=body, timeout=60).json()
    finally:
        stop.set()
        worker.join()
    assert beside["choices"][0]["text"] == alone["choices"][0]["text"]
    assert embed_server.metric(mixed) > before  # they did share steps
    assert answers and all(r.status_code == 200 for r in answers)
    for r in answers:  # (a batch's company changes no vector)
        for got, want in zip(r.json()["data"], vectors, strict=True):
            assert got["embedding"] == pytest.approx(want["embedding"], abs=1e-5)


def test_truncation_and_refusals(embed_server: Server, long_server: Server,
                                 auth: dict[str, str], reference: transformers.LlamaModel
                                 ) -> None:
    """truncate_prompt_tokens keeps the prompt's last tokens: the vector is theirs."""
    url = f"{embed_server.v1}/embeddings"
    long_text = " ".join(f"word{i % 97} thing{i % 13}" for i in range(300))
    error = assert_openai_error(httpx.post(url, json={"input": long_text}, timeout=60), 400)
    assert "maximum context length" in error["message"]
    kept = httpx.post(url, json={"input": long_text, "truncate_prompt_tokens": 32}, timeout=60)
    assert kept.status_code == 200 and kept.json()["usage"]["prompt_tokens"] == 32
    last = tokens(embed_server, long_text)[-32:]
    vector = torch.tensor(kept.json()["data"][0]["embedding"])
    assert (vector - expected(reference, last, "last")).abs().max().item() < 1e-4
    for body, param in (({"input": "x", "dimensions": 8}, "dimensions"),
                        ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                        ({"input": "x", "truncate_prompt_tokens": 513},
                         "truncate_prompt_tokens"),
                        ({"input": []}, "input"), ({"input": [10**6]}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format")):
        error = assert_openai_error(httpx.post(url, json=body, timeout=60), 400)
        assert error["param"] == param, error
    # Off by default: a 404 that names the flag
    error = assert_openai_error(httpx.post(f"{long_server.v1}/embeddings", json={"input": "x"},
                                           headers=auth, timeout=60), 404)
    assert "--enable-embeddings" in error["message"]


# --- vLLM's scoring APIs on embeddings: /v1/score and /v1/rerank ----------------------------

QUERY = "where do foxes live"
DOCS = ["Foxes live in forests and dens.", "The stock market fell today.", "A den is a home."]


def cosine(reference: transformers.LlamaModel, server: Server, a: str, b: str) -> float:
    return float(expected(reference, tokens(server, a), "last")
                 @ expected(reference, tokens(server, b), "last"))


def test_scores_are_cosine_similarities(embed_server: Server,
                                        reference: transformers.LlamaModel) -> None:
    """One text against a list, two lists pair by pair: each score the cosine of the two
    texts' embeddings (transformers'); usage counts each text embedded once."""
    for body, pairs in (({"text_1": QUERY, "text_2": DOCS}, [(QUERY, d) for d in DOCS]),
                        ({"text_1": DOCS[:2], "text_2": DOCS[1:]},
                         list(zip(DOCS[:2], DOCS[1:], strict=True)))):
        r = httpx.post(f"{embed_server.v1}/score", json={"model": "tiny", **body}, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "list" and answer["model"] == "tiny"
        assert [d["index"] for d in answer["data"]] == list(range(len(pairs)))
        for d, (a, b) in zip(answer["data"], pairs, strict=True):
            assert d["object"] == "score"
            assert d["score"] == pytest.approx(cosine(reference, embed_server, a, b), abs=1e-4)
        texts = set(t for pair in pairs for t in pair)
        assert answer["usage"]["prompt_tokens"] == sum(len(tokens(embed_server, t))
                                                       for t in texts)
    assert httpx.post(f"{embed_server.base_url}/score", json={
        "text_1": QUERY, "text_2": DOCS[0]}, timeout=60).status_code == 200  # (vLLM's alias)
    error = assert_openai_error(httpx.post(f"{embed_server.v1}/score", json={
        "text_1": DOCS[:2], "text_2": DOCS}, timeout=60), 400)
    assert "as many as text_2" in error["message"]


def test_rerank_orders_documents_by_their_similarity(embed_server: Server,
                                                     reference: transformers.LlamaModel) -> None:
    scores = [cosine(reference, embed_server, QUERY, d) for d in DOCS]
    order = sorted(range(len(DOCS)), key=lambda k: -scores[k])
    for path, top_n, want in (("/v1/rerank", 0, order), ("/rerank", 2, order[:2]),
                              ("/v2/rerank", 1, order[:1])):
        r = httpx.post(f"{embed_server.base_url}{path}", timeout=60,
                       json={"query": QUERY, "documents": DOCS, "top_n": top_n})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["index"] for x in results] == want
        for x in results:
            assert x["document"]["text"] == DOCS[x["index"]]
            assert x["relevance_score"] == pytest.approx(scores[x["index"]], abs=1e-4)
        assert r.json()["model"] == "tiny" and r.json()["usage"]["prompt_tokens"] > 0


def test_scoring_needs_embeddings(long_server: Server, auth: dict[str, str]) -> None:
    """A server without --enable-embeddings answers the scoring APIs with a 404 naming it."""
    for path, body in (("/v1/score", {"text_1": "a", "text_2": "b"}),
                       ("/v1/rerank", {"query": "q", "documents": ["a"]})):
        error = assert_openai_error(httpx.post(f"{long_server.base_url}{path}", json=body,
                                               headers=auth, timeout=60), 404)
        assert "--enable-embeddings" in error["message"]
