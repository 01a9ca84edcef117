"""The decode step of a model alone, against its memory-bandwidth floor.

    python -m model.step_times MODEL_DIR [--load-format dummy] [--device cuda] [--json F]

Measures the device's bandwidth (a large copy, read + write counted, and a read-only sum),
the weight bytes a decode step reads (every weight but the embedding table, of which a step
reads one row per token), and decode steps of the model alone: CUDA graph replays where the
device has them (what the server runs) and eager steps, for a few batch sizes, every row at
positions 150-189 as in the standard workload. `--profile` adds each step's kernels. The
floor is bytes / bandwidth; the README's GPU figures came from this command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from model.decode_graphs import DecodeGraphs
from model.kv_cache import KVCachePool
from model.weights import load_checkpoint, resolve_dtype


def median_ms(fn: Callable[[], object], device: torch.device, n: int = 30,
              warmup: int = 5) -> float:
    """Median of n timed calls: CUDA events on a GPU, the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bandwidth(device: torch.device, nbytes: int) -> dict[str, float]:
    """GB/s of a copy (bytes read + written) and of a sum (bytes read), on random data."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    sum_ms = median_ms(src.sum, device)
    return {"copy_GBps": 2 * nbytes / copy_ms / 1e6, "read_GBps": nbytes / sum_ms / 1e6}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m model.step_times", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-len", type=int, default=1024,
                   help="tokens per KV-cache slot (at most the model's context)")
    p.add_argument("--batches", default="1,4,16,64", help="decode rows per step")
    p.add_argument("--buffer-gib", type=float, default=None,
                   help="bandwidth buffer (default 4 GiB on a GPU, 0.25 GiB on CPU)")
    p.add_argument("--profile", action="store_true", help="print each step's kernels")
    p.add_argument("--no-gpu-kernels", action="store_false", dest="gpu_kernels",
                   help="PyTorch's ops instead of the fused Triton kernels (for an A/B)")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    gib = args.buffer_gib or (4.0 if device.type == "cuda" else 0.25)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else "cpu", "torch": torch.__version__, **bandwidth(device, int(gib * 2**30))}

    model = load_checkpoint(args.model, resolve_dtype(args.dtype, device), device,
                            args.load_format)
    config = model.config
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    embed = model.model.embed_tokens.weight
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embed
    # A tied table is read whole by the lm_head; else a step reads one row of it per token.
    read = weight_bytes - (0 if tied else embed.numel() * embed.element_size())
    model.pack(use_gpu_kernels=args.gpu_kernels)
    results |= {"weight_bytes": weight_bytes, "weight_bytes_read_per_step": read}
    max_len = min(args.max_len, config.max_seq_len)
    pool = KVCachePool(config, max(batches), max_len, embed.dtype, device)
    graphs = DecodeGraphs(model, pool, capture=device.type == "cuda")
    graphs.capture_all()
    gen = torch.Generator().manual_seed(0)
    steps = {}
    for batch in batches:
        slots = list(range(batch))
        positions = [min(150 + i % 40, max_len - 1) for i in slots]
        ids = torch.randint(0, config.vocab_size, (batch,), generator=gen).tolist()
        bucket = graphs.bucket(slots, positions)
        assert bucket is not None
        eager = median_ms(partial(graphs.forward, *bucket), device, n=10, warmup=2)
        replay = partial(graphs.run, slots, ids, positions)
        steps[batch] = {"bucket": bucket, "eager_ms": eager,
                        "graph_ms": median_ms(replay, device) if graphs.capture else None}
    results["steps"] = steps
    for name in ("copy_GBps", "read_GBps"):
        results[f"floor_ms_{name}"] = read / (results[name] * 1e6)

    print(f"{results['device']}: copy {results['copy_GBps']:.0f} GB/s (read + write), read "
          f"{results['read_GBps']:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB, "
          f"{read / 1e9:.2f} GB read a step; floor {results['floor_ms_copy_GBps']:.2f} ms "
          f"(copy) / {results['floor_ms_read_GBps']:.2f} ms (read)")
    for batch, s in steps.items():
        graph = f"graph {s['graph_ms']:.3f} ms, " if s["graph_ms"] is not None else ""
        best = s["graph_ms"] if s["graph_ms"] is not None else s["eager_ms"]
        print(f"batch {batch:3d} (bucket {s['bucket'][1]} keys): {graph}eager "
              f"{s['eager_ms']:.3f} ms; {best / results['floor_ms_copy_GBps']:.2f}x the floor")
    if args.profile:
        _profile(graphs, batches, device)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def _profile(graphs: DecodeGraphs, batches: list[int], device: torch.device) -> None:
    """Eager steps under torch.profiler: the kernels a graph replays, and how many."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for batch in batches:
        bucket = graphs.bucket(list(range(batch)), [150] * batch)
        assert bucket is not None
        with profile(activities=activities) as prof:
            for _ in range(5):
                graphs.forward(*bucket)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        print(f"--- batch {batch}: {sum(e.count for e in events) / 5:.0f} ops a step (5 steps)")
        print(events.table(sort_by=sort_by, row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
