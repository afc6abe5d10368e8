"""The public calls never synchronise a GPU with the host (by default, validate=None: device-side asserts instead of
host checks), forward and backward, on every GPU backend: each runs once to warm up (kernel compilation, cuBLAS
handles), then again under torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising CUDA call
(item / bool / nonzero / blocking copies / stream or device synchronise). Bad data still fails: as a device-side
assert (in a subprocess, since it leaves the CUDA context unusable) by default, as a ValueError with validate=True."""

import subprocess
import sys
import textwrap

import pytest
import torch

import sami_kernels as sk
from sami_kernels import backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"


def _need(backend):
    if backend not in backends.usable(DEV):
        pytest.skip(f"backend {backend!r} is not usable on the GPU here: {backends.probe()[backend].detail}")


def _calls(backend, frozen):
    """name -> (call, leaves): every public entry point, with unscored (-1) and ignored (-100) tokens."""
    T, H, V, B, N = 37, 64, 300, 2, 2
    h = torch.randn(T, H, device=DEV, requires_grad=True)
    w = torch.randn(V, H, device=DEV, requires_grad=not frozen)
    b = torch.randn(V, device=DEV, requires_grad=not frozen)
    y = torch.randint(0, V, (T,), device=DEV)
    y[::7] = -100
    ids = torch.arange(T, device=DEV) % (B * N * N)
    ids[::5] = -1
    cu = torch.tensor([0, 10, 10, 25, T], device=DEV)
    M = torch.randn(3, 4, 4, device=DEV, requires_grad=True)
    trainable = [t for t in (h, w, b) if t.requires_grad]
    return {
        "linear_logprobs": (lambda: sk.linear_logprobs(h, w, y, bias=b, backend=backend), trainable),
        "sequence_logprobs(seq_ids)": (
            lambda: sk.sequence_logprobs(h, w, y, ids, B * N * N, backend=backend),
            trainable,
        ),
        "sequence_logprobs(cu_seqlens)": (
            lambda: sk.sequence_logprobs(h, w, y, cu_seqlens=cu, reduction="sum", bias=b, backend=backend),
            trainable,
        ),
        "sami_loss": (
            lambda: sk.sami_loss(h, w, y, ids, num_queries=B, num_constitutions=N, bias=b, backend=backend)[0],
            trainable,
        ),
        "infonce_loss": (lambda: sk.infonce_loss(M, reduction="none", backend=backend), [M]),
    }


def _forward_backward(call, leaves):
    out = call()
    upstream = torch.randn(out.shape, device=DEV)  # random upstream gradient; randn does not synchronise
    return out, torch.autograd.grad(out, leaves, upstream)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("frozen", [False, True])
def test_public_calls_never_synchronise(backend, frozen):
    _need(backend)
    for name, (call, leaves) in _calls(backend, frozen).items():
        _forward_backward(call, leaves)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, grads = _forward_backward(call, leaves)
        except RuntimeError as err:
            raise AssertionError(f"{name} on {backend} synchronised with the host: {err}") from err
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads), name


def test_bad_targets_raise_with_validate_true_on_gpu():
    h, w = torch.randn(4, 8, device=DEV), torch.randn(10, 8, device=DEV)
    y = torch.tensor([0, 1, 10, 2], device=DEV)
    with pytest.raises(ValueError, match=r"targets\[2\] = 10 is outside \[0, V=10\)"):
        sk.linear_logprobs(h, w, y, validate=True)
    with pytest.raises(ValueError, match=r"seq_ids\[1\] = 7 is outside \[0, num_seqs=2\)"):
        sk.sequence_logprobs(h, w, y.clamp(max=9), torch.tensor([0, 7, 1, 1], device=DEV), 2, validate=True)


def test_bad_targets_trigger_a_device_side_assert_by_default():
    script = textwrap.dedent(
        """
        import torch, sami_kernels as sk
        h, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
        logp = sk.linear_logprobs(h, w, torch.tensor([0, 1, 10, 2], device="cuda"))
        torch.cuda.synchronize()
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stderr[-2000:]
