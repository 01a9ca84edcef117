"""A real `llama-serve serve` process on 127.0.0.1 serving a tiny checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{labels}': value}."""
        return parse_metrics(httpx.get(f"{self.base_url}/metrics").text)

    def children(self) -> list[int]:
        """The server's child processes (an engine process, multiprocessing's tracker)."""
        tasks = Path(f"/proc/{self.process.pid}/task").glob("*/children")
        return [int(pid) for task in tasks for pid in task.read_text().split()]

    def metric(self, name: str) -> float:
        """The value of one series in /metrics (name plus labels, as written)."""
        return self.metrics()[name]

    def client(self, **headers: str) -> httpx.Client:
        """An HTTP client of this server (a context manager), with `headers`."""
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {series (name plus labels, as written): value}."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def process_gone(pid: int) -> bool:
    """The process has exited: no /proc entry, or a zombie not yet reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@contextmanager
def run_server(folder: Path, tmp: Path, *args: str, env: dict[str, str] | None = None,
               wait: bool = True, new_session: bool = False) -> Iterator[Server]:
    """`llama-serve serve folder *args` on a free port, healthy unless not `wait`; with
    `new_session` in a process group of its own (one a test may signal as a whole)."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server", "serve", str(folder), "--port", str(port),
           "--device", "cpu", *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})},
                                   start_new_session=new_session)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        if wait:
            wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_healthy(server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not healthy after {timeout} s:\n{server.log()}")


# The shared servers' settings, but for the context
SHARED_SERVER_ARGS = ("--api-key", API_KEY, "--served-model-name", "tiny", "--max-num-seqs", "8",
                      "--max-n", "4")


@pytest.fixture(scope="session")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared server: API key required, 8 slots, 512 tokens per sequence; embeddings and
    a response store on (so that the fuzzer reaches them; long_server has neither)."""
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("server"), *SHARED_SERVER_ARGS,
                    "--max-model-len", "512", "--enable-embeddings",
                    "--responses-store", "8") as s:
        yield s


@pytest.fixture(scope="session")
def long_server(long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Server]:
    """The shared server's settings with a 4096-token context: for requests that must still be
    generating after a look from outside (4000 tokens, about a second here; the 512-token
    context's took 0.1-0.3 s, a thin margin on a loaded machine)."""
    with run_server(long_context_checkpoint, tmp_path_factory.mktemp("long-server"),
                    *SHARED_SERVER_ARGS, "--max-model-len", "4096") as s:
        yield s


@pytest.fixture(scope="session")
def tools_server(long_context_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    """Llama 3.1's template and auto tool choice (--tool-call-parser llama3_json); its tool
    prompt is long: the 4096-token model. The last 4 Responses API responses stored. No API
    key."""
    template = Path(__file__).parents[1] / "model" / "templates" / "llama-3.1-instruct.jinja"
    with run_server(long_context_checkpoint, tmp_path_factory.mktemp("tools"),
                    "--served-model-name", "tiny", "--enable-auto-tool-choice",
                    "--tool-call-parser", "llama3_json", "--chat-template", str(template),
                    "--responses-store", "4") as s:
        yield s


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def client(server: Server, auth: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client of the shared server, with its key."""
    with server.client(**auth) as c:
        yield c


# --- helpers shared by the API tests -----------------------------------------------------------

TRACEBACK_MARKERS = ("Traceback", 'File "')


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """`response` is `status` with OpenAI's error shape, all four keys, and no traceback."""
    assert response.status_code == status, response.text
    assert not any(marker in response.text for marker in TRACEBACK_MARKERS), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] is None or isinstance(error["code"], str), error  # OpenAI's: one type
    return error


def sse_data(response: httpx.Response) -> list[str]:
    """The payloads of a streamed response's `data:` events, in order (comments skipped)."""
    return [line[len("data:"):].strip() for line in response.iter_lines()
            if line.startswith("data:")]


def wait_idle(server: Server, timeout: float = 10.0) -> None:
    """Poll /metrics until no request runs or waits and no KV-cache slot is held."""
    names = ("llama_serve_requests_running", "llama_serve_requests_waiting",
             "llama_serve_kv_cache_slots_used")
    deadline = time.monotonic() + timeout
    while True:
        values = {name: server.metric(name) for name in names}
        if not any(values.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout} s: {values}")
        time.sleep(0.05)
