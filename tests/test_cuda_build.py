"""Full build of the CUDA extension against a CUDA build of torch, without a GPU.

A second virtual environment, .venv-cuda (gitignored), holds torch==2.14.1 (a CUDA 13.0 build); it is created
when missing (~2 min, ~5.5 GB) and reused when it already has that torch. The sources (git ls-files -co
--exclude-standard) are mirrored into .venv-cuda/build-src, a scratch copy outside the package the CPU venv
imports (an editable build writes its .so files next to the sources: built in the repo, a CUDA-torch .so would
shadow the CPU one). Then, in that venv: `pip install --no-build-isolation --no-deps -e <copy>` (skipped when the
build inputs - csrc/, setup.py, pyproject.toml, torch version - hash to those of the last successful build; set
SAMI_FORCE_CUDA_BUILD=1 to rebuild anyway), `import sami_kernels`, and the cuda backend must report "built, no
device", with the CUDA kernels of every op registered and a clear error when asked to run.
Measured here (2 cores): from scratch 4.2 min (venv 81 s + build 158 s), rebuild 2.5-3 min, unchanged 10 s."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cuda_compile import find_nvcc

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-cuda"
PY = VENV / "bin" / "python"
COPY = VENV / "build-src"
TORCH = "2.14.1"
OPS = ("linear_logprobs_fwd", "linear_logprobs_bwd", "infonce_fwd", "segment_sum", "segment_sum_backward")

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")

CHECK = f"""
import json, torch, sami_kernels as sk
from sami_kernels import backends
out = {{"file": sk.__file__, "cuda_torch": torch.version.cuda, "detail": backends.probe()["cuda"].detail}}
out["cuda_kernels"] = {{op: torch._C._dispatch_has_kernel_for_dispatch_key("sami_kernels_C::" + op, "CUDA")
                       for op in {OPS!r}}}
try:
    sk.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="cuda")
    out["error"] = None
except Exception as err:
    out["error"] = f"{{type(err).__name__}}: {{err}}"
print(json.dumps(out))
"""


def _run(cmd, log: Path, timeout: int, **kw) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw).returncode
    if rc != 0:
        lines = log.read_text().splitlines()
        errors = [line for line in lines if "error" in line.lower()][:30]  # compiler errors come long before the end
        tail = "\n".join(["first error lines:", *errors, "", "last lines:", *lines[-40:]])
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited {rc}; log {log}:\n{tail}")


def _ensure_venv(log: Path) -> None:
    if PY.exists():
        probe = subprocess.run([PY, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip().startswith(TORCH):
            return
        shutil.rmtree(VENV)
    _run([sys.executable, "-m", "venv", VENV], log, 300)
    _run([PY, "-m", "pip", "install", "-q", f"torch=={TORCH}", "numpy", "setuptools", "ninja"], log, 1800)


def _mirror_sources() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    files = {f for f in listed if f and (ROOT / f).is_file()}
    for rel in files:
        src, dst = ROOT / rel, COPY / rel
        if not (dst.exists() and filecmp.cmp(src, dst, shallow=False)):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for dst in COPY.rglob("*"):  # drop sources deleted in the repo (build outputs are not under version control)
        rel = dst.relative_to(COPY).as_posix()
        if dst.is_file() and rel not in files and dst.suffix in (".py", ".cpp", ".cu", ".cuh", ".h", ".toml"):
            if not rel.startswith(("build/", "sami_kernels.egg-info/")):
                dst.unlink()


def _inputs_hash() -> str:
    torch_version = subprocess.run([PY, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    digest = hashlib.sha256(torch_version.stdout.encode())
    for path in sorted([*COPY.glob("csrc/**/*"), COPY / "setup.py", COPY / "pyproject.toml"]):
        if path.is_file():
            digest.update(path.relative_to(COPY).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# No pytest-timeout here: every subprocess has its own limit (venv 30 min, build 50 min, check 5 min).
def test_cuda_extension_builds_against_cuda_torch_and_reports_no_device(tmp_path):
    log = tmp_path / "build.log"
    start = time.monotonic()
    _ensure_venv(log)
    venv_s = time.monotonic() - start
    _mirror_sources()
    stamp, inputs = COPY / ".sami-built-inputs", _inputs_hash()
    built = list(COPY.glob("sami_kernels/_C_cuda*.so"))
    if os.environ.get("SAMI_FORCE_CUDA_BUILD") == "1" or not built or not stamp.exists() or stamp.read_text() != inputs:
        stamp.unlink(missing_ok=True)
        env = dict(os.environ, CUDA_HOME=os.path.dirname(os.path.dirname(find_nvcc())), MAX_JOBS="2")
        _run([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", COPY], log, 3000, env=env)
        stamp.write_text(inputs)
    build_s = time.monotonic() - start - venv_s
    run = subprocess.run([PY, "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"venv {venv_s:.0f} s, build {build_s:.0f} s: {out}")
    assert Path(out["file"]).resolve().is_relative_to(COPY.resolve()), out["file"]
    assert out["cuda_torch"], "the .venv-cuda torch is not a CUDA build"
    assert out["detail"] == "built, no device", out["detail"]
    assert all(out["cuda_kernels"].values()), f"ops without a CUDA kernel: {out['cuda_kernels']}"
    assert out["error"] is not None and "cannot run on cpu tensors here: built, no device" in out["error"], out
