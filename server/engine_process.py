"""The engine in a process of its own, and its proxy on the HTTP side (vLLM V1's layout).

In one process the event loop that streams every token holds the GIL the engine thread needs
between its C calls: at 16 streams on 2 cores it took about 0.5 ms of each ~7 ms step, and a
flood of cheap requests (health checks, 4xx) cut generation several times over. Here the
engine runs in a child process (spawned: no fork after threads exist), and this process keeps
HTTP, tokenization and chat templates. They talk over one pipe:

- to the core: `Add` (an admitted request), `Abort`, `AbortAll`, `Stop`;
- to the proxy: `Ready` once warmed up (or `Failed`), then a `StepReport` per step (its
  outputs, its IterationStats, a snapshot of the engine's stats), and `Died` if the loop dies.

The proxy admits requests itself against the last snapshot (`EngineFront.generate`), counting
the requests the snapshot has not seen yet, so a request is refused or accepted at once with
no round trip. A reader thread turns reports into stream outputs and metrics, as the engine
thread does in one process. The core exits when the pipe closes: nothing outlives the server.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from model.tokenizer import Tokenizer
from server.config import EngineConfig
from server.engine_front import (
    Add,
    EngineDeadError,
    EngineFront,
    EngineStats,
    InboxItem,
    check_admission,
)
from server.guided.spec import Guide
from server.memory import freeze_startup_objects
from server.outputs import IterationStats
from server.request import FinishReason, Request, RequestOutput, SamplingParams
from server.scheduler import SlotState

if TYPE_CHECKING:
    from server.engine import Engine

logger = logging.getLogger(__name__)

# How long the core waits on its pipe before it looks at the engine's health again
CORE_POLL_SECONDS = 0.5
# Compiled guides the engine process keeps, to be named by key (HeldGuides)
HELD_GUIDES = 64


@dataclass(frozen=True, slots=True)
class AddGuided:
    """An Add whose guide the engine process holds already, sent by its key: a compiled
    guide pickles to 0.01-3 MB (any JSON object's: 0.4 MB, 1.8 ms to write on the event loop,
    1.6 ms to read in the core), for every request that follows it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # its guide left out
    arrival_time: float
    guide_key: str


class HeldGuides:
    """The guides the engine process holds, the same on both ends of the pipe: each end
    records every guided Add in the one order the pipe carries them (the proxy once it is
    sent), the least recently used dropped past `capacity` alike, so the proxy knows which
    the core still has. The proxy keeps their keys only."""

    def __init__(self, capacity: int = HELD_GUIDES) -> None:
        self.capacity = capacity
        self._guides: OrderedDict[str, Guide | None] = OrderedDict()

    def hold(self, key: str, guide: Guide | None = None) -> None:
        """Record a guided Add (the core keeps the guide itself)."""
        self._guides[key] = guide
        self._guides.move_to_end(key)
        while len(self._guides) > self.capacity:
            self._guides.popitem(last=False)

    def outgoing(self, item: Add) -> Add | AddGuided:
        """The proxy's: the Add to send, its guide by key where the core holds it."""
        request = item.request
        guide = request.params.guide
        if guide is None or guide.key not in self._guides:
            return item
        return AddGuided(request.request_id, request.prompt_ids,
                         replace(request.params, guide=None), request.arrival_time, guide.key)

    def incoming(self, item: Add | AddGuided) -> Add:
        """The core's: the Add received (recorded), its guide found again where it came by
        key."""
        if isinstance(item, Add):
            if (guide := item.request.params.guide) is not None:
                self.hold(guide.key, guide)
            return item
        guide = self._guides[item.guide_key]
        assert guide is not None, "the core keeps its guides"
        self.hold(item.guide_key, guide)
        return Add(Request(item.request_id, item.prompt_ids, replace(item.params, guide=guide),
                           arrival_time=item.arrival_time))


class EngineStartFailed(RuntimeError):
    """The engine process could not load or warm up; the message is its reason."""


# ---------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Stop:
    """End the engine (every stream still open gets an error output) and the process."""


@dataclass(frozen=True, slots=True)
class Ready:
    vocab_size: int
    max_model_len: int
    num_slots: int
    max_waiting: int
    stats: EngineStats
    lora_names: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Failed:
    message: str


@dataclass(frozen=True, slots=True)
class StepReport:
    outputs: list[RequestOutput]
    iterations: list[IterationStats]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class SlotsReport:
    """The engine's answer to a SlotsQuery."""

    query_id: int
    states: list[SlotState] | None  # None: they could not be read


@dataclass(frozen=True, slots=True)
class Died:
    message: str


# ---------------------------------------------------------------------- the child


def run_core(conn: Connection, folder: Path, config: EngineConfig, chat_template: str | None,
             log_level: str) -> None:
    """The engine process: build and warm up the engine, then serve the pipe until it closes
    or says Stop."""
    # Ctrl-C, and a SIGTERM to the whole process group (systemd's default), reach this process
    # too; the server drains first, then stops it (Stop, the pipe closing, or a SIGKILL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A server that dies outright (SIGKILL, or a signal uvicorn re-raises at exit) takes this
    # process along at once, even in the middle of loading, when nothing reads the pipe.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch",
                         daemon=True).start()
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    from server.startup import build_engine  # torch: only in this process

    built: list[Engine] = []

    def load() -> None:
        try:
            engine = build_engine(folder, config, chat_template)
            engine.start()
            built.append(engine)
        except Exception as e:  # noqa: BLE001 - any failure is reported to the proxy
            logger.error("the engine could not start: %s", e,
                         exc_info=not isinstance(e, ValueError))
            with contextlib.suppress(OSError):
                conn.send(Failed(str(e)))

    # Loaded on a thread that then ends, as in one process (server/app.py): loading runs
    # OpenMP regions, and a thread that had run them and stayed alive beside the engine's
    # would double libgomp's threads past the CPUs (measured: the forward 40% slower).
    loader = threading.Thread(target=load, name="loader")
    loader.start()
    loader.join()
    if not built:
        return
    engine = built[0]
    iterations: list[IterationStats] = []
    send_lock = threading.Lock()  # the engine thread reports; this thread may report a death

    def report(outputs: list[RequestOutput]) -> None:  # the engine's output sink
        if not outputs and not iterations:
            return
        message = StepReport(outputs, iterations[:], engine.stats_snapshot())
        iterations.clear()
        with send_lock:
            try:
                conn.send(message)
            except OSError:  # the server is gone; this process's main thread sees it and ends
                pass

    def report_slots(query_id: int, states: list[SlotState] | None) -> None:  # (engine thread)
        with send_lock, contextlib.suppress(OSError):
            conn.send(SlotsReport(query_id, states))  # (pickled first: a failure sends nothing)

    engine.add_listener(iterations.append)  # sent with the step's outputs (Engine._post)
    engine.output_sink = report
    engine.slots_sink = report_slots
    guides = HeldGuides()
    freeze_startup_objects()
    try:
        conn.send(Ready(engine.vocab_size, engine.max_model_len, engine.num_slots,
                        engine.max_waiting, engine.stats_snapshot(), engine.lora_names))
        while True:
            # Every pass, not only when idle: requests keep arriving to a dead engine too.
            engine.check_health()
            if not conn.poll(CORE_POLL_SECONDS):
                continue
            item = conn.recv()
            if isinstance(item, Stop):
                break
            engine.put(guides.incoming(item) if isinstance(item, Add | AddGuided) else item)
    except EngineDeadError as e:
        with send_lock, contextlib.suppress(OSError):
            conn.send(Died(str(e)))
    except (EOFError, OSError):  # the server went away
        pass
    finally:
        engine.stop()


def _exit_with(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns once the server's process has ended
    os._exit(0)


# ---------------------------------------------------------------------- the proxy


class EngineProcess(EngineFront):
    """The HTTP side's engine: the same calls as Engine's, served by a child process."""

    def __init__(self, folder: Path, config: EngineConfig, chat_template: str | None = None,
                 log_level: str = "info", core: Callable[..., None] = run_core) -> None:
        """`core` is the child's entry point (run_core's arguments): a module-level function,
        since the child imports it; tests pass one that breaks the engine first."""
        super().__init__()
        self.tokenizer = Tokenizer.for_model(folder, config.tokenizer, chat_template)
        self._stats = EngineStats()
        self._sent = 0  # samples of the Adds sent; the core counts those it took in num_received
        self._send_lock = threading.Lock()  # event loops, the drain thread and stop() send
        self._guides = HeldGuides()  # (changed under the send lock, in the pipe's order)
        self._dead: str | None = None
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._child_conn = child_conn
        self._process = context.Process(
            target=core, args=(child_conn, folder, config, chat_template, log_level),
            name="engine-core", daemon=True)
        self._reader: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the engine process and wait until it has warmed up; raises EngineStartFailed
        with its reason if it could not."""
        self._process.start()
        self._child_conn.close()  # the child's end: EOF here once the child is gone
        # Before multiprocessing's own exit handler, which would only SIGTERM it (ignored, see
        # run_core) and wait: a server leaving while the engine loads must not hang on it.
        atexit.register(self.stop)
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            raise EngineStartFailed(f"the engine process exited with code "
                                    f"{self._process.exitcode} before it was ready") from None
        if isinstance(message, Failed):
            self._process.join()
            raise EngineStartFailed(message.message)
        assert isinstance(message, Ready), message
        self.vocab_size, self.max_model_len = message.vocab_size, message.max_model_len
        self.num_slots, self.max_waiting = message.num_slots, message.max_waiting
        self.lora_names = message.lora_names
        self._stats = message.stats
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        atexit.unregister(self.stop)
        try:
            with self._send_lock:
                self._conn.send(Stop())
        except OSError:  # already gone
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        if self._reader is not None:
            self._reader.join(timeout)

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self._reader is None or not self._reader.is_alive():
            raise EngineDeadError("the engine process's outputs are no longer read")
        if not self._process.is_alive():
            raise EngineDeadError(f"the engine process exited with code "
                                  f"{self._process.exitcode}")

    def stats(self) -> EngineStats:
        return self._stats

    def _enqueue(self, item: InboxItem) -> None:
        with self._send_lock:
            if not isinstance(item, Add):
                # An abort to a dead engine is moot: the reader ends its streams
                with contextlib.suppress(OSError):
                    self._conn.send(item)
                return
            # Queued: those the last report counted, and those sent since it
            stats = self._stats
            n = item.request.params.n
            places = n if item.places is None else item.places
            if places:
                check_admission(stats.num_queued + self._sent - stats.num_received,
                                self.num_slots - stats.slots_used, self.max_waiting, places)
            try:
                self._conn.send(self._guides.outgoing(item))
            except OSError as e:
                raise EngineDeadError(f"the engine process is gone: {e}") from None
            if (guide := item.request.params.guide) is not None:
                self._guides.hold(guide.key)  # (once sent: the core has recorded it too)
            self._sent += n

    def _read(self) -> None:
        """The reader thread: reports -> metrics listeners and streams, until the pipe ends;
        then every stream still open ends with an error, whatever ended the reading."""
        try:
            while True:
                match self._conn.recv():
                    case StepReport(outputs, iterations, stats):
                        self._stats = stats
                        for it in iterations:  # first: a client that sees its last token
                            self._notify(it)   # sees it counted
                        self.streams.deliver(outputs)
                    case SlotsReport(query_id, states):
                        self.answer_slots(query_id, states)
                    case Died(message):
                        self._dead = message
        except (EOFError, OSError):
            pass
        except BaseException:
            logger.exception("reading the engine process failed")
            self._dead = "reading the engine process failed"
            raise
        finally:
            self._closed()

    def _closed(self) -> None:
        if self._dead is None:
            self._process.join(1.0)  # the pipe closes as the process exits
            self._dead = (f"the engine process exited with code {self._process.exitcode}"
                          if not self._stopping else "the engine stopped")
        if not self._stopping:
            logger.error("engine process: %s", self._dead)
        self._fail_slot_queries(self._dead)
        failed = self.streams.close(self._dead)
        # Its last report's gauges no longer hold: nothing runs, and what was open failed
        finished = Counter(self._stats.finished_total)
        finished[FinishReason.ERROR.value] += len(failed)
        self._stats = replace(self._stats, num_running=0, num_waiting=0, num_queued=0,
                              slots_used=0, tokens_used=0, finished_total=finished)
        self.streams.deliver(failed)
