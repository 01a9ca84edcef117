"""Tool calls read from a chat answer's text (no torch, no HTTP): a named tool's arguments,
the list that tool_choice "required" guides, or what `--tool-call-parser` finds in an answer
the model chose to give as calls (tool_choice "auto"): vLLM's parsers for the Llama family,
each reading an answer that is calls, or, for hermes, text and then calls.
"""

from __future__ import annotations

import ast
import json
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.guided.regex import ByteDFA, compile_regex

# Llama 3.1's tag before a built-in tool's call; custom tools' JSON may follow it too
PYTHON_TAG = "<|python_tag|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"  # Llama 4's, around calls


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def tool_call_id() -> str:
    """vLLM's form of a call's id."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def named_call(name: str, text: str) -> list[ParsedCall]:
    """tool_choice naming a tool: the whole answer is its arguments (guided by its schema)."""
    return [ParsedCall(name, text)]


def required_calls(text: str) -> list[ParsedCall] | None:
    """tool_choice "required": the answer is a JSON list of {"name", "parameters"} (guided);
    None where it is not one (cut by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(item) for item in items]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]


def llama3_json_calls(text: str) -> list[ParsedCall] | None:
    """vLLM's llama3_json parser: the answer is one or more JSON objects with "name" and
    "parameters" (or "arguments"), separated by ";", maybe after <|python_tag|>. None where it
    is anything else: the answer is text."""
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith("{"):
        return None
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(rest):
        try:
            item, at = decoder.raw_decode(rest, at)
        except ValueError:
            return None
        call = _call(item)
        if call is None:
            return None
        calls.append(call)
        while at < len(rest) and (rest[at].isspace() or rest[at] == ";"):
            at += 1
    return calls


def pythonic_calls(text: str) -> list[ParsedCall] | None:
    """vLLM's pythonic parser (Llama 3.2's and Llama 4's format): a Python list of calls with
    literal keyword arguments, `[get_weather(city="Paris", days=3), now()]`, maybe between
    <|python_start|> and <|python_end|>. Read with `ast`, never run."""
    rest = text.strip().removeprefix(PYTHON_START).removesuffix(PYTHON_END).strip()
    if not rest.startswith("["):
        return None
    try:
        with warnings.catch_warnings():  # (an invalid escape, "\\d", warns on every parse)
            warnings.simplefilter("ignore")
            tree = ast.parse(rest, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        names = [kw.arg for kw in node.keywords]
        if len(set(names)) != len(names):  # f(a=1, a=2): Python refuses it too
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            if None in arguments:  # a **mapping
                return None
            calls.append(ParsedCall(node.func.id, json.dumps(arguments, ensure_ascii=False,
                                                             allow_nan=False)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None  # not a literal, or not JSON's (a set, bytes, a complex, inf)
    return calls


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def hermes_calls(text: str) -> list[ParsedCall] | None:
    """vLLM's hermes parser (Hermes 3, a Llama 3.1): `<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>`, one block a call, nothing but space between them (text before the
    first block is the parser's `after_text` split). (Read by `find`, not a lazy regex: that
    is quadratic in unclosed blocks.)"""
    rest, calls, at = text.strip(), [], 0
    while at < len(rest):
        start = rest.find(HERMES_OPEN, at)
        if start < 0 or rest[at:start].strip():
            return None
        end = rest.find(HERMES_CLOSE, start)
        if end < 0:
            return None
        try:
            call = _call(json.loads(rest[start + len(HERMES_OPEN):end]))
        except ValueError:
            return None
        if call is None:
            return None
        calls.append(call)
        at = end + len(HERMES_CLOSE)  # (space up to the next block: the next find's)
    return calls or None


@dataclass(frozen=True)
class ToolParser:
    """How a model writes calls: `parse` reads calls (None: it is text); an answer whose
    start (spaces left out) matches `opening`, a regex, may be calls. With `after_text`, the
    literal that opens calls, text may come first: the calls are read from there on (vLLM's
    hermes takes the text before its first <tool_call> as the content). `special_tokens`:
    the calls' tags are special tokens, kept in the text for the parser (vLLM's
    adjust_request)."""

    parse: Callable[[str], list[ParsedCall] | None]
    opening: str
    special_tokens: bool = False
    after_text: str | None = None
    _opening: ByteDFA = field(init=False, repr=False)  # `opening`, then anything

    def __post_init__(self) -> None:
        object.__setattr__(self, "_opening", compile_regex(f"(?:{self.opening})[\\s\\S]*"))

    def read(self, text: str) -> tuple[str | None, list[ParsedCall] | None]:
        """An answer's content and calls: (text, None) where it holds none; (None or the
        text before them, calls) where it does."""
        start = text.find(self.after_text) if self.after_text is not None else 0
        calls = self.parse(text[start:]) if start >= 0 else None
        if calls is None:
            return text, None
        return text[:start] or None, calls

    def calls_start(self, text: str, since: int = 0) -> int | None:
        """For streaming an answer whose calls may follow text: where they open, searching
        from `since` on (None: not yet; so far it is all text)."""
        assert self.after_text is not None
        start = text.find(self.after_text, max(since - len(self.after_text) + 1, 0))
        return start if start >= 0 else None

    def opening_tail(self, text: str) -> int:
        """How many of `text`'s last characters may begin `after_text` (held back while it
        streams: the next token may complete the opening)."""
        assert self.after_text is not None
        for size in range(min(len(self.after_text) - 1, len(text)), 0, -1):
            if self.after_text.startswith(text[-size:]):
                return size
        return 0

    def may_be_calls(self, text: str) -> bool | None:
        """For streaming: whether an answer that starts with `text` may be calls (hold it
        back) or is text (stream it); None while it cannot tell yet (only spaces, or a start
        of an opening: `<|python` for llama3_json, `[get_` for pythonic)."""
        head = text.lstrip()
        state = self._opening.walk(0, head.encode())
        if state < 0:
            return False
        return True if state in self._opening.accepting else None


PARSERS = {
    "llama3_json": ToolParser(llama3_json_calls, r"\{|<\|python_tag\|>"),
    "pythonic": ToolParser(pythonic_calls,  # a list's first call, maybe in Llama 4's tags
                           r"(?:<\|python_start\|>)?\s*\[\s*[A-Za-z_]\w*\("),
    "hermes": ToolParser(hermes_calls, HERMES_OPEN, special_tokens=True,  # (no regex signs)
                         after_text=HERMES_OPEN),
}
# vLLM's names for Llama 4's formats, the same as far as a Llama-architecture model writes
PARSERS |= {"llama4_json": PARSERS["llama3_json"], "llama4_pythonic": PARSERS["pythonic"]}


def _call(item: Any) -> ParsedCall | None:
    """{"name": ..., "arguments" or "parameters": {...}} (vLLM's keys); None otherwise."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))
