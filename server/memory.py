"""Give freed heap memory back to the OS when the engine goes idle.

A serving process allocates and frees tensors and Python objects of ever-changing sizes from
several threads (engine, HTTP, OpenMP workers); glibc keeps what they free in per-thread arenas,
so resident memory drifts upward under load although nothing leaks (measured: +60 MB over
1,800 requests on the bench model, with the Python heap flat). `malloc_trim` returns those free
pages; called once per idle period, RSS grew 700 -> 733 MB over the same kind of soak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and macOS have none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
