"""Neighborhood attention as a module, with the released models' behaviour (SPEC section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .ops import na2d_av, na2d_qk, na2d_qkvpacked
from .ops.functional import IntOrPair, check_kernel_and_dilation, is_exporting


def head_dim_and_scale(dim: int, num_heads: int, qk_scale: float | None) -> tuple[int, float]:
    """An attention module's head dim and its logits' scale (``qk_scale``, default head_dim ** -0.5),
    with a clear error for anything but positive ints ``dim`` divisible by ``num_heads`` and a
    positive ``qk_scale``."""
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % num_heads:
        raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
    if qk_scale is not None and not qk_scale > 0:
        raise ValueError(f"qk_scale must be positive (None: head_dim ** -0.5), got {qk_scale!r}")
    head_dim = dim // num_heads
    return head_dim, head_dim**-0.5 if qk_scale is None else qk_scale


@register_notrace_module  # torch.fx: a leaf (shape-dependent padding, custom ops)
class NeighborhoodAttention2D(nn.Module):
    """Multi-head dilated neighborhood attention over a channels-last (B, H, W, C) map.

    Inputs smaller than ``kernel_size * dilation`` are zero-padded at the bottom and right before
    the qkv projection and cropped after it, as NATTEN 0.14 did (the released checkpoints were
    trained that way). State dict: ``qkv.weight``, ``qkv.bias``, ``rpb``, ``proj.weight``,
    ``proj.bias``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: IntOrPair,
        dilation: IntOrPair = 1,
        rel_pos_bias: bool = True,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.head_dim, self.scale = head_dim_and_scale(dim, num_heads, qk_scale)
        self.kernel_size, self.dilation = check_kernel_and_dilation(kernel_size, dilation)
        self.dim = dim
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rel_pos_bias:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected input (B, H, W, {self.dim}), got shape {tuple(x.shape)}")
        batch, height, width, _ = x.shape
        pad_bottom, pad_right = self._padding(height, 0), self._padding(width, 1)
        if pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).view(batch, padded_h, padded_w, 3, self.num_heads, self.head_dim)
        if self.training and self.attn_drop.p > 0:
            q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
            attn = na2d_qk(q * self.scale, k, self.kernel_size, self.dilation, self.rpb).softmax(-1)
            x = na2d_av(self.attn_drop(attn), v, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
        else:
            x = na2d_qkvpacked(qkv, self.kernel_size, self.dilation, self.rpb, self.scale)
        x = x.reshape(batch, padded_h, padded_w, self.dim)[:, :height, :width]
        return self.proj_drop(self.proj(x))

    def _padding(self, length: int, axis: int) -> int:
        """Rows (axis 0) or columns (axis 1) to pad so that the map spans kernel_size * dilation."""
        span = self.kernel_size[axis] * self.dilation[axis]
        if isinstance(length, torch.SymInt) and is_exporting():
            # a program exported for a range of image sizes takes one path at every size of it: the
            # padding's (pad, slice) would fix the size, so the range must not need it
            if not statically_known_true(length >= span):
                raise ValueError(
                    f"torch.export with a dynamic image size: this layer needs a map {('height', 'width')[axis]} "
                    f"of at least kernel_size * dilation = {span} tokens at every size of the range, and its "
                    "smallest sizes give fewer (the layer would pad them); raise the range's minimum"
                )
            return 0
        return max(0, span - length)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"dilation={self.dilation}, rel_pos_bias={self.rpb is not None}"
        )


__all__ = ["NeighborhoodAttention2D"]
