"""Maps whose dilation groups are single windows run as batched attention (dinat.ops.grouped)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import assert_half_close_to_float32
from dinat.ops import grouped, reference

# (B, H, W, heads, D), kernel, dilation: every group is exactly one window
WHOLE = [
    ((2, 7, 7, 3, 8), (7, 7), (1, 1)),
    ((1, 14, 14, 2, 16), (7, 7), (2, 2)),
    ((2, 12, 15, 1, 8), (3, 5), (4, 3)),
]


def test_is_whole() -> None:
    assert grouped.is_whole(14, 14, (7, 7), (2, 2)) and grouped.is_whole(12, 15, (3, 5), (4, 3))
    assert not grouped.is_whole(14, 14, (7, 7), (1, 1)) and not grouped.is_whole(15, 14, (7, 7), (2, 2))


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
@pytest.mark.parametrize("with_rpb", [True, False], ids=["rpb", "no-rpb"])
@pytest.mark.parametrize("shape,kernel,dilation", WHOLE, ids=[str(c[0][1:3]) for c in WHOLE])
def test_equals_the_definition(shape, kernel, dilation, with_rpb, sdpa) -> None:
    """Forward and every gradient, float64, against the reference (which gathers neighborhoods)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpb_shape = (shape[3], 2 * kernel[0] - 1, 2 * kernel[1] - 1)
    rpb = torch.randn(rpb_shape, generator=gen, dtype=torch.float64, requires_grad=True) if with_rpb else None
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    out = grouped.attention(q, k, v, kernel, dilation, rpb, 0.4, sdpa=sdpa)
    expected = reference.na2d(q, k, v, kernel, dilation, rpb, 0.4)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_low_precision_inputs_with_a_float32_rpb(sdpa) -> None:
    """As under autocast: bfloat16 q, k, v and a float32 rpb give a bfloat16 result close to float32."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 14, 14, 2, 16, generator=gen) for _ in range(3))
    rpb = torch.randn(2, 13, 13, generator=gen)
    low = grouped.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), (7, 7), (2, 2), rpb, 0.25, sdpa=sdpa)
    assert low.dtype == torch.bfloat16
    full = grouped.attention(q, k, v, (7, 7), (2, 2), rpb, 0.25, sdpa=sdpa)
    torch.testing.assert_close(low.float(), full, rtol=2e-2, atol=2e-2)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_close_to_float32(device, dtype) -> None:
    """float16/bfloat16 q, k, v with a float32 rpb (as under autocast), through SDPA (the CUDA path):
    output and gradients within 1e-2 of float32."""
    shape, kernel, dilation = (2, 14, 14, 2, 32), (7, 7), (2, 2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, *shape, generator=gen).to(device)
    rpb = torch.randn(shape[3], 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen).to(device)

    def attend(q, k, v, rpb):
        return grouped.attention(q, k, v, kernel, dilation, rpb, 32**-0.5, sdpa=True)

    assert_half_close_to_float32(attend, q, k, v, rpb, dtype)


def test_compiles_cleanly() -> None:
    """torch.compile(fullgraph=True) traces the path, with rpb, without a warning (dynamo warns
    about lru_cache-wrapped calls) and gives the eager result."""
    shape, kernel, dilation = WHOLE[1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    rpb = torch.randn(shape[3], 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen)

    def attend(q, k, v, rpb):
        return grouped.attention(q, k, v, kernel, dilation, rpb, 0.4)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(attend, fullgraph=True, backend="aot_eager")(q, k, v, rpb)
    torch.testing.assert_close(out, attend(q, k, v, rpb))


def test_sdpa_on_cuda_unless_only_the_rpb_needs_a_gradient() -> None:
    """pytorch#148476: SDPA's memory-efficient backward crashed when only the bias required grad."""
    q = torch.randn(1, 7, 7, 1, 4)
    rpb = torch.randn(1, 13, 13)
    assert grouped.sdpa_by_default("cuda", (q, q, q), rpb)
    assert not grouped.sdpa_by_default("cpu", (q, q, q), rpb)
    rpb.requires_grad_()
    assert not grouped.sdpa_by_default("cuda", (q, q, q), rpb)
    with torch.no_grad():
        assert grouped.sdpa_by_default("cuda", (q, q, q), rpb)
    assert grouped.sdpa_by_default("cuda", (q.requires_grad_(), q, q), rpb)


def test_rpb_gather_is_an_index_select() -> None:
    """The bias comes from the flat rpb table by index_select, whose backward is one index_add:
    with advanced indexing's backward (index_put with accumulate) the op took the host more time
    (benchmarks/triton_host_overhead.py), and eagerly on CUDA the small maps are bound by the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 7, 7, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 13, 13, requires_grad=True)
    with Ops() as ops:
        grouped.attention(q, k, v, (7, 7), (1, 1), rpb, 0.3, sdpa=True).sum().backward()
    assert {"index_select", "index_add"} <= ops.names and not {"index", "index_put"} & ops.names, ops.names
