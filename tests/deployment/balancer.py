"""Helpers for the tests behind a load balancer: docker/nginx.conf rendered for 127.0.0.1 ports
and run from a temporary prefix, a streaming client on a thread, per-replica /metrics sums.

The same nginx.conf runs in docker/compose.yaml; here only the replica addresses, the listen
address and the file paths change, so the fast tier tests the shipped proxy settings.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import free_port, parse_metrics, wait_until  # noqa: F401 - re-exported

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "docker" / "nginx.conf"


def nginx_binary() -> str:
    """nginx from the system packages; a clear failure (not a skip) when it is missing."""
    path = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.fail("nginx is not installed: `apt-get install -y nginx` (.ci/run does it)",
                    pytrace=False)
    return path


def _replace_one(pattern: str, replace: Callable[[re.Match], str] | str, text: str) -> str:
    new, count = re.subn(pattern, replace, text, flags=re.M)
    assert count == 1, f"docker/nginx.conf: expected one line matching {pattern!r}, got {count}"
    return new


def render_nginx_conf(upstream_ports: list[int], listen_port: int, prefix: Path) -> str:
    """docker/nginx.conf with `llama:8000` -> the given 127.0.0.1 ports, listening on
    127.0.0.1:listen_port, its pid, logs and temporary files under `prefix`, in the foreground."""
    text = NGINX_CONF.read_text()
    text = _replace_one(
        r"^(\s*)server llama:8000(.*);$",
        lambda m: "\n".join(f"{m[1]}server 127.0.0.1:{port}{m[2]};" for port in upstream_ports),
        text)
    text = _replace_one(r"^(\s*)listen 8080;$", rf"\g<1>listen 127.0.0.1:{listen_port};", text)
    text = _replace_one(r"^error_log /dev/stderr", f"error_log {prefix}/error.log", text)
    text = _replace_one(r"^(\s*)access_log /dev/stdout", rf"\g<1>access_log {prefix}/access.log",
                        text)
    temp_paths = "".join(f"    {kind}_temp_path {prefix}/{kind}_temp;\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = _replace_one(r"^http \{\n", "http {\n" + temp_paths, text)
    return f"daemon off;\npid {prefix}/nginx.pid;\n" + text


@dataclass
class Balancer:
    base_url: str
    process: subprocess.Popen
    prefix: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def access_log(self) -> str:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def run_nginx(upstream_ports: list[int], prefix: Path) -> Iterator[Balancer]:
    """nginx in front of the given 127.0.0.1 ports, on a free port; stopped at the end."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(upstream_ports, port, prefix))
    error_log = prefix / "error.log"
    with open(prefix / "nginx.out", "w") as out:
        process = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf),
                                    "-e", str(error_log)], stdout=out, stderr=subprocess.STDOUT)
    balancer = Balancer(f"http://127.0.0.1:{port}", process, prefix)
    try:
        _wait_listening(port, process, error_log)
        yield balancer
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(port: int, process: subprocess.Popen, error_log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = error_log.read_text() if error_log.exists() else ""
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nginx not listening on {port} after 15 s")


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Stream:
    """A streamed completion read on a thread: chunks as they arrive, whether [DONE] came."""

    chunks: list[dict] = field(default_factory=list)
    done: bool = False
    status: int | None = None
    error: BaseException | None = None
    first_chunk: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = 0.0  # time.monotonic() when the request went out
    arrivals: list[float] = field(default_factory=list)  # and when each chunk came

    def join(self, timeout: float = 180) -> None:  # (4000 tokens took over 60 s once, the
        # suite sharing two cores with two other test runs: about 15 ms a token)
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"stream still open after {timeout} s"
        if self.error is not None:
            raise self.error

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1]["choices"][0]["finish_reason"] if self.chunks else None


# Tokens of a stream that is still generating when a test looks from outside: served from
# tests/conftest.py's long_context_checkpoint (4096 tokens), since the tiny model decodes one
# in well under a millisecond.
LONG_STREAM = 4000
# Choices of LONG_STREAM tokens each for a stream that must outlast slower looks from outside:
# one choice takes about 1 s here, less than two `docker exec`s and a `docker stop` on a loaded
# machine (CI saw one end before both replicas' metrics were read); sixteen take about 7 s.
LONG_STREAM_CHOICES = 16


def start_stream(v1_url: str, max_tokens: int, request_id: str = "stream", n: int = 1
                 ) -> Stream:
    """POST a streaming completion of `n` choices of exactly `max_tokens` tokens and read it
    on a thread."""
    stream = Stream()

    def read() -> None:
        stream.started = time.monotonic()
        try:
            with httpx.Client(timeout=120) as client, client.stream(
                    "POST", f"{v1_url}/completions", headers={"X-Request-Id": request_id},
                    json={"prompt": [10, 11, 12], "max_tokens": max_tokens, "ignore_eos": True,
                          "n": n, "stream": True}) as response:
                stream.status = response.status_code
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        stream.done = True
                    elif line.startswith("data: "):
                        stream.chunks.append(json.loads(line[len("data: "):]))
                        stream.arrivals.append(time.monotonic())
                        stream.first_chunk.set()
        except BaseException as e:  # noqa: BLE001 - handed to the test by join()
            stream.error = e
        finally:
            stream.first_chunk.set()

    stream.thread = threading.Thread(target=read, name=f"stream-{request_id}", daemon=True)
    stream.thread.start()
    return stream


def complete(v1_url: str, request_id: str, max_tokens: int = 4) -> httpx.Response:
    """A short non-streamed completion; the caller checks the status."""
    return httpx.post(f"{v1_url}/completions", headers={"X-Request-Id": request_id},
                      json={"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True},
                      timeout=60)


def finished_requests(metrics_text: str) -> float:
    """Requests a replica finished, whatever the reason."""
    return sum(value for name, value in parse_metrics(metrics_text).items()
               if name.startswith("llama_serve_requests_finished_total{"))
