"""The server's own account of a bench level's decode steps, for `llama-serve bench`.

Our server on CPU exports how long each step spent in the model's forward and how long passed
between one forward's end and the next one's start (`llama_serve_step_forward_seconds` and
`llama_serve_step_gap_seconds`, by step kind). Their sums, read from /metrics before and after
a level, give the share of a decode step spent outside the model: the scheduler, sampling,
outputs and HTTP overhead that the performance issue bounds. Servers without these series
(vLLM, ours on a GPU) give none. Its prefix cache's counters (ours, or vLLM's names) give how
many of the level's prompt tokens came from the cache, and its steps by kind (ours, on every
device) how many steps carried prompts: a burst of arrivals prefilled in one step, or spread
over many, each of which the streams already decoding wait through.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.engine_front import STEP_KINDS

FORWARD, GAP = "llama_serve_step_forward_seconds", "llama_serve_step_gap_seconds"
STEPS = "llama_serve_engine_steps"  # (the parser drops `_total`), by kind
# Counter families (the parser drops `_total`): ours, else vLLM's (older ones: `gpu_`)
PREFIX_HITS = ("llama_serve_prefix_cache_hits", "vllm:prefix_cache_hits",
               "vllm:gpu_prefix_cache_hits")
PREFIX_QUERIES = ("llama_serve_prefix_cache_queries", "vllm:prefix_cache_queries",
                  "vllm:gpu_prefix_cache_queries")
# "<series>_sum" / "<series>_count" of decode steps, and the prefix cache's "hits" and
# "queries" -> value
Snapshot = dict[str, float]


@dataclass(frozen=True, slots=True)
class ServerSteps:
    """Means over a level's decode-only steps, in milliseconds."""
    decode_steps: int
    forward_ms: float
    outside_ms: float  # from the last forward's end to this one's start
    outside_share: float  # outside / (outside + forward)


@dataclass(frozen=True, slots=True)
class StepKinds:
    """The server's steps during a level, by what their rows were."""
    decode: int  # decode rows only
    mixed: int  # prompt chunks beside decode rows
    prefill: int  # prompt chunks only


@dataclass(frozen=True, slots=True)
class PrefixCache:
    """Prompt tokens a level looked up in the server's prefix cache, and found there."""
    queries: int
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries


async def snapshot(client: httpx.AsyncClient, base_url: str) -> Snapshot | None:
    """The decode steps' sums and counts and the prefix cache's counters, from /metrics; None
    where the server has none of them."""
    try:
        response = await client.get(base_url + "/metrics", timeout=10.0)
        response.raise_for_status()
        return parse_snapshot(response.text)
    except (httpx.HTTPError, ValueError):
        return None


def parse_snapshot(text: str) -> Snapshot | None:
    """`snapshot`'s values from Prometheus text (ValueError if it is not that)."""
    families = list(text_string_to_metric_families(text))
    values = {f"{sample.name}": sample.value for family in families
              if family.name in (FORWARD, GAP) for sample in family.samples
              if sample.labels.get("kind") == "decode"
              and sample.name.endswith(("_sum", "_count"))}
    for key, names in (("hits", PREFIX_HITS), ("queries", PREFIX_QUERIES)):
        counters = {f.name: f for f in families if f.name in names}
        if family := next((counters[name] for name in names if name in counters), None):
            values[key] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    for family in families:
        if family.name == STEPS:
            values |= {f"steps:{s.labels.get('kind')}": s.value for s in family.samples
                       if s.name.endswith("_total")}
    return values or None


def decode_steps(before: Snapshot | None, after: Snapshot | None) -> ServerSteps | None:
    """What the decode steps between two snapshots took; None without both or without steps."""
    if before is None or after is None:
        return None

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    n_forward, n_gap = delta(f"{FORWARD}_count"), delta(f"{GAP}_count")
    if n_forward <= 0 or n_gap <= 0:
        return None
    forward = delta(f"{FORWARD}_sum") / n_forward
    outside = delta(f"{GAP}_sum") / n_gap
    return ServerSteps(int(n_forward), forward * 1e3, outside * 1e3,
                       outside / (outside + forward) if outside + forward > 0 else 0.0)


def step_kinds(before: Snapshot | None, after: Snapshot | None) -> StepKinds | None:
    """The steps between two snapshots by kind; None without both or without any."""
    if before is None or after is None:
        return None
    counts = {kind: int(after.get(f"steps:{kind}", 0.0) - before.get(f"steps:{kind}", 0.0))
              for kind in STEP_KINDS}
    if not any(f"steps:{kind}" in after for kind in STEP_KINDS) or sum(counts.values()) <= 0:
        return None
    return StepKinds(**counts)


def prefix_cache(before: Snapshot | None, after: Snapshot | None) -> PrefixCache | None:
    """The prefix cache's lookups between two snapshots; None without both or without any."""
    if before is None or after is None or not {"hits", "queries"} <= before.keys() & after.keys():
        return None
    queries = int(after["queries"] - before["queries"])
    return PrefixCache(queries, int(after["hits"] - before["hits"])) if queries > 0 else None
