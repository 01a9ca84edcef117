"""glibc's heap keeps freed memory for reuse under load (server/memory.py).

Each case runs in a fresh interpreter: malloc's thresholds are process-wide and only a process
that has not yet raised them dynamically shows glibc's defaults.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

ROOT = Path(__file__).resolve().parents[2]

# Allocate a 16 MiB block, touch it, free it; report where it lived and what the heap kept.
PROBE = """
import ctypes, json, sys
from server.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
mappings = libc.mallinfo2().hblks
block = libc.malloc(size)
ctypes.memset(block, 1, size)
own_mapping = libc.mallinfo2().hblks - mappings
libc.free(block)
print(json.dumps({"kept": kept, "own_mapping": own_mapping,
                  "free_in_heap": libc.mallinfo2().fordblks >= size}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    return json.loads(out.stdout)


def test_freed_blocks_stay_in_the_heap() -> None:
    # glibc's defaults: a 16 MiB block gets its own mapping and is unmapped when freed...
    assert probe("default") == {"kept": None, "own_mapping": 1, "free_in_heap": False}
    # ...so every step's large tensors faulted their pages in again. Kept: heap, and reused.
    assert probe("keep") == {"kept": True, "own_mapping": 0, "free_in_heap": True}


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
                                 {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={1 << 20}"}])
def test_the_users_malloc_settings_win(env: dict[str, str]) -> None:
    assert probe("keep", **env) == {"kept": False, "own_mapping": 1, "free_in_heap": False}
