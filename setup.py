"""Builds the optional vectorised CPU kernels of neighborhood attention.

The kernels are plain C (no Python or torch headers), so they build in a second with the system
compiler; `dinat.ops.cpu` loads them with ctypes. If the compiler is missing or fails, the package
still installs and the ops fall back to the pure-PyTorch path.

Two builds on x86-64, none for the installing machine only (-march=native): a wheel or a shared
virtualenv built on one machine must not die of an illegal instruction on an older one. `_na_cpu`
runs on any CPU of the architecture; `_na_cpu_x86_64_v3` (AVX2 and FMA, CPUs since 2013) is 3-5x
faster and is loaded where the CPU runs it. A native build on an AVX-512 machine measured no faster
than x86-64-v3 (the kernels use 256-bit vectors; BENCHMARKS.md).
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as err:  # noqa: BLE001 - any build failure must leave a working install
            print(f"dinat: CPU kernels not built ({err}); the PyTorch fallback will be used", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        """Build with OpenMP (multi-threaded kernels), else without it (one thread), else give up."""
        for openmp in (True, False):
            if not openmp:
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
                ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # noqa: BLE001 - any build failure must leave a working install
                print(f"dinat: {ext.name} not built with OpenMP={openmp} ({err})", file=sys.stderr)
        fallback = "the PyTorch fallback" if ext.name == PORTABLE else "the portable build"
        print(f"dinat: {ext.name} not built; {fallback} will be used on the CPU", file=sys.stderr)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # loaded with ctypes, not imported: no PyInit_ symbol


def kernels(name: str, target_flags: list[str]) -> Extension:
    return Extension(
        name,
        sources=["src/dinat/ops/csrc/na_cpu.c"],
        depends=["src/dinat/ops/csrc/na_kernels.h"],
        extra_compile_args=["-O3", "-fopenmp", "-std=c11", *target_flags],
        extra_link_args=["-fopenmp"],
        libraries=["m"],
    )


PORTABLE = "dinat.ops._na_cpu"
extensions = [kernels(PORTABLE, [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    # -Wno-psabi: GCC notes that 512-bit double vectors pass differently without AVX-512 (inline only)
    extensions.append(kernels("dinat.ops._na_cpu_x86_64_v3", ["-march=x86-64-v3", "-Wno-psabi"]))

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
