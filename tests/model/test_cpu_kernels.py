"""The C kernels of the packed CPU path (model/cpu_kernels.py): built, cached, equal to the
PyTorch ops they replace, and optional."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import cpu_kernels
from model.attention import AttentionBatch, PrefillSpan, attend_cached
from model.config import ModelConfig
from model.kv_cache import KVCachePool
from model.llama import LlamaModel, PackedLinear, RMSNorm, apply_rope, rope_inv_freq
from model.weights import load_model

COMPILER = cpu_kernels.find_compiler()
HAS_COMPILER = COMPILER is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def kernels() -> cpu_kernels.CpuKernels:
    loaded = cpu_kernels.load()
    assert loaded is not None, "a C compiler is here, so the kernels must build"
    return loaded


@pytest.fixture
def fresh_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """load() uncached, building into an empty cache folder; the cached result is restored
    for the other tests afterwards."""
    monkeypatch.setenv("LLAMA_SERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_SERVE_PREBUILT_KERNELS", raising=False)
    cpu_kernels.load.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels.load.cache_clear()


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, cpu_kernels.CpuKernels]:
    """This CPU's build and, on x86-64, the AVX2 (x86-64-v3) and SSE2 (x86-64) ones, whose
    vector widths and tile heights differ (cpu_kernels.c)."""
    native = cpu_kernels.load()
    assert native is not None
    loaded = {"native": native}
    if platform.machine() == "x86_64":
        assert COMPILER is not None
        folder = tmp_path_factory.mktemp("kernel-builds")
        for march in ("x86-64-v3", "x86-64"):
            if march == "x86-64-v3" and not cpu_kernels.portable_level(cpu_kernels._cpu_flags()):
                continue
            path = cpu_kernels._compile(COMPILER, (f"-march={march}", *cpu_kernels.CFLAGS),
                                        folder / f"{march}.so")
            loaded[march] = cpu_kernels.CpuKernels(ctypes.CDLL(str(path)), path)
    return loaded


def filled_pool(n_slots: int, n_kv_heads: int, max_len: int, head_dim: int) -> KVCachePool:
    config = ModelConfig(dim=n_kv_heads * head_dim, n_layers=1, n_heads=n_kv_heads,
                         n_kv_heads=n_kv_heads, vocab_size=16, hidden_dim=8,
                         head_dim=head_dim)
    pool = KVCachePool(config, n_slots, max_len, torch.float32, "cpu")
    pool.k[0].normal_()
    pool.v[0].normal_()
    return pool


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("slots, lens", [
    ((0,), (1,)),  # one key: the row's own
    ((0, 1, 2, 3), (5, 64, 17, 33)),  # a packed run of slots, lengths up to the slot's end
    ((6, 1, 3), (40, 2, 64)),  # out of order, with holes
], ids=["one-key", "packed", "sparse"])
def test_decode_attention_equals_sdpa(builds: dict[str, cpu_kernels.CpuKernels], build: str,
                                      group: int, head_dim: int, slots: tuple[int, ...],
                                      lens: tuple[int, ...]) -> None:
    """Each row attends to exactly the first lens[r] keys of its slot, as the SDPA path with
    its boolean mask does; any head size (4 or 8 vectors of the build take the register path,
    others the generic loop), grouped-query heads sharing their K/V head."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    kernels = builds[build]
    n_kv_heads, max_len = 2, 64
    pool = filled_pool(8, n_kv_heads, max_len, head_dim)
    q = torch.randn(len(slots), n_kv_heads * group, head_dim)
    batch = AttentionBatch.build(list(slots), [n - 1 for n in lens], [], "cpu")
    want = attend_cached(q, pool.k[0], pool.v[0], batch)
    got = attend_cached(q, pool.k[0], pool.v[0], batch, kernels)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


@needs_compiler
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rms_norm_and_residual_add_equal_torch(kernels: cpu_kernels.CpuKernels,
                                               scale: float) -> None:
    """RMSNorm (small values, where eps counts, ordinary and large ones), alone and after a
    residual add, for decode and prefill row counts and a strided input; to rounding."""
    norm = RMSNorm(512, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512))
    wide = torch.randn(300, 1024) * scale
    x, delta = wide[:, :512], torch.randn(300, 512) * scale  # x: rows 1024 floats apart
    want_norm, want_sum = norm(x), x + delta
    want_add_norm = norm(want_sum)
    norm.pack(kernels)
    for rows in (1, 4, 300):
        got = norm(x[:rows])
        assert torch.allclose(got, want_norm[:rows], rtol=1e-5, atol=1e-6), rows
        h, got = norm.add_forward(x[:rows], delta[:rows])
        assert torch.equal(h, want_sum[:rows])
        assert torch.allclose(got, want_add_norm[:rows], rtol=1e-5, atol=1e-6), rows


@needs_compiler
def test_rope_store_rotates_and_fills_the_cache(kernels: cpu_kernels.CpuKernels) -> None:
    """What the PyTorch path does in a dozen ops: q and k rotated at each token's position,
    K and V written at its (slot, position), nothing else in the pool touched."""
    n_heads, n_kv_heads, head_dim = 4, 2, 64
    pool = filled_pool(4, n_kv_heads, 32, head_dim)
    want_pool = filled_pool(4, n_kv_heads, 32, head_dim)
    want_pool.k[0].copy_(pool.k[0])
    want_pool.v[0].copy_(pool.v[0])
    slots, positions = torch.tensor([2, 0, 0, 0, 3]), torch.tensor([17, 4, 5, 6, 31])
    qkv = torch.randn(5, n_heads + 2 * n_kv_heads, head_dim)
    freqs = positions.float()[:, None, None] * rope_inv_freq(head_dim, 10000.0, None)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    n_qk = n_heads + n_kv_heads
    q_want, k_want = apply_rope(qkv[:, :n_qk], cos, sin).split([n_heads, n_kv_heads], 1)
    want_pool.write(0, slots, positions, k_want, qkv[:, n_qk:])
    q = kernels.rope_store(qkv, cos, sin, pool.k[0], pool.v[0], slots, positions, n_heads)
    assert torch.allclose(q, q_want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(pool.k[0], want_pool.k[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(pool.v[0], want_pool.v[0])
    with pytest.raises(IndexError):  # a position past the slot's end: refused, not written
        kernels.rope_store(qkv, cos, sin, pool.k[0], pool.v[0], slots,
                           torch.tensor([17, 4, 5, 6, 32]), n_heads)
    assert torch.allclose(pool.k[0], want_pool.k[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):  # float64 heads
        kernels.rope_store(qkv.double(), cos, sin, pool.k[0], pool.v[0], slots, positions,
                           n_heads)
    with pytest.raises(ValueError):  # heads that do not add up to H + 2 KVH
        kernels.rope_store(qkv, cos, sin, pool.k[0], pool.v[0], slots, positions, n_heads + 1)


@needs_compiler
def test_decode_attention_checks_what_the_c_code_trusts(kernels: cpu_kernels.CpuKernels) -> None:
    pool = filled_pool(2, 2, 16, 64)
    slots, lens = torch.tensor([0]), torch.tensor([4])
    with pytest.raises(ValueError):  # a row reading past the slot's end
        kernels.decode_attention(torch.randn(1, 4, 64), pool.k[0], pool.v[0], slots, lens, 17)
    with pytest.raises(ValueError):  # float64 queries
        kernels.decode_attention(torch.randn(1, 4, 64, dtype=torch.float64), pool.k[0],
                                 pool.v[0], slots, lens, 4)
    with pytest.raises(ValueError):  # a strided cache view
        kernels.decode_attention(torch.randn(1, 4, 32), pool.k[0][..., :32],
                                 pool.v[0][..., :32], slots, lens, 4)
    with pytest.raises(IndexError):  # a slot outside the pool
        kernels.decode_attention(torch.randn(1, 4, 64), pool.k[0], pool.v[0], torch.tensor([2]),
                                 lens, 4)
    with pytest.raises(IndexError):  # a row longer than the longest it was given
        kernels.decode_attention(torch.randn(1, 4, 64), pool.k[0], pool.v[0], slots, lens, 3)


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("n_out, n_in", [(1, 1), (31, 7), (32, 64), (33, 64), (100, 1408),
                                          (1024, 512)])
def test_linear_equals_matmul(builds: dict[str, cpu_kernels.CpuKernels], build: str,
                              n_out: int, n_in: int) -> None:
    """Every row count (tiles of up to the build's most rows, split evenly, and what is left),
    widths that fill panels exactly or leave a partial last one, and strided rows; within
    float32 rounding of a float64 matmul, as oneDNN is."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    kernels = builds[build]
    weight = torch.randn(n_out, n_in)
    panels = kernels.pack_linear(weight)
    assert panels.numel() == -(-n_out // kernels.panel_width) * kernels.panel_width * n_in
    for n_rows in (0, 1, 2, 3, 5, 7, 12, 13, 16, 25, 64, 130):
        wide = torch.randn(n_rows, n_in + 3)
        for x in (wide[:, :n_in].contiguous(), wide[:, 3:]):  # contiguous, then strided rows
            got = kernels.linear(x, panels, n_out)
            want = (x.double() @ weight.double().T).float()
            assert got.shape == (n_rows, n_out)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * n_in ** 0.5), n_rows
            if n_rows:  # a row gives the same bits alone as in any batch (tile shapes differ)
                assert torch.equal(kernels.linear(x[-1:], panels, n_out), got[-1:]), n_rows


@needs_compiler
def test_linear_checks_what_the_c_code_trusts(kernels: cpu_kernels.CpuKernels) -> None:
    panels = kernels.pack_linear(torch.randn(40, 16))
    with pytest.raises(ValueError):  # an input of another width than the packed weight's
        kernels.linear(torch.randn(2, 17), panels, 40)
    with pytest.raises(ValueError):  # another output count than packed
        kernels.linear(torch.randn(2, 16), panels, 80)
    with pytest.raises(ValueError):  # float64 input
        kernels.linear(torch.randn(2, 16, dtype=torch.float64), panels, 40)
    with pytest.raises(ValueError):  # a 3-d input
        kernels.linear(torch.randn(1, 2, 16), panels, 40)
    with pytest.raises(ValueError):  # a float64 weight
        kernels.pack_linear(torch.randn(40, 16, dtype=torch.float64))


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            start, end = (int(a, 16) for a in first.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise LookupError(f"no mapping holds {address:#x}")


@needs_compiler
@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="no transparent huge pages on this system")
def test_packed_weights_lie_in_memory_advised_for_huge_pages(
        kernels: cpu_kernels.CpuKernels) -> None:
    """Packed panels start on a 2 MB boundary of a private mapping advised for transparent huge
    pages (VmFlags `hg`), so a decode step streams them with few TLB misses; a buffer without
    a whole 2 MB page is not advised, and fresh memory reads as zeros."""
    panels = kernels.pack_linear(torch.randn(3000, 512))  # 6 MB packed
    assert panels.data_ptr() % cpu_kernels.HUGE_PAGE == 0
    assert {"hg"} <= _vm_flags(panels.data_ptr()) and "sh" not in _vm_flags(panels.data_ptr())
    small = cpu_kernels.fresh_floats(1000)
    assert "hg" not in _vm_flags(small.data_ptr())
    assert torch.equal(small, torch.zeros(1000))


@needs_compiler
def test_packed_linear_runs_the_c_linear_only_where_tuned(
        kernels: cpu_kernels.CpuKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the build's linear is tuned (AVX-512) the layer runs it on its panels; elsewhere
    oneDNN's blocked layout; a kept dense weight (a tied lm_head) is never repacked."""
    weight, x = torch.randn(96, 64), torch.randn(5, 64)
    for tuned in (True, False):
        monkeypatch.setattr(kernels, "linear_is_tuned", tuned)
        layer = PackedLinear(weight, use_onednn=True, kernels=kernels)
        assert (layer.kernels is kernels) is tuned
        assert layer.weight.is_mkldnn is not tuned
        assert torch.allclose(layer(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        dense = PackedLinear(weight, use_onednn=True, reorder=False, kernels=kernels)
        assert dense.kernels is None and torch.equal(dense.weight, weight)


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("vocab", [7, 300, 1001])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_sample_gives_each_token_its_share_of_a_uniform_grid(
        builds: dict[str, cpu_kernels.CpuKernels], build: str, vocab: int,
        temperature: float) -> None:
    """Uniform draws on a fine grid land on each token in proportion to softmax(logits / T)
    computed in float64 (so the vectorised exp is accurate to about 1e-4); tokens with a -inf
    logit never; vocabularies past and short of whole 128-token blocks and vectors; each
    build's vector width."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    kernels = builds[build]
    torch.manual_seed(vocab)
    logits = torch.randn(vocab) * 3
    logits[::5] = float("-inf")
    n = 200_000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rows = logits.expand(n, vocab).contiguous()
    ids = kernels.sample(rows, torch.full((n,), 1 / temperature), uniforms)
    want = torch.softmax(logits.double() / temperature, -1) * n
    got = torch.bincount(ids, minlength=vocab).double()
    assert (got - want).abs().max().item() <= 2  # the grid's own rounding, and a boundary
    assert got[::5].sum() == 0


@needs_compiler
def test_sample_edges(kernels: cpu_kernels.CpuKernels) -> None:
    """The ends of [0, 1) take the first and last live tokens; a row without a distribution
    still gives a token in range."""
    logits = torch.tensor([[float("-inf"), 0.5, 2.0, float("-inf")],
                           [float("-inf"), 0.5, 2.0, float("-inf")],
                           [float("-inf")] * 4, [float("nan"), 1.0, 0.0, 2.0]])
    uniforms = torch.tensor([0.0, 1 - 2**-53, 0.5, 0.5], dtype=torch.float64)
    ids = kernels.sample(logits, torch.ones(4), uniforms).tolist()
    assert ids[:2] == [1, 2] and 0 <= ids[2] < 4 and 0 <= ids[3] < 4
    with pytest.raises(ValueError):  # float32 uniforms
        kernels.sample(logits, torch.ones(4), uniforms.float())


@needs_compiler
def test_packed_model_decodes_with_the_kernel(tiny_checkpoint: Path,
                                              kernels: cpu_kernels.CpuKernels) -> None:
    """The server's model on CPU in float32: decode rows (beside a prefill chunk) run the C
    kernels (rotary and store, attention, norms), and every row's logits are the reference
    model's."""
    def load() -> LlamaModel:
        return load_model(tiny_checkpoint, ModelConfig.from_dir(tiny_checkpoint),
                          torch.float32, "cpu")

    reference, model = load(), load()
    model.pack()
    assert all(layer.self_attn.kernels is kernels for layer in model.model.layers)
    assert all(m.kernels is kernels for m in model.modules() if isinstance(m, RMSNorm))
    pool = KVCachePool(model.config, n_slots=4, max_len=64, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 1000, (n,), generator=gen) for n in (9, 30)]
    for slot, seq in zip((0, 2), seqs, strict=True):
        batch = AttentionBatch.build([], [], [PrefillSpan(slot, 0, len(seq) - 1, 0)], "cpu")
        model(seq[:-1], batch.positions, pool, batch)
    new = torch.randint(0, 1000, (12,), generator=gen)
    batch = AttentionBatch.build([0, 2], [8, 29], [PrefillSpan(3, 0, 12, 2)], "cpu")
    ids = torch.cat([torch.stack([s[-1] for s in seqs]), new])
    calls = []
    original = kernels.decode_attention
    kernels.decode_attention = lambda *a: calls.append(1) or original(*a)  # type: ignore
    try:
        out = model(ids, batch.positions, pool, batch)
    finally:
        del kernels.decode_attention
    assert len(calls) == model.config.n_layers
    for row, seq in enumerate(seqs):
        want = reference(seq, torch.arange(len(seq)))[-1]
        assert (out[row] - want).abs().max().item() < 1e-4
    assert (out[2:] - reference(new, torch.arange(12))).abs().max().item() < 1e-4


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("hidden", [1, 7, 16, 33, 1408])
def test_silu_mul_equals_torch(builds: dict[str, cpu_kernels.CpuKernels], build: str,
                               hidden: int) -> None:
    """silu(gate) * up within float32 rounding of float64, across the range where e^-x
    overflows or vanishes (no inf, no NaN), for widths short of, equal to and past a vector."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    gen = torch.Generator().manual_seed(hidden)
    gate_up = torch.randn(5, 2 * hidden, generator=gen) * 4
    gate_up[0, :hidden] = torch.linspace(-120, 120, hidden)
    got = builds[build].silu_mul(gate_up)
    g, u = gate_up.double().chunk(2, dim=-1)
    want = (F.silu(g) * u).float()
    assert got.shape == (5, hidden) and torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=3e-6, atol=1e-30)
    with pytest.raises(ValueError):  # an odd width: no gate/up halves
        builds[build].silu_mul(torch.randn(2, 5))


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 300, 32000])
def test_argmax_equals_torch(builds: dict[str, cpu_kernels.CpuKernels], build: str,
                             vocab: int) -> None:
    """The ids torch.argmax gives: the first of equal values (ties in and across vector
    lanes, -0.0 beside 0.0), a NaN wherever it sits, all -inf, +inf; rows shorter than,
    equal to and past a vector."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    gen = torch.Generator().manual_seed(vocab)
    ties = torch.randint(-2, 2, (8, vocab), generator=gen).float()
    ties[1] = -0.0
    ties[1, vocab // 2:] = 0.0
    nans = torch.randn(4, vocab, generator=gen)
    nans[0, vocab - 1] = nans[1, 0] = nans[2, vocab // 3] = float("nan")
    nans[3, ::2] = float("nan")
    ends = torch.full((3, vocab), float("-inf"))
    ends[1, vocab - 1] = ends[2, vocab // 2] = float("inf")
    for logits in (torch.randn(16, vocab, generator=gen), ties, nans, ends,
                   torch.randn(3, vocab, generator=gen)[:, :max(vocab - 1, 1)]):  # a view
        assert torch.equal(builds[build].argmax(logits), logits.argmax(dim=-1))
    with pytest.raises(ValueError):
        builds[build].argmax(torch.randn(2, 3, dtype=torch.float64))


@needs_compiler
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "x86-64"])
@pytest.mark.parametrize("n_out", [1, 5, 31, 32, 33, 80, 100, 1000])
def test_linear_keeps_torchs_argmax(builds: dict[str, cpu_kernels.CpuKernels], build: str,
                                    n_out: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """linear(keep_argmax=True) keeps each row's torch.argmax of its output from the
    accumulators: ties within and across lanes, tiles and threads (the first), the first of
    NaNs wherever they sit, -inf and +inf, all-negative rows beside the last panel's zero
    padding; every tile shape (1-3 rows are wide tiles, past 16 too; 80 outputs: an odd
    last panel of a wide layout), on 1-3 threads; argmax() of that output answers with them,
    without reading the logits again. argmax() of another tensor computes."""
    if build not in builds:
        pytest.skip(f"no {build} build on this machine")
    kernels = builds[build]
    gen = torch.Generator().manual_seed(n_out)

    def no_second_read(*args: object) -> None:
        raise AssertionError("the kept argmax was not used: the logits were read again")

    monkeypatch.setattr(kernels, "_argmax_rows", no_second_read)

    def check(x: torch.Tensor, weight: torch.Tensor) -> None:
        y = kernels.linear(x, kernels.pack_linear(weight), n_out, keep_argmax=True)
        assert torch.equal(kernels.argmax(y), y.argmax(dim=-1)), (x.shape, weight)

    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            for rows in (1, 2, 3, 13, 17, 40):
                check(torch.randn(rows, 24, generator=gen),
                      torch.randn(n_out, 24, generator=gen))
                # Exact ties: each row picks integer logits out of the weight's columns
                check(torch.eye(rows),
                      torch.randint(-2, 2, (n_out, rows), generator=gen).float())
                check(torch.rand(rows, 8, generator=gen), -torch.rand(n_out, 8, generator=gen))
    finally:
        torch.set_num_threads(threads)
    # One input: the output is the weight's column times each row's x, specials as they are
    column = torch.randn(n_out, generator=gen)
    nan, inf = float("nan"), float("inf")
    for at, special in ((n_out // 2, [nan, 1.0, nan]), (0, [-inf] * n_out),
                        (n_out // 3, [inf, nan]), (n_out - 1, [inf]), (0, [-0.0, 0.0] * n_out)):
        weight = column.clone()
        weight[at:at + len(special)] = torch.tensor(special[:n_out - at])
        check(torch.tensor([[1.0], [2.0], [0.5]]), weight[:, None])
    y = kernels.linear(torch.ones(2, 1), kernels.pack_linear(torch.ones(n_out, 1)), n_out,
                       keep_argmax=True)
    monkeypatch.undo()  # another tensor: read
    other = y.clone()
    other[:, -1] = 2.0
    assert kernels.argmax(other).tolist() == [n_out - 1] * 2


@needs_compiler
def test_decode_step_runs_in_one_c_call(tiny_checkpoint: Path,
                                        kernels: cpu_kernels.CpuKernels) -> None:
    """A decode-only step of the packed model runs its embedding and layers in
    CpuKernels.decode_layers, and gives the layer-by-layer path's logits to the last bit (the
    same kernels in the same order, rotary angles from a table of the same bits), the
    reference model's within rounding, and the same K/V in the cache. Either path calls
    `before_compute` once before computing anything: the C one right before its call."""
    if not kernels.linear_is_tuned:
        pytest.skip("the C decode step needs the C linear (an AVX-512 build)")
    config = ModelConfig.from_dir(tiny_checkpoint)
    reference = load_model(tiny_checkpoint, config, torch.float32, "cpu")
    model = load_model(tiny_checkpoint, config, torch.float32, "cpu")
    model.pack()
    pools = [KVCachePool(config, n_slots=4, max_len=64, dtype=torch.float32, device="cpu")
             for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 1000, (n,), generator=gen) for n in (9, 30, 17)]
    slots = [0, 3, 1]
    for pool in pools:
        for slot, seq in zip(slots, seqs, strict=True):
            batch = AttentionBatch.build([], [], [PrefillSpan(slot, 0, len(seq) - 1, 0)], "cpu")
            model(seq[:-1], batch.positions, pool, batch)
    batch = AttentionBatch.build(slots, [len(s) - 1 for s in seqs], [], "cpu")
    ids = torch.stack([s[-1] for s in seqs])
    calls, events = [], []
    original, c_call = kernels.decode_layers, kernels._decode_layers

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the token ids it was given
        calls.append(args[1])
        return original(*args, **kwargs)

    def spy_c_call(*args):  # noqa: ANN002, ANN202
        events.append("C call")
        return c_call(*args)

    embedding = model.model.embed_tokens.weight.clone()
    kernels.decode_layers, kernels._decode_layers = spy, spy_c_call  # type: ignore[method-assign]
    try:
        in_c = model(ids, batch.positions, pools[0], batch,
                     before_compute=lambda: events.append("before"))
    finally:
        del kernels.decode_layers
        kernels._decode_layers = c_call
    assert len(calls) == 1 and torch.equal(calls[0], ids)
    assert events == ["before", "C call"]
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # read, never written
    model._decode_in_c = lambda *a: None  # type: ignore[method-assign]
    untouched = [k.clone() for k in pools[1].k]
    before_layers = []  # whether the cache was as yet untouched, at each call
    by_layer = model(ids, batch.positions, pools[1], batch, before_compute=lambda: (
        before_layers.append(all(map(torch.equal, untouched, pools[1].k)))))
    assert before_layers == [True]
    assert torch.equal(in_c, by_layer)
    assert all(torch.equal(a, b) for a, b in zip(pools[0].k + pools[0].v,
                                                  pools[1].k + pools[1].v, strict=True))
    for row, seq in enumerate(seqs):
        want = reference(seq, torch.arange(len(seq)))[-1]
        assert (in_c[row] - want).abs().max().item() < 1e-4
    del model._decode_in_c
    outside = AttentionBatch.build([0, 4], [9, 5], [], "cpu")  # slot 4 of 4
    before = [t.clone() for t in pools[0].k]
    with pytest.raises(IndexError, match="row 1"):
        model(ids[:2], outside.positions, pools[0], outside)
    inside = AttentionBatch.build([0, 3], [9, 5], [], "cpu")
    with pytest.raises(IndexError, match="row 0"):  # a token past the vocabulary
        model(torch.tensor([config.vocab_size, 1]), inside.positions, pools[0], inside)
    assert all(torch.equal(a, b) for a, b in zip(before, pools[0].k, strict=True))


@needs_compiler
def test_build_is_cached_per_source(fresh_load: Path) -> None:
    first = cpu_kernels.load()
    assert first is not None and first.path.parent == fresh_load
    assert [p.name for p in fresh_load.iterdir()] == [first.path.name]  # no temporary left
    built_at = first.path.stat().st_mtime_ns
    cpu_kernels.load.cache_clear()
    second = cpu_kernels.load()
    assert second is not None and second.path == first.path
    assert second.path.stat().st_mtime_ns == built_at  # loaded, not rebuilt


@needs_compiler
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable levels are x86-64's")
def test_prebuilt_library_serves_a_machine_without_a_compiler(
        fresh_load: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Docker image does: a library per portable level built where a compiler is,
    then a machine without one loads the best level its CPU runs, and never a library of
    another source."""
    folder = tmp_path / "prebuilt"
    assert COMPILER is not None
    built = cpu_kernels.prebuild(folder, COMPILER)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in built)
    level = cpu_kernels.portable_level(cpu_kernels._cpu_flags())
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("LLAMA_SERVE_PREBUILT_KERNELS", str(folder))
    cpu_kernels.load.cache_clear()
    kernels = cpu_kernels.load()
    if level is None:  # an x86-64 CPU below v3: nothing prebuilt runs here
        assert kernels is None
        return
    assert kernels is not None and kernels.path in built
    assert kernels.path.name.endswith(f"-{level}.so") and not fresh_load.exists()
    assert kernels.linear_is_tuned is (level == "x86-64-v4")
    weight, x = torch.randn(40, 24), torch.randn(3, 24)
    got = kernels.linear(x, kernels.pack_linear(weight), 40)
    assert torch.allclose(got, x @ weight.T, rtol=1e-5, atol=1e-5)
    for path in built:  # now libraries of another source: not loaded
        path.rename(path.with_name(path.name.replace("cpu_kernels-", "cpu_kernels-0")))
    cpu_kernels.load.cache_clear()
    assert cpu_kernels.load() is None


def test_portable_level_follows_the_cpu_flags() -> None:
    v3 = {"sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert cpu_kernels.portable_level(v4) == "x86-64-v4"
    assert cpu_kernels.portable_level(v4 - {"avx512vl"}) == "x86-64-v3"
    assert cpu_kernels.portable_level(v4 - {"avx2"}) is None  # v4 includes v3
    assert cpu_kernels.portable_level({"sse2"}) is None


def test_without_a_working_compiler_the_model_runs_pytorch_ops(
        fresh_load: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    for compiler in ("false", "no-such-compiler-here"):  # fails, missing
        monkeypatch.setenv("CC", compiler)
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is None
    assert "CPU kernels unavailable" in caplog.text
    model = load_model(tiny_checkpoint, ModelConfig.from_dir(tiny_checkpoint), torch.float32,
                       "cpu")
    model.pack()
    assert all(layer.self_attn.kernels is None for layer in model.model.layers)
    assert all(m.kernels is None for m in model.modules() if isinstance(m, RMSNorm))


def test_pack_without_cpu_kernels(tiny_checkpoint: Path) -> None:
    model = load_model(tiny_checkpoint, ModelConfig.from_dir(tiny_checkpoint), torch.float32,
                       "cpu")
    model.pack(use_cpu_kernels=False)
    assert all(layer.self_attn.kernels is None for layer in model.model.layers)
    assert all(m.kernels is None for m in model.modules() if isinstance(m, RMSNorm))
