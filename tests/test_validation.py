"""The `validate` option of linear_logprobs / sequence_logprobs / sami_loss (ops/linear_logprobs.host_validation):
host checks raise ValueError naming the argument and its first bad entry; without them (the GPU default) the same
checks are device-side asserts and the public calls read no tensor data on the host, i.e. never synchronise a GPU.
Here (CPU) "reads no data on the host" is checked op by op with a dispatch mode; tests/gpu/test_no_host_sync.py
checks the real thing with torch.cuda.set_sync_debug_mode("error")."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sami_kernels as sk
from sami_kernels import backends
from sami_kernels.kernels.ops.linear_logprobs import host_validation

BACKENDS = backends.usable("cpu")  # triton under the interpreter (tests/conftest.py)


class NoHostReads(TorchDispatchMode):
    """Fails on every op that reads tensor values on the host (item, bool, int, tolist) or whose output shape
    depends on them (nonzero, boolean indexing, bincount, ...): on a GPU each one is a device->host sync."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        integer_indexing = func is torch.ops.aten.index.Tensor and all(
            i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1]
        )  # its tag stands for boolean masks: a gather by integer indices has a known shape
        if torch.Tag.data_dependent_output in func.tags or (
            torch.Tag.dynamic_output_shape in func.tags and not integer_indexing
        ):
            raise AssertionError(f"{func} reads tensor data on the host")
        return func(*args, **(kwargs or {}))


def test_validate_defaults_to_host_checks_on_cpu_only():
    assert host_validation(None, torch.device("cpu")) is True
    assert host_validation(None, torch.device("cuda", 0)) is False
    assert host_validation(True, torch.device("cuda")) is True
    assert host_validation(False, torch.device("cpu")) is False
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="validate must be True, False or None, got 'yes'"):
        sk.linear_logprobs(h, w, y, validate="yes")
    with NoHostReads(), pytest.raises(AssertionError, match="reads tensor data on the host"):
        bool(y.any())  # the probe used below catches a host read


def _bad_calls():
    """(call(validate), host message, device-side message) for each data check."""
    h, w, y = torch.randn(5, 4), torch.randn(9, 4), torch.tensor([0, 1, 9, 2, 1])
    ids = torch.tensor([0, 1, 0, 1, 1])
    return [
        (
            lambda v: sk.linear_logprobs(h, w, y, validate=v),
            r"targets\[2\] = 9 is outside \[0, V=9\) and is not ignore_index=-100",
            r"^a target is outside \[0, V=9\) and is not ignore_index=-100$",
        ),
        (
            lambda v: sk.sequence_logprobs(h, w, y.clamp(max=8), torch.tensor([0, -2, 0, 1, 1]), 2, validate=v),
            r"seq_ids\[1\] = -2 is outside \[0, num_seqs=2\) and is not -1",
            r"^a seq_id is outside \[0, num_seqs=2\) and is not -1$",
        ),
        (
            lambda v: sk.sequence_logprobs(h, w, y.clamp(max=8), cu_seqlens=torch.tensor([0, 3, 2, 5]), validate=v),
            r"cu_seqlens must rise from 0 to the number of tokens 5, got \[0, 3, 2, 5\]",
            r"^cu_seqlens must rise from 0 to the number of tokens 5$",
        ),
        (
            lambda v: sk.sequence_logprobs(h, w, y.clamp(max=8), ids, 3, validate=v),
            r"sequence 2 has no scored token",
            r"^a sequence has no scored token \(reduction='mean' needs at least one\)$",
        ),
    ]


@pytest.mark.parametrize("case", range(4), ids=["targets", "seq_ids", "cu_seqlens", "empty_sequence"])
def test_bad_data_raises_on_the_host_or_asserts_on_the_device(case):
    call, host_message, device_message = _bad_calls()[case]
    for validate in (None, True):
        with pytest.raises(ValueError, match=host_message):
            call(validate)
    with pytest.raises(RuntimeError, match=device_message) as raised:
        call(False)  # torch._assert_async: a RuntimeError on CPU, a device-side assert on a GPU
    assert len(str(raised.value)) < 255  # the CUDA assert keeps at most 255 characters of the message


def _calls(backend, h, w, b, y, ids, cu, M):
    """The public calls, each -> its output; ids / cu_seqlens mark unscored (-1) and ignored (-100) tokens."""
    ignored = y.masked_fill(ids < 0, -100)  # for the calls without seq_ids: the unscored tokens are ignored instead
    return {
        "linear_logprobs": lambda v: sk.linear_logprobs(h, w, ignored, bias=b, backend=backend, validate=v),
        "sequence_logprobs(seq_ids)": lambda v: sk.sequence_logprobs(h, w, y, ids, 4, backend=backend, validate=v),
        "sequence_logprobs(cu_seqlens, sum)": lambda v: sk.sequence_logprobs(
            h, w, ignored, cu_seqlens=cu, reduction="sum", bias=b, backend=backend, validate=v
        ),
        "sami_loss": lambda v: sk.sami_loss(
            h, w, y, ids, num_queries=1, num_constitutions=2, backend=backend, validate=v
        )[0],
        "infonce_loss": lambda v: sk.infonce_loss(M, backend=backend),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_host_validation_nothing_reads_data_on_the_host_and_results_are_the_same(backend):
    T, H, V = 13, 8, 21
    h = torch.randn(T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    y = torch.randint(0, V, (T,))
    y[[3, 9]] = -100
    ids = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, 3, -1, 0, 2])
    with torch.no_grad():
        h[4] = float("nan")  # unscored tokens (seq_id -1) are never part of a result, whatever their values
        h[10] = 1e30
    cu = torch.tensor([0, 4, 4, 9, T])
    M = torch.randn(3, 2, 2, requires_grad=True)
    leaves = (h, w, b, M)
    for name, call in _calls(backend, h, w, b, y, ids, cu, M).items():
        out = call(None)  # host validation (the CPU default): unscored tokens are dropped before the matmul
        upstream = torch.randn(out.shape, dtype=out.dtype)
        used = [t for t in leaves if t.requires_grad and out.grad_fn is not None]
        expected = (out, *torch.autograd.grad(out, used, upstream, allow_unused=True))
        with NoHostReads():  # no host validation (the GPU default): unscored tokens are masked instead
            out = call(False)
            got = (out, *torch.autograd.grad(out, used, upstream, allow_unused=True))
        for e, g in zip(expected, got, strict=True):
            if e is None:
                assert g is None or not bool(g.any()), name
            else:
                assert bool(torch.isfinite(e).all()), name
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
