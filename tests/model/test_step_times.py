"""`python -m model.step_times`: the decode-step figures behind the README's GPU section."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from model.step_times import main
from tests.conftest import TINY


def test_step_times_on_cpu(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "steps.json"
    results = main([str(tiny_checkpoint), "--device", "cpu", "--max-len", "300",
                    "--batches", "1,3", "--buffer-gib", "0.01", "--json", str(out)])
    assert json.loads(out.read_text())["steps"].keys() == {"1", "3"}
    embed = TINY.vocab_size * TINY.dim * 4
    assert results["weight_bytes_read_per_step"] == results["weight_bytes"] - embed
    assert results["floor_ms_copy_GBps"] > 0 and results["copy_GBps"] > 0
    for batch in (1, 3):
        step = results["steps"][batch]
        assert step["bucket"] == (batch, 256)  # positions 150-152, pool of 3 slots
        assert step["eager_ms"] > 0 and step["graph_ms"] is None  # no CUDA graphs on CPU
    assert "batch   3 (bucket 256 keys)" in capsys.readouterr().out


def test_a_tied_table_is_read_whole(make_checkpoint) -> None:
    folder = make_checkpoint(replace(TINY, tie_embeddings=True))
    results = main([str(folder), "--device", "cpu", "--max-len", "256", "--batches", "1",
                    "--buffer-gib", "0.01"])
    assert results["weight_bytes_read_per_step"] == results["weight_bytes"]
