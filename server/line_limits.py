"""llama.cpp's editor limits on a generation's text, which code-completion plugins (llama.vim,
llama.vscode) send with each /infill: `n_indent` (a completion stays inside the block the
cursor is in) and `t_max_predict_ms` (a slow completion still shows its first lines).

n_indent: past the first line, each line must start with at least n_indent spaces or tabs;
the first other character within them (a newline too: a blank line ends the block, as in
llama.cpp) ends the output, cut just before it. llama.cpp notices it a token later, after
that token went out on a stream; here it is cut before anything of it is sent.
t_max_predict_ms: once the output holds a complete line, it ends at the first token past the
limit, counted from its first token. Both end it as its length does ("length").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class LineLimits:
    """One sequence's state under the limits (n_indent, t_max_predict_ms: 0 is off)."""

    n_indent: int
    t_max_predict_ms: int
    started: float | None = None  # when its first token came (monotonic seconds)
    # Spaces and tabs so far at the start of a line still being checked; None: none is
    indent: int | None = None
    has_new_line: bool = False  # a complete line is out: the time limit applies

    def out_of_time(self, now: float) -> bool:
        """Whether the time limit ends the output at this token (before its text counts)."""
        if self.started is None:
            self.started = now
        return (self.t_max_predict_ms > 0 and self.has_new_line
                and (now - self.started) * 1000 > self.t_max_predict_ms)

    def cut(self, text: str) -> int | None:
        """Where this new text must end (an under-indented line's first character); None:
        all of it stays. The text kept moves the state on."""
        for i, char in enumerate(text):
            if self.indent is not None:
                if char not in " \t":
                    return i
                self.indent += 1
                if self.indent >= self.n_indent:
                    self.indent = None
            elif char == "\n":
                self.has_new_line = True
                if self.n_indent > 0:
                    self.indent = 0
        return None
