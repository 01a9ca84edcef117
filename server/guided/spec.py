"""What a guided request asks for (a JSON schema, any JSON object, a regex, one of some
choices, a grammar) -> a `Guide`: the DFA its output must follow. No torch.

Compiled guides are kept by what they ask (a client sending one schema again and again,
as agents do, compiles it once).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from server.guided.grammar import compile_grammar
from server.guided.json_schema import json_object_pattern, schema_to_regex
from server.guided.regex import ByteDFA, GuideError, Members, compile_regex, literal_pattern

GuideKind = Literal["json", "json_object", "regex", "choice", "grammar"]
CACHED_GUIDES = 64


@dataclass(frozen=True)  # (no slots: the key is cached on the instance)
class GuideSpec:
    """One request's constraint, as sent: a schema (dict), a pattern, choices, a grammar's
    text, or None for json_object; `field` names the request field it came from (errors
    name it)."""

    kind: GuideKind
    value: Any
    field: str

    @cached_property
    def key(self) -> str:
        """What identifies the compiled guide: the kind and the value as JSON (in its own
        order: a schema's property order is the output's)."""
        return f"{self.kind}:{json.dumps(self.value, ensure_ascii=False)}"

    def compile(self) -> ByteDFA:
        """The automaton of what the output must match."""
        if self.kind == "grammar":
            return compile_grammar(self.value)
        return compile_regex(*self.pattern())

    def pattern(self) -> tuple[str, list[Members]]:
        """The regular expression, and its objects' members (compile_regex's)."""
        if self.kind == "regex":
            return self.value, []
        if self.kind == "choice":
            return "(?:" + "|".join(literal_pattern(c) for c in self.value) + ")", []
        if self.kind == "json_object":
            return json_object_pattern()
        return schema_to_regex(self.value)


@dataclass(frozen=True, eq=False, slots=True)
class Guide:
    """A compiled constraint: every output must follow `dfa` (and end only where it accepts).
    Equal by `key`, so that copies (a request sent to the engine process) share caches."""

    key: str
    dfa: ByteDFA

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Guide) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


_cache: OrderedDict[str, Guide] = OrderedDict()
_lock = threading.Lock()
# Where the server compiles guides: one at a time, since compiling is Python (threads side by
# side would share the GIL and add their memory: a large grammar's construction takes a few
# hundred MB), away from the default executor (tokenizing must not wait behind a burst of
# grammars); the same guide asked for twice at once is compiled once, then found
COMPILER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guide-compiler")


def cached_guide(spec: GuideSpec) -> Guide | None:
    """The guide compiled for `spec` before, if it is still kept."""
    with _lock:
        guide = _cache.get(spec.key)
        if guide is not None:
            _cache.move_to_end(spec.key)
        return guide


def compile_guide(spec: GuideSpec) -> Guide:
    """`spec` compiled (or found compiled); GuideError where it cannot be, naming the field.
    Up to regex.py's deadline (3 s), grammar.py's (6 s) for a grammar: callers on an event
    loop run it on COMPILER."""
    if (guide := cached_guide(spec)) is not None:  # (compiled while this one waited)
        return guide
    try:
        guide = Guide(spec.key, spec.compile())
    except GuideError as e:
        raise GuideError(f"{spec.field}: {e}") from None
    except RecursionError:
        raise GuideError(f"{spec.field}: nested too deeply to compile") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # a schema of the wrong shape somewhere the converter did not check it
        raise GuideError(f"{spec.field}: not a schema this server can read ({e!r})") from None
    with _lock:
        _cache[spec.key] = guide
        while len(_cache) > CACHED_GUIDES:
            _cache.popitem(last=False)
    return guide
