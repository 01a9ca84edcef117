"""llama.cpp's editor limits (server/line_limits.py), however the text comes in pieces."""

from __future__ import annotations

import pytest

from server.line_limits import LineLimits

CODE = "x = 1\n    if x:\n\ty\n  \n    z\nw"


def cut_text(pieces: list[str], n_indent: int) -> str:
    limits, out = LineLimits(n_indent, 0), ""
    for piece in pieces:
        cut = limits.cut(piece)
        if cut is not None:
            return out + piece[:cut]
        out += piece
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_an_under_indented_line_ends_the_text_before_its_first_character(size: int) -> None:
    pieces = [CODE[i:i + size] for i in range(0, len(CODE), size)]
    assert cut_text(pieces, 4) == "x = 1\n    if x:\n\t"  # a tab counts one, as a space
    assert cut_text(pieces, 1) == "x = 1\n    if x:\n\ty\n  \n    z\n"
    assert cut_text(pieces, 2) == "x = 1\n    if x:\n\t"
    assert cut_text(pieces, 0) == CODE
    assert cut_text(["a\n\nb"], 1) == "a\n"  # a blank line ends it
    assert cut_text(["a\n  ", "\n  b"], 3) == "a\n  "  # one of spaces alone too


def test_the_time_limit_waits_for_a_complete_line() -> None:
    limits = LineLimits(0, 100)
    assert not limits.out_of_time(10.0)  # (the first token starts the clock)
    assert limits.cut("def f():") is None and not limits.out_of_time(10.5)
    assert limits.cut("\n") is None
    assert not limits.out_of_time(10.05) and limits.out_of_time(10.2)
    assert not LineLimits(0, 0).out_of_time(99.0)
