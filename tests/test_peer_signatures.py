"""Every call benchmarks/bench_gpu.py makes into a peer package (torch's linear_cross_entropy, Liger-Kernel,
cut-cross-entropy, triton.testing.do_bench) fits the installed release's signature. No GPU: each peer function is
replaced by a stand-in that binds the exact arguments the benchmark passes to the real function's signature."""

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from sami_kernels import reference

_SPEC = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_gpu)


def _peer(provider):
    module, name = bench_gpu.PEERS[provider]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:  # the gpu extra pins them; a CPU-only install may lack them
        pytest.skip(f"{module} is not installed: {err}")


def _binding_stand_in(real, result):
    """(fake, calls): fake(*args, **kwargs) binds them to real's signature (TypeError if they do not fit; every
    keyword must name a declared parameter, not vanish into **kwargs), records the binding, returns result()."""
    signature = inspect.signature(real)
    calls = []

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        unknown = [key for key in kwargs if key not in signature.parameters]
        assert not unknown, f"{real.__qualname__} has no parameters {unknown} (they would vanish into **kwargs)"
        calls.append(bound.arguments)
        return result(*args)

    return fake, calls


def test_every_peer_provider_has_a_checked_call():
    peers = [p for p in bench_gpu.PROVIDERS if not p.startswith("sami-") and p != "naive"]
    assert peers == list(bench_gpu.PEERS)


@pytest.mark.parametrize("provider", list(bench_gpu.PEERS))
def test_peer_call_fits_the_released_signature(provider):
    real = _peer(provider)
    fake, calls = _binding_stand_in(real, lambda h, w, y, *_: torch.zeros(y.shape, dtype=h.dtype))
    h, w, y = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(11, 8, dtype=torch.bfloat16), torch.arange(5)
    logp = bench_gpu.peer_logprobs(provider, fake)(h, w, y)
    assert logp.shape == (5,) and logp.dtype == torch.float32
    (arguments,) = calls
    first_three = list(inspect.signature(real).parameters)[:3]  # hidden, weight, targets in the peer's names
    assert all(arguments[name] is t for name, t in zip(first_three, (h, w, y), strict=True))
    assert arguments["reduction"] == "none"  # per-token losses: the benchmark backpropagates a random upstream
    if provider == "cce":
        assert arguments["filter_eps"] is None  # exact gradients, like every other provider
    if provider == "cce-filter":
        assert "filter_eps" not in arguments  # the released default


def test_torch_lce_call_gives_log_probs():
    """The one peer that runs on CPU: the benchmark's call returns log-probs (the negated per-token loss)."""
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip(f"torch {torch.__version__} has no linear_cross_entropy")
    h, w, y = (
        torch.randn(7, 8, dtype=torch.float64),
        torch.randn(13, 8, dtype=torch.float64),
        torch.randint(0, 13, (7,)),
    )
    logp = bench_gpu.peer_logprobs("torch-lce", _peer("torch-lce"))(h, w, y)
    torch.testing.assert_close(logp, reference.linear_logprobs(h, w, y).float())


def test_do_bench_call_fits_the_released_signature():
    triton_testing = pytest.importorskip("triton.testing")
    fake, calls = _binding_stand_in(triton_testing.do_bench, lambda fn: [2.0, 1.0, 3.0])
    assert bench_gpu.timings(fake, lambda: None) == (2.0, 1.0, 3.0)
    (arguments,) = calls
    assert arguments["quantiles"] == [0.5, 0.2, 0.8]
