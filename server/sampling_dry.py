"""llama.cpp's DRY ("don't repeat yourself") penalty, on the host: which tokens would extend
a repeat of the context's end, and by how much each loses (llama-sampling.cpp's algorithm,
from koboldcpp). No torch: the API layer finds the sequence breakers in the vocabulary
(`breaker_sequences`), the runner turns each step's penalties into a logits tensor.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from server.request import Breakers, Dry

MAX_BREAKER_BYTES = 40  # llama.cpp's: a longer breaker is cut to its first 40 bytes
MAX_BREAKER_TAIL = 20  # ... and the tokens after a breaker's head to 20
FLOAT_MAX_LOG = 88.7228391  # log(float32's largest): the exponent is clamped below it
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class VocabText:
    """The vocabulary's bytes laid out for a breaker's search: every token's end to end, so a
    breaker is looked for at C speed (one `bytes.find` over the whole vocabulary) rather
    than token by token in Python; and every token reversed, sorted, so the tokens that end
    with some bytes are one bisection away."""

    text: bytes
    starts: list[int]  # token i's bytes are text[starts[i]:starts[i + 1]]
    reversed_words: list[bytes]  # each token's bytes reversed, sorted
    reversed_ids: list[int]  # ... and whose they are

    @classmethod
    def of(cls, token_bytes: Sequence[bytes]) -> VocabText:
        starts = list(accumulate((len(word) for word in token_bytes), initial=0))
        backwards = sorted((word[::-1], i) for i, word in enumerate(token_bytes))
        return cls(b"".join(token_bytes), starts, [word for word, _ in backwards],
                   [i for _, i in backwards])

    def holding(self, text: bytes) -> Iterator[int]:
        """The tokens whose bytes hold `text`, each once."""
        at = self.text.find(text)
        while at != -1:
            token = bisect_right(self.starts, at) - 1
            if at + len(text) <= self.starts[token + 1]:
                yield token
                at = self.text.find(text, self.starts[token + 1])
            else:
                at = self.text.find(text, at + 1)

    def ending_with(self, text: bytes) -> Iterator[int]:
        """The tokens whose bytes end with `text` (and are at least as long)."""
        backwards = text[::-1]
        words = self.reversed_words
        i = bisect_left(words, backwards)
        while i < len(words) and words[i].startswith(backwards):
            yield self.reversed_ids[i]
            i += 1


def breaker_sequences(breakers: Sequence[str], vocab: VocabText,
                      encode: Callable[[str], list[int]]) -> Breakers:
    """Each breaker as llama.cpp finds it in the vocabulary (`breaker_found`), together."""
    found: dict[tuple[int, tuple[int, ...]], None] = {}
    for breaker in breakers:
        found.update(dict.fromkeys(breaker_found(breaker.encode(), vocab, encode)))
    return tuple(found)


def breaker_found(breaker: bytes, vocab: VocabText, encode: Callable[[str], list[int]]
                  ) -> Breakers:
    """One breaker (UTF-8) as llama.cpp finds it in the vocabulary: every token whose text
    holds it breaks alone (an empty tail); a token whose text ends with the breaker's
    beginning heads a sequence whose tail is the rest of the breaker, tokenized."""
    text = breaker[:MAX_BREAKER_BYTES]
    holders = sorted(set(vocab.holding(text))) if text else []
    found: list[tuple[int, tuple[int, ...]]] = [(token, ()) for token in holders]
    held = set(holders)
    for overlap in range(1, len(text)):
        # (a token that ends inside a character of the breaker: the rest's whole characters
        # are tokenized, that character's other bytes dropped, where llama.cpp tokenizes the
        # raw bytes; nothing left, no sequence)
        rest = text[overlap:].decode(errors="ignore")
        heads = [token for token in vocab.ending_with(text[:overlap]) if token not in held]
        if rest and heads:
            tail = tuple(encode(rest)[:MAX_BREAKER_TAIL])
            found.extend((token, tail) for token in heads)
    return tuple(found)


# A breaker's head token -> its tails, by length (a head may have thousands of tails: each
# position is then looked up once per length, at most MAX_BREAKER_TAIL + 1 times)
Heads = dict[int, dict[int, set[tuple[int, ...]]]]


class _Identity:
    """A key that is its object's identity: the API layer shares one Breakers tuple among
    the requests with the same breakers (LlamaCppService.dry_breakers; with an engine
    process, a request's samples share theirs), and hashing it by value (up to ~100k
    entries) would cost what indexing it once does."""

    __slots__ = ("value",)

    def __init__(self, value: Breakers) -> None:
        self.value = value  # (held: its id stays its own while the key is cached)

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


def _heads(dry: Dry) -> Heads:
    """The breakers indexed by head (read only: shared by the samples that use them)."""
    return _indexed(_Identity(dry.breakers))


@lru_cache(maxsize=16)  # (a crafted set's index is tens of MB)
def _indexed(key: _Identity) -> Heads:
    heads: Heads = {}
    for head, tail in key.value:
        heads.setdefault(head, {}).setdefault(len(tail), set()).add(tail)
    return {head: dict(sorted(by_length.items(), reverse=True))  # (the longest first)
            for head, by_length in heads.items()}


def _breaks_at(tokens: Sequence[int], head: int, heads: Heads) -> int:
    """The longest tail of a breaker headed at position `head` that `tokens` hold whole after
    it; -1: none."""
    for length, tails in heads.get(tokens[head], {}).items():
        if tuple(tokens[head + 1:head + 1 + length]) in tails:
            return length
    return -1


def _latest_breaker(tokens: Sequence[int], heads: Heads) -> tuple[int, int]:
    """The latest position that heads a whole breaker, and its longest tail; (-1, 0): none."""
    for head in range(len(tokens) - 1, -1, -1):
        if tokens[head] in heads and (longest := _breaks_at(tokens, head, heads)) >= 0:
            return head, longest
    return -1, 0


def _suffix_matches(tokens: Sequence[int]) -> list[int]:
    """For each position e, how many tokens ending at e match the last ones (the last
    position's own: 0): the Z-algorithm run backwards, llama.cpp's dry_repeat_count before
    its cap (capping after gives the same counts)."""
    n = len(tokens)
    last = n - 1

    def back(i: int) -> int:  # the i-th token from the end (0: the last)
        return tokens[last - i]

    matches = [0] * n
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            length = 0
            while length + k < n and back(length) == back(length + k):
                length += 1
            matches[last - k] = length
            if length > 0:
                lt, rt = k, k + length - 1
        elif matches[last - (k - lt)] < rt - k + 1:
            matches[last - k] = matches[last - (k - lt)]
        else:
            i = rt + 1
            while i < n and back(i) == back(i - k):
                i += 1
            matches[last - k] = i - k
            lt, rt = k, i - 1
    return matches


def dry_penalties(tokens: Sequence[int], dry: Dry) -> dict[int, float]:
    """What each token would lose from its logit as the next after `tokens` (the prompt and
    output so far): for a token that extends a repeat of length L >= allowed_length of the
    context's end, multiplier * base ** (L - allowed_length); none for a token that breaks
    sequences alone. A repeat reaches back no further than the last `last_n` tokens and
    the latest breaker's end. (llama.cpp's steps 1-4, over the whole context each call;
    DryContext keeps the same up to date a token at a time.)"""
    history = tokens[-dry.last_n:]
    n = len(history)
    if n <= dry.allowed_length:
        return {}
    heads = _heads(dry)
    head, longest = _latest_breaker(history, heads)
    limit = n if head < 0 else n - 1 - head - longest
    if limit < dry.allowed_length:
        return {}
    matches = _suffix_matches(history)
    # The token after each repeat would extend it: the longest repeat each token extends
    longest_by_token: dict[int, int] = {}
    for e in range(n - 1):
        length = min(matches[e], limit)
        if length >= dry.allowed_length and longest_by_token.get(history[e + 1], -1) < length:
            longest_by_token[history[e + 1]] = length
    return _penalties(longest_by_token, heads, dry)


def _penalties(longest_by_token: dict[int, int], heads: Heads, dry: Dry
               ) -> dict[int, float]:
    """Step 4: each token's penalty for the longest repeat it extends (a token that breaks
    alone is spared)."""
    return {token: _penalty(length, dry) for token, length in longest_by_token.items()
            if 0 not in heads.get(token, {})}


def _penalty(length: int, dry: Dry) -> float:
    """The penalty for extending a repeat of `length` tokens."""
    exponent = length - dry.allowed_length
    max_exponent = int(FLOAT_MAX_LOG / math.log(dry.base)) if dry.base > 1.000001 else 0
    if max_exponent > 0:  # (llama.cpp's: a base past float32's largest is not clamped)
        exponent = min(exponent, max_exponent)
    try:
        power = dry.base ** exponent
    except OverflowError:  # (a huge base: float32's overflow, as llama.cpp's powf)
        power = math.inf
    # within float32's range: a penalty of -inf would make a logit +inf, a softmax NaN
    return max(-FLOAT32_MAX, min(dry.multiplier * power, FLOAT32_MAX))


class DryContext:
    """One sequence's context as DRY sees it, kept up to date a token at a time, so that a
    step costs O(occurrences of its newest token), not O(context) as `dry_penalties` does
    (on the 2-core CPU, tokens drawn 1/rank: 0.03 ms a step at 2048 tokens and 0.5 ms at
    32768, against 2 ms and 34 ms, every step, holding up the batch). The same penalties:
    the tests hold the two together.

    It keeps, for each earlier position e, how many tokens ending at e match the context's
    end (only those that match at all: the newest token's occurrences): a new token x makes
    e's match 1 + (e - 1's) where the token at e is x, and nothing elsewhere. And the latest
    breaker whose tail is complete (a tail is at most MAX_BREAKER_TAIL tokens, so only the
    heads that near the end need looking at as a token arrives). A token that fills the
    context (a long run of one token) still costs O(context) a step, as llama.cpp's always
    does; allowed_length 0 adds O(distinct tokens in the window), each penalised."""

    def __init__(self, dry: Dry, tokens: Sequence[int]) -> None:
        self.dry = dry
        self.heads = _heads(dry)
        self.spared = {head for head, by_length in self.heads.items() if 0 in by_length}
        self.tokens = list(tokens)
        self.positions: dict[int, list[int]] = {}  # each token's positions, ascending
        for position, token in enumerate(self.tokens):
            self.positions.setdefault(token, []).append(position)
        # position -> how many tokens ending there match the end (only those that do)
        self.matches = {e: length for e, length in enumerate(_suffix_matches(self.tokens))
                        if length}
        self.breaker = _latest_breaker(self.tokens, self.heads)  # (position, longest tail)
        # allowed_length 0 only: how often each token occurs in tokens[counted_from:], the
        # window but its first (each extends a repeat of length 0 at least)
        self.counts: Counter[int] = Counter(self.tokens if dry.allowed_length == 0 else ())
        self.counted_from = 0

    def extend(self, tokens: Sequence[int]) -> None:
        """The context grown by `tokens`."""
        for x in tokens:
            end = len(self.tokens)
            self.matches = {e: self.matches.get(e - 1, 0) + 1
                            for e in self.positions.get(x, ())}
            self.positions.setdefault(x, []).append(end)
            self.tokens.append(x)
            if self.dry.allowed_length == 0:
                self.counts[x] += 1
            for head in range(max(self.breaker[0], end - MAX_BREAKER_TAIL, 0), end + 1):
                if self.tokens[head] in self.heads and (
                        longest := _breaks_at(self.tokens, head, self.heads)) >= 0:
                    self.breaker = (head, longest)

    def penalties(self) -> dict[int, float]:
        """`dry_penalties(tokens, dry)` of the context so far."""
        dry, n = self.dry, len(self.tokens)
        start = max(0, n - dry.last_n)  # (the window llama.cpp's DRY looks back over)
        if n - start <= dry.allowed_length:
            return {}
        head, longest = self.breaker
        limit = n - start if head < start else n - 1 - head - longest
        if limit < dry.allowed_length:
            return {}
        longest_by_token: dict[int, int] = {}
        for e, length in self.matches.items():
            length = min(length, e - start + 1, limit)  # (within the window and the limit)
            if length >= dry.allowed_length and e >= start:
                token = self.tokens[e + 1]
                if longest_by_token.get(token, -1) < length:
                    longest_by_token[token] = length
        penalties = _penalties(longest_by_token, self.heads, dry)
        if dry.allowed_length > 0:
            return penalties
        # every other token the window holds after its first extends a repeat of length 0
        # (one penalty for all, set at C speed: a window may hold thousands)
        extending = dict.fromkeys(self._window_tokens(start + 1),
                                  _penalty(0, dry))
        for token in self.spared.intersection(extending):
            del extending[token]
        extending.update(penalties)
        return extending

    def _window_tokens(self, first: int) -> Counter[int]:
        """The tokens tokens[first:] holds (`first` never moves back)."""
        for token in self.tokens[self.counted_from:first]:
            self.counts[token] -= 1
            if not self.counts[token]:
                del self.counts[token]
        self.counted_from = max(self.counted_from, first)
        return self.counts

