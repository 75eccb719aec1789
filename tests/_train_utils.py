"""Shared pieces of the training tests: a tiny model, a tiny PNG dataset, tiny runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import dinat  # noqa: F401  (registers the models)

# dinat_nano is the demo model (registered by the models package)
MODEL = "dinat_nano"

# a few seconds of real training on 32 px images; one thread each (tests run two at a time on 2 cores);
# on the CPU on every machine, so that exact comparisons (resume, 1 vs 2 gloo processes) hold on GPU
# machines too
TINY = (
    f"--model {MODEL} --img-size 32 --crop-pct 1.0 --batch-size 4 --workers 0 --threads 1 "
    "--warmup-epochs 0 --cooldown-epochs 0 --no-amp --lr 2e-3 --log-interval 1 --device cpu"
).split()


def write_pngs(
    root: Path, classes: int = 2, per_class: int = 8, size: int = 16, seed: int = 0, splits=("train", "val")
) -> Path:
    """root/{train,val}/class_k/*.png: class k is a bright bar at a class-specific place, with noise."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k in range(classes):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                band = slice(k * size // classes, (k + 1) * size // classes)
                img[band, :, :] = 220
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def dinat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dinat.cli", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
