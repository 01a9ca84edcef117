"""A JSON Schema -> a regular expression whose matches are JSON text valid for it. No torch.

The approach of outlines (and vLLM's outlines backend): JSON is written compactly, with at
most one space where JSON allows whitespace; an object's properties come in the schema's
order, the required ones always and the others where the model writes them; nesting is
bounded, as a regular language must be (json_object up to OBJECT_DEPTH levels, a free-form
value in a schema FREE_DEPTH, a `$ref` MAX_REF_DEPTH). Objects and lists are members groups
(regex.py), built with each item once.

Supported: `type` (one or a list), `properties` / `required`, `items` / `prefixItems` /
`minItems` / `maxItems`, `enum`, `const`, `anyOf` / `oneOf`, `allOf` of one schema, `$ref`
into `$defs` / `definitions` (or `#`), strings' `minLength` / `maxLength` / `pattern` and the
formats date, time, date-time and uuid. Numeric bounds (`minimum` and the like),
`additionalProperties` of a schema with properties (none are added), and unknown keywords are
not enforced; keywords that cannot be expressed otherwise (`not`, `if`, `patternProperties`)
are refused.
"""

from __future__ import annotations

import json
from typing import Any

from server.guided.regex import JSON_STRING_GROUP, GuideError, Members, literal_pattern

WS = r"[ ]?"
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = "(?:true|false)"
NULL = "null"
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-][0-9]{2}:[0-9]{2})?"
FORMATS = {
    "date": f'"{_DATE}"',
    "time": f'"{_TIME}"',
    "date-time": f'"{_DATE}T{_TIME}"',
    "uuid": r'"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"',
}
# Containers nested in a free-form value: its automaton doubles with each level
OBJECT_DEPTH = 5  # response_format json_object (about 2000 states)
FREE_DEPTH = 3  # a free-form value in a schema ({}, an object without properties: 500-900)
MAX_REF_DEPTH = 4
MAX_COUNT = 1000  # the most repeats a bound (maxLength, maxItems) may ask for
REFUSED = ("not", "if", "then", "else", "patternProperties", "dependentSchemas",
           "unevaluatedProperties")


def json_object_pattern() -> tuple[str, list[Members]]:
    """Any JSON object (response_format json_object), nested up to OBJECT_DEPTH deep."""
    members: list[Members] = []
    return object_of(members, OBJECT_DEPTH), members


def any_json(members: list[Members], depth: int = FREE_DEPTH) -> str:
    """Any JSON value with containers nested up to `depth` deep."""
    scalar = f"{STRING}|{NUMBER}|{BOOLEAN}|{NULL}"
    if depth <= 0:
        return f"(?:{scalar})"
    items = _array(members, any_json(members, depth - 1), 0, None)
    return f"(?:{scalar}|{object_of(members, depth)}|{items})"


def object_of(members: list[Members], depth: int = FREE_DEPTH) -> str:
    """Any JSON object, its values nested up to `depth` - 1 deep."""
    return _any_number(members, r"\{", f"{STRING}{WS}:{WS}{any_json(members, depth - 1)}", r"\}")


def _any_number(members: list[Members], start: str, item: str, end: str) -> str:
    """`start`, any number of `item`s separated by commas, `end` (a members group)."""
    members.append(([(item, "any")], f"{WS},{WS}"))
    return f"{start}{WS}(?M{len(members) - 1}){WS}{end}"


def schema_to_regex(schema: Any) -> tuple[str, list[Members]]:
    """The pattern for `schema` (a dict, or a boolean schema) and its objects' members
    (compile_regex's); GuideError where unsupported."""
    if not isinstance(schema, dict | bool):
        raise GuideError(f"a JSON schema must be an object, got {type(schema).__name__}")
    converter = _Converter(schema)
    return converter.value(schema, 0), converter.members


class _Converter:
    def __init__(self, root: dict | bool) -> None:
        self.root = root
        self.members: list[Members] = []

    def value(self, schema: Any, refs: int) -> str:
        if schema is True or schema == {}:
            return any_json(self.members)
        if schema is False:
            raise GuideError("the schema `false` allows no value")
        if not isinstance(schema, dict):
            raise GuideError(f"a schema must be an object or a boolean, got {schema!r}")
        if refused := [key for key in REFUSED if key in schema]:
            raise GuideError(f"JSON schema keyword {refused[0]!r} is not supported")
        if "$ref" in schema:
            if refs >= MAX_REF_DEPTH:
                raise GuideError(f"$ref nests more than {MAX_REF_DEPTH} deep (a recursive "
                                 "schema cannot be a regular language)")
            return self.value(self.resolve(schema["$ref"]), refs + 1)
        if "const" in schema:
            return literal_pattern(json.dumps(schema["const"], ensure_ascii=False))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise GuideError("`enum` must be a non-empty list")
            return _alt([literal_pattern(json.dumps(v, ensure_ascii=False)) for v in values])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = schema[key]
                if not isinstance(options, list) or not options:
                    raise GuideError(f"`{key}` must be a non-empty list")
                return _alt([self.value(option, refs) for option in options])
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise GuideError("`allOf` is supported with one schema only")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value({**merged, **parts[0]}, refs)
        kind = schema.get("type")
        if kind is None:
            kind = ("object" if "properties" in schema else
                    "array" if "items" in schema or "prefixItems" in schema else None)
        if kind is None:
            return any_json(self.members)
        if isinstance(kind, list):
            if not kind:
                raise GuideError("`type` must not be an empty list")
            return _alt([self.typed(schema, k, refs) for k in kind])
        return self.typed(schema, kind, refs)

    def typed(self, schema: dict, kind: Any, refs: int) -> str:
        if kind == "string":
            return _string(schema)
        if kind == "integer":
            return INTEGER
        if kind == "number":
            return NUMBER
        if kind == "boolean":
            return BOOLEAN
        if kind == "null":
            return NULL
        if kind == "array":
            return self.array(schema, refs)
        if kind == "object":
            return self.object(schema, refs)
        raise GuideError(f"unknown JSON schema type {kind!r}")

    def object(self, schema: dict, refs: int) -> str:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties", True)
        if not properties:
            if extra is False:
                return rf"\{{{WS}\}}"  # no property may be written
            if isinstance(extra, dict) and extra:  # a map: dict[str, X]
                return _any_number(self.members, r"\{",
                                   f"{STRING}{WS}:{WS}{self.value(extra, refs)}", r"\}")
            return object_of(self.members)
        if not isinstance(properties, dict):
            raise GuideError("`properties` must be an object")
        required_list = schema.get("required") or []
        if not isinstance(required_list, list) or not all(
                isinstance(name, str) for name in required_list):
            raise GuideError("`required` must be a list of property names")
        required = set(required_list)
        if unknown := required - properties.keys():
            raise GuideError(f"required properties {sorted(unknown)} are not in `properties`")
        items = [(f'{literal_pattern(json.dumps(name, ensure_ascii=False))}{WS}:{WS}'
                  f'{self.value(sub, refs)}', "one" if name in required else "optional")
                 for name, sub in properties.items()]
        self.members.append((items, f"{WS},{WS}"))
        return rf"\{{{WS}(?M{len(self.members) - 1}){WS}\}}"

    def array(self, schema: dict, refs: int) -> str:
        lo, hi = _bounds(schema, "minItems", "maxItems")
        if "prefixItems" in schema:
            if not isinstance(schema["prefixItems"], list):
                raise GuideError("`prefixItems` must be a list")
            parts = [self.value(s, refs) for s in schema["prefixItems"]]
            if not parts:
                return rf"\[{WS}\]"
            return rf"\[{WS}" + f"{WS},{WS}".join(parts) + rf"{WS}\]"
        return _array(self.members, self.value(schema.get("items", True), refs), lo, hi)

    def resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GuideError(f"only local $ref (#/...) are supported, got {ref!r}")
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise GuideError(f"$ref {ref!r} points at nothing")
            node = node[part]
        return node


def _string(schema: dict) -> str:
    if (fmt := schema.get("format")) in FORMATS:
        return FORMATS[fmt]
    if "pattern" in schema:
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise GuideError("`pattern` must be a string")
        if "(?M" in pattern or "(?J" in pattern:  # this module's own groups (regex.py)
            raise GuideError("(?M...) and (?J...) groups are not supported in `pattern`")
        # A JSON Schema pattern matches anywhere unless anchored; here it is the whole string
        # (outlines' reading). Its characters are kept to what a JSON string holds unescaped.
        pattern = pattern.removeprefix("^")
        body = pattern[:-1]
        if pattern.endswith("$") and (len(body) - len(body.rstrip("\\"))) % 2 == 0:
            pattern = body  # an anchor, not an escaped "$"
        return f'"{JSON_STRING_GROUP}{pattern})"'
    lo, hi = _bounds(schema, "minLength", "maxLength")
    if lo == 0 and hi is None:
        return STRING
    return f'"{STRING_CHAR}{{{lo},{"" if hi is None else hi}}}"'


def _bounds(schema: dict, low: str, high: str) -> tuple[int, int | None]:
    """A (min, max) pair of counts; a max past MAX_COUNT is left unbounded (a regular
    language repeats at most that many times), a min past it refused."""
    lo, hi = schema.get(low, 0), schema.get(high)
    if (not isinstance(lo, int) or isinstance(lo, bool) or lo < 0 or hi is not None and (
            not isinstance(hi, int) or isinstance(hi, bool) or hi < 0)):
        raise GuideError(f"`{low}` / `{high}` must be integers >= 0")
    if lo > MAX_COUNT:
        raise GuideError(f"`{low}` above {MAX_COUNT} is not supported")
    return lo, (hi if hi is None or hi <= MAX_COUNT else None)


def _array(members: list[Members], item: str, lo: int, hi: int | None) -> str:
    if hi is not None and hi < lo or lo < 0:
        raise GuideError(f"bad item counts: minItems {lo}, maxItems {hi}")
    if lo == 0 and hi is None:
        return _any_number(members, r"\[", item, r"\]")
    if hi == 0:
        return rf"\[{WS}\]"
    rest = f"(?:{WS},{WS}{item}){{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
    body = f"{item}{rest}"
    return rf"\[{WS}{body}{WS}\]" if lo > 0 else rf"\[{WS}(?:{body})?{WS}\]"


def _alt(options: list[str]) -> str:
    return "(?:" + "|".join(options) + ")"
