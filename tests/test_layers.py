"""The attention modules and their ops against the release's facts (SPEC sections 1-2): the default
scale, strided inputs, qk_scale, padding per axis, the dropout paths, and init."""

from __future__ import annotations

import pytest
import timm
import torch

from conftest import cpu_backends
from dinat.layers import NeighborhoodAttention2D
from dinat.models.isotropic import RelPosSelfAttention
from dinat.ops import cpu, na2d, na2d_av, na2d_qk, use_backend

RPB_STD, RPB_BOUND = 0.02, 2.0  # SPEC 1: rpb ~ trunc_normal(std=0.02, a=-2, b=2); SPEC 2: Linear std .02
TINY_VITRPB = dict(depth=2, embed_dim=48, num_heads=4)  # vitrpb_small's layout, cheap to run at 224 px


def _neighborhood_attention(q, k, v, kernel, dilation, rpb, scale):
    """softmax(scale * q.k + rpb) v over each query's neighborhood, by the reference unfused ops."""
    q, k, v = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))
    with use_backend("reference"):
        attn = na2d_qk(q * scale, k, kernel, dilation, rpb).softmax(-1)
        return na2d_av(attn, v, kernel, dilation).permute(0, 2, 3, 1, 4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_default_scale_is_head_dim(backend: str) -> None:
    """SPEC 1: the fused na2d's scale defaults to head_dim ** -0.5 (D, not the number of heads)."""
    gen = torch.Generator().manual_seed(0)
    heads, dim = 2, 16  # test_ops_flex.py's token grid and a kernel of its: CPU flex compiles once per shape
    q, k, v = (torch.randn(2, 16, 17, heads, dim, generator=gen) for _ in range(3))
    rpb = torch.randn(heads, 9, 9, generator=gen)
    with use_backend(backend):
        default = na2d(q, k, v, 5, (2, 3), rpb)
        explicit = na2d(q, k, v, 5, (2, 3), rpb, dim**-0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    torch.testing.assert_close(default, _neighborhood_attention(q, k, v, (5, 5), (2, 3), rpb, dim**-0.5))


def _strided(t: torch.Tensor, layout: str, rows: int, cols: int) -> torch.Tensor:
    """t's values in a non-contiguous view: its (rows, cols) map sliced out of a wider or a taller
    map, or transposed in memory."""
    if layout == "transposed":
        return t.transpose(rows, cols).contiguous().transpose(rows, cols)
    axis = cols if layout == "wider" else rows
    big = torch.zeros(*t.shape[:axis], t.shape[axis] + 3, *t.shape[axis + 1 :])
    big.narrow(axis, 0, t.shape[axis]).copy_(t)
    return big.narrow(axis, 0, t.shape[axis])


def _output_and_grads(op, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """op's output and the gradients of its inputs for the output gradient ``grad_out``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = op(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


# CPU flex is left out: it would compile a kernel per layout (seconds each), and it has its own tests
@pytest.mark.skipif(not cpu.available(), reason=f"cpu backend: {cpu.unavailable_reason()}")
@pytest.mark.parametrize("layout", ["wider", "taller", "transposed"])
def test_cpu_ops_on_strided_views_match_reference(layout: str) -> None:
    """SPEC 1: na2d, na2d_qk and na2d_av are functions of the values alone: on views sliced out of a
    wider or a taller map, or transposed in memory, and with a gradient of the output strided alike,
    the outputs and gradients equal the reference's on contiguous copies (a 7x9 map with kernel 3,
    dilation (2, 1): the general kernels, not whole windows)."""
    gen = torch.Generator().manual_seed(1)
    kernel, dilation, heads, dim = (3, 3), (2, 1), 2, 8
    rpb = torch.randn(heads, 5, 5, generator=gen)
    tokens_first = [torch.randn(2, 7, 9, heads, dim, generator=gen) for _ in range(3)]
    heads_first = [torch.randn(2, heads, 7, 9, dim, generator=gen) for _ in range(2)]
    attn = torch.randn(2, heads, 7, 9, 9, generator=gen).softmax(-1)
    cases = [
        (lambda q, k, v: na2d(q, k, v, kernel, dilation, rpb, 0.5), tokens_first, (1, 2)),
        (lambda q, k: na2d_qk(q, k, kernel, dilation, rpb), heads_first, (2, 3)),
        (lambda a, v: na2d_av(a, v, kernel, dilation), [attn, heads_first[1]], (2, 3)),
    ]
    for op, inputs, axes in cases:
        with use_backend("reference"):
            out = op(*inputs)
        grad_out = torch.randn(out.shape, generator=gen)
        with use_backend("reference"):
            want, want_grads = _output_and_grads(op, inputs, grad_out)
        views = [_strided(t, layout, *axes) for t in inputs]
        with use_backend("cpu"):
            got, got_grads = _output_and_grads(op, views, _strided(grad_out, layout, *axes))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _module_by_hand(layer: NeighborhoodAttention2D, x: torch.Tensor, scale: float, pad: tuple[int, int] = (0, 0)):
    """SPEC 1's module by hand: zero-pad (bottom, right), qkv, fused na2d at ``scale``, crop, proj."""
    batch, height, width, dim = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad[1], 0, pad[0]))
    shape = (batch, height + pad[0], width + pad[1], 3, layer.num_heads, layer.head_dim)
    q, k, v = layer.qkv(padded).view(shape).unbind(3)
    with use_backend("reference"):
        out = na2d(q, k, v, layer.kernel_size, layer.dilation, layer.rpb, scale)
    return layer.proj(out.reshape(*shape[:3], dim)[:, :height, :width])


def test_dropout_path_scales_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 1: in training with attention dropout the unfused path still multiplies q by
    head_dim ** -0.5: with the dropout made the identity it gives the eval-mode fused output."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, dilation=(1, 2), attn_drop=0.5)
    calls = []
    monkeypatch.setattr(layer.attn_drop, "forward", lambda attn: calls.append(attn.shape) or attn)
    x = torch.randn(2, 7, 9, 8)
    fused = layer.eval()(x)
    assert not calls
    unfused = layer.train()(x)
    assert calls == [(2, 2, 7, 9, 9)]  # the unfused path ran, its dropout on the (B, heads, H, W, kh*kw) weights
    torch.testing.assert_close(unfused, fused)
    torch.testing.assert_close(fused, _module_by_hand(layer, x, 0.5))  # head_dim 4


def test_qk_scale_replaces_the_default() -> None:
    """SPEC 1: q is multiplied by qk_scale when given (instead of head_dim ** -0.5), in both attention
    modules and in every block of a model built with ``qk_scale``."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, qk_scale=0.3).eval()
    assert layer.scale == 0.3 and NeighborhoodAttention2D(8, 2, 3).scale == 0.5
    x = torch.randn(2, 7, 9, 8)
    torch.testing.assert_close(layer(x), _module_by_hand(layer, x, 0.3))

    rel = RelPosSelfAttention(dim=8, num_heads=2, qk_scale=0.3, grid_size=3).eval()
    assert rel.scale == 0.3
    x = torch.randn(2, 3, 3, 8)
    q, k, v = rel.qkv(x.reshape(2, 9, 8)).view(2, 9, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = rel.rpb.flatten(1)[:, rel.relative_position_index]
    attn = (0.3 * q @ k.transpose(-1, -2) + bias).softmax(-1)
    torch.testing.assert_close(rel(x), rel.proj((attn @ v).transpose(1, 2).reshape(2, 3, 3, 8)))

    nano = timm.create_model("dinat_nano", qk_scale=0.3)
    vitrpb = timm.create_model("vitrpb_small", qk_scale=0.3, **TINY_VITRPB)
    scales = [b.attn.scale for level in nano.levels for b in level.blocks] + [b.attn.scale for b in vitrpb.layers]
    assert scales == [0.3] * len(scales) and len(scales) == 10


@pytest.mark.parametrize(
    ("kernel", "dilation", "size", "pad"),
    [((3, 5), (1, 2), (4, 6), (0, 4)), ((5, 3), (2, 1), (6, 4), (4, 0)), ((3, 5), (2, 2), (4, 6), (2, 4))],
)
def test_module_pads_each_axis_by_its_own_kernel(kernel, dilation, size, pad) -> None:
    """SPEC 1: the module zero-pads the bottom up to kh*dh and the right up to kw*dw (each axis by its
    own kernel and dilation) before qkv, and crops back before proj."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=kernel, dilation=dilation).eval()
    x = torch.randn(2, *size, 8)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _module_by_hand(layer, x, layer.scale, pad))


def _assert_trunc_normal_002(t: torch.Tensor) -> None:
    assert RPB_STD * 0.75 <= t.std().item() <= RPB_STD * 1.25, t.std().item()
    assert t.abs().max().item() <= RPB_BOUND and abs(t.mean().item()) <= 0.005


def test_init() -> None:
    """SPEC 1-2: rpb tables (NA's and ViT-rpb's) are trunc_normal(std .02, a=-2, b=2); a model's
    Linear weights trunc_normal(std .02) with zero biases, LayerNorms weight 1 and bias 0."""
    torch.manual_seed(0)
    _assert_trunc_normal_002(NeighborhoodAttention2D(dim=64, num_heads=64, kernel_size=7).rpb.detach())
    _assert_trunc_normal_002(RelPosSelfAttention(dim=48, num_heads=12).rpb.detach())
    model = timm.create_model("dinat_nano")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(linears) > 20 and len(norms) > 20
    for m in linears:
        _assert_trunc_normal_002(m.weight.detach())
        assert not m.bias.any()
    for m in norms:
        assert (m.weight == 1).all() and not m.bias.any()


def test_vitrpb_attention_dropout_only_in_training() -> None:
    """SPEC 1-2: ViT-rpb's attention dropout acts in training only: in eval a model with
    attn_drop_rate 0.5 is deterministic and equals the same weights with rate 0."""
    torch.manual_seed(0)
    kwargs = dict(TINY_VITRPB, num_classes=4, drop_path_rate=0.0)
    model = timm.create_model("vitrpb_small", attn_drop_rate=0.5, **kwargs).eval()
    plain = timm.create_model("vitrpb_small", attn_drop_rate=0.0, **kwargs).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        first, second, expected = model(x), model(x), plain(x)
        torch.testing.assert_close(first, expected, rtol=0, atol=0)
        torch.testing.assert_close(second, expected, rtol=0, atol=0)
        assert not torch.allclose(model.train()(x), expected)
