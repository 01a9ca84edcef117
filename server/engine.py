"""Engine: runs scheduler -> runner -> update on its own thread; requests stream back to asyncio.

The asyncio side calls `generate()` (validates, queues, returns an async stream) and
`abort()`; both only touch a thread-safe inbox. The engine thread owns the scheduler, the
KV-cache pool and the model, drains the inbox between steps, and posts each step's outputs
(built by server.outputs.OutputBuilder) to the streams with one `call_soon_threadsafe` per
event loop. No FastAPI here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from model.tokenizer import Tokenizer
from server.memory import release_free_memory
from server.outputs import IterationStats, OutputBuilder
from server.request import FinishReason, RequestOutput, RequestStatus, SamplingParams
from server.runner import ModelRunner, StepResult
from server.scheduler import Request, Scheduler, StepPlan
from server.warmup import failure_message, phases

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3
# How long an idle engine waits on its inbox before it looks at the stop flag again; a whole
# poll with nothing arriving is also the quiet moment it gives freed heap back in.
IDLE_POLL_SECONDS = 0.05


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


class WarmUpFailed(RuntimeError):
    """A start-up warm-up step failed: the server could not run the steps it would be given."""


# What the HTTP side sends the engine thread, through its inbox
@dataclass(frozen=True, slots=True)
class Add:
    request: Request


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class AbortAll:
    pass


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    slots_used: int = 0
    slots_total: int = 0
    tokens_used: int = 0
    tokens_capacity: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    finished_total: Counter[str] = field(default_factory=Counter)

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


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer,
                 max_waiting: int, async_output_proc: bool = False, warmup: bool = False) -> None:
        self.runner = runner
        self._warmup = warmup  # `start` runs warm_up on the engine thread first (EngineConfig
        # turns it on; engines built directly, in tests, start without it)
        # Outputs of a step wait for the next launch (see _step); only where the device runs
        # after a launch returns.
        self._defer_outputs = async_output_proc and runner.asynchronous
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_model_len = scheduler.max_model_len
        self.vocab_size = runner.vocab_size
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[Add | Abort | AbortAll] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # touched under _lock from both sides
        self._lock = threading.Lock()
        self._num_queued = 0  # submitted, not yet given a slot (under _lock)
        self._stats = EngineStats(slots_total=scheduler.n_slots,
                                  tokens_capacity=scheduler.n_slots * scheduler.max_model_len)
        self._outputs = OutputBuilder(tokenizer, scheduler, runner.release,
                                      self._stats.finished_total)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._closed = False  # set (under _lock) when the loop ends: no stream is opened after
        self._listeners: list[Callable[[IterationStats], None]] = []
        # A step's outputs, held until the next step is launched (see _step).
        self._deferred: list[RequestOutput] = []

    # ------------------------------------------------------------------ asyncio side

    def start(self) -> None:
        """Start the engine thread. With warm-up on, the thread runs `warm_up` first (on the
        thread that serves, so per-thread set-up such as the OpenMP team or a cuBLAS handle is
        done too) and this returns once it is done; raises WarmUpFailed if it failed."""
        warmed = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if self._warmup:
                    self._logged_warm_up()
            except BaseException as e:  # noqa: BLE001 - reported by start()
                failure.append(e)
                return
            finally:
                warmed.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="engine", daemon=True)
        self._thread.start()
        warmed.wait()
        if failure:
            self._thread.join()
            raise WarmUpFailed(failure_message(
                failure[0], self.scheduler.max_num_batched_tokens)) from failure[0]

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine loop failed: {self._dead}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("engine loop is not running")

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> RequestStream:
        """Queue a request; raises RequestRejected / EngineOverloaded / EngineDeadError at once,
        so the caller can answer with a status before any streaming starts."""
        self.check_health()
        self._validate(prompt_ids, params)
        if params.max_tokens is None:
            params = _with_max_tokens(params, self.max_model_len - len(prompt_ids))
        stream = RequestStream(request_id, params.n, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise EngineDeadError("the engine stopped")
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already in flight")
            # Free slots take requests at the next step; beyond them, max_waiting may queue.
            free_slots = self.scheduler.n_slots - self._stats.slots_used
            if self._num_queued >= self.max_waiting + free_slots:
                raise EngineOverloaded(
                    f"the server is at capacity: {self._num_queued} requests are queued for "
                    f"{free_slots} free slots and {self.max_waiting} waiting places "
                    f"(--max-waiting); retry later")
            self._num_queued += 1
            self._streams[request_id] = stream
        self._inbox.put(Add(Request(request_id, list(prompt_ids), params)))
        return stream

    @property
    def num_slots(self) -> int:
        """KV-cache slots: sequences run at once."""
        return self.scheduler.n_slots

    @property
    def max_queued(self) -> int:
        """The most requests `generate` takes at once: every slot's, then max_waiting more."""
        return self.scheduler.n_slots + self.max_waiting

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slots are free again before the next step."""
        self._inbox.put(Abort(request_id))

    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished (their streams are still open)."""
        with self._lock:
            return len(self._streams)

    def abort_all(self) -> None:
        """Abort everything in flight; each stream gets a final `abort` output."""
        self._inbox.put(AbortAll())

    def stats(self) -> EngineStats:
        return self._stats

    def add_listener(self, listener: Callable[[IterationStats], None]) -> None:
        """`listener(stats)` runs on the engine thread after every step; keep it cheap."""
        self._listeners.append(listener)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty: it must contain at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})")
        if params.n > self.scheduler.n_slots:
            raise RequestRejected(f"n={params.n} is more than the {self.scheduler.n_slots} "
                                  f"sequences this server runs at once", "n")
        # The fewest tokens the request must produce: max_tokens, else min_tokens (at least 1)
        n_out = params.max_tokens if params.max_tokens is not None else max(params.min_tokens, 1)
        if n_prompt + n_out > self.max_model_len:
            least = " at least, its min_tokens" if params.max_tokens is None else ""
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n_prompt + n_out} tokens ({n_prompt} in the prompt, {n_out} in "
                f"the completion{least}). Please reduce the length of the prompt or "
                f"completion.", None, "context_length_exceeded")

    def warm_up(self) -> list[tuple[int, int]]:
        """Run server/warmup.py's phases through the real step before serving (by `start` on
        the engine thread, or by the caller before `start`), then zero the counters: it leaves
        no trace. Returns each step's (decode rows, prompt tokens); raises StepFailed."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("warm_up runs before serving, not beside it")
        sched, steps = self.scheduler, []

        def run_until(done: Callable[[], bool]) -> None:
            for _ in range(sched.n_slots + 8):  # a bound: a phase takes a few steps
                if done():
                    return
                plan = self._step()
                steps.append((len(plan.decodes), plan.num_tokens - len(plan.decodes)))
            raise StepFailed(f"the warm-up did not finish (steps: {steps})")

        self.runner.bind_thread()
        for phase in phases(sched, self.vocab_size):
            with self._lock:  # counted as queued, as generate() does: admission counts it off
                self._num_queued += len(phase)
            for request in phase:
                sched.add(request)
            seqs = [seq for request in phase for seq in request.seqs]
            run_until(lambda seqs=seqs: all(seq.output_ids for seq in seqs))
        run_until(lambda: not sched.has_work())
        self._reset_counters()
        return steps

    def _logged_warm_up(self) -> None:
        start = time.monotonic()
        steps = self.warm_up()
        logger.info("warm-up: %d steps (decode rows + prompt tokens: %s) in %.2f s", len(steps),
                    ", ".join(f"{d} + {p}" for d, p in steps), time.monotonic() - start)

    def _reset_counters(self) -> None:
        """Zero what the warm-up counted (the metrics read these counters)."""
        stats = self._stats
        stats.prompt_tokens_total = stats.generation_tokens_total = stats.steps_total = 0
        stats.finished_total.clear()  # in place: the output builder holds this Counter
        self.runner.forget_last_step()
        self._refresh_stats()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        failures, trimmed = 0, True
        try:
            self.runner.bind_thread()
            while not self._stopping.is_set():
                busy = self.scheduler.has_work()
                if not busy:
                    self.runner.idle()
                arrived = self._drain_inbox(block=not busy)
                if busy:
                    trimmed = False
                elif not arrived and not trimmed:
                    # A whole poll interval with no work and nothing arriving: a quiet moment
                    # (not the gap before a request already in the inbox) to give freed heap
                    # back, once per idle period (it takes milliseconds on a fragmented heap).
                    release_free_memory()
                    trimmed = True
                if self.scheduler.has_work():
                    try:
                        self._step()
                        failures = 0
                    except StepFailed:
                        failures += 1
                        if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise
                self._refresh_stats()
            self._fail_all("the engine stopped")
        except BaseException as e:  # noqa: BLE001 - whatever killed the loop, report it
            logger.exception("engine loop died")
            self._dead = e
            self._fail_all(f"engine failed: {e!r}")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply everything queued (adds, aborts); whether anything was."""
        try:
            item = (self._inbox.get(timeout=IDLE_POLL_SECONDS) if block
                    else self._inbox.get_nowait())
        except queue.Empty:
            return False
        posts: list[RequestOutput] = []
        while True:
            match item:
                case Add(request):
                    self.scheduler.add(request)
                case Abort(request_id):
                    request = self.scheduler.requests.get(request_id)
                    if request is not None:
                        posts += self._finish_request(request, RequestStatus.FINISHED_ABORTED)
                case AbortAll():
                    for request in list(self.scheduler.requests.values()):
                        posts += self._finish_request(request, RequestStatus.FINISHED_ABORTED)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._post(posts)
        if posts:
            self._emit_iteration()
        return True

    def _step(self) -> StepPlan:
        """One step: schedule, launch, read the sampled tokens back, update, hand out outputs;
        returns its plan.

        With async output processing (CUDA, on unless `--no-async-output-proc`) a step's
        outputs are held until the next step is launched, so that the event loop streams them
        (holding the GIL) while the device computes instead of holding up the next launch.
        Only a graphed decode step's launch returns at once; before an eager one (prefill
        chunks), which reads back from the device as it goes, they are posted first."""
        plan = self.scheduler.schedule()
        admitted = sum(1 for c in plan.prefills if c.start == 0)
        if admitted:
            with self._lock:
                self._num_queued -= admitted
        if plan.num_tokens == 0:
            self._post([])  # the last step's outputs, if held
            return plan
        overlap = self._defer_outputs and self.runner.launches_async(plan)
        if not overlap:
            self._post([])
        try:
            pending = self.runner.launch(plan)
            if overlap:
                self._post([])  # the last step's outputs, while this one runs
            result = self.runner.finish(pending)
        except Exception as e:
            # One forward serves the whole batch, so its requests fail together; the engine
            # and everything not in this step go on.
            self.runner.idle()  # the next gap would count this failure
            logger.exception("step failed")
            requests = {c.request for c in plan.prefills} | {s.request for s in plan.decodes}
            posts = []
            for request in requests:
                posts += self._finish_request(request, RequestStatus.FINISHED_ERROR, repr(e))
            self._post(posts)
            raise StepFailed(f"a step failed: {e!r}") from e
        n_prompt = sum(len(c.token_ids) for c in plan.prefills)
        self._stats.steps_total += 1
        self._stats.prompt_tokens_total += n_prompt
        self._stats.generation_tokens_total += len(result.tokens)
        it = self._outputs.iteration
        it.batch_size = len(plan.decodes) + len(plan.prefills)
        it.num_prompt_tokens, it.num_generation_tokens = n_prompt, len(result.tokens)
        it.timing = result.timing
        self.scheduler.update(plan, result.tokens, result.logprobs)
        outputs = self._step_outputs(plan, result)
        self._emit_iteration()  # first: a client that sees its last token sees it counted
        if self._defer_outputs and self.scheduler.has_work():
            self._deferred = outputs  # posted by the next step (see above)
        else:
            self._post(outputs)
        return plan

    def _emit_iteration(self) -> None:
        it = self._outputs.take_iteration()
        for listener in self._listeners:
            try:
                listener(it)
            except Exception:  # metrics must never take the engine down
                logger.exception("stats listener failed")

    def _step_outputs(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        for request, logprobs in result.prompt_logprobs:
            request.prompt_logprobs.extend(logprobs)
        posts = []
        for seq, token in zip(plan.sampled, result.tokens, strict=True):
            try:
                posts.append(self._outputs.sequence_output(seq, token))
            except Exception as e:  # a failure in one request's output fails that request
                logger.exception("request %s failed", seq.request.request_id)
                posts += self._finish_request(seq.request, RequestStatus.FINISHED_ERROR, repr(e))
        for chunk in plan.prefills:  # scoring requests (max_tokens=0) end with their prefill
            if chunk.is_last and chunk.request.params.scores_only:
                posts += [self._outputs.final(seq, "") for seq in chunk.request.seqs]
        return posts

    def _finish_request(self, request: Request, status: RequestStatus,
                        error: str = "") -> list[RequestOutput]:
        """Finish every unfinished sample of a request, with a final output for each."""
        if any(s.status == RequestStatus.WAITING for s in request.seqs):
            with self._lock:
                self._num_queued -= 1
        open_seqs = [s for s in request.seqs if not s.status.is_finished]
        self.scheduler.finish_request(request, status)
        return [self._outputs.final(seq, error) for seq in open_seqs]

    def _post(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams, after any the last step deferred (so a stream never
        sees them out of order): one thread-safe callback per event loop."""
        if self._deferred:
            outputs, self._deferred = self._deferred + outputs, []
        if not outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, out))
            for out in outputs:  # all samples finished: the stream gets no more
                if out.finished and out.request_id not in self.scheduler.requests:
                    self._streams.pop(out.request_id, None)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop closed (server shutting down)
                pass

    def _refresh_stats(self) -> None:
        s, sched = self._stats, self.scheduler
        s.num_running = len({q.request for q in sched.decoding}) + len(sched.prefilling)
        s.num_waiting = len(sched.waiting)
        s.slots_used = sched.num_used_slots
        s.tokens_used = sched.num_used_tokens

    def _fail_all(self, message: str) -> None:
        """End every stream: the scheduler's requests, and those accepted by `generate()` but
        still in the inbox, whose clients would otherwise wait forever."""
        with self._lock:
            self._closed = True
            queued = [s for rid, s in self._streams.items() if rid not in self.scheduler.requests]
        posts = []
        for request in list(self.scheduler.requests.values()):
            posts += self._finish_request(request, RequestStatus.FINISHED_ERROR, message)
        posts += [RequestOutput(s.request_id, i, finish_reason=FinishReason.ERROR, error=message)
                  for s in queued for i in range(s.n)]
        self._stats.finished_total[FinishReason.ERROR.value] += sum(s.n for s in queued)
        self._post(posts)


class StepFailed(RuntimeError):
    """A forward pass raised; its requests were failed."""


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(output)


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return replace(params, max_tokens=max_tokens)
