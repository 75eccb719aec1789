"""features_only: the four NCHW stage maps of the hierarchical models, as detection and
segmentation backbones use them."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import dinat  # noqa: F401  (registers the models in timm)


def expected_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Stage map sizes: stride 4 (rounded up), then halving with rounding up."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    sizes = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


@pytest.mark.parametrize("size", [(224, 224), (200, 320)])
@pytest.mark.parametrize(("name", "channels"), [("nat_mini", 64), ("dinat_mini", 64), ("dinat_s_tiny", 96)])
def test_four_maps(name: str, channels: int, size: tuple[int, int]) -> None:
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == [channels * 2**i for i in range(4)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    assert len(feats) == 4
    for feat, chans, hw in zip(feats, model.feature_info.channels(), expected_sizes(*size), strict=True):
        assert feat.shape == (1, chans, *hw)
        assert feat.is_contiguous()


def test_out_indices_and_consistency() -> None:
    torch.manual_seed(0)
    full = timm.create_model("dinat_s_tiny").eval()
    feats = timm.create_model("dinat_s_tiny", features_only=True, out_indices=(1, 3)).eval()
    feats.model.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k in feats.model.state_dict()}, strict=True
    )
    assert feats.feature_info.channels() == [192, 768] and feats.feature_info.reduction() == [8, 32]
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps = feats(x)
        final, inter = full.forward_intermediates(x)
        torch.testing.assert_close(final, full.forward_features(x))
    assert [m.shape[1] for m in maps] == [192, 768]
    torch.testing.assert_close(maps[0], inter[1])
    torch.testing.assert_close(maps[1], inter[3])


@pytest.mark.parametrize("feature_cls", ["hook", "fx"])
@pytest.mark.parametrize("name", ["nat_mini", "dinat_s_tiny"])
def test_hook_and_fx_features_are_the_stage_maps(name: str, feature_cls: str) -> None:
    """feature_info's modules (timm's hook and fx feature nets use them) give each stage's map
    before the next level's downsample: the getter's maps, in the blocks' NHWC layout. torch.fx
    traces the blocks; modules with shape-dependent code are leaves (timm's register_notrace_module)."""
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True).eval()
    torch.manual_seed(0)  # the same weights
    hooks = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        expected, maps = getter(x), hooks(x)
    assert len(maps) == 4
    for nchw, nhwc, chans in zip(expected, maps, hooks.feature_info.channels(), strict=True):
        assert nhwc.shape[-1] == chans
        torch.testing.assert_close(nhwc.permute(0, 3, 1, 2), nchw)
