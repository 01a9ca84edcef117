"""Which tokens a guide allows next: per DFA state, a mask over the vocabulary, computed by
walking every token's bytes through the DFA at once (torch, on the host) and kept.

The runner asks for the mask of each guided row's state before sampling; a guide's states
are few (tens to thousands) and a generation visits few of them, so after the first steps
every mask is a lookup. Tokens that are never text (special tokens, the model's padded ids
past the tokenizer's vocabulary) are never allowed; the end-of-sequence ids are allowed
exactly where the DFA accepts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from server.guided.regex import ByteDFA
from server.guided.spec import Guide

CACHED_DFAS = 64  # guides' class tables kept (small: states x byte classes)
MASK_CACHE_BYTES = 256 * 2**20  # masks kept: 2048 at 128k tokens, 8192 at 32k
MIN_CACHED_MASKS = 256


class TokenTable:
    """The vocabulary's bytes, for walking all of it at once: text tokens sorted longest
    first, and for each byte position n the n-th bytes of the tokens longer than n (ragged:
    all of it holds the vocabulary's bytes once, a few MB for 128k tokens)."""

    def __init__(self, token_bytes: Sequence[bytes], vocab_size: int,
                 never: frozenset[int], eos_ids: frozenset[int]) -> None:
        self.vocab_size = vocab_size
        # Special tokens have no bytes here: never allowed, and their text never walks a DFA
        self.token_bytes = [b"" if i in never else raw
                            for i, raw in enumerate(token_bytes[:vocab_size])]
        self.token_bytes += [b""] * (vocab_size - len(self.token_bytes))
        self.eos_ids = sorted(t for t in eos_ids if 0 <= t < vocab_size)
        text_ids = [i for i, raw in enumerate(self.token_bytes) if raw and i not in eos_ids]
        text_ids.sort(key=lambda i: -len(self.token_bytes[i]))
        self.ids = torch.tensor(text_ids, dtype=torch.long)
        lengths = torch.tensor([len(self.token_bytes[i]) for i in text_ids], dtype=torch.long)
        blob = torch.frombuffer(bytearray(b"".join(self.token_bytes[i] for i in text_ids)),
                                dtype=torch.uint8).long()
        starts = torch.cumsum(lengths, 0) - lengths
        longest = int(lengths[0]) if text_ids else 0
        self.columns = [blob[starts[:int((lengths > n).sum())] + n] for n in range(longest)]

    def walk(self, by_class: torch.Tensor, class_of: torch.Tensor, state: int) -> torch.Tensor:
        """Each text token's state after its bytes from `state` (the dead state where it
        leaves the language), in the table's order."""
        states = torch.full((len(self.ids),), state, dtype=torch.long)
        for column in self.columns:
            rows = len(column)
            states[:rows] = by_class[states[:rows], class_of[column]]
        return states


def class_tables(dfa: ByteDFA) -> tuple[torch.Tensor, torch.Tensor]:
    """(states + 1, classes): the next state by byte class, the last row the dead state,
    where -1 leads; and each byte's class."""
    dead = dfa.num_states
    by_class = torch.tensor(dfa.table, dtype=torch.long).reshape(dead, -1)
    by_class[by_class < 0] = dead
    by_class = torch.cat([by_class, torch.full((1, by_class.shape[1]), dead)])
    return by_class, torch.tensor(list(dfa.byte_class), dtype=torch.long)


class GuideMasks:
    """Allowed-token masks by guide and state, made on first use and kept, least recently used
    dropped past MASK_CACHE_BYTES; the token table is built on the first guided request."""

    def __init__(self, make_table: Callable[[], TokenTable]) -> None:
        self._make_table = make_table
        self._table: TokenTable | None = None
        self._lock = threading.Lock()
        # Least recently used first: each guide's class tables, and each (guide, state)'s mask
        self._tables: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._masks: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()

    @property
    def table(self) -> TokenTable:
        with self._lock:
            if self._table is None:
                self._table = self._make_table()
            return self._table

    def mask(self, guide: Guide, state: int) -> torch.Tensor:
        """(vocab,) bool: the tokens allowed at `state` of `guide`."""
        key = (guide.key, state)
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        mask = self._masks[key] = self._compute(guide.dfa, self._class_tables(guide), state)
        while len(self._masks) > max(MIN_CACHED_MASKS, MASK_CACHE_BYTES // mask.numel()):
            self._masks.popitem(last=False)
        return mask

    def _class_tables(self, guide: Guide) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables.get(guide.key)
        if tables is None:
            tables = self._tables[guide.key] = class_tables(guide.dfa)
            while len(self._tables) > CACHED_DFAS:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(guide.key)
        return tables

    def _compute(self, dfa: ByteDFA, tables: tuple[torch.Tensor, torch.Tensor], state: int
                 ) -> torch.Tensor:
        table = self.table
        mask = torch.zeros(table.vocab_size, dtype=torch.bool)
        ends = table.walk(*tables, state)
        mask[table.ids[ends != dfa.num_states]] = True
        # The end is allowed where the output is complete, and where nothing else is left
        # (a vocabulary that cannot write what the pattern needs): never a dead end
        if state in dfa.accepting or not mask.any():
            mask[table.eos_ids] = True
        return mask

    def advance(self, guide: Guide, state: int, token_id: int) -> int:
        """The state after `token_id`; an end-of-sequence or special token leaves it."""
        raw = self.table.token_bytes[token_id] if 0 <= token_id < self.table.vocab_size else b""
        if not raw or token_id in self.table.eos_ids:
            return state
        after = guide.dfa.walk(state, raw)
        return state if after < 0 else after  # only an unguided token could leave it
