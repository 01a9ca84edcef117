"""SIGTERM drains: health turns 503 at once, new requests get 503, requests in flight finish
(or are aborted with a final chunk and [DONE] after --shutdown-timeout), then exit 0."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

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
