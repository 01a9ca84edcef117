"""Guided decoding: regex -> DFA against Python's `re`, JSON schema -> regex against
documents, token masks against the DFA, and the engine's outputs against their constraints."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

import server.guided.regex as regex_module
from model.tokenizer import Tokenizer
from server.guided.json_schema import json_object_pattern, schema_to_regex
from server.guided.masks import GuideMasks, TokenTable
from server.guided.regex import MAX_DFA_STATES, GuideError, compile_regex, utf8_sequences
from server.guided.spec import COMPILER, Guide, GuideSpec, compile_guide
from server.request import FinishReason, SamplingParams
from tests.engine.conftest import CpuEngine, generate_all, started

PATTERNS = [r"ab*c", r"(a|bc)+d?", r"[0-9]{2,4}", r"\d+(\.\d+)?", r"[^\"\\]*", r"(?:yes|no)",
            r"x{3}", r"[a-c-]+", r"é+|ü", r".*z", r"\w+@\w+\.com", r"[\u00e0-\u00ff]+",
            r"(?P<word>[a-z]+)-x?", r"a{2,}b{0,1}", r"[^a-z]?\s*",
            r"[^é日]+", r"[\u0100-\uffff]+a", r"[^\u00e0-\u00fca]{1,3}", r"[ü-\U0010ffff]*",
            r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"']
ALPHABET = ["a", "b", "c", "d", "z", "x", "0", "1", "9", ".", "-", '"', "\\", "é", "ü", "à",
            "@", " ", "\n", "o", "m", "u", "f", "日", "Ā", "\uffff", "😀", "ÿ"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_dfa_agrees_with_re(pattern: str) -> None:
    """Every string of a random sample (and the ones re finds) matches the DFA exactly
    where `re.fullmatch` does (ASCII classes: \\w and \\d here are ASCII only)."""
    dfa = compile_regex(pattern)
    rng = random.Random(pattern)
    for _ in range(2000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7)))
        expected = re.fullmatch(pattern, text, re.ASCII) is not None
        assert dfa.matches(text.encode()) == expected, (pattern, text)


@pytest.mark.parametrize(("pattern", "why"), [
    ("a\\1", "not supported"), ("(?=a)", "lookarounds"), ("[b-a]", "bad range"),
    ("(a", "unexpected end"), ("a)", "unexpected ')'"), ("a{2000}", "above 1000"),
    ("a++", "possessive"),
    ("a$b", "at the pattern's ends only"), ("a^", "at the pattern's ends only"),
    ("a**", "multiple repeat"), ("a{2}{3}", "multiple repeat"), ("(?M0)", "(?M...)"),
])
def test_unsupported_regexes_are_refused(pattern: str, why: str) -> None:
    with pytest.raises(GuideError, match=re.escape(why)):
        compile_regex(pattern)


def test_a_pattern_too_large_is_refused() -> None:
    """A DFA can be exponential in its pattern: compiling stops at MAX_DFA_STATES."""
    with pytest.raises(GuideError, match=f"passes {MAX_DFA_STATES} states"):
        compile_regex("[ab]*a[ab]{15}")


def test_a_pattern_slow_to_compile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling has a deadline (a small pattern can have a DFA slow to build)."""
    monkeypatch.setattr(regex_module, "MAX_COMPILE_SECONDS", 0.0)
    with pytest.raises(GuideError, match="takes too long to compile"):
        compile_regex("a{3}")


@pytest.mark.parametrize(("pattern", "text", "matches"), [
    ("[^\\W\\d_]+", "é", False), ("[^\\S]", "é", False), ("[^\\W\\d_]+", "abc", True),
    ("a{,2}", "aa", True), ("a{,2}", "aaa", False), ("\\01", "\x01", True),
    ("^ab$", "ab", True), (".", "\ud800", False),
])
def test_regex_corners_read_as_python_reads_them(pattern: str, text: str, matches: bool) -> None:
    data = text.encode("utf-8", "surrogatepass")  # "\ud800": a surrogate, not UTF-8
    assert compile_regex(pattern).matches(data) == matches
    if text != "\ud800":
        assert (re.fullmatch(pattern, text, re.ASCII) is not None) == matches


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    "kind": {"enum": ["a", "b"]},
    "when": {"type": "string", "format": "date"},
    "score": {"type": ["number", "null"]},
    "id": {"$ref": "#/$defs/id"},
}, "required": ["name", "age"], "$defs": {"id": {"type": "string", "format": "uuid"}}}


@pytest.mark.parametrize(("doc", "valid"), [
    ({"name": "bo", "age": 3}, True),
    ({"name": "bo", "age": -30, "kind": "b", "score": None}, True),
    ({"name": "bo", "age": 3, "tags": [], "score": 1.5e3}, True),
    ({"name": "bo", "age": 3, "tags": ["x", "y", "z"], "when": "2024-01-31"}, True),
    ({"name": "bo", "age": 3, "id": "123e4567-e89b-12d3-a456-426614174000"}, True),
    ({"age": 3}, False),  # a required property left out
    ({"name": "bo", "age": 3.5}, False),
    ({"name": "bo", "age": 3, "tags": ["a", "b", "c", "d"]}, False),
    ({"name": "bo", "age": 3, "kind": "c"}, False),
    ({"name": "bo", "age": 3, "when": "2024-13-01"}, False),
    ({"name": "abcdefghijk", "age": 3}, False),
    ({"age": 3, "name": "bo"}, False),  # the schema's order
])
def test_schema_regex_accepts_exactly_its_documents(doc: dict, valid: bool) -> None:
    dfa = compile_regex(*schema_to_regex(PERSON))
    for text in (json.dumps(doc), json.dumps(doc, separators=(",", ":"))):
        assert dfa.matches(text.encode()) == valid, text


@pytest.mark.parametrize(("schema", "good", "bad"), [
    ({"type": "string", "pattern": "^.+$"}, ['"a b"'], ['"a"b"', '"a\\"']),  # JSON stays JSON
    ({"type": "string", "pattern": "^\\d+\\$$"}, ['"12$"'], ['"12"']),  # an escaped $ stays
    ({"type": "object", "additionalProperties": {"type": "integer"}},
     ['{"a": 1, "b": -2}', "{}"], ['{"a": "x"}']),
    ({"type": "object", "properties": {}, "additionalProperties": False}, ["{}"], ['{"a": 1}']),
    ({"type": "string", "maxLength": 5000}, ['"' + "x" * 1200 + '"'], ['"x']),  # unbounded
])
def test_schema_corners(schema: dict, good: list[str], bad: list[str]) -> None:
    dfa = compile_regex(*schema_to_regex(schema))
    assert all(dfa.matches(text.encode()) for text in good)
    assert not any(dfa.matches(text.encode()) for text in bad)


def test_objects_and_lists_grow_linearly() -> None:
    """Each property and each list item is one automaton however many are optional: schemas
    with many optional or free-form properties compile (they passed 20000 states before)."""
    for properties, required in (({k: {} for k in "abcdefgh"}, list("abcdefgh")),
                                 ({k: {} for k in "abc"}, []),
                                 ({f"p{i}": {"type": "string"} for i in range(60)}, [])):
        dfa = compile_regex(*schema_to_regex(
            {"type": "object", "properties": properties, "required": required}))
        assert dfa.num_states < 10_000


def test_any_json_object() -> None:
    dfa = compile_regex(*json_object_pattern())
    for doc in ({}, {"a": 1}, {"a": {"b": [1, 2.5, "x", None, True]}, "c": "é"}):
        assert dfa.matches(json.dumps(doc, ensure_ascii=False).encode())
    for text in ('{"a":}', "[1]", '{"a":1,}', '{"a" 1}', "{'a': 1}", '"x"'):
        assert not dfa.matches(text.encode()), text


@pytest.mark.parametrize(("schema", "why"), [
    ({"not": {"type": "string"}}, "'not'"), ({"type": "tuple"}, "unknown JSON schema type"),
    ({"$ref": "https://example.com/s.json"}, "only local $ref"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, "recursive"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not in `properties`"),
    ({"enum": []}, "non-empty"), (False, "allows no value"), ([1], "must be an object"),
    ({"type": "string", "minLength": -1}, "integers >= 0"),
    ({"type": "object", "properties": {"a": {}}, "required": 5}, "list of property names"),
    ({"type": "array", "prefixItems": 5}, "must be a list"),
])
def test_unsupported_schemas_are_refused(schema: object, why: str) -> None:
    with pytest.raises(GuideError, match=re.escape(why)):
        schema_to_regex(schema)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoint)


def masks_for(tokenizer: Tokenizer, vocab_size: int | None = None) -> GuideMasks:
    size = vocab_size or tokenizer.vocab_size
    return GuideMasks(lambda: TokenTable(tokenizer.token_bytes(range(tokenizer.vocab_size)),
                                         size, tokenizer.special_ids, tokenizer.eos_ids))


def test_masks_allow_exactly_the_tokens_the_dfa_takes(tokenizer: Tokenizer) -> None:
    """At each state of a walk, a token is allowed iff its bytes keep the DFA alive; the
    end only where it accepts; special tokens and the model's padded ids never."""
    guide = compile_guide(GuideSpec("regex", r"(?:hello|help) [0-9]{1,3}!", "test"))
    padded = tokenizer.vocab_size + 8  # a model may pad its embedding past the vocabulary
    masks = masks_for(tokenizer, padded)
    every = tokenizer.token_bytes(range(tokenizer.vocab_size))
    state = 0
    for token_id in tokenizer.encode("help 42!", add_special_tokens=False):
        mask = masks.mask(guide, state)
        assert mask.shape == (padded,) and not mask[tokenizer.vocab_size:].any()
        for i, raw in enumerate(every):
            if i in tokenizer.eos_ids:
                assert bool(mask[i]) == (state in guide.dfa.accepting)
            elif i in tokenizer.special_ids or not raw:
                assert not mask[i]
            else:
                assert bool(mask[i]) == (guide.dfa.walk(state, raw) >= 0), (state, raw)
        assert mask[token_id]
        state = masks.advance(guide, state, token_id)
    assert guide.dfa.is_final(state)
    final = masks.mask(guide, state)
    assert set(final.nonzero().flatten().tolist()) == set(tokenizer.eos_ids)


def test_a_state_no_token_can_leave_allows_the_end() -> None:
    """A pattern the vocabulary cannot write: the end is allowed rather than nothing."""
    table = TokenTable([b"a", b"ab", b"</s>", b"<pad>"], 6, never=frozenset({2, 3}),
                       eos_ids=frozenset({2}))
    masks = GuideMasks(lambda: table)
    guide = compile_guide(GuideSpec("regex", "a(?:c|b)", "test"))
    assert masks.mask(guide, 0).tolist() == [True, True, False, False, False, False]
    after_a = masks.advance(guide, 0, 0)
    assert masks.mask(guide, after_a).tolist() == [False, False, True, False, False, False]
    assert masks.advance(guide, after_a, 3) == after_a  # a special token walks nothing


def test_guides_are_equal_by_what_they_ask() -> None:
    a = compile_guide(GuideSpec("choice", ["x", "y"], "f"))
    b = Guide(a.key, compile_regex("x|y"))
    assert a == b and hash(a) == hash(b)
    assert compile_guide(GuideSpec("choice", ["x", "y"], "g")) is a  # kept: compiled once


# --- the engine --------------------------------------------------------------------------------

BOUNDED = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", None]},
    "n": {"type": "string", "pattern": "[0-9]{2}"}}, "required": ["ok", "kind", "n"]}


def guided(kind: str, value: object, **params: object) -> SamplingParams:
    return SamplingParams(guide=compile_guide(GuideSpec(kind, value, "test")),  # type: ignore[arg-type]
                          **params)  # type: ignore[arg-type]


def test_engine_outputs_follow_their_guides(cpu_engine: CpuEngine) -> None:
    """Greedy and sampled rows, seeded, n > 1, side by side with an unguided row: every guided
    output is complete and matches; the unguided one is not constrained."""
    engine = cpu_engine()
    prompt = engine.tokenizer.encode("The answer is")
    jobs = [
        (prompt, guided("choice", ["yes", "no", "maybe later"], max_tokens=30, temperature=0)),
        (prompt, guided("regex", r"[0-9]{3}-[a-z]{2}", max_tokens=30, temperature=1.0,
                        seed=7, n=2)),
        (prompt, guided("json", BOUNDED, max_tokens=60, temperature=0.8, seed=3)),
        (prompt, SamplingParams(max_tokens=8, temperature=0)),
    ]
    with started(engine):
        outputs = generate_all(engine, jobs)
    texts = {}
    for i, outs in enumerate(outputs):
        for out in outs:
            texts[i, out.index] = texts.get((i, out.index), "") + out.text
        for out in outs:
            if out.finish_reason is not None and i < 3:
                assert out.finish_reason == FinishReason.STOP, (i, texts)
    assert texts[0, 0] in ("yes", "no", "maybe later")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[1, 0]) and re.fullmatch(
        r"[0-9]{3}-[a-z]{2}", texts[1, 1])
    doc = json.loads(texts[2, 0])
    assert list(doc) == ["ok", "kind", "n"] and isinstance(doc["ok"], bool)
    assert doc["kind"] in ("cat", "dog", None) and re.fullmatch("[0-9]{2}", doc["n"])
    assert not re.fullmatch(r"yes|no|maybe later|[0-9]{3}-[a-z]{2}", texts[3, 0])


def test_an_unfinished_guided_output_is_a_prefix_of_a_match(cpu_engine: CpuEngine) -> None:
    """Cut by max_tokens, a JSON object is what the guide allowed so far."""
    engine = cpu_engine(warmup=False)
    guide = compile_guide(GuideSpec("json_object", None, "test"))
    with started(engine):
        (outs,) = generate_all(engine, [(engine.tokenizer.encode("x"),
                                         SamplingParams(max_tokens=12, temperature=0,
                                                        guide=guide))])
    text = "".join(out.text for out in outs)
    assert outs[-1].finish_reason == FinishReason.LENGTH and text.startswith("{")
    assert guide.dfa.walk(0, text.encode()) >= 0, text


def test_min_tokens_gives_way_to_a_complete_guided_output(cpu_engine: CpuEngine) -> None:
    """min_tokens bans the end until then; a guided output complete before that ends anyway
    (its only allowed token is the end), rather than sampling from nothing, and at once (not
    writing ends up to min_tokens)."""
    engine = cpu_engine(warmup=False)
    with started(engine):
        (outs,) = generate_all(engine, [(engine.tokenizer.encode("x"), guided(
            "choice", ["ok"], max_tokens=20, min_tokens=10, temperature=0))])
    assert "".join(out.text for out in outs) == "ok"
    assert outs[-1].finish_reason == FinishReason.STOP
    assert outs[-1].num_output_tokens <= len("ok") + 1  # its tokens and one end, not 10


def test_a_guided_row_left_with_nothing_ends(cpu_engine: CpuEngine) -> None:
    """allowed_token_ids that the guide never takes: the row ends (was a draw from all
    -inf: token 0 again and again)."""
    engine = cpu_engine(warmup=False)
    letter = engine.tokenizer.encode("q", add_special_tokens=False)[-1]
    with started(engine):
        (outs,) = generate_all(engine, [(engine.tokenizer.encode("x"), guided(
            "regex", "[0-9]+", max_tokens=10, temperature=0, allowed_token_ids=(letter,)))])
    assert outs[-1].finish_reason == FinishReason.STOP and outs[-1].num_output_tokens == 1
    assert "".join(out.text for out in outs) == ""


def test_guided_rows_keep_their_masks_across_steps(cpu_engine: CpuEngine) -> None:
    """The sampling controls of a decode step are reused when its rows are the same, but a
    guided row's mask moves with its tokens: a long pattern is followed to its end."""
    engine = cpu_engine(warmup=False)
    pattern = "(?:ab){6}c"
    with started(engine):
        (outs,) = generate_all(engine, [(engine.tokenizer.encode("x"), guided(
            "regex", pattern, max_tokens=40, temperature=1.0, seed=1))])
    assert "".join(out.text for out in outs) == "ababababababc"


@pytest.mark.parametrize(("lo", "hi"), [
    (0x80, 0x7FF), (0x7F0, 0x900), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x4E00, 0x9FFF),
    (0x3FF, 0x401), (0xFFF0, 0x1003F), (0x10000, 0x10FFFF),
])
def test_utf8_sequences_are_the_encodings_of_the_range(lo: int, hi: int) -> None:
    """Each encoding of lo..hi lies in exactly one run, and every run's bytes are some
    character's of the range (checked at each run's corners and a sample inside)."""
    runs = utf8_sequences(lo, hi)

    def runs_holding(data: bytes) -> int:
        return sum(len(run) == len(data)
                   and all(a <= b <= z for (a, z), b in zip(run, data, strict=True))
                   for run in runs)

    step = max(1, (hi - lo) // 5000)
    for code in [*range(lo, hi + 1, step), hi]:
        assert runs_holding(chr(code).encode()) == 1, hex(code)
    for run in runs:
        for corner in (bytes(a for a, _ in run), bytes(z for _, z in run)):
            assert lo <= ord(corner.decode()) <= hi


def test_a_guide_asked_for_at_once_twice_is_compiled_once(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """On the guides' one thread, the second ask finds what the first compiled."""
    calls = []
    real = GuideSpec.compile

    def counted(self: GuideSpec) -> object:
        calls.append(self.key)
        time.sleep(0.2)  # (the second ask is queued meanwhile)
        return real(self)

    monkeypatch.setattr(GuideSpec, "compile", counted)
    spec = GuideSpec("regex", "[a-z]{2}once", "f")
    first, second = (COMPILER.submit(compile_guide, spec) for _ in range(2))
    assert first.result() is second.result() and calls == [spec.key]
