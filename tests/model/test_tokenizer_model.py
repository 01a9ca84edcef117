"""Meta's tokenizer.model, converted: the same ids as the library that wrote it (SentencePiece,
tiktoken) and as transformers' conversion of the same file, which vLLM would serve."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.demo import corpus
from model.tokenizer import Tokenizer
from model.tokenizer_model import (
    LLAMA2_CHAT_TEMPLATE,
    LLAMA3_NAMED,
    LLAMA3_PATTERN,
    TokenizerModelError,
)
from tests.conftest import SPM_VOCAB, TIKTOKEN_RANKS, TOKENIZER_FILES, train_sentencepiece

EDGE_TEXTS = ["Hello  world\n\n  x 12345 é ☃", "\ttab", "", "日本語のテキスト",
              "don't I'LL 1234567", "a\r\n\r\nb", "    indented(code)\n",
              "emoji 🦙🦙 and \u2581 itself", "x" * 300]


def samples(n: int = 400, seed: int = 0) -> list[str]:
    """Slices of the training corpus (stdlib sources) and the edge texts."""
    text = "".join(corpus(300_000))
    rng = random.Random(seed)
    cuts = [rng.randrange(len(text)) for _ in range(n)]
    return EDGE_TEXTS + [text[a:a + rng.randrange(1, 200)] for a in cuts]


def tiktoken_specials() -> list[str]:
    return LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>"
                           for i in range(3, 3 + 256 - len(LLAMA3_NAMED))]


@pytest.fixture(scope="module")
def spm_folder(spm_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding nothing but Llama 2's kind of tokenizer.model."""
    out = tmp_path_factory.mktemp("spm-folder")
    shutil.copy(spm_tokenizer_model, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def tiktoken_folder(tiktoken_model: Path) -> Path:
    return tiktoken_model.parent


@pytest.fixture(scope="module")
def tiktoken_oracle(tiktoken_model: Path):
    """tiktoken's Encoding over the file, with Llama 3's special tokens: Meta's tokenizer."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    ranks = tiktoken_load.load_tiktoken_bpe(str(tiktoken_model))
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i
                                             for i, t in enumerate(tiktoken_specials())})


# --- Llama 2: SentencePiece --------------------------------------------------------------

def test_sentencepiece_ids_equal_sentencepieces(spm_folder: Path) -> None:
    """Every sample as SentencePiece itself encodes it, whitespace runs scored lowest (as
    Llama 2's) included; a text that starts with a space as SentencePiece encodes the rest
    (transformers' Metaspace takes that space for the "▁" it would add: vLLM's ids on Meta's
    HF files)."""
    spm = pytest.importorskip("sentencepiece")
    ours = Tokenizer.from_dir(spm_folder)
    sp = spm.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    runs = 0
    for text in samples():
        if text == " ":  # (its own "▁" here, nothing there)
            continue
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text[1:] if text.startswith(" ") else text), text
        assert ours.decode(ids) == sp.decode(ids)
        runs += "  " in text
    assert runs > 50  # (samples of code: indentation)
    two = ours.encode("a  b", add_special_tokens=False)
    assert [ours.id_to_token(i) for i in two] == sp.encode("a  b", out_type=str)


def test_sentencepiece_ids_equal_transformers_where_it_ranks_alike(
        spm_tokenizer_model: Path, tmp_path: Path) -> None:
    """Where every piece's score follows its id, transformers 5's conversion (merges ranked
    by id) is right too: the same ids, special tokens in the text included."""
    transformers = pytest.importorskip("transformers")
    path = train_sentencepiece(tmp_path)  # (scores as trained: falling with the id)
    ours = Tokenizer.from_dir(path.parent)
    hf = transformers.LlamaTokenizer.from_pretrained(path.parent)
    for text in [*samples(100), "<s>[INST] hi [/INST]", "a</s>b"]:
        assert ours.encode(text, add_special_tokens=False) == \
            hf(text, add_special_tokens=False).input_ids, text


def test_sentencepiece_specials_bos_and_chat(spm_folder: Path) -> None:
    """<s> first, as Meta's generator and the HF files put it; </s> ends; the control
    pieces in text are one id each (as in transformers); Llama 2's chat format."""
    tok = Tokenizer.from_dir(spm_folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.vocab_size) == (1, 2, {2}, SPM_VOCAB)
    assert tok.encode("hi")[0] == 1 and tok.encode("hi")[1:] == tok.encode("hi", False)
    assert tok.encode("<s>x</s>", add_special_tokens=False)[::2] == [1, 2]
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"},
                                      {"role": "user", "content": "bye"}])
    assert prompt == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello </s>"
                      "<s>[INST] bye [/INST]")
    assert tok.decode(tok.encode("two  spaces\nand é")) == "two  spaces\nand é"


def test_llama2_download_keeps_the_tokenizer_beside_the_model_folders(
        spm_tokenizer_model: Path, tmp_path: Path) -> None:
    """Meta's Llama 2 download: llama-2-7b/{params.json, consolidated.00.pth} with
    tokenizer.model one level up. Only a Meta model folder looks there."""
    model = tmp_path / "llama-2-7b"
    model.mkdir()
    shutil.copy(spm_tokenizer_model, tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="has no tokenizer.*tokenizer.model"):
        Tokenizer.from_dir(model)
    (model / "params.json").write_text("{}")
    assert Tokenizer.from_dir(model).encode("def f():") == \
        Tokenizer.from_dir(tmp_path).encode("def f():")


def test_code_llama_pieces_give_infilling(tmp_path: Path) -> None:
    """A SentencePiece model holding Code Llama's ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> reads as
    CodeLlamaTokenizer: infilling prompts in Meta's layout."""
    infill = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
    path = train_sentencepiece(tmp_path, control_symbols=infill)
    tok = Tokenizer.from_dir(path.parent)
    assert tok.infill is not None
    pre, suf, mid, eot = (tok.token_id(t) for t in infill)
    assert (tok.infill.tokens.prefix_id, tok.infill.tokens.suffix_id,
            tok.infill.tokens.middle_id, tok.infill.tokens.eot_id) == (pre, suf, mid, eot)
    ids = tok.infill.encode("def f(", "):\n")
    assert ids[:2] == [1, pre] and ids[-1] == mid and suf in ids


def test_a_tokenizer_json_beside_it_wins(spm_folder: Path, tokenizer_dir: Path,
                                         tmp_path: Path) -> None:
    shutil.copy(spm_folder / "tokenizer.model", tmp_path / "tokenizer.model")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    assert Tokenizer.from_dir(tmp_path).encode("def f():") == \
        Tokenizer.from_dir(tokenizer_dir).encode("def f():")


@pytest.mark.parametrize("options, message", [
    ({"model_type": "unigram"}, "Unigram"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalizer"),
    ({"remove_extra_whitespaces": True}, "normalizer"),
    ({"treat_whitespace_as_suffix": True}, "normalizer"),
])
def test_sentencepiece_models_unlike_llamas_are_refused(options: dict, message: str,
                                                        tmp_path: Path) -> None:
    """Converted wrongly they would serve other ids than the model was trained on."""
    path = train_sentencepiece(tmp_path, **options)
    with pytest.raises(TokenizerModelError, match=message):
        Tokenizer.from_dir(path.parent)


def test_sentencepiece_without_byte_fallback(tmp_path: Path) -> None:
    """Unknown characters are <unk> (one for a run, as SentencePiece fuses them)."""
    spm = pytest.importorskip("sentencepiece")
    path = train_sentencepiece(tmp_path, byte_fallback=False)
    ours = Tokenizer.from_dir(path.parent)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in [*samples(100), "snow ☃☃ man"]:
        if not text.startswith(" "):
            assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text


@pytest.mark.parametrize("data", [b"\x0a\x05\x0a\x03ab", b"\xff\xff\xff", b"not tiktoken\n",
                                  b"version https://git-lfs.github.com/spec/v1\noid sha256:"])
def test_a_broken_tokenizer_model_is_a_clear_error(data: bytes, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(data)
    with pytest.raises(TokenizerModelError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


# --- Llama 3: tiktoken -------------------------------------------------------------------

def test_tiktoken_ids_equal_tiktoken_and_transformers(tiktoken_folder: Path,
                                                      tiktoken_oracle) -> None:
    """Every sample as tiktoken encodes it (special tokens in text allowed, as chat prompts
    need) and as transformers' TikTokenConverter converts the file."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    ours = Tokenizer.from_dir(tiktoken_folder)
    hf = converter.TikTokenConverter(str(tiktoken_folder / "tokenizer.model"),
                                     extra_special_tokens=tiktoken_specials()).converted()
    for text in [*samples(), "<|begin_of_text|>hi<|eot_id|>x<|reserved_special_token_247|>"]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == tiktoken_oracle.encode(text, allowed_special="all"), text
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def tiktoken_tokenizer(tiktoken_folder: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiktoken_folder)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_tiktoken_ids_on_any_text(text: str, tiktoken_tokenizer: Tokenizer,
                                  tiktoken_oracle) -> None:
    assert tiktoken_tokenizer.encode(text, add_special_tokens=False) == \
        tiktoken_oracle.encode(text, allowed_special="all")


def test_tiktoken_specials_bos_eos_and_chat(tiktoken_folder: Path) -> None:
    """Llama 3's 256 special tokens after the ranks, 3.1's names; <|begin_of_text|> first;
    generation ends where Meta's generator stops (end_of_text, eom, eot); the header chat
    format."""
    tok = Tokenizer.from_dir(tiktoken_folder)
    n = TIKTOKEN_RANKS
    assert tok.vocab_size == n + 256
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (n, n + 9, {n + 1, n + 8, n + 9})
    assert tok.id_to_token(n + 255) == "<|reserved_special_token_247|>"
    assert tok.encode("hi") == [n] + tok.encode("hi", add_special_tokens=False)
    prompt = tok.apply_chat_template([{"role": "system", "content": "Be brief. "},
                                      {"role": "user", "content": "hi"}])
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                      "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[:2] == [n, n + 6] and tok.decode(ids) == "user\n\nhiassistant\n\n"


def test_a_tokenizer_config_beside_it_decides(tiktoken_folder: Path,
                                                              tmp_path: Path) -> None:
    shutil.copy(tiktoken_folder / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": "{{ messages[0][\'content\'] }}!", "eos_token": "<|end_of_text|>"}')
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    assert (tok.eos_id, tok.eos_ids) == (TIKTOKEN_RANKS + 1, {TIKTOKEN_RANKS + 1})
    # A Hugging Face folder of tokenizer.model and a config without a template has none,
    # as transformers reads it: Meta's chat format is for Meta's layout alone
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|end_of_text|>"}')
    assert Tokenizer.from_dir(tmp_path).chat_template is None
