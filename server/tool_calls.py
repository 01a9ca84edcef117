"""Tool calls read from a chat answer's text (no torch, no HTTP): a named tool's arguments,
the list that tool_choice "required" guides, or what `--tool-call-parser` finds in an answer
the model chose to give as calls (tool_choice "auto").
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

# Llama 3.1's tag before a built-in tool's call; custom tools' JSON may follow it too
PYTHON_TAG = "<|python_tag|>"


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


PARSERS = {"llama3_json": llama3_json_calls}


def may_be_calls(text: str) -> bool | None:
    """For streaming under "auto": whether an answer that starts with `text` may be calls
    (hold it back) or is text (stream it); None while it cannot tell yet (only spaces, or a
    start of <|python_tag|>)."""
    head = text.lstrip()
    if not head or (len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head)):
        return None
    return head.startswith(("{", PYTHON_TAG))


def _call(item: Any) -> ParsedCall | None:
    """{"name": ..., "arguments" or "parameters": {...}} (vLLM's keys); None otherwise."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters"))
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))
