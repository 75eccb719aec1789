"""The Triton backend's unfused ops (na2d_qk, na2d_av: three primitive kernels) against the
original's outputs and the reference (running on CUDA, or in Triton's interpreter: see _triton_utils).
"""

from __future__ import annotations

import pytest
import torch

from _triton_utils import DEVICE, GOLDEN, GOLDEN_IDS, TOL, needs_interpreter_run, needs_kernels, run_interpreted
from conftest import assert_empty_batch_works
from dinat.ops import na2d_av, na2d_qk, triton_na, use_backend


@needs_interpreter_run
def test_in_triton_interpreter() -> None:
    run_interpreted(__file__)


# in the interpreter the cases of up to 28x28 (56x56 alone took 100 s there; the GPU runs it)
UNFUSED_GOLDEN = [
    pytest.param(case, id=name)
    for case, name in zip(GOLDEN, GOLDEN_IDS)
    if DEVICE.type == "cuda" or case["q"].shape[2] * case["q"].shape[3] <= 28 * 28
]


@needs_kernels
@pytest.mark.parametrize("case", UNFUSED_GOLDEN)
def test_unfused_golden_cases(case: dict) -> None:
    """na2d_qk -> softmax -> na2d_av (heads-first) equal the original, logits and every gradient."""
    q, k, v = (case[n].to(DEVICE, copy=True).requires_grad_() for n in ("q", "k", "v"))
    rpb = None if case["rpb"] is None else case["rpb"].to(DEVICE, copy=True).requires_grad_()
    with use_backend("triton"):
        logits = na2d_qk(q, k, case["kernel_size"], case["dilation"], rpb)
        out = na2d_av(logits.softmax(-1), v, case["kernel_size"], case["dilation"])
    torch.testing.assert_close(logits.cpu(), case["logits"], **TOL)
    torch.testing.assert_close(out.cpu(), case["out"], **TOL)
    out.backward(case["grad_out"].to(DEVICE))
    for name, tensor in (("q", q), ("k", k), ("v", v), ("rpb", rpb)):
        if tensor is not None:
            torch.testing.assert_close(tensor.grad.cpu(), case[f"grad_{name}"], **TOL, msg=f"grad_{name}")


@needs_kernels
def test_unfused_double_backward() -> None:
    """The primitives are closed under differentiation: second derivatives equal the reference's."""
    kernel, dilation = (5, 3), (2, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 12, 13, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    rpb = torch.randn(1, 9, 5, generator=gen, dtype=torch.float64)

    def second_derivatives(backend: str, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(DEVICE).requires_grad_() for t in inputs]
        with use_backend(backend):
            logits = na2d_qk(*leaves[:2], kernel, dilation, leaves[3])
            out = na2d_av(logits.softmax(-1), leaves[2], kernel, dilation)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    got = second_derivatives("triton", [t.float() for t in (q, k, v, rpb)])
    expected = second_derivatives("reference", [q, k, v, rpb])
    for name, g, e in zip(("q", "k", "v", "rpb"), got, expected):
        torch.testing.assert_close(g.cpu().double(), e.cpu(), rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16] if DEVICE.type == "cpu" else [torch.float16, torch.bfloat16], ids=str)
def test_unfused_half_precision_close_to_float32(dtype) -> None:
    """float16/bfloat16 q, k, v with a float32 rpb: logits, output and gradients within 1e-2 of
    float32 arithmetic on the same values.

    The half-precision run's inputs are the float32 run's, and its logits are rounded to q's dtype as
    na2d_qk's output: those roundings belong to the half-precision API (they alone move a bfloat16
    q gradient about 1% here), the float32 run makes them too (the logits' by a straight-through
    rounding, which leaves their gradient as it is), and the rest is the ops' own error.
    """
    kernel, dilation = (7, 5), (2, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 16, 17, 16, generator=gen).to(dtype) for _ in range(3))
    rpb = torch.randn(1, 13, 9, generator=gen)

    def run(run_dtype):
        leaves = [t.to(DEVICE, run_dtype).requires_grad_() for t in (q, k, v)] + [rpb.to(DEVICE).requires_grad_()]
        with use_backend("triton"):
            logits = na2d_qk(leaves[0] * 0.25, leaves[1], kernel, dilation, leaves[3])
            logits = logits + (logits.to(dtype).to(run_dtype) - logits).detach()
            out = na2d_av(logits.float().softmax(-1), leaves[2], kernel, dilation)
        assert logits.dtype == out.dtype == run_dtype
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        return [logits.float(), out.float()] + [g.float() for g in grads]

    for name, low, full in zip(("logits", "out", "q", "k", "v", "rpb"), run(dtype), run(torch.float32)):
        assert (low - full).abs().max() <= 1e-2 * full.abs().max(), name


@needs_kernels
@pytest.mark.parametrize("name", ["na_dot_triton", "na_weighted_sum_triton", "na_scatter_triton"])
def test_primitives_pass_opcheck(name: str) -> None:
    """torch.library.opcheck: schema, autograd registration, fake implementations matching the real
    outputs (shapes, dtypes, strides: what torch.compile relies on), on non-contiguous inputs."""
    kernel, dilation = [3, 5], [2, 1]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 9, 10, 16, generator=gen).to(DEVICE)[..., ::2].requires_grad_()
    weights = torch.randn(2, 9, 10, 15, generator=gen).to(DEVICE).requires_grad_()
    first = features.detach().clone().requires_grad_() if name == "na_dot_triton" else weights
    torch.library.opcheck(getattr(triton_na, name.removesuffix("_triton")), (first, features, kernel, dilation))


@needs_kernels
def test_empty_batch() -> None:
    """No images: no kernel launch fails, the shapes and the (zero) rpb gradient are right."""
    assert_empty_batch_works("triton", DEVICE)
