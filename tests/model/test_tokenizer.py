"""Tokenizer == transformers' AutoTokenizer (ids, text, chat prompts); streamed text == full
decode, whole characters only, stop strings cut exactly. Both tokenizer styles of model/demo.py."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transformers

from model import tokenizer as tokenizer_module
from model.encoding import LONG_TEXT_CHARS
from model.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
)

# Ids fixed by model/demo.py's trainer, which adds the special tokens first, in this order.
UNK, BOS, EOS, SYSTEM, USER, ASSISTANT = range(6)  # <unk> <s> </s> <|system|> <|user|> ...

TEXTS = [
    "Hello, world!",
    "héllo 你好 🦙",
    "  leading and  multiple   spaces ",
    "line one\nline two\n\n\tindented\r\n",
    "def f(x):\n    return x  # ünïcødé ✓\n",
    "🦙🦙 a🦙b 你好你好 ",
    "",
]
MESSAGES = [
    [{"role": "user", "content": "héllo 你好 🦙"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "  two spaces\nand a newline"},
     {"role": "assistant", "content": "Sure ✓"},
     {"role": "user", "content": "again"}],
]
# Exercises what transformers' environment adds: namespace, loop controls, dict(), tojson with
# indent and non-ASCII, tools=None, extra variables, {% generation %}, None-valued keys dropped
# and reasoning copied to `thinking` / `reasoning_content`.
RICH_TEMPLATE = """\
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if loop.index > 4 %}{% break %}{% endif %}
    {% if m.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ ns.n }}:{{ m.role }}]{% if 'content' in m %}{{ m.content }}{% else %}(none){% endif %}
    {% if m.thinking is defined %}
<think>{{ m.thinking }}|{{ m.reasoning_content }}</think>
    {% endif %}
{% endfor %}
{{ messages | tojson }}
{{ messages[0] | tojson(indent=2) }}
{{ dict(a=1, b='ü') | tojson }} tools={{ tools is none }} {{ bos_token }}{{ eos_token }}\
{{ pad_token }} {{ greeting }}
{% if add_generation_prompt %}
    {% generation %}<|assistant|>
{% endgeneration %}
{% endif %}"""
RICH_MESSAGES = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "héllo 你好 🦙", "name": None},
    {"role": "assistant", "content": None, "reasoning": "hmm"},
    {"role": "user", "content": "4th"},
    {"role": "user", "content": "5th, after the break"},
]


@pytest.fixture(scope="module", params=["tokenizer_dir", "sp_tokenizer_dir"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def hf(folder: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(folder)


def copy_folder(src: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = (),
                edit_json: Callable[[dict], None] | None = None) -> Path:
    """A copy of a tokenizer folder with tokenizer_config.json / tokenizer.json edited."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config or {})
    for key in drop:
        cfg.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if edit_json is not None:
        data = json.loads((dst / "tokenizer.json").read_text())
        edit_json(data)
        (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def hf_chat_ids(hf: transformers.PreTrainedTokenizerBase, messages: list[dict], **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)  # 5.x: BatchEncoding


def assert_same_as_transformers(tok: Tokenizer, hf: transformers.PreTrainedTokenizerBase,
                                texts: list[str]) -> None:
    assert tok.vocab_size == len(hf)
    assert tok.bos_id == hf.bos_token_id
    for text in texts:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            assert tok.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), (text, special, skip)


# --- encode / decode -----------------------------------------------------------------------

def test_special_token_ids(tok: Tokenizer) -> None:
    assert tok.bos_id == BOS
    assert tok.eos_ids == {EOS}
    assert tok.special_ids == {UNK, BOS, EOS, SYSTEM, USER, ASSISTANT}
    assert tok.encode("hi")[0] == BOS  # added by tokenizer.json's post-processor
    assert BOS not in tok.encode("hi", add_special_tokens=False)
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:2] == [BOS, USER]  # the template's {{ bos_token }}: exactly one BOS
    assert ids.count(BOS) == 1 and EOS in ids and ASSISTANT in ids  # "</s>\n<|assistant|>\n"
    assert tok.id_to_token(BOS) == "<s>" and tok.token_texts([EOS]) == ["</s>"]


def test_encode_decode_round_trip_and_match_transformers(tok: Tokenizer, hf) -> None:
    for text in TEXTS:
        # Except a leading space in SentencePiece style: Metaspace adds no "▁" before one and
        # the decoder strips one (Llama 2 does the same; transformers agrees, below).
        if not (text.startswith(" ") and tok.decode(tok.encode(" x")) == "x"):
            assert tok.decode(tok.encode(text)) == text, text
    assert_same_as_transformers(tok, hf, TEXTS)


def test_a_long_text_encodes_as_a_short_one_would(tok: Tokenizer, hf) -> None:
    """Past LONG_TEXT_CHARS the text goes through encode_batch (the GIL released): the same
    ids as transformers', with and without the special tokens."""
    text = " ".join(TEXTS) * (LONG_TEXT_CHARS // len(" ".join(TEXTS)) + 2)
    assert len(text) > LONG_TEXT_CHARS
    backend, batched = tok._backend, []

    class Spy:  # the backend, recording which texts go through encode_batch
        def __getattr__(self, name: str) -> Any:
            return getattr(backend, name)

        def encode_batch(self, texts: list[str], **kw: Any) -> Any:
            batched.extend(texts)
            return backend.encode_batch(texts, **kw)

    tok._backend = Spy()
    try:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf(
                text, add_special_tokens=special)["input_ids"]
        tok.encode("short")
    finally:
        tok._backend = backend
    assert batched == [text, text]  # the long text both times, the short one not


def set_post_processor_none(data: dict) -> None:
    data["post_processor"] = None


def unmark_eos_special(data: dict) -> None:
    for token in data["added_tokens"]:
        if token["content"] == "</s>":
            token["special"] = False


@pytest.mark.parametrize(("name", "config", "edit_json"), [
    # transformers 5 pops add_bos_token / add_eos_token when tokenizer.json exists, for
    # LlamaTokenizerFast too (4.x honoured them there): tokenizer.json's post-processor decides.
    ("llama-class-add-eos", {"tokenizer_class": "LlamaTokenizerFast", "add_eos_token": True}, None),
    ("add-bos-false", {"add_bos_token": False}, None),
    ("no-post-processor", {}, set_post_processor_none),  # then nothing is added
    ("pad-not-in-vocab", {"pad_token": "<pad>"}, None),  # added as a new special token
    ("eos-not-special-in-json", {}, unmark_eos_special),  # named tokens become special
    # extra special tokens missing from the vocabulary are added (transformers 4's and 5's names)
    ("extra-special-tokens", {"additional_special_tokens": ["<|im_start|>", "<|user|>"],
                              "extra_special_tokens": {"image_token": "<img>"}}, None),
])
def test_config_variants_match_transformers(folder: Path, tmp_path: Path, name: str,
                                            config: dict, edit_json) -> None:
    variant = copy_folder(folder, tmp_path / name, config, edit_json=edit_json)
    texts = [*TEXTS, "a <pad> b </s> c <|user|>", "<|im_start|>x <img>y"]
    assert_same_as_transformers(Tokenizer.from_dir(variant),
                                transformers.AutoTokenizer.from_pretrained(variant), texts)


def as_hf_converted_llama_2(data: dict) -> None:
    """tokenizer.json as transformers' converter wrote Llama 2's (Llama-2-chat-hf, TinyLlama,
    Mistral v0.1): "▁" prepended and spaces replaced by a normalizer, no pre-tokenizer."""
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    data["pre_tokenizer"] = None


@pytest.mark.parametrize("config", [
    {"tokenizer_class": "LlamaTokenizer", "legacy": False},  # Llama-2-chat-hf's
    {"tokenizer_class": "LlamaTokenizerFast"},  # legacy left out: false
    {"tokenizer_class": "LlamaTokenizer", "legacy": True},
    {"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False},
    # (its infill tokens are in Code Llama's vocabulary, not in this one's)
    {"tokenizer_class": "CodeLlamaTokenizer", **dict.fromkeys(
        ("prefix_token", "middle_token", "suffix_token", "eot_token", "fill_token"))},
    {"tokenizer_class": "PreTrainedTokenizerFast"},  # taken as written
], ids=["legacy-false", "legacy-absent", "legacy-true", "no-prefix-space", "code-llama",
        "as-written"])
def test_llama_2_tokenizers_are_rebuilt_as_transformers_5_does(
        sp_tokenizer_dir: Path, tmp_path: Path, config: dict) -> None:
    """transformers 5's LlamaTokenizer takes a SentencePiece-converted tokenizer.json's
    vocabulary and merges but not its normalizer: after a special token there is no "▁" (with
    legacy false), so Llama 2's chat prompts ("<s>[INST] ...") encode to other ids than the
    file's normalizer gives."""
    variant = copy_folder(sp_tokenizer_dir, tmp_path / "v", config,
                          edit_json=as_hf_converted_llama_2)
    tok, hf = Tokenizer.from_dir(variant), transformers.AutoTokenizer.from_pretrained(variant)
    texts = [*TEXTS, "<s>[INST] hi [/INST]", "a</s>b", " leading", "<|user|>\n hi"]
    assert_same_as_transformers(tok, hf, texts)
    for messages in MESSAGES:
        assert tok.encode_chat(messages) == hf_chat_ids(hf, messages, add_generation_prompt=True)


def test_ids_outside_vocabulary(tok: Tokenizer) -> None:
    """decode drops them (a model's padded embedding rows); id_to_token names them."""
    for bad in (tok.vocab_size, -1, 10**12):
        assert tok.decode([BOS, 45, bad], skip_special_tokens=False) == tok.decode(
            [BOS, 45], skip_special_tokens=False)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.id_to_token(bad)
    assert tok.token_texts([tok.vocab_size + 3]) == [""]  # a model's padded embedding rows


def test_token_texts_keep_spaces_and_mark_partial_bytes(tok: Tokenizer) -> None:
    for text in ["Hello world  foo\nbar", "a sentence, with    spaces\tand tabs"]:
        ids = tok.encode(text, add_special_tokens=False)
        texts = tok.token_texts(ids)
        full = tok.decode(ids)
        # Each token's text is its text in context: joined, they rebuild the full decode
        # (SentencePiece's first token keeps the space a full decode strips).
        assert "".join(texts[1:]) == full[len(tok.decode(ids[:1])):]
        assert texts[0].strip() == tok.decode(ids[:1]).strip()
    # "你" is three byte tokens in both tokenizers: each alone is an incomplete character.
    pieces = [t for t in tok.token_texts(tok.encode("你", add_special_tokens=False)) if t.strip()]
    assert pieces == ["\ufffd"] * 3


def test_token_bytes_rebuild_the_text(tok: Tokenizer) -> None:
    """OpenAI's logprob `bytes`: a byte token's raw byte, not the replacement character's
    three; joined, a text's tokens give it back (with SentencePiece's leading space)."""
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(tok.token_bytes(ids)).decode("utf-8")
        assert joined in (text, " " + text), (text, joined)
    ni = [b for b in tok.token_bytes(tok.encode("你", add_special_tokens=False)) if b.strip()]
    assert ni == [bytes([0xE4]), bytes([0xBD]), bytes([0xA0])]
    assert tok.token_bytes([BOS, EOS, 10**9]) == [b"<s>", b"</s>", b""]


# --- chat template -------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf, add_generation_prompt) -> None:
    for messages in MESSAGES:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(messages, add_generation_prompt=add_generation_prompt) == (
            hf_chat_ids(hf, messages, add_generation_prompt=add_generation_prompt))


@pytest.mark.parametrize("answer", ["Sure, the", "  padded answer \n", "Sure ✓", "s", "<", "",
                                    "  "])
def test_continue_final_message_matches_transformers(tok: Tokenizer, hf, answer: str) -> None:
    """The prompt ends inside the assistant's prefilled answer, its end-of-turn cut off, as
    transformers cuts it (a trimmed template keeps no trailing whitespace)."""
    messages = [*MESSAGES[1][:2], {"role": "assistant", "content": answer}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False,
                                   continue_final_message=True)
    assert text.rstrip().endswith(answer.strip())  # (an empty answer: the turn's header)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                          continue_final_message=True)
    assert tok.encode_chat(messages, add_generation_prompt=False,
                           continue_final_message=True) == hf_chat_ids(
        hf, messages, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tok.apply_chat_template(messages, add_generation_prompt=True,
                                continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="text to continue"):
        tok.apply_chat_template([*messages[:2], {"role": "assistant", "content": None}],
                                add_generation_prompt=False, continue_final_message=True)


TEMPLATES = Path(__file__).with_name("templates")  # real models' chat templates


@pytest.mark.parametrize("name", ["llama-2-chat", "llama-3.1-instruct"])
def test_real_llama_templates_match_transformers(folder: Path, hf, name: str) -> None:
    """Meta's chat templates (tokenizer_config.json of Llama-2-7b-chat-hf and
    Llama-3.1-8B-Instruct) render as transformers renders them: system prompts, turns, the
    generation prompt, a continued answer, a template variable (3.1's date_string)."""
    template = (TEMPLATES / f"{name}.jinja").read_text()
    tok = Tokenizer.from_dir(folder, chat_template=template)
    answer = [*MESSAGES[1][:3]]  # system, user, assistant: continue the assistant's answer
    cases = [(MESSAGES[0], {"add_generation_prompt": True}),
             (MESSAGES[1], {"add_generation_prompt": True}),
             (MESSAGES[1], {"add_generation_prompt": False}),
             (answer, {"add_generation_prompt": False, "continue_final_message": True})]
    if name == "llama-3.1-instruct":
        cases.append((MESSAGES[1], {"add_generation_prompt": True,
                                    "date_string": "26 Nov 2026"}))
    for messages, kwargs in cases:
        text = tok.apply_chat_template(messages, **kwargs)
        assert text == hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              **kwargs), (name, kwargs)
        assert tok.encode_chat(messages, **kwargs) == hf_chat_ids(
            hf, messages, chat_template=template, **kwargs)
    if name == "llama-2-chat":  # its own check: roles must alternate
        with pytest.raises(ChatTemplateError, match="must alternate"):
            tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    else:
        assert "Today Date: 26 Nov 2026" in tok.apply_chat_template(
            MESSAGES[1], variables={"date_string": "26 Nov 2026"})


def test_tool_call_history_reaches_the_template(folder: Path, hf) -> None:
    """An assistant turn's tool_calls (arguments as OpenAI sends them, JSON text) and the tool
    result's turn (Llama 3.1's `ipython` role), through the request's messages, render as
    transformers renders them with the arguments parsed (as vLLM hands them over)."""
    from server.protocol import ChatMessage

    template = (TEMPLATES / "llama-3.1-instruct.jinja").read_text()
    tok = Tokenizer.from_dir(folder, chat_template=template)
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": '{"a": 1}'}}
    sent = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "ipython", "content": "out", "tool_call_id": "c1"}]
    messages = [ChatMessage.model_validate(m).template_dict() for m in sent]
    parsed = [*sent[:1], {**sent[1], "content": "", "tool_calls": [
        {**call, "function": {"name": "f", "arguments": {"a": 1}}}]}, sent[2]]
    text = tok.apply_chat_template(messages)
    assert '{"name": "f", "parameters": {"a": 1}}' in text
    assert text == hf.apply_chat_template(parsed, chat_template=template, tokenize=False,
                                          add_generation_prompt=True)


def test_rich_template_matches_transformers(folder: Path, hf) -> None:
    tok = Tokenizer.from_dir(folder, chat_template=RICH_TEMPLATE)
    text = tok.apply_chat_template(RICH_MESSAGES, greeting="hi ü")
    assert "[3:user]4th" in text and "[4:" not in text  # the loop broke after 4 messages
    assert text == hf.apply_chat_template(RICH_MESSAGES, chat_template=RICH_TEMPLATE,
                                          tokenize=False, add_generation_prompt=True,
                                          greeting="hi ü")
    assert tok.encode_chat(RICH_MESSAGES, greeting="hi ü") == hf_chat_ids(
        hf, RICH_MESSAGES, chat_template=RICH_TEMPLATE, add_generation_prompt=True,
        greeting="hi ü")


def test_template_list_and_jinja_file_forms_match_transformers(folder: Path, tmp_path) -> None:
    listed = copy_folder(folder, tmp_path / "listed", {"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}]})
    filed = copy_folder(folder, tmp_path / "filed")
    (filed / "chat_template.jinja").write_text("FILE {{ messages[0].content }}")
    messages = [{"role": "user", "content": "hi"}]
    for path, expected in [(listed, "DEFAULT hi"), (filed, "FILE hi")]:
        text = Tokenizer.from_dir(path).apply_chat_template(messages)
        hf = transformers.AutoTokenizer.from_pretrained(path)
        assert text == expected == hf.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)


def test_raise_exception_becomes_chat_template_error(folder: Path) -> None:
    tok = Tokenizer.from_dir(folder, chat_template=(
        "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}"
        "{% endif %}ok"))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="must start with user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'x'}) }}",  # immutable sandbox: no mutation of inputs
    "{% set ns = namespace(_x=1) %}",
    "{{ messages[0].content + 1 }}",  # a plain Python error in the template
])
def test_sandbox_and_template_errors_raise_chat_template_error(folder: Path, template) -> None:
    tok = Tokenizer.from_dir(folder, chat_template=template)
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_empty_or_broken_template_is_a_clear_error(folder: Path, tmp_path) -> None:
    bare = Tokenizer.from_dir(copy_folder(folder, tmp_path / "bare", drop=("chat_template",)))
    with pytest.raises(ChatTemplateError, match="--chat-template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="empty"):
        Tokenizer.from_dir(folder).apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_dir(folder, chat_template="{% for m in messages %}")


def test_eos_ids_include_generation_config_list(tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = copy_folder(tokenizer_dir, tmp_path / "eos")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [USER, SYSTEM]}))
    assert Tokenizer.from_dir(folder).eos_ids == {EOS, USER, SYSTEM}  # list + config's </s>
    (folder / "generation_config.json").unlink()
    assert Tokenizer.from_dir(folder).eos_ids == {EOS}


# --- incremental detokenizer ---------------------------------------------------------------

def stream(tok: Tokenizer, prompt: list[int], out: list[int], chunks: random.Random | None = None,
           **kw) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `out` one id at a time (or in random chunk sizes); the deltas, flush's included."""
    det = IncrementalDetokenizer(tok, prompt, **kw)
    deltas, i = [], 0
    while i < len(out):
        n = chunks.randint(1, 4) if chunks else 1
        deltas.append(det.add(out[i:i + n]))
        i += n
    deltas.append(det.flush())
    return deltas, det


def expected_stream(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool = True) -> str:
    full = tok.decode(prompt + out, skip_special_tokens=skip)
    head = tok.decode(prompt, skip_special_tokens=skip)
    assert full.startswith(head)
    return full[len(head):]


def test_stream_equals_full_decode(tok: Tokenizer) -> None:
    prompts = [[], tok.encode(""), tok.encode("Say something:"), tok.encode("héllo 你"),
               tok.encode_chat([{"role": "user", "content": "hi 🦙"}])]
    rng = random.Random(0)
    for prompt in prompts:
        for text in [*TEXTS, "".join(TEXTS) * 3]:  # the long one outgrows the id window
            out = tok.encode(text, add_special_tokens=False)
            expected = expected_stream(tok, prompt, out)
            for chunks in (None, rng):
                deltas, det = stream(tok, prompt, out, chunks)
                assert "".join(deltas) == det.text == expected, (prompt, text)
                assert not any("\ufffd" in d for d in deltas)
    out = tok.encode(TEXTS[1], add_special_tokens=False)
    assert "".join(stream(tok, [], out)[0]) == tok.decode(out)


def test_stream_from_every_split_point(tok: Tokenizer) -> None:
    """Prompt/output boundaries anywhere, even a few tokens after the start of a multi-byte
    character: the prompt context must not begin inside one (SentencePiece's byte fallback
    then turned every following byte into U+FFFD)."""
    ids = tok.encode("héllo 你好 🦙 wörld  x\n ✓✓ 好🦙🦙🦙 你好你好你好")
    for k in range(len(ids)):
        prompt, out = ids[:k], ids[k:]
        if tok.decode(prompt).endswith("\ufffd"):  # a prompt ending inside a character
            continue
        deltas, _ = stream(tok, prompt, out)
        assert "".join(deltas) == expected_stream(tok, prompt, out), k
        assert not any("\ufffd" in d for d in deltas), k


def test_stream_keeps_special_tokens_when_asked(tok: Tokenizer) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "hi"}])
    out = [*tok.encode("ok 你好", add_special_tokens=False), EOS, USER,
           *tok.encode(" more", add_special_tokens=False)]
    deltas, _ = stream(tok, prompt, out, skip_special_tokens=False)
    assert "".join(deltas) == expected_stream(tok, prompt, out, skip=False)
    assert "</s><|user|>" in "".join(deltas)
    deltas, _ = stream(tok, prompt, out)
    assert "".join(deltas) == expected_stream(tok, prompt, out)


def test_output_ending_inside_a_character_comes_out_at_flush(tok: Tokenizer) -> None:
    prompt = tok.encode("Say:")
    # The last byte is missing. (Not after another multi-byte character: SentencePiece's byte
    # fallback then turns the whole run of bytes into U+FFFDs, even the complete character
    # already streamed; a full decode of a truncated output is not prefix-stable there.)
    out = tok.encode(" ok 你", add_special_tokens=False)[:-1]
    det = IncrementalDetokenizer(tok, prompt)
    streamed = "".join(det.add([i]) for i in out)
    assert "\ufffd" not in streamed
    rest = det.flush()
    assert rest.endswith("\ufffd")  # as a full decode shows it
    assert streamed + rest == det.text == expected_stream(tok, prompt, out)


def test_ids_past_the_vocabulary_stream_as_nothing(tok: Tokenizer) -> None:
    det = IncrementalDetokenizer(tok, tok.encode("x"))
    assert det.add([tok.vocab_size, tok.vocab_size + 7]) == ""
    out = tok.encode(" fine", add_special_tokens=False)
    assert det.add(out) + det.flush() == tok.decode(tok.encode("x") + out)[1:]


def python_path(det: IncrementalDetokenizer) -> IncrementalDetokenizer:
    det._stream = None  # what it runs where tokenizers has no DecodeStream
    return det


@pytest.mark.skipif(tokenizer_module._decode_stream([], True) is None,
                    reason="this tokenizers has no DecodeStream with a context")
def test_decode_stream_runs_each_step_and_equals_the_python_path(tok: Tokenizer) -> None:
    """Random ids (byte tokens cut characters anywhere), both tokenizer styles, specials kept
    or skipped: the Rust stream and the Python decodes give the same deltas; and the stream
    path decodes nothing in Python between the constructor and flush while it runs (random
    byte tokens make SentencePiece's byte fallback not prefix-stable: the stream then raises
    and the request goes on in Python). A prompt ending inside a character streams in Python."""
    rng = random.Random(1)
    streamed = answered = 0  # detokenizers that started on the stream; its answered steps
    for trial in range(80):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 12))]
        out = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        skip = trial % 3 != 0
        fast = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        slow = python_path(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip))
        cut = tok.decode(prompt, skip_special_tokens=skip).endswith("\ufffd")
        assert (fast._stream is None) == cut, prompt
        streamed += not cut
        decode = fast._decode

        def in_python(start: int, end: int | None = None, fast=fast, decode=decode) -> str:
            assert fast._stream is None, "a Python decode while the stream runs"
            return decode(start, end)

        fast._decode = in_python  # type: ignore[method-assign]
        deltas = []
        for i in out:
            deltas.append(fast.add([i]))
            answered += bool(deltas[-1]) and fast._stream is not None
        fast._decode = decode  # type: ignore[method-assign]  # flush decodes in Python
        assert deltas == [slow.add([i]) for i in out], (prompt, out)
        assert fast.flush() == slow.flush()
    assert streamed >= 40 and answered >= 400  # (a stream failing at once would pass above)


def test_decode_stream_error_goes_on_in_python(tok: Tokenizer) -> None:
    """tokenizers' DecodeStream raises on a decoder that is not prefix-stable (vLLM's issue
    17448): that request goes on in Python, with no text lost or repeated; other errors
    propagate."""
    class Failing:
        def __init__(self, message: str, after: int) -> None:
            self.message, self.after = message, after

        def step(self, backend: Any, token_id: int) -> str | None:
            if self.after == 0:
                raise Exception(self.message)  # noqa: TRY002 - what tokenizers raises
            self.after -= 1
            return backend.decode([token_id])  # a stand-in: the text is the Python path's

    prompt = tok.encode("Say:")
    out = tok.encode(" héllo 你好 🦙 there", add_special_tokens=False)
    for after in (0, 1, 3):
        det = IncrementalDetokenizer(tok, prompt)
        det._stream = Failing("Invalid prefix encountered", after)
        deltas = [det.add([i]) for i in out[:after]]  # the stand-in's texts
        deltas += [det.add([i]) for i in out[after:]] + [det.flush()]
        assert det._stream is None
        expected = python_path(IncrementalDetokenizer(tok, prompt))
        tail = [expected.add([i]) for i in out][after:] + [expected.flush()]
        assert deltas[after:] == tail
    det = IncrementalDetokenizer(tok, prompt)
    det._stream = Failing("something else", 0)
    with pytest.raises(Exception, match="something else"):
        det.add(out[:1])


STOP_TEXT = "alpha beta gamma delta, 你好 🦙 epsilon"


def test_stop_string_spanning_tokens_cuts_the_output(tok: Tokenizer) -> None:
    prompt = tok.encode("Say:")
    out = tok.encode(STOP_TEXT, add_special_tokens=False)
    full = expected_stream(tok, prompt, out)
    stop = "ta gam"
    assert not any(stop in t for t in tok.token_texts(out))  # the stop spans tokens
    for include, end in [(False, full.index(stop)), (True, full.index(stop) + len(stop))]:
        det = IncrementalDetokenizer(tok, prompt, stop=(stop,), include_stop_str_in_output=include)
        deltas = [det.add([i]) for i in out]
        assert "".join(deltas) == det.text == full[:end]
        assert det.stopped_by == stop
        assert det.add(out[:3]) == "" and det.flush() == "" and det.text == full[:end]


def test_no_stop_string_ends_within_min_tokens(tok: Tokenizer) -> None:
    """As in vLLM: a stop string must end in text of an id past min_tokens. A short stop seen
    in the first ids must not be found later either (a longer stop string beside it keeps
    that text in the search window)."""
    out = tok.encode(STOP_TEXT, add_special_tokens=False)
    full = expected_stream(tok, [], out)
    ends = [len(expected_stream(tok, [], out[:k])) for k in range(len(out) + 1)]
    short = full[ends[1] - 1]  # the last character of the first id's text
    for min_tokens in range(4):
        det = IncrementalDetokenizer(tok, [], stop=(short, "\x00" * 12), min_tokens=min_tokens)
        text = "".join(det.add([i]) for i in out) + det.flush()
        # The first occurrence that ends in the text of an id past min_tokens.
        first = next((j for j in range(len(full)) if full.startswith(short, j)
                      and j + len(short) > ends[min_tokens]), None)
        assert text == (full if first is None else full[:first])


def test_stop_strings_hold_back_text_until_flush(tok: Tokenizer) -> None:
    out = tok.encode(STOP_TEXT, add_special_tokens=False)
    full = tok.decode(out)
    stop = "gamma!"  # "gamma" appears, the stop string never does
    det = IncrementalDetokenizer(tok, [], stop=(stop, "xy"))
    plain_det = IncrementalDetokenizer(tok, [])
    seen = plain = ""
    for i in out:
        seen += det.add([i])
        plain += plain_det.add([i])
        # All but the last len(stop) - 1 characters decoded so far, never more.
        assert seen == plain[:max(len(plain) - (len(stop) - 1), 0)]
    assert det.text == full[:len(full) - (len(stop) - 1)]
    assert det.flush() == full[len(full) - (len(stop) - 1):]
    assert det.text == full and det.stopped_by is None
    # With the stop string included in the output, nothing needs holding back.
    det = IncrementalDetokenizer(tok, [], stop=(stop,), include_stop_str_in_output=True)
    assert "".join(det.add([i]) for i in out) == full


def test_stop_strings_random(tok: Tokenizer) -> None:
    out = tok.encode(STOP_TEXT, add_special_tokens=False)
    full = tok.decode(out)
    rng = random.Random(1)
    for _ in range(60):
        start = rng.randrange(len(full))
        stop = full[start:start + rng.randint(1, 8)]
        include = rng.random() < 0.5
        end = full.index(stop) + (len(stop) if include else 0)
        deltas, det = stream(tok, [], out, rng, stop=(stop, "not there"),
                             include_stop_str_in_output=include)
        assert "".join(deltas) == det.text == full[:end], (stop, include)
        assert det.stopped_by == stop


@pytest.mark.parametrize(("stops", "stopped_by", "kept"), [
    (("gamma delta", "beta"), "beta", "alpha "),  # ends first
    (("a gamma", "gam"), "gam", "alpha beta "),  # ends first, though it starts later
    (("ta", "beta"), "beta", "alpha "),  # same end: the longest
    (("alpha",), "alpha", ""),
])
def test_first_ending_stop_string_wins(tok: Tokenizer, stops, stopped_by, kept) -> None:
    out = tok.encode(STOP_TEXT, add_special_tokens=False)
    for chunks in (None, random.Random(2)):
        deltas, det = stream(tok, [], out, chunks, stop=stops)
        assert (det.stopped_by, "".join(deltas)) == (stopped_by, kept)
