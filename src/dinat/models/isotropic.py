"""Isotropic models (SPEC section 2): 16x16 patches, 12 blocks at one resolution, 224 px only.

* ``nat_isotropic_*``: 7x7 neighborhood attention, dilation 1.
* ``dinat_isotropic_*``: 7x7 neighborhood attention, dilation 1 on even blocks and 2 on odd ones.
* ``vitrpb_*``: ViT with full self-attention plus a relative positional bias table ``rpb``
  (heads, 27, 27) indexed by the buffer ``relative_position_index`` (196, 196).

State dict: ``patch_embed.{proj,norm}``, ``layers.{i}.{norm1,attn.*,norm2,mlp.{fc1,fc2}}``,
``norm``, ``head``. The models take a 14x14 token grid only (224x224 images, or anything that pads
to it: the image is zero-padded to a multiple of 16) and raise a ValueError otherwise.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor, nn

from ..layers import head_dim_and_scale
from ._common import (
    URL_ROOT,
    ClassifierMixin,
    NATBlock,
    PatchEmbed,
    create,
    default_cfg,
    drop_path_rates,
    init_weights,
    run_blocks,
)

GRID = 14  # tokens per side: 224 px / 16


def relative_position_index(size: int) -> Tensor:
    """(size**2, size**2) index into a flattened (2*size-1, 2*size-1) table: for query token a and
    key token b, (row_b - row_a + size - 1) * (2*size - 1) + (col_b - col_a + size - 1)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[None, :] - rows[:, None] + size - 1
    d_col = cols[None, :] - cols[:, None] + size - 1
    return d_row * (2 * size - 1) + d_col


@register_notrace_module  # torch.fx: a leaf (checks the token grid)
class RelPosSelfAttention(nn.Module):
    """Full multi-head self-attention over a (B, GRID, GRID, C) map, with a learned bias per head
    and relative offset (key minus query, as in neighborhood attention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        grid_size: int = GRID,
    ) -> None:
        super().__init__()
        self.head_dim, self.scale = head_dim_and_scale(dim, num_heads, qk_scale)
        self.dim, self.num_heads, self.grid_size = dim, num_heads, grid_size
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * grid_size - 1, 2 * grid_size - 1))
        trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.register_buffer("relative_position_index", relative_position_index(grid_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        if (height, width) != (self.grid_size, self.grid_size):
            raise ValueError(
                f"relative-position self-attention needs a {self.grid_size}x{self.grid_size} token grid, "
                f"got {height}x{width}"
            )
        n = height * width
        qkv = self.qkv(x.reshape(batch, n, self.dim)).view(batch, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rpb.flatten(1)[:, self.relative_position_index].to(q.dtype)
        x = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.unsqueeze(0),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        x = x.transpose(1, 2).reshape(batch, height, width, self.dim)
        return self.proj_drop(self.proj(x))


class IsotropicModel(ClassifierMixin, nn.Module):
    """12 blocks on a 14x14 grid of 16x16 patches.

    Args:
        dilation: block i uses dilation 1 if i is even, else ``dilation`` (NA models).
        attention: "na" (neighborhood attention, ``kernel_size``) or "rpb" (ViT-rpb).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        dilation: int = 1,
        attention: str = "na",
        patch_size: int = 16,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        img_size: int | tuple[int, int] = GRID * 16,
    ) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if tuple(-(-s // patch_size) for s in size) != (GRID, GRID):
            raise ValueError(f"isotropic models take {GRID}x{GRID} tokens (224x224 images), got img_size {img_size}")
        if attention not in ("na", "rpb"):
            raise ValueError(f"attention must be 'na' or 'rpb', got {attention!r}")
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        attn_layer = partial(RelPosSelfAttention, grid_size=GRID) if attention == "rpb" else None
        (dpr,) = drop_path_rates(drop_path_rate, [depth])
        self.layers = nn.ModuleList(
            NATBlock(
                embed_dim,
                num_heads,
                kernel_size,
                1 if i % 2 == 0 else dilation,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                attn_layer=attn_layer,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self._build_head(embed_dim, num_classes, global_pool, drop_rate)
        self.apply(init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm", MATCH_PREV_GROUP)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        image_size = tuple(x.shape[-2:])
        x = self.patch_embed(x)
        if tuple(x.shape[1:3]) != (GRID, GRID):
            raise ValueError(
                f"isotropic models take a {GRID}x{GRID} token grid (a 224x224 image); the "
                f"{image_size[0]}x{image_size[1]} input gives {x.shape[1]}x{x.shape[2]} tokens"
            )
        x = run_blocks(self.layers, self.pos_drop(x), self.grad_checkpointing)
        return self.norm(x)


def _create(variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any) -> IsotropicModel:
    return create(IsotropicModel, variant, pretrained, model_args, hierarchical=False, **kwargs)


_ISO = URL_ROOT + "dinat/checkpoints/isotropic/"

default_cfgs = generate_default_cfgs(
    {
        f"{name}_{size}.in1k": default_cfg(f"{_ISO}{name}_{size}_in1k_224.pth", fixed_input_size=True)
        for name in ("nat_isotropic", "dinat_isotropic", "vitrpb")
        for size in ("small", "base")
    }
)

_SMALL = dict(embed_dim=384, num_heads=12, drop_path_rate=0.1)
_BASE = dict(embed_dim=768, num_heads=24, drop_path_rate=0.4)


@register_model
def nat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """Isotropic NAT-S (22.0M params, 4.3 GFLOPs), 7x7 neighborhoods."""
    return _create("nat_isotropic_small", pretrained, _SMALL, **kwargs)


@register_model
def nat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """Isotropic NAT-B (86.5M params, 16.9 GFLOPs), 7x7 neighborhoods."""
    return _create("nat_isotropic_base", pretrained, _BASE, **kwargs)


@register_model
def dinat_isotropic_small(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """Isotropic DiNAT-S (22.0M params, 4.3 GFLOPs), dilation 1/2 alternating."""
    return _create("dinat_isotropic_small", pretrained, dict(_SMALL, dilation=2), **kwargs)


@register_model
def dinat_isotropic_base(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """Isotropic DiNAT-B (86.5M params, 16.9 GFLOPs), dilation 1/2 alternating."""
    return _create("dinat_isotropic_base", pretrained, dict(_BASE, dilation=2), **kwargs)


@register_model
def vitrpb_small(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """ViT-rpb-S (22.1M params, 4.6 GFLOPs): self-attention with relative positional bias."""
    return _create("vitrpb_small", pretrained, dict(_SMALL, attention="rpb"), **kwargs)


@register_model
def vitrpb_base(pretrained: bool = False, **kwargs: Any) -> IsotropicModel:
    """ViT-rpb-B (86.6M params, 17.5 GFLOPs): self-attention with relative positional bias."""
    return _create("vitrpb_base", pretrained, dict(_BASE, attention="rpb"), **kwargs)
