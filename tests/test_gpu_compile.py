"""The Triton compile check (sami_kernels/kernels/compile_check.py): kernel discovery and the occupancy formula here,
then every variant the launchers produce compiled for sm_80 and sm_90 without a GPU, in its own process (kernels
decorated under the interpreter cannot be compiled): tensor-core instructions in every 16-bit or tf32 matmul kernel,
zero spills, at least one resident CTA per SM."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sami_kernels.kernels import compile_check

PACKAGE = Path(compile_check.__file__).resolve().parents[1]


def _jit_names_by_text():
    """Every function under a @triton.jit line, found by a plain text scan (a second opinion on the AST walk)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        names |= {lines[i + 1].split("(")[0].removeprefix("def ") for i, line in enumerate(lines[:-1])
                  if line.strip().startswith("@triton.jit")}  # fmt: skip
    return names


def test_discovery_finds_every_kernel_of_the_package():
    found = compile_check.discover()
    launched = {k for d in found.values() for k in d["launched"]}
    helpers = {k for d in found.values() for k in d["helpers"]}
    assert all(not d["unreached"] for d in found.values()), found
    assert launched | helpers == _jit_names_by_text()
    assert {"_lp_fwd_kernel", "_lp_merge_kernel", "_lp_dlogits_kernel", "_infonce_kernel"} <= launched
    assert "_logits_tile" in helpers  # compiled through the forward and backward kernels that call it


def test_discovery_classifies_a_new_module(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "triton_new.py").write_text(
        textwrap.dedent(
            """
            import triton
            from triton import jit

            @jit
            def _inner(x):
                return x

            @triton.jit(do_not_specialize=["n"])
            def _helper(x):
                return _inner(x)

            @triton.jit
            def _new_kernel(x_ptr, n):
                _helper(x_ptr)

            @triton.jit
            def _forgotten(x_ptr):
                pass

            def launch(x):
                _new_kernel[(1,)](x, 3)
            """
        )
    )
    assert compile_check.discover(tmp_path) == {
        f"{tmp_path.name}.sub.triton_new": dict(
            launched=["_new_kernel"], helpers=["_helper", "_inner"], unreached=["_forgotten"]
        )
    }


@pytest.mark.parametrize(
    "arch,registers,warps,shared,expected",
    [
        (90, 128, 8, 0, (2, "registers")),  # 4096 registers a warp: 16 warps
        (80, 66, 1, 0, (28, "registers")),  # 66 x 32 = 2112 rounds up to 2304 a warp: 28 warps, not 31
        (80, 16, 1, 0, (32, "ctas")),
        (80, 32, 16, 0, (4, "threads")),
        (80, 32, 4, 100 << 10, (1, "shared")),  # 101 KB with the reserved 1 KB: one in 164 KB
        (90, 32, 4, 100 << 10, (2, "shared")),  # two in 228 KB
        (90, 32, 4, 114 << 10, (1, "shared")),  # 115 KB: one (two without the reserved 1 KB)
        (80, 32, 4, 164 << 10, (0, "shared")),  # over the 163 KB a CTA may have
    ],
)
def test_occupancy_matches_hand_computed_values(arch, registers, warps, shared, expected):
    assert compile_check.occupancy(arch, registers, warps, shared) == expected


def _run_check(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sami_kernels.kernels.compile_check", *args],
        capture_output=True,
        text=True,
        timeout=2400,
        cwd=cwd,
        env=env,
    )


def test_a_launched_kernel_no_workload_reaches_fails_the_check(tmp_path):
    """A copy of the package with one more kernel, launched by a new launcher: the check refuses to pass."""
    pytest.importorskip("triton", reason="the Triton backend is optional")
    copy = tmp_path / "sami_kernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("data", "*.so", "__pycache__"))
    module = copy / "kernels" / "triton_infonce.py"
    module.write_text(
        module.read_text()
        + textwrap.dedent(
            """

            @triton.jit
            def _unvisited_kernel(x_ptr):
                tl.store(x_ptr, 0.0)


            def unvisited(x):
                _unvisited_kernel[(1,)](x)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = _run_check("--dry-run", cwd=tmp_path, env=env)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "triton_infonce._unvisited_kernel is launched but no workload reaches it" in run.stdout


def test_every_variant_compiles_for_sm80_and_sm90_with_tensor_cores_no_spills_and_resident_ctas(tmp_path):
    pytest.importorskip("triton", reason="the Triton backend is optional; without triton there is nothing to compile")
    out = tmp_path / "compile.json"
    run = _run_check("--json", str(out))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows, discovered = report["rows"], report["discovered"]
    assert report["problems"] == []
    assert {r["kernel"] for r in rows} == {k for d in discovered.values() for k in d["launched"]}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for kernel in ("_lp_fwd_kernel", "_lp_dlogits_kernel"):
        variants = {(r["arch"], r["dtype"], r["bias"], r["precision"]) for r in rows if r["kernel"] == kernel}
        for arch in ("sm_80", "sm_90"):
            for bias in (False, True):
                assert {(arch, "bf16", bias, "ieee"), (arch, "fp16", bias, "ieee")} <= variants, kernel
                assert {(arch, "fp32", bias, "ieee"), (arch, "fp32", bias, "tf32")} <= variants, kernel
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} {r['constexprs']} ({r['workloads'][0]})"
        assert r["error"] is None, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills"
        assert r["ctas_per_sm"] >= 1, where
        if r["matmul"] and (r["dtype"] in ("bf16", "fp16") or r["precision"] == "tf32"):
            assert r["mma_sync"] or r["wgmma"], f"{where}: no mma / wgmma in the PTX"
    big_tile_hopper = [
        r
        for r in rows
        if r["kernel"] == "_lp_fwd_kernel" and r["arch"] == "sm_90" and r["dtype"] == "bf16"
        and r["constexprs"]["BLOCK_T"] >= 64
    ]  # fmt: skip
    assert big_tile_hopper and all(r["wgmma"] for r in big_tile_hopper)
