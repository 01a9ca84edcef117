"""Fill in the middle over HTTP: a completion's `suffix` (or transformers' <FILL_ME> marker)
on a model with Code Llama's infilling tokens. The prompt is Meta's layout
(tests/model/test_infill.py), the middle transformers' greedy continuation of it, ended by
the end-of-middle token; what cannot be laid out is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers

from model.tokenizer import Tokenizer
from tests.api.conftest import Server, assert_openai_error, run_server, sse_data
from tests.conftest import indent_cut

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return total\n"
EOT = 1003  # ▁<EOT> in the Code Llama-style vocabulary (tests/conftest.py)
NEWLINE, SPACE = 262, 357  # its "\n" and "▁"


@pytest.fixture(scope="module")
def infill_server(code_llama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Server]:
    with run_server(code_llama_checkpoint, tmp_path_factory.mktemp("infill"),
                    "--served-model-name", "code", "--max-model-len", "256") as s:
        yield s


@pytest.fixture
def code(infill_server: Server) -> Iterator[httpx.Client]:
    with infill_server.client() as c:
        yield c


def complete(client: httpx.Client, **fields: object) -> dict:
    r = client.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX,
                                             "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def greedy_until_end(model: transformers.LlamaForCausalLM, ids: list[int], max_tokens: int,
                     ends: set[int]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_tokens and not (out and out[-1] in ends):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


def test_the_middle_is_transformers_greedy_continuation(code: httpx.Client,
                                                        code_llama_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_dir(code_llama_checkpoint)
    assert tokenizer.infill is not None
    prompt = tokenizer.infill.encode(PREFIX, SUFFIX)
    model = transformers.LlamaForCausalLM.from_pretrained(code_llama_checkpoint,
                                                          dtype=torch.float32).eval()
    want = greedy_until_end(model, prompt, 12, {*tokenizer.eos_ids, EOT})
    answer = complete(code, max_tokens=12, logprobs=0, return_tokens_as_token_ids=True)
    [choice] = answer["choices"]
    assert [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]] == want
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(want),
                               "total_tokens": len(prompt) + len(want)}
    assert choice["text"] == complete(code, max_tokens=12)["choices"][0]["text"]


def test_the_fill_marker_is_a_suffix(code: httpx.Client) -> None:
    marked = code.post("/v1/completions", json={
        "prompt": PREFIX + "<FILL_ME>" + SUFFIX, "max_tokens": 8, "temperature": 0}).json()
    with_suffix = complete(code, max_tokens=8)
    assert marked["choices"][0]["text"] == with_suffix["choices"][0]["text"]
    assert marked["usage"] == with_suffix["usage"]


def test_the_end_of_middle_token_stops_an_infill_only(code: httpx.Client) -> None:
    """Made the likeliest token, it ends the middle at once ("stop", named in stop_reason,
    its text left out); a plain prompt writes it on (a special token: no text) to the end."""
    bias = {"logit_bias": {str(EOT): 100}, "max_tokens": 5}
    [choice] = complete(code, **bias)["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == ("", "stop", EOT)
    plain = code.post("/v1/completions", json={"prompt": PREFIX, **bias}).json()
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 5
    # beam search runs on the infill's prompt too (its ending at EOT: the fake engine's test
    # in tests/engine/test_beam_search.py, where the table can make EOT likeliest)
    beams = complete(code, use_beam_search=True, n=2, max_tokens=5)
    assert len(beams["choices"]) == 2
    assert beams["usage"]["prompt_tokens"] == complete(code, max_tokens=1)["usage"][
        "prompt_tokens"]


def infill(client: httpx.Client, **fields: object) -> dict:
    """llama.cpp's POST /infill, greedy."""
    r = client.post("/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                     "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_llamacpps_infill_is_the_suffix_completion(code: httpx.Client) -> None:
    """/infill lays out the same prompt (no input_extra, no prompt): the same middle, ended
    at EOT as an end of generation ("eos")."""
    [choice] = complete(code, max_tokens=12, logprobs=0,
                        return_tokens_as_token_ids=True)["choices"]
    body = infill(code, n_predict=12, return_tokens=True)
    assert body["content"] == choice["text"]
    assert body["tokens"] == [int(t.removeprefix("token_id:"))
                              for t in choice["logprobs"]["tokens"]]
    assert body["tokens_evaluated"] == complete(code, max_tokens=1)["usage"]["prompt_tokens"]
    ended = infill(code, n_predict=5, logit_bias=[[EOT, 100]])
    assert (ended["content"], ended["stop_type"], ended["tokens_predicted"]) == ("", "eos", 1)
    # the prompt is what is typed in the gap: it continues the prefix
    typed = infill(code, n_predict=6, prompt="total = ")
    assert typed["content"] == complete(code, prompt=PREFIX + "total = ",
                                        max_tokens=6)["choices"][0]["text"]
    with code.stream("POST", "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX,
                                              "temperature": 0, "n_predict": 12,
                                              "stream": True}) as r:
        events = [json.loads(d) for d in sse_data(r)]
    assert "".join(e["content"] for e in events) == body["content"]
    assert events[-1]["stop"] is True


# What llama.vim asks for of each completion (its response_fields)
LLAMA_VIM_FIELDS = ["content", "timings/prompt_n", "timings/prompt_ms",
                    "timings/prompt_per_token_ms", "timings/prompt_per_second",
                    "timings/predicted_n", "timings/predicted_ms",
                    "timings/predicted_per_token_ms", "timings/predicted_per_second",
                    "truncated", "tokens_cached"]


def test_llama_vims_requests_as_it_sends_them(code: httpx.Client) -> None:
    """Its ring-buffer update (the other files' chunks, nothing predicted, nothing asked
    back), then a completion: the infill sampler after top-k and top-p, n_indent, the time
    limits; only the fields it asks for come back."""
    extra = [{"filename": "util.py", "text": "def sub(a, b):\n    return a - b\n"}]
    ring = code.post("/infill", json={
        "input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
        "n_predict": 0, "temperature": 0.0, "stream": False, "samplers": [],
        "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1,
        "response_fields": [""]})
    assert ring.status_code == 200 and ring.json() == {}, ring.text
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
            "prompt": "total", "n_predict": 32, "stop": [], "n_indent": 4, "top_k": 40,
            "top_p": 0.90, "stream": False, "samplers": ["top_k", "top_p", "infill"],
            "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 3000,
            "response_fields": LLAMA_VIM_FIELDS}
    answer = code.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert sorted(result) == sorted(LLAMA_VIM_FIELDS)
    assert 1 <= result["timings/predicted_n"] <= 32 and result["truncated"] is False
    assert indent_cut(result["content"], 4) == result["content"]
    settings = infill(code, **{**body, "response_fields": None, "seed": 1}
                      )["generation_settings"]
    assert settings["samplers"] == ["top_k", "top_p", "infill"]
    assert (settings["n_indent"], settings["t_max_predict_ms"]) == (4, 3000)


def test_the_infill_sampler_ends_a_middle_it_is_unsure_of(code: httpx.Client) -> None:
    """The random model spreads its mass: after top-k and top-p no text token holds 0.2, so
    llama.cpp's infill sampler takes the end-of-middle token at once, whatever the seed;
    the same chain without it writes on to n_predict (the runner wires it to the row)."""
    for seed in range(5):
        body = {"n_predict": 8, "seed": seed, "top_k": 40, "top_p": 0.9,
                "temperature": 0.8, "return_tokens": True}
        ended = infill(code, **body, samplers=["top_k", "top_p", "infill"])
        assert (ended["content"], ended["stop_type"], ended["tokens_predicted"]) == (
            "", "eos", 1)
        assert infill(code, **body, samplers=["top_k", "top_p"])["tokens_predicted"] == 8


def test_n_indent_ends_the_middle_at_an_under_indented_line(code: httpx.Client) -> None:
    """Greedy, newlines and spaces made likely: the middle is the unlimited one cut before
    its first line with fewer than 2 spaces ("limit", not truncated: the context had room)."""
    lines = {"n_predict": 40, "ignore_eos": True,
             "logit_bias": [[NEWLINE, 3.0], [SPACE, 3.0]]}
    whole = infill(code, **lines)["content"]
    limited = infill(code, **lines, n_indent=2)
    assert limited["content"] == indent_cut(whole, 2) != whole
    assert (limited["stop_type"], limited["truncated"]) == ("limit", False)
    assert limited["tokens_predicted"] < 40


def test_streamed_middle_is_the_whole_one(code: httpx.Client) -> None:
    whole = complete(code, max_tokens=16, ignore_eos=True)["choices"][0]["text"]
    with code.stream("POST", "/v1/completions", json={
            "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 16, "ignore_eos": True,
            "temperature": 0, "stream": True}) as r:
        events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == whole


def test_truncation_keeps_the_text_next_to_the_middle(code: httpx.Client) -> None:
    whole = complete(code, max_tokens=1)["usage"]["prompt_tokens"]
    cut = complete(code, max_tokens=1, truncate_prompt_tokens=whole - 4)
    assert cut["usage"]["prompt_tokens"] == whole - 4


def test_the_openai_sdk_sends_a_suffix(infill_server: Server, code: httpx.Client) -> None:
    client = openai.OpenAI(base_url=infill_server.v1, api_key="unused")
    answer = client.completions.create(model="code", prompt=PREFIX, suffix=SUFFIX,
                                       max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert answer.choices[0].text == complete(code, max_tokens=4,
                                              ignore_eos=True)["choices"][0]["text"]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"prompt": [5, 6, 7]}, "suffix", "text prompts"),
    ({"echo": True}, "echo", "echo"),
    ({"prompt": "a<FILL_ME>b<FILL_ME>c", "suffix": None}, "prompt", "2 times"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens", "more than the 5"),
    ({"prompt": "a<FILL_ME>b"}, "suffix", "give one of the two"),
    ({"prompt": ["a<FILL_ME>b", "plain"], "suffix": None}, "prompt", "in every prompt or"),
])
def test_what_cannot_be_laid_out_is_a_400(code: httpx.Client, fields: dict, param: str,
                                          words: str) -> None:
    r = code.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, **fields})
    error = assert_openai_error(r, 400)
    assert error["param"] == param and words in error["message"], error


def test_a_model_without_infilling_refuses_a_suffix(client: httpx.Client) -> None:
    """The shared server's model (a byte-level tokenizer, no infilling tokens)."""
    error = assert_openai_error(client.post("/v1/completions", json={
        "prompt": "x", "suffix": "y"}), 400)
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]
    r = client.post("/v1/completions", json={"prompt": "x", "suffix": None, "max_tokens": 1})
    assert r.status_code == 200, r.text
