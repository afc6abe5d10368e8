"""The reference math itself: published SAMI test vectors, and agreement with hand-written formulas."""

import math

import pytest
import torch

from sami_kernels import reference

M_PUBLISHED = [[-0.5, -1.0], [-0.9, -0.4]]
LOSS_PUBLISHED = 0.474664
GRAD_PUBLISHED = [[-0.194713, 0.182971], [0.194713, -0.182971]]


def test_sami_published_vector():
    M = torch.tensor(M_PUBLISHED, dtype=torch.float64, requires_grad=True)
    loss = reference.infonce_loss(M)
    loss.backward()
    assert loss.item() == pytest.approx(LOSS_PUBLISHED, abs=1e-6)
    torch.testing.assert_close(M.grad, torch.tensor(GRAD_PUBLISHED, dtype=torch.float64), atol=1e-6, rtol=0)


def test_uniform_matrix_gives_log_n_and_zero_mi():
    M = torch.full((3, 4, 4), -2.5, dtype=torch.float64)
    for direction in reference.DIRECTIONS:
        loss = reference.infonce_loss(M, direction=direction)
        assert loss.item() == pytest.approx(math.log(4), abs=1e-12)
        assert reference.mutual_information_lower_bound(loss, 4).item() == pytest.approx(0.0, abs=1e-12)


def test_infonce_matches_the_written_gradient_for_every_direction():
    B, N = 3, 5
    M = torch.randn(B, N, N, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(N, dtype=torch.float64)
    expected = {
        "both": (torch.softmax(M, -1) - eye + torch.softmax(M, -2) - eye) / (2 * N),
        "row": (torch.softmax(M, -1) - eye) / N,
        "col": (torch.softmax(M, -2) - eye) / N,
    }
    for direction, grad in expected.items():
        per_query = reference.infonce_loss(M, direction=direction, reduction="none")
        (dM,) = torch.autograd.grad(per_query.sum(), M)
        torch.testing.assert_close(dM, grad.detach())
    # Contrast is per query: block b's loss does not depend on any other block.
    (dM,) = torch.autograd.grad(reference.infonce_loss(M, reduction="none")[1], M)
    assert dM[0].abs().max() == 0 and dM[2].abs().max() == 0


def test_linear_logprobs_matches_explicit_softmax_and_ignores():
    T, H, V = 9, 7, 11
    h, w, b = (torch.randn(T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64), torch.randn(V).double())
    y = torch.randint(0, V, (T,))
    y[4] = -100
    logp = reference.linear_logprobs(h, w, y, bias=b, temperature=0.5)
    p = torch.exp((h @ w.T + b) / 0.5)
    p = p / p.sum(-1, keepdim=True)
    for t in range(T):
        expected = 0.0 if t == 4 else math.log(p[t, y[t]].item())
        assert logp[t].item() == pytest.approx(expected, abs=1e-12)


def test_sequence_reductions():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([1, 0, 1, -1, 1])
    torch.testing.assert_close(
        reference.sequence_sums(values, ids, 3, reduction="sum"), torch.tensor([2.0, 9.0, 0.0], dtype=torch.float64)
    )
    mean = reference.sequence_sums(values, ids, 2, reduction="mean")
    torch.testing.assert_close(mean, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_reference_rejects_unknown_options():
    with pytest.raises(ValueError, match="direction"):
        reference.infonce_loss(torch.zeros(2, 2), direction="diagonal")
    with pytest.raises(ValueError, match="reduction"):
        reference.infonce_loss(torch.zeros(2, 2), reduction="max")
