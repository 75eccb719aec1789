"""Contracts of the public ops that the other tests leave open: the argument checks of every entry
point (device, dtype, extent), backend selection, and gradients when only some inputs need them."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import cpu_backends
from dinat.ops import (
    cpu,
    current_backend,
    flex,
    grouped,
    na2d,
    na2d_av,
    na2d_qk,
    na2d_qkvpacked,
    reference,
    use_backend,
)

needs_cpu_flex = pytest.mark.skipif(not flex.available(torch.empty(0)), reason="flex_attention cannot run on this CPU")
needs_cpu_kernels = pytest.mark.skipif(not cpu.available(), reason=f"cpu backend: {cpu.unavailable_reason()}")


def _heads_first(*shape_and_count, seed=0, dtype=torch.float32):
    count, shape = shape_and_count[0], shape_and_count[1:]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(count)]


def test_device_mismatch_names_each_tensor_and_its_device() -> None:
    """Every second tensor must be on the first's device; the error names which is where."""
    q, k, v = _heads_first(3, 1, 2, 8, 9, 4)
    attn = torch.randn(1, 2, 8, 9, 9)
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        na2d_qk(q, k.to(meta), 3)
    with pytest.raises(ValueError, match="rpb is on meta but q is on cpu"):
        na2d_qk(q, k, 3, rpb=torch.randn(2, 5, 5, device=meta))
    with pytest.raises(ValueError, match="attn is on meta but v is on cpu"):
        na2d_av(attn.to(meta), v, 3)
    tokens = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    with pytest.raises(ValueError, match="v is on meta but q is on cpu"):
        na2d(*tokens[:2], tokens[2].to(meta), 3)


def test_na2d_av_refuses_maps_smaller_than_kernel_times_dilation() -> None:
    """SPEC 1: the op requires L >= k * d on each axis, na2d_av as much as the other two (a smaller
    map has groups shorter than the kernel: no valid window)."""
    attn, v = torch.randn(1, 2, 8, 9, 25).softmax(-1), torch.randn(1, 2, 8, 9, 4)
    with pytest.raises(ValueError, match=r"input height 8 is smaller than kernel_size \* dilation = 5 \* 2 = 10"):
        na2d_av(attn, v, 5, 2)
    with pytest.raises(ValueError, match=r"input width 9 is smaller than kernel_size \* dilation = 5 \* 2 = 10"):
        na2d_av(attn, v, 5, (1, 2))


def test_float32_rpb_goes_only_with_half_precision_q() -> None:
    """A float32 rpb is accepted with float16/bfloat16 q (autocast) only: with float64 q it is a dtype
    mismatch like any other."""
    q, k, v = _heads_first(3, 1, 2, 8, 9, 4, dtype=torch.float64)
    rpb = torch.randn(2, 5, 5)
    with pytest.raises(ValueError, match="rpb has dtype torch.float32 but q has dtype torch.float64"):
        na2d_qk(q, k, 3, rpb=rpb)
    with pytest.raises(ValueError, match="rpb has dtype torch.float32 but q has dtype torch.float64"):
        na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), 3, rpb=rpb)
    assert na2d_qk(q.bfloat16(), k.bfloat16(), 3, rpb=rpb).dtype == torch.bfloat16


def test_backend_selection() -> None:
    """'auto' runs CPU tensors on the C kernels where they are built (the reference otherwise, and on
    any other device); use_backend overrides it."""
    x = torch.empty(1, 9, 9, 1, 4)
    assert current_backend(x) == ("cpu" if cpu.available() else "reference")
    assert current_backend(x.to("meta")) == "reference"
    for name in ("reference", "cpu") if cpu.available() else ("reference",):
        with use_backend(name):
            assert current_backend(x) == name


def test_explicit_backend_that_cannot_run_is_an_error() -> None:
    """A backend forced where it cannot run is a RuntimeError naming the reason, never a silent
    fallback to another backend."""
    q = torch.randn(1, 7, 8, 1, 4)
    with use_backend("cpu"), pytest.raises(RuntimeError, match="the cpu backend needs CPU tensors, got device meta"):
        na2d(*(q.to("meta"),) * 3, 3)
    reason = flex.unavailable_reason(q.double())
    assert reason
    with use_backend("flex"), pytest.raises(RuntimeError, match="flex backend is unavailable: " + re.escape(reason)):
        na2d(*(q.double(),) * 3, 3)


KERNEL, DILATION = (3, 5), (2, 1)  # a 9x10 map: the general kernels, not whole windows


def _op_cases() -> dict:
    """op(*inputs) on float64 inputs, each entry point with every input it differentiates."""
    q, k, v = _heads_first(3, 2, 2, 9, 10, 3, seed=1, dtype=torch.float64)
    rpb = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attn = torch.randn(2, 2, 9, 10, 15, generator=torch.Generator().manual_seed(3), dtype=torch.float64).softmax(-1)
    tokens = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    return {
        "na2d": (lambda q, k, v, r: na2d(q, k, v, KERNEL, DILATION, r, 0.6), [*tokens, rpb]),
        "na2d_qk": (lambda q, k, r: na2d_qk(q, k, KERNEL, DILATION, r), [q, k, rpb]),
        "na2d_av": (lambda a, v: na2d_av(a, v, KERNEL, DILATION), [attn, v]),
    }


def _derivatives(backend: str, op, inputs: list, which: int) -> tuple:
    """First and second derivatives of a squared-sum loss with respect to input ``which`` alone."""
    leaves = [t.detach().clone().requires_grad_(i == which) for i, t in enumerate(inputs)]
    with use_backend(backend):
        out = op(*leaves)
        (first,) = torch.autograd.grad(out.square().sum(), leaves[which], create_graph=True)
        (second,) = torch.autograd.grad(first.square().sum(), leaves[which])
        (plain,) = torch.autograd.grad(op(*leaves).square().sum(), leaves[which])
    return first, second, plain


@needs_cpu_kernels
@pytest.mark.parametrize(
    "op, which",
    [("na2d", i) for i in range(4)] + [("na2d_qk", i) for i in range(3)] + [("na2d_av", i) for i in range(2)],
    ids=[f"na2d-{n}" for n in "qkvr"] + [f"na2d_qk-{n}" for n in "qkr"] + [f"na2d_av-{n}" for n in "av"],
)
def test_gradient_of_one_input_alone(op: str, which: int) -> None:
    """With only one input requiring grad, its first derivative (plain and create_graph=True) and its
    second derivative on the C kernels equal the reference's (each backward computes exactly the
    gradients autograd asks for: none may be left out)."""
    fn, inputs = _op_cases()[op]
    got = _derivatives("cpu", fn, inputs, which)
    want = _derivatives("reference", fn, inputs, which)
    for name, g, w in zip(("first", "second", "plain"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [(2, 9, 10, 2, 3), (1, 6, 10, 2, 3)], ids=["general", "whole-windows"])
def test_packed_qkv_is_na2d_of_its_slices(backend: str, shape: tuple) -> None:
    """na2d_qkvpacked(qkv) == na2d(*qkv.unbind(3)), output and gradients (of qkv and rpb), on the
    general kernels and on maps of whole windows (3 x 5 kernel, dilation 2 x 2 on 6 x 10)."""
    b, h, w, heads, d = shape
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, h, w, 3, heads, d, generator=gen)
    rpb = torch.randn(heads, 5, 9, generator=gen)
    dilation = DILATION if h == 9 else (2, 2)
    results = []
    for attend in (na2d_qkvpacked, lambda qkv, *args: na2d(*qkv.unbind(3), *args)):
        leaves = [t.clone().requires_grad_() for t in (qkv, rpb)]
        with use_backend(backend):
            out = attend(leaves[0], KERNEL, dilation, leaves[1], 0.6)
        results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    for name, got, want in zip(("out", "grad_qkv", "grad_rpb"), *results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@needs_cpu_flex
def test_flex_plans_differ_by_kernel_size() -> None:
    """Two kernel sizes on one token grid and dilation are two neighborhoods: flex's cached plan (mask
    and bias table) must not be shared between them."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 17, 2, 16, generator=gen) for _ in range(3))  # test_ops_flex.py's grid
    for kernel in ((3, 3), (5, 5)):
        with use_backend("flex"), torch.no_grad():
            out = na2d(q, k, v, kernel, (2, 3), None, 0.3)
        torch.testing.assert_close(out, reference.na2d(q, k, v, kernel, (2, 3), None, 0.3), rtol=1e-4, atol=1e-4)


def test_sdpa_gets_its_bias_in_the_dtype_of_q(monkeypatch) -> None:
    """CUDA's SDPA kernels refuse a float bias in another dtype than q ("invalid dtype for bias"),
    the CPU's takes it: with float16/bfloat16 q and a float32 rpb (autocast) the whole-window path
    hands SDPA the bias in q's dtype. The CUDA rule is enforced here on the CPU."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def strict_sdpa(query, key, value, attn_mask=None, **kwargs):
        assert attn_mask is None or attn_mask.dtype in (query.dtype, torch.bool), (attn_mask.dtype, query.dtype)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", strict_sdpa)
    q, k, v = (t.bfloat16() for t in _heads_first(3, 1, 14, 14, 2, 8))
    rpb = torch.randn(2, 13, 13)
    for dtype in (torch.bfloat16, torch.float16):
        out = grouped.attention(q.to(dtype), k.to(dtype), v.to(dtype), (7, 7), (2, 2), rpb, 0.3, sdpa=True)
        assert out.dtype == dtype
