"""The gradients of the unfused ops' three primitives, for every backend that provides them.

With key(q, t) the t-th neighbor of query q (t = i * kw + j):

* ``dot(a, b)[q, t] = a[q] . b[key(q, t)]``                      (the logits, q.k)
* ``weighted_sum(p, b)[q] = sum_t p[q, t] b[key(q, t)]``         (attention @ v)
* ``scatter(p, a)[k] = sum of p[q, t] a[q] over key(q, t) = k``  (the keys' and values' gradients)

The gradient of each is made of the other two, so registering these formulas once gives every
order of derivative; the fused ops fall back on them when their own backward must be
differentiated. Each backend's primitives are ``torch.library`` custom ops taking
``(first, second, kernel, dilation)``, in whatever consistent layout that backend uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# The custom ops' names carry the version of their contract (outputs and their layout, what the
# backward returns): torch.compile's on-disk caches know an op by its name alone, not by its fake or
# its autograd (pytorch#160472), so a graph compiled against another contract would be reused and
# fail (version 4: the CPU ops' fakes are contiguous, as their kernels' outputs). Bump it with any
# such change.
OPS_VERSION = 4


def custom_op(name: str, fn: Callable | None = None):
    """``torch.library.custom_op`` named ``dinat::{name}_v{OPS_VERSION}``, mutating no argument (a
    decorator without ``fn``)."""
    return torch.library.custom_op(f"dinat::{name}_v{OPS_VERSION}", fn, mutates_args=())


def register_gradients(dot, weighted_sum, scatter) -> None:
    """Register the autograd formulas of one backend's three primitive custom ops."""

    def setup(ctx, inputs, output) -> None:
        first, second, kernel, dilation = inputs
        ctx.save_for_backward(first, second)
        ctx.geometry = (kernel, dilation)

    def dot_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = weighted_sum(grad, b, *ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_b = scatter(grad, a, *ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None

    def weighted_sum_backward(ctx, grad):
        p, b = ctx.saved_tensors
        grad_p = dot(grad, b, *ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_b = scatter(p, grad, *ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_p, grad_b, None, None

    def scatter_backward(ctx, grad):
        p, a = ctx.saved_tensors
        grad_p = dot(a, grad, *ctx.geometry) if ctx.needs_input_grad[0] else None
        grad_a = weighted_sum(p, grad, *ctx.geometry) if ctx.needs_input_grad[1] else None
        return grad_p, grad_a, None, None

    dot.register_autograd(dot_backward, setup_context=setup)
    weighted_sum.register_autograd(weighted_sum_backward, setup_context=setup)
    scatter.register_autograd(scatter_backward, setup_context=setup)


def fused_gradients(
    na2d_qk,
    na2d_av,
    grad_out: Tensor,
    inputs: tuple,
    needs: tuple,
    kernel: tuple,
    dilation: tuple,
    scale: float,
    create_graph: bool = True,
) -> list[Tensor | None]:
    """The fused op's backward through a backend's unfused ops, by default one that must itself be
    differentiable (``create_graph=True``).

    Recomputes ``softmax(scale * q.k + rpb) v`` for tokens-first (B, H, W, heads, D) ``inputs`` =
    (q, k, v, rpb) through the unfused ops (made of the primitives above) and returns the gradients
    of those of the inputs that ``needs`` names; with ``create_graph``, tensors autograd can
    differentiate again. Call it with grad mode enabled.
    """
    q, k, v, rpb = inputs
    heads_first = [t.permute(0, 3, 1, 2, 4) for t in (q, k, v)]
    attn = na2d_qk(heads_first[0] * scale, heads_first[1], kernel, dilation, rpb).softmax(-1)
    out = na2d_av(attn, heads_first[2], kernel, dilation).permute(0, 2, 3, 1, 4)
    wanted = [t for t, needed in zip(inputs, needs) if needed and t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=create_graph))
    return [next(grads) if needed and t is not None else None for t, needed in zip(inputs, needs)]
