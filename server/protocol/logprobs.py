"""Logprobs in OpenAI's two shapes: the legacy completions one and chat's per-token one.

Token texts come decoded from the caller, who owns the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pydantic import Field

from server.protocol.base import ResponseModel
from server.request import TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same floor


class CompletionLogprobs(ResponseModel):
    """Legacy completions shape; an echoed first prompt token has null logprobs."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(ResponseModel):
    content: list[ChatCompletionTokenLogprob] | None = None


def _clamp(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # -inf and NaN -> floor


def logprob_token_ids(logprobs: Iterable[TokenLogprob | None]) -> set[int]:
    """Every token id (chosen and alternatives) whose text the builders will look up."""
    ids: set[int] = set()
    for entry in logprobs:
        if entry is not None:
            ids.add(entry.token_id)
            ids.update(token_id for token_id, _ in entry.top)
    return ids


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob | None],
    token_texts: Mapping[int, str],
    text_offsets: Sequence[int],
) -> CompletionLogprobs:
    """The completions shape for `token_ids` (prompt ids first when echoing), each starting
    at its `text_offsets` entry in the text returned (the serving layer counts them).
    `top_logprobs` holds the chosen token and its alternatives, so up to logprobs + 1
    entries (vLLM's documented behaviour)."""
    if not len(token_ids) == len(logprobs) == len(text_offsets):
        raise ValueError(f"{len(token_ids)} token ids, {len(logprobs)} logprobs and "
                         f"{len(text_offsets)} offsets")
    result = CompletionLogprobs(text_offset=list(text_offsets))
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        text = token_texts[token_id]
        result.tokens.append(text)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(_clamp(entry.logprob))
        top = {text: _clamp(entry.logprob)}
        for alt_id, alt_logprob in entry.top:
            top.setdefault(token_texts[alt_id], _clamp(alt_logprob))
        result.top_logprobs.append(top)
    return result


class PromptLogprob(ResponseModel):
    """vLLM's prompt_logprobs entry for a token: its logprob, its rank in the vocabulary
    (1: the likeliest), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


def prompt_logprobs(logprobs: Sequence[TokenLogprob | None], num_top: int,
                    token_texts: Mapping[int, str]) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token (the first: null, nothing comes before it)
    {token id: entry} for the token itself, with its rank, and the `num_top` likeliest
    (ranks 1, 2, ...; the token's own entry is theirs where it is among them), as vLLM's."""
    result: PromptLogprobs = []
    for entry in logprobs:
        if entry is None:
            result.append(None)
            continue
        position = {str(entry.token_id): PromptLogprob(
            logprob=_clamp(entry.logprob), rank=entry.rank,
            decoded_token=token_texts[entry.token_id])}
        for rank, (token_id, logprob) in enumerate(entry.top[:num_top], start=1):
            position[str(token_id)] = PromptLogprob(logprob=_clamp(logprob), rank=rank,
                                                    decoded_token=token_texts[token_id])
        result.append(position)
    return result


def chat_logprobs(
    logprobs: Sequence[TokenLogprob], token_texts: Mapping[int, str],
    token_bytes: Mapping[int, bytes],
) -> ChatCompletionLogprobs:
    """The chat shape: per token its text, logprob, bytes and top alternatives. `token_bytes`
    are the tokens' own bytes (a byte token's raw byte, where its text is "\ufffd")."""
    content = []
    for entry in logprobs:
        top = [TopLogprob(token=token_texts[i], logprob=_clamp(lp), bytes=list(token_bytes[i]))
               for i, lp in entry.top]
        content.append(ChatCompletionTokenLogprob(
            token=token_texts[entry.token_id], logprob=_clamp(entry.logprob),
            bytes=list(token_bytes[entry.token_id]), top_logprobs=top))
    return ChatCompletionLogprobs(content=content)
