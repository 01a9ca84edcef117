"""Small random-weight Llama checkpoints with real tokenizers, made offline.

The built-in demo model (`llama-serve serve` with no MODEL) and every test fixture come from
here: weights are random with a fixed seed, written in Hugging Face (or Meta) layout; the
tokenizer is a BPE trained on the running Python's standard-library sources, in either the
Llama 3 byte-level style or the Llama 2 SentencePiece style (metaspace + byte fallback).
The demo model's output is random text.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.cache import cache_root
from model.config import ModelConfig

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Llama 3's pre-tokenisation regex.
SPLIT_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
            r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

DEMO_CONFIG = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4000,
                          hidden_dim=352, max_seq_len=2048, rope_theta=10000.0)
DEMO_VERSION = "v1"  # bump when the demo model's recipe changes
# The performance issue's bench model (what ../shared/bench/make_model.py --size bench writes):
# `make bench` makes it with write_bench_model where that script is not at hand.
BENCH_CONFIG = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000,
                           hidden_dim=1408, max_seq_len=2048, rope_theta=10000.0)


def corpus(max_bytes: int) -> Iterator[str]:
    """Standard-library sources in a fixed order: the same text on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                text = Path(dirpath, name).read_text(encoding="utf-8", errors="replace")
                yield text
                total += len(text)
                if total >= max_bytes:
                    return


def train_tokenizer(out: Path, vocab_size: int, style: str = "bytelevel",
                    corpus_bytes: int = 1_000_000, chat_template: str = CHAT_TEMPLATE) -> None:
    """Train a BPE tokenizer and write tokenizer.json + tokenizer_config.json into `out`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [UNK, BOS, EOS, *ROLE_TOKENS]
    if style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif style == "sentencepiece":
        # Llama 2 style: "▁" for spaces, a leading "▁", bytes for unknown chars, and a decoder
        # that strips the leading space (what incremental detokenisation must get right).
        tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        alphabet = []
        specials += [f"<0x{i:02X}>" for i in range(256)]
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus(corpus_bytes), trainer=trainer)
    if style == "sentencepiece":
        # Byte tokens are ordinary vocabulary in Llama 2 (decoded by ByteFallback), not special.
        _unmark_special(tok, [f"<0x{i:02X}>" for i in range(256)])
    _add_bos_template(tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in [UNK, BOS, EOS, *ROLE_TOKENS]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": chat_template,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for t, i in ids.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS]}, indent=2))


def _add_bos_template(tok) -> None:  # noqa: ANN001 - tokenizers.Tokenizer
    from tokenizers import processors

    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)])


def _unmark_special(tok, contents: list[str]) -> None:  # noqa: ANN001
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    keep = set(contents)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in keep]
    new = Tokenizer.from_str(json.dumps(data))
    tok.__setstate__(new.__getstate__())


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights drawn like HF's init (normal, std 0.02; norms near 1)."""
    from model.llama import LlamaModel

    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(config)
    state = {}
    for name, param in model.state_dict(keep_vars=False).items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            # Not all ones, so that a norm applied to the wrong tensor changes the output.
            t = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        else:
            t = 0.02 * torch.randn(param.shape, generator=gen)
        state[name] = t.contiguous()
    return state


def write_checkpoint(out: Path, config: ModelConfig, seed: int = 0, n_shards: int = 1) -> None:
    """Write config.json and safetensors weights (sharded with an index if n_shards > 1)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    state = random_state_dict(config, seed)
    if n_shards == 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::n_shards]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """The built-in demo model's folder, created on first use (atomically, so racing processes
    never see a half-written one)."""
    root = cache_dir or cache_root()
    folder = root / f"demo-{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    logger.info("creating the built-in demo model in %s (random weights)", folder)
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir=root))
    try:
        train_tokenizer(tmp, DEMO_CONFIG.vocab_size)
        write_checkpoint(tmp, DEMO_CONFIG, seed=0)
        tmp.chmod(0o755)  # mkdtemp makes it private; other users (a container's) read it too
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_bench_model(out: Path) -> None:
    """The bench model's shapes with random float32 weights (seed 0) and a 32000-token BPE."""
    # 16 MB of text fills all 32000 ids: an id the model emits outside the tokenizer would
    # stream no text (4 MB gave 29451, and `make bench` counted such streams as failed).
    train_tokenizer(out, BENCH_CONFIG.vocab_size, corpus_bytes=16_000_000)
    write_checkpoint(out, BENCH_CONFIG, seed=0)


def write_meta_checkpoint(out: Path, config: ModelConfig, params: dict, seed: int = 0,
                          n_shards: int = 1) -> None:
    """The same random weights as `write_checkpoint`, in Meta's layout: params.json and
    `consolidated.NN.pth` model-parallel shards with interleaved-rotary q/k rows."""
    from model.weights import hf_to_meta_qk, meta_names

    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params, indent=2))
    hf = random_state_dict(config, seed)
    if config.tie_embeddings:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for meta_name, (hf_name, dim) in meta_names(config.n_layers).items():
        t = hf[hf_name]
        if hf_name.endswith("q_proj.weight"):
            t = hf_to_meta_qk(t, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = hf_to_meta_qk(t, config.n_kv_heads)
        dim = 1 if dim == -1 else dim  # split the embedding by dim, as Llama 2 does
        parts = [t] * n_shards if dim is None else list(t.chunk(n_shards, dim=dim))
        for shard, part in zip(shards, parts, strict=True):
            shard[meta_name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, out / f"consolidated.{i:02d}.pth")


def main(argv: list[str] | None = None) -> None:
    """`python -m model.demo OUT`: the bench model, for `make bench` where the workspace's
    maker is absent. An argument parser, so that `--help` prints help instead of becoming a
    folder named `--help`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model.demo",
                                     description="Write the bench model's shapes (random "
                                     "weights, fixed seed) with a trained tokenizer.")
    parser.add_argument("out", type=Path, help="folder to write (created)")
    write_bench_model(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
