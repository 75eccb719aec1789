"""torchrun with 2 CPU processes (gloo): ranks stay identical, and match 1 process, same total batch."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from _train_utils import TINY, dinat_cmd, run, write_pngs

pytestmark = pytest.mark.slow

# no mixup and no drop path: both draw per batch / per process, so they differ between 1 and 2
# processes by design; per-sample augmentations are seeded by sample and stay on
ARGS = [*TINY, "--epochs", "2", "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--reprob", "0.25"]


def torchrun_train(*args: str) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *dinat_cmd(*args)[1:]])


def test_two_processes_match_one_with_the_same_total_batch(tmp_path):
    data = write_pngs(tmp_path / "data", per_class=8)  # 16 images: 2 steps of 8 per epoch
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run(dinat_cmd("train", str(data), *ARGS, "--batch-size", "8", "--output", str(one)))
    torchrun_train("train", str(data), *ARGS, "--batch-size", "4", "--output", str(two))

    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["rank_weight_max_diff"] == 0.0  # every rank holds rank 0's weights exactly

    a = torch.load(one / "last.pth", weights_only=True)
    b = torch.load(two / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 4 and b["world"] == 2 and len(b["rng"]) == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # metrics are over all ranks: the whole val set, the same numbers as one process
    one_summary = json.loads((one / "summary.json").read_text())
    for key in ("val_top1", "val_top5", "val_loss", "train_loss"):
        assert summary[key] == pytest.approx(one_summary[key], rel=1e-3, abs=1e-3), key

    # stopped in the middle of epoch 1 with 2 processes, resumed with 1: still the same run
    torchrun_train("train", str(data), *ARGS, "--batch-size", "4", "--max-steps", "1", "--output", str(resumed))
    ckpt = torch.load(resumed / "last.pth", weights_only=True)
    assert (ckpt["samples"], ckpt["step"], ckpt["world"]) == (8, 1, 2)
    last = str(resumed / "last.pth")
    run(dinat_cmd("train", str(data), *ARGS, "--batch-size", "8", "--output", str(resumed), "--resume", last))
    c = torch.load(resumed / "last.pth", weights_only=True)
    assert c["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(c["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the loss of epoch 1 sums both ranks' part before the stop and the rest after it
    history = [h["train_loss"] for h in c["history"]]
    assert history == pytest.approx([h["train_loss"] for h in a["history"]], rel=1e-4)
