"""Scheduler: the waiting queue, the KV-cache slots and what each step computes. No torch.

A request with `n` samples is one prompt and `n` sequences; each sequence owns one slot of the
KV-cache pool while it runs. The prompt is prefilled once into the first sequence's slot, then
copied to the others' (the runner does the copy), and every sequence decodes on its own.

Prefix caching: a slot keeps its tokens' K/V after its sequence ends, and the scheduler
remembers which tokens those are. A new prompt that begins with the tokens some slot holds
(free, or in use by a running sequence: a shared system prompt) has that prefix copied into
its own slot before the step's forward instead of computing it again, or, when it holds all
that a free slot holds (a chat's next turn, the same prompt again), takes that slot and goes on
in place. Which free slot a request takes: with `packed_slots` (CUDA graphs, which lay a
decode step out by slot, and PyTorch's decode attention, which reads a run of slots) the
lowest; otherwise one that holds nothing, else the one whose cache is oldest, so that what
recent requests left survives the requests in between (vLLM evicts its least recently used
blocks).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from server.config import MAX_SCORED_TOKENS_PER_STEP
from server.request import (
    FinishReason,
    Request,
    RequestStatus,
    SamplingParams,
    Sequence,
    TokenLogprob,
)

if TYPE_CHECKING:
    from model.lora import LoraAdapter


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens [start, start + len(token_ids)) of `request`, into `slot`."""

    request: Request
    slot: int
    start: int
    token_ids: list[int]

    @property
    def is_last(self) -> bool:
        """The chunk reaches the end of the prompt: its last row's logits get sampled."""
        return self.start + len(self.token_ids) == len(self.request.prompt_ids)


@dataclass(frozen=True, slots=True)
class PrefixCopy:
    """K/V of positions [0, length) of slot `src` into slot `dst`, before the step's forward."""

    src: int
    dst: int
    length: int


@dataclass(slots=True)
class StepPlan:
    decodes: list[Sequence] = field(default_factory=list)  # one token each, at num_computed
    prefills: list[PrefillChunk] = field(default_factory=list)
    copies: list[PrefixCopy] = field(default_factory=list)  # in order, before the forward
    admitted: int = 0  # samples (sequences) given their slots by this step
    num_queried_tokens: int = 0  # their prompt tokens looked up in the prefix cache
    num_cached_tokens: int = 0  # ... and copied from it
    # A step planned ahead (async scheduling, Scheduler.plan_ahead): each decode's row among
    # the tokens of the step before, which is still running; None for a step planned as usual
    fed_from: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(c.token_ids) for c in self.prefills)

    @property
    def kind(self) -> str:
        """What the step's rows are (engine_front.STEP_KINDS): "decode" (decode rows only),
        "mixed" (prompt chunks beside decode rows) or "prefill" (prompt chunks only)."""
        return "prefill" if not self.decodes else "mixed" if self.prefills else "decode"

    @property
    def num_scored_tokens(self) -> int:
        """Prompt tokens whose logprobs the step computes (each with a row of logits)."""
        return sum(len(c.token_ids) for c in self.prefills
                   if c.request.params.prompt_logprobs is not None)

    def decode_positions(self) -> list[int]:
        """Where each decode row feeds its token, as the step is launched: at num_computed,
        or one on for a step planned ahead (the step before has not counted its token yet)."""
        lag = 0 if self.fed_from is None else 1
        return [s.num_computed + lag for s in self.decodes]

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a new token this step, in the order the runner samples them:
        the decode rows, then every sample of each request whose prefill completes."""
        out = list(self.decodes)
        for chunk in self.prefills:
            if chunk.is_last and not chunk.request.params.scores_only:
                out.extend(chunk.request.seqs)
        return out


# Shortest prefix worth copying (vLLM caches blocks of 16 tokens): below it, a prompt is
# computed whole. (The first tokens of most chat prompts, BOS and the template's header,
# would otherwise always come from another request.)
MIN_PREFIX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SlotState:
    """One KV-cache slot as llama.cpp's GET /slots shows it: what runs there (or last ran).
    Plain data, sent across processes with --engine-process."""

    slot: int
    processing: bool = False
    task_id: int = -1  # -1: the slot has held nothing yet (the fields below are empty)
    request_id: str = ""
    sample: int = 0
    params: SamplingParams | None = None
    prompt_tokens: int = 0
    prompt_cached: int = 0  # of those, copied from the prefix cache
    prompt_computed: int = 0  # ... and computed so far
    decoded: int = 0  # output tokens so far
    remaining: int = 0  # output tokens left before max_tokens
    has_new_line: bool = False

    @classmethod
    def of(cls, seq: Sequence) -> SlotState:
        request = seq.request
        decoded = len(seq.output_ids)
        return cls(
            seq.slot, seq.status == RequestStatus.RUNNING, request.task_id, request.request_id,
            seq.index, _shown(request.params), len(request.prompt_ids), request.num_cached_tokens,
            request.num_prefilled - request.num_cached_tokens, decoded,
            max((request.params.max_tokens or 0) - decoded, 0), seq.has_new_line)


def _shown(params: SamplingParams) -> SamplingParams:
    """`params` less what GET /slots does not show and may be big, to keep or send across
    processes: a guide's automaton, DRY's breaker sequences (their texts stay), token lists."""
    other = params.llamacpp
    if other is not None and other.dry is not None and other.dry.breakers:
        other = replace(other, dry=replace(other.dry, breakers=()))
    if params.guide is None and not params.allowed_token_ids and not params.bad_words and (
            other is params.llamacpp):
        return params
    return replace(params, guide=None, allowed_token_ids=(), bad_words=(), llamacpp=other)


class Scheduler:
    def __init__(self, n_slots: int, max_model_len: int, max_num_batched_tokens: int,
                 eos_ids: frozenset[int] = frozenset(), eos_id: int | None = None,
                 prefix_caching: bool = False, packed_slots: bool = False,
                 max_scored_tokens: int = MAX_SCORED_TOKENS_PER_STEP) -> None:
        self.n_slots = n_slots
        # Every eos id (generation_config.json's and the tokenizer's); `eos_id` is the
        # tokenizer's own, the one stop that reports no stop_reason (vLLM counts the others
        # among the stop token ids, Llama 3's <|eot_id|> for one).
        self.eos_ids, self.eos_id = eos_ids, eos_id
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_scored_tokens = max_scored_tokens  # of those, prompt tokens given logprobs
        # A min-heap. With `packed_slots` the lowest free slot goes first, so slots in use
        # stay packed at the low end (server/startup.py says when).
        self.free_slots: list[int] = list(range(n_slots))
        self.packed_slots = packed_slots
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not yet fully computed
        self.decoding: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.prefix_caching = prefix_caching
        # Free slots whose K/V still hold these tokens (positions 0..len-1), oldest first,
        # and the LoRA adapter each was computed with (None: the base model): K/V of one
        # adapter are no other's, nor those of another loaded later under its name
        self.cached: dict[int, list[int]] = {}
        self.cached_lora: dict[int, LoraAdapter | None] = {}
        self.last_held: dict[int, SlotState] = {}  # slot -> the last sequence it ran, done
        self.tasks_added = 0

    # ------------------------------------------------------------------ accounting

    @property
    def num_used_slots(self) -> int:
        return self.n_slots - len(self.free_slots)

    @property
    def num_used_tokens(self) -> int:
        """Tokens held in the pool across all slots in use."""
        tokens = sum(s.num_computed for s in self.decoding)
        return tokens + sum(r.num_prefilled for r in self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def slot_states(self) -> list[SlotState]:
        """Every slot: the sequence it runs, else the one it last held (llama.cpp's /slots
        shows an idle slot's last task), else nothing yet."""
        running = {seq.slot: seq for request in self.requests.values() for seq in request.seqs
                   if seq.status == RequestStatus.RUNNING}
        return [SlotState.of(running[slot]) if slot in running
                else self.last_held.get(slot, SlotState(slot)) for slot in range(self.n_slots)]

    def keep_last(self, seq: Sequence) -> None:
        """Remember what a finished sequence's slot ran, once its last output is out (so its
        newline counts): a snapshot, not the request, whose tokens and logprobs can go."""
        if seq.slot >= 0:
            self.last_held[seq.slot] = SlotState.of(seq)

    # ------------------------------------------------------------------ entry points

    def add(self, request: Request) -> None:
        # (the engine gives a request the adapter it names: a row on the wrong weights else)
        assert (request.adapter is None) == (request.params.lora is None), request.request_id
        request.task_id, self.tasks_added = self.tasks_added, self.tasks_added + 1
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request

    # NOTE: the policy. Each running sequence has `num_computed` tokens in its slot and one
    # more token to feed. A step first gives every decoding sequence its one token, then spends
    # what is left of `max_num_batched_tokens` on prompt chunks: requests already prefilling in
    # arrival order, then waiting requests in FCFS order, each admitted only when all its `n`
    # slots are free. A long prompt therefore takes several steps, and decoding sequences get
    # a token in every one of them. Chunks of requests asking for prompt logprobs share at most
    # `max_scored_tokens` tokens a step (the memory of their logits).
    def schedule(self) -> StepPlan:
        # In slot order, so that the decode rows usually are one packed run of the cache.
        plan = StepPlan(decodes=sorted(self.decoding, key=lambda s: s.slot))
        budget = self.max_num_batched_tokens - len(plan.decodes)
        for request in self.prefilling:
            if budget <= 0:
                break
            budget -= self._add_chunk(plan, request, self._room(plan, request, budget))
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if request.params.n > len(self.free_slots) or not self._room(plan, request, budget):
                break  # FCFS: no overtaking
            self.waiting.popleft()
            request.admitted_time = time.monotonic()
            self._admit(plan, request)
            self.prefilling.append(request)
            plan.admitted += len(request.seqs)
            budget -= self._add_chunk(plan, request, self._room(plan, request, budget))
        return plan

    def plan_ahead(self, plan: StepPlan) -> StepPlan | None:
        """The decode step after `plan`, planned while `plan` runs, before its tokens are read
        back (async scheduling; the runner feeds it `plan`'s sampled ids on the device): the
        same sequences, one token on. Only where nothing else would change the step: `plan`
        decodes only, no request is mid-prefill, and the first waiting one (if any) could not
        take its slots after `plan` either (when the slots are full, as under overload, a
        stop token freeing one in `plan` delays its admission by a step, as in vLLM). A
        sequence that `plan` ends by length is left out; one that it ends with a stop token
        is not known yet, and its row is computed and dropped (Engine._step). None: plan the
        next step as usual."""
        if plan.prefills or plan.copies or not plan.decodes or self.prefilling:
            return None
        rows, leaving = [], 0
        for i, seq in enumerate(plan.decodes):
            if seq.status.is_finished:
                continue
            if self._at_length_limit(seq, extra=1):
                leaving += 1  # its slot is free for the next step
            else:
                rows.append(i)
        if self.waiting and self.waiting[0].params.n <= len(self.free_slots) + leaving:
            return None  # admit it now rather than a step later
        if not rows:
            return None
        return StepPlan(decodes=[plan.decodes[i] for i in rows], fed_from=rows)

    def _at_length_limit(self, seq: Sequence, extra: int = 0) -> bool:
        """Whether `seq`, with `extra` more tokens, has all it may have: max_tokens, or the
        context. One rule for the stop (`_token_stop`) and for the step planned ahead, which
        must not feed a position past the slot's end."""
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None and len(seq.output_ids) + extra >= max_tokens:
            return True
        return seq.num_tokens + extra >= self.max_model_len

    def _admit(self, plan: StepPlan, request: Request) -> None:
        """Give each of `request`'s samples a slot, and start its prefill after the longest
        prefix of its prompt that a slot holds: copied into its first slot by the runner,
        unless that slot holds it already."""
        found = None
        if self.packed_slots:
            slots = [heapq.heappop(self.free_slots) for _ in request.seqs]
            if self.prefix_caching:
                found = self._longest_prefix(plan, request, own=slots[0])
        else:
            if self.prefix_caching:
                found = self._longest_prefix(plan, request)
            slots = self._keeping_caches(request, found)
        for seq, slot in zip(request.seqs, slots, strict=True):
            seq.slot, seq.status = slot, RequestStatus.RUNNING
            self.cached.pop(slot, None)  # overwritten from now on
            self.cached_lora.pop(slot, None)  # (nor its adapter held: unloaded, it goes)
        if found is not None:
            src, length = found
            if src != slots[0]:
                plan.copies.append(PrefixCopy(src, slots[0], length))
            request.num_prefilled = request.num_cached_tokens = length
            plan.num_cached_tokens += length

    def _keeping_caches(self, request: Request, found: tuple[int, int] | None) -> list[int]:
        """Free slots for `request`'s samples that lose the least cache: the one the prefix
        was found in when the prompt holds all of it (nothing there to lose: a chat's next
        turn, or the same prompt again, whose last token is computed again), then slots that
        hold nothing, lowest first, then the oldest caches; the one the prefix is copied from
        last (the next prompt may want it too)."""
        source = found[0] if found is not None else None
        order = [slot for slot in sorted(self.free_slots) if slot not in self.cached]
        order += [slot for slot in self.cached if slot != source]  # the oldest first
        if source in self.cached:
            held = self.cached[source]
            if request.prompt_ids[:len(held)] == held:
                order.insert(0, source)
            else:
                order.append(source)
        slots = order[:len(request.seqs)]
        self.free_slots = [slot for slot in self.free_slots if slot not in slots]
        heapq.heapify(self.free_slots)
        return slots

    def _longest_prefix(self, plan: StepPlan, request: Request,
                        own: int | None = None) -> tuple[int, int] | None:
        """(slot, length): the longest prefix of `request`'s prompt that a slot holds (free
        slots, running sequences', prompts in prefill), from MIN_PREFIX_TOKENS tokens; `own`
        wins a tie. The prompt's last token is always computed (its logits are sampled), and
        every token is where prompt logprobs or a mean of them all are asked for."""
        prompt, lora = request.prompt_ids, request.adapter
        if request.params.every_prompt_position or len(prompt) <= MIN_PREFIX_TOKENS:
            return None
        plan.num_queried_tokens += len(prompt)
        limit = len(prompt) - 1
        best, src = MIN_PREFIX_TOKENS - 1, own  # to beat: the shortest prefix worth a copy

        def consider(slot: int, tokens: list[int]) -> None:
            nonlocal best, src
            # A slice comparison rules most sources out: they must hold best + 1 tokens of it
            if len(tokens) <= best or tokens[:best + 1] != prompt[:best + 1]:
                if not (slot == own and tokens[:best] == prompt[:best]):
                    return
            length = common_prefix(prompt, tokens, limit)
            if length > best or (length == best and slot == own):
                best, src = length, slot

        for slot, tokens in self.cached.items():  # free slots, a packed request's own among them
            if self.cached_lora.get(slot) is lora:
                consider(slot, tokens)
        for seq in self.decoding:  # running: their token lists are built only if they may win
            held = seq.request.prompt_ids
            if seq.request.adapter is lora and (
                    len(held) <= best or held[:best + 1] == prompt[:best + 1]):
                consider(seq.slot, seq.cached_tokens())
        for r in self.prefilling:  # prompts in prefill, in their first slot (a copy to it
            if r.adapter is lora:  # queued here lands first)
                consider(r.seqs[0].slot, r.prompt_ids[:r.num_prefilled])
        if best < MIN_PREFIX_TOKENS or src is None:
            return None
        return src, best

    def forget_slot_history(self) -> None:
        """Number tasks from 0 again, and forget which sequence each free slot last held."""
        self.last_held.clear()
        self.tasks_added = 0

    def forget_cached_prefixes(self) -> None:
        """Trust no free slot's contents (after a failed step, or the warm-up)."""
        self.cached.clear()
        self.cached_lora.clear()

    def _room(self, plan: StepPlan, request: Request, budget: int) -> int:
        """Prompt tokens `request` may take in `plan`: `budget`, and no more than the step's
        scored tokens have left if it asks for prompt logprobs."""
        if request.params.prompt_logprobs is None:
            return budget
        return min(budget, self.max_scored_tokens - plan.num_scored_tokens)

    def _add_chunk(self, plan: StepPlan, request: Request, room: int) -> int:
        if room <= 0:
            return 0
        start = request.num_prefilled
        ids = request.prompt_ids[start:start + room]
        plan.prefills.append(PrefillChunk(request, request.seqs[0].slot, start, ids))
        return len(ids)

    def update(self, plan: StepPlan, tokens: list[int],
               logprobs: list[TokenLogprob | None] | None = None) -> list[Sequence]:
        """Advance slots past the step's tokens and append the sampled ones (aligned with
        `plan.sampled`). Returns the sequences that finished on a token-level stop."""
        for seq in plan.decodes:
            seq.num_computed += 1
        for chunk in plan.prefills:
            request = chunk.request
            request.num_prefilled += len(chunk.token_ids)
            if chunk.is_last:
                self.prefilling.remove(request)
                for seq in request.seqs:
                    seq.num_computed = request.num_prefilled
                if request.params.scores_only:  # nothing to generate
                    self.finish_request(request, RequestStatus.FINISHED_LENGTH)
                else:
                    self.decoding.extend(request.seqs)
        finished = []
        for i, (seq, token) in enumerate(zip(plan.sampled, tokens, strict=True)):
            if seq.status.is_finished:
                continue
            seq.output_ids.append(token)
            if logprobs is not None and logprobs[i] is not None:
                seq.output_logprobs.append(logprobs[i])
            status = self._token_stop(seq, token)
            if status is not None:
                self.finish(seq, status)
                finished.append(seq)
        return finished

    def _token_stop(self, seq: Sequence, token: int) -> RequestStatus | None:
        params = seq.request.params
        n_out = len(seq.output_ids)
        # The sampler bans stop ids before min_tokens; a guided row's only when something
        # else is allowed (sampling._apply_guides): one sampled then ends it
        if n_out >= params.min_tokens or params.guide is not None:
            eos = not params.ignore_eos and token in self.eos_ids
            if eos or token in params.stop_token_ids:
                seq.stop_reason = None if eos and token == self.eos_id else token
                return RequestStatus.FINISHED_STOPPED
        if self._at_length_limit(seq):
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, seq: Sequence, status: RequestStatus) -> None:
        """Finish one sequence (a stop, a stop string, an abort) and free its slot."""
        if seq.status.is_finished:
            if (seq.status == RequestStatus.FINISHED_LENGTH
                    and status == RequestStatus.FINISHED_STOPPED):
                # A stop string matched by the last allowed token: the stop is the reason, as
                # in vLLM (the slot is already free).
                seq.status = status
            return
        was_running = seq.status == RequestStatus.RUNNING
        seq.status = status
        request = seq.request
        if seq in self.decoding:
            self.decoding.remove(seq)
        if was_running:
            assert seq.slot not in self.free_slots, f"slot {seq.slot} freed twice"
            heapq.heappush(self.free_slots, seq.slot)
            if self.prefix_caching and len(tokens := seq.cached_tokens()) >= MIN_PREFIX_TOKENS:
                self.cached[seq.slot] = tokens  # (shorter ones can serve no prompt)
                self.cached_lora[seq.slot] = request.adapter
        if request.is_finished:
            self.requests.pop(request.request_id, None)
            if request in self.prefilling:
                self.prefilling.remove(request)
            if request in self.waiting:
                self.waiting.remove(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        for seq in request.seqs:
            self.finish(seq, status)


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`: a binary search over slice
    comparisons, which run in C (a Python loop over a long prompt would not)."""
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
