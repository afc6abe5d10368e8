"""pytest-benchmark view of bench_logprobs.py (same providers and workloads, in one process, so no memory
column): `pytest benchmarks/ --benchmark-only`. The standalone script is the report of record."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_logprobs  # noqa: E402

CASES = [c for c in bench_logprobs._cases() if c["T"] == 1024 and c["dtype"] == "float32"]
# sami-cpu-mkl switches the process's GEMM library once, before the first GEMM: it needs a process of its own
PROVIDERS = [p for p in bench_logprobs._providers() if p != "sami-cpu-mkl"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["mode"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_logprobs_fwd_bwd(benchmark, provider, case):
    step = bench_logprobs.build(provider, case)
    benchmark.extra_info.update(flops=case["flops"], shape=case["shape"], dtype=case["dtype"])
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
