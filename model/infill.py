"""Fill-in-the-middle prompts: Code Llama's infilling format. No torch.

A model trained for infilling reads `<PRE> prefix <SUF>suffix <MID>` and writes the middle,
ending it with `<EOT>`. The layout is Meta's (codellama's `infilling_prompt_tokens`):

    [BOS, PRE] + encode(prefix) + [SUF] + encode_infilling(suffix) + [MID]

`encode(prefix)` has SentencePiece's dummy prefix, one "▁" before the text whatever it starts
with; `encode_infilling(suffix)` has none, as the Code Llama paper trained it ("we suppress the
implicit leading space that SentencePiece tokenizers add upon encoding the middle part and the
suffix"). transformers 4's CodeLlamaTokenizerFast laid it out so; transformers 5's prepends
"▁" to a suffix that does not start with a space, which is not what the model saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as _Backend

from model.encoding import encode_ids

# transformers' CodeLlamaTokenizer defaults, in the order it adds them as special tokens;
# tokenizer_config.json may name others (or null: none)
CODE_LLAMA_TOKENS = {"prefix_token": "▁<PRE>", "middle_token": "▁<MID>",
                     "suffix_token": "▁<SUF>", "eot_token": "▁<EOT>", "fill_token": "<FILL_ME>"}
_METASPACE = "Metaspace"


class InfillError(ValueError):
    """A fill-in-the-middle request this tokenizer cannot lay out."""


@dataclass(frozen=True)
class InfillTokens:
    prefix_id: int
    suffix_id: int
    middle_id: int
    eot_id: int | None  # ends the middle (None: the model's eos alone)
    fill_token: str | None  # transformers' marker: "prefix<FILL_ME>suffix" in one text


class Infill:
    """Prefix + suffix -> prompt ids in the infilling layout (module docstring)."""

    def __init__(self, backend: _Backend, tokens: InfillTokens, head: list[int]) -> None:
        self._backend = backend  # the tokenizer without any implicit leading "▁"
        self.tokens = tokens
        self._head = head  # what the tokenizer puts before a text (BOS)

    @staticmethod
    def find_tokens(backend: _Backend, config: Mapping[str, Any]) -> InfillTokens | None:
        """The infilling tokens tokenizer.json holds, or None where it has no PRE, SUF and
        MID (Code Llama's, or those tokenizer_config.json names). Asked before transformers'
        loading adds Code Llama's names as tokens of their own: a Code Llama that was not
        trained to infill (34B, Python) has none in its vocabulary."""
        names = {key: _content(config.get(key, default))
                 for key, default in CODE_LLAMA_TOKENS.items()}
        ids = {key: backend.token_to_id(name) if isinstance(name, str) else None
               for key, name in names.items()}
        if None in (ids["prefix_token"], ids["suffix_token"], ids["middle_token"]):
            return None
        fill = names["fill_token"]
        return InfillTokens(ids["prefix_token"], ids["suffix_token"], ids["middle_token"],
                            ids["eot_token"], fill if isinstance(fill, str) and fill else None)

    @classmethod
    def of(cls, backend: _Backend, tokens: InfillTokens) -> Infill:
        """The infilling of a loaded tokenizer (its added tokens in), `tokens` found first."""
        head = backend.encode("", add_special_tokens=True).ids
        return cls(_without_implicit_space(backend), tokens, head)

    def encode(self, prefix: str, suffix: str, add_special_tokens: bool = True,
               max_ids: int | None = None) -> list[int]:
        """The prompt's ids: the middle comes after them. With `max_ids`, the prefix's first
        tokens are dropped to fit (the text far from the middle: an editor's file above the
        cursor); InfillError where the rest alone is longer."""
        t = self.tokens
        head = self._head if add_special_tokens else []
        pre, suf = self.encode_prefix(prefix), self.encode_suffix(suffix)
        fixed = len(head) + 3 + len(suf)
        if max_ids is not None and fixed + len(pre) > max_ids:
            if fixed > max_ids:
                raise InfillError(f"the suffix and the infilling tokens take {fixed} tokens, "
                                  f"more than the {max_ids} the prompt may keep")
            pre = pre[len(pre) - (max_ids - fixed):]
        return [*head, t.prefix_id, *pre, t.suffix_id, *suf, t.middle_id]

    def encode_prefix(self, text: str) -> list[int]:
        """SentencePiece's encode: one "▁" before the text, whatever it starts with (none
        for no text: a gap at the start of a file)."""
        return encode_ids(self._backend, " " + text, False) if text else []

    def encode_suffix(self, text: str) -> list[int]:
        """Meta's encode_infilling: the text's own tokens, no "▁" put before it."""
        return encode_ids(self._backend, text, False)

    def split(self, text: str) -> tuple[str, str] | None:
        """transformers' fill marker: "prefix<FILL_ME>suffix" -> (prefix, suffix); None
        where the text has no marker."""
        fill = self.tokens.fill_token
        if fill is None or fill not in text:
            return None
        parts = text.split(fill)
        if len(parts) != 2:
            raise InfillError(f"the prompt holds {fill} {len(parts) - 1} times: mark the one "
                              "place to fill")
        return parts[0], parts[1]


def _content(value: Any) -> Any:
    """A token written as "▁<PRE>" or as {"content": "▁<PRE>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _without_implicit_space(backend: _Backend) -> _Backend:
    """A copy of `backend` that puts no "▁" before a text: no Prepend normalizer (the
    converted Llama 2 files'), a Metaspace that never prepends (transformers 5's rebuild)."""
    data = json.loads(backend.to_str())
    data["normalizer"] = _drop_prepend(data.get("normalizer"))
    data["pre_tokenizer"] = _never_prepend(data.get("pre_tokenizer"))
    return _Backend.from_str(json.dumps(data))


def _drop_prepend(normalizer: dict | None) -> dict | None:
    if not normalizer or normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        kept = [n for n in normalizer.get("normalizers", []) if n.get("type") != "Prepend"]
        return {**normalizer, "normalizers": kept} if kept else None
    return normalizer


def _never_prepend(pre: dict | None) -> dict | None:
    if not pre:
        return pre
    if pre.get("type") == _METASPACE:
        # (older files say add_prefix_space, which prepend_scheme replaced)
        return {**{k: v for k, v in pre.items() if k != "add_prefix_space"},
                "prepend_scheme": "never"}
    if pre.get("type") == "Sequence":
        return {**pre, "pretokenizers": [_never_prepend(p) for p in pre["pretokenizers"]]}
    return pre
