"""`--engine-process`: a real server whose engine runs in a child process answers exactly as
the shared server (engine on a thread) does, and reports the child's death instead of hanging."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.app import FAILED_EXIT_SECONDS
from tests.api.conftest import (
    Server,
    assert_openai_error,
    process_gone,
    run_server,
    sse_data,
    wait_idle,
    wait_until,
)


@pytest.fixture(scope="module")
def proc_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Server]:
    """The shared server's model and limits, without the key, the engine in a child process;
    embeddings on."""
    with run_server(tiny_checkpoint, tmp_path_factory.mktemp("proc"), "--engine-process",
                    "--served-model-name", "tiny", "--max-model-len", "512",
                    "--max-num-seqs", "8", "--max-n", "4", "--enable-embeddings") as s:
        yield s


def engine_pid(server: Server) -> int:
    """The engine process: the server's child that multiprocessing spawned."""
    for child in server.children():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise AssertionError(f"no engine process among {server.children()}")


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


REQUESTS = [
    ("completions", {"model": "tiny", "prompt": ["Once upon", "a time"], "max_tokens": 12,
                     "temperature": 0, "logprobs": 2, "echo": True}),
    ("completions", {"model": "tiny", "prompt": "The cat", "max_tokens": 16, "n": 2,
                     "temperature": 0.9, "seed": 7, "stop": ["e"]}),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": 10, "temperature": 0, "logprobs": True,
                          "top_logprobs": 2}),
    ("completions", {"model": "tiny", "prompt": "The dog", "max_tokens": 30, "n": 2,  # guided
                     "temperature": 1.0, "seed": 3, "guided_regex": "[a-z]{3,8}( [0-9]+)?"}),
    ("completions", {"model": "tiny", "prompt": "A bird", "max_tokens": 10, "n": 3,
                     "use_beam_search": True, "logprobs": 1}),  # steps queued as admitted
]


@pytest.mark.parametrize(("endpoint", "body"), REQUESTS)
def test_answers_as_the_engine_on_a_thread(server: Server, auth: dict[str, str],
                                           proc_server: Server, endpoint: str,
                                           body: dict) -> None:
    here = httpx.post(f"{proc_server.v1}/{endpoint}", json=body, timeout=60)
    there = httpx.post(f"{server.v1}/{endpoint}", json=body, headers=auth, timeout=60)
    assert here.status_code == there.status_code == 200, here.text
    assert without_ids(here.json()) == without_ids(there.json())


def test_a_guide_sent_again_goes_by_key_and_answers_alike(server: Server,
                                                           auth: dict[str, str],
                                                           proc_server: Server) -> None:
    """The same guide again (by key, HeldGuides), and another, still answer as the engine
    on a thread does."""
    for regex in ("[a-z]{3,8}( [0-9]+)?", "[a-z]{3,8}( [0-9]+)?", "(yes|no)"):
        body = {"model": "tiny", "prompt": "The dog", "max_tokens": 30, "n": 2,
                "temperature": 1.0, "seed": 4, "guided_regex": regex}
        here = httpx.post(f"{proc_server.v1}/completions", json=body, timeout=60)
        there = httpx.post(f"{server.v1}/completions", json=body, headers=auth, timeout=60)
        assert here.status_code == there.status_code == 200, here.text
        assert without_ids(here.json()) == without_ids(there.json())


def test_embeddings_come_from_the_engine_process(proc_server: Server) -> None:
    """The engine process's pooled vectors reach the answer (the values: test_embeddings)."""
    r = httpx.post(f"{proc_server.v1}/embeddings", json={"input": ["a cat", "a dog"]},
                   timeout=60)
    assert r.status_code == 200, r.text
    vectors = [d["embedding"] for d in r.json()["data"]]
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)


def test_streams_and_counts_as_the_engine_on_a_thread(proc_server: Server) -> None:
    wait_idle(proc_server)
    before = proc_server.metric("llama_serve_generation_tokens_total")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 9, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{proc_server.v1}/completions", json=body, timeout=60) as r:
        events = sse_data(r)
    assert events[-1] == "[DONE]"
    assert '"completion_tokens":9' in events[-2]
    wait_idle(proc_server)  # the gauges come back to 0 from the engine process's reports
    assert proc_server.metric("llama_serve_generation_tokens_total") == before + 9


def test_only_the_engine_process_loads_torch(proc_server: Server) -> None:
    """The server's process keeps HTTP, tokenizing and templates: no torch library mapped."""
    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libtorch" not in maps(proc_server.process.pid)
    assert "libtorch" in maps(engine_pid(proc_server))


def test_bad_requests_never_reach_the_engine_process(proc_server: Server) -> None:
    r = httpx.post(f"{proc_server.v1}/completions",
                   json={"model": "tiny", "prompt": [5000], "max_tokens": 2})
    assert "out of range" in assert_openai_error(r, 400)["message"]
    r = httpx.post(f"{proc_server.v1}/completions",
                   json={"model": "tiny", "prompt": "x", "max_tokens": 600})
    assert assert_openai_error(r, 400)["code"] == "context_length_exceeded"
    assert httpx.get(f"{proc_server.base_url}/health").status_code == 200


def test_a_killed_engine_process_turns_the_server_unavailable(
        long_context_checkpoint: Path, tmp_path: Path) -> None:
    with run_server(long_context_checkpoint, tmp_path, "--engine-process",
                    "--max-model-len", "4096") as server:
        body = {"prompt": [10, 11], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            os.kill(engine_pid(server), signal.SIGKILL)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert "engine process exited" in rest[-2]  # the error event, as any failed stream's
        # The same answer before /health has looked (the first request finds the engine
        # dead) and after (the server is marked failed)
        for _ in range(2):
            late = httpx.post(f"{server.v1}/completions", json={"prompt": "x", "max_tokens": 2})
            error = assert_openai_error(late, 503)
            assert error["code"] == "failed" and "engine process exited" in error["message"]
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        # Its gauges say nothing runs any more, and the stream it failed is counted
        metrics = server.metrics()
        assert metrics["llama_serve_requests_running"] == 0
        assert metrics["llama_serve_kv_cache_slots_used"] == 0
        assert metrics['llama_serve_requests_finished_total{finish_reason="error"}'] == 1
        # Answering `failed` for a while (balancers take it out), then gone, status 1, for a
        # restart policy or a liveness probe to restart it, as vLLM's server exits
        assert server.process.poll() is None
        assert server.process.wait(timeout=FAILED_EXIT_SECONDS + 30) == 1
    assert "the engine died" in server.log() and "exiting in" in server.log()


def test_the_engine_process_exits_with_the_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A server killed outright (no drain) leaves no engine process behind: it sees its
    pipe close."""
    with run_server(tiny_checkpoint, tmp_path, "--engine-process") as server:
        engine = engine_pid(server)
        server.process.kill()
        server.process.wait(timeout=10)
        assert wait_until(lambda: process_gone(engine))


def test_slots_are_read_across_the_process(proc_server: Server) -> None:
    """GET /slots asks the engine process and hears its answer through the pipe: a guided
    request's two samples ran in two slots under one task."""
    r = httpx.post(proc_server.v1 + "/completions", timeout=60, json={
        "model": "tiny", "prompt": "The cow", "max_tokens": 3, "n": 2, "temperature": 1.0,
        "seed": 2, "guided_regex": "[a-z]{3,8}"})
    assert r.status_code == 200, r.text
    slots = httpx.get(proc_server.base_url + "/slots", timeout=60).json()
    assert [slot["id"] for slot in slots] == list(range(8))
    latest = max(slot.get("id_task", -1) for slot in slots)
    ran = [slot for slot in slots if slot.get("id_task") == latest]
    assert len(ran) == 2 and not any(slot["is_processing"] for slot in ran)
    assert sum(slot["next_token"][0]["n_decoded"] for slot in ran) == (
        r.json()["usage"]["completion_tokens"])
    assert {slot["params"]["seed"] for slot in ran} == {2}
