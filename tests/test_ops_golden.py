"""Every case of the original implementation's outputs (NATTEN 0.17.5 CPU), on every backend."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA, cpu_backends
from dinat.ops import na2d, na2d_av, na2d_qk, use_backend

CASES = torch.load(DATA / "na2d_ops.pt")["cases"]
OPS_TOL = dict(rtol=1e-4, atol=1e-4)


def _case_id(case: dict) -> str:
    return f"k{case['kernel_size']}-d{case['dilation']}-{tuple(case['q'].shape)}-rpb{case['rpb'] is not None}"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_unfused_ops_match_original(case: dict, backend: str) -> None:
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    rpb = None if case["rpb"] is None else case["rpb"].clone().requires_grad_()
    with use_backend(backend):
        logits = na2d_qk(q, k, case["kernel_size"], case["dilation"], rpb)
        out = na2d_av(logits.softmax(-1), v, case["kernel_size"], case["dilation"])
    torch.testing.assert_close(logits, case["logits"], **OPS_TOL)
    torch.testing.assert_close(out, case["out"], **OPS_TOL)
    (out * case["grad_out"]).sum().backward()
    for name, tensor in (("q", q), ("k", k), ("v", v), ("rpb", rpb)):
        if tensor is not None:
            torch.testing.assert_close(tensor.grad, case[f"grad_{name}"], **OPS_TOL, msg=f"grad_{name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fused_op_matches_original(case: dict, backend: str) -> None:
    """na2d (tokens-first, scale=1) equals qk -> softmax -> av of the original."""
    q, k, v = (case[n].permute(0, 2, 3, 1, 4).clone().requires_grad_() for n in ("q", "k", "v"))
    rpb = None if case["rpb"] is None else case["rpb"].clone().requires_grad_()
    with use_backend(backend):
        out = na2d(q, k, v, case["kernel_size"], case["dilation"], rpb, scale=1.0)
    torch.testing.assert_close(out, case["out"].permute(0, 2, 3, 1, 4), **OPS_TOL)
    (out * case["grad_out"].permute(0, 2, 3, 1, 4)).sum().backward()
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        expected = case[f"grad_{name}"].permute(0, 2, 3, 1, 4)
        torch.testing.assert_close(tensor.grad, expected, **OPS_TOL, msg=f"grad_{name}")
    if rpb is not None:
        torch.testing.assert_close(rpb.grad, case["grad_rpb"], **OPS_TOL, msg="grad_rpb")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reference_on_cuda_matches_original(case: dict) -> None:
    """The reference (every backend's fallback) stays exact on CUDA."""
    q, k, v = (case[n].permute(0, 2, 3, 1, 4).cuda().requires_grad_() for n in ("q", "k", "v"))
    rpb = None if case["rpb"] is None else case["rpb"].cuda().requires_grad_()
    with use_backend("reference"):
        out = na2d(q, k, v, case["kernel_size"], case["dilation"], rpb, scale=1.0)
    torch.testing.assert_close(out.cpu(), case["out"].permute(0, 2, 3, 1, 4), **OPS_TOL)
    out.backward(case["grad_out"].permute(0, 2, 3, 1, 4).cuda())
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(tensor.grad.cpu(), case[f"grad_{name}"].permute(0, 2, 3, 1, 4), **OPS_TOL)
    if rpb is not None:
        torch.testing.assert_close(rpb.grad.cpu(), case["grad_rpb"], **OPS_TOL)
