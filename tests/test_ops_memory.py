"""Other builds of the CPU kernels (``DINAT_CPU_KERNELS``): under AddressSanitizer, no access
outside an operand, its readable slack, or the kernels' own scratch buffers; an unloadable one warns.

The kernels are compiled again with ``-fsanitize=address`` and run (through ``DINAT_CPU_KERNELS``)
in a subprocess that preloads the sanitizer's runtime, on geometries that reach every path of the C
code: clamped borders, dilation on maps that are not whole windows, first keys or rpb offsets of
neighbouring queries spread wider than a vector, head dims that are not a multiple of the channel
block, float32 and float64, the fused op forward and backward, the unfused ops and a double
backward. Skipped where the C compiler or its ASan runtime is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dinat.ops.cpu

SOURCE = Path(dinat.ops.cpu.__file__).parent / "csrc" / "na_cpu.c"

SCRIPT = """
import torch
from dinat.ops import cpu, na2d, na2d_av, na2d_qk, use_backend

assert cpu.available(), cpu.unavailable_reason()
torch.manual_seed(0)
GEOMETRIES = [  # kernel, dilation, (H, W), heads, head dim
    (7, 1, (14, 14), 2, 32),
    (7, 2, (15, 17), 3, 13),
    ((3, 3), (11, 12), (34, 38), 1, 5),
    ((5, 13), (1, 1), (7, 30), 2, 9),
    ((3, 9), (2, 9), (9, 85), 1, 3),
    (5, (2, 3), (11, 16), 3, 8),
]
for dtype in (torch.float32, torch.float64):
    for kernel, dilation, (height, width), heads, dim in GEOMETRIES:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        q, k, v = (torch.randn(1, height, width, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, dtype=dtype, requires_grad=True)
        with use_backend("cpu"):
            out = na2d(q, k, v, kernel, dilation, rpb)
            torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
            first = [t.permute(0, 3, 1, 2, 4) for t in (q, k, v)]
            weights = na2d_qk(first[0], first[1], kernel, dilation, rpb).softmax(-1)
            mixed = na2d_av(weights, first[2], kernel, dilation)
            grads = torch.autograd.grad(mixed.square().sum(), (q, k, v), create_graph=True)
            torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v))
print("checked", 2 * len(GEOMETRIES), "geometries")
"""


def _runtime(compiler: str, name: str) -> str | None:
    """Absolute path of the compiler's library ``name``, or None (the compiler echoes unknown names)."""
    found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


def test_kernels_stay_in_bounds_under_address_sanitizer(tmp_path: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None or not SOURCE.exists():
        pytest.skip("needs a C compiler and the kernels' source")
    asan, cxx = _runtime(compiler, "libasan.so"), _runtime(compiler, "libstdc++.so")
    if asan is None or cxx is None:
        pytest.skip(f"{compiler} has no AddressSanitizer runtime")
    library = tmp_path / "na_cpu_asan.so"
    build = [compiler, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-march=native", "-fopenmp"]
    subprocess.run([*build, "-std=c11", "-shared", "-fPIC", str(SOURCE), "-o", str(library), "-lm"], check=True)
    env = dict(
        os.environ,
        DINAT_CPU_KERNELS=str(library),
        LD_PRELOAD=f"{asan} {cxx}",  # torch's C++ exceptions need libstdc++ loaded before ASan hooks them
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
    )
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    report = result.stderr[-6000:]
    assert "AddressSanitizer" not in result.stderr, report
    assert result.returncode == 0, report
    assert "checked 12 geometries" in result.stdout


def test_unloadable_kernel_override_warns(tmp_path: Path) -> None:
    """A DINAT_CPU_KERNELS that cannot be loaded is a warning naming it, not a silent fallback."""
    missing = tmp_path / "missing.so"
    script = "from dinat.ops import cpu; print(cpu.available(), cpu.unavailable_reason())"
    env = dict(os.environ, DINAT_CPU_KERNELS=str(missing), PYTHONWARNINGS="always")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("False the C kernels failed to load")
    assert f"DINAT_CPU_KERNELS='{missing}' cannot be loaded" in result.stderr
