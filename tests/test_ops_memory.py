"""The builds of the CPU kernels: which one loads, what the portable one contains, and each run
(through ``DINAT_CPU_KERNELS``, in a subprocess) against the reference.

The script reaches every path of the C code: clamped borders, dilation on maps that are not whole
windows, first keys or rpb offsets of neighbouring queries spread wider than a vector, head dims
that are not a multiple of the channel block, float32 and float64, the fused op forward and
backward, the unfused ops and a double backward. It runs on the portable build (what a CPU without
AVX2 gets) and on a build compiled with ``-fsanitize=address`` (no access outside an operand, its
readable slack, or the kernels' own scratch buffers; skipped where the C compiler or its ASan
runtime is missing). An unloadable ``DINAT_CPU_KERNELS`` warns.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dinat.ops.cpu

SOURCE = Path(dinat.ops.cpu.__file__).parent / "csrc" / "na_cpu.c"
PORTABLE, X86_64_V3 = (importlib.util.find_spec(f"dinat.ops.{name}") for name in ("_na_cpu", "_na_cpu_x86_64_v3"))
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

SCRIPT = """
import torch
from dinat.ops import cpu, na2d, na2d_av, na2d_qk, use_backend

assert cpu.available(), cpu.unavailable_reason()
GEOMETRIES = [  # kernel, dilation, (H, W), heads, head dim
    (7, 1, (14, 14), 2, 32),
    (7, 2, (15, 17), 3, 13),
    ((3, 3), (11, 12), (34, 38), 1, 5),
    ((5, 13), (1, 1), (7, 30), 2, 9),
    ((3, 9), (2, 9), (9, 85), 1, 3),
    (5, (2, 3), (11, 16), 3, 8),
]


def outputs(backend, q, k, v, rpb, kernel, dilation):
    with use_backend(backend):
        out = na2d(q, k, v, kernel, dilation, rpb)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
        first = [t.permute(0, 3, 1, 2, 4) for t in (q, k, v)]
        weights = na2d_qk(first[0], first[1], kernel, dilation, rpb).softmax(-1)
        mixed = na2d_av(weights, first[2], kernel, dilation)
        unfused = torch.autograd.grad(mixed.square().sum(), (q, k, v), create_graph=True)
        double = torch.autograd.grad(sum(g.square().sum() for g in unfused), (q, k, v))
    return (out, *grads, mixed, *unfused, *double)


for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):  # of each output's largest value
    for kernel, dilation, (height, width), heads, dim in GEOMETRIES:
        torch.manual_seed(0)
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        q, k, v = (torch.randn(1, height, width, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
        rpb = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, dtype=dtype, requires_grad=True)
        expected = outputs("reference", q, k, v, rpb, kernel, dilation)
        for ours, reference in zip(outputs("cpu", q, k, v, rpb, kernel, dilation), expected, strict=True):
            error = float((ours - reference).abs().max() / reference.abs().max())
            assert error <= tolerance, (dtype, kernel, dilation, error)
print("checked", 2 * len(GEOMETRIES), "geometries on", cpu.loaded_build())
"""


def _run_script(library: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DINAT_CPU_KERNELS=str(library), **env)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)


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
    result = _run_script(
        library,
        LD_PRELOAD=f"{asan} {cxx}",  # torch's C++ exceptions need libstdc++ loaded before ASan hooks them
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=99",
    )
    report = result.stderr[-6000:]
    assert "AddressSanitizer" not in result.stderr, report
    assert result.returncode == 0, report
    assert "checked 12 geometries on na_cpu_asan.so" in result.stdout


@pytest.mark.skipif(PORTABLE is None, reason="the CPU kernels were not built")
def test_portable_build_matches_the_reference() -> None:
    """What a CPU without AVX2 runs: the same results."""
    result = _run_script(Path(PORTABLE.origin))
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"checked 12 geometries on {Path(PORTABLE.origin).name}" in result.stdout


@pytest.mark.skipif(PORTABLE is None or not X86_64 or shutil.which("objdump") is None, reason="x86-64, objdump")
def test_portable_build_has_no_avx() -> None:
    """No 256- or 512-bit registers: the portable build must not die of an illegal instruction on
    an x86-64 CPU without AVX (as a -march=native build from an AVX-512 machine would)."""
    listing = subprocess.run(["objdump", "-d", PORTABLE.origin], capture_output=True, text=True, check=True).stdout
    assert "%xmm" in listing  # SSE2, the x86-64 baseline: the listing is the kernels'
    assert "%ymm" not in listing and "%zmm" not in listing


@pytest.mark.skipif(not (X86_64 and os.path.exists("/proc/cpuinfo")), reason="x86-64 Linux (/proc/cpuinfo)")
def test_fastest_build_the_cpu_runs_is_loaded() -> None:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    runs_v3 = {"avx2", "fma", "bmi1", "bmi2"} <= set(flags.split(":")[1].split())
    expected = X86_64_V3 if runs_v3 and X86_64_V3 is not None else PORTABLE
    if "DINAT_CPU_KERNELS" in os.environ or expected is None:
        pytest.skip("another build asked for, or none built")
    assert dinat.ops.cpu.loaded_build() == Path(expected.origin).name


def test_unloadable_kernel_override_warns(tmp_path: Path) -> None:
    """A DINAT_CPU_KERNELS that cannot be loaded is a warning naming it, not a silent fallback."""
    missing = tmp_path / "missing.so"
    script = "from dinat.ops import cpu; print(cpu.available(), cpu.unavailable_reason())"
    env = dict(os.environ, DINAT_CPU_KERNELS=str(missing), PYTHONWARNINGS="always")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("False the C kernels failed to load")
    assert f"DINAT_CPU_KERNELS='{missing}' cannot be loaded" in result.stderr
