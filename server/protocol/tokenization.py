"""vLLM's POST /tokenize and POST /detokenize bodies (not part of OpenAI's API)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from server.protocol.base import (
    MAX_ITEMS,
    OpenAIBaseModel,
    RequestLimits,
    ResponseModel,
    TokenIdList,
    _check_count,
    _check_token_ids,
)
from server.protocol.llamacpp import Prompt, one_prompt
from server.protocol.requests import (
    ChatMessage,
    ChatTemplateControls,
    special_tokens_by_form,
)


class TokenizeRequest(ChatTemplateControls):
    """POST /tokenize: exactly one of `prompt` or chat `messages` (vLLM's two requests in one),
    the latter with the chat template's controls; or llama.cpp's `content` (a text, or token
    ids and texts mixed), answered in llama.cpp's shape.

    `add_special_tokens` defaults to True for a prompt and False for messages, whose chat
    template adds them; llama.cpp's `add_special` (for `content`) to False, as llama.cpp's.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    add_special_tokens: bool = True
    return_token_strs: bool = False  # vLLM's: each token's vocabulary entry as well
    # llama.cpp's form
    content: Annotated[Prompt, BeforeValidator(one_prompt("content"))] | None = None
    add_special: bool = False
    with_pieces: bool = False  # each token as {"id", "piece"}

    _default_special_tokens = model_validator(mode="before")(special_tokens_by_form)

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        given = [self.prompt is not None, self.messages is not None, self.content is not None]
        if sum(given) != 1:
            raise ValueError("exactly one of 'prompt', 'messages' or 'content' (llama.cpp's) "
                             "is required")
        return self

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` where the request exceeds `limits`."""
        _check_count(len(self.messages or ()), limits.max_messages, "messages")
        _check_token_ids((part for part in self.content or () if isinstance(part, int)),
                         vocab_size, "content")


class TokenizeResponse(ResponseModel):
    tokens: list[int]
    token_strs: list[str] | None = None
    count: int
    max_model_len: int


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: TokenIdList

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` for token ids outside the vocabulary."""
        _check_token_ids(self.tokens, vocab_size, "tokens")


class DetokenizeResponse(ResponseModel):
    prompt: str
    content: str  # llama.cpp's name for the same text
