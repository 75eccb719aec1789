"""The host-side cost of one ``na2d`` forward+backward on the Triton backend, without a GPU.

On CUDA a DiNAT-Mini training step at batch 128 is bound by the CPU issuing kernels about as much as
by the GPU running them (BENCHMARKS.md, "GPU"), so every microsecond of Python and dispatch around
the kernels counts. This runs the Triton backend's host code (checks, custom ops, autograd,
allocations, the rpb gradient's reduction) on tiny CPU tensors in Triton's interpreter mode with
every kernel launch replaced by a no-op, and reports microseconds per forward+backward: the part of
the cost that is ours, measurable on any machine.

    TRITON_INTERPRET=1 python benchmarks/triton_host_overhead.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (the backend then accepts CPU tensors)")

from dinat.ops import na2d, triton_kernels, triton_na, use_backend  # noqa: E402


class _NoLaunch:
    """Stands for a kernel: indexing by a grid gives a launcher that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(repeats: int = 2000) -> None:
    triton_na._fused_kernel = lambda name, dtype, head_dim: _NoLaunch()
    for name in dir(triton_kernels):
        if name.endswith("_kernel"):
            setattr(triton_kernels, name, _NoLaunch())
    qkv = torch.randn(2, 14, 14, 3, 3, 32, requires_grad=True)  # as a qkv projection gives them
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(3, 13, 13, requires_grad=True)
    grad = torch.randn(2, 14, 14, 3, 32)
    times = {"forward": [], "forward+backward": []}
    with use_backend("triton"):
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                na2d(q, k, v, 7, 1, rpb)
            middle = time.perf_counter()
            na2d(q, k, v, 7, 1, rpb).backward(grad)
            end = time.perf_counter()
            times["forward"].append(middle - start)
            times["forward+backward"].append(end - middle)
    for name, values in times.items():
        print(f"{name}: {statistics.median(values) * 1e6:.0f} us (median of {repeats})")


if __name__ == "__main__":
    main()
