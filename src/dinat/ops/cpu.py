"""The CPU backend: vectorised C kernels (``csrc/na_cpu.c``) behind ``torch.library`` custom ops.

The kernels work on channel-major layouts (features (N, C, H, W), weights (N, H, kh*kw, W)), so
this module permutes in and out once per call. The unfused ops use three primitives that are closed
under differentiation (the gradient of each is made of the other two: double backward works too);
the fused ``na2d`` is one op (logits, rpb, softmax, weighted sum) whose backward has its own fused
softmax-gradient kernel. ``torch.compile`` sees opaque custom ops with fake implementations (no
graph breaks). When H == kh*dh and W == kw*dw every dilation group is one whole window, and the
fused op runs as batched matmuls instead. float32 and float64 run natively; other dtypes (bfloat16 under
autocast) are computed in float32 and cast back.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import warnings

import torch
from torch import Tensor

from . import grouped, primitives
from .reference import axis_neighborhood, relative_position_bias

Pair = tuple[int, int]
_NATIVE = {torch.float32: "f32", torch.float64: "f64"}
_SLACK = 16  # elements every kernel operand is followed by: the kernels read whole vectors
_TOKENS_FIRST = (0, 3, 4, 1, 2)  # (B, H, W, heads, D) -> (B, heads, D, H, W)


_PORTABLE = "dinat.ops._na_cpu"  # runs on any CPU of the architecture
_X86_64_V3 = "dinat.ops._na_cpu_x86_64_v3"  # AVX2 and FMA: 3-5x faster, loaded where the CPU runs it


def _built(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None else None


def _load_build(portable: str) -> ctypes.CDLL:
    """The fastest build this CPU runs (setup.py), ``portable`` asked which; raises OSError when none loads."""
    lib = ctypes.CDLL(portable)
    fast = _built(_X86_64_V3)
    if fast is not None and lib.na_cpu_runs_x86_64_v3():
        lib = ctypes.CDLL(fast)
    return lib


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernels, or the reason they cannot be loaded."""
    override = os.environ.get("DINAT_CPU_KERNELS")  # another build, e.g. the tests' AddressSanitizer one
    portable = _built(_PORTABLE)
    if override is None and portable is None:
        return "the C kernels were not built at install time (reinstall with a C compiler present)"
    try:
        lib = _load_build(portable) if override is None else ctypes.CDLL(override)
    except OSError as err:
        if override is not None:  # asked for explicitly: say so rather than fall back silently
            reason = f"DINAT_CPU_KERNELS={override!r} cannot be loaded ({err}); CPU ops use the reference"
            warnings.warn(reason, stacklevel=2)
        return f"the C kernels failed to load: {err}"
    argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    for name in ("na_dot", "na_weighted_sum", "na_scatter"):
        for suffix in _NATIVE.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = None
    for suffix in _NATIVE.values():
        fn = getattr(lib, f"na_attend_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_double] + [ctypes.c_void_p] * 3 + argtypes[3:]
        fn.restype = None
        fn = getattr(lib, f"na_attend_backward_{suffix}")
        fn.argtypes = [ctypes.c_void_p] + argtypes
        fn.restype = None
        fn = getattr(lib, f"na_to_channel_major_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_int]
        fn.restype = None
    lib.na_read_slack.restype = ctypes.c_int64
    if lib.na_read_slack() > _SLACK:
        return f"the C kernels read {lib.na_read_slack()} elements past their operands, more than {_SLACK}"
    return lib


@torch.compiler.assume_constant_result
def _loaded() -> bool:
    return not isinstance(_library(), str)


def available(x: Tensor | None = None) -> bool:
    return _loaded() and (x is None or x.device.type == "cpu")


def loaded_build() -> str:
    """File name of the kernels' build in use (see setup.py), or why none is."""
    lib = _library()
    return lib if isinstance(lib, str) else os.path.basename(lib._name)


def unavailable_reason(x: Tensor | None = None) -> str:
    lib = _library()
    if isinstance(lib, str):
        return lib
    return f"tensors are on {x.device}, not the CPU" if x is not None else ""


@functools.lru_cache(maxsize=256)
def _geometry(height: int, width: int, kernel: Pair, dilation: Pair) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query row and column: the first key's position and the rpb index of that first key."""
    rows, row_bias = axis_neighborhood(height, kernel[0], dilation[0])
    cols, col_bias = axis_neighborhood(width, kernel[1], dilation[1])
    return tuple(t[:, 0].contiguous() for t in (rows, cols, row_bias, col_bias))


def _launch(name: str, operands: tuple, out: Tensor, features: Tensor, kernel, dilation) -> None:
    """Run kernel ``name`` on ``operands`` (tensors or raw arguments); ``features`` is the
    (N, C, H, W) operand that sets the geometry."""
    _, channels, height, width = features.shape
    rowstart, colstart, _, _ = _geometry(height, width, tuple(kernel), tuple(dilation))
    fn = getattr(_library(), f"{name}_{_NATIVE[out.dtype]}")
    # Below ~100k multiply-adds a thread team costs more than it saves.
    threads = torch.get_num_threads() if out.numel() * channels >= 100_000 else 1
    fn(
        *(x.data_ptr() if isinstance(x, Tensor) else x for x in operands), out.data_ptr(),
        out.shape[0], channels, height, width,
        kernel[0], kernel[1], dilation[0], dilation[1],
        rowstart.data_ptr(), colstart.data_ptr(), threads,
    )  # fmt: skip


def _with_slack(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A contiguous view of a buffer that goes on for the slack the kernels may read past its end."""
    numel = math.prod(shape)
    return torch.empty(numel + _SLACK, dtype=dtype)[:numel].view(shape)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``_with_slack`` as a tensor that owns the storage, for the custom ops' outputs: they are the
    users' tensors, and autograd forbids in-place changes (``out += x``) to a view made inside a
    custom op. Eager only (torch.compile traces no ``set_``)."""
    return torch.empty(0, dtype=dtype).set_(_with_slack(shape, dtype).untyped_storage(), 0, shape)


def _operand(x: Tensor) -> Tensor:
    """x as a contiguous kernel operand with readable slack after it (copied only if needed)."""
    if x.is_contiguous():
        readable = x.untyped_storage().nbytes() // x.element_size() - x.storage_offset()
        if readable - x.numel() >= _SLACK:
            return x
    out = _with_slack(tuple(x.shape), x.dtype)
    out.copy_(x)
    return out


# -- the three primitives ---------------------------------------------------------------------


@primitives.custom_op("na_dot")
def na_dot(a: Tensor, b: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, C, H, W) x (N, C, H, W) -> (N, H, kh*kw, W): a . b over each query's neighbors."""
    a, b = _operand(a), _operand(b)
    n, _, h, w = a.shape
    out = _empty((n, h, kernel[0] * kernel[1], w), a.dtype)
    _launch("na_dot", (a, b), out, a, kernel, dilation)
    return out


@primitives.custom_op("na_weighted_sum")
def na_weighted_sum(p: Tensor, b: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, H, kh*kw, W) x (N, C, H, W) -> (N, C, H, W): sum of neighbors of b weighted by p."""
    p, b = _operand(p), _operand(b)
    out = _empty(tuple(b.shape), b.dtype)
    _launch("na_weighted_sum", (p, b), out, b, kernel, dilation)
    return out


@primitives.custom_op("na_scatter")
def na_scatter(p: Tensor, a: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, H, kh*kw, W) x (N, C, H, W) -> (N, C, H, W): each key gathers p * a from its queries."""
    p, a = _operand(p), _operand(a)
    out = _empty(tuple(a.shape), a.dtype)
    _launch("na_scatter", (p, a), out, a, kernel, dilation)
    return out


@primitives.custom_op("na2d_fused")
def na2d_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    heads: int,
    scale: float,
    kernel: list[int],
    dilation: list[int],
) -> tuple[Tensor, Tensor]:
    """Fused attention on features (N, C, H, W): softmax(scale * q.k + rpb[n % heads]) v.

    Returns the output (N, C, H, W) and the attention (N, H, kh*kw, W), kept for the backward.
    """
    q, k, v = _operand(q), _operand(k), _operand(v)
    n, _, h, w = q.shape
    _, _, rowoff, coloff = _geometry(h, w, tuple(kernel), tuple(dilation))
    attn = _empty((n, h, kernel[0] * kernel[1], w), q.dtype)
    bias = 0 if rpb is None else _operand(rpb.to(q.dtype))
    _launch("na_attend", (q, k, bias, heads, scale, rowoff, coloff), attn, q, kernel, dilation)
    out = _empty(tuple(v.shape), v.dtype)
    _launch("na_weighted_sum", (attn, v), out, v, kernel, dilation)
    return out, attn


@na2d_fused.register_fake
def _(q, k, v, rpb, heads, scale, kernel, dilation):
    n, _, h, w = q.shape
    return v.new_empty(v.shape), q.new_empty(n, h, kernel[0] * kernel[1], w)  # contiguous, as the kernels write


@functools.lru_cache(maxsize=64)
def _bias_bins(heads: int, height: int, width: int, kernel: Pair, dilation: Pair) -> Tensor:
    """Flat rpb index of every logit in the weights layout, (heads * H * kh*kw * W,)."""
    _, rows = axis_neighborhood(height, kernel[0], dilation[0])
    _, cols = axis_neighborhood(width, kernel[1], dilation[1])
    table_w = 2 * kernel[1] - 1
    table = (2 * kernel[0] - 1) * table_w
    within = rows[:, :, None, None] * table_w + cols.T[None, None, :, :]  # (H, kh, kw, W)
    bins = torch.arange(heads)[:, None, None, None] * table + within.reshape(1, height, -1, width)
    return bins.flatten()


@primitives.custom_op("na_bias_grad")
def na_bias_grad(grad_logits: Tensor, heads: int, kernel: list[int], dilation: list[int]) -> Tensor:
    """Gradient of the rpb table (heads, 2kh-1, 2kw-1) from that of the logits (N, H, kh*kw, W)."""
    n, height, _, width = grad_logits.shape
    per_head = grad_logits.reshape(n // heads, heads * math.prod(grad_logits.shape[1:])).sum(0)
    bins = _bias_bins(heads, height, width, tuple(kernel), tuple(dilation))
    table = per_head.new_zeros(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
    return table.view(-1).index_add_(0, bins, per_head).view(table.shape)


@na_bias_grad.register_fake
def _(grad_logits, heads, kernel, dilation):
    return grad_logits.new_empty(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)


def _fused_setup(ctx, inputs, output) -> None:
    q, k, v, rpb, heads, scale, kernel, dilation = inputs
    ctx.save_for_backward(q, k, v, output[1], rpb)
    ctx.args = (heads, scale, kernel, dilation)
    # the attention is kept for the backward, not differentiated: no zero gradient is made for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


@primitives.custom_op("na_softmax_backward")
def na_softmax_backward(grad_out: Tensor, v: Tensor, attn: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """Gradient of the logits of na2d_fused given the output's: attn * (dP - sum(attn * dP)), with
    dP = grad_out . v over each query's neighbors, in one pass."""
    grad_out, v, attn = _operand(grad_out), _operand(v), _operand(attn)
    grad_logits = _empty(tuple(attn.shape), attn.dtype)
    _launch("na_attend_backward", (grad_out, v, attn), grad_logits, grad_out, kernel, dilation)
    return grad_logits


@na_softmax_backward.register_fake
def _(grad_out, v, attn, kernel, dilation):
    return attn.new_empty(attn.shape)


def _fused_backward(ctx, grad_out, _grad_attn):
    if grad_out is None:  # no gradient reached the output (grads are not materialised as zeros)
        return (None,) * 8
    q, k, v, attn, rpb = ctx.saved_tensors
    heads, scale, kernel, dilation = ctx.args
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        return (*_differentiable_fused_backward(ctx, grad_out, q, k, v, rpb), None, None, None, None)
    # the output's gradient is a channel-major view of a tokens-first tensor: one operand for both uses
    tokens_first = grad_out.view(grad_out.shape[0] // heads, heads, *grad_out.shape[1:]).permute(_TOKENS_FIRST)
    transposed = _transposed_operand(tokens_first)
    grad_out = _operand(grad_out) if transposed is None else transposed
    grad_logits = na_softmax_backward(grad_out, v, attn, kernel, dilation)
    needs = ctx.needs_input_grad
    grad_q = na_weighted_sum(grad_logits, k, kernel, dilation) * scale if needs[0] else None
    grad_k = na_scatter(grad_logits, q, kernel, dilation) * scale if needs[1] else None
    grad_v = na_scatter(attn, grad_out, kernel, dilation) if needs[2] else None
    grad_rpb = na_bias_grad(grad_logits, heads, kernel, dilation) if rpb is not None and needs[3] else None
    return grad_q, grad_k, grad_v, grad_rpb, None, None, None, None


def _differentiable_fused_backward(ctx, grad_out, q, k, v, rpb) -> list[Tensor | None]:
    """na2d_fused's gradients through the unfused primitives (channel-major in and out)."""
    heads, scale, kernel, dilation = ctx.args

    def tokens_first(t: Tensor) -> Tensor:  # (B*heads, D, H, W) -> (B, H, W, heads, D), a view
        return t.view(t.shape[0] // heads, heads, *t.shape[1:]).permute(0, 3, 4, 1, 2)

    inputs = (tokens_first(q), tokens_first(k), tokens_first(v), rpb)
    grads = primitives.fused_gradients(
        na2d_qk,
        na2d_av,
        tokens_first(grad_out),
        inputs,
        ctx.needs_input_grad[:4],
        tuple(kernel),
        tuple(dilation),
        scale,
    )
    channel_major = [None if g is None else g.permute(0, 3, 4, 1, 2).reshape(q.shape) for g in grads[:3]]
    return [*channel_major, grads[3]]


na2d_fused.register_autograd(_fused_backward, setup_context=_fused_setup)


@na_dot.register_fake
def _(a, b, kernel, dilation):
    n, _, h, w = a.shape
    return a.new_empty(n, h, kernel[0] * kernel[1], w)


@na_weighted_sum.register_fake
def _(p, b, kernel, dilation):
    return b.new_empty(b.shape)


@na_scatter.register_fake
def _(p, a, kernel, dilation):
    return a.new_empty(a.shape)


primitives.register_gradients(na_dot, na_weighted_sum, na_scatter)


# -- the backend interface (see functional.py) -------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _NATIVE else torch.float32


def _transposed_operand(x: Tensor) -> Tensor | None:
    """Tokens-first (B, H, W, heads, D) x as a (B*heads, D, H, W) kernel operand by the C transpose,
    where its channels are one contiguous run and its positions one stride apart (q, k and v of a
    qkv projection, and their gradients, are); else None."""
    batch, height, width, heads, dim = x.shape
    if x.dtype not in _NATIVE or x.numel() == 0 or torch.compiler.is_compiling():  # compiled: inductor's copy
        return None
    channels_run = (dim == 1 or x.stride(4) == 1) and (heads == 1 or x.stride(3) == dim)
    position_step = x.stride(1) if width == 1 else x.stride(2)
    if not channels_run or (height > 1 and width > 1 and x.stride(1) != width * x.stride(2)):
        return None
    out = _with_slack((batch * heads, dim, height, width), x.dtype)
    threads = torch.get_num_threads() if x.numel() >= 100_000 else 1
    fn = getattr(_library(), f"na_to_channel_major_{_NATIVE[x.dtype]}")
    fn(x.data_ptr(), out.data_ptr(), batch, height * width, heads * dim, x.stride(0), position_step, threads)
    return out


class _ChannelMajor(torch.autograd.Function):
    """x permuted by ``dims`` into a kernel operand (with slack), batch and heads flattened, in the
    kernels' dtype. Its own backward is a view of the gradient (autograd's backward of a copy into
    a slice of the slack buffer zero-fills and copies the whole buffer)."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...]) -> Tensor:
        permuted = x.permute(*dims)
        ctx.dims, ctx.dtype, ctx.shape = dims, x.dtype, permuted.shape
        out = _transposed_operand(x) if dims == _TOKENS_FIRST else None
        if out is None:
            out = _with_slack((permuted.shape[0] * permuted.shape[1], *permuted.shape[2:]), _compute_dtype(x))
            out.view(permuted.shape).copy_(permuted)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        inverse = sorted(range(len(ctx.dims)), key=ctx.dims.__getitem__)
        return grad.reshape(ctx.shape).permute(*inverse).to(ctx.dtype), None


def _channel_major(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    return _ChannelMajor.apply(x, dims)


def _bias(rpb: Tensor, height: int, width: int, kernel: Pair, dilation: Pair) -> Tensor:
    """The rpb term of the logits in the weights layout: (heads, H, kh*kw, W)."""
    return relative_position_bias(rpb, height, width, kernel, dilation).transpose(2, 3)


def na2d_qk(q: Tensor, k: Tensor, kernel: Pair, dilation: Pair, rpb: Tensor | None) -> Tensor:
    batch, heads, height, width, _ = q.shape
    qc, kc = (_channel_major(t, (0, 1, 4, 2, 3)) for t in (q, k))
    logits = na_dot(qc, kc, list(kernel), list(dilation)).view(batch, heads, height, kernel[0] * kernel[1], width)
    if rpb is not None:
        logits = logits + _bias(rpb.to(logits.dtype), height, width, kernel, dilation)
    return logits.transpose(3, 4).to(q.dtype)


def na2d_av(attn: Tensor, v: Tensor, kernel: Pair, dilation: Pair) -> Tensor:
    batch, heads, height, width, dim = v.shape
    weights = _channel_major(attn, (0, 1, 2, 4, 3))
    out = na_weighted_sum(weights, _channel_major(v, (0, 1, 4, 2, 3)), list(kernel), list(dilation))
    return out.view(batch, heads, dim, height, width).permute(0, 1, 3, 4, 2).to(v.dtype)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel: Pair, dilation: Pair, rpb: Tensor | None, scale: float) -> Tensor:
    batch, height, width, heads, dim = q.shape
    if grouped.runs_whole(height, width, kernel, dilation):
        dtype = _compute_dtype(q)  # float16 / bfloat16 in float32, as in the kernels
        q32, k32, v32 = (t.to(dtype) for t in (q, k, v))
        bias = None if rpb is None else rpb.to(dtype)
        return grouped.attention(q32, k32, v32, kernel, dilation, bias, scale).to(q.dtype)
    qc, kc, vc = (_channel_major(t, _TOKENS_FIRST) for t in (q, k, v))
    bias = None if rpb is None else rpb.to(qc.dtype)
    out, _ = na2d_fused(qc, kc, vc, bias, heads, scale, list(kernel), list(dilation))
    return out.view(batch, heads, dim, height, width).permute(0, 3, 4, 1, 2).to(q.dtype)
