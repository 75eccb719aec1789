"""Kill a run (SIGKILL) after its first mid-epoch checkpoint, resume it, and end with the same
weights as an uninterrupted run of the same seed; no checkpoint file is ever half-written."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
import torch

from _train_utils import TINY, dinat_cmd, env, run, write_pngs

pytestmark = pytest.mark.slow

# 8 steps per epoch; mixup, RandAugment, random erasing and drop path all draw random numbers
ARGS = [
    *TINY,
    "--epochs",
    "2",
    "--checkpoint-interval",
    "3",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--aa",
    "rand-m9-mstd0.5-inc1",
    "--reprob",
    "0.25",
    "--drop-path",
    "0.1",
    "--deterministic",
]


def watch_checkpoints(out, stop: threading.Event, seen: list) -> None:
    """Load every .pth as soon as it appears, all the time: each must be complete."""
    while not stop.is_set():
        for path in out.glob("*.pth"):
            try:
                torch.load(path, weights_only=True)
            except FileNotFoundError:
                continue  # replaced between glob and open: fine
            seen.append(path.name)
        time.sleep(0.01)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = write_pngs(tmp_path / "data", per_class=16)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(dinat_cmd("train", str(data), *ARGS, "--output", str(full)))

    # the same run, killed right after its first mid-epoch checkpoint (step 3 of 8)
    killed.mkdir()
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=watch_checkpoints, args=(killed, stop, seen))
    watcher.start()
    proc = subprocess.Popen(
        dinat_cmd("train", str(data), *ARGS, "--output", str(killed), "--workers", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    try:
        for line in proc.stdout:
            if "saved" in line and "at step 3" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        proc.kill()
        stop.set()
        watcher.join()
    assert proc.returncode == -signal.SIGKILL
    assert "last.pth" in seen
    ckpt = torch.load(killed / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["samples"] < 32, "the kill must land in the middle of epoch 1"
    assert not (killed / "summary.json").exists()

    run(dinat_cmd("train", str(data), *ARGS, "--output", str(killed), "--resume", str(killed / "last.pth")))
    a = torch.load(full / "last.pth", weights_only=True)
    b = torch.load(killed / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 16
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state[key], b["optimizer"]["state"][i][key])
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]])
    assert not list(killed.glob("*.pth.tmp*")) and not list(full.glob(".*tmp*"))
