"""Embeddings on top of the engine: each input becomes a prompt-only engine request
(max_tokens 0) whose final hidden states the runner pools. No FastAPI and no tensors here."""

from __future__ import annotations

import math

from server.engine_front import EngineFront
from server.protocol.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    encode_embedding,
)
from server.protocol.llamacpp import LlamaCppEmbeddingRequest, normalized
from server.protocol.scoring import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoringUsage,
)
from server.request import Pooling, SamplingParams
from server.serving import Submitted, encode_messages, merged, model_of, raise_if_failed


class EmbeddingsAborted(RuntimeError):
    """The request ended before its vectors were made (HTTP 503, code "draining")."""


class EmbeddingService:
    """/v1/embeddings: inputs tokenized (and truncated), queued as pooling requests, their
    vectors gathered in order."""

    def __init__(self, engine: EngineFront, model_name: str, pooling: Pooling,
                 trust_request_templates: bool = False) -> None:
        self.engine, self.model_name = engine, model_name
        self.params = SamplingParams(max_tokens=0, pooling=pooling)
        self.trust_request_templates = trust_request_templates

    def prompts(self, request: EmbeddingRequest) -> list[tuple[list[int], str | None]]:
        """Each input's ids, or the messages' as the chat template renders them (the last
        truncate_prompt_tokens, where asked)."""
        keep = request.prompt_tokens_kept(self.engine.max_model_len)
        if request.messages is not None:
            ids = encode_messages(self.engine.tokenizer, request.messages, request,
                                  request.add_special_tokens, self.trust_request_templates)
            return [(ids[-keep:] if keep is not None else ids, None)]
        out: list[tuple[list[int], str | None]] = []
        for text in request.inputs:
            ids = (self.engine.tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
                   if isinstance(text, str) else list(text))
            out.append((ids[-keep:] if keep is not None else ids, None))
        return out

    def text_prompts(self, request: ScoreRequest | RerankRequest
                     ) -> list[tuple[list[int], str | None]]:
        """The ids of each text a score or a rerank embeds (once each, BOS first)."""
        keep = request.prompt_tokens_kept(self.engine.max_model_len)
        out: list[tuple[list[int], str | None]] = []
        for text in request.texts():
            ids = self.engine.tokenizer.encode(text, add_special_tokens=True)
            out.append((ids[-keep:] if keep is not None else ids, None))
        return out

    async def _vectors(self, submitted: list[Submitted]) -> list[list[float]]:
        """Each prompt's embedding, in order."""
        vectors: dict[int, list[float]] = {}
        async for i, out in merged(self.engine, submitted):
            raise_if_failed(out)
            if out.embedding is not None:
                vectors[i] = out.embedding
        if len(vectors) < len(submitted):  # aborted: the server is shutting down
            raise EmbeddingsAborted("the server is shutting down: retry on another replica")
        return [vectors[i] for i in range(len(submitted))]

    async def create(self, request: EmbeddingRequest, submitted: list[Submitted],
                     response_id: str) -> EmbeddingResponse:
        vectors = await self._vectors(submitted)
        data = [Embedding(index=i, embedding=encode_embedding(vector, request.encoding_format))
                for i, vector in enumerate(vectors)]
        tokens = sum(len(s.prompt_ids) for s in submitted)
        return EmbeddingResponse(id=response_id, model=model_of(submitted, self.model_name),
                                 data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def llamacpp(self, request: LlamaCppEmbeddingRequest, submitted: list[Submitted],
                       response_id: str) -> list[dict[str, object]]:
        """llama.cpp's /embedding answer: a list, each prompt's vector (in a list: a pooled
        model's one) under its normalization."""
        vectors = await self._vectors(submitted)
        return [{"index": i, "embedding": [normalized(vector, request.embd_normalize)]}
                for i, vector in enumerate(vectors)]

    async def _similarities(self, request: ScoreRequest | RerankRequest,
                            submitted: list[Submitted]
                            ) -> tuple[dict[str, list[float]], ScoringUsage]:
        """Each text's embedding (unit length: a dot product is the cosine), and the usage."""
        vectors = dict(zip(request.texts(), await self._vectors(submitted), strict=True))
        tokens = sum(len(s.prompt_ids) for s in submitted)
        return vectors, ScoringUsage(prompt_tokens=tokens, total_tokens=tokens)

    async def score(self, request: ScoreRequest, submitted: list[Submitted],
                    response_id: str) -> ScoreResponse:
        """vLLM's score of an embedding model: each pair's cosine similarity."""
        vectors, usage = await self._similarities(request, submitted)
        data = [ScoreData(index=k, score=_dot(vectors[a], vectors[b]))
                for k, (a, b) in enumerate(request.pairs())]
        return ScoreResponse(id=response_id, model=model_of(submitted, self.model_name),
                             data=data, usage=usage)

    async def rerank(self, request: RerankRequest, submitted: list[Submitted],
                     response_id: str) -> RerankResponse:
        """The documents by cosine similarity to the query, the highest first (top_n)."""
        vectors, usage = await self._similarities(request, submitted)
        query = vectors[request.query]
        results = sorted((RerankResult(index=k, document=RerankDocument(text=doc),
                                       relevance_score=_dot(query, vectors[doc]))
                          for k, doc in enumerate(request.documents)),
                         key=lambda r: -r.relevance_score)
        return RerankResponse(id=response_id, model=model_of(submitted, self.model_name),
                              usage=usage, results=results[:request.top_n or None])


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))
