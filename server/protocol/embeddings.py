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

from pydantic import Field, model_validator

from server.protocol.base import (
    MAX_ITEMS,
    RequestError,
    RequestLimits,
    ResponseModel,
    _check_count,
    _check_token_ids,
)
from server.protocol.requests import (
    ChatMessage,
    ChatTemplateControls,
    PromptTruncation,
    prompt_input,
    prompt_list,
    special_tokens_by_form,
)
from server.protocol.responses import random_id

EmbeddingInput = prompt_input("input")  # as completions' prompt: text(s) or token ids


class EmbeddingRequest(PromptTruncation, ChatTemplateControls):
    """POST /v1/embeddings: one embedding per input (a text, or token ids), in order; or,
    vLLM's chat form, one of `messages` rendered by the chat template (its controls as in
    chat, but add_generation_prompt off by default, as vLLM's: the conversation is what is
    embedded, not a turn to answer)."""

    model: str | None = None
    input: EmbeddingInput | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    add_generation_prompt: bool = False
    # vLLM's: the tokenizer's BOS before a text (on), on top of a chat template's own (off)
    add_special_tokens: bool = True

    _default_special_tokens = model_validator(mode="before")(special_tokens_by_form)

    @model_validator(mode="after")
    def _input_xor_messages(self) -> EmbeddingRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("exactly one of 'input' or 'messages' is required")
        return self

    @property
    def inputs(self) -> list[str | list[int]]:
        return [] if self.input is None else prompt_list(self.input)

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        inputs = self.inputs
        _check_count(len(inputs), limits.max_prompts, "input")
        _check_count(len(self.messages or ()), limits.max_messages, "messages")
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
