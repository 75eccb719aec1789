"""`dinat bench`: neighborhood attention and whole models against the usual yardsticks.

Everything is timed in one process with the same threads and batch; candidates are interleaved
(one repeat of each in turn) and summarised by medians, so the ratios stay meaningful on a noisy
machine. Peak training memory is measured per model in a fresh subprocess (growth of peak RSS over one
training step, Linux only), since the CPU allocator keeps no per-model statistics.

(a) ``op``: the attention at the shapes of every DiNAT-Mini level (batch B, head dim 32, kernel 7),
    forward and forward+backward, for the automatic backend, the reference, Swin's window attention
    (``scaled_dot_product_attention`` over non-overlapping 7x7 windows plus a bias: the same 49 dot
    products per query) and dense ``scaled_dot_product_attention`` over all tokens; with
    ``--compile``, each of them compiled (on CUDA, ``reduce-overhead`` takes the host's launches out).
(b) ``model``: inference and training-step images/s and peak memory of dinat_mini, dinat_s_tiny and
    dinat_isotropic_small against timm's swin_tiny_patch4_window7_224, convnext_tiny and
    vit_small_patch16_224 (224 px, float32).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import write_text_atomic
from .config import COMPILE_MODES, ArgumentParser, check_model_name
from .factory import compile_model
from .ops import BACKENDS, cpu, current_backend, na2d, use_backend
from .validate import attention_backend

# (tokens per side, heads, dilations used at that level) for DiNAT-Mini at 224 px.
DINAT_MINI_LEVELS = [(56, 2, (1, 8)), (28, 4, (1, 4)), (14, 8, (1, 2)), (7, 16, (1,))]
OURS = ["dinat_mini", "dinat_s_tiny", "dinat_isotropic_small"]
YARDSTICKS = ["swin_tiny_patch4_window7_224", "convnext_tiny", "vit_small_patch16_224"]
WINDOW = 7
PIPELINED_CALLS = 5  # calls per timing sample on CUDA (see interleaved_medians)
CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device = CPU
) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin after one warm-up call each.

    On CUDA a sample is PIPELINED_CALLS calls back to back and one synchronize: the CPU issues the
    next call while the GPU runs the last, as in a training or validation loop (which synchronizes
    only to log). Synchronizing after every call would add the CPU's time to issue a call's first
    kernels to the GPU's time, not what a loop's throughput is.
    """
    calls = PIPELINED_CALLS if device.type == "cuda" else 1
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def window_attention(q, k, v, bias):
    """Swin-style attention: tokens-first (B, H, W, h, D) in and out, 7x7 windows, bias (h, 49, 49)."""
    batch, height, width, heads, dim = q.shape
    rows, cols = height // WINDOW, width // WINDOW

    def partition(x):
        x = x.view(batch, rows, WINDOW, cols, WINDOW, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(-1, heads, WINDOW * WINDOW, dim)

    out = F.scaled_dot_product_attention(partition(q), partition(k), partition(v), attn_mask=bias)
    out = out.view(batch, rows, cols, heads, WINDOW, WINDOW, dim).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, height, width, heads, dim)


def dense_attention(q, k, v):
    """Full self-attention over all tokens, tokens-first in and out."""
    batch, height, width, heads, dim = q.shape
    flat = [t.reshape(batch, height * width, heads, dim).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat)
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


def _with_backward(
    forward: Callable[[], torch.Tensor], grad_out: torch.Tensor, leaves: tuple[torch.Tensor, ...]
) -> Callable[[], None]:
    """forward, then backward from ``grad_out``: a dense gradient, as a training loss gives (the
    gradient of ``.sum()`` is one value broadcast, which makes batched matmuls fall back to one
    small product per matrix); then the ``leaves``' gradients dropped, as a training step's
    ``zero_grad(set_to_none=True)`` does. Under CUDA graphs ("reduce-overhead") a gradient kept
    from one call is memory of the graph's that its next replay overwrites: accumulating into it
    fails (the H200, 2026-11-27)."""

    def step() -> None:
        forward().backward(grad_out)
        for leaf in leaves:
            leaf.grad = None

    return step


def op_rows(
    batch: int,
    repeats: int,
    backends: list[str],
    device: torch.device,
    dtype: torch.dtype,
    compile_mode: str | None = None,
) -> list[dict]:
    """One row per DiNAT-Mini level shape: ``fast`` (the automatic backend), window and dense
    attention, and each of ``backends`` forced (e.g. the reference, or another CUDA backend);
    ``compile_mode`` compiles each of them (its forward, and with it its backward)."""
    rows = []
    for size, heads, dilations in DINAT_MINI_LEVELS:
        for dilation in dilations:
            gen = torch.Generator().manual_seed(0)

            def make(*shape, std=1.0, gen=gen):
                return (torch.randn(*shape, generator=gen) * std).to(device, dtype).requires_grad_()

            q, k, v = (make(batch, size, size, heads, 32) for _ in range(3))
            rpb, bias = make(heads, 13, 13, std=0.02), make(heads, 49, 49, std=0.02)
            forwards = {
                "fast": lambda q=q, k=k, v=v, rpb=rpb, d=dilation: na2d(q, k, v, 7, d, rpb),
                "window": lambda q=q, k=k, v=v, bias=bias: window_attention(q, k, v, bias),
                "dense_sdpa": lambda q=q, k=k, v=v: dense_attention(q, k, v),
            }
            for backend in backends:

                def forced(q=q, k=k, v=v, rpb=rpb, dilation=dilation, backend=backend):
                    with use_backend(backend):
                        return na2d(q, k, v, 7, dilation, rpb)

                forwards[backend] = forced
            if compile_mode:
                # every level compiles the same lambdas again, twice (without and with gradients), and
                # dynamo keeps recompile_limit (8) compilations of a function, then runs it uncompiled:
                # without a fresh start, the last three levels ran eager (the H200, 2026-11-27)
                torch._dynamo.reset()
                # static tensors: CUDA graphs ("reduce-overhead") read them where they are, as a
                # model's parameters, instead of copying them into the graph's memory at every replay
                for tensor in (q, k, v, rpb, bias):
                    torch._dynamo.mark_static_address(tensor)
                forwards = {name: compile_model(f, compile_mode) for name, f in forwards.items()}
            with torch.no_grad():
                fwd = interleaved_medians(forwards, repeats, device)
            grad_out = make(batch, size, size, heads, 32).detach()
            steps = {n: _with_backward(f, grad_out, (q, k, v, rpb, bias)) for n, f in forwards.items()}
            both = interleaved_medians(steps, repeats, device)
            row = {"shape": f"{size}x{size} h{heads} d{dilation}", "backend": current_backend(q)}
            for name in forwards:
                row[f"{name}_fwd_ms"] = fwd[name] * 1e3
                row[f"{name}_fwdbwd_ms"] = both[name] * 1e3
                row[f"{name}_fwd_vs_window"] = fwd[name] / fwd["window"]
                row[f"{name}_fwdbwd_vs_window"] = both[name] / both["window"]
            rows.append(row)
            print(
                f"  {row['shape']:<14} fwd {row['fast_fwd_ms']:8.2f} ms ({row['fast_fwd_vs_window']:.2f}x window)"
                f"  fwd+bwd {row['fast_fwdbwd_ms']:8.2f} ms ({row['fast_fwdbwd_vs_window']:.2f}x window)",
                flush=True,
            )
    return rows


def _build(name: str):
    import timm

    from . import models  # noqa: F401  (registers ours in timm)

    return timm.create_model(name)


def to_device(x: torch.nn.Module | torch.Tensor, device: torch.device):
    """A model or a batch of images on ``device``, channels-last on CUDA: cuDNN's convolutions (the
    stems and downsamplers) then skip converting their inputs' layout at every call (0.84 of
    dinat_mini's 26.6 ms per compiled training step on an H200, BENCHMARKS.md), as with
    ``dinat train --channels-last``."""
    return x.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)


def peak_train_memory_mb(
    name: str, batch: int, threads: int, device: torch.device, dtype: torch.dtype, backend: str = "auto"
) -> float:
    """Peak memory (MiB) one training step (forward and backward) adds to the model, measured in a
    fresh process: on the CPU the growth of peak RSS (Linux's VmHWM, reset just before the step),
    on CUDA the growth of peak allocated memory."""
    if device.type == "cuda":
        model = to_device(_build(name), device).train()
        images = to_device(torch.randn(batch, 3, 224, 224), device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with use_backend(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            model(images).float().logsumexp(-1).mean().backward()
        peak = torch.cuda.max_memory_allocated(device) - before
        del model, images
        torch.cuda.empty_cache()
        return peak / 2**20
    code = (
        "import re, torch, dinat.bench as b\n"
        f"b.use_backend({backend!r}).__enter__()\n"
        "def rss(field):\n"
        "    return int(re.search(field + r':\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
        f"torch.set_num_threads({threads}); torch.manual_seed(0)\n"
        f"m = b._build({name!r}).train(); x = torch.randn({batch}, 3, 224, 224)\n"
        "m(x[:1]).sum().backward(); m.zero_grad(set_to_none=True)\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # restart the peak-RSS count here\n"
        "before = rss('VmRSS')\n"
        "m(x).logsumexp(-1).mean().backward()\n"
        "print((rss('VmHWM') - before) / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def training_step(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, autocast: dict, backend: str = "auto"
) -> Callable[[], None]:
    """One AdamW training step of ``model`` on ``images`` (cross-entropy against ``targets``, under
    ``torch.autocast(**autocast)``, attention on ``backend``), as a callable."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with use_backend(backend), torch.autocast(**autocast):
            loss = F.cross_entropy(model(images).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_rows(
    names: list[str],
    batch: int,
    repeats: int,
    threads: int,
    device: torch.device,
    dtype: torch.dtype,
    backend: str = "auto",
    compile_mode: str | None = None,
) -> list[dict]:
    """Images/s (inference, training step) and training peak memory of each model. A name may end
    in ``@backend`` (``dinat_mini@flex``) to run that entry's attention on another backend;
    ``compile_mode`` (one of COMPILE_MODES) compiles every model for the img/s columns."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as `dinat train`: the fastest algorithm per convolution shape
    parsed = {name: (name.partition("@")[0], name.partition("@")[2] or backend) for name in names}
    built = {name: to_device(_build(model_name), device) for name, (model_name, _) in parsed.items()}
    if compile_mode:  # throughput of the compiled models; the memory column stays eager
        built = {name: compile_model(model, compile_mode) for name, model in built.items()}
    images = to_device(torch.randn(batch, 3, 224, 224), device)
    targets = torch.zeros(batch, dtype=torch.long, device=device)
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def inference(name):
        def run():
            with use_backend(parsed[name][1]), torch.inference_mode(), torch.autocast(**autocast):
                built[name](images)

        return run

    for model in built.values():
        model.eval()
    infer = interleaved_medians({name: inference(name) for name in names}, repeats, device)
    for model in built.values():
        model.train()
    steps = {name: training_step(built[name], images, targets, autocast, parsed[name][1]) for name in names}
    train = interleaved_medians(steps, max(3, repeats // 2), device)
    built.clear()
    rows = []
    for name in names:
        model_name, model_backend = parsed[name]
        rows.append(
            {
                "model": name,
                "infer_img_s": batch / infer[name],
                "train_img_s": batch / train[name],
                "train_peak_mem_mb": peak_train_memory_mb(model_name, batch, threads, device, dtype, model_backend),
            }
        )
    base = next((r for r in rows if r["model"] == YARDSTICKS[0]), None)
    for row in rows:
        if base:
            row["infer_vs_swin_t"] = row["infer_img_s"] / base["infer_img_s"]
            row["train_vs_swin_t"] = row["train_img_s"] / base["train_img_s"]
            row["mem_vs_swin_t"] = row["train_peak_mem_mb"] / base["train_peak_mem_mb"]
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="dinat bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["op", "model", "all"], default="all")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--models", nargs="+", default=OURS + YARDSTICKS, help="timm names; NAME@BACKEND runs NAME on that backend"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference op")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        choices=[b for b in BACKENDS if b not in ("auto", "reference")],
        help="also time the op on these backends (e.g. flex on CUDA, where the default is triton)",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="attention backend of the op rows and our models"
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile every op candidate, and every model for the img/s columns (memory: eager), in "
        "this mode (default: 'default'; 'reduce-overhead' replays CUDA graphs, taking the CPU's launches out)",
    )
    parser.add_argument("--output", type=Path, default=Path("bench_results"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="op tensors' dtype; models run under autocast in it (CUDA)",
    )
    args = parser.parse_args(argv)
    try:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    except RuntimeError:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is a file, not a folder")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    for backend in {args.backend, *args.compare} - {"auto"}:
        attention_backend(backend, device)  # a backend that cannot run on the device: a ConfigError
    for name in args.models:
        if name.partition("@")[2] not in ("", *BACKENDS):
            parser.error(f"--models {name}: the backend after '@' must be one of {BACKENDS}")
        if args.suite != "op":
            check_model_name(name.partition("@")[0])
    if args.batch < 1 or args.threads < 1 or args.repeats < 1:
        parser.error(f"--batch, --threads, --repeats must be >= 1, got {args.batch}, {args.threads}, {args.repeats}")
    torch.set_num_threads(args.threads)
    results: dict = {
        "command": "dinat bench " + " ".join(sys.argv[2:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "backend": args.backend,
        "compile": args.compile or False,
    }
    if device.type == "cpu":
        results["cpu_kernels"] = cpu.loaded_build()
        print(f"CPU kernels: {results['cpu_kernels']}")
    with use_backend(args.backend):
        if args.suite in ("op", "all"):
            print(f"op: DiNAT-Mini level shapes, batch {args.batch}, head dim 32, kernel 7, {args.threads} threads")
            forced = args.compare + ([] if args.no_reference else ["reference"])
            results["op"] = op_rows(args.batch, args.repeats, forced, device, dtype, args.compile)
        if args.suite in ("model", "all"):
            print(f"model: 224 px, batch {args.batch}, {args.dtype}, {args.threads} threads", flush=True)
            results["model"] = model_rows(
                args.models, args.batch, args.repeats, args.threads, device, dtype, args.backend, args.compile
            )
    if device.type == "cuda":
        from .ops import triton_na  # imports Triton: only where its kernels may have run

        results["triton_autotuned"] = triton_na.autotuned()
        results["whole_window"] = triton_na.WHOLE_WINDOW  # DINAT_WHOLE_WINDOW
    path = args.output / "bench.json"
    write_text_atomic(path, json.dumps(results, indent=2))
    if "op" in results:
        names = ["fast", "window", "dense_sdpa"] + args.compare + ([] if args.no_reference else ["reference"])
        cols = ["shape"] + [f"{n}_fwd_ms" for n in names] + ["fast_fwd_vs_window"]
        cols += [f"{n}_fwdbwd_ms" for n in names] + ["fast_fwdbwd_vs_window"]
        print("\n" + _table(results["op"], cols))
    if "model" in results:
        cols = ["model", "infer_img_s", "infer_vs_swin_t", "train_img_s", "train_vs_swin_t"]
        cols += ["train_peak_mem_mb", "mem_vs_swin_t"]
        print("\n" + _table(results["model"], cols))
    if results.get("triton_autotuned"):
        cols = ["kernel", "height", "width", "KH", "KW", "dil_h", "dil_w", "heads", "dtype", "rpb_dtype"]
        cols += ["tile", "rows", "num_warps", "num_stages", "max_registers"]
        print("\nTriton's autotuner picked:\n" + _table(results["triton_autotuned"], cols))
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main()
