"""Sampler: greedy rows are argmax, seeded rows ignore the batch, each control moves the
distribution as vLLM defines it. Many draws come from one call over many identical rows. Each
test runs with PyTorch's draw and with the C one (`draw_path`)."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partialmethod

import pytest
import torch

from model import cpu_kernels
from server.request import SamplingParams
from server.sampling import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    compute_logprobs,
    process_logits,
    sample_inverse_cdf,
)

DEVICE = torch.device("cpu")


@pytest.fixture(autouse=True, params=["pytorch", "c"])
def draw_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: samplers drawing with PyTorch's ops, then (where the C kernels
    build) samplers whose rows without top-k, top-p or min-p are drawn in C, as the server's
    are on CPU."""
    if request.param == "c":
        kernels = cpu_kernels.load()
        if kernels is None:
            pytest.skip("no C kernels on this machine")
        monkeypatch.setattr(Sampler, "__init__", partialmethod(Sampler.__init__, kernels=kernels))
    return request.param


def test_rows_without_top_k_top_p_or_min_p_are_drawn_in_c(
        draw_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without this the `c` runs would pass with the C draw never taken: exactly the plain
    sampled rows reach it, greedy and top-k / top-p / min-p rows do not; and every greedy
    batch takes its argmax in C."""
    if draw_path != "c":
        pytest.skip("the C path's own check")
    sampler = Sampler(seed=0)
    assert sampler.kernels is not None
    drawn: list[int] = []
    sample = sampler.kernels.sample
    monkeypatch.setattr(sampler.kernels, "sample",
                        lambda logits, *a: drawn.append(logits.shape[0]) or sample(logits, *a))
    logits = torch.randn(5, 300)
    params = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0),
              SamplingParams(top_k=5), SamplingParams(seed=3), SamplingParams(min_p=0.1)]
    batch = SamplingBatch.from_params(params, 300, DEVICE)
    assert batch.plain_rows == (0, 3)
    sampler(logits, batch)
    assert drawn == [2]
    drawn.clear()
    sampler(logits[:2], SamplingBatch.from_params(params[:2], 300, DEVICE))  # greedy beside
    sampler(logits[:1], SamplingBatch.from_params(params[:1], 300, DEVICE))  # C alone
    assert drawn == [1, 1]
    greedy: list[int] = []  # greedy rows take their argmax in C too
    argmax = sampler.kernels.argmax
    monkeypatch.setattr(sampler.kernels, "argmax",
                        lambda logits: greedy.append(logits.shape[0]) or argmax(logits))
    sampler(logits, batch)
    sampler(logits[:1], SamplingBatch.from_params(params[:1], 300, DEVICE))  # no greedy row
    assert greedy == [5]


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    sampler: Sampler | None = None,
    **kwargs: object,
) -> SamplerOutput:
    batch = SamplingBatch.from_params(params, logits.shape[-1], DEVICE, **kwargs)
    return (sampler or Sampler(seed=0))(logits, batch)


def draws(row: list[float], params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """n samples of one logits row: one call over n identical rows (shared generator)."""
    logits = torch.tensor([row], dtype=torch.float32).expand(n, -1).contiguous()
    return run(logits, [params] * n, Sampler(seed=seed)).token_ids


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.unique().tolist())


def log_probs(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# --- greedy -------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_whatever_seed_and_neighbours() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 300)
    params = [
        SamplingParams(temperature=0.0, seed=1),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_k=5, top_p=0.9, min_p=0.05, seed=3),
        SamplingParams(temperature=0.0, seed=2, top_k=7, top_p=0.1),  # controls are moot
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=0.0, seed=123),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    for sampler_seed in range(5):
        out = run(logits, params, Sampler(seed=sampler_seed))
        assert torch.equal(out.token_ids[greedy], logits[greedy].argmax(-1))
    all_greedy = [SamplingParams(temperature=0.0, seed=s) for s in range(8)]
    assert torch.equal(run(logits, all_greedy).token_ids, logits.argmax(-1))


def test_top_k_one_equals_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    for seed in range(3):
        out = run(logits, [SamplingParams(temperature=1.5, top_k=1)] * 64, Sampler(seed=seed))
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_batch_greedy_and_sampled_rows() -> None:
    torch.manual_seed(2)
    n = 2000
    row = torch.randn(50)
    logits = row.expand(n, -1).contiguous()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3)] * (n // 2)
    out = run(logits, params)
    assert out.token_ids.shape == (n,) and out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None
    assert (out.token_ids[0::2] == row.argmax()).all()
    assert support(out.token_ids[1::2]) == set(row.topk(3).indices.tolist())


def test_caller_logits_are_not_modified() -> None:
    logits = torch.randn(2, 20)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.8, top_k=4, top_p=0.8, min_p=0.1, logit_bias=((3, 5.0),)),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
    ]
    run(logits, params, output_token_ids=[[1, 2], [3]], prompt_token_ids=[[4], [5]])
    assert torch.equal(logits, before)


# --- logit bias ---------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens() -> None:
    row = [0.0, 0.5, 1.0, 2.0, 0.3, -0.2]
    banned = draws(row, SamplingParams(logit_bias=((3, -100.0), (2, float("-inf")))))
    assert support(banned) == {0, 1, 4, 5}
    forced = draws(row, SamplingParams(temperature=1.5, logit_bias=((5, 100.0),)))
    assert support(forced) == {5}
    greedy = run(torch.tensor([row]), [SamplingParams(temperature=0.0, logit_bias=((0, 3.0),))])
    assert greedy.token_ids.tolist() == [0]


def test_extra_bias_adds_to_user_bias() -> None:
    """The runner's eos ban (-inf) must win over a client's +100 on the same token."""
    row = [0.0, 0.0, 0.0]
    params = [SamplingParams(logit_bias=((1, 100.0),))] * 1000
    logits = torch.tensor([row]).expand(1000, -1).contiguous()
    out = run(logits, params, extra_bias=[[(1, float("-inf"))]] * 1000)
    assert support(out.token_ids) == {0, 2}


def test_allowed_token_ids_are_all_a_row_samples() -> None:
    """vLLM's allowed_token_ids: every other token is banned, a client's bias still counts
    among the allowed, and rows without it are untouched."""
    row = [3.0, 0.5, 1.0, 2.0, 0.3, -0.2]
    allowed = draws(row, SamplingParams(temperature=1.5, allowed_token_ids=(1, 4, 5)))
    assert support(allowed) == {1, 4, 5}
    biased = draws(row, SamplingParams(allowed_token_ids=(1, 4), logit_bias=((4, 100.0),)))
    assert support(biased) == {4}
    logits = torch.tensor([row, row])
    greedy = run(logits, [SamplingParams(temperature=0.0, allowed_token_ids=(2, 3)),
                          SamplingParams(temperature=0.0)])
    assert greedy.token_ids.tolist() == [3, 0]
    with pytest.raises(ValueError, match="token ids must be in"):
        SamplingBatch.from_params([SamplingParams(allowed_token_ids=(6,))], 6, DEVICE)


def test_logit_bias_out_of_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingBatch.from_params([SamplingParams(logit_bias=((10, 1.0),))], 10, DEVICE)


# --- penalties ----------------------------------------------------------------------------


def processed(row: list[float], params: SamplingParams, output: list[int], prompt: list[int]):
    batch = SamplingBatch.from_params(
        [params], len(row), DEVICE, output_token_ids=[output], prompt_token_ids=[prompt]
    )
    return process_logits(torch.tensor([row]), batch)[0]


def test_repetition_penalty_arithmetic_both_signs_prompt_and_output() -> None:
    row = [2.0, -2.0, 1.0, -1.0, 3.0, 0.0]
    params = SamplingParams(repetition_penalty=2.0)
    # 0 and 1 in the output, 2 and 3 in the prompt, 4 nowhere; 5 is seen but 0 stays 0.
    got = processed(row, params, output=[0, 1, 1], prompt=[2, 3, 5])
    torch.testing.assert_close(got, torch.tensor([1.0, -4.0, 0.5, -2.0, 3.0, 0.0]))


def test_presence_and_frequency_penalties_count_output_only() -> None:
    row = [1.0, 1.0, 1.0, 1.0]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = processed(row, params, output=[0, 0, 0, 1], prompt=[2, 2])
    # token 0: 1 - 0.5 - 3 * 0.25; token 1: 1 - 0.5 - 0.25; prompt-only token 2 untouched.
    torch.testing.assert_close(got, torch.tensor([-0.25, 0.25, 1.0, 1.0]))


def test_penalties_and_bias_compose_in_vllm_order() -> None:
    """Bias first, then repetition (on the biased logit), then presence/frequency."""
    got = processed(
        [1.0, 0.0],
        SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, logit_bias=((0, 3.0),)),
        output=[0],
        prompt=[],
    )
    torch.testing.assert_close(got, torch.tensor([(1.0 + 3.0) / 2.0 - 1.0, 0.0]))


@pytest.mark.parametrize("level", [1.0, -1.0])
def test_repetition_penalty_makes_repeated_tokens_rarer(level: float) -> None:
    row = [level] * 4
    plain = draws(row, SamplingParams(), n=4000)
    n = 4000
    logits = torch.tensor([row]).expand(n, -1).contiguous()
    params = [SamplingParams(repetition_penalty=1.5)] * n
    penalised = run(logits, params, output_token_ids=[[0]] * n).token_ids
    # Uniform 0.25 without the penalty; with it, e^(l/1.5) or e^(1.5 l) against 3 e^l: ~0.19.
    assert abs((plain == 0).float().mean().item() - 0.25) < 0.03
    assert (penalised == 0).float().mean().item() < 0.215


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.6)]
    assert run(logits, params, output_token_ids=[[0]]).token_ids.tolist() == [0]  # 2.4 > 2
    assert run(logits, params, output_token_ids=[[0, 0]]).token_ids.tolist() == [1]  # 1.8 < 2


# --- truncation ---------------------------------------------------------------------------


# Probabilities 0.4, 0.3, 0.2, 0.1 scattered over the vocabulary, so the sort order differs
# from the id order and a wrong un-sort would show.
SCATTERED = {5: 0.4, 1: 0.3, 7: 0.2, 2: 0.1}


def scattered_row(vocab_size: int = 8) -> list[float]:
    row = [float("-inf")] * vocab_size
    for token_id, p in SCATTERED.items():
        row[token_id] = math.log(p)
    return row


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.3, {5}), (0.65, {5, 1}), (0.75, {5, 1, 7}), (0.95, {5, 1, 7, 2}), (1.0, {5, 1, 7, 2})],
)
def test_top_p_keeps_smallest_nucleus(top_p: float, nucleus: set[int]) -> None:
    assert support(draws(scattered_row(), SamplingParams(top_p=top_p))) == nucleus


def test_top_p_boundary_mass_counts_as_reaching_p() -> None:
    """Four equal tokens (exact quarters in float32): two already reach top_p=0.5."""
    assert len(support(draws([0.0] * 4, SamplingParams(top_p=0.5)))) == 2


def test_tiny_top_p_still_keeps_the_top_token() -> None:
    """1 - 1e-9 rounds to 1.0 in float32, so without the guard every token would be dropped."""
    torch.manual_seed(7)
    logits = torch.randn(64, 5000)
    out = run(logits, [SamplingParams(top_p=1e-9)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    ("top_k", "kept"),
    [(1, {5}), (2, {5, 1}), (3, {5, 1, 7}), (0, None), (-1, None), (8, None), (50, None)],
)
def test_top_k_keeps_k_most_likely(top_k: int, kept: set[int] | None) -> None:
    expected = set(SCATTERED) if kept is None else kept
    assert support(draws(scattered_row(), SamplingParams(top_k=top_k))) == expected


@pytest.mark.parametrize(
    ("min_p", "kept"), [(0.2, {5, 1, 7, 2}), (0.3, {5, 1, 7}), (0.6, {5, 1}), (0.9, {5})]
)
def test_min_p_drops_tokens_below_fraction_of_max(min_p: float, kept: set[int]) -> None:
    # thresholds 0.08, 0.12, 0.24, 0.36 against probabilities 0.4, 0.3, 0.2, 0.1
    assert support(draws(scattered_row(), SamplingParams(min_p=min_p))) == kept


def test_min_p_applies_before_top_p() -> None:
    """As in vLLM V1: top-p's nucleus is measured on what min-p kept. min_p=0.6 keeps 0.4 and
    0.3 (4:3 renormalised, 0.57 and 0.43), and top_p=0.5 then keeps 0.57 alone; applied the
    other way round, top_p=0.5 would keep {5, 1} first and min-p both of them."""
    assert support(draws(scattered_row(), SamplingParams(min_p=0.6, top_p=0.5))) == {5}
    assert support(draws(scattered_row(), SamplingParams(top_p=0.5))) == {5, 1}


def test_temperature_applies_before_top_p() -> None:
    # At T=0.5 the probabilities become 16:9:4:1 / 30, so top_p=0.65 keeps only {5, 1} still
    # but top_p=0.5 keeps {5} alone (16/30 > 0.5), whereas at T=1 it would keep {5, 1}.
    assert support(draws(scattered_row(), SamplingParams(temperature=0.5, top_p=0.5))) == {5}
    assert support(draws(scattered_row(), SamplingParams(temperature=1.0, top_p=0.5))) == {5, 1}


def test_top_k_and_top_p_in_one_row_and_different_rows() -> None:
    n = 3000
    logits = torch.tensor([scattered_row()]).expand(2 * n, -1).contiguous()
    params = [SamplingParams(top_k=3, top_p=0.5), SamplingParams(top_p=0.75)] * n
    out = run(logits, params).token_ids
    # top_k=3 renormalises 0.4/0.9 = 0.44 < 0.5, so the nucleus holds two tokens.
    assert support(out[0::2]) == {5, 1}
    assert support(out[1::2]) == {5, 1, 7}


# --- llama.cpp's chain (temperature_last) --------------------------------------------------

LLAMA = SamplingParams(temperature_last=True)


def llama(**kwargs: object) -> SamplingParams:
    return replace(LLAMA, **kwargs)


def test_llama_order_measures_top_p_before_temperature() -> None:
    """At T=0.5 the scattered row's probabilities are 16:9:4:1 / 30: vLLM's top_p=0.5 keeps
    {5} alone; llama.cpp's measures the nucleus on 0.4, 0.3, ... and keeps {5, 1}."""
    assert support(draws(scattered_row(), SamplingParams(temperature=0.5, top_p=0.5))) == {5}
    assert support(draws(scattered_row(), llama(temperature=0.5, top_p=0.5))) == {5, 1}


def test_llama_order_measures_min_p_before_temperature_and_after_top_p() -> None:
    # min_p=0.6 at T=0.5: vLLM's threshold is 0.6 * 16/30 (9/30 falls below it), llama.cpp's
    # 0.6 * 0.4 = 0.24 (0.3 stays)
    assert support(draws(scattered_row(), SamplingParams(temperature=0.5, min_p=0.6))) == {5}
    assert support(draws(scattered_row(), llama(temperature=0.5, min_p=0.6))) == {5, 1}
    # min_p=0.6 then top_p=0.5 keeps {5} (test_min_p_applies_before_top_p); top_p first, {5, 1}
    assert support(draws(scattered_row(), llama(min_p=0.6, top_p=0.5))) == {5, 1}


def test_llama_order_draws_from_the_tempered_survivors() -> None:
    """top_k=2 keeps 0.4 and 0.3; temperature 0.5 then draws them 16:9."""
    tokens = draws(scattered_row(), llama(top_k=2, temperature=0.5), n=20_000)
    assert support(tokens) == {5, 1}
    # df = 1: P(chi2 > 11) ~ 1e-3; top_k at T=1 (4:3) gives hundreds
    assert chi_square((tokens == 5).long(), torch.tensor([9 / 25, 16 / 25])) < 11


def test_llama_and_vllm_rows_share_a_batch() -> None:
    n = 3000
    logits = torch.tensor([scattered_row()]).expand(3 * n, -1).contiguous()
    params = [llama(temperature=0.5, top_p=0.5), SamplingParams(temperature=0.5, top_p=0.5),
              llama(temperature=0.0, top_p=0.5)] * n
    out = run(logits, params).token_ids
    assert support(out[0::3]) == {5, 1}
    assert support(out[1::3]) == {5}
    assert support(out[2::3]) == {5}  # greedy


def test_penalty_window_counts_the_last_tokens_of_prompt_and_output() -> None:
    """llama.cpp's penalties (penalty_last_n=3): prompt [0, 1, 2] and output [3, 3] leave the
    window [2, 3, 3]; every penalty counts it, the prompt's start not at all."""
    row = [1.0, 1.0, 1.0, 1.0, 1.0]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25, penalty_last_n=3)
    got = processed(row, params, output=[3, 3], prompt=[0, 1, 2])
    # token 2: 1/2 - 0.5 - 0.25; token 3: 1/2 - 0.5 - 2 * 0.25
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0, -0.25, -0.5, 1.0]))
    # a window longer than both: the whole prompt too, as output
    longer = processed(row, replace(params, penalty_last_n=64), output=[3], prompt=[0, 0])
    torch.testing.assert_close(longer, torch.tensor([-0.5, 1.0, 1.0, -0.25, 1.0]))
    # vLLM's (no window) beside it in one batch
    batch = SamplingBatch.from_params(
        [params, SamplingParams(presence_penalty=0.5)], 5, DEVICE,
        output_token_ids=[[3, 3], [3]], prompt_token_ids=[[0, 1, 2], [0]])
    got2 = process_logits(torch.tensor([row, row]), batch)
    torch.testing.assert_close(got2[1], torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0]))
    torch.testing.assert_close(got2[0], got)


def test_penalty_window_must_hold_a_token() -> None:
    with pytest.raises(ValueError, match="penalty_last_n"):
        SamplingParams(penalty_last_n=0)


# --- distribution -------------------------------------------------------------------------


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_softmax_of_scaled_logits(temperature: float) -> None:
    row = [1.0, 0.0, -0.5, 2.0, 0.7, -1.0]
    tokens = draws(row, SamplingParams(temperature=temperature), n=20_000)
    expected = torch.softmax(torch.tensor(row) / temperature, dim=-1)
    # df = 5: P(chi2 > 25) ~ 1e-4; the seed is fixed, so this is deterministic anyway. A wrong
    # temperature (e.g. T=1 for T=2) gives a statistic in the thousands.
    assert chi_square(tokens, expected) < 25


def test_seeded_rows_follow_softmax() -> None:
    """Each seeded row draws from its own generator; over many seeds the law is still right."""
    row = [1.0, 0.0, -0.5, 2.0]
    n = 4000
    logits = torch.tensor([row]).expand(n, -1).contiguous()
    tokens = run(logits, [SamplingParams(seed=s) for s in range(n)]).token_ids
    assert chi_square(tokens, torch.softmax(torch.tensor(row), dim=-1)) < 20


def test_inverse_cdf_gives_each_token_its_exact_share_of_a_uniform_grid() -> None:
    """Deterministic: over N evenly spaced draws, token k is picked for the draws that fall in
    its CDF interval, so its count is p_k * N to within one; a masked token is never picked.
    1000 tokens is not a multiple of the block: the padding must not be picked either."""
    torch.manual_seed(0)
    probs = torch.rand(3, 1000) ** 4  # uneven, unnormalised
    probs[:, ::7] = 0.0  # masked tokens, including the first
    probs[1, 900:] = 0.0  # a masked tail, across a block boundary
    probs[2, :] = 0.0
    probs[2, [3, 130, 131, 999]] = torch.tensor([0.25, 0.5, 0.125, 0.125])
    n = 100_000
    uniforms = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    for row in probs:
        tokens = sample_inverse_cdf(row.expand(n, -1).contiguous(), uniforms)
        counts = torch.bincount(tokens, minlength=1000).double()
        assert counts.shape == (1000,)  # nothing at or past the vocabulary
        expected = row.double() / row.double().sum() * n
        assert (counts - expected).abs().max() <= 1.0
        assert counts[row == 0].sum() == 0


def test_inverse_cdf_ends_of_the_unit_interval_pick_the_first_and_last_live_tokens() -> None:
    probs = torch.zeros(2, 300)
    probs[:, [5, 130, 257]] = 1.0  # everything else masked, 300 not a multiple of the block
    uniforms = torch.tensor([[0.0], [torch.nextafter(torch.tensor(1.0, dtype=torch.float64),
                                                     torch.tensor(0.0, dtype=torch.float64))]],
                            dtype=torch.float64)
    assert sample_inverse_cdf(probs, uniforms).tolist() == [5, 257]


def test_inverse_cdf_stays_on_a_live_token_when_block_and_token_sums_disagree() -> None:
    """A block's mass is summed in float32, its tokens' running sum in float64: here the block
    total rounds up (1 + 2^-23 for 1 + 0.6 * 2^-23), and a draw in the gap must still land on
    a live token of that block, not run past it onto masked token 128."""
    probs = torch.zeros(1, 256)
    probs[0, 0], probs[0, 1], probs[0, 129] = 1.0, 0.6 * 2.0**-23, 1.0
    assert float(probs[0, :128].sum()) == 1.0 + 2.0**-23
    total = 2.0 + 2.0**-23
    uniforms = torch.tensor([[(1.0 + 0.8 * 2.0**-23) / total]], dtype=torch.float64)
    assert sample_inverse_cdf(probs, uniforms).tolist() == [1]


def test_inverse_cdf_row_without_a_distribution_still_gives_a_token_in_range() -> None:
    probs = torch.zeros(3, 300)
    probs[0, 5] = float("nan")  # e.g. -inf / inf upstream
    probs[2, 7] = float("inf")
    uniforms = torch.tensor([[0.5], [0.999], [0.1]], dtype=torch.float64)
    tokens = sample_inverse_cdf(probs, uniforms).tolist()
    assert all(0 <= t < 300 for t in tokens)


def test_huge_temperature_with_a_banned_token_samples_a_live_token() -> None:
    """A temperature past float32's range must not turn the ban's -inf into NaN."""
    logits = torch.randn(64, 50)
    params = [SamplingParams(temperature=7e307, logit_bias=((3, -100.0),), seed=s)
              for s in range(64)]
    banned = [[(0, float("-inf"))]] * 64  # what min_tokens does to eos
    tokens = run(logits, params, extra_bias=banned).token_ids.tolist()
    assert all(0 < t < 50 for t in tokens)
    assert len(set(tokens)) > 10  # about uniform: the temperature flattened everything


def test_empty_batch_gives_no_tokens() -> None:
    assert run(torch.empty(0, 10), []).token_ids.shape == (0,)


# --- seeds --------------------------------------------------------------------------------


def test_same_seed_same_tokens_alone_or_batched_anywhere() -> None:
    vocab_size = 1000
    torch.manual_seed(3)
    request_logits = {name: torch.randn(vocab_size) for name in "abcdefgh"}
    seeded = {
        "a": SamplingParams(seed=11),
        "b": SamplingParams(seed=12, temperature=0.8, top_p=0.95),
        "c": SamplingParams(seed=13, top_k=50, min_p=0.01),
    }
    others = {
        "d": SamplingParams(),  # unseeded
        "e": SamplingParams(temperature=0.0),
        "f": SamplingParams(seed=99, top_k=3, repetition_penalty=1.2),
        "g": SamplingParams(temperature=0.0, seed=5),
        "h": SamplingParams(temperature=1.3, presence_penalty=0.5),
    }
    everyone = {**seeded, **others}

    def tokens(names: str, sampler_seed: int) -> dict[str, int]:
        logits = torch.stack([request_logits[n] for n in names])
        out = run(
            logits,
            [everyone[n] for n in names],
            Sampler(seed=sampler_seed),
            output_token_ids=[[7, 7]] * len(names),
            prompt_token_ids=[[1, 2, 3]] * len(names),
        )
        return dict(zip(names, out.token_ids.tolist(), strict=True))

    alone = {name: tokens(name, 0)[name] for name in seeded}
    for layout, sampler_seed in [("abcdefgh", 1), ("hgfedcba", 2), ("dcaebhgf", 3), ("ca", 4)]:
        got = tokens(layout, sampler_seed)
        assert {n: got[n] for n in seeded if n in layout} == {
            n: alone[n] for n in seeded if n in layout
        }, layout


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(16, 1000)
    out = run(logits, [SamplingParams(seed=s) for s in range(16)])
    assert len(set(out.token_ids.tolist())) > 8  # uniform over 1000: all distinct in practice


def test_shared_generator_seed_reproduces_and_advances() -> None:
    logits = torch.zeros(16, 1000)
    params = [SamplingParams()] * 16
    first, second = Sampler(seed=7), Sampler(seed=7)
    step1 = run(logits, params, first).token_ids
    assert torch.equal(step1, run(logits, params, second).token_ids)
    assert not torch.equal(step1, run(logits, params, first).token_ids)  # state moved on
    assert not torch.equal(step1, run(logits, params, Sampler(seed=8)).token_ids)


def test_persistent_generator_gives_fresh_noise_each_step() -> None:
    """A runner that keeps one generator per request must not replay the same token."""
    logits = torch.zeros(1, 1000)
    generator = torch.Generator().manual_seed(42)
    steps = [
        run(logits, [SamplingParams()], generators=[generator]).token_ids.item() for _ in range(5)
    ]
    assert len(set(steps)) > 1
    replay = torch.Generator().manual_seed(42)
    assert run(logits, [SamplingParams()], generators=[replay]).token_ids.item() == steps[0]


def test_default_flags_give_same_tokens_as_from_params() -> None:
    """The skip-work flags are an optimisation only: leaving them off changes nothing."""
    torch.manual_seed(4)
    logits = torch.randn(6, 200)
    params = [
        SamplingParams(seed=s, temperature=0.9, min_p=0.02 * s, top_k=10 * s, top_p=1.0 - 0.1 * s)
        for s in range(6)
    ]
    fast = SamplingBatch.from_params(params, 200, DEVICE)
    assert not (fast.no_top_k or fast.no_top_p or fast.no_min_p)  # some row uses each
    plain = SamplingBatch.from_params([SamplingParams(seed=s) for s in range(6)], 200, DEVICE)
    assert plain.no_top_k and plain.no_top_p and plain.no_min_p and plain.no_greedy
    # Fresh generators for the second batch: the first call advances those of `plain`.
    fields = {f: getattr(plain, f) for f in SamplingBatch.__dataclass_fields__}
    generators = [torch.Generator().manual_seed(s) for s in range(6)]
    flags = {"no_top_k": False, "no_top_p": False, "no_min_p": False, "no_greedy": False}
    slow = SamplingBatch(**{**fields, **flags, "generators": generators})
    assert torch.equal(Sampler()(logits, plain).token_ids, Sampler()(logits, slow).token_ids)


# --- logprobs -----------------------------------------------------------------------------


def test_compute_logprobs_matches_log_softmax_and_sorts_top() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 50, dtype=torch.bfloat16)
    token_ids = torch.tensor([0, 7, 49, 3])
    chosen, top_ids, top_logprobs, ranks = compute_logprobs(logits, token_ids, 5)
    assert ranks is None  # (asked for by prompt logprobs only)
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert chosen.dtype == top_logprobs.dtype == torch.float32 and top_ids.dtype == torch.int64
    torch.testing.assert_close(chosen, reference[torch.arange(4), token_ids])
    assert top_ids.shape == top_logprobs.shape == (4, 5)
    torch.testing.assert_close(top_logprobs, reference.gather(1, top_ids))
    assert (top_logprobs[:, :-1] >= top_logprobs[:, 1:]).all()
    torch.testing.assert_close(top_logprobs, reference.sort(-1, descending=True).values[:, :5])
    _, no_ids, no_logprobs, _ = compute_logprobs(logits, token_ids, 0)
    assert no_ids.shape == no_logprobs.shape == (4, 0)


def test_compute_logprobs_ranks_as_vllm() -> None:
    """A token's rank: how many tokens are at least as likely, itself included (1: the
    likeliest); tied tokens all rank last among themselves, as vLLM counts."""
    torch.manual_seed(7)
    logits = torch.randn(6, 300)
    logits[5, :3] = 50.0  # three tied for first
    token_ids = torch.tensor([0, 17, 299, 42, 5, 1])
    *_, ranks = compute_logprobs(logits, token_ids, 2, ranks=True)
    assert ranks is not None
    for row, token in enumerate(token_ids.tolist()):
        order = sorted(range(300), key=lambda t: -logits[row, t].item())
        better = sum(logits[row, t] > logits[row, token] for t in order)
        ties = sum(logits[row, t] == logits[row, token] for t in order)
        assert ranks[row].item() == better + ties
    assert ranks[5].item() == 3
    argmax = logits.argmax(-1)
    *_, top_ranks = compute_logprobs(logits[:5], argmax[:5], 0, ranks=True)
    assert top_ranks is not None and top_ranks.tolist() == [1] * 5


def test_sampler_logprobs_are_raw_and_sized_by_the_widest_request() -> None:
    torch.manual_seed(6)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.5, top_k=3, logprobs=4, logit_bias=((9, 50.0),)),
        SamplingParams(repetition_penalty=1.5),
    ]
    out = run(logits, params, output_token_ids=[[], [], [1, 2]], prompt_token_ids=[[], [], []])
    assert out.token_ids[1].item() == 9  # the bias decides the token...
    raw = torch.log_softmax(logits, dim=-1)  # ...but the logprob is of the raw logits
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.logprobs, raw[torch.arange(3), out.token_ids])
    assert out.top_ids.shape == (3, 4)
    torch.testing.assert_close(out.top_ids, raw.topk(4, dim=-1).indices)
