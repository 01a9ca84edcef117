"""A GBNF grammar (llama.cpp's, and the EBNF of vLLM's xgrammar backend) -> the regex AST
(regex.py) of the language it writes, from its rule `root`; a grammar without `::=` is read
as Lark, as vLLM converts one (lark_as_gbnf). No torch.

Syntax: rules `name ::= expression`; in an expression, "strings" (or 'strings'), classes
`[a-z]` / `[^...]`, `.` (any character), rule names, groups `( )`, alternation `|` and the
quantifiers * + ? {m} {m,} {m,n} {,n}; `#` comments. Escapes: \\n \\t \\r \\\\ \\" \\' \\[
\\] \\- \\^ \\xHH \\uHHHH \\UHHHHHHHH. A rule may run over several lines: the next starts at the
next `name ::=`. llama.cpp's token references (`<...>`) are refused.

A guide is a finite automaton, so recursion is bounded, as json_object's nesting is: a rule
may be open inside itself up to a depth, and an alternative that would nest deeper is not
written. The depth is the largest up to MAX_RECURSION whose automaton fits regex.py's limits
(llama.cpp's json.gbnf, with its indentation counts, fits 3). A rule whose only recursion is
on itself at an end of its alternatives (`list ::= item list | item`, `sum ::= sum "+"
term | term`) is a repetition, and is exact.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from server.guided import regex
from server.guided.regex import (
    ANY_CHAR,
    MAX_NFA_STATES,
    ByteDFA,
    GuideError,
    GuideTooLarge,
    compile_node,
    ranges_node,
    text_node,
)

MAX_RECURSION = 5  # a recursive rule open inside itself at most this many times
GRAMMAR_SECONDS = 6.0  # to compile a grammar, every depth tried (each within the regex's)
MAX_NODES = MAX_NFA_STATES // 2  # the expanded grammar's size (each node takes 2+ states)
MAX_GRAMMAR_CHARS = 100_000
ROOT = "root"

# Grammar AST: ("text", str), ("class", node), ("ref", name), ("seq", [e]), ("alt", [e]),
# ("repeat", e, lo, hi)
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RULE_START = re.compile(r"([A-Za-z0-9_-]+)[ \t]*::=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "[": "[",
            "]": "]", "-": "-", "^": "^", "/": "/"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def error(self, what: str) -> GuideError:
        line = self.text.count("\n", 0, self.i) + 1
        return GuideError(f"grammar, line {line}: {what}")

    def space(self) -> None:
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end
            elif c.isspace():
                self.i += 1
            else:
                break

    def rules(self) -> dict[str, tuple]:
        rules: dict[str, tuple] = {}
        self.space()
        while self.i < len(self.text):
            start = _RULE_START.match(self.text, self.i)
            if start is None:
                raise self.error("expected a rule: name ::= ...")
            name = start.group(1)
            if name in rules:
                raise self.error(f"rule {name!r} is defined twice")
            self.i = start.end()
            rules[name] = self.alternation()
            if self.i < len(self.text) and not _RULE_START.match(self.text, self.i):
                raise self.error(f"unexpected {self.text[self.i]!r}")
        return rules

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def peek(self) -> str | None:
        self.space()
        return self.text[self.i] if self.i < len(self.text) else None

    def sequence(self) -> tuple:
        items = []
        while (c := self.peek()) is not None and c not in "|)":
            if _RULE_START.match(self.text, self.i):  # the next rule
                break
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else ("seq", items)

    def atom(self) -> tuple:
        c = self.text[self.i]
        self.i += 1
        if c in "\"'":
            return ("text", self.string(c))
        if c == "[":
            return ("class", self.char_class())
        if c == ".":
            return ("class", ANY_CHAR)
        if c == "(":
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing )")
            self.i += 1
            return node
        if c == "<":
            raise self.error("token references (<...>) are not supported")
        if c == "/":
            raise self.error("regular expressions (/.../, Lark's) are not supported")
        name = _NAME.match(self.text, self.i - 1)
        if name is None:
            raise self.error(f"unexpected {c!r}")
        self.i = name.end()
        return ("ref", name.group())

    def quantified(self, node: tuple) -> tuple:
        while (c := self.peek()) is not None and c in "*+?{":
            self.i += 1
            if c == "{":
                end = self.text.find("}", self.i)
                body = re.sub(r"\s", "", self.text[self.i:end]) if end > 0 else ""
                bounds = re.fullmatch(r"([0-9]{0,4})(,?)([0-9]{0,4})", body)
                if end < 0 or bounds is None or bounds.group() in ("", ","):
                    raise self.error("bad repetition {...}")
                lo_text, comma, hi_text = bounds.groups()
                lo = int(lo_text or 0)
                hi = int(hi_text) if hi_text else None if comma else lo
                if (hi is not None and hi < lo) or max(lo, hi or 0) > 1000:
                    raise self.error(f"bad repetition {{{body}}} (counts up to 1000)")
                self.i = end + 1
            else:
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            node = ("repeat", node, lo, hi)
        return node

    def char(self, quote: str) -> int:
        """One character of a string or class, its escape read."""
        if self.i >= len(self.text):
            raise self.error(f"missing closing {quote}")
        c = self.text[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        e = self.text[self.i:self.i + 1]
        self.i += 1
        if e in _ESCAPES:
            return ord(_ESCAPES[e])
        if e in _HEX_DIGITS:
            digits = self.text[self.i:self.i + _HEX_DIGITS[e]]
            if len(digits) != _HEX_DIGITS[e] or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise self.error(f"bad \\{e} escape")
            self.i += len(digits)
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise self.error(f"\\{e}{digits} is not a character")
            return code
        raise self.error(f"unknown escape \\{e}")

    def string(self, quote: str) -> str:
        out = []
        while self.text[self.i:self.i + 1] != quote:
            out.append(chr(self.char(quote)))
        self.i += 1
        return "".join(out)

    def char_class(self) -> tuple:
        negate = self.text[self.i:self.i + 1] == "^"
        self.i += negate
        ranges = []
        while self.text[self.i:self.i + 1] != "]":
            lo = self.char("]")
            hi = lo
            if self.text[self.i:self.i + 1] == "-" and self.text[self.i + 1:self.i + 2] != "]":
                self.i += 1
                hi = self.char("]")
                if hi < lo:
                    raise self.error("bad range in class")
            ranges.append((lo, hi))
        self.i += 1
        if not ranges:  # (llama.cpp reads [] and [^] as nothing at all)
            raise self.error("an empty class [] or [^]")
        return ranges_node(ranges, negate)


def parse_grammar(text: str) -> dict[str, tuple]:
    """The rules of a GBNF grammar, by name; GuideError naming the line where it is not."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GuideError(f"grammar longer than {MAX_GRAMMAR_CHARS} characters")
    if "::=" not in text:  # (vLLM's test for a Lark grammar)
        text = lark_as_gbnf(text)
    rules = _Parser(text).rules()
    if ROOT not in rules:
        raise GuideError("grammar has no rule 'root' (where the output starts)")
    for name, body in rules.items():
        for ref in _refs(body):
            if ref not in rules:
                raise GuideError(f"grammar: rule {name!r} uses {ref!r}, which is not defined")
    return {name: _as_repetition(name, body) for name, body in rules.items()}


_LARK_RULE = re.compile(r"\??([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)", re.DOTALL)


def lark_as_gbnf(text: str) -> str:
    """A Lark grammar read as vLLM reads one (convert_lark_to_ebnf, for its xgrammar
    backend): a line `name: ...` (`?name` too) starts a rule, a line `| ...` adds an
    alternative, `//` starts a comment; the output starts at `start`, else at the first rule.
    What follows `:` is read as GBNF: `[...]` is a class, not Lark's optional; Lark's regular
    expressions (`/.../`), `%` directives and `~` repetitions are refused. Line for line, so
    that GBNF's errors name the Lark grammar's lines."""
    lines, names = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)//.*$", "", raw).strip()
        if line.startswith("%"):
            raise GuideError(f"grammar (Lark), line {number}: directives such as %import and "
                             "%ignore are not supported")
        if line and not line.startswith(("#", "|")):
            rule = _LARK_RULE.fullmatch(line)
            if rule is None:
                raise GuideError(f"grammar, line {number}: expected a rule, `name ::= ...` "
                                 "(GBNF) or `name: ...` (Lark)")
            names.append(rule.group(1))
            line = f"{rule.group(1)} ::= {rule.group(2)}"
        elif line.startswith("|") and not names:
            raise GuideError(f"grammar, line {number}: an alternative `| ...` before any rule")
        lines.append(line)
    if not names:
        raise GuideError("the grammar has no rules")
    start = "start" if "start" in names else names[0]
    return "\n".join(lines + ([f"{ROOT} ::= {start}"] if start != ROOT else []))


def _refs(node: tuple) -> list[str]:
    kind = node[0]
    if kind == "ref":
        return [node[1]]
    if kind in ("seq", "alt"):
        return [r for item in node[1] for r in _refs(item)]
    if kind == "repeat":
        return _refs(node[1])
    return []


def _as_repetition(name: str, body: tuple) -> tuple:
    """`name ::= P name | name S | B` as `P* B S*` (the language is the same): a rule's
    recursion on itself at an alternative's start or end is a loop, not a nesting."""
    ref = ("ref", name)
    prefixes, suffixes, bases = [], [], []
    for alt in body[1] if body[0] == "alt" else [body]:
        items = alt[1] if alt[0] == "seq" else [alt]
        rest = items[:-1] if items[-1:] == [ref] else items[1:] if items[:1] == [ref] else None
        if rest is not None and name not in _refs(("seq", rest)):
            (prefixes if items[-1:] == [ref] else suffixes).append(("seq", rest))
        else:
            bases.append(alt)
    if not prefixes and not suffixes:
        return body
    if not bases:  # every alternative recurses: it never ends
        return ("alt", [])
    loops = [("repeat", ("alt", p), 0, None) for p in (prefixes, suffixes)]
    return ("seq", [loops[0], ("alt", bases), loops[1]])


class _Expander:
    """Rules inlined from `root`, each open inside itself at most `depth` times; None is a
    part that cannot be written within that bound."""

    def __init__(self, rules: dict[str, tuple], depth: int) -> None:
        self.rules, self.depth, self.open, self.nodes = rules, depth, Counter[str](), 0
        self.recursed = False  # whether a rule was opened inside itself

    def expand(self, node: tuple) -> tuple | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise GuideTooLarge("the grammar is too large to compile (expanded, it passes "
                                f"{MAX_NODES} parts)")
        kind = node[0]
        if kind == "text":
            return text_node(node[1])
        if kind == "class":
            return node[1]
        if kind == "ref":
            name = node[1]
            if self.open[name] >= self.depth:
                return None
            self.recursed |= self.open[name] > 0
            self.open[name] += 1
            try:
                return self.expand(self.rules[name])
            finally:
                self.open[name] -= 1
        if kind == "seq":
            items = [self.expand(item) for item in node[1]]
            return None if any(item is None for item in items) else ("seq", items)
        if kind == "alt":
            branches = [b for b in map(self.expand, node[1]) if b is not None]
            return ("alt", branches) if branches else None
        _, inner, lo, hi = node
        expanded = self.expand(inner)
        if expanded is None:
            return None if lo > 0 else ("seq", [])
        return ("repeat", expanded, lo, hi)


def compile_grammar(text: str) -> ByteDFA:
    """The DFA of what the grammar's `root` writes, its recursion as deep as fits (the
    depths tried within GRAMMAR_SECONDS in all, each within MAX_COMPILE_SECONDS)."""
    rules = parse_grammar(text)
    deadline = time.monotonic() + GRAMMAR_SECONDS
    for depth in range(MAX_RECURSION, 0, -1):
        expander = _Expander(rules, depth)
        try:
            node = expander.expand(("ref", ROOT))
            if node is None:
                raise GuideError(f"the grammar writes nothing within {depth} levels of "
                                 "recursion")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuideError(f"the grammar takes too long to compile (over "
                                 f"{GRAMMAR_SECONDS:g} s, its recursion tried from "
                                 f"{MAX_RECURSION} deep to {depth})")
            return compile_node(node, min(regex.MAX_COMPILE_SECONDS, left))
        except GuideTooLarge:
            if depth == 1 or not expander.recursed:  # (shallower, it would be the same)
                raise
    raise AssertionError("unreachable")
