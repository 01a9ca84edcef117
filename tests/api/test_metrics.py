"""/metrics moves exactly as a known workload says it should."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.metrics import Metrics
from server.outputs import FinishedStats, IterationStats
from tests.api.conftest import Server, parse_metrics, run_server


def wait_for(server: Server, key: str, value: float) -> dict[str, float]:
    deadline = time.monotonic() + 10
    while True:
        samples = server.metrics()
        if samples.get(key) == value or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.fixture(scope="module")
def metrics_server(long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Server]:
    # A 4096-token context: a held stream is still generating when the test reads /metrics.
    with run_server(long_context_checkpoint, tmp_path_factory.mktemp("metrics"),
                    "--metrics-compat", "vllm", "--served-model-name", "m", "--max-num-seqs",
                    "4", "--enable-prompt-tokens-details") as server:
        yield server


def test_counters_and_histograms_follow_a_known_workload(metrics_server: Server) -> None:
    before = metrics_server.metrics()
    assert before["llama_serve_kv_cache_slots_total"] == 4
    assert before["llama_serve_prompt_tokens_total"] == 0
    # vLLM's histograms, at 0 from the start (an idle replica's panels read 0, not "no
    # data"), on vLLM's buckets (queries on its `le` values find their series)
    for name, top in [("time_to_first_token_seconds", "2560.0"),
                      ("inter_token_latency_seconds", "80.0"),
                      ("e2e_request_latency_seconds", "7680.0")]:
        assert before[f'vllm:{name}_count{{model_name="m"}}'] == 0
        assert before[f'vllm:{name}_bucket{{le="{top}",model_name="m"}}'] == 0
    assert 'vllm:inter_token_latency_seconds_bucket{le="0.025",model_name="m"}' in before
    assert 'llama_serve_e2e_request_latency_seconds_bucket{le="7680.0"}' in before
    for n_prompt, n_out in [(5, 3), (7, 4), (9, 5)]:
        r = httpx.post(f"{metrics_server.v1}/completions", json={
            "prompt": list(range(10, 10 + n_prompt)), "max_tokens": n_out, "ignore_eos": True})
        assert r.status_code == 200
    m = wait_for(metrics_server, "llama_serve_e2e_request_latency_seconds_count", 3)
    assert m["llama_serve_prompt_tokens_total"] == 21
    assert m["llama_serve_generation_tokens_total"] == 12
    assert m['llama_serve_requests_finished_total{finish_reason="length"}'] == 3
    assert m["llama_serve_time_to_first_token_seconds_count"] == 3
    assert m["llama_serve_inter_token_latency_seconds_count"] == 2 + 3 + 4
    assert m["llama_serve_request_queue_time_seconds_count"] == 3
    assert m["llama_serve_request_prompt_tokens_sum"] == 21
    assert m["llama_serve_request_generation_tokens_sum"] == 12
    assert m["llama_serve_step_batch_size_count"] >= 12
    # Where the steps' time went: one prefill and n_out - 1 decode steps a request, one after
    # another. A gap counts between two steps of one kind, never across an idle wait: none
    # before a prefill, none before the first decode step after it.
    forward, gap = "llama_serve_step_forward_seconds", "llama_serve_step_gap_seconds"
    assert m[f'{forward}_count{{kind="prefill"}}'] == 3
    assert m[f'{forward}_count{{kind="decode"}}'] == 2 + 3 + 4
    assert m[f'{gap}_count{{kind="decode"}}'] == 1 + 2 + 3
    assert m[f'{gap}_count{{kind="prefill"}}'] == m[f'{forward}_count{{kind="mixed"}}'] == 0
    # The steps by kind, on every device (the forward's times are CPU only)
    steps = "llama_serve_engine_steps_total"
    assert m[f'{steps}{{kind="prefill"}}'] == 3
    assert m[f'{steps}{{kind="decode"}}'] == 2 + 3 + 4
    assert m[f'{steps}{{kind="mixed"}}'] == 0
    assert 0 < m[f'{forward}_sum{{kind="decode"}}'] and 0 < m[f'{gap}_sum{{kind="decode"}}']
    assert m["llama_serve_generation_throughput_tokens_per_second"] > 0
    for gauge in ("requests_running", "requests_waiting", "kv_cache_slots_used",
                  "kv_cache_tokens_used", "kv_cache_usage_ratio"):
        assert m[f"llama_serve_{gauge}"] == 0, gauge
    assert m["llama_serve_kv_cache_tokens_capacity"] == 4 * 4096
    # vLLM's names, labelled with the model name.
    assert m['vllm:prompt_tokens_total{model_name="m"}'] == 21
    assert m['vllm:generation_tokens_total{model_name="m"}'] == 12
    assert m['vllm:e2e_request_latency_seconds_count{model_name="m"}'] == 3
    assert m['vllm:time_to_first_token_seconds_count{model_name="m"}'] == 3
    assert m['vllm:num_requests_running{model_name="m"}'] == 0
    assert 'vllm:kv_cache_usage_perc{model_name="m"}' in m


def test_occupancy_while_running_and_rejections(metrics_server: Server) -> None:
    """One request of n=2 in flight: one request running, two slots; vLLM's names count it as
    vLLM runs it, as two requests (one a sample)."""
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{metrics_server.v1}/completions",
            json={"prompt": [10, 11, 12], "max_tokens": 4000, "ignore_eos": True, "n": 2,
                  "stream": True}) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        m = metrics_server.metrics()
        assert m["llama_serve_requests_running"] == 1
        assert m["llama_serve_kv_cache_slots_used"] == 2
        assert m["llama_serve_kv_cache_tokens_used"] >= 6
        assert m['vllm:num_requests_running{model_name="m"}'] == 2
        assert m['vllm:num_requests_waiting{model_name="m"}'] == 0
    m = wait_for(metrics_server, "llama_serve_kv_cache_slots_used", 0)
    assert m["llama_serve_kv_cache_slots_used"] == 0
    assert m['llama_serve_requests_finished_total{finish_reason="abort"}'] == 2  # a sample each
    before = m.get('llama_serve_requests_rejected_total{reason="invalid_request"}', 0)
    assert httpx.post(f"{metrics_server.v1}/completions",
                      json={"prompt": "x", "temperature": -1}).status_code == 400
    rejected = 'llama_serve_requests_rejected_total{reason="invalid_request"}'
    after = metrics_server.metrics()[rejected]
    assert after == before + 1
    assert not [k for k in metrics_server.metrics() if re.search(r"request_id|prompt=", k)]


def test_vllm_prompt_tokens_count_each_sample(metrics_server: Server) -> None:
    """vLLM runs each of n samples as a request and counts its prompt for each; ours counts
    the prompt once (it is computed once)."""
    ours, theirs = "llama_serve_prompt_tokens_total", 'vllm:prompt_tokens_total{model_name="m"}'
    before = metrics_server.metrics()
    r = httpx.post(f"{metrics_server.v1}/completions",
                   json={"prompt": list(range(600, 605)), "max_tokens": 2, "n": 3})
    assert r.status_code == 200, r.text
    after = metrics_server.metrics()
    assert after[ours] - before[ours] == 5
    assert after[theirs] - before[theirs] == 3 * 5


def prefix_counters(server: Server) -> tuple[float, float]:
    m = server.metrics()
    return m["llama_serve_prefix_cache_queries_total"], m["llama_serve_prefix_cache_hits_total"]


def test_prefix_cache_counters_follow_a_known_workload(metrics_server: Server,
                                                       tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    """A 40-token prompt, the same again (all but its last token from the cache), then it and
    two more tokens (all of it); counted in prompt tokens, as vLLM counts them, and in each
    response's usage (--enable-prompt-tokens-details), streamed or not."""
    prompt = list(range(500, 540))  # no other test's tokens: nothing else in the cache matches
    queries, hits = prefix_counters(metrics_server)
    turns = ((prompt, False, 0), (prompt, True, 39), (prompt + [7, 8], False, 40))
    for ids, stream, cached in turns:
        r = httpx.post(f"{metrics_server.v1}/completions",
                       json={"prompt": ids, "max_tokens": 1, "temperature": 0, "stream": stream,
                             "stream_options": {"include_usage": True} if stream else None})
        assert r.status_code == 200, r.text
        usage = (json.loads(r.text.split("data: ")[-2]) if stream else r.json())["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": cached}
    assert prefix_counters(metrics_server) == (queries + 40 + 40 + 42, hits + 39 + 40)
    m = metrics_server.metrics()
    assert m['vllm:prefix_cache_hits_total{model_name="m"}'] == hits + 79
    assert m['vllm:prefix_cache_queries_total{model_name="m"}'] == queries + 122
    with run_server(tiny_checkpoint, tmp_path, "--no-enable-prefix-caching") as plain:
        for ids in (prompt, prompt):
            r = httpx.post(f"{plain.v1}/completions", json={"prompt": ids, "max_tokens": 1})
            assert "prompt_tokens_details" not in r.json()["usage"]  # without the flag
        assert prefix_counters(plain) == (0, 0)


def test_conversations_taking_turns_keep_their_caches(metrics_server: Server) -> None:
    """Two conversations take turns: each next turn finds all of its last one in the cache,
    though the other ran in between (a new request takes a slot that holds no cache, or the
    oldest cache, not the one just left)."""
    def cached(ids: list[int]) -> int:
        r = httpx.post(f"{metrics_server.v1}/completions",
                       json={"prompt": ids, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    a, b = list(range(600, 640)), list(range(700, 740))  # no other test's tokens
    assert [cached(a), cached(b), cached(a + [7, 8]), cached(b + [7, 8])] == [0, 0, 40, 40]


def test_process_and_garbage_collector_series(metrics_server: Server) -> None:
    """The process_* and python_gc_* series every Python exporter has, from the server's own
    process; and start-up froze its objects out of the collector's walks (server/memory.py)."""
    m = metrics_server.metrics()
    assert m["process_resident_memory_bytes"] > 50e6
    assert m["process_cpu_seconds_total"] > 0
    assert 'python_gc_collections_total{generation="2"}' in m
    frozen = re.search(r"(\d+) start-up objects left out of garbage collection",
                       metrics_server.log())
    assert frozen is not None and int(frozen.group(1)) > 10_000


def test_a_request_never_admitted_has_no_queue_time() -> None:
    """Aborted while waiting, a request never had a slot: its end-to-end time counts, a queue
    time does not (vLLM leaves it out too), so that the queue's histogram reads admissions."""
    metrics = Metrics("m")
    metrics.observe(IterationStats(finished=[FinishedStats(2.0, None, 30, 0),
                                             FinishedStats(3.0, 0.5, 30, 4)]))
    m = parse_metrics(metrics.render().decode())
    assert m["llama_serve_e2e_request_latency_seconds_count"] == 2
    assert m["llama_serve_request_queue_time_seconds_count"] == 1
    assert m["llama_serve_request_queue_time_seconds_sum"] == 0.5
