"""Where llama-serve keeps what it makes on first use (the demo model, the CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$LLAMA_SERVE_CACHE`, else `~/.cache/llama-serve`."""
    return Path(os.environ.get("LLAMA_SERVE_CACHE", Path.home() / ".cache" / "llama-serve"))
