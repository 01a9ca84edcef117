"""docker/nginx.conf in front of two real replicas on 127.0.0.1: requests spread over both,
streams arrive token by token, a killed replica loses no new request, and a replica stopped
with SIGTERM finishes its stream while the other takes the new requests.

nginx comes from the system packages (`apt-get install nginx`); without it these tests fail.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, run_server, wait_healthy
from tests.deployment.balancer import (
    LONG_STREAM,
    Balancer,
    complete,
    finished_requests,
    parse_metrics,
    run_nginx,
    start_stream,
    wait_until,
)

# Up to LONG_STREAM tokens per stream; 180 s to drain, so a stream is never cut short here
# (60 s cut one short once, the suite sharing two cores with a three-thread job).
SERVER_ARGS = ("--served-model-name", "tiny", "--max-model-len", "4096",
               "--shutdown-timeout", "180")


@dataclass
class Stack:
    balancer: Balancer
    replicas: list[Server]

    def finished(self) -> list[float]:
        """Requests each replica has finished."""
        return [finished_requests(httpx.get(f"{r.base_url}/metrics").text)
                for r in self.replicas]

    def running(self) -> list[float]:
        """Requests each replica is generating now."""
        return [parse_metrics(httpx.get(f"{r.base_url}/metrics").text)
                ["llama_serve_requests_running"] for r in self.replicas]

    def access_log(self) -> str:
        return "nginx access log:\n" + self.balancer.access_log()


@contextmanager
def two_replicas_behind_nginx(checkpoint: Path, tmp: Path) -> Iterator[Stack]:
    with ExitStack() as stack:
        # Both load at once; then nginx starts in front of them.
        replicas = [stack.enter_context(run_server(checkpoint, tmp, *SERVER_ARGS, wait=False))
                    for _ in range(2)]
        for replica in replicas:
            wait_healthy(replica)
        ports = [int(r.base_url.rsplit(":", 1)[1]) for r in replicas]
        yield Stack(stack.enter_context(run_nginx(ports, tmp / "nginx")), replicas)


@pytest.fixture(scope="module")
def shared_stack(long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Stack]:
    """For the tests that leave both replicas running."""
    with two_replicas_behind_nginx(long_context_checkpoint,
                                   tmp_path_factory.mktemp("lb")) as stack:
        yield stack


@pytest.fixture
def stack(long_context_checkpoint: Path, tmp_path: Path) -> Iterator[Stack]:
    """For the tests that kill or stop a replica."""
    with two_replicas_behind_nginx(long_context_checkpoint, tmp_path) as stack:
        yield stack


def test_requests_reach_both_replicas(shared_stack: Stack) -> None:
    before = shared_stack.finished()
    for i in range(8):
        response = complete(shared_stack.balancer.v1, f"spread-{i}")
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == f"spread-{i}"
    served = [after - b for after, b in zip(shared_stack.finished(), before, strict=True)]
    assert sum(served) == 8, shared_stack.access_log()
    assert all(n > 0 for n in served), (served, shared_stack.access_log())


def test_stream_arrives_while_generating(shared_stack: Stack) -> None:
    """The first chunk reaches the client while the replica is still generating: nginx passes
    tokens on as they come instead of buffering the response."""
    stream = start_stream(shared_stack.balancer.v1, LONG_STREAM)
    assert stream.first_chunk.wait(30)
    running_at_first_chunk = sum(shared_stack.running())
    stream.join()
    assert stream.status == 200
    assert running_at_first_chunk == 1, "the whole stream arrived after generation ended"
    assert stream.done and stream.finish_reason == "length"
    assert len(stream.chunks) > 1


def test_killed_replica_loses_no_new_request(stack: Stack) -> None:
    dead, alive = stack.replicas
    for i in range(4):  # warm kept-alive connections to both replicas
        assert complete(stack.balancer.v1, f"warm-{i}").status_code == 200
    dead.process.send_signal(signal.SIGKILL)
    dead.process.wait(timeout=10)
    before = finished_requests(httpx.get(f"{alive.base_url}/metrics").text)
    statuses = [complete(stack.balancer.v1, f"after-kill-{i}").status_code for i in range(10)]
    stream = start_stream(stack.balancer.v1, 16, "after-kill-stream")
    stream.join()
    assert statuses == [200] * 10, stack.access_log()
    assert stream.status == 200 and stream.done, stack.access_log()
    after = finished_requests(httpx.get(f"{alive.base_url}/metrics").text)
    assert after - before == 11


def test_sigterm_replica_finishes_its_stream(stack: Stack) -> None:
    # 4 choices, about 2.5 s: the looks below are quick HTTP reads (the Docker test's are
    # `docker exec`s, hence its 16), and the drain's 180 s must hold it on a loaded machine.
    stream = start_stream(stack.balancer.v1, LONG_STREAM, "draining-stream", n=4)
    assert stream.first_chunk.wait(30)
    assert stream.status == 200 and stream.error is None, (stream.status, stream.error)
    running = stack.running()
    assert sorted(running) == [0, 1], running
    draining, other = (stack.replicas if running[0] else stack.replicas[::-1])
    draining.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _health(draining) == 503), "SIGTERM did not start draining"
    draining_since = time.monotonic()
    before = finished_requests(httpx.get(f"{other.base_url}/metrics").text)
    # At once, so that least_conn sends some to the draining replica too: its 503 must send
    # them on to the other one rather than back to the client.
    with ThreadPoolExecutor(6) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: complete(stack.balancer.v1, f"during-drain-{i}"), range(6))]
    after = finished_requests(httpx.get(f"{other.base_url}/metrics").text)
    stream.join(180)  # the drain's limit
    assert draining.process.wait(timeout=30) == 0
    assert statuses == [200] * 6, stack.access_log()
    assert after - before == 6, stack.access_log()
    assert stream.done and stream.finish_reason == "length", stream.chunks[-1:]
    # Else the stream was over before the signal, and the test proved nothing.
    assert stream.arrivals[-1] > draining_since, "the stream ended before the replica drained"


def _health(server: Server) -> int | None:
    try:
        return httpx.get(f"{server.base_url}/health", timeout=2).status_code
    except httpx.TransportError:
        return None
