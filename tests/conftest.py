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


def assert_half_close_to_float32(attend, q, k, v, rpb, dtype: torch.dtype) -> None:
    """``attend(q, k, v, rpb)`` with q, k, v in float16/bfloat16 and rpb float32 (as under autocast)
    against all-float32: the output and every gradient (of the output's squared sum) within 1e-2
    of the float32 result's largest magnitude."""
    results = {}
    for run_dtype in (torch.float32, dtype):
        leaves = [t.to(run_dtype).detach().requires_grad_() for t in (q, k, v)] + [rpb.detach().requires_grad_()]
        out = attend(*leaves)
        assert out.dtype == run_dtype
        out.float().square().sum().backward()
        results[run_dtype] = [out.float()] + [t.grad.float() for t in leaves]
    for name, low, full in zip(("out", "q", "k", "v", "rpb"), results[dtype], results[torch.float32]):
        scale = full.abs().max()
        assert (low - full).abs().max() <= 1e-2 * scale, f"{name}: {(low - full).abs().max()} vs {scale}"


def assert_empty_batch_works(backend: str, device: str | torch.device = "cpu") -> None:
    """The fused and unfused ops on a batch of no images: empty outputs and gradients of the right
    shapes, and a zero rpb gradient (as a DataLoader's last, empty shard can make them)."""
    from dinat.ops import na2d, na2d_av, na2d_qk, use_backend

    q = torch.randn(0, 9, 9, 2, 8, device=device, requires_grad=True)
    rpb = torch.randn(2, 5, 5, device=device, requires_grad=True)
    with use_backend(backend):
        out = na2d(q, q, q, 3, (2, 3), rpb)
        out.sum().backward()
        heads_first = q.detach().permute(0, 3, 1, 2, 4).requires_grad_()
        logits = na2d_qk(heads_first, heads_first, 3, (2, 3), rpb)
        mixed = na2d_av(logits.softmax(-1), heads_first, 3, (2, 3))
        mixed.sum().backward()
    assert out.shape == q.grad.shape == (0, 9, 9, 2, 8) and logits.shape == (0, 2, 9, 9, 9)
    assert mixed.shape == heads_first.grad.shape == (0, 2, 9, 9, 8)
    assert rpb.grad.shape == rpb.shape and not rpb.grad.any()


@pytest.fixture(scope="session")
def golden_models() -> dict:
    return torch.load(DATA / "models.pt")
