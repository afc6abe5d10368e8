"""Test set-up. Without a GPU, Triton kernels can only run under the interpreter, and TRITON_INTERPRET must
be set before anything imports triton: do it here, first."""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from sami_kernels import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    usable = ", ".join(backends.usable("cpu"))
    return f"sami-kernels backends usable on cpu: {usable}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
