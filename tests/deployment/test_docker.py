"""The real thing: docker/Dockerfile built, docker/compose.yaml up with 2 replicas behind nginx,
checked through the published port: requests reach both replicas, a stream arrives while it
is generated, `docker stop` (SIGTERM) lets a stream finish, `docker kill` loses no request;
the image runs the C kernels its build stage prebuilt.

Needs a Docker engine binary and Compose v2 (`docker/ci/setup-docker.sh install`, which
`make test-docker` runs); the test starts its own dockerd and stops it at the end. No registry
is needed: the base image is debootstrapped and Python packages come from a wheelhouse that
the host fills. When the engine cannot start, the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.api.conftest import free_port
from tests.deployment.balancer import (
    LONG_STREAM,
    LONG_STREAM_CHOICES,
    REPO,
    complete,
    finished_requests,
    parse_metrics,
    start_stream,
    wait_until,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

SETUP = REPO / "docker" / "ci" / "setup-docker.sh"
BASE_IMAGE = "llama-serve-base:test"  # Debian + python3 + nginx + gcc; nginx's image too
IMAGE = "llama-serve:test"
PROJECT = "llama-serve-test"


@dataclass
class Docker:
    """The client, pointed at the test's own dockerd."""

    env: dict[str, str]

    def run(self, *args: str, timeout: float = 600, check: bool = True
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited with {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def docker(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
        return self.run("docker", *args, **kwargs)  # type: ignore[arg-type]

    def compose(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess:
        return self.docker("compose", "-f", "docker/compose.yaml", "-p", PROJECT, *args,
                           **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A dockerd of its own (data, sockets and pid under a temporary folder), stopped by PID
    and removed at the end."""
    missing = [tool for tool in ("dockerd", "docker", "debootstrap") if not shutil.which(tool)]
    if missing or subprocess.run(["docker", "compose", "version"],
                                 capture_output=True).returncode != 0:
        pytest.fail(f"Docker is not installed ({', '.join(missing) or 'docker compose'} "
                    f"missing): run `bash {SETUP.relative_to(REPO)} install`", pytrace=False)
    state = Path(tempfile.mkdtemp(prefix="llama-serve-docker-"))  # short: socket paths
    env = {**os.environ, "DOCKER_HOST": f"unix://{state}/docker.sock",
           "DOCKER_CONFIG": str(state / "client"), "DOCKER_BUILDKIT": "0",
           "PYTHON": sys.executable}
    started = subprocess.run(["bash", str(SETUP), "start", str(state)], env=env,
                             capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.fail(f"the Docker engine did not start:\n{started.stderr}", pytrace=False)
        yield Docker(env)
    finally:
        subprocess.run(["bash", str(SETUP), "stop", str(state)], env=env, timeout=120)


@dataclass
class Stack:
    docker: Docker
    base_url: str
    logs: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def replicas(self) -> list[str]:
        """Container ids of the running replicas."""
        return self.docker.compose("ps", "-q", "llama").stdout.split()

    def replica_get(self, container: str, path: str) -> tuple[int, str]:
        """GET a replica's own endpoint from inside its container (it publishes no port)."""
        script = ("import sys, urllib.request, urllib.error\n"
                  "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
                  "except urllib.error.HTTPError as e:\n r = e\n"
                  "print(r.status); print(r.read().decode())")
        out = self.docker.docker("exec", container, "python", "-c", script,
                                 f"http://127.0.0.1:8000{path}").stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def finished(self, container: str) -> float:
        return finished_requests(self.replica_get(container, "/metrics")[1])

    def running(self, container: str) -> float:
        return parse_metrics(self.replica_get(container, "/metrics")[1])[
            "llama_serve_requests_running"]

    def nginx_log(self) -> str:
        return self.docker.compose("logs", "--no-color", "nginx", check=False).stdout

    def restore(self) -> None:
        """Both replicas up again, and nginx re-resolving their (possibly new) addresses."""
        self.docker.compose("up", "-d", "--wait", "--no-build")
        self.docker.compose("exec", "-T", "nginx", "nginx", "-s", "reload")
        assert wait_until(lambda: complete(self.v1, "after-reload").status_code == 200)


@pytest.fixture(scope="module")
def stack(docker: Docker, long_context_checkpoint: Path,
          tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    if not (REPO / ".dockerignore").is_file():
        pytest.fail("the repository's .dockerignore is missing: the build context would hold "
                    "the virtualenv", pytrace=False)
    subprocess.run(["bash", str(SETUP), "base-image", BASE_IMAGE], env=docker.env, check=True)
    subprocess.run(["bash", str(SETUP), "wheelhouse", str(REPO / "docker" / "wheels")],
                   env=docker.env, check=True)
    docker.docker("build", "-f", "docker/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                  "-t", IMAGE, ".", timeout=900)
    # The model mounted read-only, readable by the image's non-root user.
    model = tmp_path_factory.mktemp("docker-model") / "tiny"
    shutil.copytree(long_context_checkpoint, model)
    for path in [model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    docker.env.update(LLAMA_SERVE_IMAGE=IMAGE, NGINX_IMAGE=BASE_IMAGE, MODEL_DIR=str(model),
                      LLAMA_SERVE_SERVED_MODEL_NAME="tiny", LLAMA_SERVE_PUBLISHED_PORT=str(port),
                      # room for a draining stream on a loaded machine (about 7 s idle)
                      LLAMA_SERVE_SHUTDOWN_TIMEOUT="240", LLAMA_SERVE_STOP_GRACE_PERIOD="270s")
    logs = tmp_path_factory.mktemp("docker-logs") / "compose.log"
    stack = Stack(docker, f"http://127.0.0.1:{port}", logs)
    try:
        docker.compose("up", "-d", "--wait", "--no-build", timeout=300)
        yield stack
    finally:
        logs.write_text(docker.compose("logs", "--no-color", check=False).stdout)
        docker.compose("down", "--volumes", "--timeout", "5", check=False)


def test_image_runs_as_non_root_with_the_model_mounted(stack: Stack) -> None:
    (container, *_) = stack.replicas()
    user = stack.docker.docker("exec", container, "id", "-u").stdout.strip()
    assert user != "0"
    status, body = stack.replica_get(container, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    health = stack.docker.docker("inspect", "-f", "{{.State.Health.Status}}", container)
    assert health.stdout.strip() == "healthy"


def test_image_runs_the_prebuilt_cpu_kernels(stack: Stack) -> None:
    """The build stage prebuilt the C kernels per x86-64 level; in the image the model loads
    the one this CPU runs (from the image, not compiled at start-up)."""
    (container, *_) = stack.replicas()
    code = ("from model import cpu_kernels; k = cpu_kernels.load(); "
            "print(k and k.path, cpu_kernels.portable_level(cpu_kernels._cpu_flags()))")
    path, level = stack.docker.docker("exec", container, "python", "-c", code).stdout.split()
    if level == "None":
        pytest.skip("this CPU runs none of the prebuilt x86-64 levels")
    assert path.startswith("/opt/llama-serve/kernels/cpu_kernels-")
    assert path.endswith(f"-{level}.so")


def test_requests_reach_both_replicas(stack: Stack) -> None:
    replicas = stack.replicas()
    assert len(replicas) == 2
    before = [stack.finished(c) for c in replicas]
    for i in range(8):
        response = complete(stack.v1, f"docker-spread-{i}")
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == f"docker-spread-{i}"
    served = [stack.finished(c) - b for c, b in zip(replicas, before, strict=True)]
    assert sum(served) == 8 and all(served), (served, stack.nginx_log())


def test_stream_arrives_while_generating(stack: Stack) -> None:
    """Unbuffered by nginx, a stream's first chunk comes with its first token, long before its
    last; buffered, they would all come at the end. (Timed at the client: asking a replica
    whether it still generates takes a `docker exec`, about as long as the tiny model takes for
    the whole stream on a fast machine.)"""
    stream = start_stream(stack.v1, LONG_STREAM, n=LONG_STREAM_CHOICES)
    stream.join(300)
    assert stream.status == 200 and stream.done and stream.finish_reason == "length"
    first, last = (t - stream.started for t in (stream.arrivals[0], stream.arrivals[-1]))
    assert first < 0.25 * last, f"first chunk after {first:.3f} s, last after {last:.3f} s"


def test_docker_stop_lets_the_stream_finish(stack: Stack) -> None:
    replicas = stack.replicas()
    stream = start_stream(stack.v1, LONG_STREAM, "docker-draining-stream",
                          n=LONG_STREAM_CHOICES)
    assert stream.first_chunk.wait(60)
    assert stream.status == 200 and stream.error is None, (stream.status, stream.error)
    running = {c: stack.running(c) for c in replicas}
    assert sorted(running.values()) == [0, 1], (running, len(stream.chunks), stream.done)
    (draining,) = [c for c, n in running.items() if n == 1]
    (other,) = [c for c in replicas if c != draining]
    before = stack.finished(other)
    stop = subprocess.Popen(["docker", "stop", draining], env=stack.docker.env,
                            stdout=subprocess.DEVNULL)
    assert wait_until(lambda: stack.replica_get(draining, "/health")[0] == 503, timeout=30)
    draining_since = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        statuses = [r.status_code for r in pool.map(
            lambda i: complete(stack.v1, f"docker-during-drain-{i}"), range(6))]
    served_by_other = stack.finished(other) - before
    stream.join(300)
    assert stop.wait(300) == 0
    exit_code = stack.docker.docker("inspect", "-f", "{{.State.ExitCode}}", draining).stdout
    assert statuses == [200] * 6, stack.nginx_log()
    assert served_by_other == 6, stack.nginx_log()
    assert stream.done and stream.finish_reason == "length", stream.chunks[-1:]
    # Else the stream was over before the stop, and the test proved nothing.
    assert stream.arrivals[-1] > draining_since, "the stream ended before the replica drained"
    assert exit_code.strip() == "0"
    stack.restore()


def test_docker_kill_loses_no_new_request(stack: Stack) -> None:
    replicas = stack.replicas()
    assert len(replicas) == 2
    for i in range(4):  # kept-alive connections to both replicas
        assert complete(stack.v1, f"docker-warm-{i}").status_code == 200
    stack.docker.docker("kill", replicas[0])
    statuses = [complete(stack.v1, f"docker-after-kill-{i}").status_code for i in range(10)]
    stream = start_stream(stack.v1, 16, "docker-after-kill-stream")
    stream.join()
    assert statuses == [200] * 10, stack.nginx_log()
    assert stream.status == 200 and stream.done, stack.nginx_log()
