"""torch.ops.sami_kernels_C.segment_sum / segment_sum_backward (CPU) against plain torch: values sorted by segment,
offsets [S + 1], float64 accumulation, empty segments, bad offsets rejected."""

import pytest
import torch

from sami_kernels import backends

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="the C++ CPU extension is not built")


def _offsets(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.as_tensor(lengths, dtype=torch.int64).cumsum(0)])


def _expected(values, offsets):
    """Left-to-right float64 sums (the CPU kernel's order), as a float64 tensor."""
    out = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        acc = 0.0
        for v in values[a:b].tolist():
            acc += v
        out.append(acc)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sum_matches_torch(dtype):
    lengths = [3, 0, 1, 17, 0, 250, 2]  # empty segments, a long one
    offsets = _offsets(lengths)
    values = (torch.randn(int(offsets[-1]), dtype=torch.float64) * 10).to(dtype)
    sums = torch.ops.sami_kernels_C.segment_sum(values, offsets)
    assert sums.dtype == dtype and sums.shape == (len(lengths),)
    torch.testing.assert_close(sums, _expected(values, offsets).to(dtype), rtol=0, atol=0)  # same order, same rounding
    assert torch.equal(sums, torch.ops.sami_kernels_C.segment_sum(values, offsets))  # deterministic


def test_segment_sum_accumulates_in_float64():
    values = torch.tensor([1e8, 1.0, -1e8, 1.0] * 64, dtype=torch.float32)  # float32 running sums lose the ones
    sums = torch.ops.sami_kernels_C.segment_sum(values, _offsets([values.numel()]))
    assert sums.item() == 128.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sum_backward_is_a_gather(dtype):
    offsets = torch.tensor([1, 4, 4, 6])  # value 0 and value 6 lie outside every segment
    grad = torch.tensor([2.0, 3.0, -1.5], dtype=dtype)
    out = torch.ops.sami_kernels_C.segment_sum_backward(grad, offsets, 7)
    assert out.dtype == dtype
    assert out.tolist() == [0.0, 2.0, 2.0, 2.0, -1.5, -1.5, 0.0]
    values = torch.randn(7, dtype=torch.float64, requires_grad=True)
    segment_of = torch.repeat_interleave(torch.arange(3), offsets.diff())
    sums = torch.zeros(3, dtype=torch.float64).index_add(0, segment_of, values[1:6])
    reference = torch.autograd.grad((sums * grad.double()).sum(), values)[0]
    torch.testing.assert_close(out.double(), reference)


def test_segment_sum_rejects_bad_offsets():
    values = torch.randn(5)
    with pytest.raises(RuntimeError, match="must not decrease"):
        torch.ops.sami_kernels_C.segment_sum(values, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(RuntimeError, match="must lie in"):
        torch.ops.sami_kernels_C.segment_sum(values, torch.tensor([0, 6]))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sami_kernels_C.segment_sum(values.half(), torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.sami_kernels_C.segment_sum(values, torch.tensor([0, 5], dtype=torch.int32))
