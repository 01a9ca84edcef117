"""llama.cpp's other samplers (server/sampling_llamacpp.py, server/sampling_dry.py): the batched
chain against a plain port of llama.cpp's candidate-list chain, llama.cpp's own test vectors
(test-sampling.cpp), mirostat's control of the surprise, and DRY against a brute-force
definition."""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.request import Dry, LlamaCppSamplers, SamplingParams
from server.sampling import Sampler, SamplingBatch, process_logits
from server.sampling_dry import DryContext, VocabText, breaker_sequences, dry_penalties
from server.sampling_llamacpp import MirostatRows, mirostat_candidates, mirostat_update

NEG_INF = float("-inf")


def llama(samplers: LlamaCppSamplers | None = None, **kwargs: object) -> SamplingParams:
    """A llama.cpp row with only what the test names switched on."""
    fields = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 1.0, **kwargs}
    return SamplingParams(temperature_last=True, llamacpp=samplers, **fields)


def final_probs(logits: torch.Tensor, params: list[SamplingParams],
                xtc_draws: list[float] | None = None) -> torch.Tensor:
    """The distribution each row draws from (what the sampler's torch path inverts)."""
    batch = SamplingBatch.from_params(params, logits.shape[-1], "cpu")
    draws = None if xtc_draws is None else torch.tensor(xtc_draws)
    final = Sampler._final_logits(process_logits(logits, batch), batch, draws)
    return final.softmax(dim=-1)


# --- a plain port of llama.cpp's chain, candidate lists in float64 -------------------------


def _softmax(cands: list[tuple[int, float]]) -> list[float]:
    top = max(logit for _, logit in cands)
    weights = [math.exp(logit - top) for _, logit in cands]
    total = sum(weights)
    return [w / total for w in weights]


def _desc(cands: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return sorted(cands, key=lambda c: -c[1])


def reference_chain(logits: list[float], temperature: float, top_k: int, top_p: float,
                    min_p: float, s: LlamaCppSamplers, xtc_chance: float) -> dict[int, float]:
    """Each token's probability after llama.cpp's chain (llama-sampling.cpp, one stage at a
    time over a list of (id, logit) candidates)."""
    cands = [(i, x) for i, x in enumerate(logits) if x > NEG_INF]
    keep = max(s.min_keep, 1)
    if s.top_n_sigma > 0 and len(cands) > 1:
        values = [x for _, x in cands]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
        cands = [c for c in cands if c[1] >= max(values) - s.top_n_sigma * std]
    if top_k > 0:
        cands = _desc(cands)[:top_k]
    if s.typical_p < 1.0:
        probs = _softmax(cands)
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        order = sorted(range(len(cands)), key=lambda i: abs(-math.log(probs[i]) - entropy))
        cum, last = 0.0, len(order)
        for rank, i in enumerate(order):
            cum += probs[i]
            if cum > s.typical_p and rank >= keep - 1:
                last = rank + 1
                break
        cands = [cands[i] for i in order[:last]]
    if top_p < 1.0:
        cands = _desc(cands)
        cum, last = 0.0, len(cands)
        for rank, p in enumerate(_softmax(cands)):
            cum += p
            if cum >= top_p and rank + 1 >= keep:
                last = rank + 1
                break
        cands = cands[:last]
    if min_p > 0:
        cands = _desc(cands)
        floor = cands[0][1] + math.log(min_p)
        cands = [c for rank, c in enumerate(cands) if c[1] >= floor or rank < keep]
    if (s.xtc_probability > 0 and s.xtc_threshold <= 0.5 and len(cands) >= 2
            and xtc_chance <= s.xtc_probability):
        cands = _desc(cands)
        probs = _softmax(cands)
        last = 0
        for rank, p in enumerate(probs):
            if p < s.xtc_threshold:
                break
            last = rank
        if len(cands) - last >= s.min_keep and last > 0:
            cands = cands[last:]
    t = temperature
    if s.dynatemp_range > 0 and len(cands) > 1:
        probs = _softmax(cands)
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        low, high = max(0.0, t - s.dynatemp_range), t + s.dynatemp_range
        t = low + (high - low) * (entropy / math.log(len(cands))) ** s.dynatemp_exponent
    if t <= 0:
        cands = _desc(cands)[:1]
    else:
        cands = [(i, x / t) for i, x in cands]
    return dict(zip((i for i, _ in cands), _softmax(cands), strict=True))


def random_case(rng: random.Random) -> tuple[list[float], dict, LlamaCppSamplers, float]:
    vocab = rng.choice([2, 5, 17, 64])
    logits = [rng.gauss(0, rng.choice([0.5, 2.0, 5.0])) for _ in range(vocab)]
    for i in rng.sample(range(vocab), rng.randint(0, vocab // 3)):
        logits[i] = NEG_INF
    basics = {"temperature": rng.choice([0.0, 0.3, 1.0, 1.7]),
              "top_k": rng.choice([0, 0, 1, 3, 10]),
              "top_p": rng.choice([1.0, 1.0, 0.9, 0.5]),
              "min_p": rng.choice([0.0, 0.0, 0.05, 0.3])}
    samplers = LlamaCppSamplers(
        top_n_sigma=rng.choice([-1.0, 0.5, 1.0, 2.5]),
        typical_p=rng.choice([1.0, 0.95, 0.5, 0.2]),
        min_keep=rng.choice([0, 0, 1, 2, 5]),
        xtc_probability=rng.choice([0.0, 0.5, 1.0]),
        xtc_threshold=rng.choice([0.05, 0.1, 0.3, 0.6]),
        dynatemp_range=rng.choice([0.0, 0.0, 0.5, 1.5]),
        dynatemp_exponent=rng.choice([1.0, 0.5, 2.0]))
    return logits, basics, samplers, rng.random()


def test_the_batched_chain_is_llamacpps_chain_on_random_rows() -> None:
    """Many random rows and controls, in batches of mixed rows (some neutral, some vLLM's):
    each row's distribution is the plain port's."""
    rng = random.Random(7)
    for _ in range(200):
        cases = [random_case(rng) for _ in range(4)]
        vocab = max(len(c[0]) for c in cases)
        rows, params, draws = [], [], []
        for logits, basics, samplers, chance in cases:
            padded = logits + [NEG_INF] * (vocab - len(logits))
            if all(x == NEG_INF for x in padded):
                padded[0] = 0.0
            rows.append(padded)
            params.append(llama(samplers, **basics))
            draws.append(chance)
        rows.append([rng.gauss(0, 1) for _ in range(vocab)])  # a vLLM row beside them
        params.append(SamplingParams(temperature=0.7, top_p=0.9))
        draws.append(2.0)
        got = final_probs(torch.tensor(rows), params, draws)
        for row, (_, basics, samplers, chance) in enumerate(cases):
            padded = rows[row]
            if params[row].is_greedy:
                continue  # (the argmax of the processed logits: tested elsewhere)
            want = reference_chain(padded, basics["temperature"], basics["top_k"],
                                   basics["top_p"], basics["min_p"], samplers, chance)
            expected = torch.zeros(vocab)
            for token, p in want.items():
                expected[token] = p
            assert torch.allclose(got[row], expected, atol=2e-5), (basics, samplers, chance)


@pytest.mark.parametrize(("samplers", "basics"), [
    (LlamaCppSamplers(top_n_sigma=1.0), {}),
    (LlamaCppSamplers(top_n_sigma=0.3), {"temperature": 0.5}),
    (LlamaCppSamplers(typical_p=0.7), {}),
    (LlamaCppSamplers(xtc_probability=1.0, xtc_threshold=0.01), {}),
    (LlamaCppSamplers(dynatemp_range=0.8, dynatemp_exponent=1.5), {"temperature": 0.9}),
    (LlamaCppSamplers(min_keep=50), {"top_p": 0.3, "min_p": 0.2}),
])
def test_each_filter_alone_on_wide_rows(samplers: LlamaCppSamplers, basics: dict) -> None:
    logits = torch.randn(8, 400, generator=torch.Generator().manual_seed(5)) * 2.5
    got = final_probs(logits, [llama(samplers, **basics)] * 8, [0.5] * 8)
    for row in range(8):
        want = reference_chain(logits[row].tolist(), basics.get("temperature", 1.0), 0,
                               basics.get("top_p", 1.0), basics.get("min_p", 0.0), samplers,
                               0.5)
        assert set(torch.nonzero(got[row]).flatten().tolist()) == set(want)
        assert got[row, list(want)].tolist() == pytest.approx(list(want.values()), abs=2e-5)


def test_neutral_extras_change_nothing() -> None:
    """A row whose only extra is min_keep 2 (never binding here: the filters leave more) runs
    the whole chain: the same distribution as the plain top-k/top-p/min-p path's."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(3)) * 3
    basics = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.05}
    plain = final_probs(logits, [llama(None, **basics)] * 3)
    chained = final_probs(logits, [llama(LlamaCppSamplers(min_keep=2), **basics)] * 3)
    assert torch.allclose(plain, chained, atol=1e-6)


# --- llama.cpp's own test vectors (tests/test-sampling.cpp) --------------------------------


def kept(probs: list[float], samplers: LlamaCppSamplers, chance: float = 0.0,
         **basics: object) -> list[int]:
    logits = torch.tensor([probs]).log()
    out = final_probs(logits, [llama(samplers, **basics)], [chance])
    return [i for i, p in enumerate(out[0].tolist()) if p > 0]


@pytest.mark.parametrize(("threshold", "left"), [
    (0.09, [3]), (0.19, [2, 3]), (0.29, [1, 2, 3]), (0.39, [0, 1, 2, 3])])
def test_xtc_vectors(threshold: float, left: list[int]) -> None:
    xtc = LlamaCppSamplers(xtc_probability=0.99, xtc_threshold=threshold)
    assert kept([0.4, 0.3, 0.2, 0.1], xtc) == left
    assert kept([0.4, 0.3, 0.2, 0.1], xtc, chance=0.995) == [0, 1, 2, 3]  # (not this time)


def test_xtc_keeps_min_keep_candidates() -> None:
    xtc = LlamaCppSamplers(xtc_probability=1.0, xtc_threshold=0.09, min_keep=2)
    assert kept([0.4, 0.3, 0.2, 0.1], xtc) == [0, 1, 2, 3]  # (4 - 3 < 2: it stands down)


def test_xtc_at_threshold_zero_counts_only_the_candidates_left() -> None:
    """Every candidate top-k left reaches a threshold of 0, the ones it dropped do not: all
    go but the least likely of the three (llama.cpp's list holds only what is left)."""
    xtc = LlamaCppSamplers(xtc_probability=1.0, xtc_threshold=0.0)
    assert kept([0.4, 0.3, 0.2, 0.1], xtc, top_k=3) == [2]


def test_seeded_llamacpp_rows_draw_the_same_alone_or_batched() -> None:
    """A seeded row's XTC chance and mirostat's draws come from its own generator: the same
    tokens (and mu) whatever rows share its batch, over several steps."""
    vocab = 300
    logits = {name: torch.randn(vocab, generator=torch.Generator().manual_seed(i)) * 2
              for i, name in enumerate("abcdef")}
    seeded = {
        "a": llama(LlamaCppSamplers(xtc_probability=0.5, xtc_threshold=0.05), seed=1),
        "b": llama(LlamaCppSamplers(mirostat=2, mirostat_tau=3.0), seed=2),
        "c": llama(LlamaCppSamplers(mirostat=1, mirostat_tau=4.0), seed=3),
        "d": llama(LlamaCppSamplers(typical_p=0.7, top_n_sigma=2.0, xtc_probability=1.0,
                                    xtc_threshold=0.1), seed=4, top_k=40),
    }
    others = {"e": llama(LlamaCppSamplers(xtc_probability=0.9, xtc_threshold=0.01)),
              "f": SamplingParams(temperature=0.7)}
    everyone = {**seeded, **others}

    def steps(names: str, sampler_seed: int) -> dict[str, list[object]]:
        rows = [everyone[n] for n in names]
        mus = [torch.tensor(2 * p.llamacpp.mirostat_tau) if p.mirostat else None
               for p in rows]
        generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                      for p in rows]
        batch = SamplingBatch.from_params(rows, vocab, "cpu", generators=generators,
                                          mirostat_mus=mus)
        sampler, got = Sampler(seed=sampler_seed), {n: [] for n in names}
        stacked = torch.stack([logits[n] for n in names])
        for _ in range(6):
            for name, token in zip(names, sampler(stacked, batch).token_ids.tolist(),
                                   strict=True):
                got[name].append(token)
        for name, mu in zip(names, mus, strict=True):
            if mu is not None:
                got[name].append(mu.item())
        return got

    alone = {name: steps(name, 0)[name] for name in seeded}
    for layout, sampler_seed in [("abcdef", 1), ("fedcba", 2), ("ebfadc", 3), ("db", 4)]:
        got = steps(layout, sampler_seed)
        assert {n: got[n] for n in seeded if n in layout} == {
            n: alone[n] for n in seeded if n in layout}, layout


def test_a_row_without_the_other_filters_keeps_its_path_beside_rows_with_them() -> None:
    """Tied logits at top-p's cut: the plain path and the chain break the tie their own
    ways, so a row takes its own path whatever its neighbours (else its draws would change
    when a row with typical-p joins the batch)."""
    row = torch.tensor([2.0, 1.0, 1.0, 0.0])
    plain = llama(None, top_p=0.6, seed=7)

    def draws(params: list[SamplingParams]) -> list[int]:
        generators = [torch.Generator().manual_seed(p.seed or 0) for p in params]
        batch = SamplingBatch.from_params(params, 4, "cpu", generators=generators)
        logits = row.expand(len(params), -1).contiguous()
        sampler = Sampler(seed=0)
        return [sampler(logits, batch).token_ids[0].item() for _ in range(40)]

    alone = draws([plain])
    assert len(set(alone)) == 2  # (the tie at the cut: one of the tied two stays)
    assert draws([plain, llama(LlamaCppSamplers(typical_p=0.9), seed=3)]) == alone


@pytest.mark.parametrize(("probs", "left"), [
    ([0.97, 0.01, 0.01, 0.01], [0]), ([0.4, 0.2, 0.2, 0.2], [1, 2, 3])])
def test_typical_vectors(probs: list[float], left: list[int]) -> None:
    assert kept(probs, LlamaCppSamplers(typical_p=0.5)) == left


@pytest.mark.parametrize(("n", "left"), [(1.0, [2, 3]), (0.0, [0, 1, 2, 3]),
                                         (3.0, [0, 1, 2, 3])])
def test_top_n_sigma_vectors(n: float, left: list[int]) -> None:
    out = final_probs(torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log(),
                      [llama(LlamaCppSamplers(top_n_sigma=n))])
    assert [i for i, p in enumerate(out[0].tolist()) if p > 0] == left
    if n == 1.0:
        assert out[0, 2:].tolist() == pytest.approx([0.428571, 0.571429], abs=1e-5)


def test_typical_p_at_temperature_zero_takes_the_likeliest_it_kept() -> None:
    """llama.cpp's temperature 0 keeps the likeliest of what the chain left: typical-p can
    leave out the likeliest of all, so the row is no argmax of the raw logits."""
    params = llama(LlamaCppSamplers(typical_p=0.5), temperature=0.0)
    assert not params.is_greedy
    logits = torch.tensor([[0.4, 0.21, 0.2, 0.19]]).log()
    batch = SamplingBatch.from_params([params], 4, "cpu")
    tokens = {Sampler(seed=s)(logits, batch).token_ids.item() for s in range(20)}
    assert tokens == {1}


def test_dynamic_temperature_moves_with_the_entropy() -> None:
    """Flat candidates take the top of the range, a peaked row its bottom (exponent 1)."""
    flat = torch.zeros(1, 8)
    samplers = LlamaCppSamplers(dynatemp_range=0.5)
    assert torch.allclose(final_probs(flat, [llama(samplers, temperature=1.0)]),
                          torch.full((1, 8), 1 / 8))
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    got = final_probs(peaked, [llama(samplers, temperature=1.0)])
    entropy = -(peaked.softmax(-1) * peaked.log_softmax(-1)).sum().item()
    t = 0.5 + 1.0 * entropy / math.log(4)
    assert torch.allclose(got, (peaked / t).softmax(-1), atol=1e-6)


# --- mirostat --------------------------------------------------------------------------------


def mirostat_rows(version: int, tau: float, eta: float, n: int = 1) -> MirostatRows:
    samplers = [LlamaCppSamplers(mirostat=version, mirostat_tau=tau, mirostat_eta=eta)] * n
    return MirostatRows.from_rows(list(range(n)), samplers,
                                  [torch.tensor(2 * tau) for _ in range(n)],
                                  lambda values, dtype: torch.tensor(values, dtype=dtype))


def zipf_logits(vocab: int, exponent: float = 1.1) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    return (-exponent * ranks.log()).unsqueeze(0)


def test_mirostat_2_keeps_the_tokens_within_mu_bits_and_moves_mu() -> None:
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    m = mirostat_rows(2, tau=1.0, eta=0.5)  # mu = 2 bits: surprises 1, 2, 3, 3
    probs, order = mirostat_candidates(logits, m)
    assert order[0, :2].tolist() == [0, 1]
    assert probs[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])
    mirostat_update(m, probs, torch.tensor([1]))  # surprise log2(3): mu -= 0.5 (it - tau)
    assert m.mus[0].item() == pytest.approx(2 - 0.5 * (math.log2(3) - 1))


def test_mirostat_1_keeps_the_top_k_of_its_zipf_fit() -> None:
    vocab, tau = 1000, 3.0
    logits = zipf_logits(vocab, 1.1)
    probs, _ = mirostat_candidates(logits, mirostat_rows(1, tau, 0.1))
    s_hat = 1.1  # (a Zipf row's fit is its exponent)
    eps = s_hat - 1
    k = int(((eps * 2 ** (2 * tau)) / (1 - vocab ** -eps)) ** (1 / s_hat))
    assert int((probs[0] > 0).sum()) == k
    # a row a grammar or ban left 30 candidates: fitted over those, the same exponent
    masked = logits.clone()
    masked[0, 30:] = NEG_INF
    probs, _ = mirostat_candidates(masked, mirostat_rows(1, tau, 0.1))
    assert int((probs[0] > 0).sum()) == k


@pytest.mark.parametrize("version", [1, 2])
def test_mirostat_holds_the_surprise_near_tau(version: int) -> None:
    """What mirostat is for: the picked tokens' surprise (in the distribution it truncated,
    read off mu's steps) settles around tau, mu staying bounded; a wrong sign in the feedback
    would run mu away."""
    tau, eta = 4.0, 0.1
    params = [llama(LlamaCppSamplers(mirostat=version, mirostat_tau=tau, mirostat_eta=eta))]
    logits = zipf_logits(2000, 1.05)
    mu = torch.tensor(2 * tau)
    batch = SamplingBatch.from_params(params, 2000, "cpu", mirostat_mus=[mu])
    sampler = Sampler(seed=0)
    surprises, picked = [], set()
    for _ in range(1500):
        before = mu.item()
        picked.add(sampler(logits, batch).token_ids.item())
        surprises.append(tau + (before - mu.item()) / eta)  # (mu moved in place)
    assert abs(sum(surprises[500:]) / 1000 - tau) < 0.3
    assert 0 < mu.item() < 3 * tau and len(picked) > 20


def test_mirostat_rows_need_their_mu() -> None:
    with pytest.raises(ValueError, match="mirostat"):
        SamplingBatch.from_params([llama(LlamaCppSamplers(mirostat=2))], 8, "cpu")


# --- DRY ---------------------------------------------------------------------------------------


def dry(multiplier: float = 1.0, base: float = 1.1, allowed: int = 2, last_n: int = 64,
        breakers: tuple[tuple[int, tuple[int, ...]], ...] = ()) -> Dry:
    return Dry(multiplier, base, allowed, last_n, breakers)


@pytest.mark.parametrize(("history", "config", "want"), [
    ([0, 1], dry(last_n=4), {}),
    ([0, 1, 2, 0, 1], dry(last_n=5), {2: 1.0}),
    ([0, 1, 3, 4, 0, 1], dry(last_n=6, breakers=((3, ()),)), {}),
    ([0, 1, 2, 0, 1], dry(2.0, last_n=5), {2: 2.0}),
    ([0, 1, 2, 3, 4, 0, 1], dry(allowed=4, last_n=7), {}),
])
def test_dry_vectors(history: list[int], config: Dry, want: dict[int, float]) -> None:
    """llama.cpp's test-sampling.cpp cases (their probabilities are these penalties'
    softmax)."""
    assert dry_penalties(history, config) == pytest.approx(want)


def naive_dry(history: list[int], config: Dry) -> dict[int, float]:
    """DRY by its definition: the context's last repeat can reach back to just after the
    latest breaker (a head whose tail precedes it); for each earlier position, the longest
    run ending there that matches the context's end (within that reach) makes the token
    after it extend a repeat of that length."""
    h = history[-config.last_n:]
    n = len(h)
    if n <= config.allowed_length:
        return {}
    limit = n
    for i in range(n):  # i tokens from the end
        position = n - 1 - i
        lengths = [len(tail) for head, tail in config.breakers if head == h[position]
                   and len(tail) <= i and all(h[position + 1 + j] == tail[j]
                                              for j in range(len(tail)))]
        if lengths:
            limit = i - max(lengths)
            break
    if limit < config.allowed_length:
        return {}
    best: dict[int, int] = {}
    for end in range(n - 1):  # a run ending at `end`, followed by h[end + 1]
        length = 0
        while length <= end and h[end - length] == h[n - 1 - length]:
            length += 1
        length = min(length, limit)
        if length >= config.allowed_length:
            best[h[end + 1]] = max(best.get(h[end + 1], 0), length)
    alone = {head for head, tail in config.breakers if not tail}
    return {token: config.multiplier * config.base ** (length - config.allowed_length)
            for token, length in best.items() if token not in alone}


def random_dry(rng: random.Random, alphabet: int, longest_tail: int, most_breakers: int,
               multipliers: list[float], windows: list[int]) -> Dry:
    """A DRY config over tokens 0..alphabet-1 with a few random breakers (a head may lie
    outside the alphabet: it never occurs)."""
    breakers = tuple({(rng.randrange(alphabet + 1),
                       tuple(rng.randrange(alphabet) for _ in range(rng.randint(0, longest_tail))))
                      for _ in range(rng.randint(0, most_breakers))})
    return Dry(rng.choice(multipliers), rng.choice([1.0, 1.75]), rng.randint(0, 3),
               rng.choice(windows), breakers)


def test_dry_is_its_definition_on_random_histories() -> None:
    rng = random.Random(11)
    for _ in range(400):
        alphabet = rng.randint(2, 4)
        history = [rng.randrange(alphabet) for _ in range(rng.randint(1, 40))]
        config = random_dry(rng, alphabet, 2, 2, [0.5, 1.0], [5, 16, 64])
        assert dry_penalties(history, config) == pytest.approx(naive_dry(history, config)), \
            (history, config)


def test_dry_context_kept_token_by_token_gives_the_same_penalties() -> None:
    """The runner's DryContext, started on a random prefix and grown a token at a time, says
    what the whole-context computation says at every step (windows, breakers, limits)."""
    rng = random.Random(5)
    for _ in range(150):
        alphabet = rng.randint(2, 5)
        tokens = [rng.randrange(alphabet) for _ in range(rng.randint(1, 60))]
        config = random_dry(rng, alphabet, 3, 3, [1.0], [3, 8, 30, 100])
        start = rng.randint(1, len(tokens))
        context = DryContext(config, tokens[:start])
        for end in range(start, len(tokens) + 1):
            if end > start:
                context.extend(tokens[end - 1:end])
            assert context.penalties() == pytest.approx(dry_penalties(tokens[:end], config)), \
                (tokens[:end], config, start)


def test_dry_contexts_sharing_breakers_share_their_index() -> None:
    """Samples with the same breakers (the API layer shares one tuple) index them once; a
    tuple equal but not the same object is indexed on its own, and both say the same."""
    breakers = tuple((head, (head + 1,) * length) for head in range(200) for length in (0, 2))
    config = Dry(1.0, 1.75, 2, 64, breakers)
    first, second = DryContext(config, [1, 2, 3]), DryContext(config, [4, 5])
    assert first.heads is second.heads
    twin = DryContext(Dry(1.0, 1.75, 2, 64, tuple(list(breakers))), [1, 2, 3])
    assert twin.heads is not first.heads and twin.heads == first.heads


def test_dry_exponent_is_clamped_below_float32s_overflow() -> None:
    config = dry(base=2.0, allowed=0, last_n=1000)
    penalties = dry_penalties([5] * 400, config)
    assert penalties[5] == 2.0 ** int(88.7228391 / math.log(2.0))  # (2 ** 127)
    huge = dry_penalties([5] * 8, Dry(-1.0, 1e300, 2, 64))  # (no clamp: 1e300 ** 5)
    assert huge == {5: -3.4028234663852886e38}


def test_breakers_are_found_as_llamacpp_finds_them_in_the_vocabulary() -> None:
    """A token holding the breaker breaks alone; one ending with its start heads a sequence
    whose tail is the rest, tokenized."""
    vocab = [b"a", b"b:", b"x", b"\n\n", b"ab", b"c", b"*", b"ef"]
    encode = {"cd": [5, 99], "d": [98]}
    found = breaker_sequences(["\n", "bcd", "xyz" * 20], VocabText.of(vocab),
                              lambda text: encode.get(text, [97]))
    assert set(found) == {(3, ()), (4, (5, 99)), (2, (97,))}
