"""What the asyncio side of an engine calls, and what crosses to the engine: no torch here.

`EngineFront` is the interface the HTTP layer uses (generate, abort, stats, listeners): the
in-process `Engine` (server/engine.py) and the proxy of an engine process
(server/engine_process.py) both implement it. Requests are validated and admitted here, before
they reach the engine, so a client hears 400 or 503 at once; outputs come back through a
`StreamTable`, fed from the engine's thread (or the reader of its process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass, field, replace
from pathlib import Path

from model.tokenizer import Tokenizer
from server.outputs import IterationStats
from server.request import FinishReason, Request, RequestOutput, SamplingParams
from server.scheduler import SlotState

logger = logging.getLogger(__name__)


# What a step's rows are (scheduler.StepPlan.kind): decode rows only, prompt chunks beside
# decode rows, prompt chunks only
STEP_KINDS = ("decode", "mixed", "prefill")
# How long GET /slots waits for the engine loop to read its slots (between two steps: a long
# prompt chunk on a CPU takes seconds)
SLOTS_TIMEOUT_SECONDS = 30.0


class RequestRejected(ValueError):
    """The request can never be served as asked (HTTP 400); `param` names the field at fault,
    `code` is OpenAI's error code where it has one."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped; nothing more will be served (HTTP 503, /health fails)."""


class SlotsUnavailable(RuntimeError):
    """The engine did not tell its slots' states (GET /slots: 503)."""


# What the HTTP side sends the engine thread, through its inbox
@dataclass(frozen=True, slots=True)
class Add:
    request: Request
    # The queue places the admission check asks for: None, the request's n; a beam search
    # asks for its n beams' at its first step, and none at the later ones (it was admitted)
    places: int | None = None


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class AbortAll:
    pass


@dataclass(frozen=True, slots=True)
class SlotsQuery:
    """Asks the engine loop for every slot's state (GET /slots), answered between two steps
    through EngineFront.answer_slots."""

    query_id: int


InboxItem = Add | Abort | AbortAll | SlotsQuery


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    slots_used: int = 0
    slots_total: int = 0
    tokens_used: int = 0
    tokens_capacity: int = 0
    prompt_tokens_total: int = 0
    # ... counted again for each further sample of a request (vLLM runs each of n as a request
    # of its own and counts its prompt for each: vllm:prompt_tokens_total)
    sample_prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: Counter[str] = field(default_factory=Counter)  # by kind, STEP_KINDS
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # ... and copied from it
    finished_total: Counter[str] = field(default_factory=Counter)
    # Admission (under the engine's lock), counted in samples (a request of n takes n slots):
    # those taken and not yet given a slot, and all ever taken, so that a proxy in another
    # process can tell which of its own sends a snapshot has seen
    num_queued: int = 0
    num_received: int = 0
    # The LoRA adapters of the requests running and waiting, and when these were read
    # (vLLM's lora_requests_info: routers send a request where its adapter already runs)
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    loras_read_time: float = 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Tokens held / the pool's capacity, 0 to 1."""
        return self.tokens_used / self.tokens_capacity if self.tokens_capacity else 0.0


class RequestStream:
    """Async iterator over one request's outputs; ends after every sample has finished."""

    # A deque and one waiter rather than an asyncio.Queue: this runs for every streamed token,
    # with one reader and no bound, and the queue's bookkeeping was a tenth of that path.
    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.n = n
        self.loop = loop
        self._outputs: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader, while it waits
        self._unfinished = n

    def put(self, output: RequestOutput) -> None:  # called on the event loop
        self._outputs.append(output)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            if not self._outputs:
                self._waiter = self.loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            output = self._outputs.popleft()
            if output.finished:
                self._unfinished -= 1
            yield output


class StreamTable:
    """The open streams by request id. Opened on the event loop, fed from another thread
    (the engine's, or the reader of an engine process), so every method takes the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, RequestStream] = {}
        self._open: dict[str, set[int]] = {}  # samples not finished yet, as delivered
        self._closed = False  # no stream opens after `close`

    def open(self, request_id: str, n: int) -> RequestStream:
        stream = RequestStream(request_id, n, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine stopped")
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
            self._open[request_id] = set(range(n))
        return stream

    def discard(self, request_id: str) -> None:
        """Forget a stream that was opened for a request then refused."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._open.pop(request_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one thread-safe callback per event loop. A stream
        whose samples have all finished is forgotten."""
        if not outputs:  # the engine posts every step, with or without outputs
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                by_loop.setdefault(stream.loop, []).append((stream, out))
                if out.finished:
                    samples = self._open[out.request_id]
                    samples.discard(out.index)
                    if not samples:
                        del self._streams[out.request_id], self._open[out.request_id]
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed (server shutting down)
                pass

    def close(self, message: str, skip: Container[str] = ()) -> list[RequestOutput]:
        """Open no more streams; returns an error output for every open sample of the streams
        not in `skip` (whose requests are ended otherwise), for the caller to deliver."""
        with self._lock:
            self._closed = True
            return [RequestOutput(rid, i, finish_reason=FinishReason.ERROR, error=message)
                    for rid, samples in self._open.items() if rid not in skip
                    for i in sorted(samples)]


def validate_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int,
                     num_slots: int, max_model_len: int,
                     lora_names: frozenset[str] = frozenset()) -> None:
    """Raise RequestRejected for a request that no engine of these sizes (and LoRA
    adapters) can serve."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise RequestRejected("the prompt is empty: it must contain at least one token")
    if params.lora is not None and params.lora not in lora_names:
        raise RequestRejected(f"no LoRA adapter {params.lora!r} is loaded", "model")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary "
                              f"[0, {vocab_size})")
    budget = params.thinking_budget
    if budget is not None and not 0 <= budget.end_id < vocab_size:  # (the runner forces it)
        raise RequestRejected(f"the thinking's end tag {budget.end_id} is outside the "
                              f"vocabulary [0, {vocab_size})", "thinking_token_budget")
    if params.n > num_slots:
        raise RequestRejected(f"n={params.n} is more than the {num_slots} sequences this server "
                              f"runs at once", "n")
    # The fewest tokens the request must produce: max_tokens, else min_tokens (at least 1)
    n_out = params.max_tokens if params.max_tokens is not None else max(params.min_tokens, 1)
    if n_prompt + n_out > max_model_len:
        completion = f"{n_out} in the completion"
        if params.max_tokens is None:  # left to the context: what it must leave room for
            completion = "at least " + completion + (
                ", its min_tokens" if params.min_tokens > 1 else "")
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n_prompt + n_out} tokens ({n_prompt} in the prompt, {completion}). "
            f"Please reduce the length of the prompt or completion.",
            None, "context_length_exceeded")


def check_admission(num_queued: int, free_slots: int, max_waiting: int, n: int = 1) -> None:
    """Free slots take samples at the next step; beyond them, max_waiting may queue. All in
    samples: a request of `n` needs n places, as it needs n slots."""
    if num_queued + n > max_waiting + free_slots:
        raise EngineOverloaded(
            f"the server is at capacity: {num_queued} samples are queued for {free_slots} free "
            f"slots and {max_waiting} waiting places (--max-waiting), and this request has "
            f"{n}; retry later")


class AdapterExists(ValueError):
    """A LoRA adapter of this name is loaded already."""


class AdapterRefused(ValueError):
    """A LoRA adapter this server cannot serve (model/lora.py's LoraError, without torch)."""


class RuntimeLoraUnavailable(RuntimeError):
    """This engine cannot change its LoRA adapters while it serves."""


class EngineFront(ABC):
    """What the asyncio side calls, shared by the in-process Engine and the proxy of an
    engine process (server/engine_process.py): requests in, streams out."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    max_waiting: int
    num_slots: int  # KV-cache slots: sequences run at once
    lora_names: frozenset[str] = frozenset()  # the LoRA adapters loaded (SamplingParams.lora)

    def __init__(self) -> None:
        self.streams = StreamTable()
        self.beam_searches = 0  # running (server/beam_search.py; on the event loop)
        self.aborted_all = False  # (shutting down: abort_all was called)
        self._listeners: list[Callable[[IterationStats], None]] = []
        self._slot_queries: dict[int, concurrent.futures.Future[list[SlotState]]] = {}
        self._query_ids = itertools.count()

    @abstractmethod
    def start(self) -> None:
        """Start serving; returns once warmed up and ready."""

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; every stream still open ends with an error output."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise EngineDeadError unless the engine loop is running."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """The counters and gauges the metrics read, as of the last step."""

    def load_adapter(self, name: str, folder: Path) -> None:
        """Load a LoRA adapter while serving, for requests admitted from now on (on a worker
        thread: it reads files). AdapterRefused for one that cannot be served, AdapterExists
        for a name taken."""
        raise RuntimeLoraUnavailable("LoRA adapters are loaded and unloaded while serving in "
                                     "the server's process only (not with --engine-process)")

    def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter: new requests may no longer name it; those admitted keep it
        to their end. KeyError for a name not loaded."""
        raise RuntimeLoraUnavailable("LoRA adapters are loaded and unloaded while serving in "
                                     "the server's process only (not with --engine-process)")

    @abstractmethod
    def _enqueue(self, item: InboxItem) -> None:
        """Pass an item to the engine loop; an Add is first checked against the queue's room
        (raises EngineOverloaded)."""

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str, places: int | None = None) -> RequestStream:
        """Queue a request; raises RequestRejected / EngineOverloaded / EngineDeadError at once,
        so the caller can answer with a status before any streaming starts. `places`: what
        the admission check asks room for, where not the request's n (Add.places)."""
        self.check_health()
        self.validate(prompt_ids, params)
        if params.max_tokens is None:  # left to the context (SamplingParams)
            room = self.max_model_len - len(prompt_ids)
            params = replace(params, max_tokens=params.max_tokens_within(room))
        stream = self.streams.open(request_id, params.n)
        try:
            self._enqueue(Add(Request(request_id, list(prompt_ids), params), places))
        except BaseException:
            self.streams.discard(request_id)
            raise
        return stream

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestRejected if `generate` would refuse the request for what it asks."""
        validate_request(prompt_ids, params, self.vocab_size, self.num_slots, self.max_model_len,
                         self.lora_names)

    @property
    def max_queued(self) -> int:
        """The most samples `generate` takes at once (a request of n counts n): every slot's,
        then max_waiting more."""
        return self.num_slots + self.max_waiting

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots are free again before the next step."""
        self._enqueue(Abort(request_id))

    def abort_all(self) -> None:
        """Abort everything in flight; each stream gets a final `abort` output (and a beam
        search, between its steps, starts no other)."""
        self.aborted_all = True
        self._enqueue(AbortAll())

    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished (their streams are still open), and beam
        searches running (between their steps they have none)."""
        return len(self.streams) + self.beam_searches

    async def slot_states(self) -> list[SlotState]:
        """Every KV-cache slot's state, read by the engine loop between two steps. Raises
        SlotsUnavailable if it could not read them or has not answered within
        SLOTS_TIMEOUT_SECONDS, EngineDeadError once it is gone."""
        self.check_health()
        query_id = next(self._query_ids)
        answer: concurrent.futures.Future[list[SlotState]] = concurrent.futures.Future()
        self._slot_queries[query_id] = answer
        waited = asyncio.wrap_future(answer)
        try:
            self._enqueue(SlotsQuery(query_id))
            for _ in range(int(SLOTS_TIMEOUT_SECONDS)):
                try:  # (a second at a time: an engine that dies meanwhile never answers)
                    return await asyncio.wait_for(asyncio.shield(waited), 1.0)
                except (TimeoutError, asyncio.TimeoutError):  # (two classes before 3.11)
                    self.check_health()
            raise SlotsUnavailable("the engine did not report its slots in time")
        finally:
            waited.cancel()
            self._slot_queries.pop(query_id, None)

    def answer_slots(self, query_id: int, states: list[SlotState] | None) -> None:
        """The engine's answer to a SlotsQuery (on the thread that hears it); None: it could
        not read its slots."""
        answer = self._slot_queries.get(query_id)
        if answer is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # (given up)
                if states is None:
                    answer.set_exception(SlotsUnavailable("the engine could not read its slots"))
                else:
                    answer.set_result(states)

    def _fail_slot_queries(self, message: str) -> None:
        """The engine is gone: GET /slots waits no longer for an answer."""
        for answer in list(self._slot_queries.values()):
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                answer.set_exception(EngineDeadError(message))

    def add_listener(self, listener: Callable[[IterationStats], None]) -> None:
        """`listener(stats)` runs after every step, on the thread that hears of it; keep it
        cheap."""
        self._listeners.append(listener)

    def _notify(self, it: IterationStats) -> None:
        for listener in self._listeners:
            try:
                listener(it)
            except Exception:  # metrics must never take the engine down
                logger.exception("stats listener failed")


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(output)


