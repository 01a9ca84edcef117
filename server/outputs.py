"""OutputBuilder: a step's sampled tokens become per-request outputs, with timing stats.

Runs on the engine thread. It owns each sequence's IncrementalDetokenizer (text deltas and
stop strings) and the IterationStats of the step in progress (TTFT, ITL, finished requests),
which the engine hands to its listeners after the step. Plain values only: no tensors, no asyncio.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from model.tokenizer import IncrementalDetokenizer, Tokenizer
from server.line_limits import LineLimits
from server.request import RequestOutput, RequestStatus, Sequence
from server.scheduler import FINISH_REASONS, Scheduler


@dataclass(frozen=True, slots=True)
class FinishedStats:
    e2e_seconds: float
    queue_seconds: float | None  # None: never given a slot (aborted while waiting), as vLLM
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass(frozen=True, slots=True)
class ForwardTiming:
    """Where a step's time went on the engine thread, where the forward runs as it is called
    (CPU; the runner times it): in the model's forward, and since the last forward ended (the
    last step's sampling and outputs, the event loop's turns with the GIL, this step's
    scheduling and inputs). The gap is None after an idle wait, and after a step of another
    kind (whose costs it carries: a prefill's outputs, its prompt logprobs)."""

    kind: str  # "decode" (decode rows only), "mixed" (and prompt chunks), "prefill"
    forward_seconds: float
    gap_seconds: float | None


@dataclass(slots=True)
class IterationStats:
    """What one step did, handed to listeners (metrics) on the engine thread."""

    batch_size: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    timing: ForwardTiming | None = None  # where the runner timed the step
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)


class OutputBuilder:
    """Builds each sequence's RequestOutput and records its timings in `iteration`."""

    def __init__(self, tokenizer: Tokenizer, scheduler: Scheduler,
                 runner_release: Callable[[Sequence], None], finished_total: Counter[str]) -> None:
        self._tokenizer = tokenizer
        self._scheduler = scheduler  # a stop string finishes the sequence there
        self._runner_release = runner_release  # drops the runner's per-sequence state
        self._finished_total = finished_total  # EngineStats' counter, by finish_reason
        self.iteration = IterationStats()  # the step in progress
        self._detokenizers: dict[Sequence, IncrementalDetokenizer] = {}
        self._line_limits: dict[Sequence, LineLimits] = {}  # llama.cpp's editor limits

    def take_iteration(self) -> IterationStats:
        """The stats gathered since the last call; a fresh IterationStats starts."""
        it, self.iteration = self.iteration, IterationStats()
        return it

    def sequence_output(self, seq: Sequence, token: int) -> RequestOutput:
        """`token` was just appended to `seq` by the scheduler (which may have finished it)."""
        p = seq.request.params
        detok = self._detokenizers.get(seq)
        first = detok is None
        if detok is None:
            detok = IncrementalDetokenizer(
                self._tokenizer, seq.request.prompt_ids, skip_special_tokens=p.skip_special_tokens,
                stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output,
                min_tokens=p.min_tokens)
            self._detokenizers[seq] = detok
        limits = self._line_limits.get(seq)
        if first and (p.n_indent or p.t_max_predict_ms):
            limits = self._line_limits[seq] = LineLimits(p.n_indent, p.t_max_predict_ms)
        if seq.status == RequestStatus.FINISHED_STOPPED and not p.include_stop_str_in_output:
            # A stop token (eos or stop_token_ids) ends the text before it, as in vLLM; it is
            # still an output token (ids, logprobs, usage).
            text = detok.flush()
        else:
            text = detok.add([token])
            if detok.stopped_by is not None:
                seq.stop_reason = detok.stopped_by
                self._scheduler.finish(seq, RequestStatus.FINISHED_STOPPED)
            else:
                if limits is not None and limits.out_of_time(time.monotonic()):
                    self._scheduler.finish(seq, RequestStatus.FINISHED_LENGTH)
                if seq.status.is_finished:
                    text += detok.flush()
        text, cut = self._cut(seq, text)
        if cut:  # (what the detokenizer still holds comes after: dropped)
            self._scheduler.finish(seq, RequestStatus.FINISHED_LENGTH)
        out = self._output(seq, text, [token], first)
        if seq.status.is_finished:
            self._release(seq)
        return out

    def final(self, seq: Sequence, error: str | None) -> RequestOutput:
        """The last output of a sequence ended from outside (abort, error): with the text still
        held back for stop strings, unless it failed."""
        detok = self._detokenizers.get(seq)
        text = detok.flush() if detok is not None and not error else ""
        text, _ = self._cut(seq, text)  # (n_indent's cut applies to the text held back too)
        out = self._output(seq, text, [], first=detok is None)
        out.error = error or None
        self._release(seq)
        return out

    def _cut(self, seq: Sequence, text: str) -> tuple[str, bool]:
        """`text` as n_indent keeps it (server/line_limits.py), and whether it was cut."""
        limits = self._line_limits.get(seq)
        at = None if limits is None else limits.cut(text)
        return (text, False) if at is None else (text[:at], True)

    def _output(self, seq: Sequence, text: str, token_ids: list[int],
                first: bool) -> RequestOutput:
        request = seq.request
        prompt_logprobs = None
        if first and request.params.prompt_logprobs is not None:
            # One entry per prompt token: a request ended before its prompt was scored (an
            # abort) has null for the rest, as for the first token.
            missing = len(request.prompt_ids) - len(request.prompt_logprobs)
            prompt_logprobs = request.prompt_logprobs + [None] * missing
        out = RequestOutput(
            request.request_id, seq.index, text=text, token_ids=token_ids,
            logprobs=seq.output_logprobs[-len(token_ids):] if seq.output_logprobs and token_ids
            else None,
            prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=len(request.prompt_ids), num_output_tokens=len(seq.output_ids),
            num_cached_tokens=request.num_cached_tokens)
        if not seq.has_new_line and "\n" in text:
            seq.has_new_line = True
        now = time.monotonic()
        if token_ids:
            if seq.last_token_time is None:
                self.iteration.ttfts.append(now - request.arrival_time)
            else:
                self.iteration.itls.append(now - seq.last_token_time)
            seq.last_token_time = now
        if seq.status.is_finished:
            out.finish_reason = FINISH_REASONS[seq.status]
            if seq.status == RequestStatus.FINISHED_STOPPED:
                out.stop_reason = seq.stop_reason
            self._finished_total[out.finish_reason.value] += 1
            admitted = request.admitted_time
            self.iteration.finished.append(FinishedStats(
                now - request.arrival_time,
                None if admitted is None else admitted - request.arrival_time,
                len(request.prompt_ids), len(seq.output_ids)))
        return out

    def _release(self, seq: Sequence) -> None:
        self._scheduler.keep_last(seq)  # (its last output built: GET /slots' idle slot)
        self._detokenizers.pop(seq, None)
        self._line_limits.pop(seq, None)
        self._runner_release(seq)
