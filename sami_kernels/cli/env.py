"""`python -m sami_kernels.cli.env` (or `sami-kernels env`): what a user pastes into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from ..kernels import backends


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"sami-kernels   {_version('sami-kernels')}",
        f"python         {platform.python_version()} ({platform.machine()}, {platform.system()})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    lines += [f"{dist:<14} {_version(dist)}" for dist in ("triton", "transformers", "peft", "flash-attn")]
    lines.append(f"cpu threads    {torch.get_num_threads()} ({torch.__config__.parallel_info().splitlines()[-1]})")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines.append(f"gpu            {gpu}")
    for var in (backends.ENV_VAR, "TRITON_INTERPRET"):
        lines.append(f"{var:<14} {os.environ.get(var, '(unset)')}")
    lines.append("backends:")
    for b in backends.probe().values():
        runs_on = ",".join(b.devices) or "-"
        lines.append(f"  {b.name:<7} runs on: {runs_on:<9} {b.detail}")
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        lines.append(f"auto on {device}: {backends.resolve(device)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
