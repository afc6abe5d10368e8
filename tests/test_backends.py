"""Backend registry: what exists here, auto choice, overrides and their errors, and the env report."""

import subprocess
import sys

import pytest
import torch

from sami_kernels import backends


def test_torch_backend_always_usable_and_auto_prefers_the_extension_on_cpu():
    usable = backends.usable("cpu")
    assert "torch" in usable
    expected = "cpu" if "cpu" in usable else "torch"
    assert backends.resolve("cpu") == expected


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("cpu") == "torch"
    if "cpu" in backends.usable("cpu"):
        assert backends.resolve("cpu", "cpu") == "cpu"


def test_bad_overrides_name_the_source(monkeypatch):
    with pytest.raises(ValueError, match="backend must be"):
        backends.resolve("cpu", "fastest")
    monkeypatch.setenv(backends.ENV_VAR, "quantum")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("cpu")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        backends.resolve("cpu", "cuda")


def test_triton_runs_on_cpu_only_under_the_interpreter():
    triton_backend = backends.probe()["triton"]
    if backends.triton_interpreting() and triton_backend.detail != "not installed":
        assert "cpu" in triton_backend.devices
    elif not torch.cuda.is_available():
        assert triton_backend.devices == ()


def test_env_report_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sami_kernels.cli.env"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "auto on cpu:" in out.stdout
