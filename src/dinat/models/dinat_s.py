"""DiNAT_s (SPEC section 2): Swin Transformer's layout with (dilated) neighborhood attention in
place of (shifted) window attention, and no layer scale.

State dict layout (as the original): ``patch_embed.{proj,norm}``,
``layers.{i}.blocks.{j}.{norm1,attn.{rpb,qkv,proj},norm2,mlp.{fc1,fc2}}``,
``layers.{i}.downsample.{reduction,norm}`` (Swin patch merging), ``norm``, ``head``.

Any input size works: the image is zero-padded to a multiple of 4, patch merging pads odd maps at
the bottom/right, and the attention pads maps smaller than kernel_size * dilation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from ._common import (
    ALT_URLS,
    URL_ROOT,
    HierarchicalModel,
    PatchEmbed,
    cfg_22k,
    cfg_384,
    create,
    default_cfg,
)


@register_notrace_module  # torch.fx: a leaf (pads odd maps)
class PatchMerging(nn.Module):
    """Swin patch merging on (B, H, W, C): pad odd H/W at the bottom/right, concatenate the four
    2x2-strided sub-grids, LayerNorm(4C), Linear(4C, 2C, bias=False)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class DiNATs(HierarchicalModel):
    """DiNAT_s: Swin-layout DiNAT.

    Args (the rest: :class:`~dinat.models.HierarchicalModel`):
        dilations: per level, the pattern repeated to the level's depth (e.g. ((1, 8), (1, 4),
            (1, 2), (1, 1))); None means dilation 1 everywhere.
    """

    stages_name = "layers"

    def __init__(
        self,
        embed_dim: int = 96,
        mlp_ratio: float = 4.0,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        in_chans: int = 3,
        patch_size: int = 4,
        **kwargs: Any,
    ) -> None:
        embed = PatchEmbed(patch_size, in_chans, embed_dim)
        super().__init__(embed, PatchMerging, embed_dim, mlp_ratio, depths, num_heads, **kwargs)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> DiNATs:
    return create(DiNATs, variant, pretrained, model_args, hierarchical=True, **kwargs)


_IN1K = URL_ROOT + "dinat/checkpoints/imagenet1k/"
_IN22K = URL_ROOT + "dinat/checkpoints/imagenet22k/"


def _in1k(name: str, size: int) -> dict[str, Any]:
    """The original code names ``{name}_in1k_{size}.pth``, the seed table ``{name}_1k_{size}.pth``:
    which one is live is unknown, so the second is a fallback (:data:`ALT_URLS`)."""
    url = f"{_IN1K}{name}_in1k_{size}.pth"
    ALT_URLS[url] = (f"{_IN1K}{name}_1k_{size}.pth",)
    return (cfg_384 if size == 384 else default_cfg)(url)


default_cfgs = generate_default_cfgs(
    {
        "dinat_s_tiny.in1k": _in1k("dinat_s_tiny", 224),
        "dinat_s_small.in1k": _in1k("dinat_s_small", 224),
        "dinat_s_base.in1k": _in1k("dinat_s_base", 224),
        "dinat_s_large.in22k_ft_in1k": _in1k("dinat_s_large", 224),
        "dinat_s_large.in22k": cfg_22k(_IN22K + "dinat_s_large_in22k_224.pth"),
        "dinat_s_large_384.in22k_ft_in1k": _in1k("dinat_s_large", 384),
        "dinat_s_large_21k.in22k": cfg_22k(_IN22K + "dinat_s_large_in22k_224.pth"),
    }
)

_D224 = ((1, 8), (1, 4), (1, 2), (1, 1))
_D384 = ((1, 13), (1, 6), (1, 3), (1, 1))
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), dilations=_D224, drop_path_rate=0.2)
_SMALL = dict(_TINY, depths=(2, 2, 18, 2), drop_path_rate=0.3)
_BASE = dict(_SMALL, embed_dim=128, num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_LARGE = dict(_SMALL, embed_dim=192, num_heads=(6, 12, 24, 48), drop_path_rate=0.35)


@register_model
def dinat_s_tiny(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Tiny (28.3M params, 4.5 GFLOPs at 224), ImageNet-1K."""
    return _create("dinat_s_tiny", pretrained, _TINY, **kwargs)


@register_model
def dinat_s_small(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Small (49.6M params, 8.7 GFLOPs at 224), ImageNet-1K."""
    return _create("dinat_s_small", pretrained, _SMALL, **kwargs)


@register_model
def dinat_s_base(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Base (87.8M params, 15.4 GFLOPs at 224), ImageNet-1K."""
    return _create("dinat_s_base", pretrained, _BASE, **kwargs)


@register_model
def dinat_s_large(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large (196.5M params, 34.5 GFLOPs at 224). Tags: ``in22k_ft_in1k`` (default) and
    ``in22k`` (21841 classes)."""
    return _create("dinat_s_large", pretrained, _LARGE, **kwargs)


@register_model
def dinat_s_large_384(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large at 384 px (dilations [1,13], [1,6], [1,3].., 1), ImageNet-22K -> 1K."""
    return _create("dinat_s_large_384", pretrained, dict(_LARGE, dilations=_D384), **kwargs)


@register_model
def dinat_s_large_21k(pretrained: bool = False, **kwargs: Any) -> DiNATs:
    """DiNAT_s-Large pre-trained on ImageNet-22K, 21841-class head, drop_path_rate 0.2."""
    return _create("dinat_s_large_21k", pretrained, dict(_LARGE, drop_path_rate=0.2), **kwargs)
