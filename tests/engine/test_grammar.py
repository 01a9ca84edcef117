"""GBNF grammars -> automata (server/guided/grammar.py): each grammar's language checked
string by string against Python's `re` on an equivalent pattern, over every string of a
small alphabet up to a length; recursion, bounded and as loops; the errors' messages."""

from __future__ import annotations

import itertools
import re

import pytest

from server.guided import grammar, regex
from server.guided.grammar import MAX_RECURSION, compile_grammar
from server.guided.regex import GuideError

JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-7] [0-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''  # llama.cpp's grammars/json.gbnf

def same_language(gbnf: str, pattern: str, alphabet: str, longest: int) -> None:
    dfa = compile_grammar(gbnf)
    for n in range(longest + 1):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            assert dfa.matches(text.encode()) == bool(re.fullmatch(pattern, text)), text


@pytest.mark.parametrize(("gbnf", "pattern", "alphabet"), [
    # strings, classes, groups, quantifiers, comments, a rule over several lines
    ('root ::= ("ab" | [c-e]+)* "x"?  # a comment\n', r"(?:ab|[c-e]+)*x?", "abcex"),
    ('root ::= item{2,3} | "-"{ ,2 }\nitem ::=\n  [ab]\n  "c"', r"(?:[ab]c){2,3}|-{0,2}", "abc-"),
    ("root ::= 'a' . [^a]{1} ws\nws ::= | \" \"", r"a.[^a] ?", "ab "),
    (r'root ::= "\x41\u0042" [\n\t-] "\\"+', r"AB[\n\t-]\\+", "AB\n-\\"),
    ('root ::= x | x "y" x\nx ::= [ab]?', r"[ab]?|[ab]?y[ab]?", "aby"),
    # recursion on itself at an end is a loop: exact, however long
    ('root ::= list\nlist ::= item "," list | item\nitem ::= [ab]+', r"[ab]+(?:,[ab]+)*", "ab,"),
    ('root ::= sum\nsum ::= sum "+" n | n\nn ::= [0-9]', r"[0-9](?:\+[0-9])*", "1+"),
    ('root ::= "b" root | root "a" | "c"', r"b*ca*", "abc"),
])
def test_grammar_language_is_the_patterns(gbnf: str, pattern: str, alphabet: str) -> None:
    same_language(gbnf, pattern, alphabet, 6)


def test_a_loop_of_any_length() -> None:
    dfa = compile_grammar('root ::= item ("," root)?\nitem ::= "x"')  # (recursion in a group)
    assert dfa.matches(b"x" + b",x" * 3)
    dfa = compile_grammar('root ::= list\nlist ::= "x" "," list | "x"')
    assert dfa.matches(b"x" + b",x" * 500) and not dfa.matches(b"x,")


def test_recursion_inside_is_bounded() -> None:
    """Parentheses nest MAX_RECURSION - 1 deep (expr is open once outside them); past that
    the grammar's automaton writes none deeper."""
    dfa = compile_grammar('root ::= expr\nexpr ::= term ("+" term)*\n'
                          'term ::= [0-9] | "(" expr ")"')
    deepest = MAX_RECURSION - 1
    assert dfa.matches(b"(" * deepest + b"1+2" + b")" * deepest)
    assert not dfa.matches(b"(" * (deepest + 1) + b"1" + b")" * (deepest + 1))
    assert dfa.matches(b"(1+(2+3))+4+5+6+7+8+9")


def test_recursion_is_as_deep_as_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's json.gbnf: its indentation counts make a large automaton at depth 4, so
    it compiles at 3 (values inside values inside values). (Time enough for a loaded
    machine: what is tested is the language.)"""
    monkeypatch.setattr(regex, "MAX_COMPILE_SECONDS", 60.0)
    monkeypatch.setattr(grammar, "GRAMMAR_SECONDS", 120.0)
    dfa = compile_grammar(JSON_GBNF)
    assert dfa.matches(b'{"a": [1, {"b": null}], "c": "x\\n"}')
    assert dfa.matches(b'{\n  "a": {\n    "b": true\n  }\n}')
    assert not dfa.matches(b'{"a": [[[1]]]}')  # a 4th value inside
    assert not dfa.matches(b'{"a" 1}') and not dfa.matches(b'[1]')
    monkeypatch.setattr(grammar, "MAX_RECURSION", 2)
    shallower = compile_grammar(JSON_GBNF)
    assert shallower.matches(b'{"a": [1]}') and not shallower.matches(b'{"a": [[1]]}')


def test_too_slow_is_too_large_and_tried_shallower(monkeypatch: pytest.MonkeyPatch) -> None:
    """A depth whose automaton takes too long to build is tried shallower, as one too large
    is (here the first three depths, 5 to 3, time out: parentheses nest once at depth 2)."""
    timeouts = iter(range(3))
    real = grammar.compile_node

    def slow_at_first(node: tuple, seconds: float) -> object:
        if next(timeouts, None) is not None:
            raise regex.GuideTooLarge("the pattern takes too long to compile")
        return real(node, seconds)

    monkeypatch.setattr(grammar, "compile_node", slow_at_first)
    dfa = compile_grammar('root ::= expr\nexpr ::= [0-9] | "(" expr ")"')
    assert dfa.matches(b"(1)") and not dfa.matches(b"((1))")


def test_a_recursive_grammar_too_large_before_any_cut_is_tried_shallower() -> None:
    """Its expansion passes the parts limit while nesting, before the depth bound cuts
    anything: shallower, it fits."""
    b = " | ".join(['"z"'] * 3000)
    dfa = compile_grammar(f'root ::= a\na ::= "(" {"b " * 10}a ")" | "x"\nb ::= {b}')
    assert dfa.matches(b"(" + b"z" * 10 + b"x)") and not dfa.matches(b"(x)")


@pytest.mark.parametrize(("gbnf", "fragment"), [
    ("start 'a'", "expected a rule"),
    ('item ::= "a"', "no rule 'root'"),
    ('root ::= "a" b', "'b', which is not defined"),
    ('root ::= "a"\nroot ::= "b"', "line 2: rule 'root' is defined twice"),
    ('root ::= "a\\q"', "unknown escape \\q"),
    ('root ::= "a', 'missing closing "'),
    ("root ::= [a-", "missing closing ]"),
    ('root ::= ("a"', "missing )"),
    ("root ::= [z-a]", "bad range"),
    ('root ::= "a"{3,1}', "bad repetition"),
    ('root ::= "a"{5000}', "bad repetition"),
    ('root ::= "a"{' + "9" * 5000 + "}", "bad repetition"),
    ("root ::= []", "an empty class"), ("root ::= [^]", "an empty class"),
    (r'root ::= "\uD800"', "is not a character"),
    ("root ::= <think> x", "token references"),
    ('root ::= "a" root', "writes nothing"),  # it never ends
    ('root ::= ! "a"', "unexpected '!'"),
    ("root ::= [ab]* \"a\" [ab]{15}", "too large"),
])
def test_errors_say_what_and_where(gbnf: str, fragment: str) -> None:
    with pytest.raises(GuideError) as info:
        compile_grammar(gbnf)
    assert fragment in str(info.value)


def test_lark_is_read_as_vllm_converts_it() -> None:
    """No `::=`: rules `name: ...` (`?name` too), `| ...` lines adding alternatives, `//`
    comments; from `start`, else from the first rule; a list's self-recursion still a loop."""
    same_language("// greetings\nstart: greeting \"!\"?\n?greeting: 'hi' | \"yo\"\n"
                  "    | 'hey'  // more\n", r"(?:hi|yo|hey)!?", "hiyoe!", 5)
    dfa = compile_grammar("list: item \",\" list\n    | item\nitem: [a-z]")
    assert dfa.matches(b"a" + b",b" * 300) and not dfa.matches(b"a,")
    for lark, fragment in (("start: /[0-9]+/", "regular expressions"),
                           ("start: x\n%import common.WS", "directives"),
                           ("| 'a'", "before any rule"), ("start: 'a'~3", "unexpected '~'"),
                           ("// c\n\nstart: x\nx: 'a' [z-a]", "line 4: bad range")):
        with pytest.raises(GuideError, match=fragment):
            compile_grammar(lark)


def test_characters_past_ascii() -> None:
    dfa = compile_grammar('root ::= [α-γ]+ "→" [\\U0001F600]')
    assert dfa.matches("αγβ→😀".encode()) and not dfa.matches("αδ→😀".encode())
    cjk = compile_grammar("root ::= [\\u4e00-\\u9fff]+ [^\\u00e9\\n]")  # ranges of any size
    assert cjk.matches("日本語ü".encode()) and cjk.matches("中😀".encode())
    assert not cjk.matches("日é".encode()) and not cjk.matches("aü".encode())
