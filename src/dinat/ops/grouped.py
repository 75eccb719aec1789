"""Neighborhood attention when every dilation group is exactly one window.

When H == kh*dh and W == kw*dw, each dilation group (row mod dh, column mod dw) is a kh x kw grid
and every query's clamped window is its whole group: the op is plain attention within groups, as
Swin's window attention is within windows. The fast backends run it as batched attention instead
of their neighborhood kernels (DiNAT's last level, and its dilated layers whose dilation fills the
map); the Triton backend by default on whole-window kernels of its own (triton_na.WHOLE_WINDOW).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .functional import is_exporting

Pair = tuple[int, int]


def is_whole(height: int, width: int, kernel: Pair, dilation: Pair) -> bool:
    """Whether every dilation group of an H x W map is exactly one kh x kw window."""
    return (height, width) == (kernel[0] * dilation[0], kernel[1] * dilation[1])


def runs_whole(height: int, width: int, kernel: Pair, dilation: Pair) -> bool:
    """Whether the CPU and Triton backends run the map as :func:`attention` (:func:`is_whole`).
    Under ``torch.export`` with a dynamic image size, only when that holds for every size: the
    exported program then keeps their fused op, exact on whole maps too, instead of fixing the size."""
    if is_exporting():
        return statically_known_true(height == kernel[0] * dilation[0]) and statically_known_true(
            width == kernel[1] * dilation[1]
        )
    return is_whole(height, width, kernel, dilation)


@functools.lru_cache(maxsize=32)
def _bias_index(kernel: Pair, device: torch.device) -> Tensor:
    """The entry of a flattened (2kh-1) x (2kw-1) rpb table of every (query, key) pair of a kh x kw
    group, (kh*kw)**2 of them, query-major; kept on ``device`` (no host-to-device copy per call)."""
    rows, cols = torch.meshgrid(torch.arange(kernel[0]), torch.arange(kernel[1]), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    row, col = rows[None, :] - rows[:, None] + kernel[0] - 1, cols[None, :] - cols[:, None] + kernel[1] - 1
    return (row * (2 * kernel[1] - 1) + col).flatten().to(device)


def sdpa_by_default(device_type: str, features: tuple[Tensor, ...], rpb: Tensor | None) -> bool:
    """On CUDA, but not when the rpb alone needs a gradient (fine-tuning only the bias tables):
    the memory-efficient kernel's backward then read a log-sum-exp its forward had not kept, an
    illegal memory access (pytorch#148476, fixed in 2026; torch >= 2.4 is supported here)."""
    only_rpb = rpb is not None and rpb.requires_grad and not any(t.requires_grad for t in features)
    return device_type == "cuda" and not (only_rpb and torch.is_grad_enabled())


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: Pair,
    dilation: Pair,
    rpb: Tensor | None,
    scale: float,
    sdpa: bool | None = None,
) -> Tensor:
    """na2d for :func:`is_whole` maps, tokens-first (B, H, W, heads, D) in and out.

    ``sdpa``: run ``scaled_dot_product_attention`` (fused kernels) rather than matmul + softmax +
    matmul (faster on the CPU for 49-token groups: see BENCHMARKS.md); by default as
    :func:`sdpa_by_default` decides.
    """
    if sdpa is None:
        sdpa = sdpa_by_default(q.device.type, (q, k, v), rpb)
    batch, height, width, heads, dim = q.shape
    (kh, kw), (dh, dw) = kernel, dilation

    def to_groups(x: Tensor) -> Tensor:  # (B, H, W, h, D) -> (B*dh*dw, h, kh*kw, D)
        x = x.reshape(batch, kh, dh, kw, dw, heads, dim).permute(0, 2, 4, 5, 1, 3, 6)
        return x.reshape(batch * dh * dw, heads, kh * kw, dim)

    bias = None
    if rpb is not None:
        # inside a torch.compile trace the index is built in the graph (dynamo warns on lru_cache)
        index = (_bias_index.__wrapped__ if torch.compiler.is_compiling() else _bias_index)(kernel, rpb.device)
        # index_select on the flat table, not rpb[:, rows, cols]: its backward (index_add) costs the host
        # less than advanced indexing's (index_put with accumulate): the op's host time at 7x7, 16 heads,
        # fell from 1.42-1.50x window attention's to 1.15-1.25x (benchmarks/triton_host_overhead.py)
        bias = rpb.flatten(1).index_select(1, index).view(heads, kh * kw, kh * kw)
    qg, kg, vg = to_groups(q), to_groups(k), to_groups(v)
    if sdpa:
        mask = None if bias is None else bias.to(q.dtype)  # sdpa wants the mask in q's dtype
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
    else:
        logits = (qg * scale) @ kg.transpose(-1, -2)
        weights = (logits if bias is None else logits + bias).softmax(dim=-1)  # float32 with a float32 rpb
        out = weights.to(vg.dtype) @ vg
    out = out.view(batch, dh, dw, heads, kh, kw, dim).permute(0, 4, 1, 5, 2, 3, 6)
    return out.reshape(batch, height, width, heads, dim)
