"""A regular expression -> a DFA over UTF-8 bytes, for guided decoding. No torch.

The pattern must match the whole output (as `re.fullmatch`). Supported: literals and escapes
(\\d \\w \\s and their negations, \\n \\t \\r \\f \\v, \\xHH, \\uHHHH, \\UHHHHHHHH, escaped
punctuation), `.`, classes `[...]` / `[^...]` with ranges, groups `(...)`, `(?:...)`,
`(?P<name>...)`, alternation, and the quantifiers * + ? {n} {n,} {n,m} (a lazy `?` after one
changes nothing here: every match is allowed). Anchors ^ and $ are accepted at the ends.
Backreferences and lookarounds are not regular and are refused.

Characters become their UTF-8 bytes; a class's characters past ASCII are code point ranges,
compiled to the byte ranges of their encodings (a negated class or `.` allows every character
past ASCII it does not name: well-formed UTF-8, no surrogates; \\W, \\D and \\S hold them
all, \\w \\d \\s being ASCII's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 20_000
MAX_COMPILE_SECONDS = 3.0  # a pattern may be small and its DFA slow to build: bounded
ALL_BYTES = (1 << 256) - 1


class GuideError(ValueError):
    """The pattern or schema cannot be compiled; the message says why (a 400)."""


class GuideTooLarge(GuideError):
    """The automaton passes its size or time limits (a smaller pattern may compile)."""


@dataclass(frozen=True, slots=True)
class ByteDFA:
    """A deterministic automaton over bytes: `table[state][byte_class[b]]` is the next state or
    -1 (no way on). State 0 starts; every state can still reach an accepting one."""

    byte_class: bytes  # 256 entries, each byte's class
    table: tuple[tuple[int, ...], ...]
    accepting: frozenset[int]

    @property
    def num_states(self) -> int:
        return len(self.table)

    def walk(self, state: int, data: bytes) -> int:
        """The state after `data` from `state`; -1 where it leaves the language."""
        for b in data:
            if state < 0:
                break
            state = self.table[state][self.byte_class[b]]
        return state

    def is_final(self, state: int) -> bool:
        """Accepting with no way on: the output is complete."""
        return state in self.accepting and all(t < 0 for t in self.table[state])

    def matches(self, data: bytes) -> bool:
        return self.walk(0, data) in self.accepting


# ------------------------------------------------------------------------------ parsing
# AST nodes: ("chars", ascii_mask, multibyte) where multibyte is the characters past ASCII,
# as sorted, disjoint code point ranges (Ranges); ("seq", [nodes]); ("alt", [nodes]);
# ("repeat", node, lo, hi)
Ranges = tuple[tuple[int, int], ...]
ANY_MULTIBYTE: Ranges = ((0x80, 0xD7FF), (0xE000, 0x10FFFF))  # (no surrogates)
_DIGITS = {ord(c) for c in "0123456789"}
_WORD = _DIGITS | {ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"}
_SPACE = {ord(c) for c in " \t\n\r\f\v"}
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


def _mask(codes: set[int]) -> int:
    m = 0
    for c in codes:
        m |= 1 << c
    return m


_ASCII = (1 << 128) - 1
JSON_ESCAPED = _mask({ord('"'), ord("\\")} | set(range(0x20)))  # never raw in a JSON string
# "(?J:...)": a group whose characters must be valid inside a JSON string (not Python's
# syntax: json_schema.py wraps a schema's `pattern` in it)
JSON_STRING_GROUP = "(?J:"
_CLASS_ESCAPES = {"d": _mask(_DIGITS), "w": _mask(_WORD), "s": _mask(_SPACE)}


# "(?M<k>)": the k-th of the `members` given to compile_regex, ([(pattern, how many)],
# separator pattern): items in order, each "one", "optional" or "any" (any number of
# times), one separator between two written: an object's properties, a list's items. As
# one regex that takes a copy of the rest after each optional item (quadratic, and a list
# writes its item twice: exponential in the nesting); built as its own automaton
# (members_of), each item once.
Members = tuple[list[tuple[str, str]], str]


class _Parser:
    def __init__(self, pattern: str, members: Sequence[Members] = ()) -> None:
        self.p, self.i = pattern, 0
        self.members = members
        self.json_string = False  # inside a (?J:...) group (JSON_STRING_GROUP)

    def error(self, what: str) -> GuideError:
        return GuideError(f"regex {self.p!r} at position {self.i}: {what}")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise self.error("unexpected end")
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self) -> tuple:
        node = self.alternation()
        if self.i < len(self.p):
            raise self.error(f"unexpected {self.p[self.i]!r}")
        return node

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items = []
        while (c := self.peek()) is not None and c not in "|)":
            if c in "^$":  # the match is whole: an anchor means something only at an end
                if (c == "^" and self.i > 0) or (c == "$" and self.i < len(self.p) - 1):
                    raise self.error("anchors (^ $) are supported at the pattern's ends only")
                self.i += 1
                continue
            items.append(self.quantified(self.safe(self.atom())))
        return ("seq", items)

    def safe(self, node: tuple) -> tuple:
        """Inside a JSON-string group, a character class loses the characters JSON must
        escape (a quote, a backslash, controls): what matches there is valid in a string."""
        if self.json_string and node[0] == "chars":
            return ("chars", node[1] & ~JSON_ESCAPED, node[2])
        return node

    def quantified(self, node: tuple) -> tuple:
        while (c := self.peek()) is not None and c in "*+?{":
            if c == "{":
                bounds = self.braces()
                if bounds is None:  # a literal "{", as Python reads "a{x"
                    break
                lo, hi = bounds
            else:
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            if self.peek() == "?":  # lazy: the language is the same
                self.i += 1
            elif self.peek() == "+":
                raise self.error("possessive quantifiers are not supported")
            if self.peek() is not None and self.peek() in "*+?" or (
                    self.peek() == "{" and self.braces(peek=True) is not None):
                raise self.error("multiple repeat")
            node = ("repeat", node, lo, hi)
        return node

    def braces(self, peek: bool = False) -> tuple[int, int | None] | None:
        """{n}, {n,}, {,n} or {n,m} at the cursor (taken unless `peek`); None where the brace
        is a literal, as Python reads "a{x"."""
        close = self.p.find("}", self.i)
        body = self.p[self.i + 1:close] if close > 0 else ""
        lo_text, comma, hi_text = body.partition(",")
        if (lo_text and not lo_text.isdigit()) or (hi_text and not hi_text.isdigit()) or (
                not lo_text and not (comma and hi_text)):
            return None
        lo = int(lo_text) if lo_text else 0
        hi = int(hi_text) if hi_text else None if comma else lo
        if peek:
            return lo, hi
        if hi is not None and hi < lo:
            raise self.error(f"bad repeat {{{body}}}")
        if max(lo, hi or 0) > 1000:
            raise self.error("repeat counts above 1000 are not supported")
        self.i = close + 1
        return lo, hi

    def atom(self) -> tuple:
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                self.i += 1
                kind = self.take()
                if kind == "P" and self.peek() == "<":
                    end = self.p.find(">", self.i)
                    if end < 0:
                        raise self.error("unterminated group name")
                    self.i = end + 1
                elif kind == "M":  # (?M<k>): a members node
                    end = self.p.find(")", self.i)
                    k = self.p[self.i:end]
                    if end < 0 or not k.isdigit() or int(k) >= len(self.members):
                        raise self.error("(?M...) groups are not supported")
                    self.i = end + 1
                    items, sep = self.members[int(k)]
                    return ("members", [(_Parser(item, self.members).parse(), count)
                                        for item, count in items],
                            _Parser(sep, self.members).parse())
                elif kind == "J" and self.peek() == ":":  # JSON_STRING_GROUP
                    self.i += 1
                    outer, self.json_string = self.json_string, True
                    node = self.alternation()
                    self.json_string = outer
                    if self.take() != ")":
                        raise self.error("missing )")
                    return node
                elif kind != ":":
                    raise self.error(f"(?{kind}...) groups (lookarounds, flags) are not supported")
            node = self.alternation()
            if self.take() != ")":
                raise self.error("missing )")
            return node
        if c == "[":
            return self.char_class()
        if c == ".":
            return ("chars", _ASCII & ~(1 << 10), ANY_MULTIBYTE)
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?":
            raise self.error(f"nothing to repeat before {c!r}")
        if c == ")":
            raise self.error("unbalanced )")
        return _literal(c)

    def escape(self, in_class: bool) -> tuple:
        c = self.take()
        if c in "dws":
            return ("chars", _CLASS_ESCAPES[c], ())
        if c in "DWS":
            return ("chars", _ASCII & ~_CLASS_ESCAPES[c.lower()], ANY_MULTIBYTE)
        if c == "0":  # octal, as Python reads \0, \01, \012
            digits = ""
            while len(digits) < 2 and (d := self.peek()) is not None and d in "01234567":
                digits += self.take()
            return _literal(chr(int(digits or "0", 8)))
        if c in _SIMPLE_ESCAPES:
            return _literal(_SIMPLE_ESCAPES[c])
        if c in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{c} escape")
            self.i += n
            if int(digits, 16) > 0x10FFFF:
                raise self.error(f"\\{c}{digits} is not a character")
            return _literal(chr(int(digits, 16)))
        if c == "b" and in_class:
            return _literal("\b")
        if c.isalnum():
            raise self.error(f"\\{c} is not supported (backreferences, anchors, classes)")
        return _literal(c)

    def char_class(self) -> tuple:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ascii_mask, multi, first = 0, [], True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                node = self.escape(in_class=True)
                ascii_mask |= node[1]
                multi += node[2]
                lo = _single(node)
            else:
                lo = ord(c)
                ascii_mask |= (1 << lo) if lo < 128 else 0
                multi.append((lo, lo))
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                h = self.take()
                hi = _single(self.escape(in_class=True)) if h == "\\" else ord(h)
                if lo is None or hi is None or hi < lo:
                    raise self.error("bad range in class")
                ascii_mask |= _ascii_of([(lo, hi)])
                multi.append((lo, hi))
        return _class(ascii_mask, multi, negate)


def _ranges(pairs: Sequence[tuple[int, int]]) -> Ranges:
    """Code point ranges past ASCII, sorted and merged, surrogates left out."""
    cut = []
    for lo, hi in pairs:
        lo = max(lo, 0x80)
        for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), min(hi, 0x10FFFF))):
            if a <= b:
                cut.append((a, b))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(cut):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _class(ascii_mask: int, multi: Sequence[tuple[int, int]], negate: bool) -> tuple:
    """A class node: the ASCII characters of `ascii_mask` and the code point ranges `multi`
    (ASCII parts of them are in the mask already), or every other character."""
    ranges = _ranges(multi)
    if not negate:
        return ("chars", ascii_mask, ranges)
    rest, at = [], 0x80
    for lo, hi in ranges:
        if at < lo:
            rest.append((at, lo - 1))
        at = hi + 1
    rest.append((at, 0x10FFFF))
    return ("chars", _ASCII & ~ascii_mask, _ranges(rest))


def text_node(text: str) -> tuple:
    """The node matching exactly `text`."""
    return ("seq", [_literal(c) for c in text])


def ranges_node(ranges: Sequence[tuple[int, int]], negate: bool) -> tuple:
    """A class of characters from code point ranges (inclusive), or every other character."""
    return _class(_ascii_of(ranges), ranges, negate)


def _ascii_of(ranges: Sequence[tuple[int, int]]) -> int:
    """The mask of the ASCII characters in code point ranges."""
    mask = 0
    for lo, hi in ranges:
        for code in range(lo, min(hi, 127) + 1):
            mask |= 1 << code
    return mask


ANY_CHAR = ("chars", _ASCII, ANY_MULTIBYTE)  # every character, a newline too


def _literal(c: str) -> tuple:
    code = ord(c)
    return ("chars", 1 << code, ()) if code < 128 else ("chars", 0, _ranges([(code, code)]))


def _single(node: tuple) -> int | None:
    """The one character a class escape names, or None (\\d and the like)."""
    _, m, multi = node
    if not multi and m and m & (m - 1) == 0:
        return m.bit_length() - 1
    if not m and len(multi) == 1 and multi[0][0] == multi[0][1]:
        return multi[0][0]
    return None


def literal_pattern(text: str) -> str:
    """`text` as a pattern that matches exactly it."""
    return "".join(f"\\x{ord(c):02x}" if c.isascii() and not c.isalnum() else
                   c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else c
                   for c in text)


# ------------------------------------------------------------------------------ NFA
class _NFA:
    """Thompson's construction: byte edges labelled with 256-bit masks, and epsilon edges."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int]]] = []
        self.eps: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise GuideTooLarge("the pattern is too large to compile (its automaton passes "
                             f"{MAX_NFA_STATES} states)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        kind = node[0]
        if kind == "chars":
            return self.chars(node[1], node[2])
        if kind == "members":
            return self.members_of(node[1], node[2])
        if kind == "seq":
            start = end = self.state()
            for item in node[1]:
                s, e = self.build(item)
                self.eps[end].append(s)
                end = e
            return start, end
        if kind == "alt":
            start, end = self.state(), self.state()
            for branch in node[1]:
                s, e = self.build(branch)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, inner, lo, hi = node
        start = end = self.state()
        for _ in range(lo):
            s, e = self.build(inner)
            self.eps[end].append(s)
            end = e
        if hi is None:  # a loop back
            s, e = self.build(inner)
            self.eps[end].append(s)
            self.eps[e].append(end)
        else:
            last = self.state()
            self.eps[end].append(last)
            for _ in range(hi - lo):
                s, e = self.build(inner)
                self.eps[end].append(s)
                self.eps[e].append(last)
                end = e
            end = last
        return start, end

    def members_of(self, items: list[tuple[tuple, str]], sep: tuple) -> tuple[int, int]:
        """Items in order, each built once: `none[i]` before item i when nothing was written
        yet, `some[i]` when something was (a separator first); an optional item may be passed
        by, an "any" item passed by or written again."""
        none = [self.state() for _ in range(len(items) + 1)]
        some = [self.state() for _ in range(len(items) + 1)]
        for i, (item, count) in enumerate(items):
            item_start, item_end = self.build(item)
            sep_start, sep_end = self.build(sep)
            self.eps[none[i]].append(item_start)
            self.eps[some[i]].append(sep_start)
            self.eps[sep_end].append(item_start)
            self.eps[item_end].append(some[i if count == "any" else i + 1])
            if count != "one":
                self.eps[none[i]].append(none[i + 1])
                self.eps[some[i]].append(some[i + 1])
        end = self.state()
        self.eps[none[-1]].append(end)
        self.eps[some[-1]].append(end)
        return none[0], end

    def chars(self, ascii_mask: int, multibyte: Ranges) -> tuple[int, int]:
        start, end = self.state(), self.state()
        if ascii_mask:
            self.edges[start].append((ascii_mask, end))
        for lo, hi in multibyte:
            for run in utf8_sequences(lo, hi):  # byte ranges, one per byte, the last to `end`
                state = start
                for k, (a, b) in enumerate(run):
                    nxt = end if k == len(run) - 1 else self.state()
                    self.edges[state].append((_mask(set(range(a, b + 1))), nxt))
                    state = nxt
        return start, end


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The UTF-8 encodings of the code points lo..hi (past ASCII, no surrogates) as runs of
    byte ranges, one range per byte (the split of Russ Cox's and Rust's regex crates: first
    by encoded length, then until each continuation byte spans a whole range)."""
    runs, todo = [], [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        split = next(((lo, edge, edge + 1, hi) for edge in (0x7FF, 0xFFFF) if lo <= edge < hi),
                     None)
        for bits in (6, 12, 18):
            if split is not None:
                break
            m = (1 << bits) - 1
            if lo & ~m != hi & ~m:  # the ranges of the bytes below differ: split
                if lo & m:
                    split = (lo, lo | m, (lo | m) + 1, hi)
                elif hi & m != m:
                    split = (lo, (hi & ~m) - 1, hi & ~m, hi)
        if split is not None:
            todo += [(split[2], split[3]), (split[0], split[1])]
            continue
        runs.append(list(zip(chr(lo).encode(), chr(hi).encode(), strict=True)))
    return runs


# ------------------------------------------------------------------------------ DFA
def compile_regex(pattern: str, members: Sequence[Members] = ()) -> ByteDFA:
    """The DFA of `pattern` (matched whole; `members`: its (?M<k>) groups' contents);
    GuideError where it cannot be built."""
    return compile_node(_Parser(pattern, members).parse())


def compile_node(node: tuple, seconds: float | None = None) -> ByteDFA:
    """The DFA of a parsed pattern (the AST above; grammar.py builds one too), built within
    `seconds` (MAX_COMPILE_SECONDS)."""
    seconds = MAX_COMPILE_SECONDS if seconds is None else seconds
    nfa = _NFA()
    start, end = nfa.build(node)
    classes = _byte_classes({label for edges in nfa.edges for label, _ in edges})
    class_of = bytearray(256)
    for index, mask in enumerate(classes):
        for b in range(256):
            if mask >> b & 1:
                class_of[b] = index

    def closure(states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for nxt in nfa.eps[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(s for s in seen if nfa.edges[s] or s == end)  # epsilon-only: moot

    deadline = time.monotonic() + seconds
    first = closure({start})
    index = {first: 0}
    order, table = [first], []
    while len(table) < len(order):
        current = order[len(table)]
        row = []
        for mask in classes:
            if time.monotonic() > deadline:  # (checked per edge: a few rows may be slow)
                raise GuideTooLarge(f"the pattern takes too long to compile (over "
                                    f"{seconds:g} s)")
            targets = {t for s in current for label, t in nfa.edges[s] if label & mask}
            if not targets:
                row.append(-1)
                continue
            key = closure(targets)
            if key not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise GuideTooLarge(f"the pattern is too large to compile (its automaton "
                                        f"passes {MAX_DFA_STATES} states)")
                index[key] = len(order)
                order.append(key)
            row.append(index[key])
        table.append(row)
    accepting = {i for i, states in enumerate(order) if end in states}
    return _prune(bytes(class_of), table, accepting)


def _byte_classes(labels: set[int]) -> list[int]:
    """The coarsest partition of the 256 bytes that every label is a union of."""
    classes = [ALL_BYTES]
    for label in labels:
        split = []
        for c in classes:
            inside, outside = c & label, c & ~label
            split += [part for part in (inside, outside) if part]
        classes = split
    return classes


def _prune(byte_class: bytes, table: list[list[int]], accepting: set[int]) -> ByteDFA:
    """Drop the states that cannot reach an accepting one (their edges become -1)."""
    live = set(accepting)
    changed = True
    while changed:
        changed = False
        for s, row in enumerate(table):
            if s not in live and any(t in live for t in row):
                live.add(s)
                changed = True
    if 0 not in live:
        raise GuideError("the pattern matches nothing")
    rows = tuple(tuple(t if t in live else -1 for t in row) for row in table)
    return ByteDFA(byte_class, rows, frozenset(accepting))
