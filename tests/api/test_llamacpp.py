"""llama.cpp's native API over HTTP (POST /completion, /completions, /props, /tokenize's
`content`), on the shared server: its answers are the OpenAI endpoint's where the two ask the
same, in llama.cpp's shapes; its sampling follows llama.cpp's chain and penalty window."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.protocol.llamacpp import LlamaCppInfillRequest
from server.serving_llamacpp import LlamaCppService
from tests.api.conftest import assert_openai_error, sse_data

PROMPT = "The quick brown fox"


def completion(client: httpx.Client, path: str = "/completion", **fields: object) -> dict:
    r = client.post(path, json={"prompt": PROMPT, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def openai_greedy(client: httpx.Client, prompt: object, max_tokens: int,
                  **fields: object) -> tuple[str, list[int]]:
    """/v1/completions' greedy text and token ids for the same prompt."""
    r = client.post("/v1/completions", json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
        "return_tokens_as_token_ids": True, **fields})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    return choice["text"], [int(t.removeprefix("token_id:"))
                            for t in choice["logprobs"]["tokens"]]


def tokenize(client: httpx.Client, text: str, add_special: bool = True) -> list[int]:
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_greedy_completion_is_the_openai_endpoints_in_llamacpps_shape(
        client: httpx.Client) -> None:
    text, ids = openai_greedy(client, PROMPT, 12)
    body = completion(client, n_predict=12, return_tokens=True)
    prompt_ids = tokenize(client, PROMPT)
    assert body["content"] == text
    assert body["tokens"] == ids
    assert body["stop"] is True and body["index"] == 0
    assert (body["stop_type"], body["stopping_word"], body["truncated"]) == ("limit", "", False)
    assert body["tokens_predicted"] == 12
    assert body["tokens_evaluated"] == len(prompt_ids)
    assert body["tokens_cached"] == len(prompt_ids) + 12
    assert body["model"] == "tiny"
    assert body["has_new_line"] == ("\n" in text)
    assert body["prompt"].endswith(PROMPT)
    timings = body["timings"]
    assert timings["predicted_n"] == 12
    assert timings["prompt_n"] + timings["cache_n"] == len(prompt_ids)
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] >= 0
    settings = body["generation_settings"]
    assert settings["n_predict"] == 12 and settings["temperature"] == 0
    assert "completion_probabilities" not in body
    # llama.cpp's aliases: /completions, max_tokens
    assert completion(client, "/completions", max_tokens=12)["content"] == text
    assert completion(client, n_predict=12)["tokens"] == []  # (return_tokens off)


def test_prompt_forms_and_bos(client: httpx.Client) -> None:
    """A text gets BOS, token ids are taken as they are, texts among ids are tokenized in
    place (BOS only where the prompt begins with one)."""
    with_bos = tokenize(client, PROMPT)
    plain = tokenize(client, PROMPT, add_special=False)
    assert with_bos != plain
    want = completion(client, n_predict=6, return_tokens=True)
    assert completion(client, prompt=with_bos, n_predict=6, return_tokens=True)["tokens"] == \
        want["tokens"]
    assert completion(client, prompt=plain, n_predict=6)["tokens_evaluated"] == len(plain)
    head, tail = "The quick", " brown fox"
    mixed = completion(client, prompt=[*tokenize(client, head), tail], n_predict=6,
                       return_tokens=True)
    ids = tokenize(client, head) + tokenize(client, tail, add_special=False)
    assert mixed["tokens_evaluated"] == len(ids)
    assert mixed["tokens"] == openai_greedy(client, ids, 6)[1]
    starts_with_text = completion(client, prompt=[head, *tokenize(client, tail, False)],
                                  n_predict=1)
    assert starts_with_text["tokens_evaluated"] == len(tokenize(client, head)) + len(
        tokenize(client, tail, False))


def test_several_prompts_and_samples_answer_a_list_by_index(client: httpx.Client) -> None:
    prompts = ["one two", [5, 6, 7], {"prompt_string": "three"}]
    body = completion(client, prompt=prompts, n_predict=4, n_cmpl=2, return_tokens=True)
    assert isinstance(body, list) and [r["index"] for r in body] == list(range(6))
    for i, prompt in enumerate(["one two", [5, 6, 7], "three"]):
        want = openai_greedy(client, prompt, 4)[1]
        assert body[2 * i]["tokens"] == want == body[2 * i + 1]["tokens"]


def test_a_stop_word_ends_the_content_before_it(client: httpx.Client) -> None:
    full = completion(client, n_predict=24, n_probs=1)
    content, pieces = full["content"], [p["token"] for p in full["completion_probabilities"]]
    k = next(k for k in range(4, 20) if (pieces[k] + pieces[k + 1]).strip())
    word = pieces[k] + pieces[k + 1]  # two whole tokens
    body = completion(client, n_predict=24, stop=["\x00never", word], n_probs=1)
    assert body["content"] == content[:content.index(word)]
    assert (body["stop_type"], body["stopping_word"]) == ("word", word)
    assert body["tokens_predicted"] <= k + 2
    # llama.cpp's rule: as many probabilities dropped at the end as the stop word has tokens
    dropped = len(tokenize(client, word, add_special=False))
    assert len(body["completion_probabilities"]) == body["tokens_predicted"] - dropped
    assert [p["id"] for p in body["completion_probabilities"]] == [
        p["id"] for p in full["completion_probabilities"]][:body["tokens_predicted"] - dropped]


def test_an_end_of_generation_token_is_stop_type_eos(client: httpx.Client) -> None:
    eos = client.get("/props").json()["eos_token"]
    [eos_id] = tokenize(client, eos, add_special=False)[-1:]
    body = completion(client, n_predict=8, logit_bias=[[eos_id, 100]])
    assert (body["stop_type"], body["content"], body["tokens_predicted"]) == ("eos", "", 1)
    # ignore_eos bans it (llama.cpp's: not only not stopping at it)
    ignored = completion(client, n_predict=8, logit_bias={str(eos_id): 100}, ignore_eos=True,
                         return_tokens=True)
    assert ignored["stop_type"] == "limit" and len(ignored["tokens"]) == 8
    assert eos_id not in ignored["tokens"]


def test_logit_bias_forms(client: httpx.Client) -> None:
    _, ids = openai_greedy(client, PROMPT, 1)
    banned = completion(client, n_predict=1, return_tokens=True,
                        logit_bias=[[ids[0], False]])["tokens"]
    assert banned != ids
    word = " zebra"
    word_ids = tokenize(client, word, add_special=False)
    forced = completion(client, n_predict=1, return_tokens=True, logit_bias=[[word, 100]])
    assert forced["tokens"][0] in word_ids
    settings = forced["generation_settings"]["logit_bias"]
    assert settings == [{"bias": 100.0, "token": t} for t in word_ids]


def test_n_probs_are_the_raw_logprobs(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5,
                                             "temperature": 0, "logprobs": 3})
    openai = r.json()["choices"][0]["logprobs"]
    body = completion(client, n_predict=5, n_probs=3)
    probs = body["completion_probabilities"]
    assert len(probs) == 5
    for entry, lp, tops in zip(probs, openai["token_logprobs"], openai["top_logprobs"],
                               strict=True):
        assert entry["logprob"] == pytest.approx(lp, abs=1e-4)
        assert len(entry["top_logprobs"]) == 3
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            sorted(tops.values(), reverse=True), abs=1e-4)
        assert entry["id"] == entry["top_logprobs"][0]["id"]  # greedy: the likeliest
        assert bytes(entry["bytes"]).decode(errors="replace").startswith(entry["token"])


def test_stream_sends_pieces_then_the_result_and_no_done(client: httpx.Client) -> None:
    whole = completion(client, n_predict=10)
    with client.stream("POST", "/completion", json={
            "prompt": PROMPT, "temperature": 0, "n_predict": 10, "stream": True,
            "n_probs": 2, "timings_per_token": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_data(r)]
    *pieces, last = events
    assert all(e["stop"] is False and len(e["tokens"]) >= 1 for e in pieces)
    assert all(len(e["completion_probabilities"]) == len(e["tokens"]) for e in pieces)
    assert all("timings" in e for e in pieces)
    assert "".join(e["content"] for e in pieces) == whole["content"]
    assert sum(len(e["tokens"]) for e in pieces) == 10
    assert last["stop"] is True and last["content"] == "" and last["tokens"] == []
    assert last["stop_type"] == "limit" and last["tokens_predicted"] == 10
    assert "completion_probabilities" not in last


def test_response_fields_pick_keys_nested_by_path(client: httpx.Client) -> None:
    body = completion(client, n_predict=3,
                      response_fields=["content", "timings/predicted_n", "no/such"])
    assert set(body) == {"content", "timings/predicted_n"}
    assert body["timings/predicted_n"] == 3


def test_llamacpp_defaults_and_props(client: httpx.Client) -> None:
    r = client.post("/completion", json={"prompt": PROMPT, "n_predict": 2})
    settings = r.json()["generation_settings"]
    assert (settings["temperature"], settings["top_k"], settings["min_p"],
            settings["repeat_last_n"], settings["samplers"]) == (
        0.8, 40, 0.05, 64, ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p",
                            "min_p", "xtc", "temperature"])
    assert settings["top_p"] == pytest.approx(0.95)
    props = client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 512
    assert props["default_generation_settings"]["params"]["top_k"] == 40
    assert props["total_slots"] == 8
    assert props["model_alias"] == "tiny"
    assert props["bos_token"] and props["eos_token"]


def test_a_seed_repeats_a_sample(client: httpx.Client) -> None:
    fields = {"n_predict": 12, "temperature": 1.5, "top_k": 0, "top_p": 1, "min_p": 0,
              "seed": 1234}
    first = completion(client, **fields)
    assert completion(client, **fields)["content"] == first["content"]
    assert first["generation_settings"]["seed"] == 1234


def test_penalties_count_the_prompt_within_the_window(client: httpx.Client) -> None:
    """llama.cpp's penalties count the last repeat_last_n tokens of prompt and output alike
    (vLLM's presence penalty counts the output only). A prompt token made the likeliest is
    the first answer without penalties; a huge presence penalty keeps it out where the
    window holds it, not where the window has passed it; repeat_last_n 0 turns it off."""
    prompt_ids = tokenize(client, PROMPT)
    first, last = prompt_ids[1], prompt_ids[-1]  # (past the BOS)
    for token, window, banned in ((last, 1, True), (first, 1, False), (first, -1, True),
                                  (first, 0, False)):
        body = completion(client, n_predict=4, return_tokens=True, presence_penalty=50,
                          repeat_last_n=window, logit_bias=[[token, 30]])
        assert (body["tokens"][0] != token) is banned, (token, window, body["tokens"])
    out = completion(client, n_predict=16, return_tokens=True, presence_penalty=50,
                     repeat_last_n=-1)["tokens"]
    assert not set(out) & set(prompt_ids) and len(set(out)) == len(out)


def test_a_grammar_or_schema_shapes_the_answer(client: httpx.Client) -> None:
    body = completion(client, n_predict=8, grammar='root ::= "yes" | "no"')
    assert body["content"] in ("yes", "no")
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2, 3]}}, "required": ["a"]}
    body = completion(client, n_predict=40, json_schema=schema)
    assert isinstance(json.loads(body["content"])["a"], int)


@pytest.mark.parametrize(("fields", "param"), [
    ({"mirostat": 3}, "mirostat"),
    ({"min_keep": -1}, "min_keep"),
    ({"dry_multiplier": 0.8, "dry_sequence_breakers": []}, "dry_sequence_breakers"),
    ({"dry_penalty_last_n": -2}, "dry_penalty_last_n"),
    ({"dry_multiplier": 0.8, "dry_sequence_breakers": ["x"] * 65}, "dry_sequence_breakers"),
    ({"samplers": ["xtc", "top_k"]}, "samplers"),
    ({"post_sampling_probs": True}, "post_sampling_probs"),
    ({"id_slot": 1}, "id_slot"),
    ({"samplers": ["temperature", "top_k"]}, "samplers"),
    ({"samplers": ["infill", "top_k"]}, "samplers"),
    ({"samplers": ["top_p", "infill"]}, "samplers"),  # (the infill sampler needs top-k)
    ({"samplers": ["top_k", "infill"], "top_k": 0}, "samplers"),
    ({"samplers": ["nope"]}, "samplers"),
    ({"prompt": [1, 999999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"n_predict": -2}, "n_predict"),
    ({"logit_bias": [[1]]}, "logit_bias"),
    ({"logit_bias": [[1, "x"]]}, "logit_bias"),
    ({"n_probs": 21}, "n_probs"),
    ({"seed": 2**32}, "seed"),
    ({"grammar": "root ::= ("}, "grammar"),
])
def test_bad_requests_are_400s_naming_the_field(client: httpx.Client, fields: dict,
                                                param: str) -> None:
    r = client.post("/completion", json={"prompt": PROMPT, **fields})
    error = assert_openai_error(r, 400)
    assert error["param"] == param or param in error["message"], error


def repeats(tokens: list[int], start: int, length: int = 2) -> list[int]:
    """The positions from `start` on whose token extends a repeat of the `length` tokens
    before it: those tokens were followed by the same token earlier on."""
    seen: dict[tuple[int, ...], set[int]] = {}
    found = []
    for p in range(length, len(tokens)):
        key = tuple(tokens[p - length:p])
        if p >= start and tokens[p] in seen.get(key, ()):
            found.append(p)
        seen.setdefault(key, set()).add(tokens[p])
    return found


def test_dry_keeps_a_greedy_answer_from_repeating_itself(client: httpx.Client) -> None:
    """DRY with a multiplier no logit outweighs (and a breaker the text never holds): no
    output token extends a repeat of two tokens or more, where the plain greedy answer of
    the same prompt loops."""
    prompt = tokenize(client, PROMPT)
    fields = {"n_predict": 80, "ignore_eos": True, "return_tokens": True}
    plain = completion(client, **fields)["tokens"]
    assert repeats(prompt + plain, len(prompt))  # (else the test would show nothing)
    body = completion(client, **fields, dry_multiplier=1e4, dry_sequence_breakers=["\u2603"])
    assert repeats(prompt + body["tokens"], len(prompt)) == []
    settings = body["generation_settings"]
    assert (settings["dry_multiplier"], settings["dry_base"], settings["dry_allowed_length"],
            settings["dry_penalty_last_n"]) == (1e4, 1.75, 2, -1)
    assert settings["dry_sequence_breakers"] == ["\u2603"]
    # left out of the chain, DRY does not run
    off = completion(client, **fields, dry_multiplier=1e4, samplers=["penalties", "top_k",
                                                                      "temperature"])
    assert off["tokens"] == plain


@pytest.mark.parametrize("fields", [
    {"mirostat": 1, "mirostat_tau": 3.0, "mirostat_eta": 0.2},
    {"mirostat": 2},
    {"typical_p": 0.6},
    {"top_n_sigma": 1.5},
    {"xtc_probability": 0.7, "xtc_threshold": 0.05},
    {"dynatemp_range": 0.5, "dynatemp_exponent": 2.0},
    {"min_keep": 3, "top_p": 0.01},
    {"dry_multiplier": 0.8, "typical_p": 0.9, "xtc_probability": 0.5},
])
def test_llamacpps_other_samplers_run_seeded_and_are_echoed(client: httpx.Client,
                                                            fields: dict) -> None:
    """Each sampler runs through the engine (a seed repeats its answer, two samples of one
    request differ) and the answer's settings say what ran."""
    ask = {"n_predict": 24, "ignore_eos": True, "return_tokens": True, "temperature": 1.0,
           "seed": 42, **fields}
    first, second = (completion(client, **ask) for _ in range(2))
    assert len(first["tokens"]) == 24 and first["tokens"] == second["tokens"]
    settings = first["generation_settings"]
    for name, value in fields.items():
        assert settings[name] == value, name
    # (and it did something: the same seed without it draws other tokens)
    without = {k: v for k, v in ask.items() if k not in fields or k == "top_p"}
    assert completion(client, **without)["tokens"] != first["tokens"]
    samples = client.post("/completion", json={"prompt": PROMPT, **ask, "n_cmpl": 2}).json()
    assert samples[0]["tokens"] != samples[1]["tokens"]


def test_mirostat_at_temperature_zero_and_typical_p_there(client: httpx.Client) -> None:
    """Mirostat after a temperature of 0 is greedy; typical-p at temperature 0 takes the
    likeliest token typical-p kept, which need not be the likeliest of all."""
    greedy = completion(client, n_predict=12, return_tokens=True)["tokens"]
    mirostat = completion(client, n_predict=12, return_tokens=True, mirostat=2, top_k=7)
    assert mirostat["tokens"] == greedy
    # (echoed as asked, as llama.cpp does, though mirostat ran in place of top-k)
    assert mirostat["generation_settings"]["top_k"] == 7
    typical = [completion(client, n_predict=12, return_tokens=True, typical_p=0.3,
                          seed=seed)["tokens"] for seed in (1, 2)]
    assert typical[0] == typical[1]  # (deterministic all the same)
    assert typical[0] != greedy  # (typical-p left out a likeliest token on the way)


def test_props_show_the_samplers_defaults(client: httpx.Client) -> None:
    params = client.get("/props").json()["default_generation_settings"]["params"]
    assert (params["typical_p"], params["top_n_sigma"], params["xtc_probability"],
            params["xtc_threshold"], params["dynatemp_range"], params["mirostat"],
            params["mirostat_tau"], params["dry_multiplier"], params["dry_base"]) == (
        1.0, -1.0, 0.0, 0.1, 0.0, 0, 5.0, 0.0, 1.75)
    assert params["dry_sequence_breakers"] == ["\n", ":", "\"", "*"]
    assert params["samplers"] == ["penalties", "dry", "top_n_sigma", "top_k", "typ_p",
                                  "top_p", "min_p", "xtc", "temperature"]


def test_slots_list_every_slot_and_the_task_each_last_ran(client: httpx.Client) -> None:
    """GET /slots: all 8 slots, their size; the one a finished request ran in shows its
    task (idle), its progress to the end and the parameters it ran with."""
    before = client.get("/slots").json()
    assert [slot["id"] for slot in before] == list(range(8))
    assert all(slot["n_ctx"] == 512 and slot["speculative"] is False for slot in before)
    last = max(slot.get("id_task", -1) for slot in before)
    body = completion(client, n_predict=5, ignore_eos=True, temperature=0.7, top_k=7, seed=3,
                      dry_multiplier=0.5, dry_sequence_breakers=["x"],
                      logit_bias=[["\n", 50.0]])  # (a newline out: has_new_line)
    assert "\n" in body["content"]
    [ran] = [slot for slot in client.get("/slots").json() if slot.get("id_task", -1) > last]
    assert ran["is_processing"] is False
    assert ran["next_token"] == [{"has_next_token": False, "n_remain": 0, "n_decoded": 5,
                                  "has_new_line": True}]
    assert ran["n_prompt_tokens"] == body["tokens_evaluated"]
    params = ran["params"]
    assert (params["temperature"], params["top_k"], params["seed"], params["n_predict"],
            params["dry_multiplier"], params["dry_sequence_breakers"]) == (
        0.7, 7, 3, 5, 0.5, ["x"])
    assert params["samplers"] == ["dry", "top_k", "top_p", "min_p", "temperature"]


def test_a_prompt_longer_than_the_context_is_a_400(client: httpx.Client) -> None:
    for length in (600, 5000):  # (token ids: no cap on items, the context's)
        r = client.post("/completion", json={"prompt": [5] * length})
        assert "context" in assert_openai_error(r, 400)["message"]


def test_n_predict_past_the_context_runs_to_its_end(client: httpx.Client) -> None:
    """llama.cpp's: the answer ends with the context, truncated (a 400 in vLLM's API)."""
    prompt_ids = tokenize(client, PROMPT)
    body = completion(client, n_predict=100_000, ignore_eos=True)
    assert (body["stop_type"], body["truncated"]) == ("limit", True)
    assert body["tokens_predicted"] == 512 - len(prompt_ids)
    assert body["generation_settings"]["n_predict"] == 100_000
    assert completion(client, n_predict=3)["truncated"] is False


def test_the_native_api_needs_the_key(client: httpx.Client) -> None:
    for path in ("/completion", "/completions", "/infill", "/props"):
        r = httpx.request("GET" if path == "/props" else "POST", str(client.base_url) + path,
                          json={"prompt": PROMPT})
        assert r.status_code == 401, path


def test_the_model_field_is_ignored_as_llamacpp_ignores_it(client: httpx.Client) -> None:
    assert completion(client, n_predict=2, model="gpt-4")["model"] == "tiny"


def test_infill_needs_the_models_tokens(client: httpx.Client) -> None:
    r = client.post("/infill", json={"input_prefix": "def f(", "input_suffix": ")"})
    assert "not supported by this model" in assert_openai_error(r, 404)["message"]
    assert_openai_error(client.post("/infill", json={"input_suffix": ")"}), 400)


def test_tokenize_and_detokenize_in_llamacpps_shapes(client: httpx.Client) -> None:
    plain = tokenize(client, PROMPT, add_special=False)
    r = client.post("/tokenize", json={"content": PROMPT})
    assert r.json() == {"tokens": plain}  # llama.cpp's add_special is off by default
    r = client.post("/tokenize", json={"content": PROMPT, "add_special": True})
    assert r.json()["tokens"] == tokenize(client, PROMPT)
    r = client.post("/tokenize", json={"content": [7, PROMPT], "with_pieces": True})
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == [7, *plain]
    assert "".join(p["piece"] for p in pieces[1:]).strip() == PROMPT
    r = client.post("/detokenize", json={"tokens": plain})
    assert r.json()["content"].strip() == PROMPT == r.json()["prompt"].strip()
    assert_openai_error(client.post("/tokenize", json={"content": "a", "prompt": "b"}), 400)


class _Engine:
    max_model_len = 4096


def test_infill_layout_is_llamacpps(code_llama_checkpoint: object) -> None:
    """[extra chunks] [BOS] PRE prefix+prompt SUF suffix MID, each part cut to llama.cpp's
    default batch shares."""
    from model.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(code_llama_checkpoint)  # type: ignore[arg-type]
    infill = tokenizer.infill
    assert infill is not None
    service = LlamaCppService(_Engine(), tokenizer, "code")  # type: ignore[arg-type]
    body = LlamaCppInfillRequest.model_validate({
        "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return total\n",
        "prompt": "total = ", "n_predict": 16,
        "input_extra": [{"filename": "util.py", "text": "import math"}]})
    [(ids, _)] = service.infill_prompt(body)
    extra = (tokenizer.encode("\n\n--- snippet ---\n\n", add_special_tokens=False)
             + tokenizer.encode("import math", add_special_tokens=False))
    t = infill.tokens
    assert ids == [*extra, tokenizer.bos_id, t.prefix_id,
                   *infill.encode_prefix("def add(a, b):\n    total = "), t.suffix_id,
                   *infill.encode_suffix("\n    return total\n"), t.middle_id]
    # a long prefix keeps its last 1536 tokens, a long suffix its first 510 less the prompt's
    long = LlamaCppInfillRequest.model_validate({"input_prefix": "x = 1\n" * 2000,
                                                 "input_suffix": "y = 2\n" * 2000})
    [(ids, _)] = service.infill_prompt(long)
    pre, suf = ids.index(t.prefix_id), ids.index(t.suffix_id)
    assert suf - pre - 1 == 1536 and ids[-1] == t.middle_id
    assert len(ids) - suf - 2 == 510
    assert ids[suf + 1:-1] == infill.encode_suffix("y = 2\n" * 2000)[:510]


def test_native_embedding_is_the_openai_vector_normalized_as_asked(
        client: httpx.Client) -> None:
    want = client.post("/v1/embeddings", json={"input": PROMPT}).json()["data"][0]["embedding"]
    r = client.post("/embedding", json={"content": PROMPT})
    assert r.status_code == 200, r.text
    [item] = r.json()
    assert item["index"] == 0 and len(item["embedding"]) == 1
    assert item["embedding"][0] == pytest.approx(want, abs=1e-5)
    taxicab = client.post("/embedding", json={"input": PROMPT, "embd_normalize": 1}).json()
    assert sum(abs(x) for x in taxicab[0]["embedding"][0]) == pytest.approx(1.0, rel=1e-4)
    int16 = client.post("/embedding", json={"content": PROMPT, "embd_normalize": 0}).json()
    assert max(abs(x) for x in int16[0]["embedding"][0]) == pytest.approx(32760, rel=1e-4)
    several = client.post("/embeddings", json={"content": [PROMPT, [5, 6, 7]]}).json()
    assert [item["index"] for item in several] == [0, 1]
    assert several[0]["embedding"] == [pytest.approx(want, abs=1e-5)]
    assert_openai_error(client.post("/embedding", json={"content": PROMPT,
                                                        "embd_normalize": -1}), 400)


def test_apply_template_renders_the_chat_prompt(client: httpx.Client,
                                                tiny_checkpoint: object) -> None:
    from model.tokenizer import Tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/apply-template", json={"messages": messages})
    assert r.status_code == 200, r.text
    tokenizer = Tokenizer.from_dir(tiny_checkpoint)  # type: ignore[arg-type]
    assert r.json() == {"prompt": tokenizer.apply_chat_template(messages)}
    assert client.post("/apply-template", json={"messages": messages,
                                                "add_generation_prompt": False}).json()[
        "prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert_openai_error(client.post("/apply-template", json={"messages": []}), 400)
    assert_openai_error(client.post("/apply-template", json={
        "messages": messages, "chat_template": "{{ 1 }}"}), 400)


def test_dry_breakers_are_looked_for_once_each(tokenizer_dir: object) -> None:
    """Each breaker is searched for in the vocabulary once: requests at the same moment share
    the search, later ones take what it found, and a breaker cut to llama.cpp's 40 bytes is
    the same breaker; a request with the same breakers as an earlier one gets its tuple."""
    from model.tokenizer import Tokenizer
    from server.protocol.llamacpp import LlamaCppCompletionRequest
    from server.sampling_dry import VocabText, breaker_sequences
    tokenizer = Tokenizer.from_dir(tokenizer_dir)  # type: ignore[arg-type]
    service = LlamaCppService(_Engine(), tokenizer, "m")  # type: ignore[arg-type]
    searched: list[bytes] = []
    find = service._find_breaker
    service._find_breaker = lambda breaker: searched.append(breaker) or find(breaker)  # type: ignore[method-assign]

    def body(*breakers: str) -> LlamaCppCompletionRequest:
        return LlamaCppCompletionRequest.model_validate(
            {"prompt": "a", "dry_multiplier": 0.5, "dry_sequence_breakers": list(breakers)})

    async def ask() -> list[tuple]:
        return list(await asyncio.gather(
            service.dry_breakers(body("\n", "the")), service.dry_breakers(body("the", "\n")),
            service.dry_breakers(body("x" * 40 + "y", "\n"))))

    both, swapped, long = asyncio.run(ask())
    assert sorted(searched) == [b"\n", b"the", b"x" * 40]
    vocab = VocabText.of(tokenizer.token_bytes(range(tokenizer.vocab_size)))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert set(both) == set(swapped) == set(breaker_sequences(["\n", "the"], vocab, encode))
    assert set(long) == set(breaker_sequences(["x" * 40, "\n"], vocab, encode))
    assert asyncio.run(service.dry_breakers(body("the"))) and len(searched) == 3
    # The same breakers again: the same tuple (the engine indexes each tuple once)
    assert asyncio.run(service.dry_breakers(body("\n", "the"))) is both
    assert asyncio.run(service.dry_breakers(
        LlamaCppCompletionRequest.model_validate({"prompt": "a"}))) == ()  # (DRY off)
    # a search that failed is not kept: the next request looks again
    service._find_breaker = lambda breaker: 1 / 0  # type: ignore[method-assign,assignment]
    with pytest.raises(ZeroDivisionError):
        asyncio.run(service.dry_breakers(body("new")))
    service._find_breaker = find  # type: ignore[method-assign]
    assert asyncio.run(service.dry_breakers(body("new")))
