"""A reasoning model's thinking, set apart from its answer (vLLM's `--reasoning-parser`).

`deepseek_r1`: DeepSeek-R1's and its Llama distills' `<think> ... </think>`. Their chat
template opens the thinking in the prompt, so an answer usually starts inside it, with no
`<think>` of its own: everything up to the first `</think>` is reasoning, what follows the
answer's content (an answer that never closes its thinking is all reasoning, no content), as
vLLM's parser splits it. A `<think>` that opens the answer is dropped. Plain text: no tensors,
no tokens (a tag made of several tokens splits the same).
"""

from __future__ import annotations

from dataclasses import dataclass

# --reasoning-parser's choices: the tags that open and close the thinking
REASONING_TAGS = {"deepseek_r1": ("<think>", "</think>")}


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    name: str
    start: str
    end: str

    @classmethod
    def named(cls, name: str) -> ReasoningParser:
        return cls(name, *REASONING_TAGS[name])

    def split(self, text: str) -> tuple[str, str | None]:
        """A whole answer's (reasoning, content); content None where the thinking never
        closed or nothing follows it."""
        text = text.removeprefix(self.start)
        reasoning, closed, content = text.partition(self.end)
        return reasoning, (content or None) if closed else None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


@dataclass(slots=True)
class ReasoningStream:
    """One streamed answer's text, delta by delta, split as `split` splits the whole: what
    may still be the start of a tag is held until the next delta tells."""

    parser: ReasoningParser
    opening: bool = True  # nothing decided yet: the answer may open with the start tag
    in_content: bool = False
    held: str = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) this delta releases; `final`: the answer's last delta (held
        text goes out)."""
        if self.in_content:
            return "", text
        text, self.held = self.held + text, ""
        start, end = self.parser.start, self.parser.end
        if self.opening:
            if start.startswith(text) and text != start and not final:
                self.held = text  # (maybe the start tag, cut across deltas)
                return "", ""
            self.opening = False
            text = text.removeprefix(start)
        reasoning, closed, content = text.partition(end)
        if closed:
            self.in_content = True
            return reasoning, content
        keep = 0 if final else _tag_prefix_at_end(text, end)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], ""


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0: none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

