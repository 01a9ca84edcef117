"""vLLM's use_beam_search over HTTP (server/beam_search.py): one beam is greedy decoding;
n beams come back distinct and ranked, their logprobs transformers' own; streamed as they
are whole; what beam search cannot honour is a 400."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from tests.api.conftest import assert_openai_error, sse_data

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoint,
                                                         dtype=torch.float32).eval()


def completion(client: httpx.Client, **fields: object) -> dict:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_one_beam_is_greedy_decoding(client: httpx.Client) -> None:
    """With and without eos (how many logprobs are shown changes nothing: the fake engine's
    test in tests/engine/test_beam_search.py makes that tell)."""
    for fields in ({"ignore_eos": True}, {"logprobs": 5}):
        greedy = completion(client, max_tokens=12, temperature=0, **fields)
        beam = completion(client, max_tokens=12, use_beam_search=True, **fields)
        assert beam["choices"][0]["text"] == greedy["choices"][0]["text"]
        assert beam["choices"][0]["finish_reason"] == greedy["choices"][0]["finish_reason"]
        assert beam["usage"] == greedy["usage"]
    shown = completion(client, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    beam = completion(client, max_tokens=6, use_beam_search=True, ignore_eos=True, logprobs=3)
    got, want = beam["choices"][0]["logprobs"], shown["choices"][0]["logprobs"]
    assert got["tokens"] == want["tokens"]
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
    assert [sorted(top) for top in got["top_logprobs"]] == [
        sorted(top) for top in want["top_logprobs"]]


def test_beams_are_ranked_by_their_logprobs(client: httpx.Client,
                                            reference: transformers.LlamaForCausalLM) -> None:
    """Three beams of 8 tokens (ignore_eos: all of one length, so ranked by their summed
    logprob): distinct, best first, each token's logprob as transformers computes it."""
    prompt_ids = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    answer = completion(client, max_tokens=8, n=3, use_beam_search=True, ignore_eos=True,
                        logprobs=0, return_tokens_as_token_ids=True)
    sums = []
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "length"
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        ids = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            logprobs = torch.log_softmax(reference(ids).logits[0].float(), -1)
        expected = [logprobs[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(tokens)]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-3)
        sums.append(sum(expected))
    assert len({c["text"] for c in answer["choices"]}) == 3
    assert sums == sorted(sums, reverse=True)
    assert answer["usage"]["completion_tokens"] == 24


def test_ended_beams_and_the_stream(client: httpx.Client) -> None:
    """Without ignore_eos, beams may end ("stop") or run out ("length"); streamed, each
    choice's text comes whole, the same as unstreamed."""
    fields = {"max_tokens": 10, "n": 4, "use_beam_search": True}
    whole = completion(client, **fields)
    assert {c["finish_reason"] for c in whole["choices"]} <= {"stop", "length"}
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "stream": True,
                                             **fields})
    events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    pieces = {i: [e["choices"][0]["text"] for e in events
                  if e["choices"] and e["choices"][0]["index"] == i and e["choices"][0]["text"]]
              for i in range(4)}
    assert all(len(p) == 1 for p in pieces.values())  # each beam whole, once it is chosen
    texts = {i: p[0] for i, p in pieces.items()}
    assert [texts[c["index"]] for c in whole["choices"]] == [c["text"] for c in whole["choices"]]
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], **fields})
    assert chat.status_code == 200 and len(chat.json()["choices"]) == 4


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 11}, "n"), ({"stop": ["."]}, "stop"), ({"min_tokens": 2}, "min_tokens"),
    ({"logit_bias": {"5": 1}}, "logit_bias"), ({"echo": True}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
])
def test_what_beam_search_cannot_honour_is_a_400(client: httpx.Client, fields: dict,
                                                 param: str) -> None:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4,
                                             "use_beam_search": True, **fields})
    error = assert_openai_error(r, 400)
    assert error["param"] == param and "beam" in error["message"], error
