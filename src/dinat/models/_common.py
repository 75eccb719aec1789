"""Pieces every model family shares: the transformer block, the stage, the classifier head, init,
the timm model interface, and the registration helpers.

All tensors between the stem and the head are channels last, (B, H, W, C), as in the original.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import NeighborhoodAttention2D
from ..ops import requested_backend, use_backend

URL_ROOT = "https://shi-labs.com/projects/"
ALT_URLS: dict[str, tuple[str, ...]] = {}  # checkpoint url -> urls to try when it is not found


def repeat_pattern(pattern: Sequence[int], depth: int) -> list[int]:
    """``pattern`` repeated (and cut) to ``depth`` entries: ([1, 2], 5) -> [1, 2, 1, 2, 1]."""
    return [pattern[i % len(pattern)] for i in range(depth)]


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic depth per block, linspace(0, rate, total blocks), split per stage."""
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate!r}")
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


class NATBlock(nn.Module):
    """The block of every family ("NATLayer" / "NATransformerLayer", SPEC section 2).

    x = x + drop_path(gamma1 * attn(norm1(x))); x = x + drop_path(gamma2 * mlp(norm2(x))), on a
    (B, H, W, C) map. ``layer_scale`` None means no gammas (and no ``gamma*`` parameters).
    ``attn_layer`` builds the attention module (default: neighborhood attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        attn_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None
        self.norm1 = nn.LayerNorm(dim)
        attn_kwargs = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        if attn_layer is None:
            self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation, **attn_kwargs)
        else:
            self.attn = attn_layer(dim, num_heads, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(y if self.gamma1 is None else self.gamma1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma2 is None else self.gamma2 * y)


def run_blocks(blocks: nn.ModuleList, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """Run ``blocks`` in order; with ``grad_checkpointing`` (and grad enabled) each block recomputes
    its activations in the backward pass (torch.utils.checkpoint), on the attention backend of the
    forward pass: the recomputation may run in another thread (autograd's, on CUDA), where
    ``use_backend``'s thread-local choice is not seen."""
    backend = requested_backend()

    def recomputable(block: nn.Module, x: Tensor) -> Tensor:
        with use_backend(backend):
            return block(x)

    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint(recomputable, block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class Stage(nn.Module):
    """``blocks`` then an optional ``downsample`` (state_dict ``{i}.blocks.{j}``, ``{i}.downsample``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        kernel_size: int,
        dilations: Sequence[int],
        drop_path: Sequence[float],
        downsample: nn.Module | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            NATBlock(dim, num_heads, kernel_size, dilations[j], drop_path=drop_path[j], **block_kwargs)
            for j in range(depth)
        )
        self.downsample = downsample

    def forward_blocks(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, x, self.grad_checkpointing)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


@register_notrace_module  # torch.fx: a leaf (checks and pads its input)
class PatchEmbed(nn.Module):
    """Swin-style patch embedding: zero-pad the image bottom/right to a multiple of ``patch_size``,
    Conv2d(patch_size, stride patch_size), LayerNorm; returns (B, H, W, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        check_image(x, self.proj.in_channels)
        p = self.patch_size
        height, width = x.shape[-2:]
        if height % p or width % p:
            x = F.pad(x, (0, -width % p, 0, -height % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def check_image(x: Tensor, in_chans: int) -> None:
    """A clear error for anything but a (B, in_chans, H, W) floating-point image batch."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected an image batch of shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point image batch, got dtype {x.dtype}")


def init_weights(module: nn.Module) -> None:
    """The original's init: Linear trunc_normal(std .02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ClassifierMixin:
    """timm's classifier interface over ``norm`` (applied in forward_features), a mean over all
    tokens, and the Linear ``head``. Subclasses set ``num_classes``, ``num_features``,
    ``global_pool``, ``head_drop``, ``head`` and implement ``forward_features``."""

    num_classes: int
    num_features: int
    global_pool: str
    head: nn.Module

    def _build_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool
        self._build_head(self.num_features, num_classes, global_pool, self.head_drop.p)
        if num_classes > 0:
            init_weights(self.head)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters excluded from weight decay (every relative position bias)."""
        return {name for name, _ in self.named_parameters() if name.endswith("rpb")}

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class HierarchicalModel(ClassifierMixin, nn.Module):
    """The 4-stage models (NAT/DiNAT with ``levels``, DiNAT_s with ``layers``).

    Subclasses pass their stem and downsampler and name the stage list (``stages_name``).
    forward_features returns the final-normed (B, H, W, C) map; forward_intermediates
    returns each stage's output before its downsample, NCHW, as detection/segmentation need.
    """

    stages_name = "levels"

    def __init__(
        self,
        patch_embed: nn.Module,
        downsample_layer: Callable[[int], nn.Module],
        embed_dim: int,
        mlp_ratio: float,
        depths: Sequence[int],
        num_heads: Sequence[int],
        kernel_size: int = 7,
        dilations: Sequence[Sequence[int]] | None = None,
        num_classes: int = 1000,
        global_pool: str = "avg",
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: float | None = None,
    ) -> None:
        """Stage i has dim embed_dim * 2**i, ``dilations[i]`` repeated to its depth (None: all 1),
        and ``downsample_layer(dim)`` after it unless it is the last."""
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        patterns = [(1,)] * len(depths) if dilations is None else dilations
        if len(patterns) != len(depths) or any(not 1 <= len(p) <= d for p, d in zip(patterns, depths, strict=False)):
            raise ValueError(
                f"dilations {dilations!r} must give each level of depths {tuple(depths)} a pattern of 1 to depth values"
            )
        self.patch_embed = patch_embed
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = drop_path_rates(drop_path_rate, depths)
        n = len(depths)
        stages = nn.ModuleList(
            Stage(
                embed_dim * 2**i,
                depth,
                num_heads[i],
                kernel_size,
                repeat_pattern(patterns[i], depth),
                dpr[i],
                downsample=downsample_layer(embed_dim * 2**i) if i < n - 1 else None,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                layer_scale=layer_scale,
            )
            for i, depth in enumerate(depths)
        )
        setattr(self, self.stages_name, stages)
        # a stage ends with the next level's downsample (the original's layout): its map is its last block's
        self.feature_info = [
            dict(num_chs=embed_dim * 2**i, reduction=4 * 2**i, module=f"{self.stages_name}.{i}.blocks.{depth - 1}")
            for i, depth in enumerate(depths)
        ]
        self.norm = nn.LayerNorm(embed_dim * 2 ** (n - 1))
        self._build_head(embed_dim * 2 ** (n - 1), num_classes, global_pool, drop_rate)
        self.apply(init_weights)

    @property
    def stages(self) -> nn.ModuleList:
        return getattr(self, self.stages_name)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        name = re.escape(self.stages_name)
        return dict(
            stem=r"^patch_embed",
            blocks=rf"^{name}\.(\d+)"
            if coarse
            else [
                (rf"^{name}\.(\d+)\.\w+\.(\d+)", None),
                (rf"^{name}\.(\d+)\.downsample", MATCH_PREV_GROUP),  # it ends the stage: with its last block
                (r"^norm", MATCH_PREV_GROUP),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (before each downsample) as NCHW maps, timm's feature-getter protocol."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
            if stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if i == last else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        stages = self.stages[: max_index + 1]
        stages[-1].downsample = None
        setattr(self, self.stages_name, stages)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def default_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg in timm's format, with the release's eval settings (224 px, crop 0.875)."""
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


def cfg_384(url: str, **kwargs: Any) -> dict[str, Any]:
    return default_cfg(url, input_size=(3, 384, 384), crop_pct=1.0, **kwargs)


def cfg_22k(url: str, **kwargs: Any) -> dict[str, Any]:
    return default_cfg(url, num_classes=21841, **kwargs)


def create(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    model_args: dict[str, Any],
    hierarchical: bool,
    **kwargs: Any,
) -> nn.Module:
    """build_model_with_cfg with the checkpoint filter, the feature getter for the 4-stage models,
    and pretrained weights checked, or downloaded, by
    :func:`dinat.checkpoints.resolve_pretrained_file` (fallback URLs, clear errors)."""
    from ..checkpoints import checkpoint_filter_fn, resolve_pretrained_file

    if pretrained:
        resolve_pretrained_file(variant, kwargs)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3)) if hierarchical else None
    features_only = bool(kwargs.get("features_only"))
    if not hierarchical and features_only:
        raise ValueError(f"{variant} is isotropic: features_only is for the hierarchical models")
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=functools.partial(checkpoint_filter_fn, features_only=features_only),
        feature_cfg=feature_cfg,
        **dict(model_args, **kwargs),
    )
