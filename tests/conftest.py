"""Shared fixtures: tiny random checkpoints with real tokenizers, written once per session."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
import torch

# Without a GPU the Triton kernels of the GPU path run on CPU tensors under Triton's
# interpreter (tests/model/test_triton_kernels.py); it is chosen when they are defined, so
# before anything imports model.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from model.config import ModelConfig
from model.demo import train_tokenizer, write_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")

# 2 layers, GQA 2:1, vocab above the tokenizer's 1000 (padded embeddings, as real models have).
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=160,
                   max_seq_len=1024)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE (Llama 3 style), 1000 tokens."""
    out = tmp_path_factory.mktemp("tok-bytelevel")
    train_tokenizer(out, 1000, style="bytelevel")
    return out


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SentencePiece-style BPE with byte fallback (Llama 2 style), 1000 tokens."""
    out = tmp_path_factory.mktemp("tok-sentencepiece")
    train_tokenizer(out, 1000, style="sentencepiece")
    return out


# Code Llama's infilling tokens, after the 1000 of the SentencePiece-style tokenizer
INFILL_TOKENS = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")


@pytest.fixture(scope="session")
def code_llama_tokenizer_dir(sp_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
                             ) -> Path:
    """The SentencePiece-style tokenizer laid out as Code Llama's Hugging Face files are:
    a converted Llama 2 tokenizer.json (Prepend + Replace normalizer), the four infilling
    tokens in its vocabulary as special added tokens, CodeLlamaTokenizer's config."""
    out = tmp_path_factory.mktemp("tok-code-llama")
    for name in TOKENIZER_FILES:
        shutil.copy(sp_tokenizer_dir / name, out / name)
    data = json.loads((out / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    data["pre_tokenizer"] = None
    first = len(data["model"]["vocab"])
    for i, token in enumerate(INFILL_TOKENS, first):
        data["model"]["vocab"][token] = i
        data["added_tokens"].append({"id": i, "content": token, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})
    (out / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CodeLlamaTokenizer", prefix_token="▁<PRE>",
                  suffix_token="▁<SUF>", middle_token="▁<MID>", eot_token="▁<EOT>",
                  fill_token="<FILL_ME>", additional_special_tokens=list(INFILL_TOKENS))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


# --- Meta's tokenizer.model (its own downloads carry no tokenizer.json) ---------------------

SPM_VOCAB = 1000
TIKTOKEN_RANKS = 1500  # plus Llama 3's 256 special tokens after them


def train_sentencepiece(out: Path, model_type: str = "bpe", **options: object) -> Path:
    """A SentencePiece model trained as Llama 2's was (BPE, byte fallback, digits split,
    identity normalizer, <unk> <s> </s> at 0-2, no pad), written as `out`/tokenizer.model."""
    import sentencepiece as spm

    from model.demo import corpus

    out.mkdir(parents=True, exist_ok=True)
    text = out / "corpus.txt"
    text.write_text("".join(corpus(300_000)), encoding="utf-8")
    settings = dict(model_type=model_type, vocab_size=SPM_VOCAB, byte_fallback=True,
                    split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=True,
                    allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                    character_coverage=0.9999, minloglevel=2) | options
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "tokenizer"),
                                   **settings)
    text.unlink()
    (out / "tokenizer.vocab").unlink()
    return out / "tokenizer.model"


def llama2_whitespace_scores(path: Path) -> None:
    """Score the model's whitespace runs ("▁▁", "▁▁▁▁", ...) below every other piece, as
    Llama 2's are: their ids stay low, so merges ranked by id rather than score split
    spaces otherwise. (Llama 2 scores them all -1e9; distinct scores here, in id order,
    since SentencePiece breaks a tie by position, which no merge ranking can follow.)"""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    runs = [p for p in model.pieces if len(p.piece) > 1 and set(p.piece) == {"▁"}]
    assert len(runs) >= 3, "the corpus should train some whitespace runs"
    for i, piece in enumerate(runs):
        piece.score = -1e6 - 10 * i
    path.write_bytes(model.SerializeToString())


def write_tiktoken_model(out: Path) -> Path:
    """Llama 3's tokenizer.model: tiktoken ranks ("base64-bytes rank" lines) of a byte-level
    BPE trained with Llama 3's split pattern (every merge ranks after its parts, as tiktoken
    needs)."""
    import base64

    from tokenizers import Regex, models, pre_tokenizers, trainers

    from model.demo import corpus
    from model.tokenizer_model import LLAMA3_PATTERN, byte_to_unicode

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=TIKTOKEN_RANKS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(300_000), trainer=trainer)
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}"
             for token, rank in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return out / "tokenizer.model"


@pytest.fixture(scope="session")
def spm_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 2's tokenizer.model kind: a SentencePiece BPE model, 1000 pieces, its
    whitespace runs scored as Llama 2's are."""
    path = train_sentencepiece(tmp_path_factory.mktemp("meta-spm"))
    llama2_whitespace_scores(path)
    return path


@pytest.fixture(scope="session")
def tiktoken_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3's tokenizer.model kind: tiktoken ranks, 1500 of them."""
    return write_tiktoken_model(tmp_path_factory.mktemp("meta-tiktoken"))


MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path
                    ) -> MakeCheckpoint:
    """make_checkpoint(config, seed=0, n_shards=1) -> folder with weights and tokenizer."""
    cache: dict[tuple, Path] = {}

    def make(config: ModelConfig = TINY, seed: int = 0, n_shards: int = 1) -> Path:
        key = (config, seed, n_shards)
        if key not in cache:
            out = tmp_path_factory.mktemp("ckpt")
            write_checkpoint(out, config, seed=seed, n_shards=n_shards)
            for name in TOKENIZER_FILES:
                shutil.copy(tokenizer_dir / name, out / name)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: MakeCheckpoint) -> Path:
    return make_checkpoint(TINY)


@pytest.fixture(scope="session")
def code_llama_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                          code_llama_tokenizer_dir: Path) -> Path:
    """The tiny model with Code Llama's tokenizer layout (its vocabulary, 1024, holds the
    infilling tokens and transformers' <FILL_ME>)."""
    out = tmp_path_factory.mktemp("ckpt-code-llama")
    write_checkpoint(out, TINY, seed=3)
    for name in TOKENIZER_FILES:
        shutil.copy(code_llama_tokenizer_dir / name, out / name)
    return out


# DeepSeek-R1's think tags, added (not special) after the byte-level tokenizer's 1000, and
# its distills' chat template ending: the thinking opened in the prompt (closed at once where
# the template's `thinking` is false, a template that turns thinking off)
THINK_TAGS = ("<think>", "</think>")
REASONING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
    "{% if thinking is defined and not thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="session")
def reasoning_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                         ) -> Path:
    """The tiny model with R1's think tags in its tokenizer and a distill's template."""
    out = tmp_path_factory.mktemp("ckpt-reasoning")
    for item in tiny_checkpoint.iterdir():
        shutil.copy(item, out / item.name)
    backend = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    backend.add_tokens([tokenizers.AddedToken(tag, special=False, normalized=False)
                        for tag in THINK_TAGS])
    backend.save(str(out / "tokenizer.json"))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = REASONING_TEMPLATE
    config_path.write_text(json.dumps(config))
    return out


@dataclasses.dataclass(frozen=True)
class LoraFixture:
    adapter: Path  # PEFT's layout: adapter_config.json, adapter_model.safetensors
    merged: Path  # the tiny checkpoint with the adapter merged in: the oracle's weights


def write_lora(base: Path, out: Path, seed: int, rank: int = 4, alpha: float | None = 8.0,
               rslora: bool = False, targets: list[tuple[int, str]] | None = None
               ) -> LoraFixture:
    """A random LoRA adapter of the tiny model, as PEFT saves one: by default every linear
    of layer 0, q_proj and down_proj of layer 1 (B random, where PEFT starts it at zero, so
    that the delta shows); and `base` with W + scale B A merged in, for transformers to run.
    alpha None: left out of the config (PEFT's default, 8)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    q, kv = TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim
    shapes = {"self_attn.q_proj": (TINY.dim, q), "self_attn.k_proj": (TINY.dim, kv),
              "self_attn.v_proj": (TINY.dim, kv), "self_attn.o_proj": (q, TINY.dim),
              "mlp.gate_proj": (TINY.dim, TINY.hidden_dim),
              "mlp.up_proj": (TINY.dim, TINY.hidden_dim),
              "mlp.down_proj": (TINY.hidden_dim, TINY.dim)}
    targets = targets or ([(0, name) for name in shapes]
                          + [(1, "self_attn.q_proj"), (1, "mlp.down_proj")])
    scale = (alpha or 8.0) / (rank ** 0.5 if rslora else rank)
    adapter, merged = out / "adapter", out / "merged"
    adapter.mkdir(parents=True)
    shutil.copytree(base, merged)
    weights = load_file(str(merged / "model.safetensors"))
    tensors = {}
    for layer, name in targets:
        d_in, d_out = shapes[name]
        a = torch.randn(rank, d_in, generator=g) * 0.3
        b = torch.randn(d_out, rank, generator=g) * 0.3
        prefix = f"base_model.model.model.layers.{layer}.{name}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        key = f"model.layers.{layer}.{name}.weight"
        weights[key] = weights[key] + scale * b @ a
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    save_file({k: v.contiguous() for k, v in weights.items()},
              str(merged / "model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "use_rslora": rslora,
        **({} if alpha is None else {"lora_alpha": alpha}),
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"], "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base)}))
    return LoraFixture(adapter, merged)


@pytest.fixture(scope="session")
def lora(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraFixture:
    return write_lora(tiny_checkpoint, tmp_path_factory.mktemp("lora"), seed=11)


@pytest.fixture(scope="session")
def long_context_checkpoint(make_checkpoint: MakeCheckpoint) -> Path:
    """The tiny model with a 4096-token context: for streams that must still be generating
    when a test looks from outside (a `docker exec`, a signal). The tiny model decodes a token
    in well under a millisecond, so 1000 tokens can be over before such a look."""
    return make_checkpoint(dataclasses.replace(TINY, max_seq_len=4096))


def indent_cut(text: str, n_indent: int) -> str:
    """Where llama.cpp's n_indent ends `text` (server/line_limits.py), as one regex: past
    the first line, before the first character within a line's first n_indent that is no
    space or tab."""
    found = re.search(rf"\n[ \t]{{0,{n_indent - 1}}}[^ \t]", text)
    return text if found is None else text[:found.end() - 1]
