"""The README's neighborhood-attention example runs and means what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).parents[1] / "README.md"


def test_attention_example_runs() -> None:
    section = README.read_text().split("## Neighborhood attention", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    torch.testing.assert_close(scope["out2"], scope["out"].permute(0, 3, 1, 2, 4), rtol=1e-5, atol=1e-5)
    assert scope["y"].shape == (2, 28, 28, 128)
