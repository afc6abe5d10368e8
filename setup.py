"""Builds the C++ extension `sami_kernels._C` (CPU kernels, csrc/cpu/) and, when torch was built with CUDA and
nvcc is found (CUDA_HOME, else /usr/local/cuda), `sami_kernels._C_cuda` (csrc/cuda/: torch-free kernels in .cu
files + binding.cpp, which registers the CUDA implementations of the same ops).

Build with `pip install --no-build-isolation -e .` so the extension compiles against the torch already
installed (build isolation would resolve another torch). OpenMP flags go to compile AND link, or
at::parallel_for silently runs on one thread.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# torch >= 2.14 headers require C++20 (ATen.h checks __cplusplus); the torch-free .cu files stay C++17
TORCH_MINOR = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
CXX_STD = "-std=c++20" if TORCH_MINOR >= (2, 14) else "-std=c++17"


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    return CppExtension(
        name="sami_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "common")],
        extra_compile_args=["-O3", CXX_STD, "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )


def cuda_extension():
    """The CUDA extension, or None for a CPU torch / no nvcc (torch finds CUDA_HOME, else nvcc on PATH, else
    /usr/local/cuda)."""
    if not torch.version.cuda or not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        why = "no nvcc (set CUDA_HOME)" if torch.version.cuda else "CPU torch"
        print(f"sami-kernels: {why}, building the CPU extension only")
        return None
    archs = ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + [os.path.join("csrc", "cuda", "binding.cpp")]
    return CUDAExtension(
        name="sami_kernels._C_cuda",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "common"), os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", CXX_STD], "nvcc": ["-O3", "-std=c++17"] + [f"-gencode={a}" for a in archs]},
    )


setup(
    ext_modules=[ext for ext in (cpu_extension(), cuda_extension()) if ext is not None],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
