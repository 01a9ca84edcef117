"""Prometheus metrics, one registry per app, fed from the engine's plain stats. No torch.

Gauges and counters are read from the engine's `stats()` at scrape time; histograms are fed
through `observe()` once per step (on the engine thread, or the reader of an engine process).
Names: `llama_serve_*`, base units, `_total` on counters. `--metrics-compat vllm` adds vLLM's
names for the series that autoscalers and dashboards read.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine_front import STEP_KINDS, EngineFront, EngineStats
from server.outputs import IterationStats
from server.request import FinishReason

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
THROUGHPUT_WINDOW_SECONDS = 10.0

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
# A request's whole life, or its wait: long generations on a CPU run for many minutes
REQUEST_BUCKETS = LATENCY_BUCKETS + (320.0, 640.0, 1280.0, 2560.0, 7680.0)
# vLLM's own buckets for its names (v1/metrics/loggers.py), so that queries on its `le`
# values find their series
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
STEP_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                1.0, 2.0)


class Metrics:
    def __init__(self, model_name: str, compat: str | None = None,
                 lora: bool = False, max_loras: int | None = None) -> None:
        self.model_name = model_name
        self.compat = compat
        self.lora, self.max_loras = lora, max_loras  # (vllm:lora_requests_info)
        self.registry = CollectorRegistry()
        self._engine: EngineFront | None = None
        self._rejected: dict[str, int] = {}
        self._window: deque[tuple[float, int, int]] = deque()  # (time, prompt, generation)
        # The engine thread appends while a scrape iterates: iterating a deque that another
        # thread mutates raises, so both sides hold this lock.
        self._window_lock = threading.Lock()
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"llama_serve_{name}", doc, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between output tokens.",
                        LATENCY_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to admission into a slot "
                          "(requests never admitted, aborted while waiting, are left out).",
                          REQUEST_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt length per request.",
                               LENGTH_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Output tokens per request.",
                            LENGTH_BUCKETS)
        self.batch = hist("step_batch_size", "Sequences per engine step.", BATCH_BUCKETS)
        # Where a step's time goes (CPU, where the forward runs as it is called): their sums
        # per kind give the share of a decode step spent outside the model.
        forward = Histogram(
            "llama_serve_step_forward_seconds", "The model's forward, by step kind (CPU).",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        gap = Histogram(
            "llama_serve_step_gap_seconds", "From the end of one forward to the start of the "
            "next of the same kind while busy: sampling, outputs, HTTP, scheduling (CPU).",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        # Every kind's series from the start (at 0), so that a reader's first snapshot has them.
        self.step_times = {kind: (forward.labels(kind), gap.labels(kind))
                           for kind in ("decode", "mixed", "prefill")}
        self.compat_hists: list[Histogram] = []  # TTFT, ITL, E2E: our model name's series
        if compat == "vllm":
            def vllm_hist(name: str, doc: str, buckets: tuple) -> Histogram:
                family = Histogram(f"vllm:{name}", doc, ["model_name"], buckets=buckets,
                                   registry=r)
                return family.labels(model_name=model_name)  # at 0 from the start, as vLLM's
            self.compat_hists = [
                vllm_hist("time_to_first_token_seconds", "TTFT (vLLM name).", VLLM_TTFT_BUCKETS),
                vllm_hist("inter_token_latency_seconds", "ITL (vLLM name).", VLLM_ITL_BUCKETS),
                vllm_hist("e2e_request_latency_seconds", "E2E (vLLM name).", VLLM_E2E_BUCKETS),
            ]
        r.register(_StatsCollector(self))
        # The standard process_* and python_* series of every Python exporter (vLLM's too):
        # memory, CPU, open files, and the garbage collector's collections by generation.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def attach(self, engine: EngineFront) -> None:
        self._engine = engine
        engine.add_listener(self.observe)

    def rejected(self, reason: str) -> None:
        self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def observe(self, it: IterationStats) -> None:
        """Called on the engine thread after every step."""
        now = time.monotonic()
        if it.batch_size:
            self.batch.observe(it.batch_size)
        if (timing := it.timing) is not None:
            forward, gap = self.step_times[timing.kind]
            forward.observe(timing.forward_seconds)
            if timing.gap_seconds is not None:
                gap.observe(timing.gap_seconds)
        with self._window_lock:
            self._window.append((now, it.num_prompt_tokens, it.num_generation_tokens))
        for ours, theirs in [(self.ttft, it.ttfts), (self.itl, it.itls)]:
            for value in theirs:
                ours.observe(value)
        for f in it.finished:
            self.e2e.observe(f.e2e_seconds)
            if f.queue_seconds is not None:
                self.queue.observe(f.queue_seconds)
            self.prompt_len.observe(f.num_prompt_tokens)
            self.gen_len.observe(f.num_generation_tokens)
        if self.compat_hists:
            values = [it.ttfts, it.itls, [f.e2e_seconds for f in it.finished]]
            for child, series in zip(self.compat_hists, values, strict=True):
                for value in series:
                    child.observe(value)

    def throughput(self) -> tuple[float, float]:
        """Prompt and generation tokens per second over the last few seconds."""
        now = time.monotonic()
        with self._window_lock:
            while self._window and now - self._window[0][0] > THROUGHPUT_WINDOW_SECONDS:
                self._window.popleft()
            prompt = sum(p for _, p, _ in self._window)
            gen = sum(g for _, _, g in self._window)
        return prompt / THROUGHPUT_WINDOW_SECONDS, gen / THROUGHPUT_WINDOW_SECONDS

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Gauges and counters straight from EngineStats at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        s = m._engine.stats() if m._engine is not None else EngineStats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"llama_serve_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"llama_serve_{name}", doc, value=value)

        yield gauge("requests_running", "Requests holding KV-cache slots.", s.num_running)
        yield gauge("requests_waiting", "Requests queued for a slot.", s.num_waiting)
        yield gauge("kv_cache_slots_used", "KV-cache slots in use.", s.slots_used)
        yield gauge("kv_cache_slots_total", "KV-cache slots in the pool.", s.slots_total)
        yield gauge("kv_cache_tokens_used", "Tokens held in the KV-cache pool.", s.tokens_used)
        yield gauge("kv_cache_tokens_capacity", "Tokens the pool can hold.", s.tokens_capacity)
        yield gauge("kv_cache_usage_ratio", "Tokens used / capacity.", s.kv_cache_usage)
        prompt_tps, gen_tps = m.throughput()
        yield gauge("prompt_throughput_tokens_per_second",
                    f"Prompt tokens/s (computed or found in the prefix cache) over the last "
                    f"{THROUGHPUT_WINDOW_SECONDS:.0f} s.",
                    prompt_tps)
        yield gauge("generation_throughput_tokens_per_second",
                    f"Output tokens/s over the last {THROUGHPUT_WINDOW_SECONDS:.0f} s.", gen_tps)
        yield counter("prompt_tokens_total", "Prompt tokens taken (computed or found in "
                      "the prefix cache).", s.prompt_tokens_total)
        yield counter("generation_tokens_total", "Output tokens generated.",
                      s.generation_tokens_total)
        steps = CounterMetricFamily(
            "llama_serve_engine_steps_total", "Engine steps run, by kind: decode (decode rows "
            "only), mixed (prompt chunks beside decode rows), prefill (prompt chunks only).",
            labels=["kind"])
        for kind in STEP_KINDS:
            steps.add_metric([kind], s.steps_total.get(kind, 0))
        yield steps
        yield counter("prefix_cache_queries_total", "Prompt tokens looked up in the prefix "
                      "cache.", s.prefix_cache_queries_total)
        yield counter("prefix_cache_hits_total", "Prompt tokens found in the prefix cache "
                      "(copied, not computed).", s.prefix_cache_hits_total)
        finished = CounterMetricFamily("llama_serve_requests_finished_total",
                                       "Finished requests by reason.", labels=["finish_reason"])
        for reason in FinishReason:
            finished.add_metric([reason.value], s.finished_total.get(reason.value, 0))
        yield finished
        rejected = CounterMetricFamily("llama_serve_requests_rejected_total",
                                       "Requests refused before queueing.", labels=["reason"])
        for reason, count in sorted(m._rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        if m.compat == "vllm":
            yield from _vllm_series(m.model_name, s)
            if m.lora:
                yield _vllm_lora_info(s, m.max_loras if m.max_loras is not None else len(
                    m._engine.lora_names) if m._engine is not None else 0)


def _vllm_lora_info(s: EngineStats, max_lora: int) -> Metric:
    """vLLM's vllm:lora_requests_info: its value the time the adapters were read, its labels
    the adapters of the running and the waiting requests (comma-separated) and the most
    adapters (--max-loras, else those loaded): what LoRA-aware routers read."""
    info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                             labels=["max_lora", "running_lora_adapters",
                                     "waiting_lora_adapters"])
    info.add_metric([str(max_lora), ",".join(s.running_loras), ",".join(s.waiting_loras)],
                    s.loras_read_time)
    return info


def _vllm_series(model_name: str, s: EngineStats) -> Iterator[Metric]:
    def family(kind: type, name: str, doc: str, value: float) -> Metric:
        fam = kind(f"vllm:{name}", doc, labels=["model_name"])
        fam.add_metric([model_name], value)
        return fam

    # vLLM runs each of a request's n samples as a request of its own: counted in samples
    yield family(GaugeMetricFamily, "num_requests_running", "Running requests (samples).",
                 s.slots_used)
    yield family(GaugeMetricFamily, "num_requests_waiting", "Waiting requests (samples).",
                 s.num_queued)
    yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache usage, 1 = full.",
                 s.kv_cache_usage)
    yield family(CounterMetricFamily, "prompt_tokens", "Prompt tokens (each sample's).",
                 s.sample_prompt_tokens_total)
    yield family(CounterMetricFamily, "generation_tokens", "Generation tokens.",
                 s.generation_tokens_total)
    yield family(CounterMetricFamily, "prefix_cache_queries",
                 "Prefix cache queries, in queried tokens.", s.prefix_cache_queries_total)
    yield family(CounterMetricFamily, "prefix_cache_hits", "Prefix cache hits, in tokens.",
                 s.prefix_cache_hits_total)
