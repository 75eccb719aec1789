"""Bad arguments get a ValueError naming the argument and the value."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_empty_batch_works, cpu_backends
from dinat.layers import NeighborhoodAttention2D
from dinat.models.isotropic import RelPosSelfAttention
from dinat.ops import na2d, na2d_av, na2d_qk, na2d_qkvpacked, use_backend


def _qkv(shape=(1, 2, 8, 9, 4), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kernel_size=4), "kernel_size must be odd and >= 3 on each axis, got 4"),
        (dict(kernel_size=1), "kernel_size must be odd and >= 3 on each axis, got 1"),
        (dict(kernel_size=(3, 6)), r"kernel_size must be odd and >= 3 on each axis, got \(3, 6\)"),
        (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or an \(h, w\) pair of ints, got \(3, 3, 3\)"),
        (dict(kernel_size=3.0), "kernel_size must be an int or an"),
        (dict(kernel_size=True), "kernel_size must be an int or an"),
        (dict(kernel_size=3, dilation=0), "dilation must be >= 1 on each axis, got 0"),
        (dict(kernel_size=3, dilation=(1, -2)), r"dilation must be >= 1 on each axis, got \(1, -2\)"),
        (dict(kernel_size=5, dilation=2), "input height 8 is smaller than kernel_size \\* dilation = 5 \\* 2 = 10"),
        (dict(kernel_size=(3, 5), dilation=(1, 2)), "input width 9 is smaller than kernel_size \\* dilation = 5 \\* 2"),
    ],
)
def test_geometry_errors(kwargs, message) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=message):
        na2d_qk(q, k, **kwargs)
    with pytest.raises(ValueError, match=message):
        na2d(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), **kwargs)
    with pytest.raises(ValueError, match=message):
        na2d_qkvpacked(torch.stack([t.permute(0, 2, 3, 1, 4) for t in (q, k, v)], 3), **kwargs)


def test_tensor_errors() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must have rank 5, got shape \(8, 9, 4\)"):
        na2d_qk(q[0, 0], k, 3)
    with pytest.raises(ValueError, match=r"k must have shape \(1, 2, 8, 9, 4\) to match q, got \(1, 2, 8, 9, 5\)"):
        na2d_qk(q, torch.randn(1, 2, 8, 9, 5), 3)
    with pytest.raises(ValueError, match="k has dtype torch.float64 but q has dtype torch.float32"):
        na2d_qk(q, k.double(), 3)
    with pytest.raises(ValueError, match="q must be a floating-point tensor, got dtype torch.int64"):
        na2d_qk(q.long(), k.long(), 3)
    with pytest.raises(ValueError, match=r"rpb must have shape \(2, 5, 5\) to match q, got \(2, 7, 7\)"):
        na2d_qk(q, k, 3, rpb=torch.randn(2, 7, 7))
    with pytest.raises(ValueError, match="rpb has dtype torch.float64 but q has dtype torch.float32"):
        na2d_qk(q, k, 3, rpb=torch.randn(2, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"attn must have shape \(1, 2, 8, 9, 9\) to match v, got \(1, 2, 8, 9, 25\)"):
        na2d_av(torch.randn(1, 2, 8, 9, 25), v, 3)
    tokens = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"v must have shape \(1, 8, 9, 2, 4\) to match q"):
        na2d(*tokens[:2], tokens[2][..., :3], 3)
    with pytest.raises(ValueError, match="scale must be a float or None, got 'x'"):
        na2d(*tokens, 3, scale="x")
    with pytest.raises(ValueError, match=r"qkv must have rank 6, got shape \(1, 8, 9, 2, 4\)"):
        na2d_qkvpacked(tokens[0], 3)
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, H, W, 3, heads, D\), got \(1, 8, 9, 2, 2, 4\)"):
        na2d_qkvpacked(torch.stack(tokens[:2], 3), 3)
    with pytest.raises(ValueError, match="qkv must be a floating-point tensor, got dtype torch.int64"):
        na2d_qkvpacked(torch.stack(tokens, 3).long(), 3)
    with pytest.raises(ValueError, match=r"rpb must have shape \(2, 5, 5\) to match q, got \(2, 7, 7\)"):
        na2d_qkvpacked(torch.stack(tokens, 3), 3, rpb=torch.randn(2, 7, 7))
    with pytest.raises(ValueError, match="scale must be a float or None, got True"):
        na2d(*tokens, 3, scale=True)
    numpy = pytest.importorskip("numpy")
    torch.testing.assert_close(na2d(*tokens, 3, scale=numpy.float32(0.5)), na2d(*tokens, 3, scale=0.5))
    empty = torch.zeros(1, 8, 9, 2, 0)
    with pytest.raises(ValueError, match=r"q has head dim 0 \(shape \(1, 8, 9, 2, 0\)\): there is no default scale"):
        na2d(empty, empty, empty, 3)
    assert na2d(empty, empty, empty, 3, scale=1.0).shape == (1, 8, 9, 2, 0)


def test_backend_errors() -> None:
    with pytest.raises(ValueError, match="backend must be one of .* got 'gpu'"):
        with use_backend("gpu"):
            pass


def test_module_pads_instead_of_failing() -> None:
    """Maps smaller than kernel * dilation are zero-padded before qkv and cropped after (NATTEN 0.14)."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=5, dilation=2).eval()
    x = torch.randn(2, 6, 13, 8)
    out = layer(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 4))
    qkv = layer.qkv(padded).view(2, 10, 13, 3, 2, 4).unbind(3)
    with use_backend("reference"):
        expected = na2d(*qkv, 5, 2, layer.rpb, layer.scale).reshape(2, 10, 13, 8)[:, :6]
    torch.testing.assert_close(out, layer.proj(expected))
    assert list(layer.state_dict()) == ["rpb", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]  # original order
    with pytest.raises(ValueError, match=r"expected input \(B, H, W, 8\), got shape \(2, 6, 13, 7\)"):
        layer(torch.randn(2, 6, 13, 7))
    with pytest.raises(ValueError, match="dim 8 must be a multiple of num_heads 3"):
        NeighborhoodAttention2D(dim=8, num_heads=3, kernel_size=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=0, num_heads=1), "dim must be a positive int, got 0"),
        (dict(dim=-4, num_heads=2), "dim must be a positive int, got -4"),
        (dict(dim=8.0, num_heads=2), "dim must be a positive int, got 8.0"),
        (dict(dim=8, num_heads=2.0), "num_heads must be a positive int, got 2.0"),
        (dict(dim=8, num_heads=True), "num_heads must be a positive int, got True"),
        (dict(dim=8, num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(dim=8, num_heads=2, qk_scale=0.0), r"qk_scale must be positive \(None: head_dim \*\* -0.5\), got 0.0"),
        (dict(dim=8, num_heads=2, qk_scale=-1), "qk_scale must be positive .*, got -1"),
    ],
)
def test_attention_modules_name_a_bad_size_or_scale(kwargs: dict, message: str) -> None:
    """Both attention modules (neighborhood, and ViT-rpb's full attention) refuse a bad dim,
    num_heads or qk_scale by name, instead of failing in nn.Linear, or taking qk_scale=0 for None."""
    with pytest.raises(ValueError, match=message):
        NeighborhoodAttention2D(kernel_size=3, **kwargs)
    with pytest.raises(ValueError, match=message):
        RelPosSelfAttention(grid_size=3, **kwargs)


def test_module_attention_dropout_path_matches_fused() -> None:
    """With dropout p>0 but in eval mode, and with p=0 in training, both paths agree."""
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=3, attn_drop=0.5)
    x = torch.randn(1, 7, 9, 8)
    layer.eval()
    fused = layer(x)
    layer.train()
    layer.attn_drop.p = 0.0
    torch.testing.assert_close(layer(x), fused)
    layer.attn_drop.p = 0.5
    assert not torch.allclose(layer(x), fused)


def test_integral_arguments_of_any_int_type() -> None:
    q, k, _ = _qkv()
    expected = na2d_qk(q, k, 3, 2)
    torch.testing.assert_close(na2d_qk(q, k, torch.tensor(3).item(), [2, 2]), expected)
    numpy = pytest.importorskip("numpy")
    torch.testing.assert_close(na2d_qk(q, k, numpy.int64(3), (numpy.int32(2), 2)), expected)


def test_falls_back_to_reference_without_kernels(monkeypatch) -> None:
    """Where the C kernels could not be built, CPU tensors run on the reference and stay exact."""
    from dinat.ops import cpu, current_backend

    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in _qkv())
    expected = na2d(q, k, v, 3, 2)
    monkeypatch.setattr(cpu, "_loaded", lambda: False)
    assert current_backend(q) == "reference"
    torch.testing.assert_close(na2d(q, k, v, 3, 2), expected)
    with pytest.raises(RuntimeError, match="the cpu backend is unavailable"):
        with use_backend("cpu"):
            na2d(q, k, v, 3, 2)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend: str) -> None:
    assert_empty_batch_works(backend)
