"""The command line as users run it, and the README's examples run against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from tests.api.conftest import Server, free_port, run_server

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def open_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Server]:
    """The README's server: the defaults, and the endpoints its examples use."""
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("readme"),
                    "--enable-embeddings") as server:
        yield server


def test_help_documents_every_flag() -> None:
    """Every flag `serve --help` lists is in the README (the list read from the help, so
    that a new flag cannot be left out of both)."""
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "10000"}).stdout  # (no wrapped flags)
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", out)) - {"--help"}
    assert {"--host", "--port", "--max-num-seqs", "--no-warmup", "--responses-store"} <= flags
    readme = README.read_text()
    missing = [flag for flag in sorted(flags)  # as a whole word: "--max-n" is no "--max-num-"
               if not re.search(rf"(?<![\w-]){flag}(?![\w-])", readme)]
    assert not missing, f"not in the README: {missing}"
    top = subprocess.run([sys.executable, "-m", "server", "--help"], check=True,
                         capture_output=True, text=True).stdout
    assert "serve" in top


def test_make_gpu_check_runs_its_steps(tokenizer_dir: Path, tmp_path: Path) -> None:
    """`make gpu-check` (for CUDA hosts) run on CPU with a small shape: it writes the shape,
    runs the GPU tests (skipped here), model.step_times with and without the Triton kernels,
    and serves and benches the shape six times: as is, --no-async-scheduling,
    --engine-process, --no-async-output-proc, --no-gpu-kernels and --no-warmup."""
    shape = tmp_path / "shape"
    out = subprocess.run(
        ["make", "-s", "gpu-check", f"PY={sys.executable}", f"GPU_SHAPE={shape}",
         f"GPU_TOKENIZER={tokenizer_dir}", "GPU_DEVICE_ARGS=--device cpu --dtype float32",
         "GPU_SERVE_ARGS=--max-num-seqs 2 --max-model-len 128",
         "GPU_BENCH_ARGS=--input-len 4 --output-len 3 --num-prompts 2 --concurrency 2",
         "GPU_SHAPE_CONFIG=dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, "
         "hidden_dim=160, max_seq_len=128", f"BENCH_PORT={free_port()}"],
        cwd=README.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ModelConfig.from_dir(shape).dim == 64
    # model.step_times twice: with the Triton kernels and without
    assert len(re.findall(r"^batch  64 \(bucket \d+ keys\): eager", out.stdout, flags=re.M)) == 2
    assert out.stdout.count("=== serve") == 6
    for flag in ("--no-async-scheduling", "--engine-process", "--no-async-output-proc",
                 "--no-gpu-kernels", "--no-warmup"):
        assert f"=== serve {flag}" in out.stdout
    assert len(re.findall(r"^ +2 +2 +0 ", out.stdout, flags=re.M)) == 6  # 2 ok, 0 failed


def test_make_bench_model_without_the_shared_maker(tmp_path: Path) -> None:
    """Outside the dev workspace there is no ../shared/bench: `make bench` makes the bench
    model's shapes itself."""
    out = tmp_path / "bench-model"
    subprocess.run(["make", "-s", f"BENCH_MODEL={out}", "BENCH_MAKER=/nonexistent/make_model.py",
                    f"{out}/config.json"], cwd=README.parent, check=True, timeout=600)
    config = ModelConfig.from_dir(out)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.hidden_dim,
            config.vocab_size, config.max_seq_len) == (512, 8, 8, 4, 1408, 32000, 2048)
    assert Tokenizer.from_dir(out).vocab_size == 32000  # every id the model emits


def test_bench_model_maker_help_writes_nothing(tmp_path: Path) -> None:
    """`python -m model.demo --help` prints its usage; it once wrote a model into `--help/`."""
    result = subprocess.run([sys.executable, "-m", "model.demo", "--help"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(README.parent)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: python -m model.demo" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_startup_summary(open_server: Server, tiny_checkpoint: Path) -> None:
    log = open_server.log()
    assert f"http://127.0.0.1:{open_server.base_url.rsplit(':', 1)[1]}" in log
    assert "dtype=float32 device=cpu" in log
    assert re.search(r"KV-cache pool: 2 x 2 layers x 16 slots x 1024 tokens .* GiB", log)
    assert "scheduler: up to 16 sequences, 256 tokens per step" in log  # the CPU default


def test_env_variables_configure_the_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(tiny_checkpoint, tmp_path, env={"LLAMA_SERVE_MAX_NUM_SEQS": "3",
                                                    "LLAMA_SERVE_SERVED_MODEL_NAME": "envy"}
                    ) as server:
        assert "x 3 slots x" in server.log()
        assert server.metric("llama_serve_kv_cache_slots_total") == 3
        import httpx
        assert httpx.get(f"{server.v1}/models").json()["data"][0]["id"] == "envy"


def test_pool_that_does_not_fit_refuses_to_start(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(tiny_checkpoint, tmp_path, "--kv-cache-memory", "0.000001",
                    wait=False) as server:
        assert server.process.wait(timeout=60) != 0
    assert "holds no slot" in server.log()


@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_readme_curl_examples(index: int, open_server: Server, request: pytest.FixtureRequest,
                              tmp_path: Path) -> None:
    script = blocks("bash")[index]
    if '"suffix"' in script or "/infill" in script:  # a model with Code Llama's tokens
        checkpoint = request.getfixturevalue("code_llama_checkpoint")
        with run_server(checkpoint, tmp_path) as infill_server:
            out = subprocess.run(["bash", "-c", script.replace(
                "http://127.0.0.1:8000", infill_server.base_url)], capture_output=True,
                text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        if "/infill" in script:  # llama.cpp's
            assert body["stop_type"] in ("eos", "limit") and body["tokens_evaluated"] > 10
            return
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert body["usage"]["prompt_tokens"] > 10  # (the layout's tokens and both texts)
        return
    if '"sql-lora"' in script:  # a LoRA adapter's request: a server with one
        lora = request.getfixturevalue("lora")
        checkpoint = request.getfixturevalue("tiny_checkpoint")
        with run_server(checkpoint, tmp_path, "--enable-lora", "--lora-modules",
                        f"sql-lora={lora.adapter}") as lora_server:
            out = subprocess.run(["bash", "-c", script.replace(
                "http://127.0.0.1:8000", lora_server.base_url)], capture_output=True,
                text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body = json.loads(out.stdout)
        assert body["model"] == "sql-lora" and body["usage"]["completion_tokens"] > 0, body
        return
    script = script.replace("http://127.0.0.1:8000", open_server.base_url)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if "stream" in script:
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        json.loads(lines[0].removeprefix("data: "))
    elif "/v1/rerank" in script:
        results = json.loads(out.stdout)["results"]
        assert sorted(r["index"] for r in results) == [0, 1]
    elif "/v1/embeddings" in script:
        data = json.loads(out.stdout)["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) > 8
    elif "/v1/responses" in script:
        body = json.loads(out.stdout)
        assert body["object"] == "response" and body["usage"]["output_tokens"] == 8
        assert body["output"][0]["content"][0]["text"]
    elif '"grammar"' in script:
        [choice] = json.loads(out.stdout)["choices"]
        text = choice["message"]["content"]
        assert re.fullmatch(r"[1-9][0-9]{0,2} \+ [1-9][0-9]{0,2} = [1-9][0-9]{0,2}", text), text
    elif "/slots" in script:  # llama.cpp's slot monitor
        slots = json.loads(out.stdout)
        assert [slot["id"] for slot in slots] == list(range(len(slots))) and slots, slots
        assert all(isinstance(slot["is_processing"], bool) and slot["n_ctx"] > 0
                   for slot in slots), slots
    elif "/completion " in script:  # llama.cpp's native completion
        body = json.loads(out.stdout)
        assert body["stop"] is True and body["stop_type"] in ("word", "limit", "eos"), body
        assert body["tokens_predicted"] > 0
    elif "guided_choice" in script:
        [choice] = json.loads(out.stdout)["choices"]
        assert choice["text"] in ("blue", "grey") and choice["finish_reason"] == "stop"
    else:
        body = json.loads(out.stdout)
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_examples(index: int, open_server: Server) -> None:
    code = blocks("python")[index].replace("http://127.0.0.1:8000", open_server.base_url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_default_served_name(tmp_path: Path) -> None:
    from server.cli import served_name

    assert served_name(str(tmp_path), tmp_path) == tmp_path.name
    assert served_name("acme/tiny-llama", tmp_path / "snapshots" / "abc") == "acme/tiny-llama"
    assert served_name(None, tmp_path / "demo-v1") == "demo-v1"


def test_chat_template_from_a_file_or_inline(tmp_path: Path) -> None:
    """--chat-template takes a file or, as vLLM does, the template itself."""
    from server.cli import build_parser, chat_template_text, configs

    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(inline + "!")
    assert chat_template_text(str(tmp_path / "t.jinja")) == inline + "!"
    assert chat_template_text(inline) == inline
    with pytest.raises(ValueError, match="no such file"):
        chat_template_text(str(tmp_path / "missing.jinja"))
    args = build_parser().parse_args(["serve", str(tmp_path), "--chat-template", inline])
    assert configs(args, tmp_path)[1].chat_template == inline


@pytest.mark.parametrize("field, variable, argv, env, want", [
    ("enforce_eager", "ENFORCE_EAGER", [], None, False),
    ("enforce_eager", "ENFORCE_EAGER", ["--enforce-eager"], None, True),
    ("enforce_eager", "ENFORCE_EAGER", [], "1", True),
    ("enforce_eager", "ENFORCE_EAGER", [], "true", True),
    ("enforce_eager", "ENFORCE_EAGER", [], "0", False),
    ("enforce_eager", "ENFORCE_EAGER", ["--enforce-eager"], "0", True),
    ("cpu_kernels", "NO_CPU_KERNELS", [], None, True),
    ("cpu_kernels", "NO_CPU_KERNELS", ["--no-cpu-kernels"], None, False),
    ("cpu_kernels", "NO_CPU_KERNELS", [], "1", False),
    ("cpu_kernels", "NO_CPU_KERNELS", [], "0", True),
    ("gpu_kernels", "NO_GPU_KERNELS", [], None, True),
    ("gpu_kernels", "NO_GPU_KERNELS", ["--no-gpu-kernels"], None, False),
    ("gpu_kernels", "NO_GPU_KERNELS", [], "1", False),
    ("async_output_proc", "ASYNC_OUTPUT_PROC", [], None, True),
    ("async_output_proc", "ASYNC_OUTPUT_PROC", ["--no-async-output-proc"], None, False),
    ("async_output_proc", "ASYNC_OUTPUT_PROC", ["--async-output-proc"], "0", True),
    ("async_output_proc", "ASYNC_OUTPUT_PROC", [], "0", False),
    ("warmup", "NO_WARMUP", [], None, True),
    ("warmup", "NO_WARMUP", ["--no-warmup"], None, False),
    ("warmup", "NO_WARMUP", [], "1", False)])
def test_switch_flags_and_env(field: str, variable: str, argv: list[str], env: str | None,
                              want: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.cli import build_parser, configs

    if env is not None:
        monkeypatch.setenv(f"LLAMA_SERVE_{variable}", env)
    args = build_parser().parse_args(["serve", str(tmp_path), *argv])
    engine, _ = configs(args, tmp_path)
    assert getattr(engine, field) is want


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("ENGINE_PROCESS", "maybe", "expected 1, true, yes or on"),
    ("NO_WARMUP", "enabled", "expected 1, true, yes or on"),
    ("METRICS_COMPAT", "prom", "expected one of vllm"),
    ("DTYPE", "fp8", "expected one of auto, float32, bfloat16, float16")])
def test_a_bad_variable_stops_serve_only(variable: str, value: str, expected: str,
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """As the flag's value would be (argparse checks neither choices nor switches in the
    defaults that variables set), when serve builds its configs: bench and --help, which
    read none of them, still run."""
    from server.cli import build_parser, configs

    monkeypatch.setenv(f"LLAMA_SERVE_{variable}", value)
    args = build_parser().parse_args(["serve", str(tmp_path)])
    with pytest.raises(ValueError, match=re.escape(f"LLAMA_SERVE_{variable}={value!r}: "
                                                   f"{expected}")):
        configs(args, tmp_path)
    assert build_parser().parse_args(["bench", "--base-url", "x"]).command == "bench"


def test_variables_with_choices_take_any_case_and_empty_is_unset(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server.cli import build_parser, configs

    monkeypatch.setenv("LLAMA_SERVE_LOG_LEVEL", "INFO")
    monkeypatch.setenv("LLAMA_SERVE_METRICS_COMPAT", "")
    args = build_parser().parse_args(["serve", str(tmp_path)])
    _, server = configs(args, tmp_path)
    assert server.log_level == "info" and server.metrics_compat is None


@pytest.mark.parametrize(("argv", "env"), [
    (["--served-model-name", "a", "b", "c"], None),
    ([], "a, b c"),
    (["--served-model-name", "a", "b", "c"], "x y")])  # the command line wins
def test_served_model_names_from_flag_and_env(argv: list[str], env: str | None,
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from server.cli import build_parser, configs

    if env is not None:
        monkeypatch.setenv("LLAMA_SERVE_SERVED_MODEL_NAME", env)
    args = build_parser().parse_args(["serve", str(tmp_path), *argv])
    _, server = configs(args, tmp_path)
    assert server.model_names == ("a", "b", "c") and server.served_model_name == "a"


def test_dummy_load_format_serves_a_config_without_weights(tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    import httpx

    folder = tmp_path / "shape-only"
    folder.mkdir()
    for f in tiny_checkpoint.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    with run_server(folder, tmp_path, "--load-format", "dummy") as server:
        assert "random weights, for benchmarks only" in server.log()
        body = {"model": "shape-only", "prompt": "hello", "max_tokens": 5, "ignore_eos": True}
        out = httpx.post(f"{server.v1}/completions", json=body, timeout=60).json()
        assert out["usage"]["completion_tokens"] == 5


def test_taken_port_fails_fast_and_cleanly(open_server: Server, tiny_checkpoint: Path) -> None:
    """Bound before the model loads: exit code 2 with a message, not a crash after loading."""
    port = open_server.base_url.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "server", "serve", str(tiny_checkpoint),
                          "--device", "cpu", "--port", port], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"127.0.0.1:{port} cannot be bound" in out.stderr
    assert "loaded" not in out.stderr and "terminate" not in out.stderr


def test_a_negative_shutdown_timeout_is_refused() -> None:
    from server.config import ServerConfig

    with pytest.raises(ValueError, match="--shutdown-timeout must be >= 0"):
        ServerConfig(shutdown_timeout=-5)
    assert ServerConfig(shutdown_timeout=0).shutdown_timeout == 0


def test_auto_tool_choice_flags(tmp_path: Path) -> None:
    """vLLM's pair: --enable-auto-tool-choice needs --tool-call-parser; a parser alone does
    nothing."""
    from server.cli import build_parser, configs

    parse = build_parser().parse_args
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        configs(parse(["serve", str(tmp_path), "--enable-auto-tool-choice"]), tmp_path)
    alone = parse(["serve", str(tmp_path), "--tool-call-parser", "llama3_json"])
    assert configs(alone, tmp_path)[1].tool_call_parser is None
    both = parse(["serve", str(tmp_path), "--enable-auto-tool-choice", "--tool-call-parser",
                  "llama3_json"])
    assert configs(both, tmp_path)[1].tool_call_parser == "llama3_json"
    assert configs(parse(["serve", str(tmp_path)]), tmp_path)[1].tool_call_parser is None
