"""The CPU kernels compiled for several x86-64 targets, timed side by side in one process.

Why setup.py builds x86-64-v3 and a portable baseline rather than -march=native: run

    .venv/bin/python benchmarks/cpu_builds.py

It compiles ``csrc/na_cpu.c`` for each target into a temporary folder, loads each in turn through
``DINAT_CPU_KERNELS`` and times the fused op (forward, and forward+backward with a dense gradient)
at DiNAT-Mini level shapes, interleaving the builds; it prints each build's time relative to the
first target's (minimum over repeats, as other processes only ever add time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dinat.ops import cpu, na2d

SOURCE = Path(cpu.__file__).parent / "csrc" / "na_cpu.c"
SHAPES = [(56, 2, 1), (28, 4, 2), (14, 8, 1), (7, 16, 1)]  # size, heads, dilation; head dim 32, kernel 7


def build(target: str, folder: Path) -> Path:
    library = folder / f"{target}.so"
    flags = ["-O3", "-fopenmp", "-std=c11", "-shared", "-fPIC", "-Wno-psabi"]
    subprocess.run(["gcc", *flags, f"-march={target}", str(SOURCE), "-o", str(library), "-lm"], check=True)
    return library


def timer(size: int, heads: int, dilation: int, batch: int, backward: bool):
    q, k, v = (torch.randn(batch, size, size, heads, 32, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, 13, 13, requires_grad=True)
    grad = torch.randn(batch, size, size, heads, 32)

    def run() -> float:
        start = time.perf_counter()
        if backward:
            na2d(q, k, v, 7, dilation, rpb).backward(grad)
        else:
            with torch.no_grad():
                na2d(q, k, v, 7, dilation, rpb)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["x86-64-v3", "native", "x86-64-v4", "x86-64"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        libraries = {target: build(target, Path(folder)) for target in args.targets}
        cases = [(shape, backward) for shape in SHAPES for backward in (False, True)]
        best = {(target, case): float("inf") for target in args.targets for case in cases}
        for _ in range(args.repeats):
            for target, library in libraries.items():
                os.environ["DINAT_CPU_KERNELS"] = str(library)
                cpu._library.cache_clear()
                for case in cases:
                    run = timer(*case[0], args.batch, case[1])
                    run()  # warm-up
                    best[target, case] = min(best[target, case], run())
    first = args.targets[0]
    print(f"batch {args.batch}, {torch.get_num_threads()} threads; time relative to {first}")
    print(" | ".join(["shape", "pass", f"{first} ms", *args.targets[1:]]))
    for case in cases:
        (size, heads, dilation), backward = case
        base = best[first, case]
        ratios = [f"{best[target, case] / base:.2f}" for target in args.targets[1:]]
        print(
            " | ".join(
                [f"{size}x{size} h{heads} d{dilation}", "fwd+bwd" if backward else "fwd", f"{base * 1e3:.2f}", *ratios]
            )
        )


if __name__ == "__main__":
    main()
