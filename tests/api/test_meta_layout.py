"""Meta's own downloads served as they come: params.json, consolidated.*.pth and tokenizer.model
(no Hugging Face files at all), for Llama 3's tiktoken tokenizer and Llama 2's SentencePiece
one kept beside the model folders."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from model.config import meta_hidden_dim
from model.demo import write_meta_checkpoint
from model.tokenizer_model import LLAMA3_NAMED, LLAMA3_PATTERN
from tests.api.conftest import run_server
from tests.conftest import TIKTOKEN_RANKS, TINY

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5}
CONFIG = replace(TINY, hidden_dim=meta_hidden_dim(64, 32, None))


def test_a_llama3_download_serves_chat(tiktoken_model: Path, tmp_path: Path) -> None:
    """Llama 3's folder: the chat prompt is Llama 3's header format in the ids tiktoken gives;
    <|eot_id|> ends an answer as the tokenizer's eos, <|eom_id|> as another stop id."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    n = TIKTOKEN_RANKS
    model = tmp_path / "Meta-Llama-3-8B-Instruct"
    write_meta_checkpoint(model, replace(CONFIG, vocab_size=n + 256),
                          PARAMS | {"vocab_size": n + 256, "rope_theta": 500000.0})
    shutil.copy(tiktoken_model, model / "tokenizer.model")
    ranks = load_tiktoken_bpe(str(tiktoken_model))
    names = LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>"
                            for i in range(3, 3 + 256 - len(LLAMA3_NAMED))]
    meta = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: n + i for i, t in enumerate(names)})
    with run_server(model, tmp_path, "--served-model-name", "llama3",
                    "--max-model-len", "512") as server, server.client() as client:
        assert client.post("/tokenize", json={"prompt": "def f(x):"}).json()["tokens"] == \
            [n] + meta.encode("def f(x):")
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "def f(x):"}]
        prompt = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief."
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\ndef f(x):<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == \
            meta.encode(prompt, allowed_special="all")
        for forced, stop_reason in ((n + 9, None), (n + 8, n + 8)):
            r = client.post("/v1/chat/completions", json={
                "model": "llama3", "messages": messages, "max_tokens": 8,
                "logit_bias": {str(forced): 100}})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop_reason)
            assert r.json()["usage"]["prompt_tokens"] == len(meta.encode(prompt,
                                                                          allowed_special="all"))


def test_a_llama2_download_finds_its_tokenizer_one_level_up(spm_tokenizer_model: Path,
                                                            tmp_path: Path) -> None:
    """Llama 2's download: llama-2-7b-chat/{params.json, consolidated.00.pth}, with
    tokenizer.model beside the folder; vocab_size -1 (read off the embedding). The prompt's
    ids are transformers' for the same file and Llama 2's chat format."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    model = tmp_path / "llama-2-7b-chat"
    write_meta_checkpoint(model, CONFIG, PARAMS | {"vocab_size": -1})
    shutil.copy(spm_tokenizer_model, tmp_path / "tokenizer.model")
    hf = transformers.LlamaTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "def f(x):"}]
    prompt = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\ndef f(x): [/INST]"
    with run_server(model, tmp_path, "--served-model-name", "llama2",
                    "--max-model-len", "512") as server, server.client() as client:
        tokens = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert tokens == hf(prompt, add_special_tokens=False).input_ids
        r = client.post("/v1/chat/completions", json={
            "model": "llama2", "messages": messages, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tokens)
        r = client.post("/v1/completions", json={"model": "llama2", "prompt": "x",
                                                 "max_tokens": 2, "logit_bias": {"2": 100}})
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_a_meta_folder_without_any_tokenizer_says_so(tmp_path: Path) -> None:
    write_meta_checkpoint(tmp_path / "m", CONFIG, PARAMS | {"vocab_size": -1})
    with run_server(tmp_path / "m", tmp_path, wait=False) as server:
        assert server.process.wait(timeout=90) != 0
    assert "has no tokenizer" in server.log() and "Traceback" not in server.log()
