"""LoRA adapters over HTTP (vLLM's --enable-lora --lora-modules): a request names an adapter
as its model and gets what transformers computes on the checkpoint with the adapter merged
in; requests of different adapters and of the base model share batches, never their prefix
cache; /v1/models lists the adapters."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from server.cli import build_parser, configs
from tests.api.conftest import Server, assert_openai_error, run_server, wait_idle
from tests.conftest import LoraFixture, write_lora

PROMPT = "The quick brown fox jumps over the lazy dog and then the cat sat on the mat"


@pytest.fixture(scope="module")
def second(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraFixture:
    return write_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora-2"), seed=13, rank=8)


@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint: Path, lora: LoraFixture, second: LoraFixture,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("lora-server"),
                    "--served-model-name", "tiny", "--enable-lora", "--lora-modules",
                    f"sql={lora.adapter}", f'{{"name": "chat", "path": "{second.adapter}"}}',
                    "--enable-prompt-tokens-details", "--enable-embeddings",
                    "--metrics-compat", "vllm", "--max-model-len", "512") as s:
        yield s


@pytest.fixture
def client(lora_server: Server) -> Iterator[httpx.Client]:
    with lora_server.client() as c:
        yield c


def complete(client: httpx.Client, model: str, prompt: str | list[int] = PROMPT,
             **fields: object) -> dict:
    r = client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(answer: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in answer["choices"][0]["logprobs"]["tokens"]]


def greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([prompt + out])).logits[0, -1].argmax()))
    return out


def test_models_lists_the_adapters(client: httpx.Client, lora: LoraFixture) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert list(cards) == ["tiny", "sql", "chat"]
    assert cards["sql"]["root"] == str(lora.adapter) and cards["sql"]["parent"] == "tiny"
    assert cards["tiny"].get("parent") is None
    assert client.get("/v1/models/sql").json()["parent"] == "tiny"
    error = assert_openai_error(client.post("/v1/completions", json={
        "model": "nope", "prompt": "x"}), 404)
    assert error["code"] == "model_not_found"


def test_an_adapters_answer_is_the_merged_models(client: httpx.Client, tiny_checkpoint: Path,
                                                 lora: LoraFixture) -> None:
    prompt = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    adapted, base = complete(client, "sql"), complete(client, "tiny")
    assert token_ids(adapted) == greedy(lora.merged, prompt, 8)
    assert token_ids(base) == greedy(tiny_checkpoint, prompt, 8)
    assert token_ids(adapted) != token_ids(base)
    assert (adapted["model"], base["model"]) == ("sql", "tiny")
    # beam search's steps run on the adapter too: one beam is its greedy answer
    beam = complete(client, "sql", use_beam_search=True)
    assert token_ids(beam) == token_ids(adapted)


def test_adapters_and_the_model_share_batches(client: httpx.Client) -> None:
    """Nine requests at once, three of each model, 24 tokens each: every answer is the one
    its model gives alone (a row on the wrong weights would change it)."""
    models = ["tiny", "sql", "chat"] * 3
    prompts = [f"{PROMPT} number {k}" for k in range(len(models))]
    alone = [token_ids(complete(client, m, p, max_tokens=24)) for m, p in zip(models, prompts,
                                                                                strict=True)]
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda mp: token_ids(complete(client, *mp, max_tokens=24)),
                                 zip(models, prompts, strict=True)))
    assert together == alone


def test_vllms_lora_metric_names_the_running_adapters(client: httpx.Client,
                                                      lora_server: Server) -> None:
    """vllm:lora_requests_info (what LoRA-aware routers read): the adapters of the requests
    running, as labels; max_lora the adapters loaded (no --max-loras)."""
    def info() -> dict[str, float]:
        return {k: v for k, v in lora_server.metrics().items()
                if k.startswith("vllm:lora_requests_info")}

    body = {"model": "chat", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        running = info()
        for _ in lines:
            pass
    [(series, when)] = running.items()
    assert series == ('vllm:lora_requests_info{max_lora="2",running_lora_adapters="chat",'
                      'waiting_lora_adapters=""}') and when > 1e9
    wait_idle(lora_server)
    assert list(info()) == ['vllm:lora_requests_info{max_lora="2",running_lora_adapters="",'
                            'waiting_lora_adapters=""}']


def test_the_prefix_cache_is_an_adapters_own(client: httpx.Client, lora: LoraFixture) -> None:
    """A prompt computed on the base model is not reused by the adapter (its K/V differ),
    while the adapter's own repeat is."""
    prompt = " ".join(["alpha beta gamma delta"] * 8)
    ids = client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    complete(client, "tiny", prompt)
    first = complete(client, "sql", prompt)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert token_ids(first) == greedy(lora.merged, ids, 8)
    again = complete(client, "sql", prompt)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert token_ids(again) == token_ids(first)


def test_chat_and_embeddings_name_the_adapter(client: httpx.Client) -> None:
    chat = client.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == "chat", chat.text
    vectors = {}
    for model in ("tiny", "sql"):
        r = client.post("/v1/embeddings", json={"model": model, "input": PROMPT})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
        vectors[model] = r.json()["data"][0]["embedding"]
    assert vectors["tiny"] != vectors["sql"]


def test_the_engine_process_serves_adapters(tiny_checkpoint: Path, lora: LoraFixture,
                                            tmp_path: Path) -> None:
    """--engine-process: the adapters load in the engine's process; the server checks
    names against the ones it reports."""
    with (run_server(tiny_checkpoint, tmp_path, "--engine-process", "--enable-lora",
                     "--lora-modules", f"sql={lora.adapter}") as server,
          httpx.Client(base_url=server.base_url, timeout=60) as client):
        prompt = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        assert token_ids(complete(client, "sql")) == greedy(lora.merged, prompt, 8)


def load(client: httpx.Client, name: str, path: Path | str) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def unload(client: httpx.Client, name: str) -> httpx.Response:
    return client.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_adapters_load_and_unload_while_serving(tiny_checkpoint: Path, lora: LoraFixture,
                                                second: LoraFixture, tmp_path: Path) -> None:
    """vLLM's runtime LoRA updating: an adapter loaded while serving answers as the merged
    model, is listed, and once unloaded is a 404; one loaded again under the same name from
    other weights answers as those, its old prefix cache unused; a stream running on an
    adapter that is unloaded ends as it would have."""
    with (run_server(tiny_checkpoint, tmp_path, "--served-model-name", "tiny",
                     "--enable-lora", "--allow-runtime-lora-updating", "--max-loras", "2",
                     "--enable-prompt-tokens-details") as server,
          httpx.Client(base_url=server.base_url, timeout=60) as client):
        prompt = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        assert client.post("/v1/completions", json={"model": "sql", "prompt": "x"}
                           ).status_code == 404
        r = load(client, "sql", lora.adapter)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully."
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "sql"]
        first = complete(client, "sql")
        assert token_ids(first) == greedy(lora.merged, prompt, 8)
        error = assert_openai_error(load(client, "sql", lora.adapter), 400)
        assert error["message"] == "The lora adapter 'sql' has already been loaded."

        # unloaded while a long stream runs on it: the stream ends as it would have
        long = {"model": "sql", "prompt": PROMPT, "max_tokens": 900, "temperature": 0,
                "ignore_eos": True}
        alone = client.post("/v1/completions", json=long).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            first_chunk = next(line for line in lines if line.startswith("data:"))
            assert unload(client, "sql").status_code == 200
            running = server.metric("llama_serve_requests_running")
            rest = [line for line in lines if line.startswith("data:")]
        assert running == 1  # (it was unloaded under the running stream)
        chunks = [first_chunk, *rest]
        text = "".join(json.loads(c[5:])["choices"][0]["text"] for c in chunks
                       if c != "data: [DONE]")
        assert text == alone
        assert assert_openai_error(client.post("/v1/completions", json={
            "model": "sql", "prompt": "x"}), 404)["code"] == "model_not_found"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
        error = assert_openai_error(unload(client, "sql"), 404)
        assert error["message"] == "The lora adapter 'sql' cannot be found."

        assert load(client, "sql", second.adapter).status_code == 200  # other weights
        again = complete(client, "sql")
        assert token_ids(again) == greedy(second.merged, prompt, 8)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

        odd = tmp_path / "odd-alpha"
        shutil.copytree(lora.adapter, odd)
        spec = json.loads((odd / "adapter_config.json").read_text())
        (odd / "adapter_config.json").write_text(json.dumps({**spec, "lora_alpha": "abc"}))
        for name, path, param in (("bad", tmp_path / "nowhere", "lora_path"),
                                  ("long", tmp_path / ("x" * 300), "lora_path"),
                                  ("odd", odd, "lora_path"),
                                  ("tiny", lora.adapter, "lora_name")):
            assert assert_openai_error(load(client, name, path), 400)["param"] == param
        assert load(client, "chat", lora.adapter).status_code == 200  # the second of 2
        assert "--max-loras 2" in assert_openai_error(load(client, "third", lora.adapter),
                                                      400)["message"]


def test_runtime_updating_is_off_by_default(client: httpx.Client, lora: LoraFixture) -> None:
    error = assert_openai_error(load(client, "x", lora.adapter), 404)
    assert "--allow-runtime-lora-updating" in error["message"]
    assert assert_openai_error(unload(client, "sql"), 404)  # (the fixture's stays)
    assert complete(client, "sql")["model"] == "sql"


def test_flags_and_adapters_that_cannot_be_served(tiny_checkpoint: Path, lora: LoraFixture,
                                                  tmp_path: Path) -> None:
    parse = build_parser().parse_args
    with pytest.raises(ValueError, match="needs --enable-lora"):
        configs(parse(["serve", "m", "--lora-modules", f"a={lora.adapter}"]), tmp_path)
    for spec, words in (("noequals", "expected name=path"), ('{"name": "a"}', "expected")):
        with pytest.raises(ValueError, match=words):
            configs(parse(["serve", "m", "--enable-lora", "--lora-modules", spec]), tmp_path)
    with pytest.raises(ValueError, match="needs --enable-lora"):
        configs(parse(["serve", "m", "--allow-runtime-lora-updating"]), tmp_path)
    with pytest.raises(ValueError, match="more than --max-loras"):
        configs(parse(["serve", "m", "--enable-lora", "--max-loras", "1", "--lora-modules",
                       f"a={lora.adapter}", f"b={lora.adapter}"]), tmp_path)
    with pytest.raises(ValueError, match="the model's own names"):
        configs(parse(["serve", "m", "--served-model-name", "a", "--enable-lora",
                       "--lora-modules", f"a={lora.adapter}"]), tmp_path)
    with run_server(tiny_checkpoint, tmp_path, "--enable-lora", "--lora-modules",
                    f"sql={lora.adapter}", "--max-lora-rank", "2", wait=False) as server:
        assert server.process.wait(timeout=120) != 0
    assert "above --max-lora-rank (2)" in server.log()
