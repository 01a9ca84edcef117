"""Fill-in-the-middle prompts (model/infill.py): Code Llama's layout as Meta's reference code
builds it, checked with transformers' tokenizer through Meta's own trick for text without
SentencePiece's implicit space."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from model.infill import InfillError
from model.tokenizer import Tokenizer
from tests.conftest import INFILL_TOKENS
from tests.model.test_tokenizer import TEXTS, assert_same_as_transformers

PRE, SUF, MID, EOT = range(1000, 1004)  # INFILL_TOKENS' ids in the Code Llama-style vocabulary
CASES = [
    ("def add(a, b):\n    ", "\n    return c\n"),
    ("x = ", " + 1"),  # a suffix with a space first: transformers 5 lays it out the same
    (" leading", "trailing "),
    ("", ""),
    ("", "def f(): pass"),  # a gap at the start of a file: no "▁" for the empty prefix
    ("naïve café ", "你好"),  # byte-fallback pieces on both sides
    ("a\n\n", "\n\nb"),
]


def hf_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    """A fresh one: transformers 5's CodeLlamaTokenizer changes its own normalizer once it
    has laid out an infill, so that plain texts encode otherwise afterwards."""
    return transformers.AutoTokenizer.from_pretrained(folder)


def sentencepiece_encode(hf: transformers.PreTrainedTokenizerBase, text: str) -> list[int]:
    """SentencePiece's ids of `text` with no "▁" put before it, as Meta's encode_infilling
    gets them: encode "☺" + text and drop the marker's own tokens (its one leading "▁" and
    its byte-fallback pieces, which merge with nothing)."""
    marker = hf.encode("☺", add_special_tokens=False)
    marked = hf.encode("☺" + text, add_special_tokens=False)
    assert marked[:len(marker)] == marker
    return marked[len(marker):]


def meta_layout(hf: transformers.PreTrainedTokenizerBase, prefix: str, suffix: str) -> list[int]:
    """codellama's infilling_prompt_tokens: [BOS, PRE] + encode(prefix) (the dummy "▁" always
    before it, whatever it starts with; SentencePiece encodes no text as nothing) + [SUF] +
    encode_infilling(suffix) + [MID]."""
    prefix_ids = sentencepiece_encode(hf, " " + prefix) if prefix else []
    return [hf.bos_token_id, PRE, *prefix_ids, SUF, *sentencepiece_encode(hf, suffix), MID]


@pytest.fixture(scope="module")
def tok(code_llama_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(code_llama_tokenizer_dir)


def test_layout_is_metas(tok: Tokenizer, code_llama_tokenizer_dir: Path) -> None:
    assert tok.infill is not None
    hf = hf_tokenizer(code_llama_tokenizer_dir)
    assert [hf.convert_tokens_to_ids(t) for t in INFILL_TOKENS] == [PRE, SUF, MID, EOT]
    assert tok.infill.tokens.eot_id == EOT
    for prefix, suffix in CASES:
        ids = tok.infill.encode(prefix, suffix)
        assert ids == meta_layout(hf, prefix, suffix), (prefix, suffix)
        assert tok.infill.encode(prefix, suffix, add_special_tokens=False) == ids[1:]
    # the suffix's own tokens: no "▁" before "\n" (transformers 5 puts one there)
    assert tok.infill.encode_suffix("\nx")[0] == tok.encode("\n", add_special_tokens=False)[-1]


def test_prefix_and_spaced_suffix_as_transformers_lays_them_out(
        tok: Tokenizer, code_llama_tokenizer_dir: Path) -> None:
    """Where transformers 5 is right (a prefix of some text; a suffix that starts with a
    space), its ids are ours. (An empty prefix gets a lone "▁" from it, nothing from Meta's.)"""
    assert tok.infill is not None
    for prefix, suffix in CASES:
        theirs = hf_tokenizer(code_llama_tokenizer_dir)(prefix, suffix=suffix)["input_ids"]
        if not suffix or not prefix:  # (an empty suffix: transformers lays out no infill)
            continue
        ours = tok.infill.encode(prefix, suffix)
        assert ours[:ours.index(SUF)] == theirs[:theirs.index(SUF)], prefix
        if suffix.startswith(" "):
            assert ours == theirs, (prefix, suffix)


def test_vocabulary_is_transformers(tok: Tokenizer, code_llama_tokenizer_dir: Path) -> None:
    """transformers 5 makes Code Llama's tokens special and adds its fill marker, which is in
    no vocabulary, as a special token of its own."""
    hf = hf_tokenizer(code_llama_tokenizer_dir)
    assert_same_as_transformers(tok, hf, [*TEXTS, "a ▁<PRE> b▁<EOT>c"])
    assert tok.encode("<FILL_ME>", add_special_tokens=False) == [1004] == [
        hf.convert_tokens_to_ids("<FILL_ME>")]
    assert {PRE, SUF, MID, EOT, 1004} <= tok.special_ids


def test_fill_marker_splits_a_text(tok: Tokenizer) -> None:
    assert tok.infill is not None
    assert tok.infill.split("def f():<FILL_ME>\n    return 1") == ("def f():", "\n    return 1")
    assert tok.infill.split("<FILL_ME>") == ("", "")
    assert tok.infill.split("no marker") is None
    with pytest.raises(InfillError, match="2 times"):
        tok.infill.split("a<FILL_ME>b<FILL_ME>c")


def test_a_budget_drops_the_prefixs_start(tok: Tokenizer) -> None:
    assert tok.infill is not None
    prefix, suffix = "one two three four five six seven", " eight"
    whole = tok.infill.encode(prefix, suffix)
    pre = tok.infill.encode_prefix(prefix)
    for budget in (len(whole), len(whole) + 5, None):
        assert tok.infill.encode(prefix, suffix, max_ids=budget) == whole
    cut = tok.infill.encode(prefix, suffix, max_ids=len(whole) - 3)
    assert cut == [1, PRE, *pre[3:], *whole[2 + len(pre):]]
    rest = len(whole) - len(pre)  # BOS, the three tokens and the suffix
    assert tok.infill.encode(prefix, suffix, max_ids=rest) == [1, PRE, *whole[2 + len(pre):]]
    with pytest.raises(InfillError, match=f"take {rest} tokens"):
        tok.infill.encode(prefix, suffix, max_ids=rest - 1)


def test_no_infill_without_its_tokens(sp_tokenizer_dir: Path, tokenizer_dir: Path,
                                      code_llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    assert Tokenizer.from_dir(sp_tokenizer_dir).infill is None
    assert Tokenizer.from_dir(tokenizer_dir).infill is None  # Llama 3's byte-level BPE
    # a config that names no middle token: no infilling (transformers refuses it too)
    variant = tmp_path / "no-middle"
    shutil.copytree(code_llama_tokenizer_dir, variant)
    config = json.loads((variant / "tokenizer_config.json").read_text())
    config["middle_token"] = None
    (variant / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(variant).infill is None


def test_a_code_llama_without_infilling_tokens_has_none(sp_tokenizer_dir: Path,
                                                        tmp_path: Path) -> None:
    """Code Llama 34B and the Python models have none in their vocabulary. transformers 5
    still adds the class's names as tokens of their own (the vocabulary grows as its does),
    ids past the model's embedding, which must not turn infilling on."""
    variant = tmp_path / "code-llama-34b"
    shutil.copytree(sp_tokenizer_dir, variant)
    config = json.loads((variant / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "CodeLlamaTokenizer"
    (variant / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer.from_dir(variant), hf_tokenizer(variant)
    assert tok.infill is None
    assert tok.vocab_size == len(hf) == 1005
    assert tok.encode("a ▁<PRE> b", add_special_tokens=False) == hf.encode(
        "a ▁<PRE> b", add_special_tokens=False)
