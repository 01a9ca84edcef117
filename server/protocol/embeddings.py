"""OpenAI's embeddings (POST /v1/embeddings): the request and the response.

A served chat model gives embeddings as vLLM's pooling runner gives them for a decoder model
(`--runner pooling --convert embed`): the final normalized hidden state of a prompt's last
token (or the mean of every token's, `--pooling mean`), scaled to unit length. Here the
server generates as well; embeddings are on with --enable-embeddings.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Literal

from pydantic import Field

from server.protocol.base import (
    RequestError,
    RequestLimits,
    ResponseModel,
    _check_count,
    _check_token_ids,
)
from server.protocol.requests import PromptTruncation, prompt_input, prompt_list
from server.protocol.responses import random_id

EmbeddingInput = prompt_input("input")  # as completions' prompt: text(s) or token ids


class EmbeddingRequest(PromptTruncation):
    """POST /v1/embeddings: one embedding per input (a text, or token ids), in order."""

    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS before a text

    @property
    def inputs(self) -> list[str | list[int]]:
        return prompt_list(self.input)

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        inputs = self.inputs
        _check_count(len(inputs), limits.max_prompts, "input")
        for prompt in inputs:
            if not isinstance(prompt, str):
                _check_token_ids(prompt, vocab_size, "input")
        self._check_truncation(max_model_len)
        if self.dimensions is not None:  # (vLLM: its matryoshka models only)
            raise RequestError("dimensions: this model's embeddings have one size (it is no "
                               "matryoshka model); leave dimensions out", "dimensions")


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends it: floats, or base64 of little-endian float32 (what its SDKs read)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


class Embedding(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("embd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage
