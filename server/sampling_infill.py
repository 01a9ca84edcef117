"""llama.cpp's infill sampler: the last filter of a code-completion request's chain (llama.vim
and llama.vscode send `"samplers": ["top_k", "top_p", "infill"]`).

It favours ending the middle, and text tokens that agree: over the candidates the filters
before it kept, with their probabilities p,
1. where the end-of-generation tokens hold more than 1 / (3 * candidates + 1) of the mass
   (3 * p_end * n > p_text), only they stay: the middle ends;
2. else a token whose text begins another's takes that one's probability, into whichever of
   the two is likelier (" ret" and " return" count as one choice);
3. text tokens below 0.2 go; none left: the end-of-generation token alone;
4. renormalised, text tokens below 1 / (text tokens + 1) go.
The draw is then from the softmax of the survivors' logits (llama.cpp's dist sampler recomputes
it), not from the merged probabilities. Host-side Python over the candidates, a few tens of
them after top-k: only rows that ask for it pay.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

END_MASS_RATIO = 3  # step 1: ends win once 3 * p_end * n > p_text
TEXT_FLOOR = 0.2  # step 3


@dataclass(frozen=True, slots=True)
class InfillRows:
    """The batch rows that run the infill sampler, with what it needs of each."""

    rows: tuple[int, ...]
    ends: tuple[frozenset[int], ...]  # each row's end-of-generation ids
    # each row's token when no text token is left (its end; None, a model without one: the
    # row is left as it was)
    fallbacks: tuple[int | None, ...]
    pieces: Sequence[bytes]  # every token's text; b"" for special tokens (never merged)


def apply_infill(logits: Tensor, infill: InfillRows) -> Tensor:
    """`logits` (B, V), what the sampler draws from, with the infill rows filtered (out of
    place): what they drop at -inf."""
    out = logits.clone()
    for row, ends, fallback in zip(infill.rows, infill.ends, infill.fallbacks, strict=True):
        out[row] = _filter_row(logits[row], infill.pieces, ends, fallback)
    return out


def _filter_row(row: Tensor, pieces: Sequence[bytes], ends: frozenset[int],
                fallback: int | None) -> Tensor:
    ids = torch.isfinite(row).nonzero().squeeze(1)  # the candidates
    values = row[ids].double()
    order = values.argsort(descending=True, stable=True)  # llama.cpp's: likeliest first
    ids_list = ids[order].tolist()
    kept = infill_keep(ids_list, values[order].softmax(0).tolist(), pieces, ends)
    if kept is None and fallback is None:
        return row
    out = torch.full_like(row, float("-inf"))
    if kept is None:
        out[fallback] = 0.0
    else:
        index = torch.tensor(kept, dtype=torch.long, device=row.device)
        out[index] = row[index]
    return out


def infill_keep(ids: list[int], probs: list[float], pieces: Sequence[bytes],
                ends: frozenset[int]) -> list[int] | None:
    """The ids that stay of candidates `ids` (likeliest first) with probabilities `probs`;
    None: none of the text tokens stays, the end alone is drawn."""
    is_end = [t in ends for t in ids]
    p_end = sum(p for p, end in zip(probs, is_end, strict=True) if end)
    p_text = sum(p for p, end in zip(probs, is_end, strict=True) if not end)
    if END_MASS_RATIO * p_end * len(ids) > p_text:
        return [t for t, end in zip(ids, is_end, strict=True) if end]
    p, alive = list(probs), [True] * len(ids)
    _merge_prefixes(ids, p, alive, pieces)
    kept = [i for i in range(len(ids)) if alive[i] and (is_end[i] or p[i] >= TEXT_FLOOR)]
    n_text = sum(not is_end[i] for i in kept)
    if n_text == 0:
        return None
    total = sum(p[i] for i in kept)
    floor = 1.0 / (n_text + 1)
    return [ids[i] for i in kept if is_end[i] or p[i] / total >= floor]


def _merge_prefixes(ids: list[int], p: list[float], alive: list[bool],
                    pieces: Sequence[bytes]) -> None:
    """In place, llama.cpp's pass: for each candidate i0 in order, each later-or-earlier one
    i1 (in order) whose text i0's begins merges into the likelier of the two, the other gone.
    The candidates whose text starts with i0's are found by bisection in the sorted texts
    rather than by llama.cpp's all-pairs loop; the merges, and their order, are the same."""
    texts = [pieces[t] if 0 <= t < len(pieces) else b"" for t in ids]
    by_text = sorted(range(len(ids)), key=texts.__getitem__)
    sorted_texts = [texts[i] for i in by_text]
    for i0, head in enumerate(texts):
        if not head or not alive[i0]:
            continue
        matches = []
        for k in range(bisect_left(sorted_texts, head), len(ids)):
            if not sorted_texts[k].startswith(head):
                break
            matches.append(by_text[k])
        for i1 in sorted(matches):
            if not alive[i0]:
                break
            if i1 == i0 or not alive[i1]:
                continue
            dst, src = (i1, i0) if p[i1] > p[i0] else (i0, i1)
            p[dst] += p[src]
            p[src], alive[src] = 0.0, False
