"""SIGTERM drains: health turns 503 at once, new requests get 503, requests in flight finish
(or are aborted with a final chunk and [DONE] after --shutdown-timeout), then exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import server.app as app_module
from server.app import ServerState, Unavailable, create_app
from server.config import ServerConfig
from server.engine_front import EngineDeadError
from server.metrics import Metrics
from server.protocol import CompletionRequest, RequestLimits
from tests.api.conftest import Server, process_gone, run_server, wait_until
from tests.deployment.balancer import LONG_STREAM


def stream_in_thread(server: Server, max_tokens: int, first: threading.Event) -> dict:
    """Read a streaming completion on a thread; the result dict fills in when it ends."""
    result: dict = {"chunks": [], "done": False}

    def read() -> None:
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{server.v1}/completions",
                json={"prompt": [10, 11, 12], "max_tokens": max_tokens, "ignore_eos": True,
                      "stream": True}) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    result["chunks"].append(json.loads(line[6:]))
                    first.set()

    result["thread"] = threading.Thread(target=read)
    result["thread"].start()
    return result


ENGINE_MODES = pytest.mark.parametrize("engine_mode", ["--no-engine-process", "--engine-process"])


@ENGINE_MODES
def test_sigterm_lets_requests_in_flight_finish(long_context_checkpoint: Path, tmp_path: Path,
                                                engine_mode: str) -> None:
    with run_server(long_context_checkpoint, tmp_path, "--shutdown-timeout", "150",
                    "--max-model-len", "4096", engine_mode) as server:
        helpers = server.children()  # the engine process and multiprocessing's tracker
        assert helpers or engine_mode == "--no-engine-process"
        first = threading.Event()
        # Long enough to be in flight through the checks below on a fast idle machine (a
        # quarter of it left 0.2 s), with a timeout long enough for a loaded one (4000 tokens
        # once took over 60 s there)
        result = stream_in_thread(server, LONG_STREAM, first)
        assert first.wait(20)
        server.process.send_signal(signal.SIGTERM)
        health = httpx.get(f"{server.base_url}/health")
        late = httpx.post(f"{server.v1}/completions", json={"prompt": "x", "max_tokens": 2})
        result["thread"].join(150)
        assert server.process.wait(timeout=30) == 0
    # multiprocessing's tracker leaves on its own once it sees the server's end close
    assert wait_until(lambda: all(process_gone(pid) for pid in helpers))
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "draining"
    assert result["done"]
    assert result["chunks"][-1]["choices"][0]["finish_reason"] == "length"
    assert len(result["chunks"]) >= 2


def test_sigterm_to_the_process_group_still_drains(long_context_checkpoint: Path,
                                                   tmp_path: Path) -> None:
    """systemd (KillMode=control-group) and `kill -TERM -PGID` signal the engine process too:
    it leaves its lifetime to the server, which drains first."""
    with run_server(long_context_checkpoint, tmp_path, "--shutdown-timeout", "150",
                    "--max-model-len", "4096", "--engine-process", new_session=True) as server:
        first = threading.Event()
        result = stream_in_thread(server, LONG_STREAM, first)  # in flight at the signal
        assert first.wait(20)
        os.killpg(server.process.pid, signal.SIGTERM)
        result["thread"].join(150)
        assert server.process.wait(timeout=30) == 0
    assert result["done"]
    assert result["chunks"][-1]["choices"][0]["finish_reason"] == "length"


@ENGINE_MODES
def test_sigterm_aborts_what_outlives_the_timeout(long_context_checkpoint: Path, tmp_path: Path,
                                                  engine_mode: str) -> None:
    with run_server(long_context_checkpoint, tmp_path, "--shutdown-timeout", "0.1",
                    "--max-model-len", "4096", engine_mode) as server:
        first = threading.Event()
        result = stream_in_thread(server, LONG_STREAM, first)
        assert first.wait(20)
        server.process.send_signal(signal.SIGTERM)
        result["thread"].join(60)
        assert server.process.wait(timeout=30) == 0
    assert result["done"], "the aborted stream must still end with [DONE]"
    assert result["chunks"][-1]["choices"][0]["finish_reason"] == "abort"
    assert len(result["chunks"]) < LONG_STREAM
    assert "aborting 1 requests" in server.log()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_sigterm_while_a_long_prompt_is_tokenized(tiny_checkpoint: Path, tmp_path: Path,
                                                  stream: bool) -> None:
    """A 2 MB prompt is tokenized off the event loop for a second or more; SIGTERM lands in
    that time (or, on a slow machine, before the request is read): the request is served in
    full, or refused with 503 `draining`, never cut (a 200 with an empty stream, or a 500)."""
    body = {"prompt": "lorem ipsum dolor " * 120_000, "truncate_prompt_tokens": 8,
            "max_tokens": 4, "ignore_eos": True, "stream": stream}
    with run_server(tiny_checkpoint, tmp_path, "--shutdown-timeout", "60") as server:
        answer: dict = {}

        def send() -> None:
            with httpx.Client(timeout=120) as client:
                response = client.post(f"{server.v1}/completions", json=body)
                answer.update(status=response.status_code, text=response.text)

        sender = threading.Thread(target=send)
        sender.start()
        threading.Event().wait(0.6)  # the body sent, the prompt being tokenized
        server.process.send_signal(signal.SIGTERM)
        sender.join(120)
        assert server.process.wait(timeout=60) == 0
    if answer["status"] == 503:
        assert json.loads(answer["text"])["error"]["code"] == "draining"
        return
    assert answer["status"] == 200, answer
    if stream:
        events = [line[6:] for line in answer["text"].splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    else:
        assert json.loads(answer["text"])["usage"]["completion_tokens"] == 4


class IdleEngine:
    """What a drain and a request's checks read of the engine."""

    vocab_size, max_model_len = 1000, 64

    def __init__(self) -> None:
        self.unfinished = 0

    def check_health(self) -> None:
        pass

    def num_unfinished(self) -> int:
        return self.unfinished


def test_a_drain_waits_for_requests_between_their_checks_and_the_queue() -> None:
    """A request checked before SIGTERM and still tokenizing a long prompt (off the event loop)
    is in flight: the drain waits for it to be queued and then to finish, where it once saw
    nothing in flight and stopped the server under it. One checked after the drain began is
    refused (503 draining)."""
    state = ServerState(config=ServerConfig(shutdown_timeout=30), limits=RequestLimits(),
                        metrics=Metrics("m"))
    engine = IdleEngine()
    state.engine, state.status = engine, "ready"  # type: ignore[assignment]
    body = CompletionRequest(prompt="x")
    drain = threading.Thread(target=state.drain)
    with state.admission(body):
        drain.start()
        drain.join(0.3)
        assert drain.is_alive() and state.status == "draining"
        engine.unfinished = 1  # queued
    drain.join(0.3)
    assert drain.is_alive() and state.admitting == 0
    with pytest.raises(Unavailable, match="shutting down"), state.admission(body):
        pass
    assert state.admitting == 0
    engine.unfinished = 0  # finished
    drain.join(5)
    assert not drain.is_alive()


class DyingEngine(IdleEngine):
    """An engine that serves, then dies (its loop failed)."""

    tokenizer = None
    dead = False

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 10.0) -> None:
        pass

    def add_listener(self, listener: object) -> None:
        pass

    def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("engine loop failed: boom")


def test_a_dead_engine_stops_the_server_after_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the engine has died the app answers `failed`, then asks to stop (the CLI exits 1)
    FAILED_EXIT_SECONDS later, for a restart policy or a liveness probe to restart it."""
    monkeypatch.setattr(app_module, "FAILED_EXIT_SECONDS", 3.0)
    engine, fatal = DyingEngine(), []
    app = create_app(ServerConfig(), lambda: engine, fatal.append)
    with TestClient(app) as client:
        assert wait_until(lambda: client.get("/health").status_code == 200)
        engine.dead = True
        assert wait_until(lambda: app.state.server.status == "failed", timeout=5)
        assert client.get("/health").json()["status"] == "failed" and not fatal
        assert wait_until(lambda: bool(fatal), timeout=10)
    assert fatal == ["the engine died: engine loop failed: boom"]


def test_sigterm_before_serving_stops_at_once(tmp_path: Path) -> None:
    """Fetching a model from a hub that never answers: a SIGTERM ends the process then, by
    the handler that also works for a container's PID 1 (which ignores a signal it has no
    handler for), not after the fetch's timeouts."""
    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen()  # accepts connections, never answers
    hub.settimeout(60)
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "120",
           "HF_HUB_DOWNLOAD_TIMEOUT": "120", "HF_HUB_OFFLINE": "0"}
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "acme/never-there"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with hub:
            conn, _ = hub.accept()  # the fetch has begun
            time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 128 + signal.SIGTERM
            conn.close()
    finally:
        process.kill()
    assert b"stopped before serving" in process.stdout.read()
