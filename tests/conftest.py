from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # the workers already fill the cores; oversubscribed thread teams crawl


def cpu_backends() -> list[str]:
    """Backends that can run CPU tensors on this machine (the reference always can)."""
    from dinat.ops import cpu, flex

    names = ["reference"]
    if cpu.available():
        names.append("cpu")
    if flex.available(torch.empty(0)):
        names.append("flex")
    return names


@pytest.fixture(scope="session")
def golden_models() -> dict:
    return torch.load(DATA / "models.pt")
