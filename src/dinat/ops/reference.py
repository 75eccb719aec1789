"""Neighborhood attention written straight from its definition (SPEC section 1).

Slow and memory hungry (it gathers every query's kh*kw keys), but obviously correct: the tests use
it as the oracle for the fast paths, and it is the fallback on any device. Autograd differentiates
it as ordinary PyTorch code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def axis_neighborhood(length: int, kernel: int, dilation: int, device=None) -> tuple[Tensor, Tensor]:
    """Neighborhoods along one axis.

    Returns ``keys`` (length, kernel): the position of each query's j-th key, and ``bias_index``
    (length, kernel): the row of the relative-position table that key uses, i.e. its offset from the
    query in dilated units shifted by ``kernel - 1``.
    """
    pos = torch.arange(length, device=device)
    group = pos % dilation
    place = pos // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((place - kernel // 2).clamp(min=0), group_len - kernel)
    offsets = torch.arange(kernel, device=device)
    keys = group[:, None] + dilation * (start[:, None] + offsets)
    bias_index = start[:, None] + offsets - place[:, None] + kernel - 1
    return keys, bias_index


def _gather_neighbors(x: Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """(B, heads, H, W, D) -> (B, heads, H, W, kh, kw, D): every query's neighborhood of x."""
    height, width = x.shape[2:4]
    rows, _ = axis_neighborhood(height, kernel_size[0], dilation[0], x.device)
    cols, _ = axis_neighborhood(width, kernel_size[1], dilation[1], x.device)
    return x[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def relative_position_bias(
    rpb: Tensor, height: int, width: int, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> Tensor:
    """The bias every query adds to its neighbors' logits: (heads, H, W, kh*kw)."""
    _, rows = axis_neighborhood(height, kernel_size[0], dilation[0], rpb.device)
    _, cols = axis_neighborhood(width, kernel_size[1], dilation[1], rpb.device)
    # each (query, neighbor)'s entry of the flattened table, picked by index_select: its backward
    # (index_add) is 2.5-4x faster on the CPU than that of rpb[:, rows, cols] (index_put, accumulating)
    index = rows[:, None, :, None] * rpb.shape[-1] + cols[None, :, None, :]  # (H, W, kh, kw)
    return rpb.flatten(1).index_select(1, index.flatten()).view(rpb.shape[0], height, width, -1)


def na2d_qk(
    q: Tensor, k: Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int], rpb: Tensor | None
) -> Tensor:
    neighbors = _gather_neighbors(k, kernel_size, dilation)
    logits = torch.einsum("bnhwd,bnhwijd->bnhwij", q, neighbors).flatten(-2)
    if rpb is not None:  # (a float32 rpb with float16/bfloat16 q, as under autocast, keeps q's dtype)
        logits = logits + relative_position_bias(rpb, q.shape[2], q.shape[3], kernel_size, dilation).to(q.dtype)
    return logits


def na2d_av(attn: Tensor, v: Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    neighbors = _gather_neighbors(v, kernel_size, dilation)
    weights = attn.unflatten(-1, kernel_size).to(v.dtype)
    return torch.einsum("bnhwij,bnhwijd->bnhwd", weights, neighbors)


def na2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    rpb: Tensor | None,
    scale: float,
) -> Tensor:
    """Tokens-first (B, H, W, heads, D) fused attention, composed from the two unfused ops."""
    q, k, v = (t.permute(0, 3, 1, 2, 4) for t in (q, k, v))
    attn = na2d_qk(q * scale, k, kernel_size, dilation, rpb).softmax(dim=-1)
    return na2d_av(attn, v, kernel_size, dilation).permute(0, 2, 3, 1, 4)
