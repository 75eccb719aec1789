"""The host-side cost of one ``na2d`` forward+backward on the Triton backend, without a GPU.

On CUDA, at DiNAT-Mini's smaller levels, the op's forward+backward took the host about twice its
kernels' time (BENCHMARKS.md, "GPU"), so every microsecond of Python and dispatch around the kernels
counts. This runs the Triton backend's host code (checks, custom ops, autograd,
allocations, the rpb gradient's reduction) on tiny CPU tensors in Triton's interpreter mode with
every kernel launch replaced by a no-op, and reports microseconds per forward+backward: the part of
the cost that is ours, measurable on any machine. Likewise the op at a whole-window map (7x7, 16
heads, as DiNAT-Mini's last level), run each way the backend can (``triton_na.WHOLE_WINDOW``: batched
attention, ``dinat.ops.grouped``, SDPA as on CUDA; or the whole-window kernels), against Swin's
window attention (``bench.window_attention``) on the same tiny tensors: host time only.

Then, for dinat_mini (attention on this backend, its whole-window layers each way) and timm's Swin-T,
it counts the PyTorch ops that one training step's forward and backward dispatch, and the Triton
kernels they launch (views aside: each of the rest launches a kernel or more on a GPU), at batch 2
and 224 px under the CPU's bfloat16 autocast: the bench's training step without its optimizer. A
step bound by the CPU's launches costs about in proportion to them. With them: each model's blocks
and activations per image.

    TRITON_INTERPRET=1 python benchmarks/triton_host_overhead.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (the backend then accepts CPU tensors)")

from dinat.bench import _build, window_attention  # noqa: E402
from dinat.ops import grouped, na2d, triton_kernels, triton_na, use_backend  # noqa: E402

# ops that make no kernel launch: views, metadata, and uninitialised allocations
_NO_LAUNCH = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
              "select", "slice", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "narrow",
              "view_as", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # fmt: skip


class _NoLaunch:
    """Stands for a kernel: indexing by a grid gives a launcher that only counts its calls. As an
    autotuned kernel it "picks" the first candidate configuration (triton_na._launch_fused then
    launches the kernel itself)."""

    launches = 0
    first = triton_na.TILES[0]
    tiles = {"BLOCK_M": first.tile, "BLOCK_N": first.tile, "ROWS": first.rows}
    best_config = triton.Config(tiles, num_warps=first.warps, num_stages=first.stages)

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            _NoLaunch.launches += 1

        return launch


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside it, by name, leaving out those in _NO_LAUNCH."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_LAUNCH:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def training_step_ops(name: str) -> tuple[Counter[str], int, int]:
    """The ops of one forward+backward of model ``name`` (batch 2, 224 px, bfloat16 autocast), the
    Triton kernels among them, the model's number of transformer blocks, and its activations per
    image (the elements its convolutions, linear layers, layer norms and GELUs output)."""
    torch.manual_seed(0)
    model = _build(name).train()
    images, targets = torch.randn(2, 3, 224, 224), torch.zeros(2, dtype=torch.long)
    activations = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU)):
            module.register_forward_hook(lambda _module, _args, out: activations.append(out.numel() // len(images)))

    def step() -> None:
        with use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), targets)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # autocast's and the backend's first-call work
    activations.clear()
    launches = _NoLaunch.launches
    with _OpCounter() as counter:
        step()
    counter.counts["triton kernels"] = _NoLaunch.launches - launches
    blocks = sum(type(m).__name__ in ("NATBlock", "SwinTransformerBlock") for m in model.modules())
    return counter.counts, blocks, sum(activations)


def host_times(attend, grad: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median microseconds of ``attend()`` (no grad) and of ``attend().backward(grad)``."""
    times = {"forward": [], "forward+backward": []}
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            attend()
        middle = time.perf_counter()
        attend().backward(grad)
        end = time.perf_counter()
        times["forward"].append(middle - start)
        times["forward+backward"].append(end - middle)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def main(repeats: int = 2000) -> None:
    triton_na._fused_kernel = lambda name, dtype, head_dim: _NoLaunch()
    for name in dir(triton_kernels):
        if name.endswith("_kernel"):
            setattr(triton_kernels, name, _NoLaunch())
    qkv = torch.randn(2, 14, 14, 3, 3, 32, requires_grad=True)  # as a qkv projection gives them
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(3, 13, 13, requires_grad=True)
    with use_backend("triton"):
        us = host_times(lambda: na2d(q, k, v, 7, 1, rpb), torch.randn(2, 14, 14, 3, 32), repeats)
    print(", ".join(f"{name}: {value:.0f} us" for name, value in us.items()) + f" (median of {repeats})")

    q, k, v = torch.randn(3, 1, 7, 7, 16, 8).unbind()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rpb, bias = torch.randn(16, 13, 13, requires_grad=True), torch.randn(16, 49, 49, requires_grad=True)
    grad = torch.randn(1, 7, 7, 16, 8)
    sdpa = mock.patch.object(grouped, "sdpa_by_default", lambda device_type, features, rpb: True)  # as on CUDA
    window = host_times(lambda: window_attention(q, k, v, bias), grad, repeats)
    for way in triton_na._WHOLE_WINDOW_WAYS:
        with use_backend("triton"), sdpa, mock.patch.object(triton_na, "WHOLE_WINDOW", way):
            ours = host_times(lambda: na2d(q, k, v, 7, 1, rpb), grad, repeats)
        print(f"whole-window map (7x7, 16 heads) as {way}, against window attention: " + ", ".join(
            f"{name} {ours[name]:.0f} against {window[name]:.0f} us ({ours[name] / window[name]:.2f}x)" for name in ours
        ))  # fmt: skip
    # the models' whole windows batched run matmul + softmax here (one fused kernel each way on CUDA;
    # the CPU's SDPA with a mask would count its decomposition)
    runs = [("dinat_mini", way) for way in triton_na._WHOLE_WINDOW_WAYS] + [("swin_tiny_patch4_window7_224", "sdpa")]
    for name, way in runs:
        with mock.patch.object(triton_na, "WHOLE_WINDOW", way):
            counts, blocks, activations = training_step_ops(name)
        if name.startswith("dinat"):
            name += " (whole windows " + ("batched: matmul + softmax)" if way == "sdpa" else "on their Triton kernels)")
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
        print(f"{name}: {blocks} blocks, {activations / 1e6:.1f}M activations per image, {sum(counts.values())} "
              f"ops and Triton kernels per training step's forward+backward ({top}, ...)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000, help="timed calls per figure (medians)")
    main(parser.parse_args().repeats)
