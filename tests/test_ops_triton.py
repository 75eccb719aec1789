"""The Triton backend's fused op against the original's outputs and the reference (running on
CUDA, or in Triton's interpreter: see _triton_utils). The interpreter has no bfloat16 matmul, so
there half precision means float16 only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from _triton_utils import (
    DEVICE,
    GOLDEN,
    GOLDEN_IDS,
    HAS_TRITON,
    INTERPRETED,
    RUNNABLE,
    TOL,
    assert_matches_golden,
    needs_interpreter_run,
    needs_kernels,
    recording_aot_eager,
    run_interpreted,
)
from conftest import assert_half_close_to_float32
from dinat.layers import NeighborhoodAttention2D
from dinat.ops import current_backend, na2d, na2d_qkvpacked, primitives, reference, triton_na, use_backend

HALF_DTYPES = [torch.float16] if DEVICE.type == "cpu" else [torch.float16, torch.bfloat16]


@needs_interpreter_run
def test_in_triton_interpreter() -> None:
    run_interpreted(__file__, deselect="cuda_graph")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
def test_float32_precision_follows_both_tf32_apis() -> None:
    """TF32 for float32 products as either of PyTorch's switches sets it (reading the legacy
    allow_tf32 raises once the newer fp32_precision has been set: every launch failed then). In a
    subprocess: the switches are process-wide."""
    script = """
import torch
from dinat.ops import triton_na
seen = [triton_na._fp32_precision()]
torch.backends.cuda.matmul.allow_tf32 = True
seen.append(triton_na._fp32_precision())
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.fp32_precision = "tf32"
seen.append(triton_na._fp32_precision())
torch.backends.cuda.matmul.fp32_precision = "ieee"
seen.append(triton_na._fp32_precision())
torch.backends.cuda.matmul.fp32_precision = "none"
torch.backends.fp32_precision = "tf32"
seen.append(triton_na._fp32_precision())
print(seen)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(["ieee", "tf32", "tf32", "ieee", "tf32"])


def _fused(q, k, v, kernel, dilation, rpb, scale, backend):
    with use_backend(backend):
        return na2d(q, k, v, kernel, dilation, rpb, scale)


def _fused_packed(qkv, kernel, dilation, rpb, scale, backend, packed: bool = True):
    """The fused op on (B, H, W, 3, heads, D) ``qkv``: na2d_qkvpacked, or na2d on its slices."""
    with use_backend(backend):
        if packed:
            return na2d_qkvpacked(qkv, kernel, dilation, rpb, scale)
        return na2d(*qkv.unbind(3), kernel, dilation, rpb, scale)


@needs_kernels
@pytest.mark.parametrize("case", GOLDEN, ids=GOLDEN_IDS)
def test_golden_cases(case: dict) -> None:
    """na2d (scale=1) equals the original's qk -> softmax -> av, forward and every gradient."""
    assert_matches_golden(case)


# (B, H, W, heads, D), kernel, dilation, rpb: borders on both axes, dilation groups of unequal
# length, rows longer than a tile, head dims that are not powers of two, and float32 over head dim
# 128 (1 row of tile 16 where the first candidate is tile 8, with slots of the rpb gradient for it).
SHAPES = [
    ((2, 9, 11, 2, 16), (3, 3), (1, 1), True),
    ((1, 12, 13, 2, 16), (5, 3), (2, 3), True),
    ((2, 10, 17, 1, 20), (3, 7), (3, 2), False),
    ((1, 7, 40, 1, 24), (7, 5), (1, 2), True),
    ((1, 21, 9, 3, 8), (3, 9), (5, 1), True),
    ((1, 6, 20, 1, 136), (3, 5), (1, 1), True),
]


def _inputs(shape, kernel, with_rpb, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, w, heads, d = shape
    qkv = torch.randn(b, h, w, 3, heads, d, generator=gen, dtype=dtype)
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, generator=gen, dtype=dtype) if with_rpb else None
    return qkv, rpb


@needs_kernels
@pytest.mark.parametrize(
    "shape,kernel,dilation,with_rpb,packed",
    [(*case, i % 2 == 1) for i, case in enumerate(SHAPES)],
    ids=[f"{case[:3]}{'-packed' * (i % 2)}" for i, case in enumerate(SHAPES)],
)
def test_matches_reference(shape, kernel, dilation, with_rpb, packed) -> None:
    """Forward and all gradients against the float64 reference; q, k, v as strided slices of qkv,
    or qkv packed (its gradient written by the kernels in one buffer; stored q-, k-, v-major, so
    that its slices are not evenly spaced within a token), alternately."""
    qkv, rpb = _inputs(shape, kernel, with_rpb)
    qkv64 = qkv.clone().requires_grad_()
    rpb64 = None if rpb is None else rpb.clone().requires_grad_()
    scale = 0.3
    expected = reference.na2d(*qkv64.unbind(3), kernel, dilation, rpb64, scale)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)

    qkv32 = qkv.float().to(DEVICE)
    if packed:  # (3, B, H, W, heads, D) storage
        qkv32 = qkv32.permute(3, 0, 1, 2, 4, 5).contiguous().permute(1, 2, 3, 0, 4, 5)
    qkv32.requires_grad_()
    rpb32 = None if rpb is None else rpb.float().to(DEVICE).requires_grad_()
    if triton_na.unavailable_reason(qkv32):  # wide float32 on a GPU with less shared memory
        pytest.skip(triton_na.unavailable_reason(qkv32))
    out = _fused_packed(qkv32, kernel, dilation, rpb32, scale, "triton", packed)
    # the incoming gradient in another memory layout (heads-first storage), as a permute upstream makes it
    heads_first = grad_out.float().to(DEVICE).permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
    out.backward(heads_first)
    torch.testing.assert_close(out.cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv32.grad.cpu().double(), qkv64.grad, rtol=1e-5, atol=1e-5)
    if rpb is not None:
        torch.testing.assert_close(rpb32.grad.cpu().double(), rpb64.grad, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_compiled_with_dynamic_shapes_then_eager() -> None:
    """torch.compile(dynamic=True) traces the fake implementations with a symbolic head dim; the
    compiled call and the eager ones after it agree (a symbolic boolean once went into a cache and
    broke every later float32 call)."""
    kernel, dilation = (3, 3), (1, 1)
    qkv, rpb = _inputs((1, 7, 9, 1, 16), kernel, True, dtype=torch.float32)

    def attend(qkv, rpb):
        return _fused(*qkv.unbind(3), kernel, dilation, rpb, 0.3, "triton")

    torch._dynamo.reset()
    compiled = _output_and_gradients(torch.compile(attend, fullgraph=True, dynamic=True, backend="aot_eager"), qkv, rpb)
    for got, expected in zip(compiled, _output_and_gradients(attend, qkv, rpb)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _output_and_gradients(fn, *inputs) -> list[torch.Tensor]:
    """fn's output on ``inputs`` (copied to DEVICE as leaves), and the leaves' gradients of the
    sum of its squares."""
    leaves = [t.to(DEVICE).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out.square().sum(), leaves)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
def test_rpb_partial_sums_have_a_slot_for_every_program_launched(monkeypatch) -> None:
    """The partial sums' slots follow the tiles a launch may use for q's dtype and head dim: wide
    float32 runs tile 16 where the first candidate is tile 8, and with one candidate the slots are
    not zeroed, so each must be a program's."""
    monkeypatch.setattr(triton_na, "_tile_configs", lambda: triton_na.TILES[:1])
    for dtype, dim in ((torch.float32, 136), (torch.float32, 32), (torch.bfloat16, 256)):
        q = torch.empty(1, 9, 40, 1, dim, dtype=dtype)
        launched = {c.tile for c in triton_na._configs_for(dtype, dim)}
        tiles, slots = triton_na._tiles_and_slots(q, [1, 1])
        assert tiles == launched and slots == triton_na._grid(q, [1, 1], min(launched))[2], (dtype, dim)


@pytest.fixture
def tile_configs(monkeypatch):
    """Sets the configurations the autotuner chooses from (kernels are rebuilt)."""

    def use(configs):
        monkeypatch.setattr(triton_na, "_tile_configs", lambda: configs)
        triton_na._autotuned_kernel.cache_clear()  # each test's autotuner starts without picks

    yield use


# on CUDA every configuration (warps and stages change the compiled code); the interpreter ignores
# both, so there one per tile size and row count
FIRST_OF_EACH_TILE = tuple({(c.tile, c.rows): c for c in reversed(triton_na.TILES)}.values())
CONFIGS_TO_RUN = triton_na.TILES if DEVICE.type == "cuda" else FIRST_OF_EACH_TILE
# rows spanning several programs of every tile (70 places) and a last program of 1 row (5 rows);
# dilation groups of 15 places, and row groups of 5 and 4 places (at 2 and 4 rows per program,
# some programs past the shorter group's end); several heads on CUDA (in the interpreter, whose time
# grows with the heads, test_matches_reference has them)
TILED_SHAPES = [((1, 5, 70, 1, 16), (3, 7), (1, 1)), ((1, 9, 45, 2 if DEVICE.type == "cuda" else 1, 8), (3, 5), (2, 3))]


# tile 32, and tile 16 with 4 rows, are no candidates (slower on an H100 and an H200), but the kernels
# take any tile and row count, and the rpb gradient's slots any tile: alone, and mixed with the first
# candidate (some slots then stay unwritten and must be zeros)
TILE_32 = triton_na.TileConfig(32, 4, 3)
ROWS_4 = triton_na.TileConfig(16, 4, 2, rows=4)
TILE_SETS = [(tile,) for tile in CONFIGS_TO_RUN] + [
    CONFIGS_TO_RUN,  # the autotuner's choice among them
    (TILE_32,),
    (TILE_32, triton_na.TILES[0]),
    (ROWS_4,),
]
# every set on both shapes, but in the interpreter (the slowest tests of the suite there) the sets
# of several configurations, which each shape's first launch runs once per configuration, on the
# first shape only
TILE_CASES = [
    pytest.param(configs, *case, id=f"{configs}-{name}")
    for configs in TILE_SETS
    for name, case in zip(("w70", "w45-d2x3"), TILED_SHAPES)
    if len(configs) == 1 or DEVICE.type == "cuda" or name == "w70"
]


@needs_kernels
@pytest.mark.parametrize("configs,shape,kernel,dilation", TILE_CASES)
def test_every_tile_matches_reference(tile_configs, configs, shape, kernel, dilation) -> None:
    """Each configuration alone, and the autotuner's pick among all: forward and every gradient
    (the rpb gradient's partial sums depend on the tile) against the float64 reference."""
    tile_configs(configs)
    qkv, rpb = _inputs(shape, kernel, True)
    leaves64 = [qkv.clone().requires_grad_(), rpb.clone().requires_grad_()]
    expected = reference.na2d(*leaves64[0].unbind(3), kernel, dilation, leaves64[1], 0.3)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves64, grad_out)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (qkv, rpb)]
    for _ in range(2):  # the autotuner times its configurations at the first launch of a shape only
        out = _fused(*leaves[0].unbind(3), kernel, dilation, leaves[1], 0.3, "triton")
        got = torch.autograd.grad(out, leaves, grad_out.float().to(DEVICE))
        torch.testing.assert_close(out.cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5)
        for name, g, e in zip(("qkv", "rpb"), got, expected_grads):
            torch.testing.assert_close(g.cpu().double(), e, rtol=1e-5, atol=1e-4, msg=name)
    if len(configs) > 1:  # the autotuner's picks for this shape are reported (what dinat bench prints)
        picks = {p["kernel"]: p for p in triton_na.autotuned() if (p["height"], p["width"]) == shape[1:3]}
        assert sorted(picks) == ["forward", "key", "query"]
        fields = ("tile", "num_warps", "num_stages", "rows", "max_registers")
        picked = [triton_na.TileConfig(*(p[f] for f in fields)) for p in picks.values()]
        assert all(c in configs for c in picked)
        assert all(p["dtype"] == p["rpb_dtype"] == "torch.float32" for p in picks.values())


@needs_kernels
def test_the_autotuners_pick_is_then_launched_directly(tile_configs, monkeypatch) -> None:
    """Once Triton's autotuner picked a configuration for a shape, later launches of that shape run it
    without the autotuner (triton_na._launch_fused), bit for bit as the first; another shape, or
    another dtype, goes through the autotuner again."""
    from triton.runtime.autotuner import Autotuner

    tile_configs(CONFIGS_TO_RUN[:2])  # a choice to make
    tuned = []
    tuner_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **kw: tuned.append(self) or tuner_run(self, *a, **kw))

    def step(shape, dtype=torch.float32):
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in _inputs(shape, (3, 5), True)]
        out = _fused(*leaves[0].unbind(3), (3, 5), (2, 1), leaves[1], 0.3, "triton")
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out))]

    first = step((1, 9, 12, 1, 16))
    assert len(tuned) == 3  # the forward, and the backward's query and key kernels
    again = step((1, 9, 12, 1, 16))
    assert len(tuned) == 3
    for got, expected in zip(again, first):
        assert torch.equal(got, expected)
    step((1, 9, 13, 1, 16))
    step((1, 9, 13, 1, 16), torch.float16)
    assert len(tuned) == 9


@needs_kernels
@pytest.mark.parametrize(
    "shape,kernel,dilation", [((1, 9, 9, 2, 16), (9, 9), (1, 1)), ((1, 14, 14, 1, 72), (7, 7), (2, 2))]
)
def test_kernel_on_maps_of_whole_windows(shape, kernel, dilation) -> None:
    """The op itself on maps whose groups are single windows (na2d runs those as grouped attention)
    that the whole-window kernels leave to the neighborhood kernels: groups of 81 tokens, float32
    at head dim 72 (test_ops_triton_whole.py tests the others)."""
    assert not triton_na._whole_kernels_apply(torch.empty(shape), kernel, dilation)
    qkv, rpb = _inputs(shape, kernel, True, dtype=torch.float32)
    leaves = [qkv.to(DEVICE).requires_grad_(), rpb.to(DEVICE).requires_grad_()]
    out, _ = triton_na.na2d_triton(*leaves[0].unbind(3), leaves[1], list(kernel), list(dilation), 0.3)
    ref_leaves = [qkv.clone().requires_grad_(), rpb.clone().requires_grad_()]
    expected = reference.na2d(*ref_leaves[0].unbind(3), kernel, dilation, ref_leaves[1], 0.3)
    torch.testing.assert_close(out.cpu(), expected, **TOL)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, leaves, grad.to(DEVICE))
    for name, g, e in zip(("qkv", "rpb"), got, torch.autograd.grad(expected, ref_leaves, grad)):
        torch.testing.assert_close(g.cpu(), e, **TOL, msg=name)


@needs_kernels
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_close_to_float32(dtype) -> None:
    """float16/bfloat16 q, k, v with a float32 rpb (as under autocast): within 1e-2 of float32."""
    shape, kernel, dilation = (1, 16, 15, 1, 32), (7, 7), (2, 2)
    qkv, rpb = _inputs(shape, kernel, True, dtype=torch.float32)

    def attend(q, k, v, rpb):
        return _fused(q, k, v, kernel, dilation, rpb, None, "triton")

    assert_half_close_to_float32(attend, *qkv.to(DEVICE).unbind(3), rpb.to(DEVICE), dtype)


@needs_kernels
def test_module_matches_reference_backend() -> None:
    """NeighborhoodAttention2D (padding included: 6x9 input, kernel 7) on triton == on reference."""
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(dim=32, num_heads=2, kernel_size=7, dilation=1).to(DEVICE)
    x = torch.randn(2, 6, 9, 32, device=DEVICE)
    with use_backend("reference"):
        expected = module(x)
    with use_backend("triton"):
        assert current_backend(x) == "triton"
        out = module(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_gradient_of_some_inputs_only() -> None:
    """Frozen rpb and k: the other gradients are still exact and none is produced for them."""
    shape, kernel, dilation = (1, 9, 11, 2, 16), (3, 5), (2, 1)
    qkv, rpb = _inputs(shape, kernel, True, dtype=torch.float32)
    q, k, v = (t.to(DEVICE) for t in qkv.unbind(3))
    q.requires_grad_(), v.requires_grad_()
    rpb = rpb.to(DEVICE)
    _fused(q, k, v, kernel, dilation, rpb, None, "triton").sum().backward()
    q_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, v))
    _fused(q_ref, k, v_ref, kernel, dilation, rpb, None, "reference").sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad, **TOL)
    torch.testing.assert_close(v.grad, v_ref.grad, **TOL)
    assert k.grad is None and rpb.grad is None


@needs_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["slices", "packed"])
def test_double_backward(packed) -> None:
    """create_graph=True differentiates the backward again (through the unfused primitives)."""
    kernel, dilation = (5, 3), (2, 3)
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 12, 13, 3, 1, 8, generator=gen, dtype=torch.float64),
              torch.randn(1, 9, 5, generator=gen, dtype=torch.float64))  # fmt: skip

    def second_derivatives(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        leaves = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
        out = _fused_packed(leaves[0], kernel, dilation, leaves[1], 0.3, backend, packed)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)

    got = second_derivatives("triton", torch.float32)
    expected = second_derivatives("reference", torch.float64)
    for name, g, e in zip(("qkv", "rpb"), got, expected):
        torch.testing.assert_close(g.cpu().double(), e.cpu(), rtol=1e-4, atol=1e-4 * e.abs().max().item(), msg=name)


@needs_kernels
def test_compiles_without_graph_breaks() -> None:
    """The op is an opaque custom op to torch.compile: fullgraph forward and backward, through
    inductor, which checks each output's strides against the op's fake implementation (the packed
    op, as the models call it)."""
    shape, kernel, dilation = (1, 8, 8, 1, 16), (3, 3), (2, 2)
    qkv, rpb = _inputs(shape, kernel, True, dtype=torch.float32)
    x = qkv.to(DEVICE).requires_grad_()
    bias = rpb.to(DEVICE).requires_grad_()

    def attend(x, bias):
        return _fused_packed(x, kernel, dilation, bias, None, "triton")

    expected = attend(x, bias)
    compiled = torch.compile(attend, fullgraph=True)
    out = compiled(x, bias)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (x, bias))
    expected_grads = torch.autograd.grad(expected.sum(), (x, bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize(
    "dtype,with_rpb,packed", [(torch.float16, True, True), (torch.float32, False, False)], ids=["f16-rpb-packed", "f32"]
)
def test_custom_ops_pass_opcheck(dtype, with_rpb, packed) -> None:
    """torch.library.opcheck on the forward and backward ops: schema, autograd registration, and
    fake implementations that match the real outputs' shapes, dtypes and strides (what torch.compile
    relies on); q, k, v as strided slices of qkv or qkv packed, a float32 rpb with half-precision q."""
    shape, kernel, dilation = (1, 9, 10, 2, 8), [3, 5], [2, 1]
    qkv, rpb = _inputs(tuple(shape), kernel, with_rpb, dtype=torch.float32)
    qkv = qkv.to(DEVICE, dtype).requires_grad_()
    features = [qkv] if packed else list(qkv.unbind(3))
    bias = None if rpb is None else rpb.to(DEVICE).requires_grad_()
    forward, backward = (
        (triton_na.na2d_packed_triton, triton_na.na2d_packed_triton_backward)
        if packed
        else (triton_na.na2d_triton, triton_na.na2d_triton_backward)
    )
    args = (kernel, dilation, 0.3)
    torch.library.opcheck(forward, (*features, bias, *args))
    out, lse = forward(*features, bias, *args)
    detached = [t.detach() for t in (*features, out, lse)]
    grad_out, detached_bias = torch.randn_like(out), None if bias is None else bias.detach()
    torch.library.opcheck(backward, (grad_out, *detached[:-2], detached_bias, *detached[-2:], *args))


@needs_kernels
@pytest.mark.parametrize("packed", [False, True], ids=["slices", "packed"])
def test_compiled_path_is_the_custom_op_and_agrees_with_eager(packed) -> None:
    """Eagerly the op is an autograd.Function calling the kernels' functions; under torch.compile
    the custom op (opaque, with its registered autograd): the same output and gradients. The
    compiled backward builds the rpb gradient's one-hot in its graph: it takes no tensor from the
    eager path's cache (CUDA graph trees refuse or overwrite tensors kept alive between calls).
    Packed, the backward graph has no stack of q's, k's and v's gradients (the kernels write them
    into one buffer); on the slices of qkv it has one."""
    shape, kernel, dilation = (1, 9, 11, 2, 16), (3, 5), (2, 1)
    qkv, rpb = _inputs(shape, kernel, True, dtype=torch.float32)

    def attend(qkv, rpb):
        return _fused_packed(qkv, kernel, dilation, rpb, 0.3, "triton", packed)

    traced = []

    torch._dynamo.reset()
    triton_na._cached_bias_rows.cache_clear()
    results, cache_calls = [], []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend=recording_aot_eager(traced))):
        results.append(_output_and_gradients(fn, qkv, rpb))
        cache_calls.append(triton_na._cached_bias_rows.cache_info()[:2])  # (hits, misses)
    assert type(results[0][0].grad_fn).__name__ == "_EagerNA2dBackward"
    name = "na2d_packed_triton" if packed else "na2d_triton"
    assert f"dinat.{name}_v{primitives.OPS_VERSION}.default" in traced
    assert f"dinat.{name}_backward_v{primitives.OPS_VERSION}.default" in traced
    assert ("aten.stack.default" in traced) != packed, traced
    assert cache_calls == [(0, 1), (0, 1)], cache_calls
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["slices", "packed"])
def test_cuda_graph_trees_match_eager(packed) -> None:
    """torch.compile(mode="reduce-overhead") of a training step's attention: its warm-up call (run
    in the CUDA graphs' memory pool), its recording and its replays give eager's output and
    gradients. Compiled first, on an empty cache: nothing the op keeps may come from that pool."""
    shape, kernel, dilation = (2, 20, 24, 2, 32), (7, 7), (2, 1)

    def attend(qkv, rpb):
        return _fused_packed(qkv, kernel, dilation, rpb, None, "triton", packed)

    torch._dynamo.reset()
    triton_na._cached_bias_rows.cache_clear()
    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, recording, replays
        qkv, rpb = (t.to(DEVICE).requires_grad_() for t in _inputs(shape, kernel, True, torch.float32, seed))
        results = []
        for fn in (compiled, attend):
            out = fn(qkv, rpb)
            grads = torch.autograd.grad(out.square().sum(), (qkv, rpb))
            results.append([t.clone() for t in (out, *grads)])  # a replay overwrites the graph's outputs
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unavailable_is_a_clear_error() -> None:
    """Forcing triton where it cannot run names the reason; auto picks it for CUDA tensors only."""
    x = torch.randn(1, 7, 7, 1, 16, device=DEVICE)
    assert current_backend(x.cpu()) != "triton"
    if DEVICE.type == "cuda":
        assert current_backend(x) == "triton"
    bad, reason = (x.double(), "float64") if RUNNABLE else (x, "triton backend is unavailable")
    with use_backend("triton"), pytest.raises(RuntimeError, match=reason):
        na2d(bad, bad, bad, 3)


def test_autotune_setting_is_checked(monkeypatch) -> None:
    """DINAT_TRITON_AUTOTUNE=0 and deterministic algorithms mean the first configuration alone; a
    value other than 0/1 is an error."""
    monkeypatch.setenv("DINAT_TRITON_AUTOTUNE", "0")
    assert triton_na._tile_configs() == triton_na.TILES[:1]
    monkeypatch.setenv("DINAT_TRITON_AUTOTUNE", "1")
    assert triton_na._tile_configs() == (triton_na.TILES[:1] if INTERPRETED else triton_na.TILES)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert triton_na._tile_configs() == triton_na.TILES[:1]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    monkeypatch.setenv("DINAT_TRITON_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="DINAT_TRITON_AUTOTUNE must be 0 or 1, got 'off'"):
        triton_na._tile_configs()


@needs_kernels
def test_whole_model_matches_reference_backend() -> None:
    """dinat_nano (kernel 5, dilations 1 and 2, padded small maps) on triton: logits and every
    parameter's gradient equal the reference backend's."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("dinat_nano").to(DEVICE)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        with use_backend(backend):
            logits = model(images)
        logits.square().sum().backward()
        results[backend] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def _random_case(seed: int) -> tuple:
    """A random valid (shape, kernel, dilation) and a tile configuration (in turn): map sides from
    kernel * dilation up, odd kernels 3-9 per axis (the golden cases go to 13), head dims 8-40; 1 or
    2 heads on CUDA, 1 in the interpreter (test_matches_reference has several there)."""
    gen = torch.Generator().manual_seed(seed)

    def pick(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    kernel = (2 * pick(1, 4) + 1, 2 * pick(1, 4) + 1)
    dilation = (pick(1, 3), pick(1, 3))
    sides = [k * d + pick(0, 8) for k, d in zip(kernel, dilation)]
    heads = pick(1, 2) if DEVICE.type == "cuda" else 1
    shape = (1, *sides, heads, 8 * pick(1, 5))
    return shape, kernel, dilation, triton_na.TILES[seed % len(triton_na.TILES)]


@needs_kernels
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_reference(tile_configs, seed) -> None:
    """Random shapes, kernels, dilations and tile configurations: forward and every gradient against
    the float64 reference."""
    shape, kernel, dilation, tile = _random_case(seed)
    tile_configs((tile,))
    qkv, rpb = _inputs(shape, kernel, True, seed=seed)
    leaves64 = [qkv.clone().requires_grad_(), rpb.clone().requires_grad_()]
    expected = reference.na2d(*leaves64[0].unbind(3), kernel, dilation, leaves64[1], 0.5)
    grad_out = torch.randn_like(expected)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (qkv, rpb)]
    out = _fused(*leaves[0].unbind(3), kernel, dilation, leaves[1], 0.5, "triton")
    got = torch.autograd.grad(out, leaves, grad_out.float().to(DEVICE))
    case = f"{shape}, kernel {kernel}, dilation {dilation}, tile {tile}"
    torch.testing.assert_close(out.cpu().double(), expected.detach(), rtol=1e-5, atol=1e-5, msg=case)
    for name, g, e in zip(("qkv", "rpb"), got, torch.autograd.grad(expected, leaves64, grad_out)):
        torch.testing.assert_close(g.cpu().double(), e, rtol=1e-5, atol=1e-4, msg=f"grad {name}: {case}")


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton installed")
def test_triton_without_gather_is_reported(monkeypatch) -> None:
    """A Triton too old for the kernels (no tl.gather, before 3.2) makes the backend unavailable with
    the reason, so 'auto' falls back to flex instead of failing to compile."""
    import triton.language

    monkeypatch.delattr(triton.language, "gather")
    reason, _ = triton_na._probe_triton()
    assert "has no tl.gather (needs Triton >= 3.2)" in reason
