"""The public neighborhood-attention API, mirroring NATTEN 0.14-0.17 (SPEC section 1).

Every entry point validates its arguments once, normalises ``kernel_size`` / ``dilation`` to
(h, w) pairs, and dispatches to a backend:

* ``"cpu"``: vectorised C kernels (:mod:`dinat.ops.cpu`), the default for CPU tensors;
* ``"triton"``: hand-written Triton kernels (:mod:`dinat.ops.triton_na`), the default for CUDA
  tensors;
* ``"flex"``: PyTorch ``flex_attention`` (:mod:`dinat.ops.flex`), for CUDA tensors when Triton is
  missing or on request (it also runs on the CPU, where the tests check it);
* ``"reference"``: the definition in plain PyTorch (:mod:`dinat.ops.reference`), the fallback.

``use_backend(name)`` forces one (tests and benchmarks compare them).

Outputs are in the inputs' dtype (q's, or v's for ``na2d_av``), under autocast too, as NATTEN's:
a backend's matmuls may run in the autocast dtype, its result is cast back.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from . import reference

Pair = tuple[int, int]
IntOrPair = int | tuple[int, int] | list[int]
BackendName = Literal["auto", "cpu", "flex", "triton", "reference"]
BACKENDS = ("auto", "cpu", "flex", "triton", "reference")

_state = threading.local()


@contextlib.contextmanager
def use_backend(name: BackendName) -> Iterator[None]:
    """Run the ops in this block (this thread) on backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", "auto")
    _state.backend = name
    try:
        yield
    finally:
        _state.backend = previous


def requested_backend() -> BackendName:
    """The backend ``use_backend`` asks for in this thread ('auto' outside any)."""
    return getattr(_state, "backend", "auto")


def _backend_for(x: Tensor):
    name = requested_backend()
    if name == "reference":
        return reference
    if name == "triton" or (name == "auto" and x.device.type == "cuda"):
        from . import triton_na

        if triton_na.available(x):
            return triton_na
        if name == "triton":
            raise RuntimeError(f"the triton backend is unavailable: {triton_na.unavailable_reason(x)}")
    if name in ("auto", "cpu") and x.device.type == "cpu":
        from . import cpu

        if cpu.available(x):
            return cpu
        if name == "cpu":
            raise RuntimeError(f"the cpu backend is unavailable: {cpu.unavailable_reason(x)}")
    if name == "flex" or (name == "auto" and x.device.type == "cuda"):
        from . import flex

        if flex.available(x):
            return flex
        if name == "flex":
            raise RuntimeError(f"the flex backend is unavailable: {flex.unavailable_reason(x)}")
    if name == "cpu":
        raise RuntimeError(f"the cpu backend needs CPU tensors, got device {x.device}")
    return reference


def is_exporting() -> bool:
    """Whether torch.export is tracing (``torch.compiler.is_exporting``: torch >= 2.6; before, never)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting and exporting())


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_pair(value: IntOrPair, name: str) -> Pair:
    """An int or a 2-sequence of ints as an (h, w) pair; anything else is a ValueError."""
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")


def check_kernel_and_dilation(kernel_size: IntOrPair, dilation: IntOrPair) -> tuple[Pair, Pair]:
    kernel = as_pair(kernel_size, "kernel_size")
    dil = as_pair(dilation, "dilation")
    if any(k < 3 or k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel_size must be odd and >= 3 on each axis, got {kernel_size!r}")
    if any(d < 1 for d in dil):
        raise ValueError(f"dilation must be >= 1 on each axis, got {dilation!r}")
    return kernel, dil


def _check_tensor(name: str, x: Tensor, rank: int = 5) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same(
    name: str, x: Tensor, ref_name: str, ref: Tensor, shape: tuple[int, ...], also_dtype: torch.dtype | None = None
) -> None:
    """x has ``shape``, ref's device, and ref's dtype (or ``also_dtype``)."""
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} to match {ref_name}, got {tuple(x.shape)}")
    if x.dtype not in (ref.dtype, also_dtype):
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_extent(height: int, width: int, kernel: Pair, dil: Pair) -> None:
    for axis, length, k, d in (("height", height, kernel[0], dil[0]), ("width", width, kernel[1], dil[1])):
        if length < k * d:
            raise ValueError(
                f"input {axis} {length} is smaller than kernel_size * dilation = {k} * {d} = {k * d}; "
                "pad the input (NeighborhoodAttention2D does) or use a smaller kernel or dilation"
            )


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_rpb(rpb: Tensor | None, heads: int, kernel: Pair, ref: Tensor) -> None:
    """rpb must match q, except that a float32 table may go with float16/bfloat16 q (autocast)."""
    if rpb is None:
        return
    expected = (heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1)
    _check_tensor("rpb", rpb, rank=3)
    _check_same("rpb", rpb, "q", ref, expected, also_dtype=torch.float32 if ref.dtype in _LOW_PRECISION else None)


def na2d_qk(q: Tensor, k: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1, rpb: Tensor | None = None) -> Tensor:
    """Logits of every query against its neighborhood, heads-first.

    q, k: (B, heads, H, W, D); rpb: (heads, 2*kh-1, 2*kw-1) or None. Returns (B, heads, H, W, kh*kw),
    neighbors in row-major order. The caller scales q beforehand.
    """
    kernel, dil = check_kernel_and_dilation(kernel_size, dilation)
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_same("k", k, "q", q, tuple(q.shape))
    _check_extent(q.shape[2], q.shape[3], kernel, dil)
    _check_rpb(rpb, q.shape[1], kernel, q)
    return _backend_for(q).na2d_qk(q, k, kernel, dil, rpb).to(q.dtype)  # autocast: see the module doc


def na2d_av(attn: Tensor, v: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1) -> Tensor:
    """Weighted sum of each query's neighborhood of v, heads-first.

    attn: (B, heads, H, W, kh*kw), in v's dtype or float32; v: (B, heads, H, W, D). Returns
    (B, heads, H, W, D) in v's dtype.
    """
    kernel, dil = check_kernel_and_dilation(kernel_size, dilation)
    _check_tensor("attn", attn)
    _check_tensor("v", v)
    # float32 weights may go with float16/bfloat16 v (softmax runs in float32 under autocast)
    also = torch.float32 if v.dtype in _LOW_PRECISION else None
    _check_same("attn", attn, "v", v, tuple(v.shape[:4]) + (kernel[0] * kernel[1],), also_dtype=also)
    _check_extent(v.shape[2], v.shape[3], kernel, dil)
    return _backend_for(v).na2d_av(attn, v, kernel, dil).to(v.dtype)


def _fused_args(
    q: Tensor, kernel_size: IntOrPair, dilation: IntOrPair, rpb: Tensor | None, scale: float | None
) -> tuple[Pair, Pair, float]:
    """Checks of the fused ops' arguments besides k and v (q: (B, H, W, heads, D)): the kernel
    and dilation pairs, and the scale (default D ** -0.5)."""
    kernel, dil = check_kernel_and_dilation(kernel_size, dilation)
    _check_extent(q.shape[1], q.shape[2], kernel, dil)
    _check_rpb(rpb, q.shape[3], kernel, q)
    if scale is None:
        if q.shape[-1] == 0:
            raise ValueError(f"q has head dim 0 (shape {tuple(q.shape)}): there is no default scale D ** -0.5")
        return kernel, dil, q.shape[-1] ** -0.5
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):  # numbers.Real: numpy scalars too
        raise ValueError(f"scale must be a float or None, got {scale!r}")
    return kernel, dil, float(scale)


def na2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    rpb: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Fused neighborhood attention, tokens-first: softmax(scale * q.k + rpb) v.

    q, k, v: (B, H, W, heads, D); rpb: (heads, 2*kh-1, 2*kw-1) or None; scale defaults to
    D ** -0.5. Returns (B, H, W, heads, D).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    _check_same("k", k, "q", q, tuple(q.shape))
    _check_same("v", v, "q", q, tuple(q.shape))
    kernel, dil, scale = _fused_args(q, kernel_size, dilation, rpb, scale)
    return _backend_for(q).na2d(q, k, v, kernel, dil, rpb, scale).to(q.dtype)


def na2d_qkvpacked(
    qkv: Tensor,
    kernel_size: IntOrPair,
    dilation: IntOrPair = 1,
    rpb: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """:func:`na2d` on q, k, v packed in one (B, H, W, 3, heads, D) tensor, as a qkv projection
    makes them: ``na2d(*qkv.unbind(3), ...)``, whose backward writes the gradient of qkv in one
    buffer where the backend can (Triton) instead of stacking three. Returns (B, H, W, heads, D).
    """
    _check_tensor("qkv", qkv, rank=6)
    if qkv.shape[3] != 3:
        raise ValueError(f"qkv must have shape (B, H, W, 3, heads, D), got {tuple(qkv.shape)}")
    q = qkv.select(3, 0)
    kernel, dil, scale = _fused_args(q, kernel_size, dilation, rpb, scale)
    backend = _backend_for(qkv)
    if hasattr(backend, "na2d_qkvpacked"):
        return backend.na2d_qkvpacked(qkv, kernel, dil, rpb, scale).to(qkv.dtype)
    return backend.na2d(*qkv.unbind(3), kernel, dil, rpb, scale).to(qkv.dtype)


def current_backend(x: Tensor) -> str:
    """The backend the ops would use for ``x`` now: 'cpu', 'flex', 'triton' or 'reference'."""
    module = _backend_for(x).__name__.rsplit(".", 1)[-1]
    return "triton" if module == "triton_na" else module


__all__ = [
    "na2d",
    "na2d_qkvpacked",
    "na2d_av",
    "na2d_qk",
    "use_backend",
    "requested_backend",
    "current_backend",
    "as_pair",
    "BACKENDS",
]
