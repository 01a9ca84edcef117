"""`llama-serve bench` against the shared server, and its figures on synthetic timings."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server import bench_steps
from server.bench import (
    BenchError,
    PromptSource,
    RequestResult,
    add_bench_parser,
    arrival_times,
    percentile,
    request_body,
    run_bench,
    run_loop,
    send,
    summarize,
)
from tests.api.conftest import API_KEY, Server, free_port


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llama-serve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return run_bench(parser.parse_args(["bench", "--no-progress", *argv]))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_counts_every_token(server: Server, tiny_checkpoint: Path, tmp_path: Path,
                                  endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = bench("--base-url", server.base_url, "--api-key", API_KEY, "--endpoint", endpoint,
               "--num-prompts", "6", "--concurrency", "1,3", "--input-len", "16",
               "--output-len", "8", "--tokenizer", str(tiny_checkpoint), "--json", str(out),
               "--temperature", "0.7")
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "ttft p50" in stdout and "temperature 0.7" in stdout
    report = json.loads(out.read_text())
    assert report["parameters"]["model"] == "tiny"
    assert report["parameters"]["temperature"] == 0.7
    assert "api_key" not in report["parameters"]
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert (level["completed"], level["failed"]) == (6, 0)
        assert level["total_output_tokens"] == 6 * 8
        if endpoint == "completions":  # token ids go in as given; chat adds its template
            assert level["total_input_tokens"] == 6 * 16
        for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2el_ms"):
            stats = level[name]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (name, stats)
        assert level["ttft_ms"]["p99"] <= level["e2el_ms"]["p99"]
        steps = level["server_steps"]  # from the server's /metrics (a CPU server)
        assert steps["decode_steps"] > 0 and steps["forward_ms"] > 0
        assert 0 < steps["outside_share"] < 1
    # One stream: every decode step is decode-only, 7 a request (after the first's token),
    # and each prompt prefilled alone.
    assert report["levels"][0]["server_steps"]["decode_steps"] == 6 * 7
    assert report["levels"][0]["step_kinds"] == {"decode": 6 * 7, "mixed": 0, "prefill": 6}
    kinds = report["levels"][1]["step_kinds"]  # three at once: prompts beside decode rows
    assert kinds["mixed"] + kinds["prefill"] >= 2 and kinds["decode"] > 0
    assert "concurrency 3, the server's decode steps (its /metrics): " in stdout
    assert "concurrency 1, the server's steps (its /metrics): 42 decode only, 0 with " \
        "prompts beside decode rows, 6 prompts only" in stdout
    # the client's own CPU, which a server on the same machine loses
    assert all(0 < level["client_cpu_seconds"] < 4 * level["duration_seconds"] + 1
               for level in report["levels"])  # the level's own, not the process's so far
    assert "concurrency 3, this client's CPU: " in stdout and "of a core" in stdout


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of `target`, on a thread of its own: counts the
    connections it accepts."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target_port, self.port, self.accepted = int(port), 0, 0
        self.loop = asyncio.new_event_loop()
        self.writers: list[asyncio.StreamWriter] = []
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
            self.writers += [writer, up_writer]
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                                 return_exceptions=True)

        async def main() -> None:
            self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def test_the_client_keeps_its_connections(server: Server, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """Each stream is read to its end, so its connection goes back to the pool: a level of
    concurrency 2 opens two connections, not one a request (left at [DONE], a stream's
    connection was closed, and both sides paid for a new one every request)."""
    proxy = CountingProxy(server.base_url)
    try:
        rc = bench("--base-url", proxy.base_url, "--api-key", API_KEY, "--num-prompts", "8",
                   "--concurrency", "2", "--input-len", "8", "--output-len", "2",
                   "--vocab-size", "1000")
    finally:
        proxy.close()
    assert rc == 0, capsys.readouterr().out
    assert 1 <= proxy.accepted <= 2


def _send_to_raw_stream(events: list[str], gap_seconds: float) -> RequestResult:
    """`send` against a bare HTTP server that answers with these SSE events, `gap_seconds`
    apart, and then closes the connection."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()).strip():
            pass  # the request's headers (its body is never read)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for event in events:
            data = event.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(gap_seconds)
        writer.write(b"0\r\n\r\n")
        writer.close()

    async def main() -> RequestResult:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient(timeout=30) as client:
            return await asyncio.wait_for(
                send(client, f"http://127.0.0.1:{port}/v1/completions", {}, 4), timeout=10)

    return asyncio.run(main())


def _chunk(text: str, finish_reason: str | None = None) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text,
                                               "finish_reason": finish_reason}],
                                  "usage": {"prompt_tokens": 4, "completion_tokens": 1}}) + "\n\n"


def test_a_stream_kept_open_after_done_still_completes() -> None:
    """A server that keeps streaming keep-alive comments after [DONE]: the request counts as
    done after at most DRAIN_SECONDS of reading on (the connection is then dropped)."""
    result = _send_to_raw_stream([_chunk("x"), "data: [DONE]\n\n", *[": ping\n\n"] * 100],
                                 gap_seconds=0.05)
    assert result.error is None and result.output_tokens == 1


def test_a_token_with_no_text_yet_is_served_not_failed() -> None:
    """One output token that ends inside a character: its only chunk has empty text. The
    request succeeded (as `vllm bench serve` counts it), its first token at that chunk."""
    result = _send_to_raw_stream([": ping\n\n", _chunk("", "length"), "data: [DONE]\n\n"],
                                 gap_seconds=0.1)
    assert result.error is None and result.output_tokens == 1
    assert 0.1 <= result.ttft_seconds <= result.e2e_seconds and result.itl_seconds == ()


def test_a_stream_with_no_choices_failed() -> None:
    result = _send_to_raw_stream([": ping\n\n", "data: [DONE]\n\n"], gap_seconds=0)
    assert result.error == "the stream carried no choices"


def test_a_shared_prefix_comes_from_the_cache(server: Server, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--prefix-len 40: one request at a time, each finds the 40 tokens its predecessor's slot
    holds (the warm-up's, for the first), and the report says so from the server's /metrics."""
    out = tmp_path / "bench.json"
    rc = bench("--base-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "4",
               "--prefix-len", "40", "--input-len", "8", "--output-len", "2",
               "--vocab-size", "1000", "--json", str(out))
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "40 + 8 prompt tokens (the first 40 the same in every request)" in stdout
    report = json.loads(out.read_text())
    assert report["parameters"]["prefix_len"] == 40
    [level] = report["levels"]
    assert level["total_input_tokens"] == 4 * 48
    assert level["prefix_cache"] == {"queries": 4 * 48, "hits": 4 * 40}
    assert "concurrency 1, the server's prefix cache (its /metrics): 160 of the 192 prompt " \
           "tokens looked up found (83.3%)" in stdout


def test_prompts_share_the_prefix_and_nothing_after_it() -> None:
    source = PromptSource("completions", input_len=6, vocab_size=1000, min_token_id=10,
                          prefix_len=20, seed=1)
    prompts = [source.make(random.Random(i)) for i in range(5)]
    assert source.prompt_len == 26 and all(len(p) == 26 for p in prompts)
    assert len({tuple(p[:20]) for p in prompts}) == 1  # the one prefix of the run
    assert len({tuple(p[20:]) for p in prompts}) == 5
    other = PromptSource("completions", input_len=6, vocab_size=1000, min_token_id=10,
                         prefix_len=20, seed=2)
    assert other.make(random.Random(0))[:20] != prompts[0][:20]  # another seed, another prefix
    chat = PromptSource("chat", input_len=3, vocab_size=1000, min_token_id=10, prefix_len=4)
    words = [chat.make(random.Random(i)).split() for i in range(3)]
    assert all(len(w) == 7 and w[:4] == words[0][:4] for w in words)


def test_prefix_cache_counters_from_ours_or_vllms_names() -> None:
    ours = bench_steps.parse_snapshot("# TYPE llama_serve_prefix_cache_hits_total counter\n"
                          "llama_serve_prefix_cache_hits_total 30.0\n"
                          "# TYPE llama_serve_prefix_cache_queries_total counter\n"
                          "llama_serve_prefix_cache_queries_total 100.0\n"
                          "# TYPE vllm:prefix_cache_hits_total counter\n"
                          'vllm:prefix_cache_hits_total{model_name="m"} 30.0\n')
    assert ours == {"hits": 30.0, "queries": 100.0}  # ours, not both added up
    vllm = bench_steps.parse_snapshot("# TYPE vllm:prefix_cache_hits_total counter\n"
                          'vllm:prefix_cache_hits_total{model_name="m"} 70.0\n'
                          "# TYPE vllm:prefix_cache_queries_total counter\n"
                          'vllm:prefix_cache_queries_total{model_name="m"} 90.0\n')
    assert vllm == {"hits": 70.0, "queries": 90.0}
    older = bench_steps.parse_snapshot("# TYPE vllm:gpu_prefix_cache_hits_total counter\n"
                                       'vllm:gpu_prefix_cache_hits_total{model_name="m"} 5\n'
                                       "# TYPE vllm:gpu_prefix_cache_queries_total counter\n"
                                       'vllm:gpu_prefix_cache_queries_total{model_name="m"} 9\n')
    assert older == {"hits": 5.0, "queries": 9.0}  # vLLM's older names
    assert bench_steps.prefix_cache(ours, {"hits": 50.0, "queries": 140.0}) == \
        bench_steps.PrefixCache(queries=40, hits=20)
    assert bench_steps.prefix_cache(ours, ours) is None  # nothing looked up in between
    assert bench_steps.prefix_cache(None, ours) is None
    assert bench_steps.prefix_cache({"forward_sum": 1.0}, ours) is None


@pytest.mark.parametrize("value", ["-1", "x"])
def test_bad_prefix_len_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench("--base-url", "http://127.0.0.1:1", "--prefix-len", value)
    assert exit_info.value.code == 2 and "--prefix-len" in capsys.readouterr().err


def test_request_body_streams_exactly_output_len_tokens_at_the_temperature() -> None:
    body = request_body("completions", "m", [5, 6, 7], 9, temperature=0.7)
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 9
    assert body["temperature"] == 0.7 and body["ignore_eos"] and body["stream"]
    assert request_body("chat", "m", "hi", 9)["temperature"] == 0.0  # greedy by default


@pytest.mark.parametrize(("flag", "value"), [
    *[("--temperature", v) for v in ("-0.5", "nan", "inf", "hot")],
    *[("--burstiness", v) for v in ("0", "-1", "nan", "inf")],
])
def test_bad_temperature_or_burstiness_is_a_usage_error(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench("--base-url", "http://127.0.0.1:1", flag, value)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_unreachable_server_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert bench("--base-url", url, "--num-prompts", "2") == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}/v1/models" in err
    assert "Traceback" not in err


def test_wrong_api_key_is_a_clean_error(server: Server,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert bench("--base-url", server.base_url, "--api-key", "wrong", "--num-prompts", "2") == 2
    assert "answered 401" in capsys.readouterr().err


def test_failed_requests_are_counted_not_raised(server: Server, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Prompts longer than the server's 512-token context: every request gets a 400."""
    out = tmp_path / "bench.json"
    rc = bench("--base-url", server.base_url, "--api-key", API_KEY, "--no-warmup",
               "--num-prompts", "3", "--concurrency", "2", "--input-len", "600",
               "--output-len", "4", "--vocab-size", "1000", "--json", str(out))
    assert rc == 1
    (level,) = json.loads(out.read_text())["levels"]
    assert (level["completed"], level["failed"]) == (0, 3)
    assert level["first_error"].startswith("HTTP 400")
    assert "first error: HTTP 400" in capsys.readouterr().out


def test_the_client_runs_on_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop (from uvicorn[standard]) when it imports, the default loop when it does not."""
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run_loop(loop_type()) is uvloop.Loop
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert not issubclass(run_loop(loop_type()), uvloop.Loop)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # numpy.percentile(values, [0, 50, 90, 99, 100])
    assert [percentile(values, p) for p in (0, 50, 90, 99, 100)] == pytest.approx(
        [1.0, 2.5, 3.7, 3.97, 4.0])
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


def test_summary_follows_vllm_definitions() -> None:
    results = [
        RequestResult(input_tokens=10, output_tokens=5, ttft_seconds=0.1, e2e_seconds=0.5,
                      itl_seconds=(0.1, 0.1, 0.1, 0.1)),
        RequestResult(input_tokens=10, output_tokens=3, ttft_seconds=0.3, e2e_seconds=0.7,
                      itl_seconds=(0.2, 0.2)),
        RequestResult(input_tokens=10, output_tokens=1, ttft_seconds=0.2, e2e_seconds=0.2),
        RequestResult(error="HTTP 503: overloaded"),
        RequestResult(error="the stream ended without [DONE]"),
    ]
    level = summarize(4, results, duration_seconds=2.0)
    assert (level.completed, level.failed) == (3, 2)
    assert level.first_error == "HTTP 503: overloaded"
    assert (level.total_input_tokens, level.total_output_tokens) == (30, 9)
    assert level.request_throughput == pytest.approx(1.5)
    assert level.output_throughput == pytest.approx(4.5)
    assert level.total_token_throughput == pytest.approx(19.5)
    assert level.ttft_ms.mean == pytest.approx(200.0)
    assert level.ttft_ms.p50 == pytest.approx(200.0)
    assert level.ttft_ms.p90 == pytest.approx(280.0)
    # TPOT: (0.5-0.1)/4 and (0.7-0.3)/2; the one-token request has none.
    assert level.tpot_ms.mean == pytest.approx(150.0)
    assert level.tpot_ms.p50 == pytest.approx(150.0)
    # ITL: the six gaps pooled, not per-request means.
    assert level.itl_ms.mean == pytest.approx(400 / 3)
    assert level.itl_ms.p50 == pytest.approx(100.0)
    assert level.itl_ms.p99 == pytest.approx(200.0)
    assert level.e2el_ms.p50 == pytest.approx(500.0)


def test_prompts_never_repeat_within_a_run() -> None:
    """3 token ids from {10, 11}: 8 distinct prompts exist, a 9th must not be a repeat."""
    source = PromptSource("completions", input_len=3, vocab_size=12, min_token_id=10)
    prompts = [source.make(random.Random(i)) for i in range(8)]
    assert len({tuple(p) for p in prompts}) == 8
    assert all(len(p) == 3 and set(p) <= {10, 11} for p in prompts)
    with pytest.raises(BenchError, match="distinct prompts"):
        source.make(random.Random(0))
    chat = PromptSource("chat", input_len=5, vocab_size=100, min_token_id=10)
    assert len(chat.make(random.Random(0)).split()) == 5


@pytest.mark.parametrize("burstiness", [1.0, 0.3, 4.0])
def test_arrivals_are_seeded_increasing_and_at_the_rate_asked(burstiness: float) -> None:
    """As `vllm bench serve` schedules them: the last request leaves at n / rate whatever the
    seed; the gaps spread less the higher the burstiness (1: a Poisson process)."""
    times = arrival_times(200, 50.0, random.Random(1), burstiness)
    assert times == arrival_times(200, 50.0, random.Random(1), burstiness)
    assert all(a < b for a, b in zip(times, times[1:], strict=False))
    for seed in range(5):
        assert arrival_times(200, 50.0, random.Random(seed), burstiness)[-1] == pytest.approx(4.0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    spread = statistics.pstdev(gaps) / statistics.mean(gaps)  # 1 / sqrt(burstiness)
    assert spread == pytest.approx(burstiness ** -0.5, rel=0.35)
    assert arrival_times(3, math.inf, random.Random(1)) == [0.0, 0.0, 0.0]


def test_every_chunk_with_choices_is_a_token_as_vllm_counts_them() -> None:
    """A chat role's chunk, a token with no text yet, a finish alone: each chunk with choices
    counts (the first as the first token), as `vllm bench serve` counts them; the usage chunk
    does not."""
    role = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                     "content": ""}}]}) + "\n\n"
    usage = "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 4,
                                                            "completion_tokens": 3}}) + "\n\n"
    result = _send_to_raw_stream([role, _chunk("a"), _chunk(""), _chunk("", "stop"), usage,
                                  "data: [DONE]\n\n"], gap_seconds=0.05)
    assert result.error is None and result.output_tokens == 3
    # the first token at the role's chunk: three gaps of 0.05 s follow it (0.1 s after "a")
    assert len(result.itl_seconds) == 3
    assert result.e2e_seconds - result.ttft_seconds >= 0.14


def test_server_steps_from_two_snapshots() -> None:
    forward, gap = bench_steps.FORWARD, bench_steps.GAP
    before = {f"{forward}_sum": 1.0, f"{forward}_count": 100, f"{gap}_sum": 0.2,
              f"{gap}_count": 99}
    after = {f"{forward}_sum": 1.9, f"{forward}_count": 200, f"{gap}_sum": 0.3,
             f"{gap}_count": 199}
    steps = bench_steps.decode_steps(before, after)
    assert steps is not None and steps.decode_steps == 100
    assert math.isclose(steps.forward_ms, 9.0) and math.isclose(steps.outside_ms, 1.0)
    assert math.isclose(steps.outside_share, 0.1)
    assert bench_steps.decode_steps(before, before) is None  # no step in between
    assert bench_steps.decode_steps(None, after) is None


def test_servers_without_step_metrics_give_none() -> None:
    """vLLM's /metrics (other series), a server without /metrics, one that is not Prometheus."""
    pages = {"vllm": (200, "# TYPE vllm:num_requests_running gauge\n"
                             "vllm:num_requests_running{model_name=\"m\"} 0.0\n"),
             "none": (404, "not found"), "html": (200, "<html>{{ not metrics")}

    async def main() -> list[object]:
        results = []
        for status, text in pages.values():
            transport = httpx.MockTransport(lambda _, s=status, t=text: httpx.Response(s, text=t))
            async with httpx.AsyncClient(transport=transport) as client:
                results.append(await bench_steps.snapshot(client, "http://x"))
        return results

    assert asyncio.run(main()) == [None, None, None]
