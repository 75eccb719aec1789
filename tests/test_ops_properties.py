"""The fast CPU backend against the reference definition over random geometries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cpu_backends
from dinat.layers import NeighborhoodAttention2D
from dinat.ops import cpu, na2d, na2d_av, na2d_qk, use_backend

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"cpu backend: {cpu.unavailable_reason()}")

odd_kernel = st.sampled_from([3, 5, 7, 9, 11, 13])


@st.composite
def geometries(draw):
    """Per-axis kernel and dilation, a map at least kernel * dilation (sometimes exactly), shapes."""
    kernel = (draw(odd_kernel), draw(odd_kernel))
    dilation = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    if draw(st.booleans()):  # the same on both axes, as the models use
        kernel, dilation = (kernel[0],) * 2, (dilation[0],) * 2
    size = []
    for k, d in zip(kernel, dilation):
        extra = draw(st.sampled_from([0, 0, 1, 2, 5, 11]))
        size.append(min(k * d + extra, 120))
    if any(s < k * d for s, k, d in zip(size, kernel, dilation)):
        size = [k * d for k, d in zip(kernel, dilation)]
    batch, heads, dim = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 17))
    while batch * heads * dim * size[0] * size[1] * kernel[0] * kernel[1] > 1_500_000:  # keep the oracle quick
        batch, heads, dim = 1, 1, max(1, dim // 2)
        if dim == 1:
            break
    return kernel, dilation, (batch, heads, *size, dim), draw(st.booleans())


def _inputs(shape, kernel, with_rpb, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    table = (shape[1], 2 * kernel[0] - 1, 2 * kernel[1] - 1)
    rpb = torch.randn(table, generator=gen, dtype=torch.float64).requires_grad_() if with_rpb else None
    return q, k, v, rpb


def _run_both(fn, tensors):
    """fn on each backend; returns [(outputs, grads)] for reference then cpu."""
    results = []
    for backend in ("reference", "cpu"):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
        with use_backend(backend):
            out = fn(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
        results.append((out, grads))
    return results


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(geometries(), st.integers(0, 2**16))
def test_fused_matches_reference(geometry, seed) -> None:
    kernel, dilation, shape, with_rpb = geometry
    q, k, v, rpb = (t if t is None else t.detach() for t in _inputs(shape, kernel, with_rpb, seed))
    tokens_first = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    scale = shape[-1] ** -0.5
    (ref, ref_grads), (fast, fast_grads) = _run_both(
        lambda q, k, v, rpb: na2d(q, k, v, kernel, dilation, rpb, scale), [*tokens_first, rpb]
    )
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(geometries(), st.integers(0, 2**16))
def test_unfused_match_reference(geometry, seed) -> None:
    kernel, dilation, shape, with_rpb = geometry
    q, k, v, rpb = (t if t is None else t.detach() for t in _inputs(shape, kernel, with_rpb, seed))

    def attention(q, k, v, rpb):
        attn = na2d_qk(q, k, kernel, dilation, rpb).softmax(-1)
        return na2d_av(attn, v, kernel, dilation)

    (ref, ref_grads), (fast, fast_grads) = _run_both(attention, [q, k, v, rpb])
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "kernel, dilation, size",
    [((3, 3), (11, 12), (34, 38)), ((5, 13), (1, 1), (7, 30)), ((3, 9), (2, 9), (9, 85))],
    ids=["dilation-over-8", "rpb-offsets-over-8", "both"],
)
def test_wide_geometries_match_reference(kernel, dilation, size) -> None:
    """Past 8 columns of spread (the vector width) between the first keys or the rpb offsets of
    neighbouring queries, the CPU kernels split chunks or add the rpb per lane; the hypothesis
    geometries (dilation <= 8) rarely reach that."""
    q, k, v, rpb = (t.detach() for t in _inputs((2, 2, *size, 5), kernel, True, 11))
    tokens_first = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    (ref, ref_grads), (fast, fast_grads) = _run_both(
        lambda q, k, v, rpb: na2d(q, k, v, kernel, dilation, rpb, 0.4), [*tokens_first, rpb]
    )
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "kernel, dilation, size, with_rpb",
    [(3, 1, (5, 6), True), ((3, 5), (2, 1), (7, 6), True), (3, 2, (6, 6), False), (5, 1, (5, 7), True)],
)
def test_gradcheck(kernel, dilation, size, with_rpb) -> None:
    """Analytic gradients of all three entry points equal finite differences (float64)."""
    kernel_pair = (kernel, kernel) if isinstance(kernel, int) else kernel
    q, k, v, rpb = _inputs((1, 2, *size, 3), kernel_pair, with_rpb, 0)
    tokens = [t.detach().permute(0, 2, 3, 1, 4).contiguous().requires_grad_() for t in (q, k, v)]
    kk = kernel_pair[0] * kernel_pair[1]
    attn = torch.randn(1, 2, *size, kk, dtype=torch.float64).softmax(-1).requires_grad_()
    with use_backend("cpu"):
        args = [*tokens] + ([rpb] if with_rpb else [])
        assert torch.autograd.gradcheck(
            lambda q, k, v, *r: na2d(q, k, v, kernel, dilation, r[0] if r else None, 0.7), args
        )
        args = [q, k] + ([rpb] if with_rpb else [])
        assert torch.autograd.gradcheck(lambda q, k, *r: na2d_qk(q, k, kernel, dilation, r[0] if r else None), args)
        assert torch.autograd.gradcheck(lambda a, v: na2d_av(a, v, kernel, dilation), [attn, v])


def test_float32_matches_float64_reference() -> None:
    """The vectorised float32 path (its own exp) stays within float32 rounding of the definition."""
    q, k, v, rpb = (t.detach() for t in _inputs((2, 2, 23, 30, 32), (7, 7), True, 3))
    expected = na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), 7, 2, rpb.detach())
    with use_backend("cpu"):
        got = na2d(*(t.float().permute(0, 2, 3, 1, 4) for t in (q, k, v)), 7, 2, rpb.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("size", "dilation"), [(14, 2), (15, 2)], ids=["whole-windows", "kernels"])
def test_half_precision_computes_in_float32(dtype, size, dilation) -> None:
    """float16 / bfloat16 on the CPU: the float32 result of the same (upcast) inputs, rounded once,
    on both paths (whole-window groups and the C kernels)."""
    q, k, v = (torch.randn(2, size, size, 2, 16).to(dtype) for _ in range(3))
    rpb = torch.randn(2, 13, 13).to(dtype)
    with use_backend("cpu"):
        got = na2d(q, k, v, 7, dilation, rpb)
        expected = na2d(q.float(), k.float(), v.float(), 7, dilation, rpb.float())
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected.to(dtype), rtol=0, atol=0)


def test_bfloat16_under_autocast() -> None:
    """bf16 inputs (as autocast's linear layers give) compute in float32 and come back bf16."""
    q, k, v = (torch.randn(2, 14, 14, 2, 16) for _ in range(3))
    rpb = torch.randn(2, 13, 13)
    with use_backend("cpu"):
        expected = na2d(q, k, v, 7, 1, rpb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = na2d(q.bfloat16(), k.bfloat16(), v.bfloat16(), 7, 1, rpb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", cpu_backends())
def test_unfused_ops_with_float32_weights_and_bfloat16_values(backend) -> None:
    """Under autocast softmax gives float32 weights while v is bf16: na2d_av takes both, returns bf16."""
    q, k, v = (torch.randn(2, 2, 14, 14, 16) for _ in range(3))
    q, rpb = q * 0.25, torch.randn(2, 13, 13)
    expected = na2d_av(na2d_qk(q, k, 7, 1, rpb).softmax(-1), v, 7, 1)
    with use_backend(backend):
        logits = na2d_qk(q.bfloat16(), k.bfloat16(), 7, 1, rpb)
        got = na2d_av(logits.float().softmax(-1), v.bfloat16(), 7, 1)
    assert logits.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("size", [9, 6], ids=["kernels", "whole-windows"])
def test_float32_inputs_under_autocast_keep_their_dtype(backend, size) -> None:
    """As NATTEN's ops (and the documented contract): outputs in the inputs' dtype under autocast
    too, on every backend (the reference's einsums would give the autocast dtype)."""
    q, k, v = (torch.randn(1, 2, size, size, 8) for _ in range(3))
    attn, rpb = torch.randn(1, 2, size, size, 9).softmax(-1), torch.randn(2, 5, 5)
    tokens = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [na2d_qk(q, k, 3, 2), na2d_qk(q, k, 3, 2, rpb), na2d_av(attn, v, 3, 2), na2d(*tokens, 3, 2, rpb)]
    assert [t.dtype for t in outputs] == [torch.float32] * 4


def test_module_dropout_path_under_autocast() -> None:
    """Training with attention dropout (the unfused path) under bf16 autocast runs and stays close."""
    module = NeighborhoodAttention2D(dim=32, num_heads=2, kernel_size=5, dilation=2, attn_drop=0.1).train()
    x = torch.randn(2, 12, 13, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and module.rpb.grad is not None and torch.isfinite(module.rpb.grad).all()


def test_torch_compile_without_graph_breaks() -> None:
    q, k, v = (torch.randn(1, 16, 12, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 9, 9, requires_grad=True)

    def attention(q, k, v, rpb):
        return na2d(q, k, v, 5, (2, 1), rpb).sum(-1)

    with use_backend("cpu"):
        eager = attention(q, k, v, rpb)
        compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")(q, k, v, rpb)
        torch.testing.assert_close(compiled, eager)
        grads = torch.autograd.grad(compiled.sum(), [q, k, v, rpb])
        expected = torch.autograd.grad(eager.sum(), [q, k, v, rpb])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_double_backward_of_unfused_ops() -> None:
    """The unfused ops' gradients are themselves made of differentiable kernels."""
    q, k, _, rpb = _inputs((1, 2, 6, 7, 3), (3, 3), True, 1)
    attn = torch.randn(1, 2, 6, 7, 9, dtype=torch.float64).softmax(-1).requires_grad_()
    with use_backend("cpu"):
        assert torch.autograd.gradgradcheck(lambda q, k, r: na2d_qk(q, k, 3, (2, 1), r), [q, k, rpb])
        assert torch.autograd.gradgradcheck(lambda a, v: na2d_av(a, v, 3, (2, 1)), [attn, k])


@pytest.mark.parametrize("op", ["na2d", "na2d_qk", "na2d_av"])
def test_outputs_take_in_place_changes(op: str) -> None:
    """The outputs are the user's tensors: changed in place (a residual ``out += x``), they give the
    reference's values and gradients (autograd forbids in-place changes of a view made inside a
    custom op, and the kernels' outputs had been views of a buffer with slack)."""
    q, k, v, rpb = _inputs((1, 2, 9, 10, 4), (3, 3), True, 3)
    attn = torch.randn(1, 2, 9, 10, 9, dtype=torch.float64).softmax(-1).requires_grad_()
    inputs = {
        "na2d": (
            [t.detach().permute(0, 2, 3, 1, 4).requires_grad_() for t in (q, k, v)] + [rpb],
            lambda a, b, c, r: na2d(a, b, c, 3, (2, 3), r),
        ),
        "na2d_qk": ([q, k], lambda a, b: na2d_qk(a, b, 3, (2, 3))),  # with rpb, the output is a sum
        "na2d_av": ([attn, v], lambda a, b: na2d_av(a, b, 3, (2, 3))),
    }
    tensors, fn = inputs[op]
    results = []
    for backend in ("cpu", "reference"):
        with use_backend(backend):
            out = fn(*tensors)
            out += 1.5 * out.detach() + 1
            out.mul_(2)
        results.append((out, torch.autograd.grad(out.square().sum(), tensors)))
    torch.testing.assert_close(results[0], results[1])


def test_double_backward_of_the_fused_op() -> None:
    """create_graph=True: the fused op's backward runs through the differentiable primitives."""
    q, k, v, rpb = _inputs((1, 2, 6, 7, 3), (3, 5), True, 2)
    tokens_first = [t.detach().permute(0, 2, 3, 1, 4).requires_grad_() for t in (q, k, v)]
    with use_backend("cpu"):
        assert torch.autograd.gradgradcheck(lambda q, k, v, r: na2d(q, k, v, (3, 5), (2, 1), r), [*tokens_first, rpb])


def _opcheck_cases() -> list:
    """Each C-kernel custom op with float64 arguments (kernel 3x5, dilation 2x1, 9x10 map), with
    contiguous inputs and with dense permuted ones (the kernels' outputs are contiguous whatever
    their inputs' strides: a fake that followed an input's, as empty_like does, broke inductor)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, order=None):  # order: how the dims lie in memory, outermost first
        order = order or tuple(range(len(shape)))
        stored = torch.randn(*(shape[d] for d in order), generator=gen, dtype=torch.float64)
        return stored.permute(*(order.index(d) for d in range(len(shape)))).requires_grad_()

    kernel, dilation = [3, 5], [2, 1]
    cases = {}
    for layout, order in (("", (0, 1, 2, 3)), ("-permuted", (0, 2, 3, 1))):
        a, b, c = (rand(4, 8, 9, 10, order=order) for _ in range(3))
        weights, rpb = rand(4, 9, 15, 10, order=order), rand(2, 5, 9)
        probabilities = weights.detach().softmax(2)
        cases |= {
            f"na_dot{layout}": (a, b, kernel, dilation),
            f"na_weighted_sum{layout}": (weights, b, kernel, dilation),
            f"na_scatter{layout}": (weights, a, kernel, dilation),
            f"na2d_fused{layout}": (a, b, c, rpb, 2, 0.3, kernel, dilation),
            f"na2d_fused-no-rpb{layout}": (a, b, c, None, 2, 0.3, kernel, dilation),
            f"na_bias_grad{layout}": (weights.detach(), 2, kernel, dilation),
            f"na_softmax_backward{layout}": (a.detach(), b.detach(), probabilities, kernel, dilation),
        }
    return [pytest.param(case.split("-")[0], args, id=case) for case, args in cases.items()]


@pytest.mark.parametrize("name,args", _opcheck_cases())
def test_custom_ops_pass_opcheck(name: str, args: tuple) -> None:
    """torch.library.opcheck: schema, autograd registration, and fake implementations that match the
    real outputs' shapes, dtypes and strides (what torch.compile relies on)."""
    torch.library.opcheck(getattr(cpu, name), args)


@pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())
@pytest.mark.parametrize(("kernel", "width", "channels"), [((13, 11), 11, 33), ((7, 7), 9, 8)])
def test_threads_never_write_into_each_others_slabs(kernel, width, channels) -> None:
    """Threads own whole slabs (batch x heads): two threads give one thread's result bit for bit,
    call after call. A vector store at a clamped right border once reached into the next slab and
    lost the other thread's updates (about 1 call in 20 on 2 cores)."""
    torch.manual_seed(0)
    height = kernel[0]
    p = torch.randn(2, height, kernel[0] * kernel[1], width, dtype=torch.float64)
    a = torch.randn(2, channels, height, width, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = cpu.na_scatter(p, a, list(kernel), [1, 1])
        torch.set_num_threads(2)
        for _ in range(2000):
            assert torch.equal(cpu.na_scatter(p, a, list(kernel), [1, 1]), expected)
    finally:
        torch.set_num_threads(threads)
