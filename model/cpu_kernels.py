"""C kernels for the packed CPU float32 path, built on first use and loaded with ctypes.

Outside the matmuls a decode step was mostly small PyTorch ops and attention. `cpu_kernels.c`
replaces the costliest: decode attention (SDPA's fused CPU kernel read K and V at about 12
GB/s; a plain loop over (row, kv head) reads them about twice as fast), rotary + the K/V store
(a dozen ops) and RMSNorm with its residual add (one pass instead of about seven). Bench
model, decode step at 1 / 4 / 16 / 64 rows: 12-18% faster; a 256-token prefill step 8%.

The matmuls too, where the build has AVX-512 (`linear_is_tuned`): oneDNN's kernels for a few
rows read the weights well below the memory's read bandwidth, and a decode step is mostly that
read. `linear` streams each weight panel once per tile of up to 12 rows. With the other kernels
on, decode step at 1 / 4 / 16 / 64 rows: another 20-36 / 25-31 / 14-17 / 3-4% faster than with
oneDNN's linears; prefill equal. And the sampler's draw for rows without top-k, top-p or
min-p (`sample`, used by server/sampling.py): softmax and the inverse-CDF search in one pass
per row, 3x faster than the PyTorch ops; and greedy rows' argmax (`argmax`). A decode-only
step runs its embedding and layers in one call (`decode_layers`, from LlamaModel's forward):
the same kernels without a return to Python, and the GIL, between them. Packed weights live in
2 MB pages where the OS has them (`fresh_floats`).

The source is compiled with the system's C compiler (`$CC`, else `cc`) and `-march=native`,
so the library is cached per source, compiler and CPU under `$LLAMA_SERVE_CACHE/kernels`
(default `~/.cache/llama-serve/kernels`). Only its OpenMP runtime must be torch's: the kernels
are used only where torch already loaded a libgomp, which the library then shares (two
runtimes would each keep a pool of threads on the same cores). A machine without a compiler
can run libraries prebuilt elsewhere for portable x86-64 levels (`prebuild`; the Docker image
ships them): `$LLAMA_SERVE_PREBUILT_KERNELS` names their folder. With neither, `load()` returns
None and the model runs oneDNN's linears and PyTorch's ops, as it does with
`--no-cpu-kernels`.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from model.attention import check_decode_attention_args, check_rope_store_args
from model.cache import cache_root

logger = logging.getLogger("llama_serve")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -ffp-contract=fast: ISO C mode would otherwise forbid fused multiply-adds (the linear kernel
# measured 27-36% slower at 16-256 rows with separate multiplies and adds). With NATIVE, or a
# portable -march when prebuilt.
CFLAGS = ("-O3", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")
NATIVE = "-march=native"

Tensor = torch.Tensor
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
HUGE_PAGE = 2 << 20  # x86-64's and arm64's (with 4 KB base pages) transparent huge page


def fresh_floats(n: int) -> Tensor:
    """n float32 zeros in a fresh anonymous mapping, starting on a 2 MB boundary, its whole
    2 MB pages advised for transparent huge pages where the OS has them (Linux's default mode
    backs advised memory only).

    For packed weights: a decode step streams every weight once, and with 4 KB pages that is a
    TLB miss every 4 KB. The bench model's decode step with its packed weights in 2 MB pages
    (medians, alternating with a 4 KB-page copy in one process, four runs): 1-8 / 3-5 / 3-6 /
    0-1% faster at 1 / 4 / 16 / 64 rows.
    The advice must come before the pages are first written, hence a fresh mapping rather
    than the allocator's (possibly reused) memory. The slack before the boundary is never
    touched, so it costs address space, not memory."""
    size = n * 4 + HUGE_PAGE
    # Private: shared anonymous memory is shmem, which transparent huge pages leave alone.
    buffer = (mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
              if hasattr(mmap, "MAP_PRIVATE") else mmap.mmap(-1, size))
    address = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()
    skip = -address % HUGE_PAGE  # bytes up to the next boundary
    whole = n * 4 // HUGE_PAGE * HUGE_PAGE
    if whole and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE, skip, whole)
        except OSError:  # a kernel without transparent huge pages: ordinary pages then
            pass
    return torch.frombuffer(buffer, dtype=torch.float32, count=n, offset=skip)


class DecodeLayer(ctypes.Structure):
    """One decoder layer for `decode_layers`: its norms' weights, its packed linears and its
    K and V caches, as addresses (cpu_kernels.c's DecodeLayer)."""

    _fields_ = [(name, _P) for name in ("input_norm", "qkv", "o", "post_norm", "gate_up",
                                        "down", "k_cache", "v_cache")]


class DecodeShape(ctypes.Structure):
    _fields_ = [*((name, _I64) for name in ("n_layers", "dim", "n_heads", "n_kv_heads",
                                             "head_dim", "hidden", "n_slots", "max_len",
                                             "vocab")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class DecodeTables(ctypes.Structure):
    """The model-wide tables of `decode_layers`, as addresses: the embedding (vocab, dim), the
    final norm's weight, and cos and sin (max_len, head_dim) with position p's angles in row p."""

    _fields_ = [(name, _P) for name in ("embed", "final_norm", "cos", "sin")]


@dataclass
class DecodeModel:
    """What `CpuKernels.decode_layers` runs: a model's layers over one KV-cache pool. The
    tensors are kept here so that the addresses in `layers` and `tables` stay valid."""

    layers: ctypes.Array[DecodeLayer]
    shape: DecodeShape
    tables: DecodeTables
    tensors: list[Tensor]


class CpuKernels:
    """The loaded library's functions, each checking what the C code takes on trust."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._decode_attention = library.decode_attention
        self._decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64,
                                           _I64, _I64, ctypes.c_float, _P, ctypes.c_int]
        self._decode_attention.restype = _I64
        self._add_rms_norm = library.add_rms_norm
        self._add_rms_norm.argtypes = [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64,
                                       ctypes.c_float, ctypes.c_int]
        self._add_rms_norm.restype = None
        self._rope_store = library.rope_store
        self._rope_store.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                     _I64, _I64, ctypes.c_int]
        self._rope_store.restype = _I64
        self._pack_linear_weight = library.pack_linear_weight
        self._pack_linear_weight.argtypes = [_P, _P, _I64, _I64, ctypes.c_int]
        self._pack_linear_weight.restype = None
        self._linear = library.linear
        self._linear.argtypes = [_P, _I64, _P, _P, _I64, _I64, _I64, ctypes.c_int]
        self._linear.restype = None
        self._linear_argmax = library.linear_argmax
        self._linear_argmax.argtypes = [_P, _I64, _P, _P, _I64, _I64, _I64, ctypes.c_int, _P,
                                        _P]
        self._linear_argmax.restype = None
        self._linear_argmax_scratch_bytes = library.linear_argmax_scratch_bytes
        self._linear_argmax_scratch_bytes.argtypes = [_I64, ctypes.c_int]
        self._linear_argmax_scratch_bytes.restype = _I64
        # The last `linear(keep_argmax=True)` output (weakly: a prompt-logprobs chunk's
        # logits are not kept alive) and its rows' argmax: `argmax` of that very tensor
        # answers from it, once.
        self._kept_argmax: tuple[weakref.ref[Tensor], Tensor] | None = None
        self._sample_rows = library.sample_rows
        self._sample_rows.argtypes = [_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_int]
        self._sample_rows.restype = None
        self._argmax_rows = library.argmax_rows
        self._argmax_rows.argtypes = [_P, _P, _I64, _I64, ctypes.c_int]
        self._argmax_rows.restype = None
        self._silu_mul = library.silu_mul
        self._silu_mul.argtypes = [_P, _P, _I64, _I64, ctypes.c_int]
        self._silu_mul.restype = None
        self._decode_layers = library.decode_layers
        self._decode_layers.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P,
                                        ctypes.c_int]
        self._decode_layers.restype = _I64
        self._decode_scratch_floats = library.decode_scratch_floats
        self._decode_scratch_floats.argtypes = [_P, _I64, _I64, ctypes.c_int]
        self._decode_scratch_floats.restype = _I64
        for constant in (library.linear_panel_width, library.linear_is_tuned,
                         library.sample_block):
            constant.restype = _I64
        self.panel_width = library.linear_panel_width()
        self._sample_block = library.sample_block()  # tokens per block of `sample`'s search
        # Whether `linear` beats oneDNN on this CPU: measured so for the AVX-512 build only.
        self.linear_is_tuned = bool(library.linear_is_tuned())

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                         lens: Tensor, longest: int) -> Tensor:
        """q (R, H, D); caches (n_slots, KVH, max_len, D); slots and lens (R,) int64, each row
        seeing the first lens[r] keys of slot slots[r]; `longest` = max(lens), from the host
        (reading it from the tensor would cost a sync on other devices and a call here).
        Returns (R, H, D)."""
        n_rows, n_heads, head_dim = q.shape
        n_slots, n_kv_heads, max_len, _ = k_cache.shape
        check_decode_attention_args(q, k_cache, v_cache, slots, lens, longest,
                                    supported=q.dtype == torch.float32)
        q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()
        out = torch.empty_like(q)
        n_threads = torch.get_num_threads()
        group = n_heads // n_kv_heads
        workspace = torch.empty(n_threads * group * max(longest, 1))
        bad = self._decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                     out.data_ptr(), slots.data_ptr(), lens.data_ptr(), n_rows,
                                     n_slots, n_kv_heads, group, head_dim, max_len, longest,
                                     head_dim ** -0.5, workspace.data_ptr(), n_threads)
        if bad:
            raise IndexError(f"decode_attention: row {bad - 1} reads outside the KV cache")
        return out

    def pack_linear(self, weight: Tensor) -> Tensor:
        """A linear layer's weight (out, in) float32 in the layout `linear` reads: panels of
        `panel_width` outputs, each transposed, the last zero padded. A new, flat tensor."""
        if not (weight.dtype == torch.float32 and weight.dim() == 2):
            raise ValueError("pack_linear: expected a 2-d float32 weight")
        weight = weight.detach().contiguous()
        n_out, n_in = weight.shape
        panels = fresh_floats(self._packed_size(n_out, n_in))
        self._pack_linear_weight(weight.data_ptr(), panels.data_ptr(), n_out, n_in,
                                 torch.get_num_threads())
        return panels

    def linear(self, x: Tensor, panels: Tensor, n_out: int, keep_argmax: bool = False
               ) -> Tensor:
        """x (T, in) @ weight.T -> (T, n_out), the weight packed by `pack_linear`. With
        `keep_argmax` (an lm_head), each row's argmax is kept from the accumulators as well,
        for `argmax` of this output: after the lm_head's weights have streamed through the
        caches, reading the logits back for it took 0.1 ms of a 9 ms bench-model step."""
        if x.dtype != torch.float32 or x.dim() != 2:
            raise ValueError("linear: expected 2-d float32 input")
        if x.stride(1) != 1:
            x = x.contiguous()
        n_rows, n_in = x.shape
        if not (panels.dtype == torch.float32 and panels.is_contiguous()
                and panels.numel() == self._packed_size(n_out, n_in)):
            raise ValueError("linear: the packed weight does not match the input's width")
        y = torch.empty(n_rows, n_out, dtype=torch.float32)
        n_threads = torch.get_num_threads()
        if not (keep_argmax and n_rows and n_out):
            self._linear(x.data_ptr(), x.stride(0), panels.data_ptr(), y.data_ptr(), n_rows,
                         n_in, n_out, n_threads)
            return y
        ids = torch.empty(n_rows, dtype=torch.int64)
        # Its vectors want their own alignment: 64 bytes covers every width
        scratch = torch.empty(self._linear_argmax_scratch_bytes(n_rows, n_threads) + 64,
                              dtype=torch.uint8)
        at = scratch.data_ptr() + (-scratch.data_ptr()) % 64
        self._linear_argmax(x.data_ptr(), x.stride(0), panels.data_ptr(), y.data_ptr(), n_rows,
                            n_in, n_out, n_threads, ids.data_ptr(), at)
        self._kept_argmax = (weakref.ref(y), ids)
        return y

    def sample(self, logits: Tensor, inv_temperature: Tensor, uniforms: Tensor) -> Tensor:
        """Token ids (R,) int64, one per row of logits (R, V) float32, drawn from
        softmax(logits * inv_temperature[:, None]) by inverting each row's CDF at its uniform
        draw (R,) float64 in [0, 1), as server/sampling.py's two-level search does."""
        n_rows, vocab = logits.shape
        if not (logits.dtype == inv_temperature.dtype == torch.float32
                and uniforms.dtype == torch.float64 and logits.is_contiguous()
                and inv_temperature.shape == uniforms.shape == (n_rows,) and vocab > 0):
            raise ValueError("sample: unexpected shapes, dtypes or layout")
        inv_temperature, uniforms = inv_temperature.contiguous(), uniforms.contiguous()
        out = torch.empty(n_rows, dtype=torch.int64)
        workspace = torch.empty(n_rows, -(-vocab // self._sample_block), dtype=torch.float64)
        self._sample_rows(logits.data_ptr(), inv_temperature.data_ptr(), uniforms.data_ptr(),
                          out.data_ptr(), workspace.data_ptr(), n_rows, vocab,
                          torch.get_num_threads())
        return out

    def argmax(self, logits: Tensor) -> Tensor:
        """torch.argmax(logits, dim=-1) (R,) int64 of logits (R, V) float32: the first of
        equal values, a NaN as the largest. Of the last `linear(keep_argmax=True)` output
        (that very tensor: anything derived from it is another), the argmax kept then; the
        caller must not have changed it in place (inference tensors keep no version count
        to tell): the sampler's processing is out of place (server/sampling.py)."""
        kept, self._kept_argmax = self._kept_argmax, None
        if kept is not None and kept[0]() is logits:
            return kept[1]
        if not (logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0):
            raise ValueError("argmax: expected (R, V) float32 with V > 0")
        logits = logits.contiguous()
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax_rows(logits.data_ptr(), out.data_ptr(), logits.shape[0], logits.shape[1],
                          torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """silu(gate) * up for gate_up (T, 2 * hidden) = [gate | up] -> (T, hidden)."""
        if not (gate_up.dtype == torch.float32 and gate_up.dim() == 2
                and gate_up.shape[1] % 2 == 0):
            raise ValueError("silu_mul: expected (T, 2 * hidden) float32")
        gate_up = gate_up.contiguous()
        n_rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(n_rows, hidden, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), n_rows, hidden,
                       torch.get_num_threads())
        return out

    def decode_layers(self, model: DecodeModel, token_ids: Tensor, slots: Tensor,
                      positions: Tensor, lens: Tensor, longest: int,
                      before_call: Callable[[], None] | None = None) -> Tensor:
        """A decode step's embedding, decoder layers and final norm in one call: row r is
        token token_ids[r] at positions[r] of slot slots[r], seeing its first lens[r] keys
        (longest their maximum, from the host). Returns the final norm's output (R, dim), what
        the model gives kernel by kernel. `before_call` runs right before the call, after
        the last PyTorch op here (they too release the GIL), so that work it hands to another
        thread runs while the call computes without the GIL."""
        shape = model.shape
        n_rows = token_ids.shape[0]
        if not (token_ids.dtype == slots.dtype == positions.dtype == lens.dtype == torch.int64
                and token_ids.shape == slots.shape == positions.shape == lens.shape == (n_rows,)
                and 0 <= longest <= shape.max_len):
            raise ValueError("decode_layers: unexpected shapes or dtypes")
        token_ids, slots = token_ids.contiguous(), slots.contiguous()
        positions, lens = positions.contiguous(), lens.contiguous()
        n_threads = torch.get_num_threads()
        shape_ref = ctypes.byref(shape)
        scratch = torch.empty(self._decode_scratch_floats(shape_ref, n_rows, longest,
                                                          n_threads))
        out = torch.empty(n_rows, shape.dim)
        if before_call is not None:
            before_call()
        bad = self._decode_layers(ctypes.addressof(model.layers), shape_ref,
                                  ctypes.byref(model.tables), token_ids.data_ptr(),
                                  out.data_ptr(), slots.data_ptr(), positions.data_ptr(),
                                  lens.data_ptr(), longest, n_rows, scratch.data_ptr(),
                                  n_threads)
        if bad:
            raise IndexError(f"decode_layers: row {bad - 1} is outside the model or the KV "
                             f"cache")
        return out

    def _packed_size(self, n_out: int, n_in: int) -> int:
        return -(-n_out // self.panel_width) * self.panel_width * n_in

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float,
                 delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(h, rms_norm(h) * weight) with h = x + delta, or x itself without delta. x and
        delta (T, dim) float32 with contiguous rows (a strided view's rows are fine)."""
        n_rows, dim = x.shape
        for t in (x, delta):
            if t is not None and not (t.dtype == torch.float32 and t.stride(1) == 1
                                      and t.shape == x.shape):
                raise ValueError("rms_norm: unexpected shapes, dtypes or layout")
        if not (weight.dtype == torch.float32 and weight.shape == (dim,)
                and weight.is_contiguous()):
            raise ValueError("rms_norm: unexpected weight")
        out = torch.empty(n_rows, dim, dtype=torch.float32)
        h = x if delta is None else torch.empty(n_rows, dim, dtype=torch.float32)
        self._add_rms_norm(x.data_ptr(), x.stride(0),
                           None if delta is None else delta.data_ptr(),
                           0 if delta is None else delta.stride(0), h.data_ptr(), out.data_ptr(),
                           weight.data_ptr(), n_rows, dim, eps, torch.get_num_threads())
        return h, out

    @staticmethod
    def handles_head_dim(head_dim: int) -> bool:
        """Whether rope_store and decode_attention take heads of this size."""
        return head_dim % 2 == 0

    def rope_store(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                   v_cache: Tensor, slots: Tensor, positions: Tensor, n_heads: int) -> Tensor:
        """Rotate the q and k heads of qkv (T, H + 2 KVH, D), write K and V at each token's
        (slot, position) of the caches (n_slots, KVH, max_len, D), return the rotated q
        (T, H, D). cos and sin (T, 1, D) or (T, D), the halves repeated."""
        n_tokens, n_all, head_dim = qkv.shape
        n_slots, n_kv_heads, max_len, _ = k_cache.shape
        cos, sin = cos.reshape(n_tokens, head_dim), sin.reshape(n_tokens, head_dim)
        check_rope_store_args(qkv, cos, sin, k_cache, v_cache, slots, positions, n_heads,
                              supported=qkv.dtype == torch.float32
                              and self.handles_head_dim(head_dim))
        slots, positions = slots.contiguous(), positions.contiguous()
        q = torch.empty(n_tokens, n_heads, head_dim)
        bad = self._rope_store(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                               k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                               positions.data_ptr(), n_tokens, n_heads, n_slots, n_kv_heads,
                               head_dim, max_len, torch.get_num_threads())
        if bad:
            raise IndexError(f"rope_store: token {bad - 1} is outside the KV cache")
        return q


@functools.cache
def load() -> CpuKernels | None:
    """The kernels: a prebuilt library for this CPU where `$LLAMA_SERVE_PREBUILT_KERNELS` has
    one (the Docker image, which has no compiler), else built with the system's compiler;
    None where they cannot or should not run (logged once)."""
    if platform.system() != "Linux" or not _torch_uses_libgomp():
        logger.info("CPU kernels unavailable: they need Linux and torch's libgomp")
        return None
    try:
        path = _prebuilt()
        if path is None:
            compiler = find_compiler()
            if compiler is None:
                logger.info("CPU kernels unavailable: no C compiler (set CC) and no prebuilt "
                            "library for this CPU; using PyTorch's ops")
                return None
            path = _build(compiler)
        return CpuKernels(ctypes.CDLL(str(path)), path)
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        logger.warning("CPU kernels unavailable, using PyTorch's ops: %s", exc)
        return None


# Portable x86-64 levels that `prebuild` compiles for, best first, each with the /proc/cpuinfo
# flags it adds to the next (gcc's -march=x86-64-v3 / v4; "abm" is lzcnt).
PORTABLE_LEVELS = (
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
    ("x86-64-v3", frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",
                             "xsave"})),
)


def portable_level(cpu_flags: set[str]) -> str | None:
    """The best of PORTABLE_LEVELS that a CPU with these flags runs, or None."""
    for i, (level, _) in enumerate(PORTABLE_LEVELS):
        if all(flags <= cpu_flags for _, flags in PORTABLE_LEVELS[i:]):
            return level
    return None


def prebuild(folder: Path, compiler: str) -> list[Path]:
    """A library per portable level into `folder`, for machines without a compiler: point
    `$LLAMA_SERVE_PREBUILT_KERNELS` at it (`python -m model.cpu_kernels FOLDER`)."""
    return [_compile(compiler, (f"-march={level}", *CFLAGS), _prebuilt_path(folder, level))
            for level, _ in PORTABLE_LEVELS]


def _prebuilt() -> Path | None:
    """The prebuilt library of this source for this CPU, if `$LLAMA_SERVE_PREBUILT_KERNELS`
    holds one. Named by the source's hash: a library of another source is never loaded."""
    folder = os.environ.get("LLAMA_SERVE_PREBUILT_KERNELS")
    level = portable_level(_cpu_flags()) if folder else None
    if folder is None or level is None:
        return None
    path = _prebuilt_path(Path(folder), level)
    return path if path.is_file() else None


def _prebuilt_path(folder: Path, level: str) -> Path:
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return folder / f"cpu_kernels-{source}-{level}.so"


def find_compiler() -> str | None:
    """`$CC`, else `cc`, as a path; None if there is none."""
    return shutil.which(os.environ.get("CC") or "cc")


def _torch_uses_libgomp() -> bool:
    """Whether the process already maps a libgomp (torch's): the library's own libgomp.so.1
    dependency then resolves to it instead of loading a second OpenMP runtime."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


def _build(compiler: str) -> Path:
    """Compile SOURCE for this CPU into the cache, unless a library for this source, compiler,
    flags and CPU is there already."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    flags = (NATIVE, *CFLAGS)
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                 _cpu_signature().encode()):
        key.update(part)
    path = cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    return _compile(compiler, flags, path)


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> Path:
    """SOURCE compiled into `path`, written beside and renamed: concurrent builds never see
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built CPU kernels: %s", path)
    return path


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _cpu_signature() -> str:
    """The CPU's model and feature flags: `-march=native` code must not run on another CPU
    (a cache folder shared between machines)."""
    try:
        with open("/proc/cpuinfo") as info:
            return "".join(sorted({line for line in info
                                   if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.machine()


def main(argv: list[str] | None = None) -> None:
    """`python -m model.cpu_kernels FOLDER`: prebuild the libraries (the Docker image's build
    stage does, so that its compiler-less runtime image runs the kernels)."""
    parser = argparse.ArgumentParser(prog="python -m model.cpu_kernels",
                                     description=main.__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    compiler = find_compiler()
    if compiler is None or platform.machine() != "x86_64":
        sys.exit("prebuilding needs a C compiler (set CC) on x86-64")
    for path in prebuild(args.folder, compiler):
        print(path)


if __name__ == "__main__":
    main()
