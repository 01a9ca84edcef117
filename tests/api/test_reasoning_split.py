"""The reasoning parser on text alone (server/reasoning.py): a whole answer's split, and a
stream's, delta by delta however the text is cut, the same."""

from __future__ import annotations

import pytest

from server.reasoning import ReasoningParser

R1 = ReasoningParser.named("deepseek_r1")


@pytest.mark.parametrize(("text", "reasoning", "content"), [
    ("Let me see.</think>\n\nIt is 4.", "Let me see.", "\n\nIt is 4."),
    ("<think>Hmm.</think>Yes", "Hmm.", "Yes"),
    ("Still thinking", "Still thinking", None),  # never closed: all reasoning
    ("Done.</think>", "Done.", None),  # nothing after: no content
    ("</think>Only the answer", "", "Only the answer"),
    ("a</think>b</think>c", "a", "b</think>c"),  # the first end tag ends it
    ("x <think>y</think>z", "x <think>y", "z"),  # a start tag only opens the answer
    ("", "", None),
])
def test_a_whole_answer_splits_at_the_first_end_tag(text: str, reasoning: str,
                                                    content: str | None) -> None:
    assert R1.split(text) == (reasoning, content)


@pytest.mark.parametrize("text", [
    "Let me see.</think>\n\nIt is 4.", "<think>Hmm.</think>Yes", "Still thinking",
    "</think>Only the answer", "<thi", "<think>", "a</think>b</think>c", "x </thin", "<",
    "<think", "</think", "a</"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 100])
def test_a_streams_deltas_add_up_to_the_whole_split(text: str, size: int) -> None:
    stream = R1.stream()
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    reasoning, content = "", ""
    for k, piece in enumerate(pieces):
        r, c = stream.feed(piece, final=k == len(pieces) - 1)
        reasoning, content = reasoning + r, content + c
    want_reasoning, want_content = R1.split(text)
    assert (reasoning, content or None) == (want_reasoning, want_content)


def test_nothing_of_a_tag_goes_out_as_text() -> None:
    stream = R1.stream()
    assert stream.feed("<th") == ("", "")  # maybe the start tag
    assert stream.feed("ink>Hm") == ("Hm", "")
    assert stream.feed("m </th") == ("m ", "")  # maybe the end tag
    assert stream.feed("ink>ok") == ("", "ok")
    assert stream.feed(" more") == ("", " more")
