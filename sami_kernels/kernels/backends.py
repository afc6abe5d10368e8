"""Which kernel backends exist here, and which one runs for a given device.

    triton  fused Triton kernels: CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)
    cuda    the CUDA C++ extension (sami_kernels._C_cuda), built only against a CUDA torch
    cpu     the C++ CPU extension (sami_kernels._C): chunked ATen GEMMs + fused OpenMP epilogues
    torch   pure PyTorch, chunked; always available

Choice: the `backend=` argument, else the SAMI_KERNELS_BACKEND environment variable, else "auto":
triton, then cuda, then torch on a GPU; cpu, then torch on the CPU (the interpreter is for tests only).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "SAMI_KERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # device types it can run on here; empty when unusable
    detail: str


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _import_extension(name: str):
    try:
        return importlib.import_module(f"sami_kernels.{name}"), "built"
    except ImportError as err:
        return None, f"not built ({err})"


def cpu_extension():
    """The loaded sami_kernels._C module (registers torch.ops.sami_kernels_C.*), or None."""
    return _import_extension("_C")[0]


@functools.cache
def probe() -> dict[str, Backend]:
    """Probe every backend once per process."""
    found = {}
    if importlib.util.find_spec("triton") is None:
        found["triton"] = Backend("triton", (), "not installed")
    elif triton_interpreting():
        found["triton"] = Backend("triton", ("cpu",), "interpreter (TRITON_INTERPRET=1): CPU tensors, slow")
    elif torch.cuda.is_available():
        found["triton"] = Backend("triton", ("cuda",), f"GPU: {torch.cuda.get_device_name()}")
    else:
        found["triton"] = Backend("triton", (), "installed; no GPU (set TRITON_INTERPRET=1 to interpret)")

    cpu_mod, cpu_state = _import_extension("_C")  # defines the op schemas the CUDA extension implements
    cuda_mod, cuda_state = _import_extension("_C_cuda")
    if cuda_mod is not None and torch.cuda.is_available():
        found["cuda"] = Backend("cuda", ("cuda",), "built")
    elif cuda_mod is not None:
        found["cuda"] = Backend("cuda", (), "built, no device")
    else:
        found["cuda"] = Backend("cuda", (), cuda_state)

    found["cpu"] = Backend("cpu", ("cpu",) if cpu_mod is not None else (), cpu_state)
    found["torch"] = Backend("torch", ("cpu", "cuda"), "always available")
    return found


def usable(device: torch.device | str) -> list[str]:
    device_type = torch.device(device).type
    return [name for name, b in probe().items() if device_type in b.devices]


@torch.compiler.disable  # host-side choice: torch.compile must not trace the probes
def resolve(device: torch.device | str, backend: str = "auto") -> str:
    """The backend name that runs for tensors on `device` (argument > environment variable > auto)."""
    requested = backend if backend != "auto" else os.environ.get(ENV_VAR, "auto") or "auto"
    device_type = torch.device(device).type
    here = usable(device_type)
    if requested == "auto":
        return next(name for name in _AUTO_ORDER.get(device_type, ("torch",)) if name in here)
    if requested not in BACKENDS:
        source = "backend" if backend != "auto" else ENV_VAR
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {requested!r}")
    if requested not in here:
        raise ValueError(f"backend {requested!r} cannot run on {device_type} tensors here: {probe()[requested].detail}")
    return requested
