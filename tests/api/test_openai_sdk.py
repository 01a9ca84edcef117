"""The official `openai` SDK against the real server: responses parse into its types and
mean what OpenAI documents (choices, logprobs, echo, stop, seeds, typed errors)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.api.conftest import API_KEY, Server

USER = [{"role": "user", "content": "Write a haiku about the sea."}]
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def sdk(server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


def greedy_text(sdk: OpenAI, prompt: str | list[int], max_tokens: int = 16) -> str:
    return sdk.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                  **GREEDY).choices[0].text


# --- completions and chat, streaming and not ---------------------------------------------------


def test_completion(sdk: OpenAI) -> None:
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat(sdk: OpenAI) -> None:
    r = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_streamed_completion_equals_unstreamed(sdk: OpenAI) -> None:
    expected = greedy_text(sdk, PROMPT, 12)
    stream = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, stream=True,
                                    **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_streamed_chat_equals_unstreamed(sdk: OpenAI) -> None:
    full = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=12, **GREEDY)
    stream = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=12,
                                         stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_client_concurrent_requests(server: Server) -> None:
    """AsyncOpenAI, several requests in flight at once, streamed and not."""

    async def run() -> tuple[list[str], str]:
        async with AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0,
                               timeout=60) as client:
            plain = [client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10,
                                               **GREEDY) for _ in range(3)]
            responses = await asyncio.gather(*plain)
            stream = await client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=10, stream=True, **GREEDY)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            return [r.choices[0].text for r in responses], streamed

    texts, streamed = asyncio.run(run())
    with OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0) as sdk:
        chat = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=10,
                                           **GREEDY).choices[0].message.content
        assert texts == [greedy_text(sdk, PROMPT, 10)] * 3
    assert streamed == chat


# --- n, logprobs, echo, stop, seeds, prompts ---------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_indexed(sdk: OpenAI, stream: bool) -> None:
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=1,
                               stream=stream, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(r)
        finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                    if c.choices[0].finish_reason}
        assert {c.choices[0].index for c in chunks} == {0, 1, 2}
        assert finished == {0: "length", 1: "length", 2: "length"}
    else:
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert all(c.finish_reason == "length" for c in r.choices)
        assert r.usage.completion_tokens == 18


def test_chat_n_choices_indexed(sdk: OpenAI) -> None:
    r = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=5, n=2, seed=3,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.role == "assistant" for c in r.choices)
    assert r.usage.completion_tokens == 10


def test_completion_logprobs(sdk: OpenAI) -> None:
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n == 7
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        # the chosen token and up to 3 alternatives; greedy picked the most likely one
        assert 1 <= len(top) <= 4 and top[token] == logprob
        assert logprob == pytest.approx(max(top.values()))
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprob_bytes_of_byte_tokens(sdk: OpenAI, client: httpx.Client) -> None:
    """A token holding part of a character shows as "\ufffd", and its `bytes` are its raw
    byte, not the replacement character's three: the logit bias makes the model write the
    three byte tokens of "你" in the order it likes."""
    pieces = client.post("/tokenize", json={"prompt": "你", "add_special_tokens": False}
                         ).json()["tokens"]
    assert len(pieces) == 3
    r = sdk.chat.completions.create(
        model="tiny", messages=USER, max_tokens=4, logprobs=True,
        logit_bias={str(t): 100 for t in pieces}, **GREEDY)
    content = r.choices[0].logprobs.content
    assert all(len(entry.bytes) == 1 and entry.bytes[0] in (0xE4, 0xBD, 0xA0)
               for entry in content), [(e.token, e.bytes) for e in content]
    raw = b"".join(bytes(entry.bytes) for entry in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content


def test_chat_logprobs(sdk: OpenAI) -> None:
    r = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=6, logprobs=True,
                                    top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0
        if "\ufffd" not in entry.token:  # else a piece of a character: its raw byte(s)
            assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    # OpenAI's promise: joined, the tokens' bytes are the text (here across byte tokens)
    raw = b"".join(bytes(entry.bytes) for entry in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    # without logprobs=True there are none
    plain = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_as_token_ids(sdk: OpenAI, stream: bool) -> None:
    """vLLM's return_tokens_as_token_ids: every token in logprobs (chosen and top, prompt
    echoed too) as "token_id:<id>", the ids the model sampled; the text is unchanged."""
    ids_extra = {**GREEDY["extra_body"], "return_tokens_as_token_ids": True}
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "logprobs": 2,
              "temperature": 0}
    plain = sdk.completions.create(**kwargs, extra_body=GREEDY["extra_body"])
    as_ids = sdk.completions.create(**kwargs, echo=not stream, stream=stream,
                                    extra_body=ids_extra)
    chunks = list(as_ids) if stream else [as_ids]
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens or [])]
    tops = [k for c in chunks for top in (c.choices[0].logprobs.top_logprobs or []) if top
            for k in top]
    assert tokens and tops
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens + tops)
    generated = [int(t[9:]) for t in tokens[-5:]]
    assert "".join(c.choices[0].text for c in chunks).endswith(plain.choices[0].text)
    assert sdk.completions.create(model="tiny", prompt=generated, max_tokens=0, echo=True,
                                  ).choices[0].text == plain.choices[0].text
    chat = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=3,
                                       logprobs=True, top_logprobs=1, extra_body=ids_extra,
                                       temperature=0)
    for entry in chat.choices[0].logprobs.content:
        assert entry.token.startswith("token_id:") and entry.bytes == list(entry.token.encode())
        [top] = entry.top_logprobs
        assert top.token.startswith("token_id:")


def test_bad_words(sdk: OpenAI, client: httpx.Client) -> None:
    """vLLM's bad_words over HTTP: with only "x" and "y" allowed, banning "x" leaves "y"."""
    def token(text: str) -> int:
        [t] = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}
                          ).json()["tokens"]
        return t

    allowed = [token("x"), token("y")]
    for words, expected in (([], None), (["x"], "yyyyyy")):
        r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1,
                                   seed=1, extra_body={"ignore_eos": True, "bad_words": words,
                                                       "allowed_token_ids": allowed})
        text = r.choices[0].text
        assert set(text) <= {"x", "y"} and (expected is None or text == expected), text


def test_echo(sdk: OpenAI) -> None:
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, echo=True, **GREEDY)
    assert r.choices[0].text == PROMPT + greedy_text(sdk, PROMPT, 4)


def test_echo_with_logprobs_covers_prompt(sdk: OpenAI) -> None:
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, echo=True,
                               logprobs=2, **GREEDY)
    choice, usage = r.choices[0], r.usage
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == usage.prompt_tokens + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def _tokens(server: Server, **body: object) -> list[int]:
    r = httpx.post(f"{server.base_url}/tokenize", json={"model": "tiny", **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _check_prompt_logprobs(entries: list, prompt_ids: list[int], num_top: int) -> None:
    """vLLM's shape: per prompt token (the first null) the token's own entry, with its rank,
    and the num_top likeliest, ranked 1..num_top in order; the token's own rank is its place
    among them where it is one of them, else past them."""
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for token_id, position in zip(prompt_ids[1:], entries[1:], strict=True):
        own = position[str(token_id)]
        ranked = sorted(position.values(), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked if v["rank"] <= num_top] == list(range(1, num_top + 1))
        logprobs = [v["logprob"] for v in ranked if v["rank"] <= num_top]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert len(position) in (num_top, num_top + 1)  # the token's own among them or not
        if own["rank"] > num_top:  # not among the likeliest: all of them more likely
            assert all(own["logprob"] <= lp for lp in logprobs)
        assert isinstance(own["decoded_token"], str)


def test_prompt_logprobs_on_completions(server: Server, auth: dict[str, str]) -> None:
    """vLLM's prompt_logprobs: on each choice of a prompt (n of them the same list); each
    token's logprob is the echo's; the echo keeps its own (fewer) alternatives."""
    prompts = [PROMPT, "A different and longer prompt here"]
    r = httpx.post(f"{server.v1}/completions", headers=auth, timeout=60, json={
        "model": "tiny", "prompt": prompts, "max_tokens": 1, "n": 2, "echo": True,
        "logprobs": 1, "prompt_logprobs": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for prompt, pair in zip(prompts, (choices[:2], choices[2:]), strict=True):
        ids = _tokens(server, prompt=prompt, add_special_tokens=True)
        entries = pair[0]["prompt_logprobs"]
        assert pair[1]["prompt_logprobs"] == entries
        _check_prompt_logprobs(entries, ids, 3)
        echo = pair[0]["logprobs"]
        for i, token_id in enumerate(ids[1:], start=1):
            assert entries[i][str(token_id)]["logprob"] == echo["token_logprobs"][i]
            assert entries[i][str(token_id)]["decoded_token"] == echo["tokens"][i]
            assert len(echo["top_logprobs"][i]) <= 2  # the chosen and logprobs=1 more
    plain = httpx.post(f"{server.v1}/completions", headers=auth, timeout=60, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 1})
    assert "prompt_logprobs" not in plain.json()["choices"][0]  # only where asked for


@pytest.mark.parametrize(("fields", "width", "echo_width"), [
    ({"echo": True, "logprobs": 4, "prompt_logprobs": 1}, 1, 4),  # each its own width
    ({"echo": True, "logprobs": 2}, 2, 2),  # vLLM's default: the echo's width
    ({"max_tokens": 0, "prompt_logprobs": 2}, 2, None),  # scoring the prompt alone
])
def test_prompt_logprobs_widths(server: Server, auth: dict[str, str], fields: dict,
                                width: int, echo_width: int | None) -> None:
    r = httpx.post(f"{server.v1}/completions", headers=auth, timeout=60, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    _check_prompt_logprobs(choice["prompt_logprobs"],
                           _tokens(server, prompt=PROMPT, add_special_tokens=True), width)
    if echo_width is None:
        assert choice["text"] == "" and choice["logprobs"] is None
    else:
        tops = choice["logprobs"]["top_logprobs"][1:]
        assert max(map(len, tops)) == echo_width + 1  # the chosen and its alternatives


def test_prompt_logprobs_on_chat(server: Server, auth: dict[str, str]) -> None:
    """Chat's at the top, of its one prompt; token texts are the tokenizer's, also with
    return_tokens_as_token_ids (as vLLM's)."""
    r = httpx.post(f"{server.v1}/chat/completions", headers=auth, timeout=60, json={
        "model": "tiny", "messages": USER, "max_tokens": 1, "prompt_logprobs": 2,
        "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = _tokens(server, messages=USER)
    assert body["usage"]["prompt_tokens"] == len(ids)
    _check_prompt_logprobs(body["prompt_logprobs"], ids, 2)
    assert not any(v["decoded_token"].startswith("token_id:")
                   for position in body["prompt_logprobs"][1:] for v in position.values())
    zero = httpx.post(f"{server.v1}/chat/completions", headers=auth, timeout=60, json={
        "model": "tiny", "messages": USER, "max_tokens": 1, "prompt_logprobs": 0})
    assert all(len(position) == 1 for position in zero.json()["prompt_logprobs"][1:])
    streamed = httpx.post(f"{server.v1}/chat/completions", headers=auth, timeout=60, json={
        "model": "tiny", "messages": USER, "max_tokens": 1, "prompt_logprobs": 1,
        "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", [PROMPT, "<|user|>" + PROMPT, "aé😀b " + PROMPT])
def test_text_offsets_point_into_the_text(sdk: OpenAI, stream: bool, prompt: str) -> None:
    """OpenAI's text_offset: where each token starts in the text returned. The echoed
    prompt's BOS is not in that text, so it takes no room (it took 3 characters); a special
    token the prompt's text spells out is (the echo is the text as sent). A token holding
    part of a character (byte fallback: é is two, 😀 four) starts where the character does,
    and the character counts once."""
    r = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=8, echo=True,
                               logprobs=0, stream=stream, **GREEDY)
    choices = [c.choices[0] for c in r] if stream else [r.choices[0]]
    text = "".join(c.text for c in choices)
    tokens = [t for c in choices for t in c.logprobs.tokens]
    offsets = [o for c in choices for o in c.logprobs.text_offset]
    assert tokens[0] == "<s>" and offsets[:2] == [0, 0]
    checked = 0
    for token, offset in zip(tokens[1:], offsets[1:], strict=True):
        if token == "\ufffd":  # a piece of a character (or the end's unfinished one)
            assert not text[offset:offset + 1].isascii(), (token, offset, text)
        else:
            assert text[offset:offset + len(token)] == token, (token, offset, text)
        checked += 1
    assert checked > 4  # the prompt's tokens at least
    if prompt.startswith("a"):
        assert tokens[1:9] == ["a", *["\ufffd"] * 6, "b"]
        assert offsets[1:9] == [0, 1, 1, 2, 2, 2, 2, 3]


def test_stop_string_truncates_output(sdk: OpenAI) -> None:
    full = greedy_text(sdk, PROMPT, 24)
    # a stop string taken from the second half of the greedy output, ASCII so no byte games
    start = next(i for i in range(len(full) // 2, len(full) - 1)
                 if full[i:i + 2].isascii() and full[i:i + 2].strip() == full[i:i + 2])
    stop = full[start:start + 2]
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop  # vLLM's extra field
    assert stop not in choice.text
    assert choice.text == full[:full.index(stop)]


def test_stop_reason_names_the_stop_token_id(sdk: OpenAI) -> None:
    """vLLM's `stop_reason`: the stop_token_ids id that ended a choice; null at the length.
    A logit bias makes token 42 the greedy choice at every step."""
    forced = {"logit_bias": {"42": 100}, **GREEDY}
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, **forced)
    assert r.choices[0].finish_reason == "length" and r.choices[0].stop_reason is None
    stop = {"extra_body": {"ignore_eos": True, "stop_token_ids": [42], "min_tokens": 2}}
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, **{**forced, **stop})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == 42
    assert r.usage.completion_tokens == 3  # 42 is banned for the first min_tokens, as in vLLM


@pytest.mark.parametrize("stream", [False, True])
def test_chat_stop_string(sdk: OpenAI, stream: bool) -> None:
    full = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=24,
                                       **GREEDY).choices[0].message.content
    start = next(i for i in range(len(full) // 2, len(full) - 1)
                 if full[i:i + 2].isascii() and full[i:i + 2].strip() == full[i:i + 2])
    stop = full[start:start + 2]
    r = sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=24, stop=stop,
                                    stream=stream, **GREEDY)
    if stream:
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        last = chunks[-1].choices[0]
        assert all(c.choices[0].stop_reason is None for c in chunks[:-1])
    else:
        text, last = r.choices[0].message.content, r.choices[0]
    assert last.finish_reason == "stop" and text == full[:full.index(stop)]
    assert last.stop_reason == stop


def test_seed_reproducible(sdk: OpenAI) -> None:
    def sample(seed: int) -> str:
        return sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                      temperature=1.0, seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)  # 16 tokens from a near-flat 1024-way distribution


def test_chat_seed_reproducible(sdk: OpenAI) -> None:
    def sample(seed: int) -> str:
        return sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=16,
                                           temperature=1.0, seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_greedy_reproducible(sdk: OpenAI) -> None:
    assert greedy_text(sdk, PROMPT) == greedy_text(sdk, PROMPT)


def test_prompt_list_is_prompt_major(sdk: OpenAI) -> None:
    """2 prompts x n=2: choices 0, 1 belong to the first prompt and 2, 3 to the second."""
    prompts = ["Once upon a time", "def main():"]
    r = sdk.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=8, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    first, second = greedy_text(sdk, prompts[0], 8), greedy_text(sdk, prompts[1], 8)
    assert first != second
    assert [c.text for c in r.choices] == [first, first, second, second]
    assert r.usage.completion_tokens == 32


def test_token_id_prompt(sdk: OpenAI, server: Server) -> None:
    ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    r = sdk.completions.create(model="tiny", prompt=ids, max_tokens=8, **GREEDY)
    assert r.choices[0].text == greedy_text(sdk, PROMPT, 8)
    assert r.usage.prompt_tokens == len(ids)
    batch = sdk.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=8, **GREEDY)
    assert [c.text for c in batch.choices] == [greedy_text(sdk, ids, 8),
                                              greedy_text(sdk, ids[:3], 8)]


def test_models_list(sdk: OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["tiny"]
    assert sdk.models.retrieve("tiny").id == "tiny"


# --- typed exceptions --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1},
    {"max_tokens": 600},
    {"top_p": 0},
    {"n": 5},
    {"extra_body": {"suffix": "x"}},
], ids=["temperature", "max_tokens", "top_p", "n", "suffix"])
def test_bad_request_error(sdk: OpenAI, kwargs: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="tiny", prompt=PROMPT, **{"max_tokens": 4, **kwargs})
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"


def test_chat_bad_request_error(sdk: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=USER, max_tokens=600)
    assert "512" in info.value.message


def test_authentication_error(server: Server) -> None:
    with OpenAI(base_url=server.v1, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_not_found_error(sdk: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="nope", messages=USER, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nope")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_allowed_token_ids_are_all_that_comes(sdk: OpenAI, server: Server,
                                             temperature: float) -> None:
    """vLLM's allowed_token_ids: every generated token is one of them (ids seen through the
    logprobs' token texts); eos is not among them, so the output runs to max_tokens."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = httpx.post(f"{server.base_url}/tokenize", headers=headers,
                     json={"prompt": " the cat sat", "add_special_tokens": False}).json()["tokens"]
    texts = {httpx.post(f"{server.base_url}/detokenize", headers=headers,
                        json={"tokens": [i]}).json()["prompt"] for i in ids}
    r = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, logprobs=0,
                               temperature=temperature, seed=3,
                               extra_body={"allowed_token_ids": ids})
    choice = r.choices[0]
    assert set(choice.logprobs.tokens) <= texts and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 12 and choice.text == "".join(choice.logprobs.tokens)
