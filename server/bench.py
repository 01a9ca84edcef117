"""`llama-serve bench`: an async load generator for any OpenAI-compatible server (ours, vLLM's).

Streams distinct random prompts that each produce exactly --output-len tokens (`ignore_eos`,
greedy), one concurrency level after another, and reports what the client sees with `vllm
bench serve`'s definitions: TTFT, ITL, TPOT, E2E latency, request and token throughput over
the level's wall time. No torch: it runs wherever httpx does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from tokenizers import Tokenizer

from server import bench_steps

Prompt = list[int] | str
T = TypeVar("T")
PERCENTILES = (50, 90, 99)
DRAIN_SECONDS = 1.0  # how long a stream is read past its [DONE] for its connection (_drain)
# Chat prompts without --tokenizer: common words, about one token each in Llama tokenizers.
WORDS = ("the of and to in is was for on that with as by at from his her it be are this had "
         "not but which one all were they have new an more first two time been after who "
         "city year would also their may only other some there into she over most world "
         "game than what when many between under where made while during can three").split()


class BenchError(Exception):
    """The run cannot go on: server unreachable, warm-up failed, unusable arguments."""


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_seconds: float = 0.0
    e2e_seconds: float = 0.0  # to the last chunk carrying choices, as vLLM
    itl_seconds: tuple[float, ...] = ()  # gaps between successive content chunks


@dataclass(frozen=True, slots=True)
class Stats:
    """Mean and percentiles of one latency in milliseconds; 0.0 when nothing completed."""
    mean: float
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True, slots=True)
class LevelResult:
    """The figures of one concurrency level; throughputs are per second of its wall time."""
    concurrency: int
    completed: int
    failed: int
    duration_seconds: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Stats
    itl_ms: Stats
    tpot_ms: Stats
    e2el_ms: Stats
    first_error: str | None
    # The server's decode steps during the level, from its /metrics (bench_steps.py); None
    # where it does not export them.
    server_steps: bench_steps.ServerSteps | None = None
    # This process's CPU during the level: beside a server on the same machine, taken from it
    client_cpu_seconds: float | None = None
    # The server's prefix cache during the level, from its /metrics; None where it has none
    prefix_cache: bench_steps.PrefixCache | None = None
    # The server's steps during the level by kind, from its /metrics; None where it has none
    step_kinds: bench_steps.StepKinds | None = None


def percentile(values: Sequence[float], p: float) -> float:
    """numpy.percentile's default: linear interpolation between closest ranks; 0.0 if empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def stats_ms(values: Sequence[float]) -> Stats:
    mean = sum(values) / len(values) if values else 0.0
    return Stats(mean * 1000, *(percentile(values, p) * 1000 for p in PERCENTILES))


def summarize(concurrency: int, results: Sequence[RequestResult],
              duration_seconds: float) -> LevelResult:
    """vLLM's `calculate_metrics`: latencies over completed requests, ITL over all their gaps."""
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    n_in, n_out = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    # TPOT excludes the first token; a one-token request has none.
    tpots = [(r.e2e_seconds - r.ttft_seconds) / (r.output_tokens - 1)
             for r in ok if r.output_tokens > 1]
    return LevelResult(
        concurrency=concurrency, completed=len(ok), failed=len(errors),
        duration_seconds=duration_seconds, total_input_tokens=n_in, total_output_tokens=n_out,
        request_throughput=len(ok) / duration_seconds, output_throughput=n_out / duration_seconds,
        total_token_throughput=(n_in + n_out) / duration_seconds,
        ttft_ms=stats_ms([r.ttft_seconds for r in ok]),
        itl_ms=stats_ms([gap for r in ok for gap in r.itl_seconds]),
        tpot_ms=stats_ms(tpots), e2el_ms=stats_ms([r.e2e_seconds for r in ok]),
        first_error=errors[0] if errors else None)


class PromptSource:
    """Random prompts, never one twice in a run (a prefix cache would fake the TTFT).

    Completions get exactly `prefix_len` + `input_len` token ids; chat gets text: random ids
    decoded by the tokenizer (trimmed to at most that many tokens), or as many common words
    without one. The first `prefix_len` are the same in every prompt of the run (vLLM's
    `--random-prefix-len`: a shared system prompt, which a prefix cache serves).
    """

    def __init__(self, endpoint: str, input_len: int, vocab_size: int, min_token_id: int,
                 tokenizer: Tokenizer | None = None, prefix_len: int = 0,
                 seed: int | str = 0) -> None:
        if not 0 <= min_token_id < vocab_size:
            raise BenchError(f"--min-token-id ({min_token_id}) must be in [0, vocabulary size "
                             f"{vocab_size})")
        self.endpoint, self.input_len, self.tokenizer = endpoint, input_len, tokenizer
        self.vocab_size, self.min_token_id = vocab_size, min_token_id
        self.prefix_len = prefix_len
        self.seen: set[tuple[int, ...] | str] = set()
        rng = random.Random(f"{seed}:prefix")
        self._prefix_ids = self._ids(rng, prefix_len)
        self._prefix_words = rng.choices(WORDS, k=prefix_len)

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.input_len

    def make(self, rng: random.Random) -> Prompt:
        for _ in range(100):
            prompt = self._draw(rng)
            key = prompt if isinstance(prompt, str) else tuple(prompt)
            if key not in self.seen:
                self.seen.add(key)
                return prompt
        raise BenchError(f"cannot draw {len(self.seen) + 1} distinct prompts of "
                         f"{self.input_len} tokens; raise --input-len or the vocabulary")

    def _ids(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(self.min_token_id, self.vocab_size) for _ in range(n)]

    def _draw(self, rng: random.Random) -> Prompt:
        n, tok = self.input_len, self.tokenizer
        if self.endpoint == "chat" and tok is None:
            return " ".join(self._prefix_words + rng.choices(WORDS, k=n))
        ids = self._prefix_ids + self._ids(rng, n)
        if self.endpoint == "completions" or tok is None:
            return ids
        return tok.decode(tok.encode(tok.decode(ids), add_special_tokens=False).ids[:len(ids)])


def prompt_source(args: argparse.Namespace) -> PromptSource:
    """The run's prompts; --tokenizer (a folder or its tokenizer.json) sets the vocabulary."""
    shape = {"prefix_len": args.prefix_len, "seed": args.seed}
    if args.tokenizer is None:
        return PromptSource(args.endpoint, args.input_len, args.vocab_size, args.min_token_id,
                            **shape)
    path = Path(args.tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a missing or bad file
        raise BenchError(f"cannot load the tokenizer from {path}: {e}") from None
    # Without added (special) tokens, as Hugging Face's `vocab_size` and vLLM's random prompts.
    return PromptSource(args.endpoint, args.input_len, tokenizer.get_vocab_size(False),
                        args.min_token_id, tokenizer, **shape)


def arrival_times(n: int, request_rate: float, rng: random.Random,
                  burstiness: float = 1.0) -> list[float]:
    """Seconds from the level's start, as `vllm bench serve` schedules them: all 0 at an
    infinite rate, else gaps drawn from a gamma distribution of shape `burstiness` (1: a
    Poisson process; below 1 burstier, above more even) and mean 1 / rate, then scaled so
    that the last request leaves at n / rate (whatever the seed, the offered rate is the
    one asked for)."""
    if math.isinf(request_rate):
        return [0.0] * n
    times, t = [], 0.0
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
        times.append(t)
    scale = n / request_rate / times[-1] if times and times[-1] > 0 else 1.0
    return [time * scale for time in times]


def request_body(endpoint: str, model: str, prompt: Prompt, output_len: int,
                 temperature: float = 0.0) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": output_len, "temperature": temperature,
                            "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    body["messages" if endpoint == "chat" else "prompt"] = (
        [{"role": "user", "content": prompt}] if endpoint == "chat" else prompt)
    return body


def _error_message(text: str) -> str:
    """The `message` of an OpenAI error object (or of vLLM's older flat one), else the text."""
    try:
        payload = json.loads(text)
        error = payload.get("error", payload)
        return str(error["message"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return text[:300]


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any],
               input_len: int) -> RequestResult:
    """Stream one request; any failure comes back as `RequestResult.error`, never raised."""
    start = time.monotonic()
    ttft = last_choice = 0.0
    itl: list[float] = []
    num_chunks, usage, done = 0, None, False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(error=f"HTTP {response.status_code}: {_error_message(text)}")
            lines = response.aiter_lines()
            async for line in lines:
                now = time.monotonic() - start
                if not line.startswith("data:"):
                    continue  # blank separators, `: ping` comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk or chunk.get("object") == "error":
                    return RequestResult(error=f"error event: {_error_message(data)}")
                usage = chunk.get("usage") or usage
                if not chunk.get("choices"):
                    continue  # the usage chunk
                # Every chunk with choices, as `vllm bench serve` counts them: the first is
                # the first token, even a chat role's or one whose token has no text yet
                if num_chunks == 0:
                    ttft = now
                else:
                    itl.append(now - last_choice)
                last_choice, num_chunks = now, num_chunks + 1
            if done:
                await _drain(lines)
    except (httpx.HTTPError, ValueError) as e:  # transport failures, bad JSON in the stream
        return RequestResult(error=f"{type(e).__name__}: {e}")
    if not done:
        return RequestResult(error="the stream ended without [DONE]")
    if num_chunks == 0:
        return RequestResult(error="the stream carried no choices")
    usage = usage or {}
    return RequestResult(input_tokens=int(usage.get("prompt_tokens", input_len)),
                         output_tokens=int(usage.get("completion_tokens", num_chunks)),
                         ttft_seconds=ttft, e2e_seconds=last_choice, itl_seconds=tuple(itl))


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read a stream past its [DONE] to the body's end, for a second at most: a stream left
    before its end closes the connection instead of returning it to the pool, and every
    request then paid for a new one (on both sides of a bench that shares the server's
    machine). A server that keeps the stream open after [DONE] loses its connection, as
    before; nothing read after [DONE] counts."""
    async def read_all() -> None:
        async for _ in lines:
            pass

    try:  # wait_for, not asyncio.timeout: Python 3.10 has no timeout()
        await asyncio.wait_for(read_all(), DRAIN_SECONDS)
    except (asyncio.TimeoutError, httpx.HTTPError):
        pass


class Progress:
    """`label done/total [####....]` on stderr, redrawn in place with \\r; silent when off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.label, self.total, self.done, self.failed = enabled, "", 0, 0, 0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self.failed = label, total, 0, 0
        self.update(None)

    def update(self, ok: bool | None) -> None:
        self.done += ok is not None
        self.failed += ok is False
        if self.enabled:
            bar = ("#" * (30 * self.done // self.total)).ljust(30, ".")
            failed = f"  {self.failed} failed" if self.failed else ""
            sys.stderr.write(f"\r{self.label} {self.done}/{self.total} [{bar}]{failed}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stderr.write("\n")
        self.total = 0


async def check_server(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """The model to request: `model`, or the first one GET /v1/models lists."""
    url = f"{base_url}/v1/models"
    try:
        response = await client.get(url)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {e or type(e).__name__}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {url} answered {response.status_code}: "
                         f"{_error_message(response.text)}")
    try:
        ids = [str(card["id"]) for card in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{url} is not an OpenAI model list: {response.text[:200]}") from None
    if model is None and not ids:
        raise BenchError(f"{url} lists no models; pass --model")
    if model is not None and model not in ids:
        sys.stderr.write(f"warning: {url} lists {ids}, not {model!r}\n")
    return model or ids[0]


async def run_level(client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]],
                    arrivals: list[float], concurrency: int, input_len: int,
                    progress: Progress) -> LevelResult:
    """Send each body at its arrival time (seconds from now), at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)
    start = time.monotonic()

    async def one(body: dict[str, Any], at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        async with semaphore:
            result = await send(client, url, body, input_len)
        progress.update(result.error is None)
        return result

    results = await asyncio.gather(*(one(b, at) for b, at in zip(bodies, arrivals, strict=True)))
    return summarize(concurrency, results, time.monotonic() - start)


def endpoint_url(args: argparse.Namespace) -> tuple[str, str]:
    """The server's root (a trailing /v1 dropped) and the URL requests go to."""
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    return base_url, base_url + path


async def bench(args: argparse.Namespace, source: PromptSource,
                progress: Progress) -> tuple[str, list[LevelResult]]:
    """Check the server, warm it up, run each level; returns the model and the levels."""
    base_url, url = endpoint_url(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency),
                          max_keepalive_connections=max(args.concurrency))
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        model = await check_server(client, base_url, args.model)
        if not args.no_warmup:
            prompt = source.make(random.Random(f"{args.seed}:warmup"))
            body = request_body(args.endpoint, model, prompt, args.output_len, args.temperature)
            if (error := (await send(client, url, body, source.prompt_len)).error) is not None:
                raise BenchError(f"the warm-up request failed: {error}")
        levels = []
        for i, concurrency in enumerate(args.concurrency):
            rng = random.Random(f"{args.seed}:{i}")  # each level its own prompts and arrivals
            bodies = [request_body(args.endpoint, model, source.make(rng), args.output_len,
                                   args.temperature) for _ in range(args.num_prompts)]
            arrivals = arrival_times(len(bodies), args.request_rate, rng, args.burstiness)
            progress.start(f"concurrency {concurrency}", len(bodies))
            before = await bench_steps.snapshot(client, base_url)
            cpu = time.process_time()
            level = await run_level(client, url, bodies, arrivals, concurrency,
                                    source.prompt_len, progress)
            cpu = time.process_time() - cpu
            after = await bench_steps.snapshot(client, base_url)
            levels.append(replace(level, server_steps=bench_steps.decode_steps(before, after),
                                  client_cpu_seconds=cpu,
                                  prefix_cache=bench_steps.prefix_cache(before, after),
                                  step_kinds=bench_steps.step_kinds(before, after)))
            progress.close()
    return model, levels


HEADER = ("conc", "ok", "failed", "dur s", "req/s", "out tok/s", "tot tok/s", "ttft p50",
          "ttft p90", "ttft p99", "itl p50", "itl p90", "itl p99", "tpot mean", "tpot p50",
          "e2e p50", "e2e p99")


def _row(lv: LevelResult) -> list[str]:
    ttft, itl, tpot, e2el = lv.ttft_ms, lv.itl_ms, lv.tpot_ms, lv.e2el_ms
    return [str(lv.concurrency), str(lv.completed), str(lv.failed), f"{lv.duration_seconds:.2f}",
            f"{lv.request_throughput:.2f}", *(f"{x:.1f}" for x in (
                lv.output_throughput, lv.total_token_throughput, ttft.p50, ttft.p90, ttft.p99,
                itl.p50, itl.p90, itl.p99, tpot.mean, tpot.p50, e2el.p50, e2el.p99))]


def format_report(args: argparse.Namespace, model: str, levels: list[LevelResult]) -> str:
    done = sum(lv.completed for lv in levels)
    mean_in = sum(lv.total_input_tokens for lv in levels) / max(done, 1)
    prompt = f"{args.input_len} prompt tokens"
    if args.prefix_len:
        prompt = (f"{args.prefix_len} + {prompt} (the first {args.prefix_len} the same in "
                  "every request)")
    lines = [f"{model} at {endpoint_url(args)[1]}: {args.num_prompts} requests per level, "
             f"{prompt} ({mean_in:.0f} counted by the server), "
             f"{args.output_len} output tokens, temperature {args.temperature:g}, "
             f"request rate {args.request_rate:g}/s"
             + (f" (burstiness {args.burstiness:g})" if args.burstiness != 1 else "")
             + "; times in ms"]
    lines += ["  ".join(cell.rjust(9) for cell in row) for row in [HEADER, *map(_row, levels)]]
    lines += [f"concurrency {lv.concurrency}: {lv.failed} failed, first error: {lv.first_error}"
              for lv in levels if lv.failed]
    lines += [f"concurrency {lv.concurrency}, the server's decode steps (its /metrics): "
              f"{st.decode_steps}, forward {st.forward_ms:.2f} ms, outside it {st.outside_ms:.2f} "
              f"ms ({st.outside_share:.1%} of a step)"
              for lv in levels if (st := lv.server_steps) is not None]
    lines += [f"concurrency {lv.concurrency}, the server's steps (its /metrics): {sk.decode} "
              f"decode only, {sk.mixed} with prompts beside decode rows, {sk.prefill} prompts "
              "only" for lv in levels if (sk := lv.step_kinds) is not None]
    lines += [f"concurrency {lv.concurrency}, the server's prefix cache (its /metrics): "
              f"{pc.hits} of the {pc.queries} prompt tokens looked up found ({pc.hit_rate:.1%})"
              for lv in levels if (pc := lv.prefix_cache) is not None]
    lines += [f"concurrency {lv.concurrency}, this client's CPU: {cpu:.2f} s, "
              f"{cpu / lv.duration_seconds:.0%} of a core (on the server's machine, taken from "
              f"the server)" for lv in levels
              if (cpu := lv.client_cpu_seconds) is not None and lv.duration_seconds > 0]
    return "\n".join(lines) + "\n"


def write_json(path: Path, args: argparse.Namespace, model: str, source: PromptSource,
               levels: list[LevelResult]) -> None:
    """Every figure and the run's parameters (never the API key)."""
    params = {key: getattr(args, key) for key in (
        "base_url", "endpoint", "input_len", "prefix_len", "output_len", "num_prompts",
        "concurrency", "temperature", "seed", "tokenizer", "min_token_id", "no_warmup",
        "burstiness")}
    params.update(model=model, vocab_size=source.vocab_size,
                  request_rate=None if math.isinf(args.request_rate) else args.request_rate)
    path.write_text(json.dumps({"parameters": params, "levels": [asdict(lv) for lv in levels]},
                               indent=2) + "\n")


def _positive(cast: Callable[[str], float], finite: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = cast(text)
        if not value > 0 or (finite and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be > 0{' and finite' if finite else ''}, "
                                             f"got {text}")
        return value
    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):  # JSON has no inf or NaN
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(int)(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None


def add_bench_parser(subparsers: Any) -> None:
    """Add the `bench` subcommand and its flags to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="measure a running OpenAI-compatible server",
        description="Stream random prompts to a running OpenAI-compatible server (ours or "
        "vLLM's) at each concurrency level in turn and report TTFT, ITL, TPOT, E2E latency "
        "and throughput as `vllm bench serve` defines them.")
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model id to request (default: the first in /v1/models)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--input-len", type=_positive(int), default=1024, help="prompt tokens")
    p.add_argument("--prefix-len", "--random-prefix-len", type=_non_negative, default=0,
                   help="tokens before the --input-len random ones, the same in every prompt "
                   "of the run (a shared system prompt; vLLM's --random-prefix-len)")
    p.add_argument("--output-len", type=_positive(int), default=128, help="tokens per request")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sampling temperature of every request (0: greedy, as vllm bench serve)")
    p.add_argument("--num-prompts", type=_positive(int), default=100, help="requests per level")
    p.add_argument("--concurrency", type=_levels, default=(1,),
                   help="most requests in flight, one level after another, e.g. 1,4,16")
    p.add_argument("--request-rate", type=_positive(float), default=math.inf,
                   help="arrivals per second, a Poisson process (default inf: all at once)")
    p.add_argument("--burstiness", type=_positive(float, finite=True), default=1.0,
                   help="with --request-rate: the shape of the gamma distribution of the gaps "
                   "(1: Poisson; below 1 burstier, above more even; vLLM's)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (or the file): sets the "
                   "vocabulary; chat prompts are its decoded text")
    p.add_argument("--vocab-size", type=_positive(int), default=32000,
                   help="token ids are drawn below this without --tokenizer")
    p.add_argument("--min-token-id", type=int, default=10, help="smallest token id drawn")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    p.add_argument("--timeout", type=_positive(float), default=600.0,
                   help="seconds a request may wait for its next byte")
    p.add_argument("--json", type=Path, help="also write every figure and the parameters here")
    p.add_argument("--no-warmup", action="store_true", help="skip the uncounted first request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (uvicorn[standard] brings it on Linux and
    macOS): the client shares the machine with the server it measures, and with the default
    loop it spent 20% more CPU per streamed token (1.55 against 1.31 s for 8192 tokens)."""
    try:
        from uvloop import run  # uvloop 0.18 and later
    except ImportError:
        return asyncio.run(main)
    return run(main)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 0: every request succeeded, 1: some failed, 2: it could not run."""
    progress = Progress(enabled=not args.no_progress and sys.stderr.isatty())
    try:
        source = prompt_source(args)
        model, levels = run_loop(bench(args, source, progress))
        if args.json:
            write_json(args.json, args, model, source, levels)
    except (BenchError, OSError) as e:
        progress.close()
        sys.stderr.write(f"llama-serve bench: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        progress.close()
        return 130
    sys.stdout.write(format_report(args, model, levels))
    return 1 if any(level.failed for level in levels) else 0
