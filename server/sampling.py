"""Batched sampler: logits (B, V) + per-row controls -> token ids (+ logprobs), vLLM semantics.

A pure function of its inputs except for the random draws: each row's noise comes from its own
`torch.Generator` when given (so a seeded request's tokens do not depend on the batch), else
from the sampler's shared one. Processing order: float32 -> logit bias -> repetition, presence
and frequency penalties -> guided rows' masks -> greedy argmax | temperature -> min-p -> top-k
-> top-p -> sample
(vLLM V1's: min-p is one of its argmax-invariant logits processors, run before top-k/top-p, so
top-p measures its nucleus on what min-p kept). Rows with `temperature_last` (llama.cpp's
native API) follow llama.cpp's chain instead: top-k -> top-p -> min-p on the logits before
temperature, then temperature; their penalties may count a window of the last n tokens,
DRY may follow them, and its other samplers (top-n-sigma, typical-p, XTC, the dynamic
temperature; or mirostat in place of all: server/sampling_llamacpp.py) run in its order;
those with `infill_sampler` end with llama.cpp's infill filter (server/sampling_infill.py).
Logprobs are "raw": log_softmax of the logits as given, before any of that processing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from server.request import GREEDY_TEMPERATURE, SamplingParams
from server.sampling_infill import InfillRows, apply_infill
from server.sampling_llamacpp import (
    ChainControls,
    MirostatRows,
    chain_logits,
    mirostat_candidates,
    mirostat_update,
)

if TYPE_CHECKING:
    from model.cpu_kernels import CpuKernels

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row sampling controls for one step, one row per sequence being sampled."""

    temperature: Tensor  # (B,) float32; 0 -> greedy row (unless `greedy` says otherwise)
    top_k: Tensor  # (B,) int64; <= 0 or >= vocab -> off
    top_p: Tensor  # (B,) float32; 1.0 -> off
    min_p: Tensor  # (B,) float32; 0.0 -> off
    repetition_penalty: Tensor  # (B,) float32; 1.0 -> off
    presence_penalty: Tensor  # (B,) float32
    frequency_penalty: Tensor  # (B,) float32
    output_counts: Tensor | None  # (B, V) occurrences in the row's output; None: no penalties
    prompt_mask: Tensor | None  # (B, V) bool, token occurs in the row's prompt
    logit_bias: Tensor | None  # (B, V) float32 additive; -inf bans a token
    generators: list[torch.Generator | None]  # per row; None -> the sampler's shared generator
    num_logprobs: int  # most top alternatives any row wants: -1 none, 0 chosen token only
    all_greedy: bool  # skip sorting and noise entirely
    # Host-side flags so the sampler can skip work without a GPU->CPU sync to inspect the
    # tensors. False is always correct (the step is just done); from_params sets them exactly.
    no_top_k: bool = False
    no_top_p: bool = False
    no_min_p: bool = False
    no_greedy: bool = False  # no row is greedy: skip the argmax
    unit_temperature: bool = False  # every sampled row has temperature 1: skip the division
    # Sampled rows without top-k, top-p or min-p: the ones a C draw can take (Sampler.kernels).
    plain_rows: tuple[int, ...] = ()
    # Rows filtered in llama.cpp's order, on the logits before temperature (temperature_last);
    # in a batch that mixes both orders, each order's rows as an index on the device (made
    # once: a kept batch serves the steps after)
    temperature_last_rows: tuple[int, ...] = ()
    order_rows: tuple[Tensor, Tensor] | None = None  # (vLLM's rows, llama.cpp's rows)
    # Guided decoding: the guided rows (k,), the tokens each may take (k, V) bool, and (V,)
    # 0 at the end-of-sequence ids, -inf elsewhere: what a row left with nothing takes (or
    # (k, V), a row's own: a thinking's forced end takes the end tag)
    guide_rows: Tensor | None = None
    guide_masks: Tensor | None = None
    end_only: Tensor | None = None
    # Rows that run llama.cpp's infill sampler last (server/sampling_infill.py)
    infill: InfillRows | None = None
    # llama.cpp's other samplers (server/sampling_llamacpp.py): its rows' extra filters,
    # the rows whose XTC draws a chance each step, the mirostat rows; and (B, V) DRY's
    # penalties, subtracted after the other penalties
    chain: ChainControls | None = None
    xtc_rows: tuple[int, ...] = ()
    mirostat: MirostatRows | None = None
    dry: Tensor | None = None
    # (B,) bool, the greedy rows, where a row at temperature 0 is sampled all the same
    # (llama.cpp's typical-p, XTC or dynamic temperature may move it off the argmax)
    greedy: Tensor | None = None

    def with_guides(self, rows: list[int], masks: list[Tensor], end_only: Tensor
                    ) -> SamplingBatch:
        """This batch with guided rows (their masks change every step; the rest is kept)."""
        device = self.temperature.device
        return replace(self, guide_rows=_to_device(torch.tensor(rows, dtype=torch.long), device),
                       guide_masks=_to_device(torch.stack(masks), device), end_only=end_only)

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        extra_bias: Sequence[Iterable[tuple[int, float]]] | None = None,
        mirostat_mus: Sequence[Tensor | None] | None = None,
        dry_penalties: Sequence[dict[int, float] | None] | None = None,
    ) -> SamplingBatch:
        """Build the batch from each row's params.

        `output_token_ids` / `prompt_token_ids` (None: empty) feed the penalties. `extra_bias`
        holds per-row (token_id, bias) pairs added on top of `params.logit_bias`, e.g. -inf on
        eos before `min_tokens`. Without `generators`, seeded rows get a fresh generator: right
        for one step, but a runner must keep one generator per request across steps, or every
        step would replay the same noise. Guided rows' masks are set apart (`with_guides`).
        `mirostat_mus` holds each mirostat row's mu (a 0-d tensor the draws update), and
        `dry_penalties` each DRY row's penalties this step (server/sampling_dry.py).
        """
        n_rows = len(params)
        device = torch.device(device)

        def column(values: list, dtype: torch.dtype) -> Tensor:
            return _to_device(torch.tensor(values, dtype=dtype), device)

        output_counts = prompt_mask = None
        if any(p.has_penalties for p in params):
            output_token_ids, prompt_token_ids = _penalised_tokens(
                params, output_token_ids, prompt_token_ids)
            output_counts = _scatter_rows(output_token_ids, n_rows, vocab_size, torch.int32)
            prompt_mask = _scatter_rows(prompt_token_ids, n_rows, vocab_size, torch.bool)
            output_counts = _to_device(output_counts, device)
            prompt_mask = _to_device(prompt_mask, device)

        pairs = [list(p.logit_bias) for p in params]
        if extra_bias is not None:
            for row, extra in zip(pairs, extra_bias, strict=True):
                row.extend(extra)
        logit_bias = None
        if any(pairs) or any(p.allowed_token_ids for p in params):
            rows = [i for i, row in enumerate(pairs) for _ in row]
            ids = [token_id for row in pairs for token_id, _ in row]
            allowed = [t for p in params for t in p.allowed_token_ids]
            if not all(0 <= t < vocab_size for t in ids + allowed):
                raise ValueError(f"logit_bias / allowed_token_ids: token ids must be in "
                                 f"[0, {vocab_size}), got {ids + allowed}")
            logit_bias = torch.zeros(n_rows, vocab_size, dtype=torch.float32)
            for i, p in enumerate(params):  # anything else is banned
                if p.allowed_token_ids:
                    logit_bias[i] = float("-inf")
                    logit_bias[i, list(p.allowed_token_ids)] = 0.0
            values = torch.tensor([bias for row in pairs for _, bias in row], dtype=torch.float32)
            # accumulate: a user bias and an extra ban on the same token add up (-inf wins)
            logit_bias.index_put_((torch.tensor(rows, dtype=torch.long),
                                   torch.tensor(ids, dtype=torch.long)), values, accumulate=True)
            logit_bias = _to_device(logit_bias, device)

        if generators is None:
            generators = [
                None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
                for p in params
            ]
        elif len(generators) != n_rows:
            raise ValueError(f"got {len(generators)} generators for {n_rows} rows")

        dry = None
        if dry_penalties is not None and any(dry_penalties):
            dry = _scatter_values(dry_penalties, n_rows, vocab_size)
            dry = _to_device(dry, device)
        chain = ChainControls.from_samplers([p.llamacpp for p in params], column)
        mirostat_rows = [i for i, p in enumerate(params) if p.mirostat and not p.is_greedy]
        mirostat = None
        if mirostat_rows:
            if mirostat_mus is None or any(mirostat_mus[i] is None for i in mirostat_rows):
                raise ValueError("mirostat rows need their mu (mirostat_mus)")
            mirostat = MirostatRows.from_rows(
                mirostat_rows, [params[i].llamacpp for i in mirostat_rows],
                [mirostat_mus[i] for i in mirostat_rows], column)
        sampled = [p for p in params if not p.is_greedy]  # controls of greedy rows are moot
        last = tuple(i for i, p in enumerate(params) if p.temperature_last and not p.is_greedy)
        order_rows = None
        if 0 < len(last) < n_rows:
            first = sorted(set(range(n_rows)) - set(last))
            order_rows = (column(first, torch.long), column(list(last), torch.long))
        return cls(
            # Clamped to float32's largest: an inf temperature would turn a banned token's
            # -inf logit into -inf / inf = NaN.
            temperature=column([0.0 if p.is_greedy else min(p.temperature, FLOAT32_MAX)
                                for p in params], torch.float32),
            # Clamped: any top_k past the vocabulary means "off", and must fit an int64.
            top_k=column([min(max(p.top_k, 0), vocab_size) for p in params], torch.int64),
            top_p=column([p.top_p for p in params], torch.float32),
            min_p=column([p.min_p for p in params], torch.float32),
            # A penalty that rounds to 0 in float32 would divide by zero.
            repetition_penalty=column([max(p.repetition_penalty, 1e-6) for p in params],
                                      torch.float32),
            presence_penalty=column([p.presence_penalty for p in params], torch.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], torch.float32),
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            logit_bias=logit_bias,
            generators=list(generators),
            num_logprobs=max(
                (-1 if p.logprobs is None else p.logprobs for p in params), default=-1
            ),
            all_greedy=not sampled,
            no_top_k=all(p.top_k <= 0 or p.top_k >= vocab_size for p in sampled),
            no_top_p=all(p.top_p >= 1.0 for p in sampled),
            no_min_p=all(p.min_p <= 0.0 for p in sampled),
            no_greedy=len(sampled) == n_rows > 0,
            unit_temperature=all(p.temperature == 1.0 for p in sampled),
            plain_rows=tuple(i for i, p in enumerate(params)
                             if not p.is_greedy and (p.top_k <= 0 or p.top_k >= vocab_size)
                             and p.top_p >= 1.0 and p.min_p <= 0.0 and not p.infill_sampler
                             and not (p.llamacpp and (p.llamacpp.filters or p.mirostat))),
            temperature_last_rows=last,
            order_rows=order_rows,
            chain=chain,
            xtc_rows=tuple(i for i, p in enumerate(params) if not p.is_greedy
                           and p.llamacpp is not None and not p.mirostat
                           and p.llamacpp.xtc_on),
            mirostat=mirostat,
            dry=dry,
            greedy=column([p.is_greedy for p in params], torch.bool) if any(
                p.temperature < GREEDY_TEMPERATURE and not p.is_greedy for p in params) else None,
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor's copy on `device`. To a GPU, from pinned memory without waiting: a plain
    copy would wait for everything queued on the stream, which with async scheduling is the
    step in flight (the caching host allocator keeps the pinned block until the copy ran)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _penalised_tokens(params: Sequence[SamplingParams],
                      output_token_ids: Sequence[Sequence[int]] | None,
                      prompt_token_ids: Sequence[Sequence[int]] | None
                      ) -> tuple[Sequence[Sequence[int]] | None, Sequence[Sequence[int]] | None]:
    """The tokens each row's penalties count: its output (and prompt, for repetition), or,
    with penalty_last_n (llama.cpp's), the last n tokens of prompt + output as if all were
    output: llama.cpp's penalties count them alike."""
    if all(p.penalty_last_n is None for p in params):
        return output_token_ids, prompt_token_ids
    outputs, prompts = [], []
    for i, p in enumerate(params):
        output = output_token_ids[i] if output_token_ids is not None else ()
        prompt = prompt_token_ids[i] if prompt_token_ids is not None else ()
        if p.penalty_last_n is None:
            outputs.append(output)
            prompts.append(prompt)
            continue
        n = p.penalty_last_n
        window = list(output[-n:])
        if len(window) < n:
            window = list(prompt[max(0, len(prompt) - (n - len(window))):]) + window
        outputs.append(window)
        prompts.append(())
    return outputs, prompts


def _scatter_values(values: Sequence[dict[int, float] | None], n_rows: int, vocab_size: int
                    ) -> Tensor:
    """(n_rows, vocab_size) float32 on the CPU: each row's {token: value}, 0 elsewhere."""
    out = torch.zeros(n_rows, vocab_size, dtype=torch.float32)
    for row, entries in enumerate(values):
        if entries:
            out[row, list(entries)] = torch.tensor(list(entries.values()), dtype=torch.float32)
    return out


def _scatter_rows(
    token_ids: Sequence[Sequence[int]] | None, n_rows: int, vocab_size: int, dtype: torch.dtype
) -> Tensor:
    """(n_rows, vocab_size) per-row token counts (or presence, for bool) on the CPU."""
    out = torch.zeros(n_rows, vocab_size, dtype=dtype)
    if token_ids is None:
        return out
    if len(token_ids) != n_rows:
        raise ValueError(f"got token ids for {len(token_ids)} rows, expected {n_rows}")
    rows = torch.tensor([i for i, ids in enumerate(token_ids) for _ in ids], dtype=torch.int64)
    ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64)
    out.index_put_((rows, ids), torch.ones(len(ids), dtype=dtype), accumulate=dtype != torch.bool)
    return out


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    """Chosen tokens and, when any row asked, their raw logprobs and top alternatives."""

    token_ids: Tensor  # (B,) int64
    logprobs: Tensor | None  # (B,) float32, logprob of the chosen token
    top_ids: Tensor | None  # (B, k) int64, k = num_logprobs, by logprob descending
    top_logprobs: Tensor | None  # (B, k) float32


def compute_logprobs(
    logits: Tensor, token_ids: Tensor, num_top: int, ranks: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """log_softmax in float32 -> (chosen logprob (N,), top ids (N, k), top logprobs (N, k),
    and with `ranks` each chosen token's rank (N,): how many tokens are at least as likely,
    itself included, as vLLM counts it (1: the likeliest; a tie ranks after))."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(1, token_ids.long().unsqueeze(1)).squeeze(1)  # (N,)
    top_logprobs, top_ids = logprobs.topk(min(max(num_top, 0), logprobs.shape[-1]), dim=-1)
    rank = (logprobs >= chosen.unsqueeze(1)).sum(dim=-1) if ranks else None
    return chosen, top_ids, top_logprobs, rank


class Sampler:
    """Samples one token per row; holds the shared generator for unseeded rows and, on CPU,
    the C kernels.

    With `kernels` (model/cpu_kernels.py), greedy CPU rows take their argmax in C, and CPU rows
    without top-k, top-p or min-p are drawn in C: softmax and the two-level inverse-CDF search
    in one pass per row, 3x faster than the PyTorch ops below at 1-64 rows of 32000 tokens.
    Which path a row takes depends only on its own parameters, and both invert the CDF at the
    same uniform draw, so a seeded request's draws still do not depend on its batch; they can
    differ from the PyTorch path's where a draw falls within rounding of a token boundary.
    """

    def __init__(self, seed: int | None = None, kernels: CpuKernels | None = None) -> None:
        self.seed = seed
        self.kernels = kernels
        self._shared: dict[torch.device, torch.Generator] = {}  # one per device, made lazily

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        token_ids = self._sample(logits, batch)
        if batch.num_logprobs < 0:
            return SamplerOutput(token_ids, None, None, None)
        chosen, top_ids, top_logprobs, _ = compute_logprobs(logits, token_ids,
                                                            batch.num_logprobs)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    def _sample(self, logits: Tensor, batch: SamplingBatch) -> Tensor:
        logits = process_logits(logits, batch)
        greedy_ids = None if batch.no_greedy else self._argmax(logits)  # (B,)
        if batch.all_greedy:
            return greedy_ids
        n_rows = logits.shape[0]
        uniforms = self._uniforms(batch, n_rows, logits.device)
        in_c = batch.plain_rows if self.kernels and logits.device.type == "cpu" else ()
        if len(in_c) == n_rows:  # every row: one C pass, no probabilities tensor
            return self._sample_in_c(logits, batch, uniforms, None)
        if (in_c and batch.no_top_k and batch.no_top_p and batch.no_min_p and not batch.infill
                and batch.chain is None and batch.mirostat is None):
            assert greedy_ids is not None  # every sampled row is in C: the others are greedy
            sampled_ids = greedy_ids.clone()
        else:
            sampled_ids = self._sample_in_torch(logits, batch, uniforms)
        if in_c:
            rows = torch.tensor(in_c)
            sampled_ids[rows] = self._sample_in_c(logits, batch, uniforms, rows)
        if batch.mirostat is not None:
            rows = batch.mirostat.rows
            sampled_ids[rows] = self._sample_mirostat(logits[rows], batch.temperature[rows],
                                                      batch.mirostat, uniforms[rows])
        if greedy_ids is None:
            return sampled_ids
        greedy = batch.temperature == 0 if batch.greedy is None else batch.greedy
        return torch.where(greedy, greedy_ids, sampled_ids)

    def _argmax(self, logits: Tensor) -> Tensor:
        # PyTorch's CPU argmax took 0.25-0.3 ms for 16 rows of 32000 tokens, a fiftieth of the
        # step; the C one gives the same ids in 0.04 ms.
        if self.kernels is not None and logits.device.type == "cpu":
            return self.kernels.argmax(logits)
        return logits.argmax(dim=-1)

    def _sample_in_torch(self, logits: Tensor, batch: SamplingBatch, uniforms: Tensor
                         ) -> Tensor:
        """Every row drawn with PyTorch's ops (a greedy row's draw is discarded)."""
        xtc_draws = self._xtc_draws(batch, logits.shape[0], logits.device)
        final = self._final_logits(logits, batch, xtc_draws)
        if batch.infill is not None:
            final = apply_infill(final, batch.infill)
        return sample_inverse_cdf(final.softmax(dim=-1), uniforms)

    @staticmethod
    def _sample_mirostat(logits: Tensor, temperature: Tensor, mirostat: MirostatRows,
                         uniforms: Tensor) -> Tensor:
        """The mirostat rows' tokens, drawn from their truncation; their mus move."""
        probs, order = mirostat_candidates(logits / temperature.unsqueeze(1), mirostat)
        picked = sample_inverse_cdf(probs, uniforms)
        mirostat_update(mirostat, probs, picked)
        return order.gather(1, picked.unsqueeze(1)).squeeze(1)

    @staticmethod
    def _final_logits(logits: Tensor, batch: SamplingBatch, xtc_draws: Tensor | None = None
                      ) -> Tensor:
        """The tempered logits each row draws from, what its filters drop at -inf
        (`xtc_draws`: each row's XTC chance this step, `_xtc_draws`)."""
        scaled = logits
        if not batch.unit_temperature:
            # Greedy rows get temperature 1 here only to keep their (discarded) row finite.
            temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
            scaled = logits / temperature.unsqueeze(1)
        if not batch.temperature_last_rows:
            return _filtered(scaled, batch)
        # llama.cpp's rows: what their filters drop is found on the logits before temperature
        if batch.order_rows is None:  # (every sampled row is llama.cpp's)
            return _llamacpp_logits(logits, scaled, batch, xtc_draws)
        others, rows = batch.order_rows
        out = torch.empty_like(scaled)
        out[others] = _filtered(scaled[others], _rows_of(batch, others))
        out[rows] = _llamacpp_logits(logits[rows], scaled[rows], _rows_of(batch, rows),
                                     None if xtc_draws is None else xtc_draws[rows])
        return out

    def _sample_in_c(self, logits: Tensor, batch: SamplingBatch, uniforms: Tensor,
                     rows: Tensor | None) -> Tensor:
        """The C draw for `rows` (None: all) of the processed logits, each at its uniform."""
        assert self.kernels is not None
        temperature, draws = batch.temperature, uniforms[:, 0]
        if rows is not None:
            logits, temperature, draws = logits[rows], temperature[rows], draws[rows]
        return self.kernels.sample(logits.contiguous(), 1.0 / temperature, draws)

    def _uniforms(self, batch: SamplingBatch, n_rows: int, device: torch.device) -> Tensor:
        """One U[0, 1) draw per row (n_rows, 1) in float64: a seeded row's from its own
        generator (so its tokens do not depend on the batch), the others' from the shared one."""
        generators = batch.generators if len(batch.generators) == n_rows else [None] * n_rows
        uniforms = torch.empty(n_rows, 1, dtype=torch.float64, device=device)
        if any(g is None for g in generators):
            uniforms.uniform_(generator=self._shared_generator(device))
        for row, generator in enumerate(generators):
            if generator is not None:
                uniforms[row].uniform_(generator=generator)
        return uniforms

    def _xtc_draws(self, batch: SamplingBatch, n_rows: int, device: torch.device
                   ) -> Tensor | None:
        """(n_rows,) each XTC row's chance this step, U[0, 1) from its generator or the shared
        one (2 elsewhere: above any probability that matters); None without XTC rows. Drawn
        after the token's uniform, so a seeded row's noise depends on its own controls only."""
        if not batch.xtc_rows:
            return None
        draws = torch.full((n_rows,), 2.0, dtype=torch.float32, device=device)
        for row in batch.xtc_rows:
            generator = batch.generators[row] if len(batch.generators) == n_rows else None
            draws[row:row + 1].uniform_(generator=generator or self._shared_generator(device))
        return draws

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()  # nondeterministic
            else:
                generator.manual_seed(self.seed)
            self._shared[device] = generator
        return generator


CDF_BLOCK = 128  # tokens per block of the two-level search in sample_inverse_cdf


def sample_inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token ids (B,) drawn from unnormalised probs (B, V) by inverting each row's CDF at its
    uniform draw (B, 1): one random number per row, no host sync. probs must be finite and
    non-negative (softmax output); a row that is not still gets some id in [0, V).

    Two levels, because a cumulative sum along a row is a serial chain of adds on CPU: the
    CDF over blocks of CDF_BLOCK tokens picks the block, then the CDF inside that one block
    picks the token. Measured on the 2-core CPU, 32000 tokens, 1 / 4 / 16 / 64 rows: 0.05 /
    0.06 / 0.09 / 0.17 ms, against 0.04 / 0.07 / 0.27 / 13 ms for one flat cumsum and
    0.6 / 2.5 / 11 / 41 ms for the exponential race (argmax p_i / E_i, which draws V random
    numbers per row).
    """
    n_rows, vocab = probs.shape
    n_blocks = -(-vocab // CDF_BLOCK)
    if n_blocks * CDF_BLOCK != vocab:  # zero-probability padding is never picked
        probs = F.pad(probs, (0, n_blocks * CDF_BLOCK - vocab))
    blocks = probs.view(n_rows, n_blocks, CDF_BLOCK)
    # A block's own mass in float32 (a float64 sum would first copy all of probs); the running
    # sums over blocks and inside the chosen block in float64.
    block_mass = blocks.sum(dim=-1).double()  # (B, n_blocks)
    block_cdf = block_mass.cumsum(dim=-1)
    # Strictly below the total, and below each inner total: the first index whose cdf exceeds
    # the target then has probability > 0 (a masked token repeats its predecessor's cdf).
    target = _below(uniforms * block_cdf[:, -1:], block_cdf[:, -1:])
    # The two clamps only matter for a row without a distribution (NaN, all zero): its draw
    # is meaningless, but the gather below and the id returned must stay in range.
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=n_blocks - 1)  # (B, 1)
    before = (block_cdf - block_mass).gather(1, block)  # mass of the blocks before it
    inner = blocks.gather(1, block[:, :, None].expand(-1, -1, CDF_BLOCK)).squeeze(1)
    inner_cdf = inner.cumsum(dim=-1, dtype=torch.float64)  # (B, CDF_BLOCK)
    rest = _below((target - before).clamp(min=0), inner_cdf[:, -1:])
    token = torch.searchsorted(inner_cdf, rest, right=True)
    return (block * CDF_BLOCK + token).squeeze(1).clamp_(max=vocab - 1)


def _below(values: Tensor, bound: Tensor) -> Tensor:
    """values clamped to strictly less than bound (both float64)."""
    return torch.minimum(values, torch.nextafter(bound, torch.zeros_like(bound)))


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """float32 logits after bias, penalties and guides: what greedy rows take the argmax of."""
    # Every step is out of place: the caller's logits stay raw for the logprobs.
    raw = logits
    logits = logits.float()  # (B, V)
    if batch.logit_bias is not None:
        logits = logits + batch.logit_bias
    if batch.output_counts is not None:
        logits = _apply_penalties(logits, batch)
    if batch.dry is not None:
        logits = logits - batch.dry
    if batch.guide_rows is not None:
        logits = _apply_guides(logits.clone() if logits is raw else logits, batch)
    return logits


def _apply_guides(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """In place: each guided row keeps only the tokens its guide allows; a row left with
    nothing (its guide's tokens all banned: allowed_token_ids, a min_tokens ban) takes the
    end of the sequence (or its own fallback) instead of a draw from nothing."""
    assert batch.guide_masks is not None and batch.end_only is not None
    rows = batch.guide_rows
    picked = logits[rows].masked_fill(~batch.guide_masks, float("-inf"))
    stuck = (picked == float("-inf")).all(dim=1, keepdim=True)  # (k, 1), no host sync
    logits[rows] = torch.where(stuck, batch.end_only, picked)
    return logits


def _apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition over prompt or output tokens; presence and frequency over output only."""
    assert batch.output_counts is not None
    counts = batch.output_counts.to(logits.dtype)  # (B, V)
    in_output = counts > 0
    seen = in_output if batch.prompt_mask is None else in_output | batch.prompt_mask
    rep = batch.repetition_penalty.unsqueeze(1)  # (B, 1)
    # Shrinks a seen token's logit toward "less likely" whatever its sign (CTRL paper, vLLM).
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty.unsqueeze(1) * counts
    return logits - batch.presence_penalty.unsqueeze(1) * in_output


def _rows_of(batch: SamplingBatch, rows: Tensor) -> SamplingBatch:
    """The filters' controls of some rows (what _filtered and _llamacpp_logits read)."""
    return replace(batch, top_k=batch.top_k[rows], top_p=batch.top_p[rows],
                   min_p=batch.min_p[rows], temperature=batch.temperature[rows],
                   chain=None if batch.chain is None else batch.chain.rows(rows))


def _llamacpp_logits(logits: Tensor, scaled: Tensor, batch: SamplingBatch,
                     xtc_draws: Tensor | None) -> Tensor:
    """llama.cpp's rows' tempered logits: `scaled` less what top-k, top-p and min-p drop,
    found on the `logits` before temperature; with its other filters or a dynamic
    temperature, its whole chain (server/sampling_llamacpp.py). Each row takes one path
    whatever its neighbours (the two round and break ties their own ways): a row with none
    of the other filters keeps the plain path in a batch where others run the chain."""
    kept = _filtered(logits, batch, min_p_first=False)
    plain = scaled.masked_fill(kept == float("-inf"), float("-inf"))
    if batch.chain is None:
        return plain
    chained = chain_logits(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p,
                           batch.chain, xtc_draws)
    return torch.where(batch.chain.on.unsqueeze(1), chained, plain)


def _filtered(logits: Tensor, batch: SamplingBatch, min_p_first: bool = True) -> Tensor:
    """`logits` with what min-p, top-k and top-p drop at -inf: min-p first (vLLM's order),
    or last (llama.cpp's: top-p's nucleus is then measured on what top-k alone kept)."""
    if min_p_first and not batch.no_min_p:
        logits = _apply_min_p(logits, batch.min_p)
    if not (batch.no_top_k and batch.no_top_p):
        logits = _apply_top_k_top_p(logits, batch)
    if not min_p_first and not batch.no_min_p:
        logits = _apply_min_p(logits, batch.min_p)
    return logits


def _apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask to -inf the tokens less likely than min_p times the likeliest."""
    probs = logits.softmax(dim=-1)
    max_prob = probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < min_p.unsqueeze(1) * max_prob, float("-inf"))


def _apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Mask to -inf what top-k then top-p drop; one ascending sort serves both."""
    vocab_size = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # (B, V) ascending
    if not batch.no_top_k:
        k = batch.top_k.long()
        k = torch.where((k <= 0) | (k >= vocab_size), vocab_size, k)
        kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # (B, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if not batch.no_top_p:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        # A token goes when the mass at or below it is <= 1 - p, i.e. the tokens above it
        # already reach p: the smallest nucleus with mass >= p stays.
        drop = cumulative <= 1 - batch.top_p.unsqueeze(1)
        drop[:, -1] = False  # the top token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
