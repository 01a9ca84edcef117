"""Text -> ids with the `tokenizers` library, without stalling other threads on long texts.
No torch."""

from __future__ import annotations

from tokenizers import Tokenizer as Backend

# Texts longer than this are encoded without holding the GIL; shorter ones take the call
# with less overhead. About 10 ms of encoding.
LONG_TEXT_CHARS = 16_384


def encode_ids(backend: Backend, text: str, add_special_tokens: bool) -> list[int]:
    """`backend`'s ids of `text`. A long text goes through `encode_batch`, which releases the
    GIL while it works (`encode` holds it: 2.4 s for a 4 MB prompt, every other thread
    stopped: the event loop's streams, the engine's step)."""
    if len(text) > LONG_TEXT_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids
