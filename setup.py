"""Builds the optional vectorised CPU kernels of neighborhood attention.

The kernels are plain C (no Python or torch headers), so they build in a second with the system
compiler; `dinat.ops.cpu` loads them with ctypes. If the compiler is missing or fails, the package
still installs and the ops fall back to the pure-PyTorch path.
"""

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
                print(f"dinat: CPU kernels not built with OpenMP={openmp} ({err})", file=sys.stderr)
        print("dinat: the PyTorch fallback will be used on the CPU", file=sys.stderr)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # loaded with ctypes, not imported: no PyInit_ symbol


setup(
    ext_modules=[
        Extension(
            "dinat.ops._na_cpu",
            sources=["src/dinat/ops/csrc/na_cpu.c"],
            depends=["src/dinat/ops/csrc/na_kernels.h"],
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-std=c11"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
