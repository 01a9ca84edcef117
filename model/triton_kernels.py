"""Fused kernels for a step on a GPU, in Triton: what PyTorch runs as ~22 small kernels a layer.

A decode step of a Llama-2-7B shape on an H100 reads 13.2 GB of weights in ~4.9 ms of matmuls,
and spent another ~1.9 ms on ~720 kernels of a few microseconds each (norms, residual adds,
rotary, K/V stores, the decode mask, attention, SiLU). These four kernels do that work in five
launches a layer:

- `rms_norm`: the residual add and the RMSNorm after it, one pass over each row;
- `rope_store`: rotate q and k, store K and V at each token's (slot, position);
- `silu_mul`: silu(gate) * up;
- `decode_attention`: each decode row attends to its own slot's first `lens[r]` keys (not a
  length bucket's worth, as the masked SDPA did), split over the keys when there are too few
  rows and heads to fill the GPU.

On an H100 the graphed step went 6.72 -> 5.73 ms at 1 row and 10.34 -> 8.08 ms at 64 (README,
Performance, GPU); the four kernels take 0.42 ms of the 1-row step.

A fifth, `tiled_linear`, is the matmul of CUDA-graph steps of up to 16 and up to 64 rows for
the weight shapes where one of its tilings beat cuBLAS at load (`graph_matmuls`).

They round where the reference ops round (each PyTorch op of the reference writes its result
in the model's dtype): under Triton's interpreter the norm's residual add and the rotation are
the reference's to the bit, and the norm and SiLU * up within a rounding step (a sum in
another order, another exp). Compiled, the compiler may keep an intermediate in float32 (seen
on an H100 for the rotation's products): such a result then rounds once where the reference
rounds twice or three times. Attention accumulates in float32 like SDPA's kernels. The same
interface as `CpuKernels` (rms_norm, rope_store, silu_mul, decode_attention), so the model
calls either.

Tests run these on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by the
test suite where there is no GPU) and compiled on a GPU host (`pytest -m gpu`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.attention import check_decode_attention_args, check_rope_store_args
from model.config import ModelConfig

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

try:  # the CUDA builds of torch bring triton; CPU installs need not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

# Keys a program of decode_attention reads per iteration, and at least per split; at most
# this many splits (the combining kernel holds them all at once).
BLOCK_KEYS = 64
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32


def interpreted() -> bool:
    """Whether kernels run under Triton's interpreter (on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def attention_splits(n_rows: int, n_kv_heads: int, longest: int, n_sm: int) -> int:
    """How many parts decode attention splits each row's keys into: enough programs to give
    every multiprocessor two, as long as each part keeps MIN_KEYS_PER_SPLIT keys (fewer
    and combining the parts costs more than it saves). One split needs no combining kernel."""
    programs = n_rows * n_kv_heads
    want = -(-2 * n_sm // programs)  # ceil
    most = min(MAX_SPLITS, max(1, longest // MIN_KEYS_PER_SPLIT))
    return max(1, min(want, most))


if triton is not None:

    @triton.jit
    def _add_rms_norm(x_ptr, x_stride, d_ptr, d_stride, h_ptr, out_ptr, w_ptr, dim, eps,
                      HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_DELTA:  # h = x + delta, rounded to the dtype as PyTorch's add rounds it
            d = tl.load(d_ptr + row * d_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * dim + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / dim + eps)
        # Normalised in float32 and rounded, then the weight and rounded again: the
        # reference's F.rms_norm(x) * weight (for float32 both roundings are no-ops).
        normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (normed * w).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _rope_store(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr,
                    n_heads, n_kv_heads, n_slots, max_len,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
        """Program (token, block of HEADS heads): heads are q heads, then k, then v."""
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]  # (HEADS, 1)
        d = tl.arange(0, HEAD_DIM)[None, :]  # (1, HEAD_DIM)
        dt = q_ptr.dtype.element_ty
        n_all = n_heads + 2 * n_kv_heads
        src = qkv_ptr + (token * n_all + head) * HEAD_DIM
        x = tl.load(src + d, mask=head < n_all, other=0.0)
        # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as the
        # reference's three ops round them (compiled, the products may stay float32: see the
        # module docstring); rotate_half pairs i with i + D/2. For q and k.
        partner = tl.load(src + (d + HALF) % HEAD_DIM, mask=head < n_all, other=0.0)
        partner = partner.to(tl.float32)
        c = tl.load(cos_ptr + token * HEAD_DIM + d).to(tl.float32)
        s = tl.load(sin_ptr + token * HEAD_DIM + d).to(tl.float32)
        a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
        b = (tl.where(d < HALF, -partner, partner) * s).to(dt).to(tl.float32)
        x = tl.where(head < n_heads + n_kv_heads, (a + b).to(dt), x)
        tl.store(q_ptr + (token * n_heads + head) * HEAD_DIM + d, x, mask=head < n_heads)
        slot = tl.load(slots_ptr + token)
        pos = tl.load(pos_ptr + token)
        # Outside the pool nothing is written: the scheduler never asks for it, a CUDA graph
        # cannot raise, and a stray write would corrupt another sequence.
        inside = (slot >= 0) & (slot < n_slots) & (pos >= 0) & (pos < max_len)
        kv_head = head - n_heads  # k heads, then v heads
        is_k = inside & (kv_head >= 0) & (kv_head < n_kv_heads)
        is_v = inside & (kv_head >= n_kv_heads) & (kv_head < 2 * n_kv_heads)
        kv_head = tl.where(is_v, kv_head - n_kv_heads, kv_head)
        at = ((slot * n_kv_heads + kv_head) * max_len + pos) * HEAD_DIM + d
        tl.store(k_ptr + at, x, mask=is_k)
        tl.store(v_ptr + at, x, mask=is_v)

    @triton.jit
    def _silu_mul(gu_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        dt = out_ptr.dtype.element_ty
        gate = tl.load(gu_ptr + row * 2 * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * 2 * hidden + hidden + cols, mask=mask, other=0.0)
        # F.silu(gate) rounded, then * up rounded: the reference's two ops.
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, (act * up.to(tl.float32)).to(dt), mask=mask)

    @triton.jit
    def _decode_attention(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr, slots_ptr,
                          lens_ptr, n_heads, n_kv_heads, n_slots, max_len, keys_per_split, scale,
                          GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr):
        """Program (row, kv head, split): the GROUP query heads sharing a KV head, against
        keys [split * keys_per_split, ...) of the row's slot, up to its length. With SPLIT,
        the unnormalised output and its (max, sum) go to part/stats for _combine_splits."""
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g  # the query heads of this KV head
        q = tl.load(q_ptr + (row * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0)
        slot = tl.load(slots_ptr + row)
        # Never past the pool: a slot outside it sees no key (zeros), a length past max_len
        # stops there. The scheduler never asks for either; a CUDA graph cannot raise.
        length = tl.minimum(tl.load(lens_ptr + row), max_len).to(tl.int32)
        length = tl.where((slot >= 0) & (slot < n_slots), length, 0)
        slot = tl.where((slot >= 0) & (slot < n_slots), slot, 0)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, length)
        base = (slot * n_kv_heads + kv_head) * max_len * HEAD_DIM
        m = tl.full([GROUP_P], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
        for first in range(start, end, BLOCK_N):  # only the row's own keys
            n = first + tl.arange(0, BLOCK_N)
            keep = n < end
            offsets = base + n[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(k_ptr + offsets, mask=keep[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(keep[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: key `first` is kept
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + offsets, mask=keep[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if SPLIT:
            at = (row * n_heads + heads) * n_splits + split  # (rows, heads, splits)
            tl.store(part_ptr + at[:, None] * HEAD_DIM + d[None, :], acc,
                     mask=(g < GROUP)[:, None])
            tl.store(stats_ptr + at * 2, m, mask=g < GROUP)
            tl.store(stats_ptr + at * 2 + 1, total, mask=g < GROUP)
        else:
            out = acc / tl.where(total > 0, total, 1.0)[:, None]  # no keys: zeros, not NaN
            tl.store(out_ptr + (row * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    @triton.jit
    def _combine_splits(part_ptr, stats_ptr, out_ptr, n_splits,
                        SPLITS_P: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Program (row, head): the splits' partial outputs weighted by exp(max - overall)."""
        at = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        i = tl.arange(0, SPLITS_P)
        d = tl.arange(0, HEAD_DIM)
        real = i < n_splits
        m = tl.load(stats_ptr + (at * n_splits + i) * 2, mask=real, other=float("-inf"))
        total = tl.load(stats_ptr + (at * n_splits + i) * 2 + 1, mask=real, other=0.0)
        top = tl.max(m, axis=0)
        top = tl.where(top > float("-inf"), top, 0.0)  # a row that saw no key at all
        weight = tl.exp(m - top)  # a split past the row's length (max -inf) weighs 0
        part = tl.load(part_ptr + (at * n_splits + i)[:, None] * HEAD_DIM + d[None, :],
                       mask=real[:, None], other=0.0)
        norm = tl.sum(total * weight, axis=0)
        out = tl.sum(part * weight[:, None], axis=0) / tl.where(norm > 0, norm, 1.0)
        tl.store(out_ptr + at * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


if triton is not None:

    @triton.jit
    def _tiled_matmul(x_ptr, w_ptr, y_ptr, n_rows, n_out, n_in, x_stride, y_stride,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      IEEE: tl.constexpr):
        # y (n_rows, n_out) = x (n_rows, n_in) @ w (n_out, n_in)^T for a few rows: each
        # program reads BLOCK_N rows of the weight once, whole, for all of x's rows.
        rows = tl.arange(0, BLOCK_M)
        outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :],
                        mask=(rows[:, None] < n_rows) & (ks[None, :] < n_in), other=0.0)
            w = tl.load(w_ptr + outs[:, None].to(tl.int64) * n_in + ks[None, :],
                        mask=(outs[:, None] < n_out) & (ks[None, :] < n_in), other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rows[:, None] * y_stride + outs[None, :],
                 acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (outs[None, :] < n_out))


@dataclasses.dataclass(frozen=True)
class MatmulTiling:
    """One tiling of `_tiled_matmul` for up to `rows` rows (its BLOCK_M): each program reads
    `block_n` weight rows once, whole, `block_k` inputs at a time (`block_k_fp32` in float32,
    whose tiles are twice as wide, to fit shared memory), in `stages` pipelined loads."""
    rows: int
    block_n: int
    block_k: int
    block_k_fp32: int
    warps: int = 4
    stages: int = 3


@dataclasses.dataclass(frozen=True)
class MatmulTier:
    """Graph steps of more than the tier below's rows and up to `rows` take one of `tilings`
    or cuBLAS, per weight shape, whichever was fastest at load over `timed_at` rows."""
    rows: int
    timed_at: tuple[int, ...]
    tilings: tuple[MatmulTiling, ...]

    def __post_init__(self) -> None:
        if not (self.tilings and all(t.rows >= self.rows for t in self.tilings)
                and all(0 < n <= self.rows for n in self.timed_at)):
            raise ValueError(f"a tier of {self.rows} rows needs tilings of as many: {self}")


# On an H100 in bf16, Llama-2-7B's shapes (README, Performance, GPU): up to 16 rows the best
# of 24 tilings for o_proj and gate_up_proj at 1 and 4 rows; up to 64 the best three of 52
# over the five shapes at 32 and 64 rows (gate_up_proj 66.4 us against cuBLAS's 71.7, the
# lm_head 94.0 against 101.8; qkv_proj, o_proj and down_proj within 3%), timed at load at
# the tier's smallest graph bucket above 16 rows and its largest.
MATMUL_TIERS = (
    MatmulTier(16, (1, 8), (MatmulTiling(16, 32, 512, 128),)),
    MatmulTier(64, (24, 64), (MatmulTiling(64, 32, 128, 32),
                              MatmulTiling(64, 32, 128, 32, stages=6),
                              MatmulTiling(64, 128, 128, 32))),
)
# A shape's choice per tier, lowest tier first: (rows, tiling), None for cuBLAS
GraphMatmuls = tuple[tuple[int, MatmulTiling | None], ...]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _on_device_of(t: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' (a model on cuda:1
    driven from a thread whose current device is cuda:0)."""
    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class TritonKernels:
    """The kernels behind CpuKernels' interface, for tensors on one GPU (or CPU tensors under
    the interpreter). Each method checks what its kernel takes on trust."""

    @staticmethod
    def handles_head_dim(head_dim: int) -> bool:
        """Whether rope_store and decode_attention take heads of this size: a power of two
        (a block's width) of at least 16 (a matrix product's smallest side)."""
        return head_dim >= 16 and head_dim == _pow2(head_dim)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float,
                 delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(h, rms_norm(h) * weight) with h = x + delta, or x itself without delta. x and
        delta (T, dim) with contiguous rows."""
        n_rows, dim = x.shape
        for t in (x, delta):
            if t is not None and not (t.dtype == x.dtype and t.stride(1) == 1
                                      and t.shape == x.shape and t.device == x.device):
                raise ValueError("rms_norm: unexpected shapes, dtypes or layout")
        if not (weight.shape == (dim,) and weight.is_contiguous()):
            raise ValueError("rms_norm: unexpected weight")
        out = torch.empty(n_rows, dim, dtype=x.dtype, device=x.device)
        h = x if delta is None else torch.empty_like(out)
        if n_rows:
            block = _pow2(dim)
            with _on_device_of(x):
                _add_rms_norm[(n_rows,)](
                    x, x.stride(0), x if delta is None else delta,
                    0 if delta is None else delta.stride(0), h, out, weight, dim, eps,
                    HAS_DELTA=delta is not None, BLOCK=block,
                    num_warps=min(16, max(1, block // 512)))
        return h, out

    def rope_store(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                   v_cache: Tensor, slots: Tensor, positions: Tensor, n_heads: int) -> Tensor:
        """Rotate the q and k heads of qkv (T, H + 2 KVH, D), write K and V at each token's
        (slot, position) of the caches (n_slots, KVH, max_len, D), return the rotated q
        (T, H, D). cos and sin (T, 1, D) or (T, D), the halves repeated. A token outside the
        pool writes nothing."""
        n_tokens, n_all, head_dim = qkv.shape
        n_slots, n_kv_heads, max_len, _ = k_cache.shape
        cos, sin = cos.reshape(n_tokens, head_dim), sin.reshape(n_tokens, head_dim)
        check_rope_store_args(qkv, cos, sin, k_cache, v_cache, slots, positions, n_heads,
                              supported=self.handles_head_dim(head_dim))
        q = torch.empty(n_tokens, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        if n_tokens:
            heads = min(16, _pow2(n_all))
            with _on_device_of(qkv):
                _rope_store[(n_tokens, triton.cdiv(n_all, heads))](
                    qkv, cos, sin, q, k_cache, v_cache, slots.contiguous(),
                    positions.contiguous(), n_heads, n_kv_heads, n_slots, max_len, HEADS=heads,
                    HEAD_DIM=head_dim, HALF=head_dim // 2, num_warps=4)
        return q

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """silu(gate) * up for gate_up (T, 2 * hidden) = [gate | up] -> (T, hidden)."""
        if not (gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0):
            raise ValueError("silu_mul: expected (T, 2 * hidden)")
        gate_up = gate_up.contiguous()
        n_rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(n_rows, hidden, dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, _pow2(hidden))
        if n_rows:
            with _on_device_of(gate_up):
                _silu_mul[(n_rows, triton.cdiv(hidden, block))](gate_up, out, hidden,
                                                                BLOCK=block, num_warps=4)
        return out

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                         lens: Tensor, longest: int, splits: int | None = None) -> Tensor:
        """q (R, H, D); caches (n_slots, KVH, max_len, D); slots and lens (R,) int64, each row
        seeing the first lens[r] keys of slot slots[r]. `longest` bounds the lens (from the
        host: a CUDA graph's length bucket) and sets how the keys are split (`splits`
        overrides it). Returns (R, H, D)."""
        n_rows, n_heads, head_dim = q.shape
        n_slots, n_kv_heads, max_len, _ = k_cache.shape
        check_decode_attention_args(q, k_cache, v_cache, slots, lens, longest,
                                    supported=self.handles_head_dim(head_dim))
        q, slots, lens = q.contiguous(), slots.contiguous(), lens.contiguous()
        out = torch.empty_like(q)
        if n_rows == 0:
            return out
        if splits is None:
            splits = attention_splits(n_rows, n_kv_heads, longest, _multiprocessors(q.device))
        keys_per_split = -(-max(longest, 1) // splits)
        keys_per_split = -(-keys_per_split // BLOCK_KEYS) * BLOCK_KEYS
        group = n_heads // n_kv_heads
        part = stats = out  # unused without splits
        if splits > 1:
            part = torch.empty(n_rows, n_heads, splits, head_dim, dtype=torch.float32,
                               device=q.device)
            stats = torch.empty(n_rows, n_heads, splits, 2, dtype=torch.float32,
                                device=q.device)
        ieee = q.dtype == torch.float32
        with _on_device_of(q):
            # float32 tiles are twice as wide: Triton's default 3 pipeline stages would want
            # 143 KB of shared memory at head_dim 128, over what many GPUs have.
            _decode_attention[(n_rows, n_kv_heads, splits)](
                q, k_cache, v_cache, out, part, stats, slots, lens, n_heads, n_kv_heads,
                n_slots, max_len, keys_per_split, head_dim ** -0.5, GROUP=group,
                GROUP_P=max(16, _pow2(group)), HEAD_DIM=head_dim, BLOCK_N=BLOCK_KEYS,
                SPLIT=splits > 1, IEEE=ieee, num_warps=4, **({"num_stages": 1} if ieee else {}))
            if splits > 1:
                _combine_splits[(n_rows, n_heads)](part, stats, out, splits,
                                                   SPLITS_P=_pow2(splits), HEAD_DIM=head_dim,
                                                   num_warps=4)
        return out

    def tiled_linear(self, x: Tensor, weight: Tensor, tiling: MatmulTiling) -> Tensor:
        """x (R, K) @ weight (N, K)^T for R <= tiling.rows: each weight row is read once for
        all of them, in tiles that cuBLAS's kernels for so few rows do not use. Where it beats
        cuBLAS is measured at load (`graph_matmuls`)."""
        n_rows, n_in = x.shape
        n_out = weight.shape[0]
        if not (n_rows <= tiling.rows and weight.shape == (n_out, n_in)
                and weight.is_contiguous() and x.stride(1) == 1 and x.dtype == weight.dtype):
            raise ValueError("tiled_linear: unexpected shapes, dtypes or layout")
        y = torch.empty(n_rows, n_out, dtype=x.dtype, device=x.device)
        if n_rows:
            fp32 = x.dtype == torch.float32
            with _on_device_of(x):
                _tiled_matmul[(triton.cdiv(n_out, tiling.block_n),)](
                    x, weight, y, n_rows, n_out, n_in, x.stride(0), y.stride(0),
                    BLOCK_M=tiling.rows, BLOCK_N=tiling.block_n,
                    BLOCK_K=tiling.block_k_fp32 if fp32 else tiling.block_k, IEEE=fp32,
                    num_warps=tiling.warps, num_stages=tiling.stages)
        return y

    def graph_matmuls(self, weights: list[Tensor], repeats: int = 8, margin: float = 0.97
                      ) -> dict[tuple[int, int], GraphMatmuls]:
        """For each weight shape, the matmul of each tier (MATMUL_TIERS) for CUDA-graph steps:
        the tier's fastest tiling if it ran in under `margin` of cuBLAS's (F.linear) time,
        summed over the tier's `timed_at` rows, else None (cuBLAS). Timed on a GPU with CUDA
        events over every weight of a shape in turn (the layers' weights: no reuse from L2,
        as in a step), replayed from CUDA graphs and taking turns, the fastest of `repeats`
        replays each (the margin leaves a near tie to cuBLAS). A tiling that fails to launch
        (shared memory, ...) is left out. Under the interpreter, every tier's first tiling
        for every shape (so that CPU tests run the kernel); on CPU otherwise, cuBLAS's
        stand-in everywhere."""
        by_shape: dict[tuple[int, int], list[Tensor]] = {}
        for w in weights:
            by_shape.setdefault(tuple(w.shape), []).append(w)
        if not by_shape:
            return {}
        device = weights[0].device
        if device.type != "cuda":
            first = tuple((tier.rows, tier.tilings[0] if interpreted() else None)
                          for tier in MATMUL_TIERS)
            return dict.fromkeys(by_shape, first)
        # (The timing's graphs and outputs, 0.4 GB for Llama-2-7B's shapes at 64 rows, stay
        # in PyTorch's cache: start-up empties it before sizing the KV pool.)
        return {shape: tuple((tier.rows, self._fastest_tiling(tier, group, repeats, margin))
                             for tier in MATMUL_TIERS)
                for shape, group in by_shape.items()}

    def _fastest_tiling(self, tier: MatmulTier, group: list[Tensor], repeats: int,
                        margin: float) -> MatmulTiling | None:
        """The tier's fastest tiling over these weights (one shape), None where cuBLAS's
        time times `margin` is shorter."""
        shape, dtype, device = tuple(group[0].shape), group[0].dtype, group[0].device
        xs = [torch.randn(n, shape[1], device=device).to(dtype) for n in tier.timed_at]
        tilings = []
        for tiling in tier.tilings:
            try:
                for x in xs:  # (Triton compiles a variant for 1 row)
                    self.tiled_linear(x, group[0], tiling)
            except Exception as exc:  # noqa: BLE001 - another tiling, or cuBLAS
                if device_fault(exc):
                    raise
                logger.info("tiled matmul %s unavailable for %s: %s", tiling, shape, exc)
                continue
            tilings.append(tiling)
        if not tilings:
            return None
        totals = [0.0] * (len(tilings) + 1)  # the tilings', then cuBLAS's
        try:
            for x in xs:
                matmuls = [functools.partial(self.tiled_linear, x, tiling=t) for t in tilings]
                best = _fastest_over(group, repeats, *matmuls, lambda w, x=x: F.linear(x, w))
                totals = [a + b for a, b in zip(totals, best, strict=True)]
        except Exception as exc:  # noqa: BLE001 - cuBLAS stays the choice
            if device_fault(exc):
                raise
            logger.info("tiled matmuls for %s not timed: %s", shape, exc)
            return None
        i = min(range(len(tilings)), key=totals.__getitem__)
        logger.debug("tiled matmul %s, %d rows: %.3f ms (%s) against cuBLAS's %.3f", shape,
                     tier.rows, totals[i], tilings[i], totals[-1])
        return tilings[i] if totals[i] < margin * totals[-1] else None

    def probe(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        """Run each kernel once at the model's widths on tiny inputs, with and without split
        keys: raises what a launch would (no C compiler for Triton's launcher, more shared
        memory than the GPU has, ...)."""
        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, device=device).to(dtype)
        x = draw(2, config.dim)
        self.rms_norm(x, draw(config.dim), config.norm_eps)  # the first layer's: no residual
        self.rms_norm(x, draw(config.dim), config.norm_eps, x)
        self.silu_mul(draw(2, 2 * config.hidden_dim))
        n_heads, n_kv, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        if self.handles_head_dim(head_dim):
            # Two slots: Triton compiles an integer argument of 1 as a constant, a variant
            # that serving's pools never run
            keys = 2 * MIN_KEYS_PER_SPLIT
            k_cache, v_cache = (torch.zeros(2, n_kv, keys, head_dim, dtype=dtype, device=device)
                                for _ in range(2))
            slots = torch.arange(2, dtype=torch.int64, device=device)
            angles = draw(2, head_dim)
            q = self.rope_store(draw(2, n_heads + 2 * n_kv, head_dim), angles, angles, k_cache,
                                v_cache, slots, torch.arange(2, device=device), n_heads)
            lens = torch.full((2,), keys, dtype=torch.int64, device=device)
            for splits in (1, 2):
                self.decode_attention(q, k_cache, v_cache, slots, lens, keys, splits=splits)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _fastest_over(weights: list[Tensor], repeats: int,
                  *matmuls: Callable[[Tensor], object]) -> list[float]:
    """Milliseconds of each matmul over every weight in turn, replayed from a CUDA graph as
    a decode step is (launched eagerly, a Triton kernel's launch from Python took longer
    than its run on a small weight: on an H100 o_proj measured 40% slower that way and 11%
    faster in a graph); the fastest of `repeats` replays, the matmuls taking turns. On the
    weights' GPU (cuda:1 too)."""
    device = weights[0].device
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        graphs = []
        try:
            with torch.cuda.stream(stream):
                for matmul in matmuls:  # compiled and warmed up outside the capture
                    for w in weights:
                        matmul(w)
            for matmul in matmuls:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for w in weights:
                        matmul(w)
                graphs.append(graph)
            best = [float("inf")] * len(matmuls)
            for _ in range(repeats):
                for i, graph in enumerate(graphs):
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    best[i] = min(best[i], start.elapsed_time(end))
            return best
        finally:
            torch.cuda.current_stream(device).wait_stream(stream)
            del graphs
            # cuBLAS keeps a workspace per stream, here in the graphs' memory, now freed
            if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
                torch._C._cuda_clearCublasWorkspaces()


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small GPU, so tests see splits
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def load() -> TritonKernels | None:
    """The kernels where Triton imports, else None (logged once)."""
    if triton is None:
        logger.info("Triton unavailable: the GPU path runs PyTorch's ops")
        return None
    return TritonKernels()


def for_model(config: ModelConfig, dtype: torch.dtype, device: torch.device
              ) -> TritonKernels | None:
    """The kernels if Triton imports and they run at this model's widths on this device
    (TritonKernels.probe), else None: the model then runs PyTorch's ops (logged)."""
    kernels = load()
    if kernels is None:
        return None
    try:
        kernels.probe(config, dtype, device)
    except Exception as exc:  # any failure to build or launch: the PyTorch ops still work
        if device_fault(exc):
            raise  # ...unless the device itself faulted: nothing runs on it any more
        logger.warning("Triton kernels unavailable on %s, using PyTorch's ops: %s", device,
                       exc)
        return None
    return kernels


def device_fault(exc: BaseException) -> bool:
    """A fault of the device (an illegal address, ...), which leaves its CUDA context unusable:
    torch's AcceleratorError, or the RuntimeError that versions before it raise."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return ((accelerator_error is not None and isinstance(exc, accelerator_error))
            or "CUDA error" in str(exc))
