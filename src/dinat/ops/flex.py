"""Neighborhood attention on PyTorch's ``flex_attention`` (SPEC section 1).

The fused op :func:`na2d` flattens the H x W token grid into one sequence and runs
:func:`torch.nn.attention.flex_attention.flex_attention` on it with

* a block mask whose ``mask_mod`` admits exactly each query's clamped, dilated neighborhood, and
* a ``score_mod`` that adds the relative positional bias ``rpb[h, dy + kh - 1, dx + kw - 1]`` (the
  key's offset from the query in dilated units), so flex differentiates the bias like any other
  captured tensor.

Both read one small integer table per token (:class:`_Plan`), built from
:func:`dinat.ops.reference.axis_neighborhood`, so the neighborhood is defined in one place only.
The kernel size and dilation live in that table, not in the traced code: a new kernel size or
dilation on an already seen token grid does not recompile. With dilation, tokens are reordered so
that each dilation group (row mod dh, column mod dw) is contiguous; the mask is then block-sparse
instead of spread over the whole sequence. Plans (tables, permutation and block mask) are cached
per (H, W, kernel, dilation, device).

Devices:

* CUDA: flex's Triton kernels, forward and backward (q, k, v and rpb).
* CPU: flex compiles for CPU through inductor, **inference only** (PyTorch 2.14 has no CPU flex
  backward and no CPU log-sum-exp). When a gradient is needed the forward still runs on flex and
  the backward recomputes the op with the reference implementation (exact, but not fast; and
  differentiable again under ``create_graph=True``): this is what lets the golden tests check the
  flex forward on every CPU run.

The unfused :func:`na2d_qk` / :func:`na2d_av` delegate to the reference implementation on every
device: flex_attention never materialises the logits, so it cannot return them.

Every call outside ``torch.compile`` goes through one ``torch.compile(..., dynamic=False)`` wrapper
(dynamic shapes miscompile flex on CPU in 2.14); inside a user's ``torch.compile`` the wrapper is
bypassed and flex is traced into the caller's graph.
"""

from __future__ import annotations

import functools
import operator
import os
import shutil
import sys
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import grouped, primitives, reference

Pair = tuple[int, int]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (query, key) sparse block sizes. On CPU they are also the kernel's tile sizes; measured at 56x56
# and 28x28, k7, dilation 1 to 4: (16, 16) does ~30% less work than (64, 64) and ~45% less than
# flex's default (128, 128), which is kept on CUDA, where the Triton kernels are tuned for it.
_CPU_BLOCK = (16, 16)
_CUDA_BLOCK = (128, 128)
_RECOMPILE_LIMIT = 64  # distinct shapes one process may compile for (dynamo's default is 8)


# --------------------------------------------------------------------------------------------
# availability


def _import_problem() -> str:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as error:  # torch < 2.5
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({error})"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile (dynamo) is not supported on Python {sys.version.split()[0]}"
    return ""


def _cpu_problem() -> str:
    if sys.platform == "darwin":
        return "flex_attention has no CPU kernel on macOS"
    if os.getenv("ATEN_CPU_CAPABILITY") == "default" or not torch.cpu._is_avx2_supported():
        return "flex_attention's CPU kernel needs AVX2 (and ATEN_CPU_CAPABILITY != 'default')"
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - any failure means inductor cannot build kernels
        return f"inductor found no C++ compiler to build the CPU kernel ({error})"
    if not (os.path.isfile(compiler) or shutil.which(compiler)):
        return f"inductor's C++ compiler {compiler!r} is not installed"
    return ""


# Environment checks, done once at import so that availability is a constant inside a trace.
_IMPORT_PROBLEM = _import_problem()
_CPU_PROBLEM = _cpu_problem()


@functools.cache
def _has_triton() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()


def _device_problem(x: Tensor | None) -> str:
    if _IMPORT_PROBLEM:
        return _IMPORT_PROBLEM
    if x is None:
        if torch.cuda.is_available() or not _CPU_PROBLEM:
            return ""
        return f"no CUDA device, and on CPU: {_CPU_PROBLEM}"
    if x.dtype not in _DTYPES:
        return f"flex_attention supports float32, float16 and bfloat16, got {x.dtype}"
    if x.device.type == "cuda":
        # (inside a torch.compile trace on CUDA, Triton is there: inductor is using it)
        if torch.compiler.is_compiling() or _has_triton():
            return ""
        return "flex_attention on CUDA needs Triton, which is not installed"
    if x.device.type == "cpu":
        return _CPU_PROBLEM
    return f"the flex backend runs on CPU and CUDA, got device {x.device}"


def available(x: Tensor | None = None) -> bool:
    """Whether :func:`na2d` can run on flex for tensors like ``x`` (any supported device if None)."""
    return not _device_problem(x)


def unavailable_reason(x: Tensor | None = None) -> str:
    """Why :func:`available` is False for ``x`` (empty when it is True)."""
    return _device_problem(x)


# --------------------------------------------------------------------------------------------
# plans: per-token tables and block masks

# Rows of _Plan.table, one column per token in flex order. Positions along an axis are encoded as
# group * stride + place (stride > places + kernel), so one range test per axis checks both
# "same dilation group" and "place within the query's window".
_KV_ROW, _KV_COL, _Q_ROW_START, _Q_ROW_END, _Q_COL_START, _Q_COL_END, _KV_BIAS, _Q_BIAS = range(8)


class _Plan(NamedTuple):
    table: Tensor  # (8, L) int32, see the rows above
    perm: Tensor | None  # (L,) token (row-major) index at each flex position; None: identity
    inverse: Tensor | None  # (L,) flex position of each token
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


def _mask_mod(table: Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        row, col = table[_KV_ROW, kv_idx], table[_KV_COL, kv_idx]
        in_rows = (row >= table[_Q_ROW_START, q_idx]) & (row < table[_Q_ROW_END, q_idx])
        in_cols = (col >= table[_Q_COL_START, q_idx]) & (col < table[_Q_COL_END, q_idx])
        return in_rows & in_cols

    return mask_mod


def _axis_table(length: int, kernel: int, dilation: int) -> dict[str, Tensor]:
    """Per position of one axis: its group, encoded place, window start/end, bias offset."""
    keys, bias_index = reference.axis_neighborhood(length, kernel, dilation)
    pos = torch.arange(length)
    group, place = pos % dilation, pos // dilation
    start = keys[:, 0] // dilation  # place of the first key (the window is k consecutive places)
    code = group * (length + kernel)  # separates groups: |place difference| < length
    return {
        "group": group,
        "key": code + place,
        "start": code + start,
        "end": code + start + kernel,
        # rpb row of a key = key_place - query_place + kernel - 1 = bias_index[:, 0] - start + key_place
        "bias": bias_index[:, 0] - start,
        "place": place,
    }


def _block_size(device: torch.device) -> Pair:
    return _CPU_BLOCK if device.type == "cpu" else _CUDA_BLOCK


def _build_plan(
    height: int, width: int, kernel: Pair, dil: Pair, device: torch.device, block: Pair | None = None
) -> _Plan:
    """The plan for ``device``, with its sparse block size unless ``block`` is given (tests)."""
    from torch.nn.attention.flex_attention import BlockMask

    rows = _axis_table(height, kernel[0], dil[0])
    cols = _axis_table(width, kernel[1], dil[1])
    r = torch.arange(height).repeat_interleave(width)
    c = torch.arange(width).repeat(height)
    bias_cols = 2 * kernel[1] - 1  # rpb is read flattened: rpb.flatten(1)[h, row * bias_cols + col]
    table = torch.stack(
        [
            rows["key"][r],
            cols["key"][c],
            rows["start"][r],
            rows["end"][r],
            cols["start"][c],
            cols["end"][c],
            rows["place"][r] * bias_cols + cols["place"][c],
            rows["bias"][r] * bias_cols + cols["bias"][c],
        ]
    )
    length = height * width
    perm = inverse = None
    if dil != (1, 1):
        # Each dilation group contiguous, row-major inside it: the mask becomes block-sparse.
        group = rows["group"][r] * dil[1] + cols["group"][c]
        perm = torch.argsort(group * length + torch.arange(length), stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(length)
        table = table[:, perm]
        perm, inverse = perm.to(device), inverse.to(device)
    table = table.to(device=device, dtype=torch.int32).contiguous()

    # The block mask, evaluated with the very mask_mod flex will use, one query block at a time
    # (create_block_mask would materialise the whole L x L mask at once).
    mask_mod = _mask_mod(table)
    q_block, kv_block = block or _block_size(device)
    q_blocks, kv_blocks = -(-length // q_block), -(-length // kv_block)
    kv = torch.arange(kv_blocks * kv_block, device=device)
    kv_valid = kv < length
    kv = kv.clamp(max=length - 1)
    partial = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    for qb in range(q_blocks):
        q = torch.arange(qb * q_block, (qb + 1) * q_block, device=device)
        q_valid = q < length
        dense = mask_mod(None, None, q.clamp(max=length - 1)[:, None], kv[None, :])
        dense = dense & q_valid[:, None] & kv_valid[None, :]
        count = dense.view(q_block, kv_blocks, kv_block).sum(dim=(0, 2))
        full[qb] = count == q_block * kv_block
        partial[qb] = (count > 0) & ~full[qb]

    def ordered(dense_blocks: Tensor) -> tuple[Tensor, Tensor]:
        dense_blocks = dense_blocks.to(torch.int32)
        indices = torch.argsort(dense_blocks, dim=-1, descending=True, stable=True)
        return dense_blocks.sum(-1).int()[None, None], indices.int()[None, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )
    return _Plan(table, perm, inverse, block_mask)


class _Plans:
    """The plans built so far, as attributes named after their geometry (:func:`_name`), oldest
    first. A torch.compile trace reads an attribute when it uses it, where it snapshots a dict at
    its first read: a plan built later in the same trace (a model's second geometry) was missing."""


_plans = _Plans()
_MAX_PLANS = 32  # map geometries kept (each holds an index table and a block mask on its device)


def _name(height: int, width: int, kernel: Pair, dil: Pair, device: torch.device) -> str:
    return f"h{height}_w{width}_k{kernel[0]}x{kernel[1]}_d{dil[0]}x{dil[1]}_{device.type}{device.index}"


def _plan(height: int, width: int, kernel: Pair, dil: Pair, device: torch.device) -> _Plan:
    cache, name = vars(_plans), _name(height, width, kernel, dil, device)
    plan = cache.get(name)
    if plan is None:  # two threads may both build it: harmless, the second result wins
        plan = cache[name] = _build_plan(height, width, kernel, dil, device)
        while len(cache) > _MAX_PLANS:  # the oldest goes (many input sizes: detection, segmentation)
            del cache[next(iter(cache))]
    return plan


@torch._dynamo.assume_constant_result
def _build_at_trace_time(height: int, width: int, kernel: Pair, dil: Pair, device: torch.device) -> int:
    """Under torch.compile this runs while tracing (not in the graph): it puts the plan in the cache."""
    _plan(height, width, kernel, dil, device)
    return 0


def _traced_plan(height: int, width: int, kernel: Pair, dil: Pair, device: torch.device) -> _Plan:
    """The plan inside a torch.compile trace: read from the cache, which dynamo guards and lifts.
    Dynamic sizes (a map's, or a kernel or dilation passed as an argument) are specialised: a plan
    is built for each value, behind a guard on it (``int()`` keeps a SymInt symbolic here)."""
    height, width = operator.index(height), operator.index(width)
    kernel = (operator.index(kernel[0]), operator.index(kernel[1]))
    dil = (operator.index(dil[0]), operator.index(dil[1]))
    _build_at_trace_time(height, width, kernel, dil, device)
    return getattr(_plans, _name(height, width, kernel, dil, device))


# --------------------------------------------------------------------------------------------
# the fused op


def _attend(q: Tensor, k: Tensor, v: Tensor, table: Tensor, block_mask, rpb: Tensor | None, scale: float):
    """flex_attention on (B, heads, L, D) sequences in flex order, bias read through ``table``."""
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if rpb is not None:
        bias = rpb.flatten(1)  # (heads, (2kh-1) * (2kw-1)), a view: gradients reach rpb
        last = bias.shape[1] - 1

        def score_mod(score, b, h, q_idx, kv_idx):
            # Clamped so that masked-out pairs (scored, then discarded) never index out of bounds.
            index = (table[_KV_BIAS, kv_idx] + table[_Q_BIAS, q_idx]).clamp(0, last)
            return score + bias[h, index]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


_compiled_attend = torch.compile(_attend, dynamic=False, fullgraph=True)


def _run_attend(*args):
    if torch.compiler.is_compiling():
        return _attend(*args)  # traced into the caller's graph
    limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _compiled_attend(*args)


def _forward(q: Tensor, k: Tensor, v: Tensor, kernel: Pair, dil: Pair, rpb: Tensor | None, scale: float) -> Tensor:
    batch, height, width, heads, dim = q.shape
    if torch.compiler.is_compiling() and q.device.type == "cpu":
        # inductor's CPU flex template miscompiles symbolic sizes (torch 2.14): specialise them all
        batch, height, width, heads, dim = [operator.index(size) for size in q.shape]
    plan = (_traced_plan if torch.compiler.is_compiling() else _plan)(height, width, kernel, dil, q.device)

    def to_flex(x: Tensor) -> Tensor:  # (B, H, W, heads, D) -> (B, heads, L, D) in flex order
        x = x.reshape(batch, height * width, heads, dim)
        if plan.perm is not None:
            x = x.index_select(1, plan.perm)
        x = x.transpose(1, 2)
        # inductor's CPU lowering of flex_attention inside a caller's graph takes no views
        return x.contiguous() if torch.compiler.is_compiling() else x

    out = _run_attend(to_flex(q), to_flex(k), to_flex(v), plan.table, plan.block_mask, rpb, scale)
    out = out.transpose(1, 2)
    if plan.inverse is not None:
        out = out.index_select(1, plan.inverse)
    return out.reshape(batch, height, width, heads, dim)


class _CpuNA2D(torch.autograd.Function):
    """CPU flex forward; the backward recomputes the op with the reference (no CPU flex backward)."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel, dil, scale):
        ctx.save_for_backward(q, k, v, rpb)
        ctx.args = (kernel, dil, scale)
        # flex refuses CPU inputs that require grad, even under no_grad: hand it detached ones.
        q, k, v = q.detach(), k.detach(), v.detach()
        return _forward(q, k, v, kernel, dil, None if rpb is None else rpb.detach(), scale)

    @staticmethod
    def backward(ctx, grad_out):
        kernel, dil, scale = ctx.args
        create_graph = torch.is_grad_enabled()  # the caller asked for a differentiable backward
        with torch.enable_grad():
            grads = primitives.fused_gradients(
                reference.na2d_qk,
                reference.na2d_av,
                grad_out,
                ctx.saved_tensors,
                ctx.needs_input_grad[:4],
                kernel,
                dil,
                scale,
                create_graph=create_graph,
            )
        return (*grads, None, None, None)


def check_deterministic(device_type: str, rpb_needs_grad: bool) -> None:
    """Under ``torch.use_deterministic_algorithms``, refuse (or with ``warn_only`` warn about) an rpb
    gradient on CUDA: flex_attention's backward adds it up with atomic adds, in no fixed order."""
    if device_type != "cuda" or not rpb_needs_grad or not torch.are_deterministic_algorithms_enabled():
        return
    message = "flex_attention's rpb gradient is not deterministic (atomic adds): use the triton backend"
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=3)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel: Pair, dil: Pair, rpb: Tensor | None, scale: float) -> Tensor:
    """Fused neighborhood attention, tokens-first (B, H, W, heads, D), on flex_attention (maps whose
    dilation groups are single windows: batched attention, :mod:`dinat.ops.grouped`)."""
    if grouped.is_whole(q.shape[1], q.shape[2], kernel, dil):
        return grouped.attention(q, k, v, kernel, dil, rpb, scale)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, rpb))
    check_deterministic(q.device.type, needs_grad and rpb is not None and rpb.requires_grad)
    if q.device.type == "cpu":
        if needs_grad:
            return _CpuNA2D.apply(q, k, v, rpb, kernel, dil, scale)
        # flex refuses CPU inputs that require grad even under no_grad; nothing is recorded here anyway
        q, k, v = q.detach(), k.detach(), v.detach()
        rpb = None if rpb is None else rpb.detach()
    return _forward(q, k, v, kernel, dil, rpb, scale)


def na2d_qk(q: Tensor, k: Tensor, kernel: Pair, dil: Pair, rpb: Tensor | None) -> Tensor:
    """Logits, heads-first. flex_attention cannot return logits: this is the reference op."""
    return reference.na2d_qk(q, k, kernel, dil, rpb)


def na2d_av(attn: Tensor, v: Tensor, kernel: Pair, dil: Pair) -> Tensor:
    """Weighted sum, heads-first. flex_attention takes no attention weights: the reference op."""
    return reference.na2d_av(attn, v, kernel, dil)


__all__ = ["available", "unavailable_reason", "na2d", "na2d_qk", "na2d_av"]
