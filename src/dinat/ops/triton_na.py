"""The Triton backend: fused neighborhood attention with rpb, forward and backward
(:mod:`dinat.ops.triton_kernels`): ``torch.library`` custom ops under torch.compile (opaque to it,
with fake implementations), and in eager mode an autograd.Function calling the same functions with
less host time per call.

The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` set before Triton is imported they run
on CPU tensors in Triton's interpreter instead (numpy, very slow): that is how the test suite checks
them on machines without a GPU. The dispatcher never picks this backend for CPU tensors itself.

The forward saves the output and its base-2 log-sum-exp, not the attention weights; the backward
recomputes the weights tile by tile, in two kernels: one per query tile (dq and the rpb gradient),
one per key tile (dk and dv). Both are deterministic (no atomics). Maps whose dilation groups are
single windows run on two kernels of their own (one group per tile; see :data:`WHOLE_WINDOW`), or
with ``DINAT_WHOLE_WINDOW=sdpa`` as batched attention (:mod:`dinat.ops.grouped`, SDPA). The unfused
``na2d_qk`` / ``na2d_av`` run on three more kernels, the primitives of :mod:`dinat.ops.primitives`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import grouped, primitives, reference

Pair = tuple[int, int]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
# float32 at head dims over 128 (padded to 256): Triton's default 3 pipeline stages ask the backward
# kernels for 170 KB of shared memory per program, over an A100's 163 KB; 2 stages of 1-row programs
# ask 102656 bytes at tile 16 (ptxas, sm_80 and sm_86; 2 rows: 106624 for the forward), more than
# consumer GPUs (99 KB) have: those use `flex`.
_WIDE_FP32_HEAD_DIM = 128
_WIDE_FP32_STAGES = 2
_WIDE_FP32_SHARED_BYTES = 102656


class TileConfig(NamedTuple):
    """A launch configuration of the fused kernels: ``tile`` query places per program row (forward,
    dq) or key places (dk, dv), ``warps`` per program, ``stages`` of Triton's software pipelining of
    the kernels' loop (over the key rows, or over a key tile's query rows and tiles), ``rows``
    row places per program (each key row loaded once for them all), and a cap on the registers per
    thread (None: the compiler's choice, up to 255), which bounds how many programs an SM holds."""

    tile: int
    warps: int
    stages: int
    rows: int = 1
    max_registers: int | None = None


# Per query and key row a program computes as many logits as the tile's key span (32 at tile 16 with
# kw=7, 16 at tile 8): the kernels are latency-bound (their products are tiny; tile 32 was 1.3-2.6x
# slower than 16 for every kernel on an H100), so the logits they compute and then mask count. A
# program of one row loads each key row (for dk/dv, each query row) once for each of the kh rows
# that need it; programs of ROWS rows load each (ROWS + kh - 1) / (ROWS * kh) as often, for
# (ROWS + kh - 1) / kh times the products. tl.dot needs 16 rows (_DOT_ROWS), so tile 8 runs 2 rows
# or more: at kw=7 that is 128 logits per query (8 key rows of 16) against tile 16's 224 (7 of 32).
# The candidates, from benchmarks/cuda_kernels.py on an H200 (bf16, batch 128, DiNAT-Mini's d1
# levels 56x56, 28x28, 14x14; BENCHMARKS.md):
# - tile 8 won every kernel at every level: 2 rows and 1 warp for the forward (4 rows at 28x28) and
#   dq, 2 rows and 2 warps for dk/dv. In dinat_mini's training step the three kernels took 4.0 ms
#   against 7.0 ms for the best of tile 16 (forward 0.87 against 1.86, dq 1.26 against 2.55, dk/dv
#   1.89 against 2.54);
# - tile 16 stays for kernels wider than 9 (tile 8's key span is then 32, as tile 16's, for half the
#   queries) and other GPUs: of 1 row, 1 warp won dq and dk/dv at kw=7 on the H200; of 2 rows, the
#   forward; 4 warps at 1 row was the fastest dk/dv at 14x14 on an H100.
# Triton's autotuner times each at the first launch of every shape and keeps the fastest (so run a
# shape once before capturing it in a CUDA graph, as torch.compile's "reduce-overhead" mode does);
# see _tile_configs for when the first is used alone.
TILES: tuple[TileConfig, ...] = (
    TileConfig(8, 1, 2, rows=2),
    TileConfig(8, 2, 2, rows=2),
    TileConfig(8, 1, 2, rows=4),
    TileConfig(16, 1, 2),
    TileConfig(16, 1, 3),
    TileConfig(16, 2, 2, rows=2),
    TileConfig(16, 2, 2, rows=2, max_registers=128),
    TileConfig(16, 4, 3),
)
_DOT_ROWS = 16  # tl.dot's smallest operand: a program's tile * rows must reach it (the kernels assert it)
_BLOCK, _WARPS = 16, 4  # the primitives' fixed configuration
# Whole-window maps (grouped.is_whole) on their own kernels: a group's tokens padded to a power of
# two fill one tile. Groups of up to 64 tokens (7x7, 8x8) with head features of up to 256 bytes (head
# dim 128 in half precision, 64 in float32) keep the backward's (64 x 64) float32 tiles in registers
# and, unpipelined (1 stage), its operands within 99 KB of shared memory (float32 at head dim 64: 96
# KB for sm_80 and sm_90; tests/test_ops_triton_aot.py); others run as batched attention. With an
# rpb the backward's programs each sum the logits' gradients of several groups (about
# _WHOLE_PROGRAMS programs in all), so their partial sums stay small.
_WHOLE_MAX_TOKENS, _WHOLE_MAX_HEAD_BYTES, _WHOLE_PROGRAMS = 64, 256, 1024
_WHOLE_LAUNCH = dict(num_warps=4, num_stages=1)
_WHOLE_WINDOW_WAYS = ("sdpa", "triton")
_AUTOTUNE_KEY = ["heads", "height", "width", "head_dim", "dil_h", "dil_w", "KH", "KW", "HAS_RPB", "PRECISION"]


def _whole_window_way() -> str:
    way = os.environ.get("DINAT_WHOLE_WINDOW", "triton")
    if way not in _WHOLE_WINDOW_WAYS:
        raise ValueError(f"DINAT_WHOLE_WINDOW must be one of {_WHOLE_WINDOW_WAYS}, got {way!r}")
    return way


# How this backend runs maps whose dilation groups are single windows (DiNAT's dilated layers that
# the dilation fills, and its last level): "sdpa", batched attention (grouped.attention: PyTorch's
# fused kernels, with the groups gathered into a batch and back), or "triton", the whole-window
# kernels (triton_kernels.na2d_whole_*: the tokens read and written in place, the rpb gradient summed
# in the kernel), the default: dinat_mini's compiled training step ran 1.5 ms faster on them than on
# SDPA (21.6 against 23.2 ms, an H200, BENCHMARKS.md). Read once from DINAT_WHOLE_WINDOW at import
# (a constant under torch.compile).
WHOLE_WINDOW = _whole_window_way()


def _probe_triton() -> tuple[str, bool]:
    """(why Triton cannot be used, whether it runs kernels in its interpreter), once at import: a
    constant under torch.compile. The interpreter is chosen by TRITON_INTERPRET=1 before the import."""
    try:
        import triton
        import triton.language as tl
    except ImportError as error:
        return f"Triton is not installed ({error})", False
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    interpreting = bool(knobs.runtime.interpret) if knobs else os.environ.get("TRITON_INTERPRET") == "1"
    if not hasattr(tl, "gather"):  # the rpb gradient's gather (torch >= 2.6 brings a Triton that has it)
        return f"Triton {triton.__version__} has no tl.gather (needs Triton >= 3.2)", interpreting
    return "", interpreting


_TRITON_PROBLEM, _INTERPRETING = _probe_triton()


def unavailable_reason(x: Tensor | None = None) -> str:
    """Why the Triton kernels cannot run on tensors like ``x`` (empty when they can)."""
    if _TRITON_PROBLEM or x is None:
        return _TRITON_PROBLEM or ("" if torch.cuda.is_available() or _INTERPRETING else "no CUDA device")
    if x.device.type != ("cpu" if _INTERPRETING else "cuda"):
        mode = "CPU tensors (TRITON_INTERPRET=1)" if _INTERPRETING else "CUDA tensors"
        return f"the triton backend runs on {mode}, got device {x.device}"
    if x.dtype not in _DTYPES:
        return f"the triton backend supports float32, float16 and bfloat16, got {x.dtype}"
    if x.shape[-1] > _MAX_HEAD_DIM:
        return f"the triton backend supports head dims up to {_MAX_HEAD_DIM}, got {x.shape[-1]}"
    if _is_wide_fp32(x.dtype, x.shape[-1]) and not _INTERPRETING:
        props = torch.cuda.get_device_properties(x.device)
        shared = getattr(props, "shared_memory_per_block_optin", 0)
        if shared < _WIDE_FP32_SHARED_BYTES:
            return (
                f"float32 at head dim {x.shape[-1]} needs {_WIDE_FP32_SHARED_BYTES} bytes of shared memory per "
                f"block; {props.name} has {shared}"
            )
    return ""


def _is_wide_fp32(dtype: torch.dtype, head_dim: int) -> bool:
    # bool(): under torch.compile with dynamic shapes the head dim is symbolic, and a symbolic
    # boolean as a key of _wide_fp32_capped's cache breaks every later lookup
    return dtype == torch.float32 and bool(head_dim > _WIDE_FP32_HEAD_DIM)


def available(x: Tensor | None = None) -> bool:
    return not unavailable_reason(x)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _tile_sizes(key_side: bool, tile: int, kw: int) -> dict:
    """BLOCK_M / BLOCK_N of a program owning ``tile`` places: the key places a query tile needs along
    a row are its places plus the window's overhang (and the queries of a key tile likewise, in one
    tile or more: see triton_kernels._key_columns)."""
    window = _next_power_of_2(tile + kw - 1)
    return {"BLOCK_M": window, "BLOCK_N": tile} if key_side else {"BLOCK_M": tile, "BLOCK_N": window}


def _launch_params(key_side: bool, config: TileConfig, kw: int) -> dict:
    """A fused kernel's tile constexprs (block sizes and ROWS) for ``config``."""
    return {**_tile_sizes(key_side, config.tile, kw), "ROWS": config.rows}


def _fp32_precision() -> str:
    """'tf32' where float32 matmuls may use TF32, set by either of PyTorch's APIs (as its flex
    attention reads it: the legacy ``allow_tf32`` raises once the newer ``fp32_precision`` is set)."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting != "none":
        return "tf32" if setting == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _constexprs(name: str, dtype: torch.dtype, kernel: Pair, head_dim: int, has_rpb: bool = False) -> dict:
    """Compile-time parameters of kernel ``name`` but the fused kernels' tiles: the fused op's
    'forward', 'query' (delta, dq, rpb) and 'key' (dk, dv), and the primitives 'dot',
    'weighted_sum' and 'scatter'. The dict is shared (cached): do not modify it."""
    precision = _fp32_precision() if dtype == torch.float32 else "tf32"
    return _cached_constexprs(name, dtype, tuple(kernel), head_dim, has_rpb, precision)


@functools.cache
def _cached_constexprs(name: str, dtype: torch.dtype, kernel: Pair, head_dim: int, has_rpb: bool, precision: str):
    kh, kw = kernel
    if name in ("whole_forward", "whole_backward"):  # one group per tile
        return dict(KH=kh, KW=kw, HAS_RPB=has_rpb, BLOCK=max(_DOT_ROWS, _next_power_of_2(kh * kw)),
                    BLOCK_D=max(16, _next_power_of_2(head_dim)), PRECISION=precision)  # fmt: skip
    if name in ("dot", "weighted_sum"):  # (queries, kw, D) tiles, no matrix product
        return dict(KH=kh, KW=kw, KW_PAD=_next_power_of_2(kw), BLOCK_M=_BLOCK, BLOCK_D=_next_power_of_2(head_dim))
    params = dict(
        KH=kh,
        KW=kw,
        BLOCK_D=max(16, _next_power_of_2(head_dim)),  # tl.dot needs 16
        PRECISION=precision,
    )
    if name == "scatter":
        return {**params, **_tile_sizes(True, _BLOCK, kw)}
    params["HAS_RPB"] = has_rpb
    if name == "query":
        params["BIAS_COLS"] = _next_power_of_2(2 * kw - 1)
    return params


_FUSED_KERNELS = {
    "forward": "na2d_forward_kernel",
    "query": "na2d_backward_query_kernel",
    "key": "na2d_backward_key_kernel",
}


def _tile_configs() -> tuple[TileConfig, ...]:
    """The configurations the autotuner chooses from: the first alone in the
    interpreter, with DINAT_TRITON_AUTOTUNE=0, or under torch.use_deterministic_algorithms (a choice
    by timing could differ between runs, and with it the order of the floating-point sums)."""
    setting = os.environ.get("DINAT_TRITON_AUTOTUNE", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"DINAT_TRITON_AUTOTUNE must be 0 or 1, got {setting!r}")
    fixed = _INTERPRETING or setting == "0" or torch.are_deterministic_algorithms_enabled()
    return TILES[:1] if fixed else TILES


def _wall_clock(kernel_call, quantiles) -> list[float]:
    """The interpreter's stand-in for triton.testing.do_bench (which times CUDA events)."""
    start = time.perf_counter()
    kernel_call()
    return [time.perf_counter() - start] * len(quantiles)


def _fused_kernel(name: str, dtype: torch.dtype, head_dim: int):
    """Fused kernel ``name`` ('forward', 'query' or 'key') for tensors of ``dtype`` and ``head_dim``
    under Triton's autotuner over :func:`_tile_configs`, with the other block size derived from the
    tuned one."""
    return _autotuned_kernel(name, _configs_for(dtype, head_dim))


def _configs_for(dtype: torch.dtype, head_dim: int) -> tuple[TileConfig, ...]:
    """:func:`_tile_configs` for tensors of ``dtype`` and ``head_dim`` (see :func:`_wide_fp32_capped`)."""
    return _wide_fp32_capped(_tile_configs(), _is_wide_fp32(dtype, head_dim))


@functools.cache
def _wide_fp32_capped(configs: tuple[TileConfig, ...], wide_fp32: bool) -> tuple[TileConfig, ...]:
    """``configs``, for wide float32 with at most _WIDE_FP32_STAGES pipeline stages and 1 row per
    program (of _DOT_ROWS places at least), which keeps every kernel within _WIDE_FP32_SHARED_BYTES
    (duplicates dropped)."""
    if not wide_fp32:
        return configs
    capped = (c._replace(tile=max(c.tile, _DOT_ROWS), stages=min(c.stages, _WIDE_FP32_STAGES), rows=1) for c in configs)
    return tuple(dict.fromkeys(capped))


def _tuned_block(name: str) -> str:
    """The block size the autotuner tunes in fused kernel ``name``: the key kernel's tile is of key
    places (BLOCK_N), the others' of query places (BLOCK_M); the other block is derived from it."""
    return "BLOCK_N" if name == "key" else "BLOCK_M"


@functools.cache
def _autotuned_kernel(name: str, configs: tuple[TileConfig, ...]):
    import triton

    from . import triton_kernels

    key_side = name == "key"
    tuned = _tuned_block(name)
    derived = "BLOCK_M" if tuned == "BLOCK_N" else "BLOCK_N"
    kernel = triton.heuristics({derived: lambda args: _tile_sizes(key_side, args[tuned], args["KW"])[derived]})(
        getattr(triton_kernels, _FUSED_KERNELS[name])
    )
    return triton.autotune(
        [
            triton.Config(
                {tuned: c.tile, "ROWS": c.rows}, num_warps=c.warps, num_stages=c.stages, maxnreg=c.max_registers
            )
            for c in configs
        ],
        key=_AUTOTUNE_KEY,
        # the slots a tile leaves unwritten are summed: zeroed before each timed run and once more
        # after the timing (Triton's autotuner does, before it launches the chosen configuration)
        reset_to_zero=["DRPB"] if name == "query" else None,
        **({"do_bench": _wall_clock} if _INTERPRETING else {}),  # older Triton has no do_bench argument
    )(kernel)


def autotuned() -> list[dict]:
    """What Triton's autotuner picked so far: one row per fused kernel and key (shape, and the dtypes
    of q and rpb: a float32 rpb with bfloat16 q, as under autocast, is another key than a bfloat16
    one), with the configuration. Empty when it had a single configuration to use (no choice made)."""
    if _TRITON_PROBLEM:
        return []
    picks = []
    for name in _FUSED_KERNELS:
        for configs in dict.fromkeys(_wide_fp32_capped(_tile_configs(), wide) for wide in (False, True)):
            for key, config in _autotuned_kernel(name, configs).cache.items():
                tile = config.kwargs[_tuned_block(name)]
                shape = dict(zip(_AUTOTUNE_KEY, key))
                dtypes = key[len(_AUTOTUNE_KEY) :]  # of every tensor argument, in order: Q, K, V, RPB, ...
                rpb_dtype = dtypes[3] if shape["HAS_RPB"] else "-"
                picks.append({"kernel": name, **shape, "dtype": dtypes[0], "rpb_dtype": rpb_dtype, "tile": tile,
                              "num_warps": config.num_warps, "num_stages": config.num_stages,
                              "rows": config.kwargs["ROWS"], "max_registers": config.maxnreg})  # fmt: skip
    return picks


_KERNEL_NAMES = ("forward", "query", "key", "whole_forward", "whole_backward", "dot", "weighted_sum", "scatter")


def _kernel_function(name: str) -> str:
    """The triton_kernels function of kernel ``name`` (one of _KERNEL_NAMES)."""
    if name in _FUSED_KERNELS:
        return _FUSED_KERNELS[name]
    return f"na2d_{name}_kernel" if name.startswith("whole") else f"na_{name}_kernel"


def compile_for_cuda(
    arch: int,
    dtype: torch.dtype,
    kernel: Pair,
    head_dim: int,
    has_rpb: bool,
    tile: TileConfig = TILES[0],
    names: tuple[str, ...] = _KERNEL_NAMES,
) -> dict:
    """Build kernels ``names`` (default: all eight; the fused 'forward', 'query', 'key', the
    whole-window ones, and the primitives) for CUDA compute capability ``arch`` (80: A100, 90: H100)
    ahead of time, down to the cubin, with the parameters a launch would use (the fused ones with
    ``tile``, one of TILES). Needs no GPU: this is how the suite checks on CPU-only machines that
    the kernels compile for real devices."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels

    element = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    compiled = {}
    tile = _wide_fp32_capped((tile,), _is_wide_fp32(dtype, head_dim))[0]  # as a launch caps it
    unknown = set(names) - set(_KERNEL_NAMES)
    if unknown:
        raise ValueError(f"unknown kernel names {sorted(unknown)}; the kernels are {_KERNEL_NAMES}")
    for name in names:
        fn = getattr(triton_kernels, _kernel_function(name))
        constexprs = dict(_constexprs(name, dtype, kernel, head_dim, has_rpb))
        options = {"num_warps": _WARPS}
        if name in _FUSED_KERNELS:
            constexprs.update(_launch_params(name == "key", tile, kernel[1]))
            options.update(num_warps=tile.warps, num_stages=tile.stages, maxnreg=tile.max_registers)
        elif name.startswith("whole"):
            options.update(_WHOLE_LAUNCH)
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.isupper():  # tensors: statistics and rpb are float32, the rest the inputs' dtype
                signature[arg] = "*fp32" if arg in ("RPB", "LSE", "DELTA", "DRPB") else f"*{element}"
            else:
                signature[arg] = "fp32" if arg.startswith("scale") else "i32"
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled[name] = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled


def _device_of(x: Tensor):
    """Launch on x's GPU: Triton launches on the current device, which may be another one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(*tensors: Tensor) -> list[int]:
    """(batch, row, column, head) strides of each (B, H, W, heads, D) tensor."""
    return [s for t in tensors for s in t.stride()[:4]]


def _bias_args(rpb: Tensor | None, q: Tensor) -> tuple[Tensor, int, int]:
    """rpb (or a dummy pointer) and its head and row strides; rows are contiguous."""
    if rpb is None:
        return q, 0, 0
    return rpb, rpb.stride(0), rpb.stride(1)


def _programs(extent: int, dilation: int, block: int) -> int:
    """Programs along an axis of ``extent`` positions, each owning ``block`` consecutive places of one
    dilation group: ``block`` times the longest group's, rounded up, per group."""
    longest = -(-extent // dilation)
    return dilation * -(-longest // block)


def _grid(q: Tensor, dilation: list[int], block: int, rows: int = 1) -> tuple[int, int, int]:
    """(batch * heads, row programs, column programs) of a kernel on (B, H, W, heads, D) ``q``."""
    batch, height, width, heads, _ = q.shape
    row_programs = height if rows == 1 else _programs(height, dilation[0], rows)  # row r's program is r
    return (batch * heads, row_programs, _programs(width, dilation[1], block))


# (autotuned kernel, its key) -> the launch parameters of the configuration it picked
_PICKS: dict[tuple, dict] = {}


def _launch_fused(name: str, q: Tensor, bias: Tensor, dilation: list[int], args: tuple, constexprs: dict) -> None:
    """Launch fused kernel ``name`` (see _fused_kernel) on (B, H, W, heads, D) ``q`` with ``args``:
    through Triton's autotuner the first time per autotuner key (shape, constexprs, and the dtypes of
    q and of ``bias``, the rpb argument), then with the configuration it picked, directly. Written
    here because the autotuner's own run rebuilds its key from every argument at each launch: a
    third of the eager op's host time at 14x14 on an H200 (cProfile, BENCHMARKS.md "Calls Q-R"),
    where the eager op is bound by the host."""
    tuner = _fused_kernel(name, q.dtype, q.shape[-1])
    key = (tuner, *q.shape[1:], *dilation, q.dtype, bias.dtype, *constexprs.items())
    tile = _tuned_block(name)
    launch = _PICKS.get(key)
    if launch is None:
        tuner[lambda meta: _grid(q, dilation, meta[tile], meta["ROWS"])](*args, **constexprs)
        picked = tuner.best_config
        _PICKS[key] = {**picked.all_kwargs(), **_tile_sizes(name == "key", picked.kwargs[tile], constexprs["KW"])}
        return
    from . import triton_kernels

    kernel = getattr(triton_kernels, _FUSED_KERNELS[name])
    kernel[_grid(q, dilation, launch[tile], launch["ROWS"])](*args, **constexprs, **launch)


def _forward_kernels(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel: list[int], dilation: list[int], scale: float
) -> tuple[Tensor, Tensor]:
    """Fused attention on (B, H, W, heads, D): the output and its base-2 log-sum-exp (B, H, W, heads)."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    rpb = None if rpb is None else rpb.contiguous()
    batch, height, width, heads, dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, height, width, heads, dtype=torch.float32, device=q.device)
    bias, bias_sn, bias_sh = _bias_args(rpb, q)
    args = (q, k, v, bias, out, lse, *_strides(q, k, v, out), bias_sn, bias_sh,
            heads, height, width, dim, dilation[0], dilation[1], scale * math.log2(math.e))  # fmt: skip
    with _device_of(q):
        if _whole_kernels_apply(q, kernel, dilation):
            constexprs = _constexprs("whole_forward", q.dtype, kernel, dim, rpb is not None)
            _whole_kernel("forward")[(batch * heads, dilation[0] * dilation[1])](*args, **constexprs, **_WHOLE_LAUNCH)
        else:
            constexprs = _constexprs("forward", q.dtype, kernel, dim, rpb is not None)
            _launch_fused("forward", q, bias, dilation, args, constexprs)
    return out, lse


def _whole_kernels_apply(q: Tensor, kernel: list[int] | Pair, dilation: list[int] | Pair) -> bool:
    """Whether the fused op on (B, H, W, heads, D) ``q`` runs the whole-window kernels: its dilation
    groups are single windows, of _WHOLE_MAX_TOKENS tokens at most, with head features of
    _WHOLE_MAX_HEAD_BYTES at most (a function of shape and dtype, so the fakes agree with the launches)."""
    kernel, dilation = tuple(kernel), tuple(dilation)
    head_bytes = q.shape[4] * q.element_size()
    fits = kernel[0] * kernel[1] <= _WHOLE_MAX_TOKENS and bool(head_bytes <= _WHOLE_MAX_HEAD_BYTES)
    return fits and grouped.is_whole(q.shape[1], q.shape[2], kernel, dilation)


def _whole_kernel(name: str):
    """The whole-window kernel ``name`` ("forward" or "backward")."""
    from . import triton_kernels

    return getattr(triton_kernels, _kernel_function(f"whole_{name}"))


def _whole_programs(q: Tensor, dilation: list[int], has_rpb: bool) -> int:
    """Programs per head of the whole-window backward: one per group, or with an rpb (each program
    then sums the logits' gradients of its groups) about _WHOLE_PROGRAMS in all, one group each at most."""
    groups, heads = q.shape[0] * dilation[0] * dilation[1], q.shape[3]
    return max(1, min(groups, _WHOLE_PROGRAMS // max(heads, 1))) if has_rpb else groups


def _bias_rows(height: int, kernel_h: int, dilation_h: int, device: torch.device) -> Tensor:
    """(2kh - 1, H * kh) float64 one-hot: column x (query row, i-th key row) marks that key row's rpb
    row. Built without a host synchronisation, so it may be built inside a CUDA graph."""
    _, rows = reference.axis_neighborhood(height, kernel_h, dilation_h, device)
    return (torch.arange(2 * kernel_h - 1, device=device)[:, None] == rows.flatten()).to(torch.float64)


_cached_bias_rows = functools.lru_cache(maxsize=64)(_bias_rows)


def _pair_slots(kernel_h: int, kernel_w: int, device: torch.device) -> Tensor:
    """(kh kw kh kw, (2kh - 1)(2kw - 1)) float64 one-hot: row (query, key) of a whole window (each
    kh x kw places, row-major) marks the rpb entry of that pair, from the rows' and the columns'
    one-hots (_bias_rows). No host synchronisation (see _bias_rows)."""
    rows = _bias_rows(kernel_h, kernel_h, 1, device).view(2 * kernel_h - 1, kernel_h, kernel_h)
    cols = _bias_rows(kernel_w, kernel_w, 1, device).view(2 * kernel_w - 1, kernel_w, kernel_w)
    # (rpb row, query row, key row) x (rpb column, query column, key column) -> (query, key) x (rpb entry)
    one_hot = torch.einsum("rac,sbd->abcdrs", rows, cols)
    return one_hot.reshape((kernel_h * kernel_w) ** 2, rows.shape[0] * cols.shape[0])


_cached_pair_slots = functools.lru_cache(maxsize=8)(_pair_slots)  # up to 4096 x 225 entries each


def _tiles_and_slots(q: Tensor, dilation: list[int]) -> tuple[set[int], int]:
    """The tile sizes the autotuner may launch for q (wide float32 launches tile 16 at least: see
    _configs_for), and the column slots of q's rpb-gradient partial sums: one per column program of
    the smallest tile (each program writes its own)."""
    tiles = {config.tile for config in _configs_for(q.dtype, q.shape[-1])}
    return tiles, _grid(q, dilation, min(tiles))[2]


def _rpb_partial_shape(q: Tensor, kernel: list[int], slots: int, has_rpb: bool) -> tuple[int, ...]:
    """Shape of the query kernel's rpb-gradient partial sums, (batch, heads, query row, column slot,
    i-th key row, rpb column); (0,) without rpb."""
    if not has_rpb:
        return (0,)
    batch, height, _, heads, _ = q.shape
    return (batch, heads, height, slots, kernel[0], 2 * kernel[1] - 1)


def _whole_partial_shape(q: Tensor, kernel: list[int], programs: int, has_rpb: bool) -> tuple[int, ...]:
    """Shape of the whole-window backward's rpb-gradient partial sums, (heads, programs, query, key);
    (0,) without rpb."""
    return (q.shape[3], programs, kernel[0] * kernel[1], kernel[0] * kernel[1]) if has_rpb else (0,)


def _rpb_gradient(partial: Tensor, rpb: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """rpb's gradient from the partial sums: summed over batch and slots in float64, then each
    (query row, i-th key row) added to the rpb row that key row uses (a matmul with a one-hot); the
    whole-window kernels' (4 dimensions) summed over programs, then each (query, key) pair of a group
    added to its rpb entry (a matmul with the pairs' one-hot).

    This runs outside the custom ops, so torch.compile traces it: the one-hot is then built in the
    graph instead of taken from the cache. Compiled code keeps no tensor alive between calls: CUDA
    graph trees ("reduce-overhead") refuse, or overwrite, a tensor cached from inside their memory
    pool, where they run a compiled function's first (warm-up) call."""
    heads, bias_cols = rpb.shape[0], rpb.shape[2]
    traced = type(partial) is not Tensor and is_fake(partial)  # (a plain Tensor is real: the fast test first)
    if partial.dim() == 4:  # (heads, programs, query, key) of whole groups: one matrix product, few launches
        pair_slots = (_pair_slots if traced else _cached_pair_slots)(*kernel, partial.device)
        pairs = partial.sum(1, dtype=torch.float64).view(heads, -1)
        return torch.mm(pairs, pair_slots).view(rpb.shape).to(rpb.dtype)
    one_hot = _bias_rows if traced else _cached_bias_rows
    per_row = partial.sum((0, 3), dtype=torch.float64)
    rows = one_hot(partial.shape[2], kernel[0], dilation[0], partial.device)
    return torch.matmul(rows, per_row.reshape(heads, -1, bias_cols)).to(rpb.dtype)


def _launch_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    out: Tensor,
    lse: Tensor,
    kernel: list[int],
    dilation: list[int],
    scale: float,
    grads: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """Write the gradients of q, k, v into ``grads`` (three (B, H, W, heads, D) tensors with the same
    strides, unit over D) and return the rpb gradient's partial sums (empty without rpb: see
    _rpb_gradient)."""
    grad_out, q, k, v, out = (_unit_stride(t) for t in (grad_out, q, k, v, out))
    rpb = None if rpb is None else rpb.contiguous()
    batch, height, width, heads, dim = q.shape
    bias, bias_sn, bias_sh = _bias_args(rpb, q)
    shape_args = (heads, height, width, dim, dilation[0], dilation[1], scale * math.log2(math.e), scale)
    strides = _strides(q, k, v, grad_out)
    grad_q, grad_k, grad_v = grads

    if _whole_kernels_apply(q, kernel, dilation):
        programs = _whole_programs(q, dilation, rpb is not None)
        partial_shape = _whole_partial_shape(q, kernel, programs, rpb is not None)
        partial = torch.empty(partial_shape, dtype=torch.float32, device=q.device)
        with _device_of(q):
            _whole_kernel("backward")[(programs, heads)](
                q, k, v, bias, grad_out, out, lse, grad_q, grad_k, grad_v, partial, *strides, *_strides(out, grad_q),
                bias_sn, bias_sh, batch, *shape_args, **_WHOLE_LAUNCH,
                **_constexprs("whole_backward", q.dtype, kernel, dim, rpb is not None),
            )  # fmt: skip
        return partial
    # every slot of the partial sums is written when the autotuner has one tile size, else some stay zero
    tiles, slots = _tiles_and_slots(q, dilation)
    allocate = torch.empty if len(tiles) == 1 else torch.zeros
    partial = allocate(_rpb_partial_shape(q, kernel, slots, rpb is not None), dtype=torch.float32, device=q.device)
    delta = torch.empty(batch, height, width, heads, dtype=torch.float32, device=q.device)  # the query kernel's
    with _device_of(q):
        _launch_fused(
            "query", q, bias, dilation,
            (q, k, v, bias, grad_out, out, lse, delta, grad_q, partial, *strides, *_strides(out, grad_q),
             bias_sn, bias_sh, slots, *shape_args),
            _constexprs("query", q.dtype, kernel, dim, rpb is not None),
        )  # fmt: skip
        _launch_fused(
            "key", q, bias, dilation,
            (q, k, v, bias, grad_out, lse, delta, grad_k, grad_v, *strides, *_strides(grad_k), bias_sn, bias_sh,
             *shape_args),
            _constexprs("key", q.dtype, kernel, dim, rpb is not None),
        )  # fmt: skip
    return partial


def _backward_kernels(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor | None,
    out: Tensor,
    lse: Tensor,
    kernel: list[int],
    dilation: list[int],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v (contiguous), and the rpb gradient's partial sums (see _launch_backward)."""
    grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    return *grads, _launch_backward(grad_out, q, k, v, rpb, out, lse, kernel, dilation, scale, grads)


def _packed_forward_kernels(
    qkv: Tensor, rpb: Tensor | None, kernel: list[int], dilation: list[int], scale: float
) -> tuple[Tensor, Tensor]:
    """:func:`_forward_kernels` on q, k, v packed in one (B, H, W, 3, heads, D) tensor."""
    return _forward_kernels(*qkv.unbind(3), rpb, kernel, dilation, scale)


def _packed_backward_kernels(
    grad_out: Tensor,
    qkv: Tensor,
    rpb: Tensor | None,
    out: Tensor,
    lse: Tensor,
    kernel: list[int],
    dilation: list[int],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The gradient of packed qkv, written by the kernels in place (where separate gradients would
    cost autograd a copy to stack them), and the rpb gradient's partial sums."""
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv.unbind(3)
    return grad_qkv, _launch_backward(grad_out, q, k, v, rpb, out, lse, kernel, dilation, scale, grad_qkv.unbind(3))


na2d_triton = primitives.custom_op("na2d_triton", _forward_kernels)
na2d_triton_backward = primitives.custom_op("na2d_triton_backward", _backward_kernels)
na2d_packed_triton = primitives.custom_op("na2d_packed_triton", _packed_forward_kernels)
na2d_packed_triton_backward = primitives.custom_op("na2d_packed_triton_backward", _packed_backward_kernels)


def _fake_forward(q: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs of the forward ops for a (B, H, W, heads, D) ``q``."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:4], dtype=torch.float32)


def _fake_partial(q: Tensor, rpb: Tensor | None, kernel: list[int], dilation: list[int]) -> Tensor:
    """The rpb-gradient partial sums the backward ops return (see _launch_backward)."""
    has_rpb = rpb is not None
    if _whole_kernels_apply(q, kernel, dilation):
        shape = _whole_partial_shape(q, kernel, _whole_programs(q, dilation, has_rpb), has_rpb)
    else:
        shape = _rpb_partial_shape(q, kernel, _tiles_and_slots(q, dilation)[1], has_rpb)
    return q.new_empty(shape, dtype=torch.float32)


@na2d_triton.register_fake
def _(q, k, v, rpb, kernel, dilation, scale):
    return _fake_forward(q)


@na2d_packed_triton.register_fake
def _(qkv, rpb, kernel, dilation, scale):
    return _fake_forward(qkv[:, :, :, 0])


@na2d_triton_backward.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel, dilation, scale):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return *grads, _fake_partial(q, rpb, kernel, dilation)


@na2d_packed_triton_backward.register_fake
def _(grad_out, qkv, rpb, out, lse, kernel, dilation, scale):
    grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    return grad_qkv, _fake_partial(qkv[:, :, :, 0], rpb, kernel, dilation)


def _setup(ctx, inputs, output) -> None:
    """Inputs (q, k, v, rpb, kernel, dilation, scale), or packed (qkv, rpb, kernel, dilation, scale)."""
    *features, rpb, kernel, dilation, scale = inputs
    ctx.save_for_backward(*features, rpb, *output)
    ctx.args = (kernel, dilation, scale)


def _gradients(ctx, grad_out, backward_kernels):
    """The inputs' gradients (see _setup), from ``backward_kernels`` (a custom op, or its function)."""
    *features, rpb, out, lse = ctx.saved_tensors
    kernel, dilation, scale = ctx.args
    packed = len(features) == 1
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        q, k, v = features[0].unbind(3) if packed else features
        needs = ctx.needs_input_grad[:1] * 3 + ctx.needs_input_grad[1:2] if packed else ctx.needs_input_grad[:4]
        *feature_grads, grad_rpb = primitives.fused_gradients(
            na2d_qk, na2d_av, grad_out, (q, k, v, rpb), needs, tuple(kernel), tuple(dilation), scale
        )
        if packed:
            feature_grads = [torch.stack(feature_grads, 3) if needs[0] else None]
        return (*feature_grads, grad_rpb, None, None, None)
    *feature_grads, partial = backward_kernels(grad_out, *features, rpb, out, lse, *ctx.args)
    grad_rpb = None if rpb is None else _rpb_gradient(partial, rpb, kernel, dilation)
    return (*feature_grads, grad_rpb, None, None, None)


na2d_triton.register_autograd(
    lambda ctx, grad_out, _grad_lse: _gradients(ctx, grad_out, na2d_triton_backward), setup_context=_setup
)
na2d_packed_triton.register_autograd(
    lambda ctx, grad_out, _grad_lse: _gradients(ctx, grad_out, na2d_packed_triton_backward), setup_context=_setup
)


class _EagerNA2d(torch.autograd.Function):
    """The fused op outside torch.compile: the custom ops' functions, without the custom ops'
    dispatch (schema defaults, alias checks, redispatch through autograd: about a third of the
    host time of a forward+backward, benchmarks/triton_host_overhead.py). At DiNAT-Mini's smaller
    levels a forward+backward on an H100 took the host about twice its kernels' time.

    Inputs as the custom ops': (q, k, v, rpb, kernel, dilation, scale), or packed (qkv, rpb, ...)."""

    @staticmethod
    def forward(ctx, *inputs):
        packed = len(inputs) == 5
        out, lse = (_packed_forward_kernels if packed else _forward_kernels)(*inputs)
        ctx.mark_non_differentiable(lse)
        _setup(ctx, inputs, (out, lse))
        ctx.backward_kernels = _packed_backward_kernels if packed else _backward_kernels
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        return _gradients(ctx, grad_out, ctx.backward_kernels)


# -- the backend interface (see functional.py) -------------------------------------------------


def _batched(q: Tensor, kernel: Pair, dilation: Pair) -> bool:
    """Whether na2d runs (B, H, W, heads, D) ``q``'s map as batched attention (see WHOLE_WINDOW)."""
    whole = grouped.runs_whole(q.shape[1], q.shape[2], kernel, dilation)
    return whole and not (WHOLE_WINDOW == "triton" and _whole_kernels_apply(q, kernel, dilation))


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel: Pair, dilation: Pair, rpb: Tensor | None, scale: float) -> Tensor:
    if _batched(q, kernel, dilation):
        return grouped.attention(q, k, v, kernel, dilation, rpb, scale)
    op = na2d_triton if torch.compiler.is_compiling() else _EagerNA2d.apply  # compiled: an opaque op
    out, _ = op(q, k, v, rpb, list(kernel), list(dilation), scale)
    return out


def na2d_qkvpacked(qkv: Tensor, kernel: Pair, dilation: Pair, rpb: Tensor | None, scale: float) -> Tensor:
    """:func:`na2d` on q, k, v packed in one (B, H, W, 3, heads, D) tensor, whose gradient the
    backward kernels write in one buffer."""
    if _batched(qkv[:, :, :, 0], kernel, dilation):
        return grouped.attention(*qkv.unbind(3), kernel, dilation, rpb, scale)
    op = na2d_packed_triton if torch.compiler.is_compiling() else _EagerNA2d.apply
    out, _ = op(qkv, rpb, list(kernel), list(dilation), scale)
    return out


# -- the unfused ops: three primitives on (N, H, W, D) features and (N, H, W, kh*kw) weights ------


def _primitive(
    name: str, first: Tensor, features: Tensor, out_channels: int, kernel: list[int], dilation: list[int],
    out_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """Run primitive ``name`` on ``first`` and the (N, H, W, D) ``features``; the output has
    ``out_channels`` channels per token, in ``out_dtype`` (default: the features')."""
    from . import triton_kernels

    first, features = first.contiguous(), features.contiguous()
    n, height, width, dim = features.shape
    out = features.new_empty(n, height, width, out_channels, dtype=out_dtype)
    with _device_of(features):
        getattr(triton_kernels, f"na_{name}_kernel")[_grid(features.unsqueeze(3), dilation, _BLOCK)](
            first, features, out, height, width, dim, dilation[0], dilation[1],
            **_constexprs(name, features.dtype, kernel, dim), num_warps=_WARPS,
        )  # fmt: skip
    return out


@primitives.custom_op("na_dot_triton")
def na_dot(a: Tensor, b: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, H, W, D) x (N, H, W, D) -> (N, H, W, kh*kw) float32: a . b over each query's neighbors.

    float32 whatever the inputs' dtype (the kernel's accumulator): as the gradient of the weights of
    ``na_weighted_sum`` (softmax's float32 output under autocast) it feeds the softmax backward,
    whose cancellation (dp - sum(p dp)) would amplify a float16/bfloat16 rounding of it.
    """
    return _primitive("dot", a, b, kernel[0] * kernel[1], kernel, dilation, torch.float32)


@primitives.custom_op("na_weighted_sum_triton")
def na_weighted_sum(p: Tensor, b: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, H, W, kh*kw) x (N, H, W, D) -> (N, H, W, D): sum of neighbors of b weighted by p."""
    return _primitive("weighted_sum", p, b, b.shape[-1], kernel, dilation)


@primitives.custom_op("na_scatter_triton")
def na_scatter(p: Tensor, a: Tensor, kernel: list[int], dilation: list[int]) -> Tensor:
    """(N, H, W, kh*kw) x (N, H, W, D) -> (N, H, W, D): each key gathers p * a from its queries."""
    return _primitive("scatter", p, a, a.shape[-1], kernel, dilation)


@na_dot.register_fake
def _(a, b, kernel, dilation):
    return a.new_empty(*a.shape[:3], kernel[0] * kernel[1], dtype=torch.float32)


@na_weighted_sum.register_fake
def _(p, b, kernel, dilation):
    return torch.empty_like(b, memory_format=torch.contiguous_format)


@na_scatter.register_fake
def _(p, a, kernel, dilation):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


primitives.register_gradients(na_dot, na_weighted_sum, na_scatter)


def na2d_qk(q: Tensor, k: Tensor, kernel: Pair, dilation: Pair, rpb: Tensor | None) -> Tensor:
    """Logits, heads-first (B, heads, H, W, kh*kw), rounded once to q's dtype after the rpb is added
    (and differentiated) by PyTorch in float32."""
    batch, heads, height, width, dim = q.shape
    flat = (batch * heads, height, width, dim)
    logits = na_dot(q.reshape(flat), k.reshape(flat), list(kernel), list(dilation))
    logits = logits.view(batch, heads, height, width, kernel[0] * kernel[1])
    if rpb is not None:
        logits = logits + reference.relative_position_bias(rpb, height, width, kernel, dilation)
    return logits.to(q.dtype)


def na2d_av(attn: Tensor, v: Tensor, kernel: Pair, dilation: Pair) -> Tensor:
    """Weighted sum of each query's neighborhood of v, heads-first (B, heads, H, W, D)."""
    batch, heads, height, width, dim = v.shape
    # float32 weights stay float32 (the kernel reads them in their dtype): see na_dot
    weights = attn.reshape(batch * heads, height, width, kernel[0] * kernel[1])
    out = na_weighted_sum(weights, v.reshape(batch * heads, height, width, dim), list(kernel), list(dilation))
    return out.view(batch, heads, height, width, dim)


__all__ = [
    "available",
    "unavailable_reason",
    "autotuned",
    "compile_for_cuda",
    "na2d",
    "na2d_qkvpacked",
    "na2d_qk",
    "na2d_av",
]
