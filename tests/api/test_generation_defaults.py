"""The model's sampling defaults (generation_config.json) for what a request leaves out, as
vLLM's --generation-config auto applies them, on a real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from server.config import GenerationDefaults
from tests.api.conftest import run_server

PROMPT = {"prompt": [5, 6, 7, 8], "ignore_eos": True, "n": 2}


def with_generation_config(checkpoint: Path, out: Path, **fields: object) -> Path:
    folder = shutil.copytree(checkpoint, out)
    raw = json.loads((folder / "generation_config.json").read_text()) | fields
    (folder / "generation_config.json").write_text(json.dumps(raw))
    return folder


def complete(v1: str, **fields: object) -> list[str]:
    """Each choice: its text, its finish_reason and the whole usage's completion tokens."""
    body = httpx.post(f"{v1}/completions", json=PROMPT | fields, timeout=60).json()
    return [(c["text"], c["finish_reason"], body["usage"]["completion_tokens"])
            for c in body["choices"]]


def test_the_models_defaults_fill_in_what_a_request_leaves_out(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """generation_config.json asks for greedy decoding and 3 new tokens: a request that leaves
    temperature and max_tokens out gets them (two samples alike, 3 tokens each), one that sets
    them gets its own; `--generation-config vllm` goes back to the neutral defaults."""
    folder = with_generation_config(tiny_checkpoint, tmp_path / "m", do_sample=True,
                                    temperature=0.0, max_new_tokens=3)
    with run_server(folder, tmp_path, "--max-model-len", "24") as server:
        assert "sampling defaults from generation_config.json" in server.log()
        (a, reason, used), (b, _, _) = complete(server.v1, max_tokens=None)
        assert a == b and (reason, used) == ("length", 6)  # 3 tokens each
        greedy = complete(server.v1, max_tokens=3, temperature=0)
        assert [text for text, _, _ in greedy] == [a, a]
        own = complete(server.v1, max_tokens=8, temperature=1.0, seed=3)
        assert own[0][0] != own[1][0] and own[0][2] == 16
        # chat leaves max_tokens out by default
        chat = httpx.post(f"{server.v1}/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}).json()
        assert chat["usage"]["completion_tokens"] == 3
    with run_server(folder, tmp_path, "--max-model-len", "24",
                    "--generation-config", "vllm") as server:
        (a, reason, used), (b, _, _) = complete(server.v1, max_tokens=None, seed=3)
        assert a != b and used == 2 * (24 - 4)  # temperature 1, the rest of the context


def test_defaults_are_read_as_vllm_reads_them(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "min_p": None,
        "repetition_penalty": 1.1, "max_new_tokens": 256, "eos_token_id": [1, 2]}))
    defaults = GenerationDefaults.load("auto", tmp_path)
    assert defaults.as_dict() == {"temperature": 0.6, "top_p": 0.9, "top_k": 50,
                                  "repetition_penalty": 1.1, "max_tokens": 256}
    assert GenerationDefaults.load("vllm", tmp_path) == GenerationDefaults()
    assert GenerationDefaults.load(str(tmp_path), tmp_path / "elsewhere") == defaults
    assert GenerationDefaults.load("auto", tmp_path / "elsewhere") == GenerationDefaults()
    with pytest.raises(ValueError, match="no .*generation_config.json"):
        GenerationDefaults.load(str(tmp_path / "elsewhere"), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0}))
    with pytest.raises(ValueError, match=r"top_p=0, expected a number in \(0, 1\]"):
        GenerationDefaults.load("auto", tmp_path)
