"""llama.cpp's infill sampler (server/sampling_infill.py): which candidates stay, against a
plain all-pairs rendering of llama.cpp's loop; and in the Sampler, that its rows draw only
from what stays while the other rows of the batch are untouched."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from server.request import SamplingParams
from server.sampling import Sampler, SamplingBatch
from server.sampling_infill import InfillRows, apply_infill, infill_keep

END = 0
PIECES = [b"", b"re", b"return", b"ret", b" x", b" y", b"=", b" ", b"\n", b"retry"]


def oracle_keep(ids: list[int], probs: list[float], pieces: list[bytes],
                ends: frozenset[int]) -> list[int] | None:
    """llama.cpp's infill sampler as written there: every ordered pair in turn."""
    n = len(ids)
    end = [t in ends for t in ids]
    p_end = sum(p for p, e in zip(probs, end, strict=True) if e)
    p_text = sum(p for p, e in zip(probs, end, strict=True) if not e)
    if 3 * p_end * n > p_text:
        return [t for t, e in zip(ids, end, strict=True) if e]
    p, dead = list(probs), [False] * n
    for i0 in range(n):
        for i1 in range(n):
            if dead[i0]:
                break
            if i0 == i1 or dead[i1]:
                continue
            a, b = pieces[ids[i0]], pieces[ids[i1]]
            if a and len(a) <= len(b) and b[:len(a)] == a:
                dst, src = (i1, i0) if p[i1] > p[i0] else (i0, i1)
                p[dst] += p[src]
                p[src], dead[src] = 0.0, True
    kept = [i for i in range(n) if not dead[i] and (end[i] or p[i] >= 0.2)]
    n_text = sum(not end[i] for i in kept)
    if n_text == 0:
        return None
    total = sum(p[i] for i in kept)
    return [ids[i] for i in kept if end[i] or p[i] / total >= 1 / (n_text + 1)]


def test_the_ends_win_once_they_hold_a_share_of_the_mass() -> None:
    """3 * p_end * n > p_text: ten candidates, an end above 1/31 of the mass is all that stays."""
    ids = [3, 4, 5, 6, 7, 1, 2, 8, 9, END]
    rest = [0.96 / 9] * 9
    assert infill_keep(ids, [*rest, 0.04], PIECES, frozenset({END})) == [END]
    assert infill_keep(ids, [*[0.98 / 9] * 9, 0.02], PIECES, frozenset({END})) != [END]


def test_tokens_that_begin_one_another_count_as_one_choice() -> None:
    """"re" (0.15), "ret" (0.1) and "return" (0.1) merge into "re": 0.35, past the 0.2 floor
    where none of them alone was; " x" (0.43) stays, " y" (0.22) does not: below 1/4, one
    over the three text tokens left plus one."""
    ids, probs = [4, 5, 1, 2, 3], [0.43, 0.22, 0.15, 0.1, 0.1]
    assert infill_keep(ids, probs, PIECES, frozenset({END})) == [4, 1]
    assert oracle_keep(ids, probs, PIECES, frozenset({END})) == [4, 1]


def test_the_floors_and_the_fallback() -> None:
    """Text tokens that begin no other: below 0.2 they go; none left is None (the end)."""
    unrelated = [4, 5, 6, 8, 9, 2]  # " x", " y", "=", "\n", "retry", "return"
    assert infill_keep(unrelated[:4], [0.19, 0.19, 0.19, 0.43], PIECES,
                       frozenset({END})) == [8]
    assert infill_keep(unrelated[:4], [0.25] * 4, PIECES, frozenset()) == unrelated[:4]
    assert infill_keep(unrelated, [1 / 6] * 6, PIECES, frozenset()) is None
    assert oracle_keep(unrelated, [1 / 6] * 6, PIECES, frozenset()) is None


@pytest.mark.parametrize("seed", range(40))
def test_the_bisected_merges_are_llamacpps_all_pairs(seed: int) -> None:
    """Random candidates over a vocabulary full of shared beginnings (and repeats): the same
    survivors as the all-pairs loop."""
    rng = random.Random(seed)
    alphabet = [b"a", b"b", b" "]
    pieces = [b""] + [b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
                      for _ in range(60)]
    ids = rng.sample(range(len(pieces)), rng.randint(1, 40))
    weights = sorted((rng.random() ** 3 for _ in ids), reverse=True)
    probs = [w / sum(weights) for w in weights]
    ends = frozenset(rng.sample(range(len(pieces)), 2)) if seed % 3 else frozenset({0})
    assert infill_keep(ids, probs, pieces, ends) == oracle_keep(ids, probs, pieces, ends)


def test_the_sampler_draws_an_infill_row_from_what_stays_only() -> None:
    """Row 0 runs the infill sampler ("re" + "return" merged: 0.71, and " x" 0.29 is below
    1/3); row 1, the same logits without it, draws any of its top 3; row 2, where the end
    holds nearly all the mass, takes the end."""
    vocab = len(PIECES)
    logits = torch.full((3, vocab), -5.0)
    logits[:2, 4] = 0.8  # " x"
    logits[:2, 1] = 1.0  # "re"
    logits[:2, 2] = 1.0  # "return"
    logits[2, END] = 2.0
    params = [SamplingParams(temperature=1.0, top_k=3, temperature_last=True,
                             infill_sampler=infill)
              for infill in (True, False, True)]
    table = InfillRows((0, 2), (frozenset({END}),) * 2, (END, END), PIECES)
    kept = apply_infill(logits.clone().masked_fill(logits < 0.5, float("-inf")), table)
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [1]
    assert kept[2].argmax().item() == END and torch.isfinite(kept[2]).sum() == 1
    sampler = Sampler(seed=0)
    seen: set[tuple[int, ...]] = set()
    for _ in range(30):
        batch = SamplingBatch.from_params(params, vocab, "cpu")
        assert batch.plain_rows == ()
        batch = replace(batch, infill=table)
        seen.add(tuple(sampler(logits, batch).token_ids.tolist()))
    assert {row[0] for row in seen} == {1} and {row[2] for row in seen} == {END}
    assert {row[1] for row in seen} == {1, 2, 4}  # the row without it: any of its top 3


def test_a_row_left_without_text_takes_its_fallback_end() -> None:
    row = torch.full((1, len(PIECES)), float("-inf"))
    row[0, [4, 5, 6, 8, 9, 2]] = 0.0  # six text tokens, 1/6 each: none past 0.2
    table = InfillRows((0,), (frozenset({END}),), (7,), PIECES)
    out = apply_infill(row, table)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [7]
    unchanged = apply_infill(row, InfillRows((0,), (frozenset(),), (None,), PIECES))
    assert torch.equal(unchanged, row)
