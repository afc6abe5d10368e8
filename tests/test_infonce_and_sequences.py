"""infonce_loss, sequence_logprobs and sami_loss on every backend vs float64 reference math."""

import math

import pytest
import torch
from helpers import assert_close_to_ref, random_upstream

import sami_kernels as sk
from sami_kernels import backends, reference

BACKENDS = backends.usable("cpu")
CHUNKED = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_published_sami_vector(backend):
    M = torch.tensor([[-0.5, -1.0], [-0.9, -0.4]], requires_grad=True)
    loss = sk.infonce_loss(M, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(0.474664, abs=1e-6)
    torch.testing.assert_close(M.grad, torch.tensor([[-0.194713, 0.182971], [0.194713, -0.182971]]), atol=1e-6, rtol=0)
    uniform = sk.infonce_loss(torch.full((4, 4), -1.7), backend=backend)
    assert uniform.item() == pytest.approx(math.log(4), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["both", "row", "col"])
@pytest.mark.parametrize("B,N", [(1, 2), (3, 3), (4, 5), (2, 17)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_matches_reference(backend, direction, B, N, reduction):
    M64 = (torch.randn(B, N, N, dtype=torch.float64) * 3).requires_grad_()
    M = M64.detach().float().requires_grad_()
    ours = sk.infonce_loss(M, direction=direction, reduction=reduction, backend=backend)
    ref = reference.infonce_loss(M64, direction=direction, reduction=reduction)
    same = reference.infonce_loss(M.detach().clone().requires_grad_(), direction=direction, reduction=reduction)
    assert_close_to_ref(ours, ref, same, dtype=torch.float32, name="loss")
    up = random_upstream(ref)
    (g_ours,) = torch.autograd.grad(ours, M, up.float())
    (g_ref,) = torch.autograd.grad(ref, M64, up)
    assert_close_to_ref(g_ours, g_ref, g_ref.float(), dtype=torch.float32, name="dM")


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_in_low_precision_and_float64(backend):
    M = torch.randn(3, 4, 4)
    for dtype in (torch.bfloat16, torch.float16):
        loss = sk.infonce_loss(M.to(dtype), backend=backend)
        assert loss.dtype == torch.float32
        expected = reference.infonce_loss(M.to(dtype).double())
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    M64 = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    if backend in ("torch", "cpu", "triton"):
        assert torch.autograd.gradcheck(lambda m: sk.infonce_loss(m, backend=backend), (M64,))


def test_infonce_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        sk.infonce_loss(torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="square"):
        sk.infonce_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="direction"):
        sk.infonce_loss(torch.zeros(2, 2), direction="rows")
    with pytest.raises(ValueError, match="floating-point"):
        sk.infonce_loss(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_op_passes_opcheck(backend):
    for dtype in (torch.float32, torch.float64):
        M = torch.randn(3, 4, 4, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.sami_kernels.infonce_fwd, (M, 0, backend))


def _packed_batch(B, N, H, V, dtype=torch.float64, seed=0):
    """Random response tokens for B queries x N constitutions x N responses, ragged lengths, interleaved order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (B * N * N,), generator=g)
    seq_ids = torch.repeat_interleave(torch.arange(B * N * N), lengths)
    seq_ids = seq_ids[torch.randperm(seq_ids.numel(), generator=g)]  # the op must not assume sorted ids
    T = seq_ids.numel()
    hidden = torch.randn(T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, targets, seq_ids


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_logprobs_matches_reference(backend, reduction):
    h64, w64, y, ids = _packed_batch(2, 3, 12, 70)
    first = torch.stack([(ids == s).nonzero()[0, 0] for s in range(18)])  # each sequence keeps one token
    keep_ids, keep_y = ids[first], y[first]
    ids[::7] = -1  # skipped tokens
    y[3::11] = -100  # ignored tokens
    ids[first], y[first] = keep_ids, keep_y
    h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
    h64.requires_grad_()
    w64.requires_grad_()
    ours = sk.sequence_logprobs(h, w, y, ids, 18, reduction=reduction, backend=backend)
    ref = reference.sequence_logprobs(h64, w64, y, ids, 18, reduction=reduction)
    assert_close_to_ref(ours, ref, ref.float(), dtype=torch.float32, name="seq", rtol=1e-6)
    up = random_upstream(ref)
    for a, r in zip(
        torch.autograd.grad(ours, (h, w), up.float()), torch.autograd.grad(ref, (h64, w64), up), strict=True
    ):
        assert_close_to_ref(a, r, r.float(), dtype=torch.float32, name="grad", rtol=1e-5)


def test_cu_seqlens_equals_seq_ids():
    h, w = torch.randn(10, 6), torch.randn(15, 6)
    y = torch.randint(0, 15, (10,))
    cu = torch.tensor([0, 3, 3 + 4, 10])
    ids = torch.tensor([0] * 3 + [1] * 4 + [2] * 3)
    torch.testing.assert_close(sk.sequence_logprobs(h, w, y, cu_seqlens=cu), sk.sequence_logprobs(h, w, y, ids, 3))


def test_sequence_bad_input():
    h, w, y = torch.randn(5, 4), torch.randn(9, 4), torch.randint(0, 9, (5,))
    with pytest.raises(ValueError, match=r"seq_ids\[2\] = 3 is outside \[0, num_seqs=3\)"):
        sk.sequence_logprobs(h, w, y, torch.tensor([0, 1, 3, 2, 1]), 3)
    with pytest.raises(ValueError, match="sequence 2 has no scored token"):
        sk.sequence_logprobs(h, w, y, torch.tensor([0, 1, 0, -1, 1]), 3)
    with pytest.raises(ValueError, match="exactly one of seq_ids"):
        sk.sequence_logprobs(h, w, y)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        sk.sequence_logprobs(h, w, y, cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="num_constitutions"):
        sk.sami_loss(h, w, y, torch.zeros(5, dtype=torch.int64), num_queries=1, num_constitutions=1)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("direction", ["both", "col"])
def test_sami_loss_end_to_end(backend, direction):
    B, N = 3, 2
    h64, w64, y, ids = _packed_batch(B, N, 16, 90, seed=1)
    h64.requires_grad_()
    w64.requires_grad_()
    h, w = h64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    loss, M = sk.sami_loss(h, w, y, ids, num_queries=B, num_constitutions=N, direction=direction, backend=backend)
    M_ref = reference.sequence_logprobs(h64, w64, y, ids, B * N * N).view(B, N, N)
    loss_ref = reference.infonce_loss(M_ref, direction=direction)
    assert M.shape == (B, N, N)
    assert_close_to_ref(M, M_ref, M_ref.float(), dtype=torch.float32, name="M", rtol=1e-6)
    assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-5)
    for a, r in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(loss_ref, (h64, w64)), strict=True):
        assert_close_to_ref(a, r, r.float(), dtype=torch.float32, name="grad", rtol=1e-5)
    module_loss, _ = sk.SAMILoss(N, direction=direction, backend=backend)(h, w, y, ids, B)
    assert module_loss.item() == pytest.approx(loss.item(), abs=1e-7)
