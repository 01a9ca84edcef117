"""The Triton kernels of the GPU path against the PyTorch ops they replace.

Each test runs on CPU tensors under Triton's interpreter (tests/conftest.py turns it on where
there is no GPU: CI) and, on a GPU host, compiled on CUDA (`pytest -m gpu`). The interpreter
converts to bfloat16 by truncation, not rounding, so bf16 runs on the GPU only.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import llama
from model.attention import AttentionBatch, PrefillSpan
from model.kv_cache import KVCachePool
from model.llama import apply_rope
from tests.conftest import TINY, MakeCheckpoint
from tests.model.test_decode_graphs import check_graph_steps, load

triton_kernels = pytest.importorskip("model.triton_kernels")
if triton_kernels.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not triton_kernels.interpreted(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or triton_kernels.interpreted(),
        reason="needs CUDA, compiled")]),
]
DTYPES = {"cpu": [torch.float32, torch.float16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def dtypes(device: str) -> list[torch.dtype]:
    return DTYPES[device]


K = triton_kernels.TritonKernels()


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of the dtype's step at each value (1 = one rounding)."""
    step = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1e-3)
    return ((got.float() - want.float()).abs() / step).max().item()


def ulp_limit(dtype: torch.dtype) -> int:
    """Half precision: each kernel rounds where the reference does, but a sum or an exp
    computed another way can tip the intermediate's rounding, and the product after it
    carries that step on: two steps. Float32 keeps float32 arithmetic in between, in another
    order: a few steps."""
    return 4 if dtype == torch.float32 else 2


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit under the interpreter, where each product and sum rounds to the dtype as
    the reference's ops do. Compiled, the products may stay in float32 (an FMA, or a
    round trip through the dtype dropped: seen on an H100 in every dtype), so the result
    rounds once where the reference rounds three times: within a rounding of products of
    values up to about 4."""
    if got.device.type == "cpu":
        return torch.equal(got, want)
    step = 4 * torch.finfo(got.dtype).eps
    return torch.allclose(got, want, rtol=step, atol=step)


def test_rms_norm_rounds_as_the_reference(device: str) -> None:
    for dtype in dtypes(device):
        x, delta = (torch.randn(7, 96, device=device).to(dtype) * 3 for _ in range(2))
        weight = (1 + 0.1 * torch.randn(96, device=device)).to(dtype)
        h, got = K.rms_norm(x, weight, 1e-5, delta)
        assert torch.equal(h, x + delta)  # the residual add, bit for bit
        if dtype == torch.float32:
            want = F.rms_norm(x + delta, (96,), weight, 1e-5)
        else:  # RMSNorm.forward's reference for half precision
            want = F.rms_norm(x + delta, (96,), None, 1e-5) * weight
        limit = ulp_limit(dtype)
        assert ulps(got, want) <= limit, dtype
        alone, got_alone = K.rms_norm(x, weight, 1e-5)
        want_alone = F.rms_norm(x, (96,), None, 1e-5) * weight
        assert alone is x and ulps(got_alone, want_alone) <= limit, dtype


def test_silu_mul_is_the_reference(device: str) -> None:
    for dtype in dtypes(device):
        gate_up = (torch.randn(5, 2 * 1100, device=device) * 4).to(dtype)  # two column blocks
        gate, up = gate_up.chunk(2, dim=-1)
        got, want = K.silu_mul(gate_up), F.silu(gate) * up
        if dtype == torch.float32:  # Triton's exp and PyTorch's differ in float32's last bits
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert ulps(got, want) <= ulp_limit(dtype), dtype


TILINGS = [t for tier in triton_kernels.MATMUL_TIERS for t in tier.tilings]


@pytest.mark.parametrize("tiling", TILINGS, ids=str)
def test_tiled_linear_is_the_matmul(device: str, tiling: triton_kernels.MatmulTiling) -> None:
    """Every tiling of every tier, from 1 row to its most, against F.linear, in tiles that do
    not divide the weight (the masked edges): float32 to float32's rounding (an IEEE dot),
    half precision within a rounding of the output (the sum in another order)."""
    for dtype in dtypes(device):
        if device == "cpu" and dtype == torch.bfloat16:
            continue  # the interpreter's matrix product takes no bfloat16
        weight = torch.randn(100, 600, device=device).to(dtype)  # 600: not whole 512s or 128s
        for rows in (1, 3, tiling.rows):
            x = torch.randn(rows, 600, device=device).to(dtype)
            got, want = K.tiled_linear(x, weight, tiling), F.linear(x.float(), weight.float())
            assert got.dtype == dtype and got.shape == (rows, 100)
            tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert torch.allclose(got.float(), want, rtol=tol, atol=tol * 25), (dtype, rows)
    with pytest.raises(ValueError):
        K.tiled_linear(torch.randn(tiling.rows + 1, 600, device=device),
                       torch.randn(100, 600, device=device), tiling)


def test_graph_matmuls_are_chosen_per_shape_and_tier(tiny_checkpoint: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are asked once, with every linear's weight; each linear then runs, in a
    CUDA-graph step only (where they were timed; eagerly a launch costs more), its tier's
    tiling for the rows of the step, and cuBLAS (F.linear) where its tier chose none or
    past the last tier."""
    asked: list[int] = []
    model = load(tiny_checkpoint, pack=False)
    c = model.config
    dim, qkv_shape = c.dim, ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim, c.dim)
    few, more = (tier.tilings[0] for tier in triton_kernels.MATMUL_TIERS)
    top = triton_kernels.MATMUL_TIERS[-1].rows
    kernels = triton_kernels.TritonKernels()

    def choose(weights: list[torch.Tensor]) -> dict:
        asked.append(len(weights))
        shapes = {tuple(w.shape) for w in weights}
        # o_proj: both tiers; qkv: only the second; the rest: cuBLAS
        return {shape: ((16, few if shape == (dim, dim) else None),
                        (top, more if shape in ((dim, dim), qkv_shape) else None))
                for shape in shapes}

    used: list[tuple[int, int]] = []
    monkeypatch.setattr(kernels, "graph_matmuls", choose)
    monkeypatch.setattr(kernels, "tiled_linear", lambda x, w, tiling: used.append(
        (len(x), tiling.rows)) or F.linear(x, w))
    monkeypatch.setattr(llama, "onednn_linear_works", lambda dtype: False)  # plain weights
    model.pack(kernels=kernels)
    assert asked == [4 * model.config.n_layers + 1]
    attn = model.model.layers[0].self_attn
    o, qkv, down = attn.o, attn.qkv, model.model.layers[0].mlp.down
    assert o is not None and qkv is not None and down is not None
    assert tuple(o.weight.shape) == (dim, dim) and tuple(qkv.weight.shape) == qkv_shape
    with llama.graph_step():
        for lin in (o, qkv, down):
            for rows in (2, 16, 17, top, top + 1):
                lin(torch.randn(rows, lin.weight.shape[1]))
    o(torch.randn(3, dim))  # an eager step
    assert used == [(2, 16), (16, 16), (17, top), (top, top)] + [(17, top), (top, top)]


def test_the_fastest_tiling_under_the_margin_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tier's choice from its timings summed over its rows: the fastest tiling if under
    `margin` of cuBLAS (the last time), else cuBLAS (None), also where the timing fails (but
    a device fault is raised); a tiling that fails to launch is not timed."""
    tiers = triton_kernels.MATMUL_TIERS
    tier = dataclasses.replace(tiers[-1], timed_at=(2, 5))
    times: list[list[float]] = []
    monkeypatch.setattr(triton_kernels, "_fastest_over",
                        lambda weights, repeats, *matmuls: times.pop(0)[:len(matmuls)])
    weights = [torch.randn(40, 64) for _ in range(3)]
    a, b, c = tier.tilings
    # Summed over the rows timed: c (3.5 ms against cuBLAS's 18), where the first rows alone
    # would pick a and the last b
    times[:] = [[1.0, 3.0, 2.0, 9.0], [3.0, 1.0, 1.5, 9.0]]
    assert K._fastest_tiling(tier, weights, 1, 0.97) == c
    times[:] = [[3.0, 2.95, 4.0, 3.0], [3.0, 2.95, 4.0, 3.0]]  # b: a near tie
    assert K._fastest_tiling(tier, weights, 1, 0.97) is None

    def raises(message: str) -> None:
        def fastest_over(*args: object) -> list[float]:
            raise RuntimeError(message)
        monkeypatch.setattr(triton_kernels, "_fastest_over", fastest_over)

    raises("capture failed")  # timing fails: cuBLAS
    assert K._fastest_tiling(tier, weights, 1, 0.97) is None
    raises("CUDA error: an illegal memory access was encountered")  # the device: no more
    with pytest.raises(RuntimeError, match="illegal memory access"):
        K._fastest_tiling(tier, weights, 1, 0.97)
    monkeypatch.setattr(triton_kernels, "_fastest_over",
                        lambda weights, repeats, *matmuls: times.pop(0)[:len(matmuls)])
    real = K.tiled_linear

    def fails_for_b(x: torch.Tensor, w: torch.Tensor, tiling: object) -> torch.Tensor:
        if tiling == b:
            raise RuntimeError("out of resources: shared memory")
        return real(x, w, tiling)

    monkeypatch.setattr(K, "tiled_linear", fails_for_b)
    times[:] = [[3.0, 1.0, 3.0], [3.0, 1.0, 3.0]]  # (a, c, cuBLAS)
    assert K._fastest_tiling(tier, weights, 1, 0.97) == c
    assert c != b and a != c


def test_rope_store_rotates_and_stores_as_the_reference(device: str) -> None:
    n_heads, n_kv, head_dim, n_slots, max_len = 8, 2, 32, 5, 40
    slots = torch.tensor([3, 0, 4, 3, 1, 9], device=device)  # the last one is outside
    positions = torch.tensor([7, 0, 39, 8, 20, 3], device=device)
    for dtype in dtypes(device):
        qkv = torch.randn(6, n_heads + 2 * n_kv, head_dim, device=device).to(dtype)
        angles = torch.rand(6, 1, head_dim // 2, device=device) * 100
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        k_cache = torch.full((n_slots, n_kv, max_len, head_dim), 7.0, device=device).to(dtype)
        v_cache = torch.full_like(k_cache, 7.0)
        q = K.rope_store(qkv, cos, sin, k_cache, v_cache, slots, positions, n_heads)

        rotated = apply_rope(qkv[:, :n_heads + n_kv], cos, sin)  # the layer's reference
        assert same(q, rotated[:, :n_heads]), dtype
        want_k, want_v = (torch.full_like(k_cache, 7.0) for _ in range(2))
        inside = slots < n_slots
        want_k[slots[inside], :, positions[inside]] = rotated[inside, n_heads:]
        want_v[slots[inside], :, positions[inside]] = qkv[inside, n_heads + n_kv:]
        assert same(k_cache, want_k) and torch.equal(v_cache, want_v), dtype


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: list[int], lens: list[int]) -> torch.Tensor:
    """Each row alone, in float64, its query heads grouped onto their KV heads."""
    n_kv = k_cache.shape[1]
    out = []
    for row, (slot, n) in enumerate(zip(slots, lens, strict=True)):
        qs = q[row].double().view(n_kv, -1, q.shape[-1])
        ks, vs = k_cache[slot, :, :n].double(), v_cache[slot, :, :n].double()
        out.append(F.scaled_dot_product_attention(qs, ks, vs).reshape(q.shape[1:]))
    return torch.stack(out)


@pytest.mark.parametrize("n_heads, n_kv", [(8, 2), (4, 4), (6, 1)])
def test_decode_attention_reads_each_rows_own_keys(device: str, n_heads: int,
                                                   n_kv: int) -> None:
    head_dim, max_len = 32, 700
    slots, lens = [4, 1, 2, 0], [1, 300, 700, 64]  # one key, a part block, all, one block
    slot_ids = torch.tensor(slots, device=device)
    seen = torch.tensor(lens, device=device)
    for dtype in dtypes(device):
        q = torch.randn(4, n_heads, head_dim, device=device).to(dtype)
        k_cache, v_cache = (torch.randn(5, n_kv, max_len, head_dim, device=device).to(dtype)
                            for _ in range(2))
        want = reference_attention(q, k_cache, v_cache, slots, lens)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for splits in (None, 1, 3, 11):  # 11: some splits past a row's length see no key
            got = K.decode_attention(q, k_cache, v_cache, slot_ids, seen, 700, splits=splits)
            assert got.dtype == dtype
            assert (got.double() - want).abs().max().item() < tol, (dtype, splits)


def test_decode_attention_stays_inside_the_pool(device: str) -> None:
    """A slot outside the pool reads nothing (zeros), a length past max_len stops there:
    nothing the scheduler asks for, but a CUDA graph cannot raise instead."""
    q = torch.randn(2, 4, 16, device=device)
    k_cache, v_cache = (torch.randn(3, 2, 70, 16, device=device) for _ in range(2))
    slots, lens = torch.tensor([5, 1], device=device), torch.tensor([10, 99], device=device)
    for splits in (1, 2):
        got = K.decode_attention(q, k_cache, v_cache, slots, lens, 70, splits=splits)
        assert torch.equal(got[0], torch.zeros_like(got[0]))
        want = reference_attention(q[1:], k_cache, v_cache, [1], [70])
        assert (got[1:].double() - want).abs().max().item() < 1e-5


def test_attention_splits() -> None:
    splits = triton_kernels.attention_splits
    assert splits(1, 32, 190, 132) == 1  # too few keys to split
    assert splits(1, 32, 1024, 132) == 4  # 256 keys each at least
    assert splits(1, 32, 8192, 132) == 9  # two programs per multiprocessor
    assert splits(64, 32, 8192, 132) == 1  # the rows fill the GPU
    assert splits(1, 1, 131072, 132) == triton_kernels.MAX_SPLITS  # the combine holds them all


def test_kernels_that_fail_to_run_leave_the_model_on_pytorchs_ops(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """for_model runs every kernel at the model's widths first: a failure to build or launch
    (a Docker image without a C compiler for Triton's launcher, too little shared memory)
    leaves the model on PyTorch's ops with a warning instead of failing its first step."""
    if not triton_kernels.interpreted():
        pytest.skip("the CPU run of the kernels needs TRITON_INTERPRET=1")
    cpu = torch.device("cpu")
    assert isinstance(triton_kernels.for_model(TINY, torch.float32, cpu),
                      triton_kernels.TritonKernels)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment")
    monkeypatch.setattr(triton_kernels.TritonKernels, "decode_attention", broken)
    with caplog.at_level("WARNING", logger="model.triton_kernels"):
        assert triton_kernels.for_model(TINY, torch.float32, cpu) is None
    assert "Failed to find C compiler" in caplog.text


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    *([torch.AcceleratorError("an illegal memory access")]
      if hasattr(torch, "AcceleratorError") else []),
], ids=str)
def test_a_device_fault_in_the_probe_is_not_a_fallback(monkeypatch: pytest.MonkeyPatch,
                                                       error: Exception) -> None:
    """A fault of the device leaves its context unusable: falling back to PyTorch's ops on it
    would only fail later, with a misleading message."""
    def faulting(*args: object, **kwargs: object) -> None:
        raise error
    monkeypatch.setattr(triton_kernels.TritonKernels, "silu_mul", faulting)
    with pytest.raises(type(error)):
        triton_kernels.for_model(TINY, torch.float32, torch.device("cpu"))


def test_the_probe_runs_every_variant_serving_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both RMSNorms (the first layer's has no residual) and a pool of more than one slot
    (Triton compiles an integer argument of 1 as a constant)."""
    if not triton_kernels.interpreted():
        pytest.skip("the CPU run of the kernels needs TRITON_INTERPRET=1")
    kernels = triton_kernels.TritonKernels()
    calls: list[tuple[str, object]] = []
    for name in ("rms_norm", "decode_attention"):
        def spy(*args: object, name: str = name,
                real: object = getattr(kernels, name), **kwargs: object) -> object:
            calls.append((name, args[3] if name == "rms_norm" and len(args) > 3
                          else args[1].shape[0] if name == "decode_attention" else None))
            return real(*args, **kwargs)  # type: ignore[operator]
        monkeypatch.setattr(kernels, name, spy)
    kernels.probe(TINY, torch.float32, torch.device("cpu"))
    norms = [residual for name, residual in calls if name == "rms_norm"]
    assert None in norms and any(r is not None for r in norms)
    assert {slots for name, slots in calls if name == "decode_attention"} == {2}


def test_bad_inputs_are_refused() -> None:
    q = torch.randn(2, 4, 16)
    cache = torch.randn(3, 2, 10, 16)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError):
        K.decode_attention(q, cache, cache, ids, ids, 11)  # longest past the cache
    with pytest.raises(ValueError):
        K.decode_attention(q.half(), cache, cache, ids, ids, 5)
    with pytest.raises(ValueError):
        K.rope_store(torch.randn(2, 7, 16), torch.randn(2, 16), torch.randn(2, 16), cache,
                     cache, ids, ids, 4)  # 7 heads is not 4 + 2 x 2
    with pytest.raises(ValueError):
        K.rms_norm(torch.randn(2, 8), torch.randn(9), 1e-5)
    with pytest.raises(ValueError):
        K.silu_mul(torch.randn(2, 7))


def test_model_with_triton_kernels_is_the_reference(tiny_checkpoint: Path, device: str
                                                    ) -> None:
    """Prefill, a mixed step and a decode step through the KV cache: the model on Triton's
    kernels gives the reference model's logits (float32), and the CUDA-graph layout too."""
    ref = load(tiny_checkpoint, device=device, pack=False)
    fast = load(tiny_checkpoint, device=device, pack=False)
    fast.pack(kernels=K)
    assert fast.cpu_kernels is None and fast.model.layers[0].mlp.kernels is K
    pools = [KVCachePool(ref.config, 4, 300, torch.float32, device) for _ in range(2)]

    def both(ids: list[int], positions: list[int], batch: AttentionBatch) -> None:
        args = (torch.tensor(ids, device=device), torch.tensor(positions, device=device))
        with torch.inference_mode():
            want, got = (m(*args, pool, batch) for m, pool in zip((ref, fast), pools, strict=True))
        assert (got - want).abs().max().item() < 1e-4

    prompt = torch.randint(0, 1000, (40,)).tolist()
    both(prompt, list(range(40)), AttentionBatch.build([], [], [PrefillSpan(2, 0, 40, 0)],
                                                       device))
    both([7, 1, 2, 3, 4, 5], [40, 0, 1, 2, 3, 4],
         AttentionBatch.build([2], [40], [PrefillSpan(0, 0, 5, 1)], device))
    both([9, 8], [5, 41], AttentionBatch.build([0, 2], [5, 41], [], device))
    # The graph layout (pad rows among the slots). The interpreter runs a program at a time:
    # short prompts on CPU.
    check_graph_steps(fast, capture=device == "cuda", atol=1e-4, prompt_lens=None
                      if device == "cuda" else {0: 20, 1: 9, 2: 7, 3: 12, 4: 5, 5: 1})


def test_heads_the_kernels_cannot_take_keep_pytorchs_attention(make_checkpoint: MakeCheckpoint
                                                                ) -> None:
    """Heads of 24 (not a power of two): rotary and attention stay PyTorch's, the norms and
    SiLU * up run the kernels, and the logits are the reference's (on CPU, interpreted)."""
    if not triton_kernels.interpreted():
        pytest.skip("the CPU run of the kernels needs TRITON_INTERPRET=1")
    folder = make_checkpoint(dataclasses.replace(TINY, dim=72, n_heads=3, n_kv_heads=3,
                                                 head_dim=24))
    ref, fast = load(folder, pack=False), load(folder, pack=False)
    fast.pack(kernels=K)
    layer = fast.model.layers[0]
    assert fast.config.head_dim == 24
    assert layer.self_attn.kernels is None and layer.mlp.kernels is K
    assert layer.input_layernorm.kernels is K
    ids, positions = torch.randint(0, 1000, (9,)), torch.arange(9)
    batch = AttentionBatch.build([], [], [PrefillSpan(0, 0, 9, 0)], "cpu")
    pools = [KVCachePool(ref.config, 1, 16, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        want, got = (m(ids, positions, pool, batch) for m, pool in zip((ref, fast), pools,
                                                                        strict=True))
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels.interpreted(),
                    reason="needs CUDA, compiled")
def test_bf16_model_at_llama_head_size_matches_pytorchs_ops(make_checkpoint: MakeCheckpoint
                                                             ) -> None:
    """Llama's head size (128), GQA 2:1, in bf16 on the GPU: the kernels' logits (the tiled
    matmuls' too) against PyTorch's ops (`--no-gpu-kernels`) for a prefill and decode steps
    whose keys are split."""
    from model.weights import load_checkpoint
    folder = make_checkpoint(dataclasses.replace(TINY, dim=512, n_heads=4, n_kv_heads=2,
                                                 head_dim=128, hidden_dim=1024))
    fast, ref = (load_checkpoint(folder, torch.bfloat16, "cuda") for _ in range(2))
    fast.pack()
    ref.pack(use_gpu_kernels=False)
    assert fast.config.head_dim == 128
    kernels = fast.model.layers[0].self_attn.kernels
    assert kernels is not None
    assert ref.model.layers[0].self_attn.kernels is None
    # Every linear on the tiled matmuls for its few rows, whatever they measured here
    for layer in fast.model.layers:
        for lin in (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down):
            lin.graph_matmuls = tuple(
                (tier.rows, functools.partial(kernels.tiled_linear, tiling=tier.tilings[0]))
                for tier in triton_kernels.MATMUL_TIERS)
    pools = [KVCachePool(fast.config, 2, 1024, torch.bfloat16, "cuda") for _ in range(2)]

    def both(ids: list[int], positions: list[int], batch: AttentionBatch) -> None:
        args = (torch.tensor(ids, device="cuda"), torch.tensor(positions, device="cuda"))
        with torch.inference_mode(), llama.graph_step():  # (where the tiled matmuls run)
            got, want = (m(*args, pool, batch) for m, pool in zip((fast, ref), pools,
                                                                   strict=True))
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() < 0.05 * scale
        # Every row's choice is the reference's, or a near tie in the reference's logits
        # (within 2% of their scale: random bf16 weights leave such ties, and rounding in
        # another order flipped one on an H100, 2026-11-27)
        picked = want.gather(-1, got.argmax(-1, keepdim=True)).squeeze(-1)
        assert (picked >= want.max(-1).values - 0.02 * scale).all()

    prompt = torch.randint(0, 1000, (600,)).tolist()
    both(prompt, list(range(600)), AttentionBatch.build([], [], [PrefillSpan(0, 0, 600, 0)],
                                                        "cuda"))
    both(prompt[:20], list(range(20)),
         AttentionBatch.build([], [], [PrefillSpan(1, 0, 20, 0)], "cuda"))
    for step in range(3):  # 601 and 21 keys: slot 0's split in two (longest 601 >= 512)
        batch = AttentionBatch.build([0, 1], [600 + step, 20 + step], [], "cuda")
        both([5 + step, 9 + step], [600 + step, 20 + step], batch)
