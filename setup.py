"""Builds the C++ extension `sami_kernels._C` (CPU kernels, csrc/cpu/).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch already
installed (build isolation would resolve another torch). OpenMP flags go to compile AND link, or
at::parallel_for silently runs on one thread.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    return CppExtension(
        name="sami_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "common")],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
