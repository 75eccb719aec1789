"""The flex_attention backend against the reference (SPEC section 1).

On CPU flex compiles through inductor, one kernel per shape (a few seconds each), so the tests share
a handful of shapes. CUDA-only checks (flex's own backward in Triton, half precision, the golden
cases) skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DATA, assert_half_close_to_float32
from dinat.ops import flex, na2d, reference, use_backend

CPU_FLEX = flex.available(torch.empty(0))
needs_cpu_flex = pytest.mark.skipif(not CPU_FLEX, reason=f"flex on CPU: {flex.unavailable_reason(torch.empty(0))}")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and flex.available(torch.empty(0, device="cuda"))),
    reason="needs a CUDA device with flex_attention",
)
TOL = dict(rtol=1e-4, atol=1e-4)

# (kernel, dilation, rpb): one token grid, three compiled kernels (rpb shape / presence differ).
CONFIGS = [
    ((5, 5), (1, 1), True),
    ((5, 5), (2, 3), True),
    ((5, 5), (3, 2), False),
    ((3, 7), (4, 2), True),
]
GRID = (2, 16, 17, 2, 16)  # B, H, W, heads, D: non-square, H*W not a multiple of any block size


def _inputs(kernel, with_rpb, grid=GRID, device="cpu", seed=0):
    """q, k, v as strided slices of one qkv tensor (as the attention module makes them)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w, heads, d = grid
    qkv = torch.randn(b, h, w, 3, heads, d, generator=gen).to(device)
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen).to(device) if with_rpb else None
    return q, k, v, rpb


def _dense_mask(height, width, kernel, dil):
    """(L, L) bool from the reference definition: token i attends to token j."""
    rows, _ = reference.axis_neighborhood(height, kernel[0], dil[0])
    cols, _ = reference.axis_neighborhood(width, kernel[1], dil[1])
    keys = rows[:, None, :, None] * width + cols[None, :, None, :]  # (H, W, kh, kw)
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    mask[torch.arange(height * width)[:, None], keys.reshape(height * width, -1)] = True
    return mask


@pytest.mark.parametrize(
    "height,width,kernel,dil",
    [
        (7, 7, (7, 7), (1, 1)),
        (9, 11, (3, 3), (1, 1)),
        (23, 22, (7, 7), (3, 3)),
        (30, 17, (7, 5), (4, 3)),
        (56, 56, (7, 7), (8, 8)),
        (21, 40, (5, 9), (2, 4)),
        (16, 20, (3, 5), (2, 1)),
    ],
)
@pytest.mark.parametrize("block", [flex._CPU_BLOCK, flex._CUDA_BLOCK], ids=["cpu-blocks", "cuda-blocks"])
def test_plan_is_the_neighborhood(height, width, kernel, dil, block):
    """mask_mod, block mask and bias index of the plan equal the definition (no flex call), with
    the sparse block sizes of either device."""
    plan = flex._build_plan(height, width, kernel, dil, torch.device("cpu"), block)
    length = height * width
    perm = torch.arange(length) if plan.perm is None else plan.perm
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = plan.block_mask.mask_mod(None, None, q, kv)  # in flex order
    expected = _dense_mask(height, width, kernel, dil)[perm[:, None], perm[None, :]]
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == length * kernel[0] * kernel[1]

    # Blocks: every admitted pair lies in a listed block, and "full" blocks are entirely admitted.
    bq, bkv = plan.block_mask.BLOCK_SIZE
    padded = torch.zeros(-(-length // bq) * bq, -(-length // bkv) * bkv, dtype=torch.bool)
    padded[:length, :length] = mask
    blocks = padded.view(padded.shape[0] // bq, bq, -1, bkv).permute(0, 2, 1, 3).flatten(2)
    bm = plan.block_mask
    listed = torch.zeros(blocks.shape[:2], dtype=torch.bool)
    full = torch.zeros_like(listed)
    for row in range(blocks.shape[0]):
        listed[row, bm.kv_indices[0, 0, row, : bm.kv_num_blocks[0, 0, row]].long()] = True
        full[row, bm.full_kv_indices[0, 0, row, : bm.full_kv_num_blocks[0, 0, row]].long()] = True
    assert torch.equal(blocks.any(-1), listed | full)
    assert not (listed & full).any()
    assert blocks[full].all()

    # Bias: the flattened rpb index the score_mod reads equals the reference's relative_position_bias.
    rpb = torch.arange((2 * kernel[0] - 1) * (2 * kernel[1] - 1), dtype=torch.float32).view(
        1, 2 * kernel[0] - 1, 2 * kernel[1] - 1
    )
    index = plan.table[flex._KV_BIAS][None, :] + plan.table[flex._Q_BIAS][:, None]
    got = index[mask].view(length, -1)  # admitted keys of each query, ascending flex position
    ref_bias = reference.relative_position_bias(rpb, height, width, kernel, dil)[0].view(length, -1)
    ref_keys = _dense_mask(height, width, kernel, dil).nonzero()[:, 1].view(length, -1)
    # reorder the reference to flex order of queries and of keys
    inverse = torch.argsort(perm)
    ref_sorted = torch.gather(ref_bias, 1, torch.argsort(inverse[ref_keys], dim=1))[perm]
    assert torch.equal(got.float(), ref_sorted)


def test_availability_reasons():
    assert not flex.available(torch.empty(0, dtype=torch.float64))
    assert "float64" in flex.unavailable_reason(torch.empty(0, dtype=torch.float64))
    assert not flex.available(torch.empty(0, device="meta"))
    assert "meta" in flex.unavailable_reason(torch.empty(0, device="meta"))
    if CPU_FLEX:
        assert flex.unavailable_reason(torch.empty(0)) == ""
        assert flex.available(torch.empty(0, dtype=torch.bfloat16))


@needs_cpu_flex
@pytest.mark.parametrize("kernel,dil,with_rpb", CONFIGS, ids=[f"k{c[0]}-d{c[1]}-rpb{c[2]}" for c in CONFIGS])
def test_forward_and_gradients_match_reference(kernel, dil, with_rpb):
    q, k, v, rpb = _inputs(kernel, with_rpb)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([rpb.clone().requires_grad_()] if with_rpb else [])
    with use_backend("flex"):
        with torch.no_grad():  # inference: flex only, also for leaves that require grad
            expected = reference.na2d(q, k, v, kernel, dil, rpb, 0.3)
            torch.testing.assert_close(na2d(q, k, v, kernel, dil, rpb, scale=0.3), expected, **TOL)
            rpb_leaf = leaves[3] if with_rpb else None
            torch.testing.assert_close(na2d(*leaves[:3], kernel, dil, rpb_leaf, scale=0.3), expected, **TOL)
        out = na2d(*leaves[:3], kernel, dil, leaves[3] if with_rpb else None, scale=0.3)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = reference.na2d(*ref_leaves[:3], kernel, dil, ref_leaves[3] if with_rpb else None, 0.3)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, e in zip("q k v rpb".split(), got, expected):
        torch.testing.assert_close(g, e, **TOL, msg=name)


@needs_cpu_flex
def test_plans_with_cuda_block_sizes_run_exactly(monkeypatch):
    """The plans CUDA uses (128 x 128 sparse blocks), run by the CPU flex kernel."""
    monkeypatch.setattr(flex, "_CPU_BLOCK", flex._CUDA_BLOCK)
    monkeypatch.setattr(flex, "_plans", flex._Plans())
    kernel, dil = (5, 5), (2, 3)
    q, k, v, rpb = _inputs(kernel, True)
    with use_backend("flex"), torch.no_grad():
        out = na2d(q, k, v, kernel, dil, rpb, scale=0.3)
    torch.testing.assert_close(out, reference.na2d(q, k, v, kernel, dil, rpb, 0.3), **TOL)


@needs_cpu_flex
def test_gradient_to_some_inputs_only():
    kernel, dil = (5, 5), (2, 3)
    q, k, v, rpb = _inputs(kernel, True)
    rpb = rpb.clone().requires_grad_()
    with use_backend("flex"):
        (g_rpb,) = torch.autograd.grad(na2d(q, k, v, kernel, dil, rpb, 0.3).square().sum(), [rpb])
    rpb_ref = rpb.detach().clone().requires_grad_()
    (e_rpb,) = torch.autograd.grad(reference.na2d(q, k, v, kernel, dil, rpb_ref, 0.3).square().sum(), [rpb_ref])
    torch.testing.assert_close(g_rpb, e_rpb, **TOL)


@pytest.mark.parametrize("kernel,dil", [((5, 5), (2, 3)), ((3, 7), (4, 2))])
def test_flex_native_backward_semantics(kernel, dil, monkeypatch):
    """flex's own autograd (what CUDA runs, rpb gradient through score_mod included), exercised on
    CPU by its dense eager implementation, which PyTorch refuses on CPU only by an input check."""
    from torch.nn.attention import flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    monkeypatch.setattr(flex, "_run_attend", flex._attend)  # uncompiled: flex's dense math path
    q, k, v, rpb = (t.clone().requires_grad_() for t in _inputs(kernel, True, grid=(1, 12, 16, 2, 8)))
    out = flex._forward(q, k, v, kernel, dil, rpb, 0.3)
    ref = reference.na2d(q, k, v, kernel, dil, rpb, 0.3)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    for name, g, e in zip(
        "q k v rpb".split(),
        torch.autograd.grad(out, (q, k, v, rpb), grad),
        torch.autograd.grad(ref, (q, k, v, rpb), grad),
    ):
        torch.testing.assert_close(g, e, **TOL, msg=name)


@needs_cpu_flex
def test_double_backward_on_cpu():
    """Under create_graph=True the CPU path's backward (the reference's formulas) is differentiable
    again: second derivatives equal the reference backend's."""
    kernel, dil = (5, 5), (2, 3)

    def second_derivatives(backend):
        q, k, v, rpb = (t.clone().requires_grad_() for t in _inputs(kernel, True))
        with use_backend(backend):
            out = na2d(q, k, v, kernel, dil, rpb, 0.3)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v, rpb))

    for name, got, want in zip("q k v rpb".split(), second_derivatives("flex"), second_derivatives("reference")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


@needs_cpu_flex
@pytest.mark.parametrize(("dil", "factor"), [((2, 3), 2.0), ((1, 1), None)], ids=["dilated", "undilated"])
def test_torch_compile_without_graph_breaks(dil, factor):
    """A user's torch.compile(fullgraph=True) traces the flex path, plan lookup included. Undilated
    (no reordering), inductor once got a view it cannot lower on the CPU; there it cannot yet fuse
    an elementwise op into flex's output either (a PyTorch limitation), hence no factor."""
    kernel = (5, 5)
    q, k, v, rpb = _inputs(kernel, True)
    scaled = (lambda x: x * factor) if factor else (lambda x: x)  # noqa: E731

    def attention(q, k, v, rpb):
        return scaled(na2d(q, k, v, kernel, dil, rpb, scale=0.3))

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    with use_backend("flex"), torch.no_grad():
        out = compiled(q, k, v, rpb)
        again = compiled(q + 1, k, v, rpb)
    torch.testing.assert_close(out, scaled(reference.na2d(q, k, v, kernel, dil, rpb, 0.3)), **TOL)
    torch.testing.assert_close(again, scaled(reference.na2d(q + 1, k, v, kernel, dil, rpb, 0.3)), **TOL)


@needs_cpu_flex
def test_torch_compile_of_several_geometries_and_dynamic_sizes():
    """One compiled graph with two map geometries (a model's levels), each plan built while tracing;
    and torch.compile(dynamic=True) at two map sizes: the plan specialises the symbolic sizes (and a
    kernel given as an argument), one plan per size. Both once failed (the plan cache read as a dict
    dynamo had snapshotted; symbolic sizes handed to the plan builder)."""
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(1, 8, 8, 1, 4, generator=gen), torch.randn(1, 9, 11, 2, 4, generator=gen)

    def two_levels(a, b):
        return na2d(a, a, a, 3, 1, None, 0.5), na2d(b, b, b, (3, 5), (2, 1), None, 0.5)

    def one_level(x, kernel):
        return na2d(x, x, x, kernel, (1, 2), None, 0.5)

    torch._dynamo.reset()
    with use_backend("flex"), torch.no_grad():
        outs = torch.compile(two_levels, fullgraph=True)(first, second)
        dynamic = torch.compile(one_level, fullgraph=True, dynamic=True)
        sized = [(x, kernel, dynamic(x, kernel)) for x, kernel in ((second, (3, 3)), (first, (5, 3)))]
    with use_backend("reference"), torch.no_grad():
        for got, want in zip(outs, two_levels(first, second), strict=True):
            torch.testing.assert_close(got, want, **TOL)
        for x, kernel, got in sized:
            torch.testing.assert_close(got, one_level(x, kernel), **TOL)


@needs_cpu_flex
def test_plan_cache_is_bounded(monkeypatch):
    """Every input size builds a plan (index table, block mask): the oldest go past _MAX_PLANS."""
    monkeypatch.setattr(flex, "_plans", flex._Plans())
    monkeypatch.setattr(flex, "_MAX_PLANS", 3)
    for height in range(9, 14):
        flex._plan(height, 9, (3, 3), (1, 1), torch.device("cpu"))
    assert list(vars(flex._plans)) == [f"h{height}_w9_k3x3_d1x1_cpuNone" for height in (11, 12, 13)]


# ------------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@needs_cuda
def test_cuda_golden_cases_fp32():
    cases = torch.load(DATA / "na2d_ops.pt")["cases"]
    for case in cases:
        q, k, v = (case[n].permute(0, 2, 3, 1, 4).cuda().requires_grad_() for n in ("q", "k", "v"))
        rpb = None if case["rpb"] is None else case["rpb"].cuda().requires_grad_()
        with use_backend("flex"):
            out = na2d(q, k, v, case["kernel_size"], case["dilation"], rpb, scale=1.0)
        torch.testing.assert_close(out.cpu(), case["out"].permute(0, 2, 3, 1, 4), **TOL)
        (out * case["grad_out"].permute(0, 2, 3, 1, 4).cuda()).sum().backward()
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            expected = case[f"grad_{name}"].permute(0, 2, 3, 1, 4)
            torch.testing.assert_close(tensor.grad.cpu(), expected, **TOL, msg=f"grad_{name}")
        if rpb is not None:
            torch.testing.assert_close(rpb.grad.cpu(), case["grad_rpb"], **TOL, msg="grad_rpb")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_close_to_fp32(dtype):
    kernel, dil = (7, 7), (2, 3)

    def attend(q, k, v, rpb):
        with use_backend("flex"):
            return na2d(q, k, v, kernel, dil, rpb, scale=32**-0.5)

    assert_half_close_to_float32(attend, *_inputs(kernel, True, grid=(2, 28, 30, 4, 32), device="cuda"), dtype)


def test_deterministic_mode_refuses_the_cuda_rpb_gradient() -> None:
    """flex's CUDA backward adds the rpb gradient up with atomic adds: under
    torch.use_deterministic_algorithms that is an error (a warning with warn_only), as torch's own
    nondeterministic ops are; the CPU path (the reference's gradients) and inference are fine."""
    flex.check_deterministic("cuda", True)  # deterministic mode off
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="rpb gradient is not deterministic"):
            flex.check_deterministic("cuda", True)
        flex.check_deterministic("cuda", False)
        flex.check_deterministic("cpu", True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="rpb gradient is not deterministic"):
            flex.check_deterministic("cuda", True)
    finally:
        torch.use_deterministic_algorithms(False)
