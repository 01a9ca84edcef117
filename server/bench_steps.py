"""The server's own account of a bench level's decode steps, for `llama-serve bench`.

Our server on CPU exports how long each step spent in the model's forward and how long passed
between one forward's end and the next one's start (`llama_serve_step_forward_seconds` and
`llama_serve_step_gap_seconds`, by step kind). Their sums, read from /metrics before and after
a level, give the share of a decode step spent outside the model: the scheduler, sampling,
outputs and HTTP overhead that the performance issue bounds. Servers without these series
(vLLM, ours on a GPU) give none.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

FORWARD, GAP = "llama_serve_step_forward_seconds", "llama_serve_step_gap_seconds"
Snapshot = dict[str, float]  # "<series>_sum" / "<series>_count" of decode steps -> value


@dataclass(frozen=True, slots=True)
class ServerSteps:
    """Means over a level's decode-only steps, in milliseconds."""
    decode_steps: int
    forward_ms: float
    outside_ms: float  # from the last forward's end to this one's start
    outside_share: float  # outside / (outside + forward)


async def snapshot(client: httpx.AsyncClient, base_url: str) -> Snapshot | None:
    """The decode steps' sums and counts from /metrics; None where the server has none."""
    try:
        response = await client.get(base_url + "/metrics", timeout=10.0)
        response.raise_for_status()
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    values = {f"{sample.name}": sample.value for family in families
              if family.name in (FORWARD, GAP) for sample in family.samples
              if sample.labels.get("kind") == "decode"
              and sample.name.endswith(("_sum", "_count"))}
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
