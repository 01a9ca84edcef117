"""/tokenize and /detokenize: round trips, counts, the chat template, vocabulary bounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer as Backend

from tests.api.conftest import assert_openai_error

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"}]


def tokenize(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["count"] == len(result["tokens"])
    assert result["max_model_len"] == 512
    return result


def detokenize(client: httpx.Client, tokens: list[int]) -> str:
    r = client.post("/detokenize", json={"model": "tiny", "tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


@pytest.mark.parametrize("text", ["Hello there", "def f(x):\n    return x * 2",
                                  "Héllo wörld ✓ 日本語 🙂", " leading and trailing  "])
def test_prompt_round_trip(client: httpx.Client, text: str) -> None:
    result = tokenize(client, model="tiny", prompt=text, add_special_tokens=False)
    assert result["count"] > 0
    assert detokenize(client, result["tokens"]) == text
    # Special tokens are text too, as vLLM's /detokenize (transformers' decode) writes them
    with_bos = tokenize(client, model="tiny", prompt=text)["tokens"]
    assert detokenize(client, with_bos).startswith("<s>")


def test_token_strs_are_the_vocabulary_entries(client: httpx.Client,
                                               tiny_checkpoint: Path) -> None:
    """Each token's entry in tokenizer.json's vocabulary (byte-level "\u0120there"), not its
    decoded text (" there")."""
    vocab = Backend.from_file(str(tiny_checkpoint / "tokenizer.json"))
    plain = tokenize(client, prompt="Hello there")
    assert plain["token_strs"] is None
    named = tokenize(client, prompt="Hello there", return_token_strs=True)
    assert named["tokens"] == plain["tokens"] and named["token_strs"][0] == "<s>"
    assert named["token_strs"] == [vocab.id_to_token(t) for t in named["tokens"]]
    assert any(piece.startswith("\u0120") for piece in named["token_strs"])


def test_special_tokens_flag(client: httpx.Client) -> None:
    with_bos = tokenize(client, prompt="Hello there")["tokens"]
    without = tokenize(client, prompt="Hello there", add_special_tokens=False)["tokens"]
    assert len(with_bos) == len(without) + 1 and with_bos[1:] == without
    assert tokenize(client, prompt="")["count"] == 1  # BOS alone


def test_count_matches_completion_usage(client: httpx.Client) -> None:
    count = tokenize(client, prompt="How many tokens is this?")["count"]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "How many tokens is this?",
                                             "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == count


def test_messages_render_the_chat_template(client: httpx.Client) -> None:
    prompt = tokenize(client, messages=MESSAGES)
    text = detokenize(client, prompt["tokens"])
    assert "Be brief." in text and "Hello there" in text
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                  "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == prompt["count"]


def test_generation_prompt_is_a_suffix(client: httpx.Client) -> None:
    bare = tokenize(client, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    prompted = tokenize(client, messages=MESSAGES, add_generation_prompt=True)["tokens"]
    assert len(prompted) > len(bare) and prompted[:len(bare)] == bare


def test_chat_honours_the_template_controls(client: httpx.Client) -> None:
    """vLLM's add_generation_prompt / continue_final_message / add_special_tokens: chat's
    prompt is what /tokenize gives for the same controls."""
    answer = [*MESSAGES, {"role": "assistant", "content": "Sure, the"}]
    cases = [(MESSAGES, {"add_generation_prompt": False}),
             (answer, {"add_generation_prompt": False, "continue_final_message": True}),
             (MESSAGES, {"add_special_tokens": True}),
             # a client's template variables never collide with the call's arguments
             (MESSAGES, {"chat_template_kwargs": {"add_special_tokens": True, "self": 1}})]
    counts = []
    for messages, controls in cases:
        expected = tokenize(client, messages=messages, **controls)
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                      "max_tokens": 1, **controls})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == expected["count"], controls
        counts.append(expected["count"])
    assert detokenize(client, tokenize(client, messages=answer, add_generation_prompt=False,
                                       continue_final_message=True)["tokens"]
                      ).endswith("Sure, the")
    assert counts[0] < tokenize(client, messages=MESSAGES)["count"] == counts[3] < counts[2]
    both = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": answer, "continue_final_message": True})
    assert assert_openai_error(both, 400)["param"] == "continue_final_message"


def test_truncate_prompt_tokens_keeps_the_last_tokens(client: httpx.Client) -> None:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens; an echo shows those."""
    ids = tokenize(client, prompt="one two three four five six seven")["tokens"]
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "one two three four "
                                             "five six seven", "max_tokens": 1, "echo": True,
                                             "truncate_prompt_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3
    assert r.json()["choices"][0]["text"].startswith(detokenize(client, ids[-3:]))
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                     "max_tokens": 1,
                                                     "truncate_prompt_tokens": 4})
    assert chat.json()["usage"]["prompt_tokens"] == 4
    bad = client.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": 0})
    assert assert_openai_error(bad, 400)["param"] == "truncate_prompt_tokens"
    # More than the context holds: refused whatever the prompt's length, as vLLM does
    most = client.get("/v1/models").json()["data"][0]["max_model_len"]
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        ok = client.post(path, json={"model": "tiny", **body, "max_tokens": 1,
                                     "truncate_prompt_tokens": most})
        assert ok.status_code == 200, ok.text
        bad = client.post(path, json={"model": "tiny", **body,
                                      "truncate_prompt_tokens": most + 1})
        error = assert_openai_error(bad, 400)
        assert error["param"] == "truncate_prompt_tokens" and str(most) in error["message"]
    # -1: the context's length (vLLM's), which then leaves no room for a token out
    long = client.post("/v1/completions", json={"prompt": [7] * (most + 50), "max_tokens": 1,
                                                 "truncate_prompt_tokens": -1})
    assert f"({most} in the prompt, 1 in the completion)" in assert_openai_error(
        long, 400)["message"]
    short = client.post("/v1/completions", json={"prompt": [7] * 5, "max_tokens": 1,
                                                  "truncate_prompt_tokens": -1})
    assert short.json()["usage"]["prompt_tokens"] == 5
    bad = client.post("/v1/completions", json={"prompt": "x", "truncate_prompt_tokens": -2})
    assert assert_openai_error(bad, 400)["param"] == "truncate_prompt_tokens"


def test_completions_honour_add_special_tokens(client: httpx.Client) -> None:
    def prompt_tokens(**fields: Any) -> int:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello there",
                                                 "max_tokens": 1, **fields})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(add_special_tokens=False) == prompt_tokens() - 1  # no BOS


def test_messages_add_no_second_bos(client: httpx.Client) -> None:
    """The template writes BOS itself; the default must not add another one."""
    tokens = tokenize(client, messages=MESSAGES)["tokens"]
    doubled = tokenize(client, messages=MESSAGES, add_special_tokens=True)["tokens"]
    assert tokens[0] == doubled[1] and tokens[0] != tokens[1]


@pytest.mark.parametrize("tokens", [[1024], [5, 99999], [-1]], ids=["vocab", "far", "negative"])
def test_detokenize_out_of_vocab_is_400(client: httpx.Client, tokens: list[int]) -> None:
    error = assert_openai_error(client.post("/detokenize", json={"tokens": tokens}), 400)
    assert error["param"] == "tokens"


def test_detokenize_padded_vocab_id_is_not_a_server_error(client: httpx.Client) -> None:
    r = client.post("/detokenize", json={"tokens": [5, 1000]})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert assert_openai_error(r, 400)["param"] == "tokens"


@pytest.mark.parametrize("body", [{"tokens": "abc"}, {"tokens": [1.5]}, {}],
                         ids=["type", "fraction", "missing"])
def test_detokenize_bad_body_is_400(client: httpx.Client, body: dict[str, Any]) -> None:
    assert_openai_error(client.post("/detokenize", json=body), 400)


def test_tokenize_bad_body_is_400(client: httpx.Client) -> None:
    assert_openai_error(client.post("/tokenize", json={"prompt": 5}), 400)
    assert_openai_error(client.post("/tokenize", json={"messages": []}), 400)
    assert_openai_error(client.post("/tokenize", json={"messages": [{"role": "x"}]}), 400)
