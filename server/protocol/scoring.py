"""vLLM's scoring APIs for an embedding model (a bi-encoder): POST /v1/score (text pairs) and
POST /v1/rerank (documents against a query), the score the cosine similarity of the two texts'
embeddings. Not OpenAI's; vLLM's (and Jina's / Cohere's rerank) shapes."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from server.protocol.base import MAX_ITEMS, RequestLimits, ResponseModel
from server.protocol.embeddings import EmbeddingUsage
from server.protocol.requests import PromptTruncation
from server.protocol.responses import random_id

Texts = str | list[str]


class _Scoring(PromptTruncation):
    model: str | None = None

    def texts(self) -> list[str]:
        """Every text to embed, each once, in order of first appearance."""
        raise NotImplementedError

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        self._check_truncation(max_model_len)


class ScoreRequest(_Scoring):
    """POST /v1/score: `text_1` against `text_2`, as vLLM pairs them: one text against each
    of a list (1 to N), or two lists of one length, pair by pair (N to N)."""

    text_1: Texts
    text_2: Texts

    @model_validator(mode="after")
    def _pairs(self) -> ScoreRequest:
        for name in ("text_1", "text_2"):
            value = getattr(self, name)
            if isinstance(value, list) and not 1 <= len(value) <= MAX_ITEMS:
                raise ValueError(f"{name} must hold 1 to {MAX_ITEMS} texts")
        ones = [t] if isinstance(t := self.text_1, str) else t
        twos = [t] if isinstance(t := self.text_2, str) else t
        if len(ones) != 1 and len(ones) != len(twos):
            raise ValueError(f"text_1 holds {len(ones)} texts and text_2 {len(twos)}: give "
                             "text_1 one text, or as many as text_2")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        ones = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        twos = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        return [(ones[0] if len(ones) == 1 else ones[k], two) for k, two in enumerate(twos)]

    def texts(self) -> list[str]:
        return list(dict.fromkeys(text for pair in self.pairs() for text in pair))


class RerankRequest(_Scoring):
    """POST /v1/rerank (also /rerank, /v2/rerank): `documents` by their relevance to
    `query`, the most relevant first; `top_n` of them (0: all)."""

    query: str
    documents: list[str] = Field(min_length=1, max_length=MAX_ITEMS)
    top_n: int = Field(0, ge=0)

    def texts(self) -> list[str]:
        return list(dict.fromkeys([self.query, *self.documents]))


class ScoreData(ResponseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoringUsage(EmbeddingUsage):
    """An embedding's usage, and vLLM's completion_tokens (always 0) beside it."""

    completion_tokens: int = 0


class ScoreResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("score"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: ScoringUsage


class RerankDocument(ResponseModel):
    text: str


class RerankResult(ResponseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("rerank"))
    model: str
    usage: ScoringUsage
    results: list[RerankResult]
