"""Parameter and FLOP counts, with fvcore's convention: one multiply-add is one FLOP.

How it counts, independently of the attention backend:

* everything outside the attention cores (convolutions, linear layers, matmuls) is counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 per multiply-add, so halved here);
* the attention cores are counted analytically by forward hooks on every
  :class:`~dinat.layers.NeighborhoodAttention2D` and
  :class:`~dinat.models.isotropic.RelPosSelfAttention`: q.k and attn.v are
  B * heads * H * W * kh * kw * head_dim each for neighborhood attention (H, W after the module's
  padding), B * heads * N * N * head_dim each for full self-attention (N tokens). Whatever
  FlopCounterMode saw inside those modules other than their own qkv / proj submodules (e.g. the
  reference op's einsums, or nothing for a custom kernel) is discarded.

Two optional extras reproduce other conventions: ``count_norms`` adds fvcore's LayerNorm handle
(5 per element), ``count_bias`` adds NATTEN's fvcore handle's one add per logit for the relative
positional bias. The defaults reproduce the release's published figures at 224 px; its 384-px
figures for the large models were made with both extras on (see tests/test_flops.py).

The count runs one forward pass of batch 1. A model built on the meta device
(``with torch.device("meta"): model = create_model(...)``) is counted without computing anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import NeighborhoodAttention2D
from .models.isotropic import RelPosSelfAttention
from .ops import use_backend

ATTENTION_TYPES = (NeighborhoodAttention2D, RelPosSelfAttention)


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as relative_position_index excluded)."""
    return sum(p.numel() for p in model.parameters())


def _attention_flops(module: nn.Module, x: torch.Tensor, count_bias: bool) -> int:
    """Multiply-adds of one attention core on input x (B, H, W, C)."""
    batch, height, width, channels = x.shape
    if isinstance(module, NeighborhoodAttention2D):
        (kh, kw), (dh, dw) = module.kernel_size, module.dilation
        tokens = batch * max(height, kh * dh) * max(width, kw * dw)  # the module pads small maps
        neighbors = kh * kw
    else:
        tokens = batch * height * width
        neighbors = height * width
    flops = 2 * tokens * neighbors * channels  # q.k and attn.v, heads * head_dim = channels
    if count_bias:
        flops += tokens * neighbors * module.num_heads
    return flops


def count(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    count_norms: bool = False,
    count_bias: bool = False,
) -> tuple[int, int]:
    """(params, flops) of ``model`` on one image of ``input_size`` (C, H, W); see the module doc."""
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be (C, H, W) positive ints, got {tuple(input_size)!r}")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    extra = [0]
    attn_names = {}
    root = type(model).__name__

    def add(flops: int) -> None:
        extra[0] += flops

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, ATTENTION_TYPES):
            path = f"{root}.{name}" if name else root  # FlopCounterMode's names: the root is its class name
            attn_names[path] = [f"{path}.{child}" for child, _ in module.named_children()]
            hooks.append(module.register_forward_hook(lambda m, i, o: add(_attention_flops(m, i[0], count_bias))))
        elif count_norms and isinstance(module, nn.LayerNorm):
            hooks.append(module.register_forward_hook(lambda m, i, o: add(5 * i[0].numel())))
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        # the attention is counted by hand; the reference runs under FlopCounterMode anywhere (flex cannot)
        with counter, torch.no_grad(), use_backend("reference"):
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    per_module = counter.get_flop_counts()

    def total(name: str) -> int:
        return sum(per_module.get(name, {}).values())

    inside_attention = sum(total(name) - sum(total(c) for c in children) for name, children in attn_names.items())
    return count_params(model), (counter.get_total_flops() - inside_attention) // 2 + extra[0]


def main_table(
    names: Iterable[str],
    input_size: Sequence[int] | None = None,
    count_norms: bool = False,
    count_bias: bool = False,
) -> list[tuple[str, float, float, tuple[int, int, int]]]:
    """Rows (name, params in M, GFLOPs, input size) for registered model names, built on the meta
    device (no weights are allocated or computed). ``input_size`` None: each model's pretrained-cfg size."""
    from .factory import create_model

    rows = []
    for name in names:
        with torch.device("meta"):
            model = create_model(name)
        size = input_size or model.pretrained_cfg["input_size"]
        params, flops = count(model, size, count_norms, count_bias)
        rows.append((name, params / 1e6, flops / 1e9, tuple(size)))
    return rows


__all__ = ["count", "count_params", "main_table"]
