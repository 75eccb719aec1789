"""``create_model``: build any model of this package by name, optionally with weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

from . import models
from .checkpoints import load_checkpoint
from .config import COMPILE_MODES


def create_model(
    name: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name`` (``name.tag`` selects a pretrained tag, as in timm).

    pretrained: download (or take from timm's cache) the official weights.
    checkpoint_path: then load this file strictly (bare, EMA/timm-wrapped, DDP-prefixed, .pth or
        .safetensors; see :mod:`dinat.checkpoints`).
    kwargs: model arguments (num_classes, drop_path_rate, features_only, ...), as for timm.
    """
    arch = name.split(".", 1)[0]
    if arch not in models.MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(models.MODEL_NAMES)}")
    if checkpoint_path is not None and kwargs.get("features_only"):
        # timm wraps the model for features_only (dropping its norm and head) after it loads the
        # pretrained file, which checkpoint_filter_fn checks strictly: load it there
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(checkpoint_path))
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, strict=True)
    return model


def compile_model(model: nn.Module | Callable, mode: str = "default") -> nn.Module | Callable:
    """``torch.compile(model)`` (a module or a function) in ``mode``, one of COMPILE_MODES
    ("reduce-overhead" replays CUDA graphs: the step no longer waits on the CPU's kernel launches).

    Static shapes: each input size compiles anew (a run sees few: its batch, the last batch of the
    evaluation). Compiled for dynamic sizes, a training step failed in inductor (torch 2.14: the CPU
    kernels' layout copies, "cannot determine truth value of Relational"), and evaluation compiled
    about ten times as long as for one size."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def list_models() -> list[str]:
    """The names ``create_model`` accepts (architectures; tags via timm.list_pretrained)."""
    return list(models.MODEL_NAMES)


__all__ = ["compile_model", "create_model", "list_models"]
