"""The correctness grid of tests/test_linear_logprobs.py and tests/test_infonce_and_sequences.py for the `cuda`
and `triton` backends on a real CUDA device: GPU results vs float64 reference math on the CPU, judged against
plain PyTorch in the same dtype on the same GPU (helpers.assert_close_to_ref)."""

import pytest
import torch
from helpers import assert_close_to_ref, random_upstream
from test_infonce_and_sequences import _packed_batch
from test_linear_logprobs import GRID, make_inputs

import sami_kernels as sk
from sami_kernels import backends, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = ["cuda", "triton"]
DEV = "cuda"


def _need(backend):
    if backend not in backends.usable(DEV):
        pytest.skip(f"backend {backend!r} is not usable on the GPU here: {backends.probe()[backend].detail}")


def _leaves(tensors, device, frozen):
    """Fresh leaf copies on device; with frozen, only the first (hidden) requires grad."""
    return [
        None if t is None else t.detach().to(device).clone().requires_grad_(not (frozen and i > 0))
        for i, t in enumerate(tensors)
    ]


def check_on_gpu(backend, T, H, V, dtype, *, bias, temperature, frozen, chunk_bytes=None):
    """tests/test_linear_logprobs.check_against_reference with ours and torch-same-dtype on the GPU."""
    (h64, w64, b64, y), (h, w, b, _) = make_inputs(T, H, V, dtype, bias=bias)
    ours_in, same_in = _leaves((h, w, b), DEV, frozen), _leaves((h, w, b), DEV, frozen)
    ref_in = _leaves((h64, w64, b64), "cpu", frozen)
    yd = y.to(DEV)
    ours = sk.linear_logprobs(
        ours_in[0], ours_in[1], yd, bias=ours_in[2], temperature=temperature, backend=backend, chunk_bytes=chunk_bytes
    )
    same = reference.linear_logprobs(same_in[0], same_in[1], yd, bias=same_in[2], temperature=temperature)
    ref = reference.linear_logprobs(ref_in[0], ref_in[1], y, bias=ref_in[2], temperature=temperature)
    assert ours.is_cuda and ours.dtype == torch.float32 and ours.shape == (T,)
    assert_close_to_ref(ours.cpu(), ref, same.float().cpu(), dtype=dtype, name="logp")
    assert bool((ours.cpu()[y == -100] == 0).all())

    upstream = random_upstream(ref)
    wrt = lambda ts: [t for t in ts if t is not None and t.requires_grad]  # noqa: E731
    g_ours = torch.autograd.grad(ours, wrt(ours_in), upstream.float().to(DEV))
    g_same = torch.autograd.grad(same, wrt(same_in), upstream.to(same.dtype).to(DEV))
    g_ref = torch.autograd.grad(ref, wrt(ref_in), upstream)
    names = [
        n for n, t in zip(("d_hidden", "d_weight", "d_bias"), ours_in, strict=True) if t is not None and t.requires_grad
    ]
    for name, a, s, r in zip(names, g_ours, g_same, g_ref, strict=True):
        assert a.dtype == dtype and a.is_cuda, f"{name}: {a.dtype} on {a.device}"
        rtol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_to_ref(a.cpu(), r, s.cpu(), dtype=dtype, name=name, rtol=rtol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "shape,dtype,bias,temperature,frozen",
    GRID,
    ids=[f"{s}-{str(d)[6:]}-bias{b}-t{t}-frozen{f}" for s, d, b, t, f in GRID],
)
def test_matches_reference_on_gpu(backend, shape, dtype, bias, temperature, frozen):
    _need(backend)
    chunk_bytes = 4 * shape[2] * 7  # 7-row chunks: several chunks and a ragged tail
    check_on_gpu(backend, *shape, dtype, bias=bias, temperature=temperature, frozen=frozen, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen", [False, True])
def test_vocabulary_tiles_and_full_vocabulary(backend, dtype, frozen):
    _need(backend)
    # budget of 100 rows x V: the backward uses [T, Vc] vocabulary tiles (Vc = 1664, 4 tiles, ragged last one)
    check_on_gpu(backend, 300, 64, 5003, dtype, bias=True, temperature=0.9, frozen=frozen, chunk_bytes=4 * 5003 * 100)
    check_on_gpu(backend, 41, 64, 49152 + 7, dtype, bias=False, temperature=1.0, frozen=frozen)


def test_gradcheck_float64_cuda():
    _need("cuda")
    T, H, V = 6, 5, 13
    h = torch.randn(T, H, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, device=DEV, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, device=DEV, requires_grad=True)
    y = torch.tensor([0, 12, -100, 3, 7, 7], device=DEV)
    fn = lambda h, w, b: sk.linear_logprobs(h, w, y, bias=b, temperature=0.8, backend="cuda", chunk_bytes=4 * V * 4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))
    frozen = lambda h: sk.linear_logprobs(h, w.detach(), y, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(frozen, (h,))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_finite_rows_stay_in_their_row_on_gpu(backend):
    _need(backend)
    h = torch.randn(6, 8)
    h[2, 3] = float("nan")
    h[4, 0] = float("inf")
    w, y = torch.randn(30, 8), torch.randint(0, 30, (6,))
    logp = sk.linear_logprobs(h.to(DEV), w.to(DEV), y.to(DEV), backend=backend).cpu()
    finite = torch.isfinite(logp)
    assert finite.tolist() == [True, True, False, True, False, True]
    torch.testing.assert_close(logp[finite], reference.linear_logprobs(h, w, y)[finite])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_deterministic_on_gpu(backend):
    _need(backend)
    (_, _, _, y), (h, w, b, _) = make_inputs(300, 64, 1000, torch.bfloat16, bias=True)
    h, w, b, y = (t.to(DEV) for t in (h, w, b, y))
    h.requires_grad_()
    w.requires_grad_()
    g = torch.randn(300, device=DEV)

    def run():
        logp = sk.linear_logprobs(h, w, y, bias=b, backend=backend, chunk_bytes=4 * 1000 * 64)
        return (logp, *torch.autograd.grad(logp, (h, w), g))

    assert all(torch.equal(a, c) for a, c in zip(run(), run(), strict=True))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("direction", ["both", "row", "col"])
@pytest.mark.parametrize("B,N", [(1, 2), (3, 3), (4, 5), (2, 17), (5, 40)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce_matches_reference_on_gpu(backend, direction, B, N, reduction):
    _need(backend)
    M64 = (torch.randn(B, N, N, dtype=torch.float64) * 3).requires_grad_()
    M = M64.detach().float().to(DEV).requires_grad_()
    ours = sk.infonce_loss(M, direction=direction, reduction=reduction, backend=backend)
    ref = reference.infonce_loss(M64, direction=direction, reduction=reduction)
    same = reference.infonce_loss(M.detach().clone().requires_grad_(), direction=direction, reduction=reduction)
    assert_close_to_ref(ours.cpu(), ref, same.cpu(), dtype=torch.float32, name="loss")
    up = random_upstream(ref)
    (g_ours,) = torch.autograd.grad(ours, M, up.float().to(DEV))
    (g_ref,) = torch.autograd.grad(ref, M64, up)
    assert_close_to_ref(g_ours.cpu(), g_ref, g_ref.float(), dtype=torch.float32, name="dM")


def test_infonce_float64_gradcheck_cuda():
    _need("cuda")
    M64 = torch.randn(2, 3, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: sk.infonce_loss(m, backend="cuda"), (M64,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sum_cuda_matches_cpu_and_is_deterministic(dtype):
    _need("cuda")
    lengths = torch.tensor([3, 0, 1, 17, 0, 2500, 2, 33, 64])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = (torch.randn(int(offsets[-1]), dtype=torch.float64) * 10).to(dtype)
    cpu = torch.ops.sami_kernels_C.segment_sum(values, offsets)
    gpu = torch.ops.sami_kernels_C.segment_sum(values.to(DEV), offsets.to(DEV))
    assert gpu.is_cuda and gpu.dtype == dtype
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-15 if dtype == torch.float64 else 1e-7, atol=1e-12)
    assert torch.equal(gpu, torch.ops.sami_kernels_C.segment_sum(values.to(DEV), offsets.to(DEV)))
    grad = torch.randn(lengths.numel(), dtype=dtype)
    back = torch.ops.sami_kernels_C.segment_sum_backward(grad.to(DEV), offsets.to(DEV), values.numel())
    assert torch.equal(back.cpu(), torch.ops.sami_kernels_C.segment_sum_backward(grad, offsets, values.numel()))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("direction", ["both", "col"])
def test_sami_loss_end_to_end_on_gpu(backend, direction):
    _need(backend)
    B, N = 3, 2
    h64, w64, y, ids = _packed_batch(B, N, 16, 90, seed=1)
    h64.requires_grad_()
    w64.requires_grad_()
    h = h64.detach().float().to(DEV).requires_grad_()
    w = w64.detach().float().to(DEV).requires_grad_()
    loss, M = sk.sami_loss(
        h, w, y.to(DEV), ids.to(DEV), num_queries=B, num_constitutions=N, direction=direction, backend=backend
    )
    M_ref = reference.sequence_logprobs(h64, w64, y, ids, B * N * N).view(B, N, N)
    loss_ref = reference.infonce_loss(M_ref, direction=direction)
    assert_close_to_ref(M.cpu(), M_ref, M_ref.float(), dtype=torch.float32, name="M", rtol=1e-6)
    assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-5)
    for a, r in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(loss_ref, (h64, w64)), strict=True):
        assert_close_to_ref(a.cpu(), r, r.float(), dtype=torch.float32, name="grad", rtol=1e-5)
