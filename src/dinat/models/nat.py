"""NAT and DiNAT (SPEC section 2): a convolutional stem, four levels of neighborhood-attention
blocks with convolutional downsampling, mean-pooled head. DiNAT is NAT with per-block dilations.

State dict layout (identical to the original, so the published files load strictly):
``patch_embed.proj.{0,1}``, ``patch_embed.norm``, ``levels.{i}.blocks.{j}.{gamma1,gamma2,norm1,
attn.{rpb,qkv,proj},norm2,mlp.{fc1,fc2}}``, ``levels.{i}.downsample.{reduction,norm}``, ``norm``,
``head``.

Any input size works: the stem and downsamplers are stride-2 convolutions (padding 1) and the
attention zero-pads maps smaller than kernel_size * dilation (NATTEN 0.14 behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._common import (
    URL_ROOT,
    HierarchicalModel,
    cfg_22k,
    cfg_384,
    check_image,
    create,
    default_cfg,
)


@register_notrace_module  # torch.fx: a leaf (checks its input)
class ConvTokenizer(nn.Module):
    """Two Conv2d(3x3, stride 2, pad 1) (no activation between), then LayerNorm, channels last."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.proj[0].in_channels)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """Conv2d(dim, 2dim, 3x3, stride 2, pad 1, no bias) then LayerNorm(2dim), channels last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


DILATIONS_224 = ((1, 8, 1), (1, 4, 1, 4), (1, 2), (1,))  # SPEC "A"
DILATIONS_384 = ((1, 13, 1), (1, 6, 1, 6), (1, 3), (1,))  # SPEC "B"


class NAT(HierarchicalModel):
    """Neighborhood Attention Transformer; with ``dilations`` it is DiNAT.

    Args (the rest: :class:`~dinat.models.HierarchicalModel`):
        embed_dim: channels of level 0 (level i has embed_dim * 2**i).
        depths, num_heads: per level.
        kernel_size: neighborhood size (odd).
        dilations: per level, a dilation pattern repeated to the level's depth (a full per-block
            list, as the original took, works too); None: all 1, i.e. NAT.
        layer_scale: initial value of the ``gamma1``/``gamma2`` layer-scale parameters, or None.
    """

    stages_name = "levels"

    def __init__(
        self,
        embed_dim: int = 64,
        mlp_ratio: float = 3.0,
        depths: Sequence[int] = (3, 4, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        in_chans: int = 3,
        **kwargs: Any,
    ) -> None:
        tokenizer = ConvTokenizer(in_chans, embed_dim)
        super().__init__(tokenizer, ConvDownsampler, embed_dim, mlp_ratio, depths, num_heads, **kwargs)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> NAT:
    return create(NAT, variant, pretrained, model_args, hierarchical=True, **kwargs)


_NAT = URL_ROOT + "nat/checkpoints/CLS/"
_IN1K = URL_ROOT + "dinat/checkpoints/imagenet1k/"
_IN22K = URL_ROOT + "dinat/checkpoints/imagenet22k/"

_CFGS = {
    "nat_mini.in1k": default_cfg(_NAT + "nat_mini.pth"),
    "nat_tiny.in1k": default_cfg(_NAT + "nat_tiny.pth"),
    "nat_small.in1k": default_cfg(_NAT + "nat_small.pth"),
    "nat_base.in1k": default_cfg(_NAT + "nat_base.pth"),
    "dinat_nano": default_cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
    "dinat_mini.in1k": default_cfg(_IN1K + "dinat_mini_in1k_224.pth"),
    "dinat_tiny.in1k": default_cfg(_IN1K + "dinat_tiny_in1k_224.pth"),
    "dinat_small.in1k": default_cfg(_IN1K + "dinat_small_in1k_224.pth"),
    "dinat_base.in1k": default_cfg(_IN1K + "dinat_base_in1k_224.pth"),
    "dinat_large.in22k_ft_in1k": default_cfg(_IN1K + "dinat_large_in22k_in1k_224.pth"),
    "dinat_large.in22k": cfg_22k(_IN22K + "dinat_large_in22k_224.pth"),
    "dinat_large_384.in22k_ft_in1k": cfg_384(_IN1K + "dinat_large_in22k_in1k_384.pth"),
    "dinat_large_384_11x11.in22k_ft_in1k": cfg_384(_IN1K + "dinat_large_in22k_in1k_384_11x11.pth"),
    "dinat_large_21k.in22k": cfg_22k(_IN22K + "dinat_large_in22k_224.pth"),
    "dinat_large_21k_11x11.in22k": cfg_22k(_IN22K + "dinat_large_in22k_224_11x11interp.pth"),
}
default_cfgs = generate_default_cfgs({k: dict(v, first_conv="patch_embed.proj.0") for k, v in _CFGS.items()})

_MINI = dict(embed_dim=64, mlp_ratio=3.0, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), drop_path_rate=0.2)
_TINY = dict(_MINI, depths=(3, 4, 18, 5))
_SMALL = dict(embed_dim=96, mlp_ratio=2.0, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_BASE = dict(_SMALL, embed_dim=128, num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_LARGE = dict(_SMALL, embed_dim=192, num_heads=(6, 12, 24, 48), drop_path_rate=0.35)


def _dilated(args: dict[str, Any], patterns=DILATIONS_224, **extra: Any) -> dict[str, Any]:
    return dict(args, dilations=patterns, **extra)


@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Mini (20.0M params, 2.7 GFLOPs at 224), ImageNet-1K 81.8%."""
    return _create("nat_mini", pretrained, _MINI, **kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Tiny (27.9M params, 4.3 GFLOPs at 224)."""
    return _create("nat_tiny", pretrained, _TINY, **kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Small (50.7M params, 7.8 GFLOPs at 224), layer scale 1e-5."""
    return _create("nat_small", pretrained, dict(_SMALL, layer_scale=1e-5), **kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """NAT-Base (89.8M params, 13.7 GFLOPs at 224), layer scale 1e-5."""
    return _create("nat_base", pretrained, dict(_BASE, layer_scale=1e-5), **kwargs)


@register_model
def dinat_nano(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Nano: a small DiNAT for the training demo (8x8 digits upsampled to 32-64 px).

    Not part of the release and has no pretrained weights. embed_dim 32, depths (2, 2, 2, 2),
    heads (1, 2, 4, 8), mlp_ratio 2, kernel 5, dilations [1, 2] at level 0 and 1 elsewhere,
    drop_path_rate 0.0; 10 classes by default. Maps smaller than kernel * dilation (the later levels
    at 32 px) are zero-padded by the attention, as NATTEN 0.14 did.
    """
    args = dict(
        embed_dim=32,
        mlp_ratio=2.0,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        kernel_size=5,
        dilations=((1, 2), (1,), (1,), (1,)),
        drop_path_rate=0.0,
    )
    return _create("dinat_nano", pretrained, args, **kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Mini (20.0M params, 2.7 GFLOPs at 224), ImageNet-1K."""
    return _create("dinat_mini", pretrained, _dilated(_MINI), **kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Tiny (27.9M params, 4.3 GFLOPs at 224), ImageNet-1K."""
    return _create("dinat_tiny", pretrained, _dilated(_TINY), **kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Small (50.7M params, 7.8 GFLOPs at 224), ImageNet-1K; no layer scale (unlike NAT-S)."""
    return _create("dinat_small", pretrained, _dilated(_SMALL), **kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Base (89.8M params, 13.7 GFLOPs at 224), ImageNet-1K, layer scale 1e-5."""
    return _create("dinat_base", pretrained, _dilated(_BASE, layer_scale=1e-5), **kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large (200.9M params, 30.6 GFLOPs at 224). Tags: ``in22k_ft_in1k`` (default) and
    ``in22k`` (the ImageNet-22K weights, 21841 classes)."""
    return _create("dinat_large", pretrained, _dilated(_LARGE), **kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 px (dilations [1,13,1], [1,6,1,6], [1,3].., 1), ImageNet-22K -> 1K."""
    return _create("dinat_large_384", pretrained, _dilated(_LARGE, DILATIONS_384), **kwargs)


@register_model
def dinat_large_384_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large at 384 px with 11x11 neighborhoods (224-px dilations), ImageNet-22K -> 1K."""
    args = _dilated(_LARGE, kernel_size=11)
    return _create("dinat_large_384_11x11", pretrained, args, **kwargs)


@register_model
def dinat_large_21k(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large pre-trained on ImageNet-22K: a 21841-class head (the original built 1000 and
    could not load its own checkpoint). drop_path_rate 0.2."""
    return _create("dinat_large_21k", pretrained, _dilated(_LARGE, drop_path_rate=0.2), **kwargs)


@register_model
def dinat_large_21k_11x11(pretrained: bool = False, **kwargs: Any) -> NAT:
    """DiNAT-Large ImageNet-22K (21841 classes) with 11x11 neighborhoods: the 7x7 weights with every
    rpb resized bicubically (:func:`dinat.checkpoints.resize_rpb`)."""
    args = _dilated(_LARGE, kernel_size=11, drop_path_rate=0.2)
    return _create("dinat_large_21k_11x11", pretrained, args, **kwargs)
