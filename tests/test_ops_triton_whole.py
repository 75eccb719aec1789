"""The Triton backend's whole-window kernels (maps whose dilation groups are single windows; the
default, DINAT_WHOLE_WINDOW=triton): against the original's outputs and the float64 reference, how na2d
routes maps to them, their custom ops under opcheck and torch.compile (on CUDA, or in Triton's
interpreter: see _triton_utils).
"""

from __future__ import annotations

import pytest
import torch

from _triton_utils import (
    DEVICE,
    GOLDEN,
    GOLDEN_IDS,
    assert_matches_golden,
    needs_interpreter_run,
    needs_kernels,
    recording_aot_eager,
    run_interpreted,
)
from conftest import assert_half_close_to_float32
from dinat import NeighborhoodAttention2D
from dinat.ops import grouped, na2d, na2d_qkvpacked, primitives, reference, triton_na, use_backend
from dinat.ops.functional import check_kernel_and_dilation


@needs_interpreter_run
def test_in_triton_interpreter() -> None:
    run_interpreted(__file__)


@pytest.fixture
def whole_kernels(monkeypatch) -> list[str]:
    """na2d runs whole-window maps on the whole-window kernels (DINAT_WHOLE_WINDOW=triton); yields the
    names of the kernels launched."""
    monkeypatch.setattr(triton_na, "WHOLE_WINDOW", "triton")
    launched = []
    kernel_of = triton_na._whole_kernel

    def recording(name: str):
        launched.append(name)
        return kernel_of(name)

    monkeypatch.setattr(triton_na, "_whole_kernel", recording)
    torch._dynamo.reset()  # compiled code guards on WHOLE_WINDOW: trace it again
    return launched


def _is_whole(case: dict) -> bool:
    return grouped.is_whole(*case["q"].shape[2:4], *check_kernel_and_dilation(case["kernel_size"], case["dilation"]))


WHOLE_GOLDEN = [(case, name) for case, name in zip(GOLDEN, GOLDEN_IDS) if _is_whole(case)]


@needs_kernels
@pytest.mark.parametrize("case", [c for c, _ in WHOLE_GOLDEN], ids=[i for _, i in WHOLE_GOLDEN])
def test_golden_cases_of_whole_windows(whole_kernels, case: dict) -> None:
    """The original's outputs and gradients (7x7 at dilation 1, 14x14 at 2, 28x28 at 4, 56x56 at 8)."""
    assert_matches_golden(case)
    assert whole_kernels == ["forward", "backward"]


# (B, H, W, heads, D), kernel, dilation, rpb, programs of the rpb gradient (_WHOLE_PROGRAMS): one
# group per program, several (6 groups per program of 1 per head; 18 groups over 5 programs, unevenly),
# tokens padded to 16 (3x3) and to 64 (7x7), head dims that are not powers of two, rectangular kernels.
CASES = [
    ((2, 7, 7, 2, 16), (7, 7), (1, 1), True, 1024),
    ((1, 14, 21, 3, 16), (7, 7), (2, 3), True, 4),
    ((3, 6, 10, 2, 20), (3, 5), (2, 2), False, 1024),
    ((2, 9, 9, 1, 8), (3, 3), (3, 3), True, 5),
]


@needs_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["slices", "packed"])
@pytest.mark.parametrize("shape,kernel,dilation,with_rpb,programs", CASES, ids=[str(c[:3]) for c in CASES])
def test_matches_reference(whole_kernels, monkeypatch, shape, kernel, dilation, with_rpb, programs, packed) -> None:
    """Forward and every gradient against the float64 reference; qkv stored q-, k-, v-major, so that
    the kernels read and write tokens with strides of every kind."""
    monkeypatch.setattr(triton_na, "_WHOLE_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(0)
    b, h, w, heads, d = shape
    qkv = torch.randn(3, b, h, w, heads, d, generator=gen, dtype=torch.float64).permute(1, 2, 3, 0, 4, 5)
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen, dtype=torch.float64)
    leaves = [qkv.requires_grad_()] + ([rpb.requires_grad_()] if with_rpb else [])
    expected = reference.na2d(*qkv.unbind(3), kernel, dilation, rpb if with_rpb else None, 0.3)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad)

    leaves = [t.detach().to(DEVICE, torch.float32).requires_grad_() for t in leaves]
    with use_backend("triton"):
        bias = leaves[1] if with_rpb else None
        out = na2d_qkvpacked(leaves[0], kernel, dilation, bias, 0.3) if packed else na2d(
            *leaves[0].unbind(3), kernel, dilation, bias, 0.3)  # fmt: skip
    grads = torch.autograd.grad(out, leaves, grad.to(DEVICE, torch.float32))
    torch.testing.assert_close(out.cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("qkv", "rpb"), grads, expected_grads):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-4, msg=name)
    assert whole_kernels == ["forward", "backward"]


@needs_kernels
def test_half_precision_close_to_float32(whole_kernels) -> None:
    """float16 q, k, v with a float32 rpb (as under autocast): within 1e-2 of float32."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 14, 14, 2, 32, generator=gen).to(DEVICE) for _ in range(3))
    rpb = torch.randn(2, 13, 13, generator=gen).to(DEVICE)

    def attend(q, k, v, rpb):
        with use_backend("triton"):
            return na2d(q, k, v, 7, 2, rpb)

    assert_half_close_to_float32(attend, q, k, v, rpb, torch.float16)
    assert whole_kernels == ["forward", "backward"] * 2


@needs_kernels
def test_maps_routed_by_setting_and_size(monkeypatch) -> None:
    """With "sdpa" whole-window maps run as batched attention; with "triton" (the default) on the
    whole-window kernels, but for groups of over 64 tokens (9x9) and head features over 256 bytes
    (float32 at head dim 72), which stay batched; other maps always run on the neighborhood kernels."""
    batched = []
    attention = grouped.attention
    monkeypatch.setattr(grouped, "attention", lambda *args: batched.append(args[0].shape) or attention(*args))
    cases = [  # (map, head dim, kernel, dilation), whether batched with "sdpa", with "triton"
        ((7, 7, 8), 7, 1, True, False),
        ((14, 21, 8), 7, (2, 3), True, False),
        ((9, 9, 8), 9, 1, True, True),
        ((7, 7, 72), 7, 1, True, True),
        ((9, 9, 8), 7, 1, False, False),
    ]
    for way in ("sdpa", "triton"):
        monkeypatch.setattr(triton_na, "WHOLE_WINDOW", way)
        for (h, w, d), kernel, dilation, *expected_batched in cases:
            q = torch.randn(1, h, w, 1, d, device=DEVICE)
            batched.clear()
            with use_backend("triton"):
                na2d(q, q, q, kernel, dilation)
            assert bool(batched) == expected_batched[way == "triton"], (way, h, w, d, kernel, dilation)


def test_setting_is_checked(monkeypatch) -> None:
    monkeypatch.delenv("DINAT_WHOLE_WINDOW", raising=False)
    assert triton_na._whole_window_way() == "triton"
    monkeypatch.setenv("DINAT_WHOLE_WINDOW", "sdpa")
    assert triton_na._whole_window_way() == "sdpa"
    monkeypatch.setenv("DINAT_WHOLE_WINDOW", "kernels")
    with pytest.raises(ValueError, match=r"DINAT_WHOLE_WINDOW must be one of \('sdpa', 'triton'\), got 'kernels'"):
        triton_na._whole_window_way()


@needs_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["slices", "packed"])
def test_custom_ops_pass_opcheck(monkeypatch, packed) -> None:
    """opcheck on a whole-window map: the fakes give the whole-window kernels' rpb partial sums (2
    programs per head here) with the shapes, dtypes and strides of the real ones."""
    monkeypatch.setattr(triton_na, "_WHOLE_PROGRAMS", 4)
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 6, 6, 3, 2, 8, generator=gen).to(DEVICE, torch.float16).requires_grad_()
    rpb = torch.randn(2, 5, 5, generator=gen).to(DEVICE).requires_grad_()
    features = [qkv] if packed else list(qkv.unbind(3))
    forward, backward = (
        (triton_na.na2d_packed_triton, triton_na.na2d_packed_triton_backward)
        if packed
        else (triton_na.na2d_triton, triton_na.na2d_triton_backward)
    )
    args = ([3, 3], [2, 2], 0.3)
    torch.library.opcheck(forward, (*features, rpb, *args))
    out, lse = forward(*features, rpb, *args)
    detached = [t.detach() for t in (*features, out, lse)]
    torch.library.opcheck(backward, (torch.randn_like(out), *detached[:-2], rpb.detach(), *detached[-2:], *args))
    *_, partial = backward(torch.randn_like(out), *detached[:-2], rpb.detach(), *detached[-2:], *args)
    assert partial.shape == (2, 2, 9, 9)


@needs_kernels
def test_compiled_agrees_with_eager(whole_kernels) -> None:
    """Under torch.compile (fullgraph, the custom ops in the graph) as eagerly, the rpb gradient's
    one-hots built in the graph."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 14, 14, 3, 2, 16, generator=gen).to(DEVICE)
    rpb = torch.randn(2, 13, 13, generator=gen).to(DEVICE)

    def attend(qkv, rpb):
        with use_backend("triton"):
            return na2d_qkvpacked(qkv, 7, 2, rpb, 0.3)

    traced = []
    compiled = torch.compile(attend, fullgraph=True, backend=recording_aot_eager(traced))
    results = []
    for fn in (attend, compiled):
        leaves = [qkv.clone().requires_grad_(), rpb.clone().requires_grad_()]
        out = fn(*leaves)
        results.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    assert f"dinat.na2d_packed_triton_v{primitives.OPS_VERSION}.default" in traced
    assert "aten.scaled_dot_product_attention.default" not in traced
    for eager, got in zip(*results):
        torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    assert whole_kernels == ["forward", "backward"] * 2


@needs_kernels
def test_export_with_a_dynamic_map_size(whole_kernels) -> None:
    """torch.export over a range of map sizes: one program, the fused op in it, which runs the
    whole-window kernels at the whole size (14x14 at dilation 2) and the neighborhood ones elsewhere,
    as eagerly."""
    torch.manual_seed(4)
    layer = NeighborhoodAttention2D(16, 2, kernel_size=7, dilation=2).to(DEVICE).eval()
    sizes = {1: torch.export.Dim("h", min=14, max=64), 2: torch.export.Dim("w", min=14, max=64)}
    with use_backend("triton"):
        program = torch.export.export(layer, (torch.randn(1, 14, 14, 16, device=DEVICE),), dynamic_shapes=(sizes,))
    targets = [str(node.target) for node in program.graph.nodes]
    assert f"dinat.na2d_packed_triton_v{primitives.OPS_VERSION}.default" in targets
    for shape in ((1, 14, 14, 16), (1, 15, 17, 16)):
        x = torch.randn(shape, device=DEVICE)
        whole_kernels.clear()
        with torch.no_grad(), use_backend("triton"):
            torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-6, atol=1e-6)
        assert whole_kernels == (["forward"] * 2 if shape[1:3] == (14, 14) else []), shape


@needs_kernels
def test_double_backward(whole_kernels) -> None:
    """create_graph=True differentiates the whole-window backward again (through the primitives)."""
    gen = torch.Generator().manual_seed(4)
    inputs = (torch.randn(1, 6, 6, 3, 1, 8, generator=gen, dtype=torch.float64),
              torch.randn(1, 5, 5, generator=gen, dtype=torch.float64))  # fmt: skip

    def second_derivatives(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
        with use_backend(backend):
            out = na2d_qkvpacked(leaves[0], 3, 2, leaves[1], 0.3)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    got = second_derivatives("triton", torch.float32)
    # the differentiable backward runs on the primitives; the second derivative reaches the forward's
    # output again through the first's incoming gradient (2 * out), whose backward is the kernel's
    assert whole_kernels == ["forward", "backward"]
    expected = second_derivatives("reference", torch.float64)
    for name, g, e in zip(("qkv", "rpb"), got, expected):
        torch.testing.assert_close(g.cpu().double(), e.cpu(), rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)
