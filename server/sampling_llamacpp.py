"""llama.cpp's samplers beyond top-k, top-p and min-p, batched, for the rows of its native API
(SamplingParams.llamacpp): top-n-sigma, typical-p, XTC, min_keep and the dynamic temperature
as its chain runs them (llama-sampling.cpp), and mirostat 1 and 2 in place of the chain.

A row's candidates are its finite logits: each stage drops tokens by setting them to -inf, so
a softmax over the row is llama.cpp's softmax over its candidate list, and a stage that
counts candidates (min_keep, XTC's, the dynamic temperature's maximum entropy) counts the
finite ones. Each stage is a no-op on a row whose control is neutral, so one batch mixes rows
with and without them. The order: top-n-sigma, top-k, typical-p, top-p, min-p, XTC, then the
temperature (dynamic or not; at or near 0, the likeliest candidate alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from server.request import GREEDY_TEMPERATURE, LlamaCppSamplers

NEG_INF = float("-inf")
FLOAT32_MAX = torch.finfo(torch.float32).max
MIROSTAT_M = 100  # llama.cpp's: the likeliest tokens mirostat 1 fits its Zipf exponent on


@dataclass(frozen=True, slots=True)
class ChainControls:
    """(B,) controls of llama.cpp's extra filters, neutral on rows without them, and host
    flags (any row has it) that skip a stage no row uses."""

    top_n_sigma: Tensor  # float32; <= 0: off
    typical_p: Tensor  # float32; >= 1: off
    min_keep: Tensor  # int64; the fewest tokens top-p, min-p, typical-p and XTC leave
    xtc_probability: Tensor  # float32; <= 0: off
    xtc_threshold: Tensor  # float32; > 0.5: off
    dynatemp_range: Tensor  # float32; <= 0: off
    dynatemp_exponent: Tensor  # float32
    on: Tensor  # bool; the rows with a filter on: only these run the chain (`chain_logits`)
    sigma: bool
    typical: bool
    xtc: bool
    dynatemp: bool

    @classmethod
    def from_samplers(cls, samplers: Sequence[LlamaCppSamplers | None],
                      column: object) -> ChainControls | None:
        """The batch's controls (None: no row has a filter on); `column(values, dtype)` puts
        a list on the batch's device."""
        if not any(s is not None and s.filters for s in samplers):
            return None
        neutral = LlamaCppSamplers()
        rows = [neutral if s is None or s.mirostat else s for s in samplers]

        def values(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
            return column([getattr(s, name) for s in rows], dtype)  # type: ignore[operator]

        return cls(
            top_n_sigma=values("top_n_sigma"), typical_p=values("typical_p"),
            min_keep=values("min_keep", torch.int64),
            xtc_probability=values("xtc_probability"), xtc_threshold=values("xtc_threshold"),
            dynatemp_range=values("dynatemp_range"),
            dynatemp_exponent=values("dynatemp_exponent"),
            on=column([s is not None and not s.mirostat and s.filters for s in samplers],
                      torch.bool),
            sigma=any(s.top_n_sigma > 0 for s in rows),
            typical=any(s.typical_p < 1.0 for s in rows),
            xtc=any(s.xtc_on for s in rows),
            dynatemp=any(s.dynatemp_range > 0 for s in rows))

    def rows(self, index: Tensor) -> ChainControls:
        """The controls of some rows (the flags kept: True only costs a no-op stage)."""
        return replace(self, **{name: getattr(self, name)[index] for name in (
            "top_n_sigma", "typical_p", "min_keep", "xtc_probability", "xtc_threshold",
            "dynatemp_range", "dynatemp_exponent", "on")})


def chain_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                 min_p: Tensor, controls: ChainControls, xtc_draws: Tensor | None) -> Tensor:
    """The tempered logits (R, V) llama.cpp's rows draw from: its filters in its order on the
    logits before temperature, what they drop at -inf. `xtc_draws` (R,): each row's chance
    this step (XTC acts where it is at most xtc_probability); None: XTC off everywhere."""
    # (every stage keeps one; more than the vocabulary: all)
    keep_at_least = controls.min_keep.clamp(min=1, max=logits.shape[-1]).unsqueeze(1)
    x = logits
    if controls.sigma:
        x = _top_n_sigma(x, controls.top_n_sigma)
    x = _top_k(x, top_k)
    if controls.typical:
        x = _typical(x, controls.typical_p, keep_at_least)
    x = _top_p(x, top_p, keep_at_least)
    x = _min_p(x, min_p, keep_at_least)
    if controls.xtc and xtc_draws is not None:
        x = _xtc(x, controls, xtc_draws)
    return _temperature(x, temperature, controls)


def _finite_count(x: Tensor) -> Tensor:
    return (x > NEG_INF).sum(dim=-1)


def _entropy(x: Tensor) -> Tensor:
    """(R,) the entropy of each row's softmax over its candidates."""
    logp = x.log_softmax(dim=-1)
    return -torch.where(x > NEG_INF, logp.exp() * logp, 0.0).sum(dim=-1)


def _unsort(sorted_mask: Tensor, order: Tensor) -> Tensor:
    """A mask over sorted positions back in token order."""
    return torch.empty_like(sorted_mask).scatter_(1, order, sorted_mask)


def _positions(x: Tensor) -> Tensor:
    return torch.arange(x.shape[-1], device=x.device).unsqueeze(0)


def _top_n_sigma(x: Tensor, n: Tensor) -> Tensor:
    """Drop the logits more than n standard deviations (of the candidates' logits) below the
    largest; rows with n <= 0 or one candidate are left alone."""
    finite = x > NEG_INF
    count = finite.sum(dim=-1, keepdim=True)
    mean = x.masked_fill(~finite, 0.0).sum(dim=-1, keepdim=True) / count.clamp(min=1)
    var = (x - mean).square().masked_fill(~finite, 0.0).sum(dim=-1, keepdim=True)
    std = (var / count.clamp(min=1)).sqrt()
    floor = x.amax(dim=-1, keepdim=True) - n.unsqueeze(1) * std
    on = (n > 0).unsqueeze(1) & (count > 1)
    return x.masked_fill(on & (x < floor), NEG_INF)


def _top_k(x: Tensor, k: Tensor) -> Tensor:
    """Keep the k largest (k <= 0: all)."""
    vocab = x.shape[-1]
    k = torch.where((k <= 0) | (k >= vocab), vocab, k).long()
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
    return x.masked_fill(x < kth, NEG_INF)


def _typical(x: Tensor, p: Tensor, keep_at_least: Tensor) -> Tensor:
    """Locally typical sampling: candidates by how far their surprise lies from the entropy,
    nearest first, up to and with the first that brings the mass past p (p >= 1: off)."""
    logp = x.log_softmax(dim=-1)
    entropy = _entropy(x).unsqueeze(1)
    score = (-logp - entropy).abs().masked_fill(x == NEG_INF, math.inf)
    order = score.sort(dim=-1, stable=True).indices
    mass = logp.exp().gather(1, order)
    before = F.pad(mass.cumsum(dim=-1)[:, :-1], (1, 0))  # the mass of the nearer ones
    kept = (before <= p.unsqueeze(1)) | (_positions(x) < keep_at_least)
    return x.masked_fill((p < 1.0).unsqueeze(1) & ~_unsort(kept, order), NEG_INF)


def _top_p(x: Tensor, p: Tensor, keep_at_least: Tensor) -> Tensor:
    """The likeliest candidates up to and with the first whose mass reaches p (p >= 1: off)."""
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    before = F.pad(sorted_x.softmax(dim=-1).cumsum(dim=-1)[:, :-1], (1, 0))
    kept = (before < p.unsqueeze(1)) | (_positions(x) < keep_at_least)
    return x.masked_fill((p < 1.0).unsqueeze(1) & ~_unsort(kept, order), NEG_INF)


def _min_p(x: Tensor, p: Tensor, keep_at_least: Tensor) -> Tensor:
    """Drop the candidates less likely than p times the likeliest (measured on the logits, as
    llama.cpp does), but keep the likeliest min_keep (p <= 0: off)."""
    top = x.amax(dim=-1, keepdim=True)
    floor = top + p.clamp(min=1e-30).log().unsqueeze(1)
    kth = x.sort(dim=-1, descending=True).values.gather(1, keep_at_least - 1)
    drop = (x < floor) & (x < kth)
    return x.masked_fill((p > 0.0).unsqueeze(1) & drop, NEG_INF)


def _xtc(x: Tensor, controls: ChainControls, draws: Tensor) -> Tensor:
    """Exclude top choices: where a row's draw is at most xtc_probability, the candidates at
    or above xtc_threshold all go but the least likely of them, when at least two reach it
    and min_keep candidates are left."""
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    probs = sorted_x.softmax(dim=-1)
    # (of the candidates left: at a threshold of 0 or below, those dropped before reach it)
    above = (probs >= controls.xtc_threshold.unsqueeze(1)) & (sorted_x > NEG_INF)
    last_above = above.sum(dim=-1) - 1
    left = _finite_count(x) - last_above
    on = ((controls.xtc_probability > 0) & (controls.xtc_threshold <= 0.5)
          & (draws <= controls.xtc_probability) & (last_above > 0)
          & (left >= controls.min_keep))
    drop = on.unsqueeze(1) & (_positions(x) < last_above.unsqueeze(1))
    return x.masked_fill(_unsort(drop, order), NEG_INF)


def _temperature(x: Tensor, temperature: Tensor, controls: ChainControls) -> Tensor:
    """x over each row's temperature: the dynamic one where dynatemp_range > 0 (between
    temperature -/+ range by the candidates' normalised entropy to dynatemp_exponent's
    power); at (or near) 0, the likeliest candidate alone."""
    t = temperature
    if controls.dynatemp:
        count = _finite_count(x)
        r = controls.dynatemp_range
        low, high = (t - r).clamp(min=0.0), t + r
        normalised = _entropy(x) / count.clamp(min=2).float().log()
        dynamic = low + (high - low) * normalised.pow(controls.dynatemp_exponent)
        # (NaN where an extreme exponent meets a range that rounds away: the temperature)
        t = torch.where((r > 0) & (count > 1) & ~dynamic.isnan(), dynamic, t)
    greedy = (t < GREEDY_TEMPERATURE).unsqueeze(1)
    scaled = x / torch.where(greedy.squeeze(1), 1.0, t).clamp(max=FLOAT32_MAX).unsqueeze(1)
    likeliest = _positions(x) == x.argmax(dim=-1, keepdim=True)
    return torch.where(greedy, x.masked_fill(~likeliest, NEG_INF), scaled)


# --- mirostat -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MirostatRows:
    """The batch rows that draw by mirostat (sampled rows only: at temperature 0 a row is
    greedy), their controls, and each one's mu: a 0-d float32 tensor on the device that the
    draw updates in place (the runner keeps one per sequence, 2 tau at its start)."""

    rows: Tensor  # (M,) int64
    version: Tensor  # (M,) int64, 1 or 2
    tau: Tensor  # (M,) float32
    eta: Tensor  # (M,) float32
    mus: tuple[Tensor, ...]

    @classmethod
    def from_rows(cls, rows: list[int], samplers: Sequence[LlamaCppSamplers],
                  mus: Sequence[Tensor], column: object) -> MirostatRows:
        def values(name: str, dtype: torch.dtype = torch.float32) -> Tensor:
            return column([getattr(s, name) for s in samplers], dtype)  # type: ignore[operator]

        return cls(column(rows, torch.int64), values("mirostat", torch.int64),  # type: ignore[operator]
                   values("mirostat_tau"), values("mirostat_eta"), tuple(mus))


def mirostat_candidates(scaled: Tensor, m: MirostatRows) -> tuple[Tensor, Tensor]:
    """Mirostat's truncation of the tempered logits (M, V): the kept candidates' probabilities
    renormalised, in descending order, and that order (token ids by position). Version 2
    keeps those whose surprise (-log2 p) is at most mu, the likeliest at least; version 1 the
    top k, k from the Zipf exponent fitted to the likeliest 100 and mu."""
    sorted_x, order = scaled.sort(dim=-1, descending=True, stable=True)
    probs = sorted_x.softmax(dim=-1)
    mu = torch.stack(m.mus).unsqueeze(1)  # (M, 1)
    positions = _positions(scaled)
    keep = (-probs.log2() <= mu) | (positions == 0)  # version 2
    vocab = scaled.shape[-1]
    fitted = min(MIROSTAT_M - 1, vocab - 1)
    if fitted > 0:
        i = torch.arange(fitted, device=scaled.device, dtype=torch.float32)
        t = ((i + 2) / (i + 1)).log()
        # (fitted over the candidates left only: a grammar's or a ban's zeros are no Zipf)
        valid = probs[:, 1:fitted + 1] > 0
        b = (probs[:, :fitted] / probs[:, 1:fitted + 1]).log()
        s_hat = (torch.where(valid, t * b, 0.0).sum(dim=-1, keepdim=True)
                 / torch.where(valid, t * t, 0.0).sum(dim=-1, keepdim=True))
        epsilon = s_hat - 1
        k = ((epsilon * mu.exp2()) / (1 - float(vocab) ** -epsilon)) ** (1 / s_hat)
        k = k.nan_to_num(nan=1.0, posinf=vocab, neginf=1.0).floor().clamp(1, vocab)
        keep = torch.where((m.version == 1).unsqueeze(1), positions < k, keep)
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True), order


def mirostat_update(m: MirostatRows, probs: Tensor, picked: Tensor) -> None:
    """Move each row's mu by eta times how far the picked position's surprise lay from tau."""
    surprise = -probs.gather(1, picked.unsqueeze(1)).squeeze(1).log2()
    mu = torch.stack(m.mus) - m.eta * (surprise - m.tau)
    for j, row_mu in enumerate(m.mus):
        row_mu.copy_(mu[j])
