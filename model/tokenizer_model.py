"""Meta's `tokenizer.model` -> a `tokenizers` Tokenizer, as transformers converts it. No torch.

Meta's own downloads (and the `original/` folder of the Hugging Face repos) carry no
tokenizer.json: Llama 1 and 2 (and Code Llama) ship a SentencePiece BPE model, a protobuf;
Llama 3 ships tiktoken's ranks, one "base64-token rank" line each, with its 256 special tokens
named in Meta's code rather than the file. Both convert to the fast tokenizer of Meta's own
Hugging Face files: as transformers' converters build it (`TikTokenConverter` and the Llama 3
names of convert_llama_weights_to_hf.py; transformers 4's `LlamaConverter`, which ranked
SentencePiece merges by score, as SentencePiece does), with neither sentencepiece, protobuf
nor tiktoken installed: the protobuf is read here, field by field.

`convert` returns the backend and the tokenizer_config.json transformers would write beside it,
so `model.tokenizer.Tokenizer` goes on as for any Hugging Face folder.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

FILE_NAME = "tokenizer.model"

# Llama 3's split pattern (Meta's tokenizer.py, and HF's tokenizer.json for Llama 3)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
LLAMA3_RANKS = 128000
# Llama 3.1's names (the published 3.1-3.3 tokenizers'), on the same ids as 3.0's: 3.0 names
# 128004, 128008, 128010 and everything from 128005 on reserved tokens (numbered otherwise),
# none of which a 3.0 model's chat format uses.
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# What Meta's generator stops on (llama-models' Tokenizer.stop_tokens), base and instruct alike
LLAMA3_STOP = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# The chat formats of Meta's reference code (a Meta folder holds no template): Llama 2's
# [INST] turns (the template of Meta's HF chat repos) and Llama 3's header turns (the one
# transformers' converter writes for an instruct model).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")


class TokenizerModelError(ValueError):
    """A tokenizer.model this converter cannot read."""


@dataclass
class Converted:
    backend: _Backend
    config: dict[str, Any]  # the tokenizer_config.json transformers would write
    eos_tokens: list[str] = field(default_factory=list)  # beyond config's eos_token


def find(folder: Path) -> Path | None:
    """The folder's tokenizer.model, or for a Llama 2 download (params.json here, the
    tokenizer one level up, beside the model folders) its parent's."""
    for where in (folder, folder.parent if (folder / "params.json").is_file() else None):
        if where is not None and (where / FILE_NAME).is_file():
            return where / FILE_NAME
    return None


def convert(path: Path) -> Converted:
    """tokenizer.model (either kind) -> the backend and its config."""
    data = path.read_bytes()
    if data.startswith(b"version https://git-lfs"):
        raise TokenizerModelError(f"{path} is a Git LFS pointer, not the file: fetch it "
                                  "(git lfs pull)")
    ranks = _tiktoken_ranks(data)
    if ranks is None:
        return _from_sentencepiece(data, path)
    if len(ranks) != LLAMA3_RANKS:
        logger.warning("%s: %d tiktoken ranks where Llama 3 has %d; read with Llama 3's split "
                       "pattern and special tokens", path, len(ranks), LLAMA3_RANKS)
    return _from_tiktoken(ranks)


# --- Llama 3: tiktoken ranks ---------------------------------------------------------------

def _tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """tiktoken's "base64 rank" lines, or None where the file is not one (a protobuf)."""
    try:
        lines = data.decode("ascii").splitlines()
        ranks = {}
        for line in lines:
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        return None
    return ranks or None


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def _from_tiktoken(ranks: dict[bytes, int]) -> Converted:
    """transformers' TikTokenConverter: the vocabulary is the ranks; a token's merges are its
    splits into two tokens, ordered by its rank (ignore_merges: a whole word in the vocabulary
    is one token, as tiktoken looks it up first)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerModelError("tokenizer.model: tiktoken ranks are not 0..n-1")
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    backend = _Backend(BPE(vocab, [(_byte_level(a), _byte_level(b)) for _, a, b in merges],
                           fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>"
                               for i in range(3, 3 + LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED))]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    bos = specials[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, len(ranks))]),
    ])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE}
    return Converted(backend, config, list(LLAMA3_STOP))


# --- Llama 1/2, Code Llama: SentencePiece BPE ---------------------------------------------

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
BPE_TYPE = 2  # TrainerSpec.model_type


@dataclass
class _Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class _SentencePieceModel:
    pieces: list[_Piece]
    trainer: dict[int, Any]  # TrainerSpec's fields by number (those read below)
    normalizer: dict[int, Any]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise TokenizerModelError("tokenizer.model: truncated protobuf")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int | bytes | float]]:
    """A protobuf message's (field number, value) pairs, in order: varints as ints, 32-bit
    fields as floats (SentencePiece's only ones are scores), length-delimited as bytes."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            if pos + 4 > len(data):
                raise TokenizerModelError("tokenizer.model: truncated protobuf")
            value, pos = struct.unpack("<f", data[pos:pos + 4])[0], pos + 4
        else:
            raise TokenizerModelError(f"tokenizer.model: protobuf wire type {wire} unknown")
        if pos > len(data):
            raise TokenizerModelError("tokenizer.model: truncated protobuf")
        out.append((number, value))
    return out


def _read_sentencepiece(data: bytes) -> _SentencePieceModel:
    """ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _fields(data):
        if number == 1 and isinstance(value, bytes):
            piece = _Piece("")
            for n, v in _fields(value):
                if n == 1 and isinstance(v, bytes):
                    try:
                        piece.piece = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise TokenizerModelError("tokenizer.model: a piece is not UTF-8"
                                                  ) from None
                elif n == 2:
                    piece.score = float(v)  # type: ignore[arg-type]
                elif n == 3:
                    piece.type = int(v)  # type: ignore[arg-type]
            pieces.append(piece)
        elif number == 2 and isinstance(value, bytes):
            trainer = dict(_fields(value))
        elif number == 3 and isinstance(value, bytes):
            normalizer = dict(_fields(value))
    if not pieces:
        raise TokenizerModelError("tokenizer.model is neither tiktoken ranks nor a "
                                  "SentencePiece model with pieces")
    return _SentencePieceModel(pieces, trainer, normalizer)


def _merges(pieces: list[_Piece]) -> list[tuple[str, str]]:
    """Each piece's splits into two pieces, ranked as SentencePiece's BPE merges: the merged
    piece's score, highest first (ties: its id). transformers 4's LlamaConverter ranked them
    so (Meta's HF tokenizer.json files hold that order); ranking by id alone, as transformers
    5's conversion does, is not the same for Llama 2: its whitespace runs ("▁▁", "▁▁▁▁")
    have low ids but the lowest scores, and merging them first splits indented code
    otherwise than SentencePiece, and the model, did."""
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    merges = []
    for piece_id, p in enumerate(pieces):
        splits = [(p.piece[:i], p.piece[i:]) for i in range(1, len(p.piece))
                  if p.piece[:i] in vocab and p.piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(-p.score, piece_id, left, right) for left, right in splits]
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]


def _from_sentencepiece(data: bytes, path: Path) -> Converted:
    """transformers' LlamaTokenizer on a tokenizer.model: a byte-fallback BPE over every piece
    (merges ranked by score), control and user-defined pieces as added tokens (control ones
    special), "▁" for spaces and one before the text, BOS prepended."""
    model = _read_sentencepiece(data)
    if model.trainer.get(3, 1) != BPE_TYPE:  # proto default: UNIGRAM
        raise TokenizerModelError(f"{path}: a SentencePiece Unigram model; llama-serve reads "
                                  "Llama's BPE ones (or a tokenizer.json)")
    name = model.normalizer.get(1, b"")
    charsmap = model.normalizer.get(2, b"")
    squeeze = model.normalizer.get(4, 1)  # remove_extra_whitespaces, proto default true
    escape = model.normalizer.get(5, 1)  # escape_whitespaces (spaces as "▁"), default true
    suffix = model.trainer.get(24, 0)  # treat_whitespace_as_suffix
    if (name and name != b"identity") or charsmap or squeeze or not escape or suffix:
        raise TokenizerModelError(f"{path}: a SentencePiece normalizer other than Llama's "
                                  "identity one; convert it to tokenizer.json with transformers")
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    unk_id = model.trainer.get(40, 0)
    if not 0 <= unk_id < len(model.pieces):
        raise TokenizerModelError(f"{path}: unk_id {unk_id} is not a piece")
    backend = _Backend(BPE(vocab, _merges(model.pieces), unk_token=model.pieces[unk_id].piece,
                           fuse_unk=True, byte_fallback=bool(model.trainer.get(35, 0))))
    prefix = bool(model.normalizer.get(3, 1))  # add_dummy_prefix
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    backend.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == CONTROL)
                        for p in model.pieces if p.type in (CONTROL, USER_DEFINED)])

    def piece(field_number: int, default: int) -> str | None:
        i = model.trainer.get(field_number, default)
        # proto int32 -1 (none) arrives as a 64-bit two's-complement varint
        return model.pieces[i].piece if 0 <= i < len(model.pieces) else None

    bos, eos = piece(41, 1), piece(42, 2)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab[bos])])
    infill = all(t in vocab for t in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    config: dict[str, Any] = {
        "tokenizer_class": "CodeLlamaTokenizer" if infill else "LlamaTokenizer",
        "unk_token": model.pieces[unk_id].piece, "legacy": False, "add_prefix_space": prefix,
        "chat_template": LLAMA2_CHAT_TEMPLATE}
    config |= {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    return Converted(backend, config)
