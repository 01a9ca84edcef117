"""vLLM's POST /tokenize and POST /detokenize bodies (not part of OpenAI's API)."""

from __future__ import annotations

from pydantic import Field, model_validator

from server.protocol.base import (
    MAX_ITEMS,
    OpenAIBaseModel,
    RequestLimits,
    ResponseModel,
    TokenIdList,
    _check_count,
    _check_token_ids,
)
from server.protocol.requests import (
    ChatMessage,
    ChatTemplateControls,
    special_tokens_by_form,
)


class TokenizeRequest(ChatTemplateControls):
    """POST /tokenize: exactly one of `prompt` or chat `messages` (vLLM's two requests in one),
    the latter with the chat template's controls.

    `add_special_tokens` defaults to True for a prompt and False for messages, whose chat
    template adds them.
    """

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_ITEMS)
    add_special_tokens: bool = True
    return_token_strs: bool = False  # vLLM's: each token's vocabulary entry as well

    _default_special_tokens = model_validator(mode="before")(special_tokens_by_form)

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        return self

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` where the request exceeds `limits`."""
        _check_count(len(self.messages or ()), limits.max_messages, "messages")


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
