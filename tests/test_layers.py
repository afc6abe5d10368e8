"""The package's layers (kernels <- engine <- recipes | integrations <- cli) are a contract, checked by import-linter
from pyproject.toml; these tests run it, and show that it catches an upward import and a kernel module importing
transformers."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_top_level_holds_at_most_eight_modules():
    modules = [p.name for p in (ROOT / "sami_kernels").glob("*.py")]
    assert len(modules) <= 8, modules


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("kernels/backends.py", "import transformers", "sami_kernels.kernels is not allowed to import transformers"),
        ("kernels/reference.py", "import peft", "sami_kernels.kernels is not allowed to import peft"),
        (
            "engine/pairs.py",
            "from ..recipes import training",
            "sami_kernels.engine is not allowed to import sami_kernels.recipes",
        ),
        (
            "recipes/data.py",
            "from ..integrations import hf_trainer",
            "sami_kernels.recipes is not allowed to import sami_kernels.integrations",
        ),
    ],
)
def test_contracts_catch_a_violation(tmp_path, module, line, broken):
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "sami_kernels", copy / "sami_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    with open(copy / "sami_kernels" / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}  # the violation under test\n")
    result = lint_imports(copy)
    assert result.returncode != 0, result.stdout
    assert "1 broken" in result.stdout and broken in result.stdout, result.stdout
