"""Engine: runs scheduler -> runner -> update on its own thread; requests stream back to asyncio.

The asyncio side calls `generate()` (validates, queues, returns an async stream) and
`abort()` (server/engine_front.py); both only touch a thread-safe inbox. The engine thread
owns the scheduler, the KV-cache pool and the model, drains the inbox between steps, and posts
each step's outputs (built by server.outputs.OutputBuilder) to the streams with one
`call_soon_threadsafe` per event loop, or, in an engine process, to its pipe. No FastAPI here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from model.tokenizer import Tokenizer
from server.engine_front import (
    Abort,
    AbortAll,
    AdapterExists,
    AdapterRefused,
    Add,
    EngineDeadError,
    EngineFront,
    EngineStats,
    InboxItem,
    RequestRejected,
    SlotsQuery,
    check_admission,
)
from server.memory import release_free_memory
from server.outputs import OutputBuilder
from server.request import FinishReason, Request, RequestOutput, RequestStatus
from server.runner import ModelRunner, PendingStep, StepResult
from server.scheduler import Scheduler, SlotState, StepPlan
from server.warmup import failure_message, phases

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3
# How long an idle engine waits on its inbox before it looks at the stop flag again; a whole
# poll with nothing arriving is also the quiet moment it gives freed heap back in.
IDLE_POLL_SECONDS = 0.05


class WarmUpFailed(RuntimeError):
    """A start-up warm-up step failed: the server could not run the steps it would be given."""


class Engine(EngineFront):
    """The engine loop on a thread of this process. Its outputs go to its own streams, or,
    in an engine process, to `output_sink` (set before `start`)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer,
                 max_waiting: int, async_output_proc: bool = False, warmup: bool = False,
                 async_scheduling: bool = False, max_lora_rank: int = 16,
                 max_loras: int | None = None) -> None:
        super().__init__()
        self.runner = runner
        self.max_lora_rank = max_lora_rank  # of adapters loaded while serving
        self.max_loras = max_loras  # the most loaded at once (None: no cap)
        self._warmup = warmup  # `start` runs warm_up on the engine thread first (EngineConfig
        # turns it on; engines built directly, in tests, start without it)
        # Async output processing (see _step): a step's outputs wait for the next step to be
        # computing. CUDA: posted once its launch returns; CPU: from inside the launch, as
        # its forward starts.
        self._hold_outputs = async_output_proc
        self._defer_outputs = async_output_proc and runner.asynchronous
        self._post_from_forward = async_output_proc and not runner.asynchronous
        # The next decode step is launched before this one's tokens are read (see _step).
        self._async_scheduling = async_scheduling
        self._ahead: tuple[StepPlan, PendingStep] | None = None
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.max_model_len = scheduler.max_model_len
        self.vocab_size = runner.vocab_size
        self.lora_names = frozenset(runner.adapters)
        self.num_slots = scheduler.n_slots
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self.output_sink: Callable[[list[RequestOutput]], None] = self.streams.deliver
        # Where the answers to SlotsQuery go: this front's, or an engine process's pipe
        self.slots_sink: Callable[[int, list[SlotState] | None], None] = self.answer_slots
        self._lock = threading.Lock()  # admission: the stats' num_queued / slots_used
        self._stats = EngineStats(slots_total=scheduler.n_slots,
                                  tokens_capacity=scheduler.n_slots * scheduler.max_model_len)
        self._outputs = OutputBuilder(tokenizer, scheduler, runner.release,
                                      self._stats.finished_total)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        # A step's outputs, held until the next step computes (see _step).
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

    def _enqueue(self, item: InboxItem) -> None:
        self.put(item, admit=True)

    def put(self, item: InboxItem, admit: bool = False) -> None:
        """Pass an item to the engine loop; an Add is counted as queued, after the admission
        check if `admit` (an engine process's requests were admitted by its proxy) for the
        places it asks (Add.places)."""
        if isinstance(item, Add):
            lora = item.request.params.lora
            if lora is not None:  # its adapter now: it may be unloaded while the request runs
                adapter = self.runner.adapters.get(lora)
                if adapter is None:
                    raise RequestRejected(f"no LoRA adapter {lora!r} is loaded", "model")
                item.request.adapter = adapter
            with self._lock:  # checked and counted at once: two loops may call generate()
                n = item.request.params.n
                places = n if item.places is None else item.places
                if admit and places:
                    check_admission(self._stats.num_queued,
                                    self.num_slots - self._stats.slots_used, self.max_waiting,
                                    places)
                self._stats.num_queued += n
                self._stats.num_received += n
        self._inbox.put(item)

    def stats(self) -> EngineStats:
        return self._stats

    def load_adapter(self, name: str, folder: Path) -> None:
        import torch

        from model.lora import LoraError, load_adapter  # (torch: the engine's side only)

        if self.max_loras is not None and len(self.runner.adapters) >= self.max_loras:
            raise AdapterRefused(f"{len(self.runner.adapters)} LoRA adapters are loaded, "
                                 f"--max-loras {self.max_loras}: unload one first")
        model = self.runner.model
        try:
            adapter = load_adapter(name, folder, model.config,
                                   model.model.embed_tokens.weight.dtype, self.runner.device,
                                   self.max_lora_rank)
        except LoraError as e:
            raise AdapterRefused(str(e)) from None
        except torch.cuda.OutOfMemoryError as e:  # (torch.OutOfMemoryError from torch 2.5)
            raise AdapterRefused(f"LoRA adapter {name!r} does not fit in device memory ({e})"
                                 ) from None
        with self._lock:  # (a new dict: the engine thread reads the one it holds)
            if name in self.runner.adapters:
                raise AdapterExists(f"The lora adapter '{name}' has already been loaded.")
            if self.max_loras is not None and len(self.runner.adapters) >= self.max_loras:
                raise AdapterRefused(f"--max-loras {self.max_loras} adapters are loaded")
            self.runner.adapters = {**self.runner.adapters, name: adapter}
            self.lora_names = frozenset(self.runner.adapters)
        logger.info("LoRA adapter %s loaded from %s, rank %d", name, folder, adapter.rank)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.runner.adapters:
                raise KeyError(name)
            self.runner.adapters = {k: v for k, v in self.runner.adapters.items() if k != name}
            self.lora_names = frozenset(self.runner.adapters)
        logger.info("LoRA adapter %s unloaded", name)

    def stats_snapshot(self) -> EngineStats:
        """A copy of the stats as they are now (engine thread): to send to another process."""
        self._refresh_stats()
        with self._lock:
            return replace(self._stats, finished_total=Counter(self._stats.finished_total),
                           steps_total=Counter(self._stats.steps_total))

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
        for phase in phases(sched, self.vocab_size, next(iter(sorted(self.lora_names)), None)):
            with self._lock:  # counted as queued, as generate() does: admission counts it off
                self._stats.num_queued += sum(len(request.seqs) for request in phase)
            for request in phase:
                request.adapter = self.runner.adapters.get(request.params.lora or "")
                sched.add(request)
            seqs = [seq for request in phase for seq in request.seqs]
            run_until(lambda seqs=seqs: all(seq.output_ids for seq in seqs))
        run_until(lambda: not self._has_work())
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
        stats.prompt_tokens_total = stats.generation_tokens_total = 0
        stats.sample_prompt_tokens_total = 0
        stats.steps_total = Counter()
        stats.finished_total.clear()  # in place: the output builder holds this Counter
        stats.prefix_cache_queries_total = stats.prefix_cache_hits_total = 0
        self.runner.forget_last_step()
        self.scheduler.forget_cached_prefixes()  # nor a prefix cache: serving starts empty
        self.scheduler.forget_slot_history()  # nor the warm-up's tasks in GET /slots
        self._refresh_stats()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        failures, trimmed = 0, True
        try:
            self.runner.bind_thread()
            while not self._stopping.is_set():
                busy = self._has_work()
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
                if self._has_work():
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

    def _has_work(self) -> bool:
        """Requests to step, or a step launched ahead to read back (even if its sequences
        have all ended since)."""
        return self.scheduler.has_work() or self._ahead is not None

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
                case SlotsQuery(query_id):
                    self._answer_slots_query(query_id)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        if posts:  # (and not otherwise: outputs held for the next forward stay held)
            self._emit_iteration()  # first, as in _step
            self._post(posts)
        return True

    def _answer_slots_query(self, query_id: int) -> None:
        """GET /slots' answer; a failure to read or send it fails that query, not the loop."""
        try:
            self.slots_sink(query_id, self.scheduler.slot_states())
        except Exception:  # noqa: BLE001 - a monitor must never take the engine down
            logger.exception("reading the slots failed")
            self.slots_sink(query_id, None)

    def _step(self) -> StepPlan:
        """One step: schedule, launch, read the sampled tokens back, update, hand out outputs;
        returns its plan.

        With async output processing (on unless `--no-async-output-proc`) a step's outputs
        are held until the next step computes, so that the event loop streams them (holding
        the GIL) beside it instead of between the two steps. On CUDA they are posted once the
        next step is launched: only a graphed decode step's launch returns at once; before an
        eager one (prefill chunks), which reads back from the device as it goes, they are
        posted first. On CPU the launch posts them itself (`before_compute`), once the next
        step's inputs are built: its forward then runs in C without the GIL (a decode step)
        or between PyTorch ops that release it, on the cores the event loop shares.

        With async scheduling (vLLM's `--async-scheduling`; CUDA graphs, on unless
        `--no-async-scheduling`) the next decode step is launched too before this one's
        tokens are read, feeding on them on the device (Scheduler.plan_ahead,
        ModelRunner.launch_ahead): the GPU goes from step to step while the host reads,
        updates and streams. That step is this method's next call; the rows of sequences that
        ended meanwhile (a stop token, an abort) are computed and dropped."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            plan, launched = ahead
            overlap = self._defer_outputs  # launched with the last step, so computing
            if self._post_from_forward:
                self._post([])  # ... or, on CPU (in tests: no graphs there), done
        else:
            plan, launched = self.scheduler.schedule(), None
            if plan.admitted:
                with self._lock:  # counted off the queue and onto the slots at once
                    self._stats.num_queued -= plan.admitted
                    self._refresh_stats()  # (the gauges agree: running, slots, tokens)
            if plan.num_tokens == 0:
                self._post([])  # the last step's outputs, if held
                return plan
            overlap = self._defer_outputs and self.runner.launches_async(plan)
            if not overlap and not self._post_from_forward:
                self._post([])
        try:
            pending = launched or self.runner.launch(
                plan, before_compute=self._post_held if self._post_from_forward else None)
            if self._async_scheduling:
                self._launch_ahead(plan, pending)
            if overlap:
                self._post([])  # the last step's outputs, while this one runs
            result = self.runner.finish(pending)
        except Exception as e:
            # One forward serves the whole batch, so its requests fail together; the engine
            # and everything not in this step go on.
            self._ahead = None  # (its rows are this step's sequences)
            self.runner.idle()  # the next gap would count this failure
            logger.exception("step failed")
            requests = {c.request for c in plan.prefills} | {s.request for s in plan.decodes}
            posts = []
            for request in requests:
                posts += self._finish_request(request, RequestStatus.FINISHED_ERROR, repr(e))
            # Last: what the step wrote (or copied) is unknown, its own slots' too
            self.scheduler.forget_cached_prefixes()
            self._post(posts)
            raise StepFailed(f"a step failed: {e!r}") from e
        if plan.fed_from is not None:
            plan, result = _still_running(plan, result)
        # Prompt tokens taken, computed or found in the prefix cache (as vLLM counts them)
        n_prompt = sum(len(c.token_ids) for c in plan.prefills) + plan.num_cached_tokens
        self._stats.steps_total[plan.kind] += 1
        self._stats.prompt_tokens_total += n_prompt
        self._stats.sample_prompt_tokens_total += n_prompt + sum(
            len(c.request.prompt_ids) * (c.request.params.n - 1)
            for c in plan.prefills if c.is_last)
        self._stats.prefix_cache_queries_total += plan.num_queried_tokens
        self._stats.prefix_cache_hits_total += plan.num_cached_tokens
        self._stats.generation_tokens_total += len(result.tokens)
        it = self._outputs.iteration
        it.batch_size = len(plan.decodes) + len(plan.prefills)
        it.num_prompt_tokens, it.num_generation_tokens = n_prompt, len(result.tokens)
        it.timing = result.timing
        self.scheduler.update(plan, result.tokens, result.logprobs)
        outputs = self._step_outputs(plan, result)
        self._emit_iteration()  # first: a client that sees its last token sees it counted
        if self._hold_outputs and self.scheduler.has_work():
            self._deferred += outputs  # posted by the next step (see above)
        else:
            self._post(outputs)
        return plan

    def _launch_ahead(self, plan: StepPlan, pending: PendingStep) -> None:
        """Launch the decode step after `plan` now, if it can be planned ahead (_step)."""
        nxt = self.scheduler.plan_ahead(plan)
        if nxt is not None and (launched := self.runner.launch_ahead(nxt, pending)):
            self._ahead = (nxt, launched)

    def _emit_iteration(self) -> None:
        self._notify(self._outputs.take_iteration())

    def _step_outputs(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        for request, logprobs in result.prompt_logprobs:
            request.prompt_logprobs.extend(logprobs)
        posts, failed = [], set()
        for seq, token in zip(plan.sampled, result.tokens, strict=True):
            if seq.request in failed:
                continue  # its final output went out with its sample's failure
            try:
                posts.append(self._outputs.sequence_output(seq, token))
            except Exception as e:  # a failure in one request's output fails that request
                logger.exception("request %s failed", seq.request.request_id)
                posts += self._finish_request(seq.request, RequestStatus.FINISHED_ERROR, repr(e))
                failed.add(seq.request)
        for chunk in plan.prefills:  # scoring requests (max_tokens=0) end with their prefill
            if chunk.is_last and chunk.request.params.scores_only:
                for seq in chunk.request.seqs:
                    out = self._outputs.final(seq, "")
                    out.embedding = result.embeddings.get(chunk.request)
                    posts.append(out)
        return posts

    def _finish_request(self, request: Request, status: RequestStatus,
                        error: str = "") -> list[RequestOutput]:
        """Finish every unfinished sample of a request, with a final output for each."""
        if any(s.status == RequestStatus.WAITING for s in request.seqs):
            with self._lock:
                self._stats.num_queued -= len(request.seqs)
        open_seqs = [s for s in request.seqs if not s.status.is_finished]
        self.scheduler.finish_request(request, status)
        return [self._outputs.final(seq, error) for seq in open_seqs]

    def _post_held(self) -> None:
        """The last step's outputs, held for the next step's forward (_step)."""
        self._post([])

    def _post(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to the sink, after any the last step deferred (so a stream never sees
        them out of order). The sink hears of every call, even with none: an engine
        process's sends the step's stats with them."""
        if self._deferred:
            outputs, self._deferred = self._deferred + outputs, []
        self.output_sink(outputs)

    def _refresh_stats(self) -> None:
        s, sched = self._stats, self.scheduler
        s.num_running = len({q.request for q in sched.decoding}) + len(sched.prefilling)
        s.num_waiting = len(sched.waiting)
        s.slots_used = sched.num_used_slots
        s.tokens_used = sched.num_used_tokens
        if self.runner.adapters or s.running_loras or s.waiting_loras:
            running = {q.request.params.lora for q in sched.decoding}
            running |= {r.params.lora for r in sched.prefilling}
            waiting = {r.params.lora for r in sched.waiting}
            s.running_loras = tuple(sorted(name for name in running if name is not None))
            s.waiting_loras = tuple(sorted(name for name in waiting if name is not None))
            s.loras_read_time = time.time()

    def _fail_all(self, message: str) -> None:
        """End every stream: the scheduler's requests, and those accepted by `generate()` but
        still in the inbox, whose clients would otherwise wait forever."""
        self._fail_slot_queries(message)
        queued = self.streams.close(message, skip=self.scheduler.requests)
        posts = []
        for request in list(self.scheduler.requests.values()):
            posts += self._finish_request(request, RequestStatus.FINISHED_ERROR, message)
        self._stats.finished_total[FinishReason.ERROR.value] += len(queued)
        self._post(posts + queued)


def _still_running(plan: StepPlan, result: StepResult) -> tuple[StepPlan, StepResult]:
    """A step planned ahead, less the rows of sequences that ended after it was launched (a
    stop token in the step before, an abort): their tokens are dropped."""
    live = [i for i, seq in enumerate(plan.decodes) if not seq.status.is_finished]
    if len(live) == len(plan.decodes):
        return plan, result
    assert plan.fed_from is not None
    kept = StepPlan(decodes=[plan.decodes[i] for i in live],
                    fed_from=[plan.fed_from[i] for i in live])
    logprobs = None if result.logprobs is None else [result.logprobs[i] for i in live]
    return kept, replace(result, tokens=[result.tokens[i] for i in live], logprobs=logprobs)


class StepFailed(RuntimeError):
    """A forward pass raised; its requests were failed."""
