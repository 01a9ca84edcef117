"""Tokenizer and streaming detokenizer for a Hugging Face tokenizer folder. No torch.

`Tokenizer` reads tokenizer.json with the `tokenizers` library (or Meta's tokenizer.model,
converted by tokenizer_model.py), plus tokenizer_config.json,
chat_template.jinja and generation_config.json; its ids, decoded text and rendered chat prompts
equal transformers 5's `AutoTokenizer` for the same folder (templates render in
chat_template.py). `IncrementalDetokenizer` turns one
request's output ids into text deltas: never half a UTF-8 character, stop strings cut exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the Python path alone
    DecodeStream = None

from model import tokenizer_model
from model.chat_template import ChatTemplateError, compile_template, render
from model.encoding import encode_ids
from model.infill import CODE_LLAMA_TOKENS, Infill

logger = logging.getLogger(__name__)

# transformers' named special tokens: each one present is a chat-template variable.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
NO_TEMPLATE = "the model has no chat template; pass --chat-template"


class Tokenizer:
    """Text <-> ids, the chat template, and the special ids the engine stops on.

    Differences from transformers, on purpose: `decode` never cleans up tokenization spaces
    (transformers 5 skips that for BPE too) and raises ValueError on ids outside the vocabulary.
    add_bos_token / add_eos_token in tokenizer_config.json are ignored, as transformers 5 does
    whenever tokenizer.json exists (it pops them): tokenizer.json's post-processor decides.
    """

    def __init__(self, backend: _Backend, special_tokens: dict[str, str],
                 eos_ids: frozenset[int], chat_template: str | None,
                 infill: Infill | None = None) -> None:
        self._backend = backend
        self.infill = infill  # fill-in-the-middle prompts, where the model has the tokens
        self.special_tokens = special_tokens  # named special tokens present: {"bos_token": "<s>"}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        bos = special_tokens.get("bos_token")
        self.bos_id: int | None = backend.token_to_id(bos) if bos else None
        self.eos_ids = eos_ids  # generation_config.json's and the tokenizer's eos
        eos = special_tokens.get("eos_token")
        self.eos_id: int | None = backend.token_to_id(eos) if eos else None  # the tokenizer's
        # What decode(skip_special_tokens=True) drops: the added tokens marked special.
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items()
                                     if t.special)
        self.chat_template = chat_template
        self._template = compile_template(chat_template) if chat_template else None
        # Per-token texts are decoded after this anchor so that SentencePiece's leading-space
        # strip (which only applies at the start of a text) does not eat the token's space.
        self._anchor = backend.encode("a", add_special_tokens=False).ids
        self._anchor_text = backend.decode(self._anchor, skip_special_tokens=False)
        # The decoder's JSON alone (its pickled state): the whole tokenizer's holds the vocab
        decoder = backend.decoder
        self._decoders = _decoder_types(json.loads(decoder.__getstate__()) if decoder else None)
        self._added = frozenset(backend.get_added_tokens_decoder())
        self._bytes: dict[int, bytes] = {}  # token_bytes' answers: a token's bytes never change

    @classmethod
    def for_model(cls, model_folder: Path, tokenizer_folder: str | Path | None = None,
                  chat_template: str | None = None) -> Tokenizer:
        """The model's tokenizer, or one from a folder of its own (--tokenizer; the model's
        generation_config.json's eos ids count too)."""
        if tokenizer_folder is None:
            return cls.from_dir(model_folder, chat_template)
        return cls.from_dir(Path(tokenizer_folder), chat_template, model_folder=model_folder)

    @classmethod
    def from_dir(cls, folder: Path, chat_template: str | None = None,
                 model_folder: Path | None = None) -> Tokenizer:
        """Load `folder`; `chat_template` (the template text) replaces the model's own;
        `model_folder`: the model's, where the tokenizer's is another (its
        generation_config.json's eos ids count, as its own)."""
        folder = Path(folder)
        backend, config, eos_tokens = _load(folder)
        _rebuild_as_transformers_does(backend, config)
        infill = Infill.find_tokens(backend, config)  # (before the config's tokens are added)
        named = {k: c for k in NAMED_TOKENS if (c := _content(config.get(k))) is not None}
        if "added_tokens_decoder" not in config:  # legacy folders, as transformers reads them
            legacy = _read_json(folder / "special_tokens_map.json")
            named |= {k: c for k in NAMED_TOKENS if (c := _content(legacy.get(k))) is not None}
        _add_config_tokens(backend, config.get("added_tokens_decoder", {}), named,
                           _extra_special_tokens(config))

        eos_ids: set[int] = set()
        for where in {folder, Path(model_folder or folder)}:
            eos = _read_json(where / "generation_config.json").get("eos_token_id")
            eos_ids |= {eos} if isinstance(eos, int) else set(eos or ())
        for token in [named.get("eos_token"), *eos_tokens]:
            if token is not None:
                eos_ids.add(backend.token_to_id(token))

        if chat_template is None:
            jinja_file = folder / "chat_template.jinja"  # takes priority, as in transformers
            chat_template = (jinja_file.read_text(encoding="utf-8") if jinja_file.is_file()
                             else config.get("chat_template"))
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]: the default one
            named_templates = {t["name"]: t["template"] for t in chat_template}
            chat_template = named_templates.get("default")
            if chat_template is None:
                logger.warning("no 'default' among the chat templates %s; pass --chat-template",
                               sorted(named_templates))
        return cls(backend, named, frozenset(eos_ids), chat_template,
                   None if infill is None else Infill.of(backend, infill))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with special tokens as tokenizer.json's post-processor adds them (BOS).
        A long text is encoded without holding the GIL (model/encoding.py)."""
        return encode_ids(self._backend, text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the tokenizer's vocabulary give no text: models pad their
        embedding past it (a model may even sample such an id), and a full decode must agree
        with the incremental one."""
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return self._backend.decode(known, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry itself, e.g. "Ġhello", "▁hello", "<0xE4>" or "<s>"."""
        token = self._backend.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return token

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (an added token's content, e.g. "<think>"); None
        where there is none."""
        return self._backend.token_to_id(token)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text on its own, as logprobs show it (special tokens included).

        Leading spaces are kept (" hello" for "▁hello"). A token holding only part of a UTF-8
        character gives "\\ufffd", as in vLLM. Ids outside the vocabulary (a model's padded
        embedding rows) give "".
        """
        known = [i for i in ids if 0 <= i < self.vocab_size]
        anchored = self._backend.decode_batch([[*self._anchor, i] for i in known],
                                              skip_special_tokens=False)
        texts = {}
        for i, text in zip(known, anchored, strict=True):
            if self._anchor_text and text.startswith(self._anchor_text):
                texts[i] = text[len(self._anchor_text):]
            else:
                texts[i] = self._backend.decode([i], skip_special_tokens=False)
        return [texts.get(i, "") for i in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each id's own bytes, as OpenAI's chat logprobs give them: for a token holding part
        of a UTF-8 character (byte fallback's <0xE4>, a byte-level piece) the raw byte(s),
        where its text can only be "\ufffd"; joined, a sequence's bytes are its text. Leading
        spaces as in `token_texts`."""
        missing = [i for i in dict.fromkeys(ids) if i not in self._bytes]
        for token_id, raw in zip(missing, self._token_bytes(missing), strict=True):
            self._bytes[token_id] = raw
        return [self._bytes[i] for i in ids]

    def _token_bytes(self, ids: list[int]) -> list[bytes]:
        texts = None
        out = []
        for i, token_id in enumerate(ids):
            token = (self._backend.id_to_token(token_id)
                     if 0 <= token_id < self.vocab_size else None)
            if token is None:
                out.append(b"")
            elif token_id in self._added:  # added tokens are their content, as decode has them
                out.append(token.encode("utf-8"))
            elif "ByteLevel" in self._decoders:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in token)
                           if all(c in _BYTE_OF_CHAR for c in token) else token.encode())
            elif "ByteFallback" in self._decoders and _BYTE_TOKEN.fullmatch(token):
                out.append(bytes([int(token[3:5], 16)]))
            elif "Replace" in self._decoders or "Metaspace" in self._decoders:
                out.append(token.replace("\u2581", " ").encode("utf-8"))
            else:  # a decoder we do not model: its text, as the token's logprob shows it
                texts = texts or self.token_texts(ids)
                out.append(texts[i].encode("utf-8"))
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            variables: Mapping[str, Any] | None = None,
                            template: str | None = None, **extra: Any) -> str:
        """The prompt text, rendered as transformers' apply_chat_template(tokenize=False);
        `variables` and `extra` are more template variables (a client's chat_template_kwargs
        come as `variables`, a dict, so that no key of theirs can be taken for an argument);
        `template`, a template's text, replaces the model's for this call."""
        compiled = _compiled(template) if template is not None else self._template
        if compiled is None:
            raise ChatTemplateError(NO_TEMPLATE)
        return render(compiled, messages, self.special_tokens, add_generation_prompt,
                      {**(variables or {}), **extra}, continue_final_message)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, add_special_tokens: bool = False,
                    variables: Mapping[str, Any] | None = None, template: str | None = None,
                    **extra: Any) -> list[int]:
        """Prompt ids: the rendered template encoded, by default without adding special tokens
        (the template writes its own BOS), as apply_chat_template(tokenize=True) does."""
        text = self.apply_chat_template(messages, add_generation_prompt, continue_final_message,
                                        variables, template, **extra)
        return self.encode(text, add_special_tokens=add_special_tokens)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """A request's own template, compiled once for the requests that send it again."""
    return compile_template(template)


# GPT-2's byte-level alphabet (tokenizers' ByteLevel): every byte is a printable character
# in tokens; the inverse gives a token's raw bytes.
_BYTE_OF_CHAR = {c: b for b, c in tokenizer_model.byte_to_unicode().items()}


def _load(folder: Path) -> tuple[_Backend, dict, list[str]]:
    """tokenizer.json and tokenizer_config.json, or a tokenizer.model converted where the
    folder has no tokenizer.json; and the tokens beyond the config's eos_token that end
    generation. Meta's layout (no tokenizer_config.json) takes the family's defaults: the
    config transformers' conversion writes, its chat format, Meta's stop tokens; a Hugging
    Face folder's tokenizer_config.json decides for itself, as transformers reads it."""
    path = folder / "tokenizer.json"
    config = _read_json(folder / "tokenizer_config.json")
    if path.is_file():
        return _Backend.from_file(str(path)), config, []
    meta = tokenizer_model.find(folder)
    if meta is None:
        raise ValueError(f"{folder} has no tokenizer: llama-serve reads tokenizer.json, or "
                         f"Meta's tokenizer.model (pass --tokenizer FOLDER for one elsewhere)")
    converted = tokenizer_model.convert(meta)
    logger.info("converted %s to a fast tokenizer", meta)
    if not config:
        return converted.backend, converted.config, converted.eos_tokens
    defaults = {k: v for k, v in converted.config.items() if k != "chat_template"}
    return converted.backend, defaults | config, []


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback


# Tokenizer classes whose transformers 5 __init__ rebuilds a SentencePiece-converted
# tokenizer.json's pre- and post-text handling instead of taking it as written (the Llama 2
# family's files hold a Prepend + Replace normalizer, which differs after special tokens)
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
CODE_LLAMA_CLASSES = ("CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def _rebuild_as_transformers_does(backend: _Backend, config: Mapping[str, Any]) -> None:
    """What transformers 5's LlamaTokenizer / CodeLlamaTokenizer do to a SentencePiece-style
    (byte-fallback BPE) tokenizer.json: no normalizer, a Metaspace pre-tokenizer that puts "▁"
    before the first piece of text only (`legacy: false`, their default; every piece with
    `legacy: true`; none without `add_prefix_space`), and a decoder that strips that space.
    So "<s>[INST]" gives "[" after "<s>" where the file's normalizer gave "▁[", and ids equal
    transformers 5's (and vLLM's on it)."""
    from tokenizers import decoders, pre_tokenizers

    cls = config.get("tokenizer_class")
    if cls not in LLAMA_CLASSES + CODE_LLAMA_CLASSES or not getattr(backend.model,
                                                                   "byte_fallback", False):
        return
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    legacy = cls in LLAMA_CLASSES and bool(config.get("legacy", False))
    scheme = ("always" if legacy else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix or cls in CODE_LLAMA_CLASSES:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)


def _decoder_types(decoder: dict | None) -> frozenset[str]:
    """The decoder's types, a Sequence's members included."""
    if not decoder:
        return frozenset()
    members = decoder.get("decoders") or []
    return frozenset({decoder.get("type", ""), *(d.get("type", "") for d in members)})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(value: Any) -> str | None:
    """A special token written as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _extra_special_tokens(config: Mapping[str, Any]) -> list[str]:
    """tokenizer_config.json's additional_special_tokens (extra_special_tokens in transformers
    5): a list of tokens, or of their AddedToken dicts, or names -> tokens; and for Code
    Llama's class its infilling tokens, which transformers 5 adds whether listed or not (the
    fill marker, in no vocabulary, gets an id of its own)."""
    out = []
    for key in ("extra_special_tokens", "additional_special_tokens"):  # transformers 5 order
        listed = config.get(key) or []
        for value in listed.values() if isinstance(listed, dict) else listed:
            if (content := _content(value)) is not None:
                out.append(content)
    if config.get("tokenizer_class") in CODE_LLAMA_CLASSES:
        out += [name for key, default in CODE_LLAMA_TOKENS.items()
                if isinstance(name := config.get(key, default), str)]
    return out


def _add_config_tokens(backend: _Backend, decoder: dict, named: dict[str, str],
                       extra: Sequence[str] = ()) -> None:
    """Add what transformers adds on load: config tokens missing from tokenizer.json, and
    every named and extra special token as a special added token (a new id where it is not
    in the vocabulary; a vocabulary entry is then matched whole, and skipped in decode)."""
    present = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
    specs = {d["content"]: d for _, d in sorted(decoder.items(), key=lambda kv: int(kv[0]))}
    new = [AddedToken(c, **{k: d[k] for k in fields if k in d})
           for c, d in specs.items() if c not in present]
    backend.add_tokens(new)
    for content in dict.fromkeys([*named.values(), *extra]):
        if not (content in present and present[content].special):
            spec = {k: specs[content][k] for k in fields[:3] if k in specs.get(content, {})}
            backend.add_special_tokens([AddedToken(content, **spec, normalized=False,
                                                   special=True)])


# --- streaming ---------------------------------------------------------------------------

PROMPT_CONTEXT = 5  # prompt tokens decoded as context before the first output token (vLLM)
MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens
_TRIM_AT = 64  # drop decoded ids from the window once this many are behind it
# What tokenizers' DecodeStream raises when a longer decode does not start with the shorter
# one's text (a decoder that is not prefix-stable: vLLM's issue 17448).
_INVALID_PREFIX = "Invalid prefix encountered"


def _decode_stream(context: list[int], skip_special_tokens: bool) -> Any:
    """tokenizers' DecodeStream primed with `context`, or None where this version of the
    library has none that takes a context (before 0.22)."""
    if DecodeStream is None:
        return None
    try:
        return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
    except TypeError:
        return None


class IncrementalDetokenizer:
    """One request's output ids -> text deltas; whole characters only; stop strings cut.

    Algorithm (vLLM's detokenize_incrementally): keep the visible ids (specials dropped when
    skipped) with two offsets. ids[prefix:read] is text already emitted, kept as context so
    SentencePiece spaces and byte merges come out as in a full decode; each new id, decode
    ids[prefix:] and emit what goes past ids[prefix:read]'s text, unless the text ends in
    U+FFFD (a character still incomplete): then wait for more ids. Each step decodes a few
    tokens, whatever the output length. The concatenated deltas equal
    decode(prompt + output)[len(decode(prompt)):] for valid UTF-8 output.

    Where tokenizers has it (0.22 and later), tokenizers' DecodeStream runs the same two
    decodes of each step in Rust, primed with the same context (a whole output of the engine
    2.92 against 3.84 us, the bench model's tokenizer); the offsets here follow it. A decoder
    that is not prefix-stable makes it raise; that request then goes on in Python, as before.

    Stop strings are matched on the output text, across tokens. While streaming, the last
    max(len(stop)) - 1 characters are held back (none with include_stop_str_in_output, where a
    prefix of the stop string is output anyway) so that no prefix of a stop string goes out.
    When several stop strings match, the one that ends first wins (as if text arrived a
    character at a time, so the result does not depend on how ids are chunked). As in vLLM,
    no stop string can end in the text of the first `min_tokens` ids.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: tuple[str, ...] = (),
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self._tokenizer = tokenizer
        self._min_tokens = min_tokens
        self._n_added = 0  # output ids so far, specials included
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        # Stop strings are searched for in the last `window` characters + the new text.
        self._window = max(map(len, self._stop)) - 1 if self._stop else 0
        self._hold = 0 if include_stop_str_in_output else self._window
        self.stopped_by: str | None = None
        self._finished = False
        self._held = ""  # decoded, not yet emitted (stop-string hold-back)
        self._recent = ""  # the last `window` characters decoded (held text is its suffix)
        self._pieces: list[str] = []  # emitted text

        context = [i for i in prompt_ids if self._visible(i)][-PROMPT_CONTEXT - MAX_CHAR_TOKENS:]
        self._ids = context
        self._read = len(context)
        self._prefix = max(self._read - PROMPT_CONTEXT, 0)
        # Start the context on a whole character: cut inside one, SentencePiece's byte fallback
        # turns the whole run of byte tokens into U+FFFDs, whatever follows.
        while self._prefix > 0 and self._decode(self._prefix, self._read).startswith("\ufffd"):
            self._prefix -= 1
        self._prefix_text: str | None = None  # decode of ids[prefix:read], cached
        # A prompt ending inside a character primes DecodeStream otherwise (it streams the
        # context's text again): Python then.
        self._stream = (None if self._prefix_context().endswith("\ufffd")
                        else _decode_stream(context[self._prefix:], skip_special_tokens))

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output ids; return the new text ("" while a character or stop is pending)."""
        if self.stopped_by is not None or self._finished:
            return ""
        out = []
        for i in token_ids:
            self._n_added += 1
            new = ""
            if self._visible(i):
                self._ids.append(i)
                new = self._next_text()
            out.append(self._release(new, final=False))
            if self.stopped_by is not None:
                break
        return "".join(out)

    def flush(self) -> str:
        """End of output for another reason: return what was pending or held back."""
        if self.stopped_by is not None or self._finished:
            return ""
        self._finished = True
        rest = ""
        if self._read < len(self._ids):  # an incomplete character: output it as decoded
            rest = self._decode(self._prefix)[len(self._prefix_context()):]
        return self._release(rest, final=True)

    def _visible(self, token_id: int) -> bool:
        # Ids past the vocabulary (padded embedding rows) decode to nothing, as in tokenizers.
        return 0 <= token_id < self._tokenizer.vocab_size and not (
            self._skip_special and token_id in self._tokenizer.special_ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer._backend.decode(self._ids[start:end],
                                               skip_special_tokens=self._skip_special)

    def _prefix_context(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix, self._read)
        return self._prefix_text

    def _next_text(self) -> str:
        """The text the newest id completes: decode(ids[prefix:]) past decode(ids[prefix:read]),
        "" while it is no longer or ends in an incomplete character."""
        if self._stream is not None:
            try:
                piece = self._stream.step(self._tokenizer._backend, self._ids[-1])
            except Exception as e:  # tokenizers raises a plain Exception
                if _INVALID_PREFIX not in str(e):
                    raise
                self._stream = None  # this request goes on in Python, which slices anyway
            else:
                if piece is None:
                    return ""
                self._advance()
                return piece
        prefix_text = self._prefix_context()
        text = self._decode(self._prefix)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._advance()
        return text[len(prefix_text):]

    def _advance(self) -> None:
        """Text came out up to the newest id: it becomes the context of the next."""
        self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
        if self._prefix >= _TRIM_AT:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def _release(self, new: str, final: bool) -> str:
        """Emit `new` after the held-back text, cut at a stop string (none within the first
        min_tokens ids), keeping the hold-back."""
        if not self._stop:  # nothing to search or hold back
            if new:
                self._pieces.append(new)
            return new
        text = self._held + new
        search = self._n_added > self._min_tokens
        # Only a stop string that ends in `new` counts: it starts at most len(stop) - 1
        # characters before it, in `recent`. (One ending earlier was either found by an earlier
        # call or lies in the min_tokens text, which may not stop the output.)
        hit = _first_stop(self._recent, new, self._stop) if new and search else None
        if hit is not None:
            start, self.stopped_by = hit
            start -= len(self._recent) - len(self._held)  # into `text`; < 0: already emitted
            text = text[:start + len(self.stopped_by) if self._include_stop else start]
            self._held = ""
        else:
            cut = len(text) if final else max(len(text) - self._hold, 0)
            text, self._held = text[:cut], text[cut:]
            recent = self._recent + new
            self._recent = recent[-self._window:] if self._window else ""
        if text:
            self._pieces.append(text)
        return text


def _first_stop(recent: str, new: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start in recent + new, stop) of the occurrence ending in `new` that ends first; on a
    tie, the longest."""
    text, best = recent + new, None
    for stop in stops:
        i = text.find(stop, max(len(recent) - len(stop) + 1, 0))
        if i >= 0 and (best is None or (i + len(stop), i) < (best[0] + len(best[1]), best[0])):
            best = (i, stop)
    return best
