"""`dinat bench` runs end to end (a smoke test at tiny sizes; the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinat import bench
from dinat.config import ConfigError


def test_bench_runs_and_writes_json(tmp_path, capsys) -> None:
    argv = ["--suite", "all", "--batch", "1", "--repeats", "1", "--no-reference", "--threads", "1"]
    results = bench.main([*argv, "--models", "dinat_nano", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["op"] == results["op"] and len(saved["op"]) == 7
    for row in saved["op"]:
        assert row["fast_fwd_ms"] > 0 and row["window_fwdbwd_ms"] > 0 and row["backend"] == "cpu"
    (model,) = saved["model"]
    assert model["model"] == "dinat_nano" and model["infer_img_s"] > 0 and model["train_peak_mem_mb"] >= 0
    assert "fast_fwd_vs_window" in capsys.readouterr().out


def test_bench_compares_backends_in_one_run(tmp_path) -> None:
    """--compare adds forced-backend op columns; NAME@BACKEND runs a model on another backend."""
    argv = ["--batch", "1", "--repeats", "1", "--no-reference", "--threads", "1", "--compare", "cpu"]
    results = bench.main([*argv, "--models", "dinat_nano", "dinat_nano@reference", "--output", str(tmp_path)])
    assert all(row["cpu_fwd_ms"] > 0 and "cpu_fwdbwd_vs_window" in row for row in results["op"])
    assert [row["model"] for row in results["model"]] == ["dinat_nano", "dinat_nano@reference"]
    assert all(row["train_img_s"] > 0 for row in results["model"])


@pytest.mark.parametrize(
    ("flags", "mode"), [(["--compile"], None), (["--compile", "reduce-overhead"], "reduce-overhead")]
)
def test_bench_compile_flag(tmp_path, monkeypatch, flags, mode) -> None:
    """--compile [MODE] hands every model to torch.compile in that mode (recorded here, not compiled)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or model)
    argv = ["--suite", "model", "--batch", "1", "--repeats", "1", "--threads", "1", *flags]
    results = bench.main([*argv, "--models", "dinat_nano", "dinat_nano@reference", "--output", str(tmp_path)])
    assert compiled == [{"mode": mode, "dynamic": False}] * 2 and results["compile"] == (mode or "default")


def test_bench_compiles_the_op_candidates(tmp_path, monkeypatch) -> None:
    """--compile with the op suite compiles every candidate (forward, and its backward with it) at
    every level (dynamo's recompile limit, set low here, would otherwise run the later levels
    uncompiled) and marks its tensors static (CUDA graphs read them in place); the figures are real."""
    monkeypatch.setattr(bench, "DINAT_MINI_LEVELS", [(14, 1, (2,)), (7, 1, (1,))])
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    static = []
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t: static.append(t.shape))
    argv = ["--suite", "op", "--batch", "1", "--repeats", "1", "--threads", "1", "--compile", "--compare", "cpu"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = bench.main([*argv, "--no-reference", "--output", str(tmp_path)])
    assert [row["shape"] for row in results["op"]] == ["14x14 h1 d2", "7x7 h1 d1"]
    assert results["compile"] == "default"
    candidates = ("fast", "window", "dense_sdpa", "cpu")
    assert all(row[f"{name}_fwdbwd_ms"] > 0 for row in results["op"] for name in candidates)
    tensors = [(1, 13, 13), (1, 49, 49)]  # after q, k, v: rpb, window bias
    assert static == [(1, 14, 14, 1, 32)] * 3 + tensors + [(1, 7, 7, 1, 32)] * 3 + tensors
    # each level's candidates' forwards compiled without and with gradients
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * 4 * 2, torch._dynamo.utils.counters["stats"]


def test_bench_rejects_bad_arguments(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "foo"])
    assert "--device must be cpu, cuda or cuda:N, got 'foo'" in capsys.readouterr().err
    (tmp_path / "afile").touch()
    with pytest.raises(SystemExit):  # before the benchmark runs, not after
        bench.main(["--output", str(tmp_path / "afile")])
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--models", "dinat_nano@fast"])
    with pytest.raises(ConfigError, match="unknown model 'dinat_nanno'.*'dinat_nano'"):
        bench.main(["--models", "dinat_nanno", "--suite", "model"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="attention 'triton': the triton backend is unavailable"):
            bench.main(["--backend", "triton"])


@pytest.mark.parametrize(("device", "calls"), [("cpu", 1), ("cuda", bench.PIPELINED_CALLS)])
def test_timing_samples_pipeline_calls_on_cuda(monkeypatch, device, calls) -> None:
    """On CUDA a timing sample is several calls and one synchronize (a loop's throughput), reported
    per call; on the CPU, one call per sample."""
    events: list[str] = []
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(bench, "_sync", lambda device: events.append("sync"))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    medians = bench.interleaved_medians({"a": lambda: events.append("call")}, 3, torch.device(device))
    timed = events[1:]  # after the warm-up call
    assert timed == (["sync"] + ["call"] * calls + ["sync"]) * 3
    assert medians == {"a": 10 / calls}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_host_overhead_script_runs() -> None:
    """benchmarks/triton_host_overhead.py (the Triton backend's host cost, measured without a GPU)
    stands in for the backend's kernels and autotuner, so a change of how the backend launches them
    can break it: it runs to its end and reports each model's step."""
    script = Path(__file__).parents[1] / "benchmarks" / "triton_host_overhead.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(script), "--repeats", "3"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "whole-window map (7x7, 16 heads) as triton" in result.stdout
    assert "dinat_mini (whole windows on their Triton kernels): 18 blocks" in result.stdout
    assert "swin_tiny_patch4_window7_224: 12 blocks" in result.stdout
