"""Atomic, verified checkpoints for resumable training loops.

Layout under `root`:
    step-00000012/weights.safetensors   tensors (contiguous, CPU), via safetensors
    step-00000012/state.pt              optimizer/scheduler state, RNG state, counters, via torch.save
    step-00000012/manifest.json         {"format": 1, "step": 12, "files": {name: {"bytes": n, "sha256": hex}}}
    latest                              text file naming the newest checkpoint directory

A checkpoint is written into a `.tmp-step-*` sibling, every file fsync'ed, the manifest last, then renamed into place;
`latest` is replaced atomically after that. A kill at any moment leaves either the previous checkpoint or the new one
as `latest`, and whatever `latest` names is verified against its manifest before anything is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
REQUIRED_FILES = (WEIGHTS_FILE, STATE_FILE)
TEMP_PREFIX = ".tmp-"
STEP_DIR_PATTERN = re.compile(r"step-(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, partial or unreadable; the message names the path and what is wrong."""


def save_checkpoint(root, step: int, tensors: dict[str, torch.Tensor], state: dict, *, keep_last: int = 1) -> Path:
    """Write checkpoint `step` under `root` atomically, point `latest` at it and return its directory.

    `state` may hold anything `torch.load(weights_only=True)` accepts: tensors, numbers, strings, lists, tuples,
    dicts, None. Re-saving an existing step replaces it. Afterwards only the `keep_last` newest checkpoints up to
    `step` remain (higher steps, left by a rollback, are not touched) and stale `.tmp-*` entries are removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = _step_dir_name(step)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=root))

    cpu_tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(cpu_tensors, temp_dir / WEIGHTS_FILE)
    _fsync_file(temp_dir / WEIGHTS_FILE)
    with open(temp_dir / STATE_FILE, "wb") as f:
        torch.save(state, f)
        _flush_and_sync(f)
    files = {
        file: {"bytes": (temp_dir / file).stat().st_size, "sha256": _sha256(temp_dir / file)} for file in REQUIRED_FILES
    }
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    _write_synced(temp_dir / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    _fsync_dir(temp_dir)

    final_dir = root / name
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(temp_dir, final_dir)
    _fsync_dir(root)

    with tempfile.NamedTemporaryFile(dir=root, prefix=f"{TEMP_PREFIX}{LATEST_FILE}-", delete=False) as f:
        f.write(name.encode())
        _flush_and_sync(f)
    os.replace(f.name, root / LATEST_FILE)
    _fsync_dir(root)

    _prune_older(root, step, keep_last)
    _remove_temp_entries(root)
    return final_dir


def load_latest(root) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """Return (step, tensors, state) of the checkpoint `root/latest` names, or None when there is none yet.

    None means a fresh start: `root` or `root/latest` does not exist. Anything else that is not a complete checkpoint
    matching its manifest raises CheckpointError. Tensors in `state` are loaded onto the CPU.
    """
    root = Path(root)
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    name = latest.read_text(errors="replace").strip()
    match = STEP_DIR_PATTERN.fullmatch(name)
    if match is None:
        raise CheckpointError(f"{latest} is corrupt: it should name a step-NNNNNNNN directory, found {name!r}")
    directory = root / name
    if not directory.is_dir():
        raise _corrupt(directory, f"the directory does not exist (named by {latest})")
    manifest = _read_manifest(directory, expected_step=int(match.group(1)))
    for file, expected in manifest["files"].items():
        _verify_file(directory, file, expected)
    try:
        tensors = load_file(directory / WEIGHTS_FILE)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _corrupt(directory, f"files match the manifest but cannot be loaded ({error})") from error
    return manifest["step"], tensors, state


def rng_state() -> dict:
    """Capture the python, numpy, torch CPU and (when available) all CUDA RNG states, as weights_only-loadable types."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "algorithm": str(algorithm),
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured; CUDA states are restored when CUDA is available, ignored otherwise."""
    version, internal_state, gauss_next = state["python"]
    random.setstate((version, tuple(internal_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _corrupt(directory: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {directory} is corrupt: {problem}; delete the directory to start over or restore it"
    )


def _read_manifest(directory: Path, expected_step: int) -> dict:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise _corrupt(directory, f"{MANIFEST_FILE} is missing") from None
    except (OSError, ValueError) as error:
        raise _corrupt(directory, f"{MANIFEST_FILE} cannot be read ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise _corrupt(directory, f"{MANIFEST_FILE} is not format {FORMAT_VERSION}")
    if manifest.get("step") != expected_step:
        raise _corrupt(directory, f"{MANIFEST_FILE} says step {manifest.get('step')!r}, expected {expected_step}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(directory, f"{MANIFEST_FILE} has no 'files' mapping")
    for file in REQUIRED_FILES:
        if file not in files:
            raise _corrupt(directory, f"{MANIFEST_FILE} does not list {file}")
    return manifest


def _verify_file(directory: Path, file: str, expected) -> None:
    if Path(file).name != file or not isinstance(expected, dict):
        raise _corrupt(directory, f"{MANIFEST_FILE} has an invalid entry {file!r}")
    path = directory / file
    if not path.is_file():
        raise _corrupt(directory, f"{file} is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise _corrupt(directory, f"{file} size mismatch (expected {expected.get('bytes')} bytes, found {size})")
    digest = _sha256(path)
    if digest != expected.get("sha256"):
        raise _corrupt(directory, f"{file} sha256 mismatch (expected {expected.get('sha256')}, found {digest})")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _flush_and_sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        _flush_and_sync(f)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune_older(root: Path, step: int, keep_last: int) -> None:
    older = sorted(
        (int(match.group(1)), entry)
        for entry in root.iterdir()
        if entry.is_dir() and (match := STEP_DIR_PATTERN.fullmatch(entry.name)) and int(match.group(1)) < step
    )
    for _, entry in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(entry)


def _remove_temp_entries(root: Path) -> None:
    for entry in root.iterdir():
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
