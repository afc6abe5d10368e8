"""Atomic, verified checkpoints for resumable training loops.

Layout under `root`:
    step-00000012/weights.safetensors   tensors (contiguous, CPU), via safetensors
    step-00000012/state.pt              optimizer/scheduler state, RNG state, counters, via torch.save
    step-00000012/manifest.json         {"format": 1, "step": 12, "layout": "tensors",
                                         "files": {name: {"bytes": n[, "sha256": hex]}}}
    latest                              text file naming the newest checkpoint directory
A sharded checkpoint (layout "sharded", written by every process of a job at once) holds shards/ instead of
weights.safetensors: torch.distributed.checkpoint files (one per process, and .metadata), readable by any number of
processes.

A checkpoint is written into a `.tmp-step-*` sibling, every file fsync'ed, the manifest last, then renamed into place;
`latest` is replaced atomically after that. A kill at any moment leaves either the previous checkpoint or the new one
as `latest`, and whatever `latest` names is verified against its manifest before anything is returned: every file's
size, and its SHA-256 where the manifest has one. hashing says which files get one: "all", "small" (files up to
SMALL_FILE_BYTES: the state of a LoRA run or a small model; hashing a 7B model's multi-GB files every checkpoint
costs minutes) or "none".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
SHARDS_DIR = "shards"
SHARDS_METADATA = f"{SHARDS_DIR}/.metadata"
REQUIRED_FILES = {"tensors": (WEIGHTS_FILE, STATE_FILE), "sharded": (STATE_FILE, SHARDS_METADATA)}
HASHING = ("all", "small", "none")
SMALL_FILE_BYTES = 64 * 2**20
TEMP_PREFIX = ".tmp-"
STEP_DIR_PATTERN = re.compile(r"step-(\d{8,})")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, partial or unreadable; the message names the path and what is wrong."""


def save_checkpoint(
    root, step: int, tensors: dict[str, torch.Tensor], state: dict, *, keep_last: int = 1, hashing: str = "all"
) -> Path:
    """Write checkpoint `step` under `root` atomically, point `latest` at it and return its directory.

    `state` may hold anything `torch.load(weights_only=True)` accepts: tensors, numbers, strings, lists, tuples,
    dicts, None. Re-saving an existing step replaces it. Afterwards only the `keep_last` newest checkpoints up to
    `step` remain (higher steps, left by a rollback, are not touched) and stale `.tmp-*` entries are removed.
    """
    root, name = _check_arguments(root, step, keep_last, hashing)
    root.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=root))
    cpu_tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(cpu_tensors, temp_dir / WEIGHTS_FILE)
    _fsync_file(temp_dir / WEIGHTS_FILE)
    return _publish(root, temp_dir, step, state, "tensors", keep_last, hashing)


def save_sharded_checkpoint(
    root, step: int, shards: dict, state: dict, procs, *, keep_last: int = 1, hashing: str = "all"
) -> Path:
    """save_checkpoint for tensors sharded over the processes of a job (DTensors): every process calls it with its
    shards (a nested dict of tensors, torch.distributed.checkpoint writes each process's part), the main process
    writes `state` and publishes the checkpoint; all return when it is in place."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as save_shards

    root, name = _check_arguments(root, step, keep_last, hashing)
    temp_dir = root / f"{TEMP_PREFIX}{name}-sharded"
    if procs.is_main:
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir.mkdir(parents=True)
    procs.barrier()
    save_shards(shards, storage_writer=FileSystemWriter(temp_dir / SHARDS_DIR, sync_files=True))
    procs.barrier()
    if procs.is_main:
        _fsync_dir(temp_dir / SHARDS_DIR)
        _publish(root, temp_dir, step, state, "sharded", keep_last, hashing)
    procs.barrier()
    return root / name


def _check_arguments(root, step: int, keep_last: int, hashing: str) -> tuple[Path, str]:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if hashing not in HASHING:
        raise ValueError(f"checkpoint hashing must be one of {list(HASHING)}, got {hashing!r}")
    return Path(root), _step_dir_name(step)


def _publish(root: Path, temp_dir: Path, step: int, state: dict, layout: str, keep_last: int, hashing: str) -> Path:
    """state.pt and the manifest (every file's size and, by `hashing`, SHA-256) into temp_dir, then temp_dir renamed
    to the step's directory, `latest` pointed at it, older checkpoints pruned."""
    with open(temp_dir / STATE_FILE, "wb") as f:
        torch.save(state, f)
        _flush_and_sync(f)
    files = {}
    for path in sorted(p for p in temp_dir.rglob("*") if p.is_file()):
        size = path.stat().st_size
        hashed = hashing == "all" or (hashing == "small" and size <= SMALL_FILE_BYTES)
        files[path.relative_to(temp_dir).as_posix()] = {"bytes": size, **({"sha256": _sha256(path)} if hashed else {})}
    manifest = {"format": FORMAT_VERSION, "step": step, "layout": layout, "files": files}
    _write_synced(temp_dir / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    _fsync_dir(temp_dir)

    final_dir = root / _step_dir_name(step)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(temp_dir, final_dir)
    _fsync_dir(root)

    with tempfile.NamedTemporaryFile(dir=root, prefix=f"{TEMP_PREFIX}{LATEST_FILE}-", delete=False) as f:
        f.write(final_dir.name.encode())
        _flush_and_sync(f)
    os.replace(f.name, root / LATEST_FILE)
    _fsync_dir(root)

    _prune_older(root, step, keep_last)
    _remove_temp_entries(root)
    return final_dir


def load_latest(root) -> tuple[int, dict[str, torch.Tensor] | Path, dict] | None:
    """Return (step, tensors, state) of the checkpoint `root/latest` names, or None when there is none yet; for a
    sharded checkpoint `tensors` is the directory of its shards (read by training.restore_training_state).

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
        tensors = directory / SHARDS_DIR if manifest["layout"] == "sharded" else load_file(directory / WEIGHTS_FILE)
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
    manifest.setdefault("layout", "tensors")
    if manifest["layout"] not in REQUIRED_FILES:
        raise _corrupt(directory, f"{MANIFEST_FILE} has an unknown layout {manifest['layout']!r}")
    for file in REQUIRED_FILES[manifest["layout"]]:
        if file not in files:
            raise _corrupt(directory, f"{MANIFEST_FILE} does not list {file}")
    return manifest


def _verify_file(directory: Path, file: str, expected) -> None:
    parts = PurePosixPath(file).parts
    if not parts or parts[0] == "/" or ".." in parts or not isinstance(expected, dict):
        raise _corrupt(directory, f"{MANIFEST_FILE} has an invalid entry {file!r}")
    path = directory / file
    if not path.is_file():
        raise _corrupt(directory, f"{file} is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise _corrupt(directory, f"{file} size mismatch (expected {expected.get('bytes')} bytes, found {size})")
    if "sha256" not in expected:
        return
    digest = _sha256(path)
    if digest != expected["sha256"]:
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
