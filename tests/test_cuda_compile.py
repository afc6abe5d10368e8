"""Every torch-free CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90 with warnings as errors,
every __global__ kernel of the sources is emitted, and ptxas (-v) reports zero spill stores / loads for each.
No GPU needed: only nvcc. One process per (file, arch), run in parallel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")

ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
PROPS = re.compile(r"Function properties for (\w+)")


def compile_one(src: Path, arch: str, out_dir: Path) -> tuple[int, str]:
    cmd = [
        NVCC, "-std=c++17", "-O3", "-Werror", "all-warnings", "-Xptxas", "-v", "-I", str(ROOT / "csrc" / "common"),
        "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c", str(src), "-o", str(out_dir / f"{src.stem}_{arch}.o"),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def parse_ptxas(log: str) -> dict[str, dict]:
    """{function name: {"entry", "arch", "registers", "spill_stores", "spill_loads"}} from ptxas -v output. The
    spill line follows "Function properties for NAME" (entry kernels and any non-inlined device function)."""
    functions, entry, props = {}, None, None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            entry = m.group(1)
            functions.setdefault(entry, {})["entry"], functions[entry]["arch"] = True, m.group(2)
        elif m := PROPS.search(line):
            props = functions.setdefault(m.group(1), {"entry": False})
        elif props is not None and (m := SPILLS.search(line)):
            props["spill_stores"], props["spill_loads"] = int(m.group(1)), int(m.group(2))
        elif entry is not None and (m := REGS.search(line)):
            functions[entry]["registers"] = int(m.group(1))
    return functions


def global_kernels(src: Path) -> set[str]:
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", src.read_text()))


def test_every_kernel_compiles_for_sm80_and_sm90_without_warnings_or_spills(tmp_path):
    assert SOURCES, "no csrc/cuda/*.cu sources"
    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: compile_one(*job, tmp_path), jobs))
    report = []
    for (src, arch), (rc, log) in zip(jobs, results, strict=True):
        assert rc == 0, f"nvcc failed for {src.name} sm_{arch}:\n{log[-4000:]}"
        functions = parse_ptxas(log)
        kernels = {name: info for name, info in functions.items() if info["entry"]}
        for name in global_kernels(src):  # every kernel of the source, each instantiated at least once
            assert any(name in mangled for mangled in kernels), f"{name} missing from the sm_{arch} ptxas output"
        for name, info in functions.items():
            where = f"{src.name} sm_{arch} {name}"
            assert "spill_stores" in info, f"{where}: no spill report in the ptxas output\n{log[-2000:]}"
            assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{where} spills: {info}"
            if info["entry"]:
                assert info["arch"] == arch and "registers" in info, f"{where}: unparsed ptxas output"
                report.append(f"{where}: {info['registers']} registers, 0 spills")
    print("\n".join(report))
