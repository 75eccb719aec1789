"""The Triton backend's kernels on CUDA, one by one: what ``dinat bench`` (whole ops and models) does
not show, for choosing the autotuner's candidates and seeing where a training step's time goes.

For each undilated DiNAT-Mini level (the shapes that run on the neighborhood kernels; the dilated
ones of DiNAT-Mini are whole windows: below), at batch 128, head dim 32, bfloat16:

* the op's forward and forward+backward against Swin-style window attention (``bench.window_attention``);
* the forward op, then the backward op, with each fused kernel forced to each configuration of
  CONFIGS (tile, warps, stages, rows) while the others keep the autotuner's first;
* the CUDA time of each kernel of one backward (torch.profiler).

Then the kernels of one training step of dinat_mini and of Swin-T (torch.profiler), by CUDA time,
and each step's wall time (5 steps back to back, and each step synchronized on its own) against its
GPU time (a step whose wall time is well over its GPU time is bound by the CPU launching kernels);
and both models' steps timed side by side as ``dinat bench`` times them; with ``--compile MODE``,
the steps compiled in that mode (``reduce-overhead`` replays CUDA graphs; the profiler lists the
kernels inside them one by one), with torch.compile's graph and graph-break counts. Every kernel
goes to kernels.json; the autotuner's picks for the models' shapes are printed.

``--whole-window sdpa matmul triton`` profiles and times dinat_mini once per way of running its
whole-window layers (11 of its 18: every dilated one, and the 7x7 level), whose dilation groups are
single windows (``dinat.ops.grouped``): ``sdpa`` (``DINAT_WHOLE_WINDOW=sdpa``: the groups gathered
into a batch for the memory-efficient kernel, 64x64 tiles over 49 tokens), ``matmul`` (the same
batch through matmul, softmax, matmul: compiled, inductor fuses the bias, softmax and cast between
the batched matmuls) or ``triton`` (the whole-window Triton kernels, the CUDA default: one group per
64x64 tile, the tokens read in place, the rpb gradient summed in the kernel); and times the op's
forward+backward each way at those maps against window attention, compiled as the steps are (every
run does this for its ways). Last, at HOST_LEVELS, where the host's time decides the eager op's
ratio to window attention, each one's time to issue a forward+backward and its Python functions and
builtins by their own time (cProfile).

    python benchmarks/cuda_kernels.py --output DIR    # on a GPU machine; writes DIR/kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import pstats
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from dinat.bench import _build, _sync, _with_backward, interleaved_medians, to_device, training_step, window_attention
from dinat.checkpoints import write_text_atomic
from dinat.config import COMPILE_MODES
from dinat.factory import compile_model
from dinat.ops import grouped, na2d, na2d_qkvpacked, triton_na

T = TypeVar("T")
LEVELS = ((56, 2), (28, 4), (14, 8))
WHOLE_WINDOW_LEVELS = ((56, 2, 8), (28, 4, 4), (14, 8, 2), (7, 16, 1))  # (side, heads, dilation)
# the maps where the eager op's forward+backward, mostly host time, came over 1.5x window attention's
# (call P: 14x14 d1 1.51x, 7x7 1.58x)
HOST_LEVELS = ((14, 8, 1), (7, 16, 1))
# the autotuner's candidates (those slower on an H200 or an H100 before: BENCHMARKS.md)
CONFIGS = triton_na.TILES


def _label(config: dict) -> str:
    """tile/rows/warps/stages, and /rN for a register cap of N."""
    cap = f"/r{config['max_registers']}" if config["max_registers"] else ""
    return f"{config['tile']}/{config['rows']}/{config['warps']}/{config['stages']}{cap}"


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none)


def cuda_kernel_table(fn, steps: int, top: int | None = None) -> tuple[list[dict], float]:
    """(the top kernels (all without ``top``) of ``steps`` calls of fn by CUDA time, ms per call;
    total CUDA ms per call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 1e3 / steps
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [
        {"kernel": e.key[:160], "ms": e.self_device_time_total / 1e3 / steps, "calls": e.count // steps}
        for e in events[:top]
    ]
    return rows, total


def op_level(size: int, heads: int, batch: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, size, size, 3, heads, 32, generator=gen).to("cuda", dtype).requires_grad_()
    rpb = (torch.randn(heads, 13, 13, generator=gen) * 0.02).cuda().requires_grad_()
    bias = (torch.randn(heads, 49, 49, generator=gen) * 0.02).to("cuda", dtype).requires_grad_()
    grad = torch.randn(batch, size, size, heads, 32, generator=gen).to("cuda", dtype)
    q, k, v = qkv.unbind(3)
    leaves = [qkv, rpb, bias]

    def op():
        return na2d(q, k, v, 7, 1, rpb)

    def window():
        return window_attention(q, k, v, bias)

    row: dict = {"shape": f"{size}x{size} h{heads} d1"}
    with torch.no_grad():
        row["fwd_ms"], row["window_fwd_ms"] = bench_ms(op), bench_ms(window)
    row["fwdbwd_ms"] = bench_ms(lambda: op().backward(grad), leaves)
    row["window_fwdbwd_ms"] = bench_ms(lambda: window().backward(grad), leaves)

    # the backward op alone, from saved forward outputs
    qc, kc, vc = (t.detach().contiguous() for t in (q, k, v))
    scale = 32**-0.5
    with torch.no_grad():
        out, lse = triton_na.na2d_triton(qc, kc, vc, rpb.detach(), [7, 7], [1, 1], scale)

    def forward():
        triton_na.na2d_triton(qc, kc, vc, rpb.detach(), [7, 7], [1, 1], scale)

    def backward():
        partial = triton_na.na2d_triton_backward(grad, qc, kc, vc, rpb.detach(), out, lse, [7, 7], [1, 1], scale)[3]
        triton_na._rpb_gradient(partial, rpb.detach(), [7, 7], [1, 1])

    row["backward_kernels"], row["backward_cuda_ms"] = cuda_kernel_table(backward, 5, 12)
    row["backward_ms"] = bench_ms(backward)
    configs = []
    original = triton_na._fused_kernel, triton_na._tile_configs
    first = {name: triton_na._autotuned_kernel(name, (triton_na.TILES[0],)) for name in ("forward", "query", "key")}
    try:
        for name, config in itertools.product(("forward", "query", "key"), CONFIGS):
            chosen = dict(first, **{name: triton_na._autotuned_kernel(name, (config,))})
            triton_na._fused_kernel = lambda kernel, dtype, head_dim, chosen=chosen: chosen[kernel]
            # the configurations in use, which size the rpb gradient's partial sums
            triton_na._tile_configs = lambda config=config: (triton_na.TILES[0], config)
            entry = {"kernel": name, **config._asdict()}
            try:
                entry["ms"] = bench_ms(forward if name == "forward" else backward)
            except Exception as error:  # out of shared memory or registers: recorded, not fatal
                entry["error"] = f"{type(error).__name__}: {str(error)[:120]}"
            configs.append(entry)
    finally:
        triton_na._fused_kernel, triton_na._tile_configs = original
    row["configs"] = configs
    for name in ("forward", "query", "key"):
        timed = [c for c in configs if c["kernel"] == name and "ms" in c]
        best = min(timed, key=lambda c: c["ms"])
        row[f"best_{name}"] = best
        each = ", ".join(f"{_label(c)} {c['ms']:.3f}" for c in timed)
        print(f"  {row['shape']}: {name} (tile/rows/warps/stages ms): {each}", flush=True)
        print(f"  {row['shape']}: best {name} {_label(best)}"
              f" -> {'forward' if name == 'forward' else 'backward'} {best['ms']:.3f} ms", flush=True)  # fmt: skip
    print(
        f"  {row['shape']}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_ms'] / row['window_fwd_ms']:.2f}x window), "
        f"fwd+bwd {row['fwdbwd_ms']:.3f} ms ({row['fwdbwd_ms'] / row['window_fwdbwd_ms']:.2f}x window), "
        f"backward op {row['backward_ms']:.3f} ms",
        flush=True,
    )
    for kernel in row["backward_kernels"]:
        print(f"    {kernel['ms']:7.3f} ms  x{kernel['calls']}  {kernel['kernel']}")
    return row


WHOLE_WINDOW = ("sdpa", "matmul", "triton")
DEFAULT_WAY = triton_na.WHOLE_WINDOW  # the backend's own (DINAT_WHOLE_WINDOW)


@contextlib.contextmanager
def whole_window_as(way: str):
    """Run the whole-window maps of the ops called in this block as ``way`` (one of WHOLE_WINDOW).

    A benchmark's switch, not an API: it swaps the two functions the CUDA backends consult, for the
    block only; a compiled model calls its step inside it at every call, so torch.compile's guards
    see the same settings at every call as at its trace."""
    if way not in WHOLE_WINDOW:
        raise ValueError(f"whole-window way must be one of {WHOLE_WINDOW}, got {way!r}")
    original = triton_na.WHOLE_WINDOW, grouped.sdpa_by_default
    triton_na.WHOLE_WINDOW = "triton" if way == "triton" else "sdpa"
    if way == "matmul":
        grouped.sdpa_by_default = _never_sdpa
    try:
        yield
    finally:
        triton_na.WHOLE_WINDOW, grouped.sdpa_by_default = original


def _never_sdpa(device_type: str, features: tuple, rpb) -> bool:
    return False


def _with_whole_window(fn: Callable[[], T], way: str) -> Callable[[], T]:
    """``fn``, its whole windows run as ``way`` (each call inside :func:`whole_window_as`)."""

    def wrapped() -> T:
        with whole_window_as(way):
            return fn()

    return wrapped


def whole_window_level(
    size: int,
    heads: int,
    dilation: int,
    batch: int,
    dtype: torch.dtype,
    ways: tuple[str, ...],
    compile_mode: str | None,
) -> dict:
    """The op's forward+backward at one of DiNAT-Mini's whole-window maps, run each of ``ways``,
    against window attention on the same tokens, all compiled in ``compile_mode`` (with
    ``reduce-overhead`` as a compiled training step runs them: CUDA graphs), timed side by side."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, size, size, 3, heads, 32, generator=gen).to("cuda", dtype).requires_grad_()
    rpb = (torch.randn(heads, 13, 13, generator=gen) * 0.02).cuda().requires_grad_()
    bias = (torch.randn(heads, 49, 49, generator=gen) * 0.02).to("cuda", dtype).requires_grad_()
    grad = torch.randn(batch, size, size, heads, 32, generator=gen).to("cuda", dtype)
    # every level compiles the same lambdas again, and dynamo keeps 8 compilations of a function at
    # most (then runs it uncompiled): start each level afresh
    torch._dynamo.reset()
    forwards = {way: lambda: na2d_qkvpacked(qkv, 7, dilation, rpb) for way in ways}
    forwards["window"] = lambda: window_attention(*qkv.unbind(3), bias)
    if compile_mode:
        for tensor in (qkv, rpb, bias):  # CUDA graphs read them in place (bench.op_rows)
            torch._dynamo.mark_static_address(tensor)
        forwards = {name: compile_model(f, compile_mode) for name, f in forwards.items()}

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        backward = _with_backward(forward, grad, (qkv, rpb, bias))
        if compile_mode != "reduce-overhead":
            return backward

        def marked() -> None:
            # a new iteration for CUDA graph trees, as a training loop's: the round-robin
            # interleaves several compiled functions' graphs
            torch.compiler.cudagraph_mark_step_begin()
            backward()

        return marked

    steps = {name: _with_whole_window(step(f), name if name in ways else DEFAULT_WAY) for name, f in forwards.items()}
    ms = {name: seconds * 1e3 for name, seconds in interleaved_medians(steps, 20, torch.device("cuda")).items()}
    shape = f"{size}x{size} h{heads} d{dilation}"
    each = ", ".join(f"{name} {ms[name]:.3f} ms ({ms[name] / ms['window']:.2f}x)" for name in ways)
    print(
        f"  {shape} fwd+bwd{f' ({compile_mode})' if compile_mode else ''}: {each}, window {ms['window']:.3f} ms",
        flush=True,
    )
    return {"shape": shape, "compile": compile_mode, "fwdbwd_ms": ms}


def host_profile(
    size: int,
    heads: int,
    dilation: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    calls: int = 50,
) -> dict:
    """Where the host's time goes in the eager op's forward+backward (``na2d``, separate q, k, v as
    ``dinat bench`` times it), against window attention's on the same tokens: the time to issue a
    call (the GPU may lag), and cProfile's functions by their own time, builtins (the torch ops,
    Triton's launcher) included. At the small maps both take under a millisecond, mostly host time."""
    gen = torch.Generator().manual_seed(0)

    def make(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    q, k, v = (make(batch, size, size, heads, 32).requires_grad_() for _ in range(3))
    rpb, bias = make(heads, 13, 13, std=0.02).requires_grad_(), make(heads, 49, 49, std=0.02).requires_grad_()
    grad = make(batch, size, size, heads, 32)
    steps = {
        "na2d": _with_backward(lambda: na2d(q, k, v, 7, dilation, rpb), grad, (q, k, v, rpb)),
        "window": _with_backward(lambda: window_attention(q, k, v, bias), grad, (q, k, v, bias)),
    }
    shape = f"{size}x{size} h{heads} d{dilation}"
    row: dict = {"shape": shape}
    for name, step in steps.items():
        step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            step()
        issue_us = (time.perf_counter() - start) / calls * 1e6
        _sync(device)
        profiler = cProfile.Profile()
        for _ in range(calls):
            profiler.runcall(step)
        _sync(device)
        stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, ..., own time, cumulative, ...)
        top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:15]
        functions = [
            {"function": f"{path.rsplit('/', 1)[-1]}:{line}({function})", "calls": entry[1] // calls,
             "own_us": entry[2] / calls * 1e6}
            for (path, line, function), entry in top
        ]  # fmt: skip
        print(f"  {shape} {name}: issue {issue_us:.0f} us per forward+backward; own time per call (cProfile):")
        for f in functions:
            print(f"    {f['own_us']:7.1f} us  x{f['calls']:<3} {f['function'][:100]}")
        row[name] = {"issue_us": issue_us, "functions": functions}
    return row


def _runs(names: tuple[str, ...], ways: tuple[str, ...]) -> list[tuple[str, str]]:
    """(model, whole-window way) pairs: each dinat model once per way in ``ways``, the others once."""
    return [(name, way) for name in names for way in (ways if name.startswith("dinat") else (DEFAULT_WAY,))]


def _label_of(name: str, way: str) -> str:
    """The model's name, with ``[way]`` where its whole windows are not run the default way."""
    return name if way == DEFAULT_WAY else f"{name}[{way}]"


def _model(name: str, compile_mode: str | None) -> torch.nn.Module:
    """Model ``name`` on CUDA in training mode, compiled in ``compile_mode`` if given."""
    model = to_device(_build(name), torch.device("cuda")).train()
    return compile_model(model, compile_mode) if compile_mode else model


def model_profile(
    name: str, batch: int, dtype: torch.dtype, compile_mode: str | None = None, way: str = DEFAULT_WAY
) -> dict:
    torch.manual_seed(0)
    model = _model(name, compile_mode)
    images = to_device(torch.randn(batch, 3, 224, 224), torch.device("cuda"))
    targets = torch.zeros(batch, dtype=torch.long, device="cuda")
    step = training_step(model, images, targets, dict(device_type="cuda", dtype=dtype))  # the bench's step
    step = _with_whole_window(step, way)
    name = _label_of(name, way)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    launched = (time.perf_counter() - start) / 5  # the CPU's time to issue a step (the GPU may lag)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 5
    synced = []  # each step on its own, as `dinat bench` timed them before it pipelined its samples
    for _ in range(5):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - start)
    synced_ms = sorted(synced)[2] * 1e3
    kernels, gpu = cuda_kernel_table(step, 3)
    compiled = dict(torch._dynamo.utils.counters["stats"]) | {
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())
    }
    print(f"{name}: wall {wall * 1e3:.1f} ms/step, synchronized {synced_ms:.1f} ms, GPU {gpu:.1f} ms, "
          f"CPU issue {launched * 1e3:.1f} ms; torch.compile so far: {compiled}", flush=True)  # fmt: skip
    for kernel in kernels[:40]:
        print(f"  {kernel['ms']:7.3f} ms  x{kernel['calls']:<4} {kernel['kernel'][:110]}")
    picks = [p for p in triton_na.autotuned() if p["dtype"] != "torch.float32"]  # the models' (autocast)
    for p in picks:
        config = _label({**p, "warps": p["num_warps"], "stages": p["num_stages"]})
        print(f"  autotuner: {p['kernel']} {p['height']}x{p['width']} h{p['heads']} d{p['dil_h']}: {config}")
    return {"model": name, "wall_ms": wall * 1e3, "synchronized_ms": synced_ms, "gpu_ms": gpu,
            "issue_ms": launched * 1e3, "compiled": compiled, "kernels": kernels}  # fmt: skip


def side_by_side(
    names: tuple[str, ...], batch: int, dtype: torch.dtype, compile_mode: str | None = None, ways=(DEFAULT_WAY,)
) -> dict:
    """ms per training step of each model, all resident and timed as `dinat bench` times them
    (bench.interleaved_medians: round-robin samples of pipelined steps): beside model_profile's
    figures, this tells the bench's way of timing from what ran before it in the bench's process.
    A dinat model runs once per whole-window way in ``ways``."""
    torch.manual_seed(0)
    images = to_device(torch.randn(batch, 3, 224, 224), torch.device("cuda"))
    targets = torch.zeros(batch, dtype=torch.long, device="cuda")
    autocast = dict(device_type="cuda", dtype=dtype)
    steps = {}
    for name, way in _runs(names, ways):
        step = training_step(_model(name, compile_mode), images, targets, autocast)
        steps[_label_of(name, way)] = _with_whole_window(step, way)
    medians = interleaved_medians(steps, 4, torch.device("cuda"))
    figures = ", ".join(f"{name} {seconds * 1e3:.1f} ms/step" for name, seconds in medians.items())
    print(f"side by side, as `dinat bench` times them: {figures}", flush=True)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--skip-configs", action="store_true", help="only the op and model figures")
    parser.add_argument("--skip-models", action="store_true", help="only the op figures")
    parser.add_argument(
        "--compile", choices=COMPILE_MODES, help="the training steps compiled in this mode (e.g. reduce-overhead)"
    )
    parser.add_argument(
        "--whole-window", nargs="+", choices=WHOLE_WINDOW, default=[DEFAULT_WAY],
        help="dinat_mini once per way of running its whole-window layers (default: the backend's own)",
    )  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_na.available():
        raise SystemExit(f"needs CUDA and Triton: {triton_na.unavailable_reason() or 'no CUDA device'}")
    global CONFIGS
    if args.skip_configs:
        CONFIGS = triton_na.TILES[:1]
    dtype = torch.bfloat16
    torch.backends.cudnn.benchmark = True  # as `dinat train` and `dinat bench`
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    models = () if args.skip_models else ("dinat_mini", "swin_tiny_patch4_window7_224")
    args.output.mkdir(parents=True, exist_ok=True)
    results["compile"] = args.compile
    results["whole_window"] = args.whole_window
    ways = tuple(args.whole_window)
    results["models"] = [
        _recorded(model_profile, name, args.batch, dtype, args.compile, way) for name, way in _runs(models, ways)
    ]
    if models:
        results["side_by_side_ms"] = _recorded(side_by_side, models, args.batch, dtype, args.compile, ways)
    results["levels"] = [_recorded(op_level, size, heads, args.batch, dtype) for size, heads in LEVELS]
    results["whole_window_levels"] = [
        _recorded(whole_window_level, *level, args.batch, dtype, ways, args.compile) for level in WHOLE_WINDOW_LEVELS
    ]
    results["host"] = [
        _recorded(host_profile, *level, args.batch, dtype, torch.device("cuda")) for level in HOST_LEVELS
    ]
    write_text_atomic(args.output / "kernels.json", json.dumps(results, indent=1, default=str))
    measured = results["models"] + results["levels"] + results["whole_window_levels"] + results["host"]
    measured.append(results.get("side_by_side_ms", {}))
    failed = [r for r in measured if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of the measurements failed (see kernels.json)")


def _recorded(measure, *args) -> dict:
    """measure(*args), or the error it raised (printed), so that one failure keeps the other figures."""
    try:
        return measure(*args)
    except Exception as error:
        traceback.print_exc()
        return {"args": [str(a) for a in args], "error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    main()
