"""The Llama architecture, as the reference checkpoints compute it.

Pre-norm blocks `h = x + attn(rmsnorm(x))`, `out = h + mlp(rmsnorm(h))`; grouped-query
attention with rotary embeddings at each token's own position; SwiGLU MLP; no biases.
Parameter names mirror Hugging Face checkpoint keys, so loading is a checked 1:1 copy.

Tokens arrive flat: `input_ids` and `positions` are (T,), tokens of several sequences side by
side; an `AttentionBatch` says which KV-cache slot each belongs to. With no cache, the T tokens
are one sequence attended causally.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels
from model.attention import AttentionBatch, attend_cached, attend_causal
from model.config import ModelConfig, RopeScaling
from model.kv_cache import KVCachePool
from model.lora import LoraBatch

if TYPE_CHECKING:  # imported where used: CPU servers need not import triton
    from model.triton_kernels import TritonKernels

    # The fused kernels a layer calls on the fast path: the C ones on CPU in float32,
    # Triton's on a GPU. Both have rms_norm, rope_store, silu_mul and decode_attention; only
    # the C ones have the linears (`linear_is_tuned`).
    StepKernels = cpu_kernels.CpuKernels | TritonKernels

Tensor = torch.Tensor

logger = logging.getLogger(__name__)

# Whether the forward running now is a CUDA-graph decode step (its capture, its warm-up, or
# its eager stand-in): only there the tiled matmuls run (PackedLinear). It was chosen by
# timing graph replays; launched from Python a Triton kernel costs more than cuBLAS's
# (an H100's eager 1-row step took 20-25 ms with it against 14 without).
_graph_step: ContextVar[bool] = ContextVar("graph_step", default=False)


@contextmanager
def graph_step() -> Iterator[None]:
    """Run a forward as a CUDA-graph decode step (model/decode_graphs.py)."""
    token = _graph_step.set(True)
    try:
        yield
    finally:
        _graph_step.reset(token)


class RMSNorm(nn.Module):
    # Rows up to which the packed path without C kernels runs LayerNorm (see `pack`); with more
    # it measured 2-4% slower than F.rms_norm (32 rows, a 128-token prompt).
    LAYER_NORM_MAX_ROWS = 8

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.doubled_weight: Tensor | None = None  # the CPU fast path, see `pack`
        self.kernels: StepKernels | None = None  # or a fused kernel, see `pack`

    def pack(self, kernels: StepKernels | None = None) -> None:
        """The CPU float32 fast path: the C kernel (one pass over each row, the residual add
        fused in: `add_forward`) or, without it, RMSNorm as LayerNorm over [x, -x], whose mean
        is 0 and whose variance is mean(x^2), so its first half is x * rsqrt(mean(x^2) + eps)
        * w.

        On CPU LayerNorm is one fused kernel and F.rms_norm about ten small ops: in the bench
        model's decode step a norm took ~30 us, 17 of them a step. Step with 1 / 4 rows (two
        A/Bs in one process): 10.1 / 10.3 -> 9.5 / 9.9 ms and 8.7 / 9.2 -> 8.3 / 9.1 ms. Either
        result differs from F.rms_norm by rounding only (a few ulps, tested); the reference
        path keeps F.rms_norm. On a GPU `kernels` are Triton's, the same fused pass."""
        self.kernels = kernels
        self.doubled_weight = None if kernels else torch.cat([self.weight.detach()] * 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps)[1]
        if self.doubled_weight is not None and x.shape[0] <= self.LAYER_NORM_MAX_ROWS:
            dim = x.shape[-1]
            both = torch.cat([x, x.neg()], dim=-1)
            # A strided view of the first half: the linears after it take strided rows.
            return F.layer_norm(both, (2 * dim,), self.doubled_weight, None, self.eps)[..., :dim]
        if x.dtype == torch.float32:  # the same arithmetic, one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalised in float32 and cast back before the weight, as the reference does:
        # F.rms_norm computes in float32 and rounds once (bit-equal to HF's x.float() ... .to()
        # chain, tested): two kernels on CUDA instead of eight.
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight

    def add_forward(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """(x + delta, and its norm): a residual add and the norm after it."""
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps, delta)
        h = x + delta
        return h, self(h)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with linear, Llama 3.1 or YaRN scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    # llama3: long wavelengths slowed by `factor`, short kept, a smooth blend in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> Tensor:
    """YaRN's frequencies, transformers' ops in its order (the same bits): the dimensions
    that turn more than beta_fast times over the original context keep their frequency
    (extrapolated), those under beta_slow are interpolated (/ factor), a linear ramp between."""
    dims = torch.arange(0, head_dim, 2).to(dtype=torch.float)
    pos_freqs = theta ** (dims / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)

    def dim_turning(rotations: float) -> float:  # the dimension that turns this many times
        return (head_dim * math.log(scaling.original_max_position_embeddings
                                    / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_turning(scaling.beta_fast), dim_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (transformers': no division by zero)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low),
                       0, 1)
    kept = 1 - ramp  # how much of each dimension keeps its frequency
    return interpolated * (1 - kept) + extrapolated * kept


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (T, heads, D) by each token's angles (T, 1, D).

    Hugging Face convention: dimension i pairs with i + D/2 ("rotate half"). Meta's
    checkpoints pair neighbours (2i, 2i+1); weights.py permutes their q/k rows to match.
    """
    return x * cos + rotate_half(x) * sin


class PackedLinear:
    """A bias-free linear layer of the fast path.

    On CPU in float32 with the C kernels it runs `CpuKernels.linear` on a weight packed once
    into that kernel's panels. The bench model's 33 linears (one process, interleaved; the
    2-core AVX-512 EPYC) at 1 / 4 / 8 / 16 / 64 / 256 rows: 3.5-5.0 / 3.7-5.0 / 4.4-5.0 /
    7.6-7.8 / 26-27 / 99-100 ms, against 6.4-7.4 / 5.9-6.9 / 7.5-7.7 / 9.4-9.6 / 28-30 /
    100-108 ms with oneDNN below.

    Else on CPU it calls oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, what inductor
    uses for frozen linears) on a weight reordered once into oneDNN's blocked layout. Measured
    on the same shapes: 1 / 4 / 16 / 64 rows take 7 / 5.5 / 9.4 / 27 ms per step for all
    linears against 7 / 12 / 17 / 37 ms with the plain layout and 17 / 25 / 26 / 48 ms with
    F.linear (MKL). Elsewhere, or where that op is missing, F.linear.
    """

    # oneDNN picks the blocked layout for this many rows; 16-64 measured equally good for
    # 1-512 rows, while a hint of 1 makes every multi-row call as slow as the plain layout.
    BATCH_HINT = 64
    # On the blocked layout 1-3 rows read the weight more slowly than 4 do (oneDNN's kernel
    # for so few rows does not reach the memory bandwidth): zero rows pad them to 4. Bench
    # model's decode step with 1 / 2 / 3 / 4 rows (medians of 40, interleaved in one process):
    # 10.4 / 10.7 / 9.5 / 9.6 ms unpadded, 9.5 / 8.7 / 9.5 / 9.7 ms padded.
    MIN_ROWS = 4

    def __init__(self, weight: Tensor, use_onednn: bool, reorder: bool = True,
                 kernels: StepKernels | None = None) -> None:
        """`reorder=False` keeps the caller's dense weight (a tied lm_head: repacking would
        copy the embedding). `kernels` run the matmul where their linear is tuned for the CPU
        (`CpuKernels.linear_is_tuned`), else oneDNN does."""
        weight = weight.detach().contiguous()  # (out, in)
        self.out_features = weight.shape[0]
        tuned = isinstance(kernels, cpu_kernels.CpuKernels) and kernels.linear_is_tuned
        self.kernels = kernels if reorder and tuned else None
        # Either packed layout is a copy: the caller drops the dense weight so memory is not
        # doubled.
        if self.kernels is not None:
            weight = self.kernels.pack_linear(weight)
        elif use_onednn and reorder:
            try:
                weight = torch.ops.mkldnn._reorder_linear_weight(weight, self.BATCH_HINT)
            except (RuntimeError, NotImplementedError):
                pass  # no blocked kernels for this dtype on this CPU: the plain layout
        self.weight = weight
        self.use_onednn = use_onednn
        # The plain layout is the other way round: more rows cost more.
        self.min_rows = self.MIN_ROWS if weight.is_mkldnn else 0
        # On a GPU, per tier of rows (the most it takes, lowest first), the matmul of
        # CUDA-graph steps where one beat cuBLAS on this shape, None where none did
        # (LlamaModel.pack: TritonKernels.graph_matmuls)
        self.graph_matmuls: tuple[tuple[int, Callable[[Tensor, Tensor], Tensor] | None],
                                  ...] = ()
        # The lm_head on the C kernels: each row's argmax kept for the sampler's greedy rows
        # (CpuKernels.linear)
        self.keep_argmax = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.graph_matmuls and _graph_step.get():
            matmul = self.graph_matmul(x.shape[0])
            if matmul is not None:
                return matmul(x, self.weight)
        if self.kernels is not None:
            return self.kernels.linear(x, self.weight, self.out_features, self.keep_argmax)
        if not self.use_onednn:
            return F.linear(x, self.weight)
        n = x.shape[0]
        if n < self.min_rows:
            # Rows are independent: the padding changes nothing in the first n.
            padded = F.pad(x, (0, 0, 0, self.min_rows - n))
            return torch.ops.mkldnn._linear_pointwise(padded, self.weight, None, "none", [],
                                                      "")[:n]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def graph_matmul(self, n_rows: int) -> Callable[[Tensor, Tensor], Tensor] | None:
        """The matmul of a CUDA-graph step of n_rows rows: its tier's, None for cuBLAS."""
        for rows, matmul in self.graph_matmuls:
            if n_rows <= rows:
                return matmul
        return None


def onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's linear for CPU tensors of `dtype`, and it agrees
    with F.linear on a probe."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w = torch.randn(3, 64).to(dtype), torch.randn(48, 64).to(dtype)
        want = F.linear(x, w).float()
        plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        packed = PackedLinear(w, use_onednn=True)(x)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return all(torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)
               for got in (plain, packed))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads, config.n_kv_heads, config.head_dim)
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

        self.qkv: PackedLinear | None = None  # the fast path, see `pack`
        self.o: PackedLinear | None = None
        self.kernels: StepKernels | None = None  # fused rotary/store/attention, `pack`

    def pack(self, use_onednn: bool, kernels: StepKernels | None = None) -> None:
        """Fuse q/k/v into one matmul (one read of x, one launch) and free the originals;
        with `kernels`, steps with a KV cache rotate, store and attend (decode rows) in
        fused kernels."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.qkv = PackedLinear(w, use_onednn, kernels=kernels)
        self.o = PackedLinear(self.o_proj.weight, use_onednn, kernels=kernels)
        self.kernels = kernels
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVCachePool | None,
                batch: AttentionBatch | None, lora: LoraBatch | None = None) -> Tensor:
        n_tokens, n_qk = x.shape[0], self.n_heads + self.n_kv_heads
        if self.qkv is not None:
            qkv = self.qkv(x)
            if lora is not None:
                lora.add(self.layer, "qkv", x, qkv)
            qkv = qkv.view(n_tokens, n_qk + self.n_kv_heads, self.head_dim)
            if self.kernels is not None and kv is not None:
                assert batch is not None
                # One pass: rotate q and k, store K and V (what the branch below does in ~12
                # small ops), then the decode rows attend in a kernel of the same kind.
                k_cache, v_cache = kv.k[self.layer], kv.v[self.layer]
                q = self.kernels.rope_store(qkv, cos, sin, k_cache, v_cache, batch.slot_ids,
                                            batch.positions, self.n_heads)
                out = attend_cached(q, k_cache, v_cache, batch, self.kernels)
                return self._out(out.view(n_tokens, self.n_heads * self.head_dim), lora)
            # q and k heads side by side: one rotation for both (fewer small ops per layer).
            q, k = apply_rope(qkv[:, :n_qk], cos, sin).split([self.n_heads, self.n_kv_heads], 1)
            v = qkv[:, n_qk:]  # (T, KVH, D)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if lora is not None:  # (the deltas of the packed q/k/v, split)
                q, k, v = lora.add(self.layer, "qkv", x, torch.cat([q, k, v], -1)).split(
                    [q.shape[-1], k.shape[-1], v.shape[-1]], -1)
            q = q.reshape(n_tokens, self.n_heads, self.head_dim)  # (T, H, D)
            k = k.reshape(n_tokens, self.n_kv_heads, self.head_dim)  # (T, KVH, D)
            v = v.reshape(n_tokens, self.n_kv_heads, self.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            out = attend_causal(q, k, v)
        else:
            assert batch is not None
            kv.write(self.layer, batch.slot_ids, batch.positions, k, v)
            out = attend_cached(q, kv.k[self.layer], kv.v[self.layer], batch, self.kernels)
        return self._out(out.reshape(n_tokens, self.n_heads * self.head_dim), lora)

    def _out(self, out: Tensor, lora: LoraBatch | None) -> Tensor:
        y = self.o(out) if self.o is not None else self.o_proj(out)
        return y if lora is None else lora.add(self.layer, "o", out, y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # (LoRA deltas are the layer's)
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.gate_up: PackedLinear | None = None  # the fast path, see Attention.pack
        self.down: PackedLinear | None = None
        self.kernels: StepKernels | None = None  # fused SiLU * up, see `pack`

    def pack(self, use_onednn: bool, kernels: StepKernels | None = None) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up = PackedLinear(w, use_onednn, kernels=kernels)
        self.down = PackedLinear(self.down_proj.weight, use_onednn, kernels=kernels)
        self.kernels = kernels
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: Tensor, lora: LoraBatch | None = None) -> Tensor:
        if self.gate_up is None or self.down is None:
            if lora is None:
                return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
            gate_up = lora.add(self.layer, "gate_up", x,
                               torch.cat([self.gate_proj(x), self.up_proj(x)], -1))
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
            return lora.add(self.layer, "down", hidden, self.down_proj(hidden))
        gate_up = self.gate_up(x)
        if lora is not None:
            lora.add(self.layer, "gate_up", x, gate_up)
        if self.kernels is not None:  # fused (C: as LlamaModel's decode step, to the bit)
            hidden = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        out = self.down(hidden)
        return out if lora is None else lora.add(self.layer, "down", hidden, out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config, layer)

    def forward(self, x: Tensor, delta: Tensor | None, cos: Tensor, sin: Tensor,
                kv: KVCachePool | None, batch: AttentionBatch | None,
                lora: LoraBatch | None = None) -> tuple[Tensor, Tensor]:
        """The residual stream comes in as x + delta (delta None: x alone) and goes out the
        same way, (h, mlp output) unsummed, so that each residual add happens inside the next
        norm's pass (RMSNorm.add_forward: one C kernel on the fast path)."""
        if delta is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            residual, normed = self.input_layernorm.add_forward(x, delta)
        attn = self.self_attn(normed, cos, sin, kv, batch, lora)
        h, normed = self.post_attention_layernorm.add_forward(residual, attn)
        return h, self.mlp(normed, lora)


class LlamaBody(nn.Module):
    """Embedding, decoder layers and final norm: HF's `model.*` keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class LlamaModel(nn.Module):
    """Token ids at explicit positions -> next-token logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.lm_head_packed: PackedLinear | None = None
        self.cpu_kernels: cpu_kernels.CpuKernels | None = None  # set by `pack` where they load
        # The C decode step's view of the layers over the last pool used, None where the path
        # does not apply (_decode_in_c).
        self._decode_model: tuple[KVCachePool, cpu_kernels.DecodeModel | None] | None = None
        # Not a parameter and not in checkpoints; rebuilt by `init_rope` after loading.
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def pack(self, use_cpu_kernels: bool = True, use_gpu_kernels: bool = True,
             kernels: StepKernels | None = None) -> None:
        """Switch to the fast path: fused q/k/v and gate/up projections (one matmul each) run
        by PackedLinear, and fused kernels for the rest of a layer where they apply. On CPU in
        float32 the C kernels where they build (`use_cpu_kernels`, cpu_kernels.py: the
        linears, norms, rotary + K/V store, decode attention), else oneDNN's linears and the
        norms as LayerNorm (RMSNorm.pack). On a GPU, cuBLAS's matmuls and Triton's kernels
        for the norms, rotary + K/V store, SiLU * up and decode attention
        (`use_gpu_kernels`, triton_kernels.py). `kernels` forces a set (tests run Triton's on
        CPU under its interpreter). The reference modules and checkpoint names are gone
        afterwards. Tested against the reference."""
        weight = self.lm_head.weight
        on_cpu = weight.device.type == "cpu"
        cpu_fp32 = on_cpu and weight.dtype == torch.float32
        use_onednn = on_cpu and onednn_linear_works(weight.dtype)
        self.cpu_kernels = None
        if kernels is None and cpu_fp32 and use_cpu_kernels:
            kernels = self.cpu_kernels = cpu_kernels.load()
        elif kernels is None and weight.device.type == "cuda" and use_gpu_kernels:
            from model import triton_kernels
            kernels = triton_kernels.for_model(self.config, weight.dtype, weight.device)
        # Heads the kernels cannot take keep PyTorch's rotary and attention (the norms and
        # SiLU * up still fuse).
        attn_kernels = kernels
        if kernels is not None and not kernels.handles_head_dim(self.config.head_dim):
            attn_kernels = None
        for layer in self.model.layers:
            layer.self_attn.pack(use_onednn, attn_kernels)
            layer.mlp.pack(use_onednn, kernels)
        if cpu_fp32 or kernels is not None:
            for norm in self.modules():
                if isinstance(norm, RMSNorm):
                    norm.pack(kernels)
        # A tied lm_head stays in the dense layout: reordering would copy the embedding.
        tied = weight is self.model.embed_tokens.weight
        self.lm_head_packed = PackedLinear(weight, use_onednn, reorder=not tied,
                                           kernels=kernels)
        self.lm_head_packed.keep_argmax = True
        del self.lm_head
        self._use_graph_matmuls(kernels)

    def _use_graph_matmuls(self, kernels: StepKernels | None) -> None:
        """With Triton's kernels, their tiled matmuls for the few rows of CUDA-graph decode
        steps (`graph_step`), per weight shape and tier of rows, where one measured faster
        than cuBLAS here (on an H100 in bf16 up to 16 rows o_proj, gate_up_proj and the
        lm_head: 0.25 ms of a 5.9 ms step at 1 row; up to 64, gate_up_proj, the lm_head and
        qkv_proj: with the graph's contiguous inputs, 8.14 -> 7.78 ms at 64 rows; README,
        Performance, GPU)."""
        choose = getattr(kernels, "graph_matmuls", None)
        if choose is None:  # none, or the C kernels (their linears are their own)
            return
        linears = [self.lm_head_packed]
        for layer in self.model.layers:
            linears += [layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down]
        # (on CPU, where tests force these kernels, oneDNN's blocked weights are not plain)
        packed = [lin for lin in linears if lin is not None and not lin.weight.is_mkldnn]
        chosen = choose([lin.weight for lin in packed])
        for lin in packed:
            lin.graph_matmuls = tuple(
                (rows, None if tiling is None
                 else functools.partial(kernels.tiled_linear, tiling=tiling))
                for rows, tiling in chosen[tuple(lin.weight.shape)])
        tiers: dict[int, list[str]] = {}
        for (n, k), choice in sorted(chosen.items()):
            for rows, tiling in choice:
                tiers.setdefault(rows, []).extend([f"{n}x{k}"] if tiling is not None else [])
        logger.info("tiled matmuls in CUDA-graph steps, cuBLAS for the other weights: %s",
                    "; ".join(f"up to {rows} rows for {', '.join(names) or 'none'}"
                              for rows, names in tiers.items()))

    @property
    def attends_by_slot(self) -> bool:
        """Whether decode attention reads each row's own slot (the C and Triton kernels), so
        that the slots in use need not be packed: PyTorch's ops read them as one run of
        slots, idle ones included, or gather them."""
        return all(layer.self_attn.kernels is not None for layer in self.model.layers)

    def init_rope(self, device: torch.device | str) -> None:
        c = self.config
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(device)

    def rope_angles(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (T, 1, head_dim) for each token's position, computed in float32; the
        1 broadcasts over heads."""
        freqs = positions.float()[:, None, None] * self.inv_freq  # (T, 1, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, 1, D): rotate-half layout
        cos, sin = emb.cos(), emb.sin()
        scaling = self.config.rope_scaling
        if scaling is not None and scaling.cos_sin_factor != 1.0:  # (yarn's)
            cos, sin = cos * scaling.cos_sin_factor, sin * scaling.cos_sin_factor
        return cos.to(dtype), sin.to(dtype)

    def forward(self, input_ids: Tensor, positions: Tensor, kv: KVCachePool | None = None,
                batch: AttentionBatch | None = None,
                logits_indices: Tensor | None = None,
                before_compute: Callable[[], None] | None = None,
                lora: LoraBatch | None = None) -> Tensor:
        """input_ids, positions (T,) -> logits (N, vocab) in float32.

        `logits_indices` picks the N token rows whose logits are wanted (usually each
        sequence's last token); None means all T. `before_compute` is called once, as the
        computing starts: for the C decode step just before its call, which runs without the
        GIL, so that Python work the caller starts there (another thread's) overlaps it.
        `lora`: the rows that run LoRA adapters (model/lora.py; not the C decode step).
        """
        decode_model = None if lora is not None else self._decode_in_c(kv, batch,
                                                                      logits_indices)
        if decode_model is not None:
            assert self.cpu_kernels is not None and batch is not None
            assert batch.decode_lens is not None and self.lm_head_packed is not None
            x = self.cpu_kernels.decode_layers(decode_model, input_ids, batch.slot_ids,
                                               positions, batch.decode_lens,
                                               batch.decode_max_len, before_call=before_compute)
            return self.lm_head_packed(x).float()
        if before_compute is not None:
            before_compute()
        x, delta = self._layers(input_ids, positions, kv, batch, lora)
        return self._logits(self._final_norm(x, delta, logits_indices))

    def forward_pooled(self, input_ids: Tensor, positions: Tensor, kv: KVCachePool | None,
                       batch: AttentionBatch | None, logits_indices: Tensor,
                       hidden_indices: Tensor,
                       before_compute: Callable[[], None] | None = None,
                       lora: LoraBatch | None = None) -> tuple[Tensor, Tensor]:
        """forward's logits, and the final normalized hidden states (N', dim) of the
        `hidden_indices` rows in float32: what embeddings pool (a step with prompts in it:
        never the C decode step)."""
        if before_compute is not None:
            before_compute()
        x, delta = self._layers(input_ids, positions, kv, batch, lora)
        return (self._logits(self._final_norm(x, delta, logits_indices)),
                self._final_norm(x, delta, hidden_indices).float())

    def _layers(self, input_ids: Tensor, positions: Tensor, kv: KVCachePool | None,
                batch: AttentionBatch | None, lora: LoraBatch | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """The residual stream after the last layer, as x + delta (see DecoderLayer)."""
        x = self.model.embed_tokens(input_ids)  # (T, dim)
        cos, sin = self.rope_angles(positions, x.dtype)
        delta: Tensor | None = None
        for layer in self.model.layers:
            x, delta = layer(x, delta, cos, sin, kv, batch, lora)
        return x, delta

    def _final_norm(self, x: Tensor, delta: Tensor | None, rows: Tensor | None) -> Tensor:
        """The final norm of `rows` of the stream (None: all); the stream is read, never
        changed (add_forward writes a new tensor), so rows may be normed twice."""
        if rows is not None:
            x = x[rows]
            delta = None if delta is None else delta[rows]
        return self.model.norm(x) if delta is None else self.model.norm.add_forward(x, delta)[1]

    def _logits(self, x: Tensor) -> Tensor:
        packed = self.lm_head_packed
        logits = packed(x) if packed is not None else self.lm_head(x)
        return logits.float()

    def _decode_in_c(self, kv: KVCachePool | None, batch: AttentionBatch | None,
                     logits_indices: Tensor | None) -> cpu_kernels.DecodeModel | None:
        """The C decode step (CpuKernels.decode_layers) for a decode-only step of the packed
        CPU path whose every linear runs the C kernel: the embedding and the layers in one
        call, without a return to Python (and the GIL) between their ~100 kernels. Else None:
        prefill steps keep the layer-by-layer path (same kernels), where Python's share is
        small. The logits are the same to the last bit (tested).

        The bench model's decode step, both paths in one process (medians of 12 interleaved
        blocks of 4 steps, two runs): 6.0-6.2 / 5.0-5.9 / 11.0 / 34.1-36.2 ms -> 5.2-5.6 /
        4.3-5.2 / 9.9-10.2 / 33.0-34.9 ms at 1 / 4 / 16 / 64 rows. And the event loop, which
        needs the GIL for every streamed token, no longer stalls the step between kernels.
        Taking the embedding and the rotary angles (from per-position tables) into the call
        as well saved another 0.16-0.21 ms of the 16-row step: seven small PyTorch ops."""
        kernels = self.cpu_kernels
        if (kernels is None or kv is None or batch is None or batch.prefills
                or logits_indices is not None or self.lm_head_packed is None):
            return None
        if self._decode_model is None or self._decode_model[0] is not kv:
            self._decode_model = (kv, self._build_decode_model(kv))
        return self._decode_model[1]

    def _build_decode_model(self, kv: KVCachePool) -> cpu_kernels.DecodeModel | None:
        layers, tensors = [], []
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv, attn.o, mlp.gate_up, mlp.down)
            if any(lin is None or lin.kernels is None for lin in linears):
                return None  # some linear runs oneDNN: not this path
            parts = [layer.input_layernorm.weight, attn.qkv.weight, attn.o.weight,
                     layer.post_attention_layernorm.weight, mlp.gate_up.weight,
                     mlp.down.weight, kv.k[i], kv.v[i]]
            if not all(t.dtype == torch.float32 and t.is_contiguous() for t in parts):
                return None
            tensors += parts
            layers.append(cpu_kernels.DecodeLayer(*(t.data_ptr() for t in parts)))
        embed, final_norm = self.model.embed_tokens.weight, self.model.norm.weight
        if not layers or not all(t.dtype == torch.float32 and t.is_contiguous()
                                 for t in (embed, final_norm)):
            return None
        c = self.config
        shape = cpu_kernels.DecodeShape(
            n_layers=len(layers), dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim, hidden=c.hidden_dim, n_slots=kv.n_slots, max_len=kv.max_len,
            vocab=embed.shape[0], eps=self.model.norm.eps, scale=c.head_dim ** -0.5)
        # Every position's angles, computed once by the same ops as rope_angles (so the same
        # bits): a step then reads its rows instead of running six small ops, each slow on a
        # cache that the last step's weights went through.
        cos, sin = (t.reshape(kv.max_len, c.head_dim).contiguous() for t in self.rope_angles(
            torch.arange(kv.max_len, device=embed.device), torch.float32))
        tables = cpu_kernels.DecodeTables(embed.data_ptr(), final_norm.data_ptr(),
                                          cos.data_ptr(), sin.data_ptr())
        return cpu_kernels.DecodeModel((cpu_kernels.DecodeLayer * len(layers))(*layers), shape,
                                       tables, [*tensors, embed, final_norm, cos, sin])
