"""`llama-serve serve [MODEL]`: flags and LLAMA_SERVE_* variables -> configs -> uvicorn.

Every flag can also be set as an environment variable named LLAMA_SERVE_<FLAG> (upper case,
dashes as underscores); a flag on the command line wins. This is the only module that reads
them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_args

from server.bench import add_bench_parser, run_bench
from server.config import (
    DEFAULT_BATCHED_TOKENS,
    DEFAULT_MAX_MODEL_LEN,
    LARGE_GPU_BATCHED_TOKENS,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    EngineConfig,
    GenerationDefaults,
    ServerConfig,
)
from server.request import Pooling

logger = logging.getLogger("llama_serve")

ENV_PREFIX = "LLAMA_SERVE_"


def _env_name(name: str) -> str:
    """`max-num-seqs` -> LLAMA_SERVE_MAX_NUM_SEQS."""
    return ENV_PREFIX + name.upper().replace("-", "_")


SWITCH_ON, SWITCH_OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _add(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: object) -> None:
    """A flag whose default a LLAMA_SERVE_ variable may set, checked as the flag would be
    (argparse checks neither choices nor switches in defaults): a switch's value must be on
    or off, a choice one of the choices (in any case; empty: unset). A bad value is reported
    when the configs are built (`configs`), so that other commands and --help still run."""
    env = _env_name(flag.lstrip("-"))
    value = os.environ.get(env)
    if value is not None:
        choices, word = kwargs.get("choices"), value.strip().lower()
        problem = None
        if kwargs.get("action") in ("store_true", "store_false",
                                    argparse.BooleanOptionalAction):
            # The variable says what the flag says: LLAMA_SERVE_NO_X=1 is --no-x.
            if word in SWITCH_ON + SWITCH_OFF:
                given = word in SWITCH_ON
                kwargs["default"] = not given if kwargs["action"] == "store_false" else given
            else:
                problem = f"{env}={value!r}: expected 1, true, yes or on (or 0, false, no, off)"
        elif isinstance(choices, list | tuple) and kwargs.get("type") is None:
            match = next((c for c in choices if str(c).lower() == word), None)
            if match is not None:
                kwargs["default"] = match
            elif word:  # empty: unset, as for a switch
                problem = f"{env}={value!r}: expected one of {', '.join(map(str, choices))}"
        else:
            kwargs["default"] = value  # converted by `type`, as argparse converts defaults
        if problem is not None:
            parser.set_defaults(env_problems=[*(parser.get_default("env_problems") or []),
                                              problem])
    parser.add_argument(flag, help=f"{help} [env {env}]", **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-serve",
        description="OpenAI-compatible inference server for Llama-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP",
                           description="Serve MODEL (a checkpoint folder or a Hugging Face hub "
                           "id; omitted: the built-in random demo model) with an "
                           "OpenAI-compatible API.")
    serve.add_argument("model", nargs="?", default=os.environ.get(_env_name("model")),
                       help=f"checkpoint folder or hub id [env {ENV_PREFIX}MODEL]")
    e, s = EngineConfig(), ServerConfig()
    _add(serve, "--host", "address to bind", default=s.host)
    _add(serve, "--port", "port to bind", type=int, default=s.port)
    _add(serve, "--served-model-name", "model id clients use (default: the folder's name); "
         "more names are aliases: requests may use any, responses carry the first",
         nargs="+")
    _add(serve, "--api-key", "require 'Authorization: Bearer KEY' on /v1/* and /(de)tokenize")
    _add(serve, "--dtype", "weights and KV-cache dtype", default=e.dtype,
         choices=["auto", "float32", "bfloat16", "float16"])
    _add(serve, "--device", "auto, cpu, cuda or cuda:N", default=e.device)
    _add(serve, "--max-model-len", "tokens per sequence (prompt + output); default: the "
         f"model's context, capped at {DEFAULT_MAX_MODEL_LEN}", type=int,
         default=e.max_model_len)
    _add(serve, "--max-num-seqs", "KV-cache slots: sequences decoded at once", type=int,
         default=e.max_num_seqs)
    by_device = ", ".join(f"{n} on {d.upper()}" for d, n in DEFAULT_BATCHED_TOKENS.items())
    _add(serve, "--max-num-batched-tokens", "tokens per forward pass (prefill chunk budget); "
         f"default: {by_device} ({LARGE_GPU_BATCHED_TOKENS} on GPUs of 70 GiB or more but "
         "the A100, as vLLM), at least --max-num-seqs", type=int,
         default=e.max_num_batched_tokens)
    _add(serve, "--max-waiting", "requests queued beyond the slots; more get 503", type=int,
         default=e.max_waiting)
    _add(serve, "--kv-cache-memory", "KV-cache budget in GiB (e.g. 4) or %% of free memory "
         "(e.g. 50%%); the slot count follows, up to --max-num-seqs")
    _add(serve, "--tokenizer", "the tokenizer's folder or hub id, where it is not the "
         "model's (vLLM's flag; only its tokenizer files are fetched); the model's "
         "generation_config.json still gives sampling defaults and end-of-sequence ids",
         default=None)
    _add(serve, "--revision", "the model's hub revision (a branch, tag or commit), as vLLM's",
         default=None)
    _add(serve, "--tokenizer-revision", "--tokenizer's hub revision", default=None)
    _add(serve, "--chat-template", "a Jinja chat template replacing the model's: a file, or "
         "the template itself")
    _add(serve, "--enable-lora", "serve LoRA adapters beside the model (vLLM's flag)",
         action="store_true", default=False)
    _add(serve, "--lora-modules", "LoRA adapters in PEFT's layout, each name=path (or "
         "vLLM's JSON {\"name\": ..., \"path\": ...}): a request names one as its model",
         nargs="+", default=[])
    _add(serve, "--allow-runtime-lora-updating", "serve POST /v1/load_lora_adapter and "
         "/v1/unload_lora_adapter (vLLM's, behind its VLLM_ALLOW_RUNTIME_LORA_UPDATING); needs "
         "--enable-lora", action="store_true", default=False)
    _add(serve, "--max-loras", "the most LoRA adapters loaded at once (vLLM's flag caps those "
         "in a batch; here all loaded ones may share one)", type=int, default=None)
    _add(serve, "--max-lora-rank", "the highest rank of an adapter (vLLM's flag)", type=int,
         default=16)
    _add(serve, "--trust-request-chat-template", "render a chat request's own "
         "chat_template (vLLM's flag); without it such requests are refused",
         action="store_true", default=False)
    _add(serve, "--generation-config", "sampling defaults for fields a request leaves out "
         "(temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens for "
         "max_tokens): auto, the model's generation_config.json (as vLLM); vllm, none; or a "
         "folder holding a generation_config.json", default="auto")
    _add(serve, "--max-n", "largest n (samples per prompt) a request may ask for", type=int,
         default=s.max_n)
    _add(serve, "--max-request-bytes", "largest request body; more get 413", type=int,
         default=s.max_request_bytes)
    _add(serve, "--allowed-origins", "comma-separated CORS origins (default: CORS off)",
         default="")
    _add(serve, "--metrics-compat", "also export vLLM's metric names", choices=["vllm"])
    _add(serve, "--enable-prompt-tokens-details", "report the prompt tokens taken from the "
         "prefix cache in usage, as prompt_tokens_details.cached_tokens (vLLM's flag)",
         action="store_true", dest="prompt_tokens_details", default=s.prompt_tokens_details)
    _add(serve, "--enable-auto-tool-choice", "let tool_choice \"auto\" (the default when a "
         "request has tools) answer with tool calls, parsed from the model's text by "
         "--tool-call-parser (vLLM's flags); without it such requests are refused",
         action="store_true", default=False)
    _add(serve, "--responses-store", "keep the last N responses of the Responses API that "
         "ask to be stored (store: true, its default) in memory, for previous_response_id "
         "and GET / DELETE /v1/responses/{id}; 0 (the default, as vLLM's): none",
         type=int, default=s.responses_store)
    _add(serve, "--enable-embeddings", "serve POST /v1/embeddings beside generation: a "
         "prompt's final normalized hidden states pooled to one unit-length vector (as vLLM's "
         "pooling runner makes them of a decoder model)", action="store_true", default=False)
    _add(serve, "--pooling", "how an embedding pools the prompt's hidden states: last (its "
         "last token's, vLLM's default for decoder models) or mean (every token's)",
         choices=list(get_args(Pooling)), default=s.pooling)
    _add(serve, "--tool-call-parser", "how tool calls are read from the model's text: "
         "llama3_json (Llama 3.1 / 3.2's JSON calls), pythonic (a Python list of calls: Llama "
         "3.2's other format, Llama 4's), hermes (<tool_call> blocks: Hermes 3); vLLM's "
         "llama4_json and llama4_pythonic name the first two",
         choices=list(TOOL_CALL_PARSERS))
    _add(serve, "--reasoning-parser", "set a reasoning model's thinking apart from its answer "
         "in chat completions (vLLM's flag): deepseek_r1 (<think> ... </think>: DeepSeek-R1 "
         "and its Llama distills), as the message's reasoning", choices=list(REASONING_PARSERS))
    _add(serve, "--slots", "serve GET /slots, llama.cpp's slot monitor (each slot's task, "
         "parameters and progress; no prompt or output text); --no-slots: 404, as llama.cpp's "
         "flags", action=argparse.BooleanOptionalAction, default=s.slots_endpoint)
    _add(serve, "--shutdown-timeout", "seconds requests in flight get to finish after SIGTERM",
         type=float, default=s.shutdown_timeout)
    _add(serve, "--engine-process", "run the engine in a process of its own, apart from the "
         "HTTP server's event loop (vLLM V1's layout); --no-engine-process runs it on a thread "
         "of the server's process", action=argparse.BooleanOptionalAction,
         default=s.engine_process)
    _add(serve, "--load-format", "auto: the checkpoint's weights; dummy: random weights of "
         "config.json's shapes, for benchmarks", default=e.load_format, choices=["auto", "dummy"])
    _add(serve, "--enforce-eager", "CUDA: run decode steps eagerly, without CUDA graphs",
         action="store_true", default=e.enforce_eager)
    _add(serve, "--async-output-proc", "stream a step's outputs while the next step computes "
         "(vLLM V0's async output processing): on CUDA once a graphed step is launched, on CPU "
         "as the next forward starts; on by default, --no-async-output-proc posts each step's "
         "outputs before the next step", action=argparse.BooleanOptionalAction,
         default=e.async_output_proc)
    _add(serve, "--async-scheduling", "CUDA graphs: launch the next decode step before this "
         "one's tokens are read back, feeding on them on the GPU (vLLM's --async-scheduling); "
         "on by default, --no-async-scheduling reads each step back before the next launch",
         action=argparse.BooleanOptionalAction, default=e.async_scheduling)
    _add(serve, "--enable-prefix-caching", "copy a prompt's prefix from a KV-cache slot "
         "that holds it (a finished request's, a running one's) instead of computing it "
         "again (vLLM's automatic prefix caching); on by default, --no-enable-prefix-caching "
         "computes every prompt whole", action=argparse.BooleanOptionalAction,
         dest="prefix_caching", default=e.prefix_caching)
    _add(serve, "--no-cpu-kernels", "CPU: oneDNN's linears and PyTorch's ops instead of the C "
         "kernels built on first use", action="store_false", dest="cpu_kernels",
         default=e.cpu_kernels)
    _add(serve, "--no-gpu-kernels", "CUDA: PyTorch's ops instead of the fused Triton kernels "
         "(norms, rotary + K/V store, SiLU * up, decode attention)", action="store_false",
         dest="gpu_kernels", default=e.gpu_kernels)
    _add(serve, "--no-warmup", "skip the start-up warm-up: the largest step (--max-num-batched-"
         "tokens prompt tokens, every row's logits), then a prompt chunk beside every other "
         "slot's decode row and decode rows alone, run on the engine thread before /health "
         "answers 200", action="store_false",
         dest="warmup", default=e.warmup)
    _add(serve, "--seed", "seed for requests without one", type=int, default=e.seed)
    _add(serve, "--log-level", "logging level", default=s.log_level,
         choices=["debug", "info", "warning", "error"])
    add_bench_parser(sub)
    return parser


def configs(args: argparse.Namespace, model_dir: Path) -> tuple[EngineConfig, ServerConfig]:
    if problems := getattr(args, "env_problems", None):
        raise ValueError("; ".join(problems))
    engine = EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
    template = chat_template_text(args.chat_template) if args.chat_template else None
    origins = tuple(o.strip() for o in str(args.allowed_origins).split(",") if o.strip())
    names = args.served_model_name or []  # a list from the command line, text from the variable
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    defaults = GenerationDefaults.load(args.generation_config, model_dir)
    server = ServerConfig(
        host=args.host, port=args.port,
        served_model_name=names[0] if names else served_name(args.model, model_dir),
        model_aliases=tuple(names[1:]),
        api_key=args.api_key, allowed_origins=origins, max_request_bytes=args.max_request_bytes,
        max_n=args.max_n, chat_template=template,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_lora=engine.enable_lora, lora_modules=engine.lora_adapters,
        max_loras=engine.max_loras,
        runtime_lora_updating=_runtime_lora_updating(args),
        generation_defaults=defaults,
        log_level=args.log_level,
        metrics_compat=args.metrics_compat, shutdown_timeout=args.shutdown_timeout,
        engine_process=args.engine_process, prompt_tokens_details=args.prompt_tokens_details,
        tool_call_parser=_tool_call_parser(args), responses_store=args.responses_store,
        reasoning_parser=args.reasoning_parser,
        enable_embeddings=args.enable_embeddings, pooling=args.pooling,
        slots_endpoint=args.slots)
    return engine, server


def _runtime_lora_updating(args: argparse.Namespace) -> bool:
    if args.allow_runtime_lora_updating and not args.enable_lora:
        raise ValueError("--allow-runtime-lora-updating needs --enable-lora")
    return bool(args.allow_runtime_lora_updating)


def _tool_call_parser(args: argparse.Namespace) -> str | None:
    """vLLM's pair of flags: --enable-auto-tool-choice needs a parser; a parser alone does
    nothing."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def chat_template_text(arg: str) -> str:
    """--chat-template's template: the file it names, or, as vLLM takes it, the template
    itself when it is written inline (it has Jinja's braces and names no file)."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in arg or "{%" in arg:
        return arg
    raise ValueError(f"--chat-template {arg!r}: no such file (a template given inline must "
                     "contain Jinja tags)")


def served_name(model: str | None, model_dir: Path) -> str:
    """A hub id as given (`org/name`), else the checkpoint folder's name."""
    if model and not Path(model).expanduser().is_dir():
        return model
    return model_dir.name


def serve(args: argparse.Namespace) -> int:
    # Torch is imported only after main() has set up its threading environment, and only
    # where it runs: by the engine (build_engine), or to make the demo model.
    import uvicorn

    from model.source import resolve_model
    from server.app import DrainingServer, create_app
    from server.engine_front import EngineFront
    from server.engine_process import EngineProcess
    from server.http_protocol import http_protocol

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.tokenizer:  # (its folder, for the engine's config)
            args.tokenizer = str(resolve_model(args.tokenizer, args.tokenizer_revision,
                                               tokenizer_only=True))
        if args.model:
            model_dir = resolve_model(args.model, args.revision)
        else:
            from model.demo import ensure_demo_model

            model_dir = ensure_demo_model()
            logger.warning("no MODEL given: serving the built-in demo model from %s. Its "
                           "weights are RANDOM, so its output is random text.", model_dir)
        engine_config, server_config = configs(args, model_dir)
    except (ValueError, OSError) as e:
        logger.error("cannot start: %s", e)
        return 2
    if defaults := server_config.generation_defaults.as_dict():
        logger.info("sampling defaults from generation_config.json for fields a request leaves "
                    "out: %s (--generation-config vllm: the neutral ones)", defaults)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    def load_engine() -> EngineFront:
        if server_config.engine_process:
            return EngineProcess(model_dir, engine_config, server_config.chat_template,
                                 server_config.log_level)
        from server.startup import build_engine

        return build_engine(model_dir, engine_config, server_config.chat_template)

    app = create_app(server_config, load_engine, on_fatal)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, timeout_graceful_shutdown=10,
                            http=http_protocol())
    # Bind before anything loads: a taken port fails at once, with uvicorn's message, instead
    # of after the model is in (and with the engine thread alive at exit, which aborts).
    try:
        sock = config.bind_socket()
    except SystemExit:
        logger.error("cannot start: %s:%d cannot be bound", server_config.host,
                     server_config.port)
        return 2
    logger.info("llama-serve on http://%s:%d  model=%s (%s)  dtype=%s  device=%s",
                server_config.host, server_config.port, server_config.served_model_name,
                model_dir, engine_config.dtype, engine_config.device)
    server = DrainingServer(config, app.state.server)
    server.run(sockets=[sock])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (uvicorn put back the one before serving)
    if app.state.server.status == "loading":
        # Stopped while the model loads: the loader (or the engine thread, warming up) is
        # inside torch, and the interpreter's exit beside it aborts (status 134); there is
        # nothing to save or drain
        logger.info("stopped while loading")
        logging.shutdown()
        os._exit(0)
    if fatal:
        logger.error("%s", fatal[0])
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    # How long idle OpenMP workers spin before sleeping. libgomp's default (300000) keeps them
    # spinning past a decode step, on cores the HTTP thread and other processes need (token
    # gaps of 200 ms were seen on a loaded 2-core machine); 0 (passive) wakes them with a
    # futex ~200 times a step (+20% step time). 100000 measured best at c=1 and c=16. Must
    # be set before torch loads its OpenMP runtime.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # Until uvicorn installs its own (which drain): SIGTERM stops at once. As a container's
        # PID 1 the process would otherwise ignore it (the kernel drops a signal PID 1 has no
        # handler for) while it fetches a model from the hub, and `docker stop` waited for
        # its SIGKILL.
        signal.signal(signal.SIGTERM, _stop_before_serving)
        return serve(args)
    return run_bench(args)


def _stop_before_serving(signum: int, frame: object) -> None:
    # At once: there is nothing to save yet, and an exception would wait for the downloads
    # that huggingface_hub's threads have begun (multi-GB shards)
    logger.info("stopped before serving (signal %d)", signum)
    logging.shutdown()
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
