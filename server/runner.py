"""ModelRunner: a StepPlan becomes tensors, one forward pass, sampled token ids.

The only place where requests become tensors. Row layout of a step (see model/attention.py):
decode rows first, one token per decoding sequence, then each prefill chunk's tokens. Logits
are computed only for rows that are sampled or scored, so a long prefill does not pay for the
lm_head at every position unless prompt logprobs were asked for.

A step is `launch` (inputs, forward and sampling queued on the device) then `finish` (the
sampled ids read back). On a GPU a graphed step runs between the two, where the engine can hand
out the previous step's outputs (`launches_async`, async output processing); on CPU `launch`
already computes everything. With async scheduling the engine also launches the next decode
step before `finish` (`launch_ahead`): its rows feed on the sampled ids still on the device, so
the GPU never waits for the host between two graphed steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from model.attention import AttentionBatch, PrefillSpan
from model.decode_graphs import DecodeGraphs
from model.kv_cache import KVCachePool
from model.llama import LlamaModel
from model.lora import LoraAdapter, LoraBatch
from server.guided.masks import GuideMasks
from server.outputs import ForwardTiming
from server.request import Request, SamplingParams, Sequence, ThinkingState, TokenLogprob
from server.sampling import Sampler, SamplerOutput, SamplingBatch, compute_logprobs
from server.sampling_dry import DryContext
from server.sampling_infill import InfillRows
from server.scheduler import PrefillChunk, StepPlan


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device (or the host) running out of memory; for callers that
    hold no tensors (the warm-up's message)."""
    # torch.cuda's name: torch.OutOfMemoryError (the same class) came with torch 2.5
    return isinstance(error, torch.cuda.OutOfMemoryError | MemoryError)


@dataclass(slots=True)
class StepResult:
    tokens: list[int]  # aligned with plan.sampled
    logprobs: list[TokenLogprob | None] | None  # aligned with plan.sampled; None: nobody asked
    prompt_logprobs: list[tuple[Request, list[TokenLogprob | None]]] = field(
        default_factory=list)
    timing: ForwardTiming | None = None
    embeddings: dict[Request, list[float]] = field(default_factory=dict)  # pooled


@dataclass(slots=True)
class PendingStep:
    """A launched step: device tensors that `finish` reads back."""

    sampled: SamplerOutput | None  # one row per plan.sampled; None: nothing sampled
    params: list[SamplingParams]
    scored: list[tuple[PrefillChunkRows, torch.Tensor]]  # prompt-logprob chunks, their logits
    timing: ForwardTiming | None = None
    pooled: list[tuple[Request, torch.Tensor]] = field(default_factory=list)  # embeddings
    # On a GPU, `sampled` copied to pinned host memory as the step ends, and the event of
    # that copy: `finish` waits for this step alone, not for one launched after it.
    host: SamplerOutput | None = None
    copied: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVCachePool, eos_ids: frozenset[int],
                 seed: int = 0, graphs: DecodeGraphs | None = None,
                 guides: GuideMasks | None = None,
                 adapters: dict[str, LoraAdapter] | None = None) -> None:
        self.model = model
        self.adapters = adapters or {}  # LoRA adapters by name (SamplingParams.lora)
        self.pool = pool
        self.graphs = graphs  # decode-only steps replayed from CUDA graphs where they fit
        self.device = pool.device
        self.vocab_size = model.config.vocab_size
        self.eos_ids = eos_ids
        self.sampler = Sampler(seed, model.cpu_kernels)  # C draws where the model has them
        # One generator per seeded sequence, kept across steps: its noise must continue, not
        # restart, and must not depend on which other rows share the step.
        self.generators: dict[Sequence, torch.Generator] = {}
        # llama.cpp's mirostat: each such sequence's mu (a 0-d tensor its draws update)
        self.mirostat_mus: dict[Sequence, torch.Tensor] = {}
        # llama.cpp's DRY: each such sequence's context, and how many outputs it holds
        self.dry_contexts: dict[Sequence, tuple[DryContext, int]] = {}
        # Guided decoding: the allowed tokens of each guide's states, and where each guided
        # sequence stands: (its output tokens walked, its state)
        self.guides = guides
        self.guide_states: dict[Sequence, tuple[int, int | None]] = {}
        # Thinking budgets: where each budgeted sequence's thinking stands, and per end tag
        # the mask and logits that force it
        self.thinking: dict[Sequence, ThinkingState] = {}
        self._forcing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Mean pooling: each embedding request's sum of hidden states over its chunks so far
        self.pool_sums: dict[Request, torch.Tensor] = {}
        self._end_only_logits: torch.Tensor | None = None
        # The last step's sampled rows and their controls (see _sampling_batch).
        self._last_sampling: tuple[tuple[Sequence, ...], SamplingBatch | None] = ((), None)
        # When the last timed forward returned, and its step's kind (ForwardTiming).
        self._last_forward: tuple[float, str] | None = None

    def bind_thread(self) -> None:
        """Called first on the engine thread: make the model's GPU (cuda:N too) current there,
        where CUDA graphs replay and the sampler allocates."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # indexed: see resolve_device

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq, None)
        self.mirostat_mus.pop(seq, None)
        self.dry_contexts.pop(seq, None)
        self.guide_states.pop(seq, None)
        self.thinking.pop(seq, None)
        self.pool_sums.pop(seq.request, None)

    def idle(self) -> None:
        """The engine is about to wait for work (or a step failed): the next forward's gap
        would count the wait."""
        self._last_forward = None

    def forget_last_step(self) -> None:
        """Drop the sampling controls kept for the next step (after the warm-up: they hold its
        sequences)."""
        self._last_sampling = ((), None)

    @property
    def asynchronous(self) -> bool:
        """Whether the device computes after `launch` returns (CUDA), so that host work put
        between `launch` and `finish` overlaps the step."""
        return self.device.type == "cuda"

    def launches_async(self, plan: StepPlan) -> bool:
        """Whether `launch(plan)` returns before the device has run the step: one replayed
        from a CUDA graph (an eager one reads back as it goes)."""
        return self.asynchronous and self._replays_graph(plan)

    def _replays_graph(self, plan: StepPlan) -> bool:
        """A decode-only step that a captured graph (or its eager stand-in) covers: none
        where a row runs a LoRA adapter (the graphs hold the base model alone)."""
        if self.graphs is None or plan.prefills or not plan.decodes or any(
                s.request.adapter is not None for s in plan.decodes):
            return False
        return self.graphs.bucket([s.slot for s in plan.decodes],
                                  plan.decode_positions()) is not None

    @torch.inference_mode()
    def launch_ahead(self, plan: StepPlan, before: PendingStep) -> PendingStep | None:
        """Launch `plan` (Scheduler.plan_ahead) behind the step `before`, still unread: its
        rows feed the tokens `before` samples, on the device. None, launching nothing, where
        the step could not go ahead as planned: it runs no graph, or its sampling depends on
        the tokens it does not know yet (penalties and DRY count them; a min_tokens ban is lifted
        after the last of them; a thinking budget the last of them may spend)."""
        if before.sampled is None or not self._replays_graph(plan):
            return None
        if any(s.request.params.has_penalties or s.request.params.guide is not None
               or s.request.params.bans_by_output or s.request.params.dry is not None
               or self._min_tokens_ban(s)
               or self._thinking_left(s) <= 1 for s in plan.decodes):
            return None  # (a guide's mask depends on the last token too)
        return self.launch(plan, feed=before.sampled.token_ids)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, feed: torch.Tensor | None = None,
               before_compute: Callable[[], None] | None = None) -> PendingStep:
        """Queue the step's forward and sampling; nothing is read back from the device (on a
        graphed decode step), so on a GPU this returns while the step runs. `feed`: the
        sampled ids of the step before, for a plan made ahead of them (`launch_ahead`).
        `before_compute` is called once, when the inputs are built and the computing starts
        (LlamaModel.forward): on CPU the engine streams the last step's tokens from
        there, beside the C decode step that runs without the GIL."""
        # The sampling controls go to the device first: a host-to-device copy queued after
        # the forward would wait for it.
        sampling = self._sampling_batch(plan.sampled) if plan.sampled else None
        for copy in plan.copies:  # cached prefixes into new prompts' slots, before any write
            self.pool.copy_slot(copy.src, copy.dst, copy.length)
        # Each decoding sequence feeds its newest token: the last one it holds, or, planned
        # ahead, its row of `feed` (which the graph gathers on the device).
        ids = plan.fed_from if feed is not None else [seq.last_token for seq in plan.decodes]
        assert ids is not None
        n_decode = len(ids)
        slots, positions = [s.slot for s in plan.decodes], plan.decode_positions()
        if self._replays_graph(plan):
            assert self.graphs is not None
            if before_compute is not None:
                before_compute()
            logits = self.graphs.run(slots, ids, positions, feed=feed)
            assert logits is not None  # the bucket exists (_replays_graph)
            return self._pending(plan, sampling, logits, [])
        assert feed is None, "a step planned ahead replays a graph (launch_ahead)"
        spans, logit_rows = [], list(range(n_decode))
        scored: list[tuple[PrefillChunkRows, int]] = []  # (chunk, its first logits row)
        last_rows: dict[int, int] = {}  # chunk index -> logits row of the prompt's last token
        hidden_rows: list[int] = []  # rows whose hidden states embeddings pool
        pooled: list[tuple[PrefillChunk, int, int]] = []  # (chunk, its first hidden row, rows)
        for i, chunk in enumerate(plan.prefills):
            offset, n = len(ids), len(chunk.token_ids)
            ids.extend(chunk.token_ids)
            spans.append(PrefillSpan(chunk.slot, chunk.start, n, offset))
            samples = chunk.is_last and not chunk.request.params.scores_only  # a first token
            if chunk.request.params.prompt_logprobs is not None:
                scored.append((PrefillChunkRows(chunk.request, chunk.start, n), len(logit_rows)))
                logit_rows.extend(range(offset, offset + n))
            elif samples:  # (a prompt-only request's last row: no logits, never read)
                logit_rows.append(offset + n - 1)
            if samples:
                last_rows[i] = len(logit_rows) - 1
            pooling = chunk.request.params.pooling
            if pooling == "mean" or (pooling == "last" and chunk.is_last):
                rows = range(offset, offset + n) if pooling == "mean" else [offset + n - 1]
                pooled.append((chunk, len(hidden_rows), len(rows)))
                hidden_rows.extend(rows)
        batch = AttentionBatch.build(slots, positions, spans, self.device)
        lora = self._lora_batch(plan)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        # A decode-only step wants every row's logits: no gather.
        wanted = tensor(logit_rows) if plan.prefills else None
        start: float | None = None

        def compute_starts() -> None:  # the forward's time: the caller's work is not in it
            nonlocal start
            if before_compute is not None:
                before_compute()
            start = time.monotonic()

        if pooled:
            assert wanted is not None
            logits, hidden = self.model.forward_pooled(
                tensor(ids), batch.positions, self.pool, batch, wanted, tensor(hidden_rows),
                before_compute=compute_starts, lora=lora)
        else:
            logits = self.model(tensor(ids), batch.positions, self.pool, batch,
                                logits_indices=wanted, before_compute=compute_starts,
                                lora=lora)  # (len(logit_rows), vocab)
        assert start is not None, "the model calls before_compute once, as it computes"
        timing = self._timing(start, plan.kind)

        # Which logits row each sampled sequence reads: its decode row, or its prompt's last.
        sample_rows = list(range(n_decode))
        for i, chunk in enumerate(plan.prefills):
            if i not in last_rows:  # (only prompts that end here and sample a first token)
                continue
            first = chunk.request.seqs[0]
            for seq in chunk.request.seqs:
                if seq is not first:  # n > 1: the prompt was computed once; copy it
                    self.pool.copy_slot(first.slot, seq.slot, len(chunk.request.prompt_ids))
                sample_rows.append(last_rows[i])
        # Decode-only, every row is sampled in order: no gather (a copy of rows x vocab).
        picked = logits[sample_rows] if plan.prefills and sample_rows else logits
        return self._pending(plan, sampling, picked,
                             [(rows, logits[row:row + rows.n]) for rows, row in scored], timing,
                             self._pool(pooled, hidden) if pooled else [])

    def _lora_batch(self, plan: StepPlan) -> LoraBatch | None:
        """The step's rows that run LoRA adapters (decode rows, then prompt chunks' rows, as
        `launch` lays them out); None where none does."""
        if all(s.request.adapter is None for s in plan.decodes) and all(
                c.request.adapter is None for c in plan.prefills):
            return None
        rows: list[LoraAdapter | None] = [s.request.adapter for s in plan.decodes]
        for chunk in plan.prefills:
            rows += [chunk.request.adapter] * len(chunk.token_ids)
        return LoraBatch.of_rows(rows, self.device)

    def _pool(self, pooled: list[tuple[PrefillChunk, int, int]], hidden: torch.Tensor
              ) -> list[tuple[Request, torch.Tensor]]:
        """The embedding of each request whose prompt ends in this step, at unit length: its
        last token's hidden state, or the mean of all its tokens' (summed over its chunks)."""
        done = []
        for chunk, first, count in pooled:
            request, rows = chunk.request, hidden[first:first + count]
            if request.params.pooling == "last":
                vector = rows[0]
            else:
                total = rows.sum(0)
                if (before := self.pool_sums.pop(request, None)) is not None:
                    total += before
                if not chunk.is_last:
                    self.pool_sums[request] = total
                    continue
                vector = total / len(request.prompt_ids)
            done.append((request, torch.nn.functional.normalize(vector, dim=0)))
        return done

    def _timing(self, start: float, kind: str) -> ForwardTiming | None:
        """The forward that began at `start` and just returned; None where it only queues work
        on a device (its time shows up elsewhere)."""
        if self.asynchronous:
            return None
        end, last = time.monotonic(), self._last_forward
        self._last_forward = (end, kind)
        gap = start - last[0] if last is not None and last[1] == kind else None
        return ForwardTiming(kind, end - start, gap)

    def _pending(self, plan: StepPlan, sampling: SamplingBatch | None, logits: torch.Tensor,
                 scored: list[tuple[PrefillChunkRows, torch.Tensor]],
                 timing: ForwardTiming | None = None,
                 pooled: list[tuple[Request, torch.Tensor]] | None = None) -> PendingStep:
        """The sampler queued on the step's logits (rows aligned with plan.sampled)."""
        sampled = self.sampler(logits, sampling) if sampling is not None else None
        step = PendingStep(sampled, [s.request.params for s in plan.sampled], scored, timing,
                           pooled or [])
        if sampled is not None and self.device.type == "cuda":
            step.host = SamplerOutput(*(None if t is None else _to_pinned_host(t)
                                        for t in (sampled.token_ids, sampled.logprobs,
                                                  sampled.top_ids, sampled.top_logprobs)))
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    @torch.inference_mode()
    def finish(self, step: PendingStep) -> StepResult:
        """Read the launched step's tokens (and logprobs) back: waits for the device."""
        result = StepResult([], None, timing=step.timing)
        out = step.sampled
        if step.copied is not None:
            step.copied.synchronize()
            out = step.host
        if out is not None:
            result.tokens = out.token_ids.tolist()
            if out.logprobs is not None:
                result.logprobs = self._logprobs(step.params, result.tokens, out)
        result.prompt_logprobs = [self._prompt_logprobs(rows, logits)
                                  for rows, logits in step.scored]
        if step.pooled:  # (one read back from the device for them all)
            vectors = torch.stack([vector for _, vector in step.pooled]).tolist()
            result.embeddings = dict(zip((r for r, _ in step.pooled), vectors, strict=True))
        return result

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        # Decode steps mostly sample the same rows as the step before, and their controls are
        # then the same tensors: kept unless penalties (which count the outputs), a
        # min_tokens ban (lifted after min_tokens outputs) or a bad word of several tokens
        # (banned after the others) depend on what a step added.
        last_seqs, batch = self._last_sampling
        if not (batch is not None and len(seqs) == len(last_seqs)
                and all(a is b for a, b in zip(seqs, last_seqs, strict=True))):
            min_bans = [self._min_tokens_ban(s) for s in seqs]
            bans = [ban + _bad_words_ban(s) for ban, s in zip(min_bans, seqs, strict=True)]
            params = [s.request.params for s in seqs]
            batch = SamplingBatch.from_params(
                params, self.vocab_size, self.device,
                output_token_ids=[s.output_ids for s in seqs],
                prompt_token_ids=[s.request.prompt_ids for s in seqs],
                generators=[self._generator(s) for s in seqs],
                extra_bias=bans,
                mirostat_mus=[self._mirostat_mu(s) for s in seqs],
                dry_penalties=[self._dry_penalties(s) for s in seqs])
            infill = [i for i, p in enumerate(params) if p.infill_sampler and not p.is_greedy]
            if infill:
                batch = replace(batch, infill=self._infill_rows(params, infill))
            keep = not any(min_bans) and not any(
                p.has_penalties or p.bans_by_output or p.dry for p in params)
            self._last_sampling = (tuple(seqs), batch if keep else None)
        # A guided row's mask moves with its tokens: set every step, on the batch kept or not
        # (a guide that starts past the reasoning's end has no state before it: unguided).
        # A row whose thinking budget is spent takes the thinking's end, whatever its guide
        # and even where the request bans it (as vLLM's budget overrides bans): the end's
        # logits stand in where its mask leaves nothing, as eos does for a guide.
        masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, s in enumerate(seqs):
            if self._thinking_left(s) <= 0:
                masks[i] = self._forcing_end(s.request.params.thinking_budget.end_id)
            elif s.request.params.guide is not None and (
                    state := self._guide_state(s)) is not None:
                masks[i] = (self._guide_mask(s, state), self._end_only())
        if masks:
            fallbacks = [fallback for _, fallback in masks.values()]
            batch = batch.with_guides(
                list(masks), [mask for mask, _ in masks.values()],
                fallbacks[0] if all(f is fallbacks[0] for f in fallbacks)
                else torch.stack(fallbacks))
        return batch

    def _thinking_left(self, seq: Sequence) -> float:
        """How many more thinking tokens `seq`'s budget allows (0: its end comes next);
        infinite without a budget or once its thinking has ended."""
        budget = seq.request.params.thinking_budget
        if budget is None:
            return math.inf
        state = self.thinking.get(seq, ThinkingState())
        if not state.ended and state.walked < len(seq.output_ids):
            state = self.thinking[seq] = budget.walk(seq.output_ids, state)
        return math.inf if state.ended else budget.tokens - state.used

    def _forcing_end(self, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V,) bool mask of `end_id` alone, and (V,) logits of 0 there, -inf elsewhere."""
        if end_id not in self._forcing:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[end_id] = True
            logits = torch.full((self.vocab_size,), float("-inf"))
            logits[end_id] = 0.0
            self._forcing[end_id] = (mask.to(self.device), logits.to(self.device))
        return self._forcing[end_id]

    def _infill_rows(self, params: list[SamplingParams], rows: list[int]) -> InfillRows:
        """What llama.cpp's infill sampler needs of `rows`: each one's ends (the model's
        eos and the request's stop ids: an infill's end-of-middle), the one it falls back
        on (its own end first), and the vocabulary's texts (the guides' token table)."""
        if self.guides is None:
            raise RuntimeError("the infill sampler reached a runner without a token table")
        ends = [self.eos_ids | frozenset(params[i].stop_token_ids) for i in rows]
        fallbacks = [next(iter((*params[i].stop_token_ids, *sorted(self.eos_ids))), None)
                     for i in rows]
        return InfillRows(tuple(rows), tuple(ends), tuple(fallbacks),
                          self.guides.table.token_bytes)

    def _end_only(self) -> torch.Tensor:
        """(V,): 0 at the end-of-sequence ids, -inf elsewhere (a guided row with nothing left)."""
        if self._end_only_logits is None:
            end = torch.full((self.vocab_size,), float("-inf"))
            end[[t for t in self.eos_ids if 0 <= t < self.vocab_size]] = 0.0
            self._end_only_logits = end.to(self.device)
        return self._end_only_logits

    @staticmethod
    def _logprobs(params: list[SamplingParams], tokens: list[int], out: SamplerOutput
                  ) -> list[TokenLogprob | None]:
        assert out.logprobs is not None and out.top_ids is not None
        assert out.top_logprobs is not None
        chosen, top_ids, top_lps = (out.logprobs.tolist(), out.top_ids.tolist(),
                                    out.top_logprobs.tolist())
        logprobs: list[TokenLogprob | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                logprobs.append(None)
                continue
            top = tuple(zip(top_ids[i][:p.logprobs], top_lps[i][:p.logprobs], strict=True))
            logprobs.append(TokenLogprob(tokens[i], chosen[i], top))
        return logprobs

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.request.params.seed
        if seed is None:
            return None
        if seq not in self.generators:
            # n > 1 samples of a seeded request must differ from each other: seed + index.
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed + seq.index)
            self.generators[seq] = gen
        return self.generators[seq]

    def _mirostat_mu(self, seq: Sequence) -> torch.Tensor | None:
        samplers = seq.request.params.llamacpp
        if samplers is None or not samplers.mirostat:
            return None
        if seq not in self.mirostat_mus:  # llama.cpp's start: twice the target surprise
            self.mirostat_mus[seq] = torch.tensor(2.0 * samplers.mirostat_tau,
                                                  dtype=torch.float32, device=self.device)
        return self.mirostat_mus[seq]

    def _dry_penalties(self, seq: Sequence) -> dict[int, float] | None:
        """DRY's penalties for `seq`'s next token: its prompt and output so far are the
        context llama.cpp's DRY looks back over, kept up to date as its output grows."""
        dry = seq.request.params.dry
        if dry is None:
            return None
        outputs = seq.output_ids
        context, seen = self.dry_contexts.get(seq, (None, 0))
        if context is None or seen > len(outputs):
            prompt = seq.request.prompt_ids
            context = DryContext(dry, (list(prompt[-dry.last_n:]) + outputs)[-dry.last_n:])
        else:
            context.extend(outputs[seen:])
        self.dry_contexts[seq] = (context, len(outputs))
        return context.penalties()

    def _guide_state(self, seq: Sequence) -> int | None:
        """Where `seq`'s guide stands after its output so far (walked on from the last step);
        None while it has not started: a guide with `guide_after` (the reasoning's end, under
        --reasoning-parser) starts past that token's first occurrence in the output."""
        params, guides = seq.request.params, self.guides
        assert params.guide is not None and guides is not None
        after = params.guide_after
        walked, state = self.guide_states.get(seq, (0, 0 if after is None else None))
        for token_id in seq.output_ids[walked:]:
            if state is not None:
                state = guides.advance(params.guide, state, token_id)
            elif token_id == after:
                state = 0
        self.guide_states[seq] = (len(seq.output_ids), state)
        return state

    def _guide_mask(self, seq: Sequence, state: int) -> torch.Tensor:
        guide = seq.request.params.guide
        if guide is None or self.guides is None:
            raise RuntimeError("a guided request reached a runner without guide masks")
        return self.guides.mask(guide, state)

    def _min_tokens_ban(self, seq: Sequence) -> list[tuple[int, float]]:
        # (A guided row whose guide allows only banned tokens, such as the end once its
        # output is complete, takes the end anyway: sampling.py's _apply_guides)
        params = seq.request.params
        if len(seq.output_ids) >= params.min_tokens:
            return []
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        if params.allowed_token_ids and banned.issuperset(params.allowed_token_ids):
            return []  # only tokens that end it are allowed: min_tokens gives way
        return [(t, float("-inf")) for t in banned]

    def _prompt_logprobs(self, rows: PrefillChunkRows, logits: torch.Tensor
                         ) -> tuple[Request, list[TokenLogprob | None]]:
        """Row j sits at prompt position start + j and scores the token after it."""
        prompt = rows.request.prompt_ids
        n_targets = min(rows.n, len(prompt) - rows.start - 1)
        out: list[TokenLogprob | None] = [None] if rows.start == 0 else []
        if n_targets > 0:
            k = rows.request.params.prompt_logprobs or 0
            targets = torch.tensor(prompt[rows.start + 1:rows.start + 1 + n_targets],
                                   device=logits.device)
            chosen, top_ids, top_lps, ranks = compute_logprobs(logits[:n_targets], targets, k,
                                                               ranks=True)
            assert ranks is not None
            for t, c, ids, lps, rank in zip(targets.tolist(), chosen.tolist(), top_ids.tolist(),
                                            top_lps.tolist(), ranks.tolist(), strict=True):
                out.append(TokenLogprob(t, c, tuple(zip(ids, lps, strict=True)), rank))
        return rows.request, out


def _bad_words_ban(seq: Sequence) -> list[tuple[int, float]]:
    """vLLM's bad_words: a word's last token is banned where the output ends with the rest
    of it (a one-token word: always)."""
    out = seq.output_ids
    return [(word[-1], float("-inf")) for word in seq.request.params.bad_words
            if len(word) == 1 or (len(out) >= len(word) - 1
                                  and tuple(out[len(out) - len(word) + 1:]) == word[:-1])]


def _to_pinned_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of a device tensor into pinned host memory, queued on the stream (from torch's
    caching host allocator: no allocation per step once warm)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


@dataclass(frozen=True, slots=True)
class PrefillChunkRows:
    request: Request
    start: int
    n: int

