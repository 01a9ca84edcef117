"""Embeddings on top of the engine: each input becomes a prompt-only engine request
(max_tokens 0) whose final hidden states the runner pools. No FastAPI and no tensors here."""

from __future__ import annotations

from server.engine_front import EngineFront
from server.protocol.embeddings import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    encode_embedding,
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

    async def create(self, request: EmbeddingRequest, submitted: list[Submitted],
                     response_id: str) -> EmbeddingResponse:
        vectors: dict[int, list[float]] = {}
        async for i, out in merged(self.engine, submitted):
            raise_if_failed(out)
            if out.embedding is not None:
                vectors[i] = out.embedding
        if len(vectors) < len(submitted):  # aborted: the server is shutting down
            raise EmbeddingsAborted("the server is shutting down: retry on another replica")
        data = [Embedding(index=i, embedding=encode_embedding(vectors[i],
                                                              request.encoding_format))
                for i in range(len(submitted))]
        tokens = sum(len(s.prompt_ids) for s in submitted)
        return EmbeddingResponse(id=response_id, model=model_of(submitted, self.model_name),
                                 data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
