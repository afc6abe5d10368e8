"""linear_logprobs on every backend usable here vs float64 reference math, forward and backward with random
upstream gradients, on shapes that are not multiples of any block size."""

import itertools

import pytest
import torch
from helpers import assert_close_to_ref, random_upstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sami_kernels as sk
from sami_kernels import backends, reference

BACKENDS = backends.usable("cpu")
CHUNKED = [b for b in BACKENDS if b != "triton"]  # the interpreter is too slow for the big grid
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(T, H, V, dtype, *, bias, ignore_every=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::ignore_every] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (hidden, weight, b, targets), (cast(hidden), cast(weight), cast(b), targets)


def check_against_reference(backend, T, H, V, dtype, *, bias, temperature, frozen, chunk_bytes=None):
    (h64, w64, b64, y), (h, w, b, _) = make_inputs(T, H, V, dtype, bias=bias)
    ours_in = [t.clone().requires_grad_(not (frozen and t is not h)) if t is not None else None for t in (h, w, b)]
    same_in = [t.clone().requires_grad_(not (frozen and t is not h)) if t is not None else None for t in (h, w, b)]
    ref_in = [
        t.clone().requires_grad_(not (frozen and t is not h64)) if t is not None else None for t in (h64, w64, b64)
    ]

    ours = sk.linear_logprobs(
        ours_in[0], ours_in[1], y, bias=ours_in[2], temperature=temperature, backend=backend, chunk_bytes=chunk_bytes
    )
    same = reference.linear_logprobs(same_in[0], same_in[1], y, bias=same_in[2], temperature=temperature)
    ref = reference.linear_logprobs(ref_in[0], ref_in[1], y, bias=ref_in[2], temperature=temperature)
    assert ours.dtype == torch.float32 and ours.shape == (T,)
    assert_close_to_ref(ours, ref, same.float(), dtype=dtype, name="logp")
    assert bool((ours[y == -100] == 0).all())

    upstream = random_upstream(ref)
    wrt = lambda ts: [t for t in ts if t is not None and t.requires_grad]  # noqa: E731
    g_ours = torch.autograd.grad(ours, wrt(ours_in), upstream.float())
    g_same = torch.autograd.grad(same, wrt(same_in), upstream.to(same.dtype))
    g_ref = torch.autograd.grad(ref, wrt(ref_in), upstream)
    names = [
        n for n, t in zip(("d_hidden", "d_weight", "d_bias"), ours_in, strict=True) if t is not None and t.requires_grad
    ]
    for name, a, s, r in zip(names, g_ours, g_same, g_ref, strict=True):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        # gradients sum over many terms: allow a relative slack on top of torch's own error
        assert_close_to_ref(a, r, s, dtype=dtype, name=name, rtol=1e-5 if dtype == torch.float32 else 2e-2)


GRID = list(
    itertools.product(
        [(1, 5, 3), (37, 33, 131), (300, 64, 1000)],  # (T, H, V): odd, none a multiple of a block size
        DTYPES,
        [False, True],
        [1.0, 0.7],
        [False, True],
    )
)


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize(
    "shape,dtype,bias,temperature,frozen",
    GRID,
    ids=[f"{s}-{str(d)[6:]}-bias{b}-t{t}-frozen{f}" for s, d, b, t, f in GRID],
)
def test_matches_reference(backend, shape, dtype, bias, temperature, frozen):
    check_against_reference(
        backend, *shape, dtype, bias=bias, temperature=temperature, frozen=frozen, chunk_bytes=4 * shape[2] * 7
    )  # 7-row chunks: several chunks and a ragged tail


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("frozen", [False, True])
def test_full_vocabulary_of_smollm2(backend, frozen):
    check_against_reference(backend, 41, 64, 49152 + 7, torch.float32, bias=False, temperature=1.0, frozen=frozen)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,temperature,frozen", [(False, 1.0, False), (True, 0.7, True), (True, 1.3, False)])
def test_triton_interpreter_matches_reference(dtype, bias, temperature, frozen):
    check_against_reference(
        "triton", 21, 40, 150, dtype, bias=bias, temperature=temperature, frozen=frozen, chunk_bytes=4 * 150 * 8
    )


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_small_blocks_many_splits_and_bitwise_determinism(dtype):
    """Kernel-level call with 16-wide blocks and 3 vocabulary splits: several token tiles, K steps, vocab tiles,
    splits to merge and backward chunks, all with ragged tails; two runs must agree bit for bit."""
    from sami_kernels.kernels import triton_logprobs as tk

    (h64, w64, b64, y), (h, w, b, _) = make_inputs(37, 33, 131, dtype, bias=True)
    blocks = dict(block_t=16, block_v=16, block_h=16)
    logp, lse, u = tk.linear_logprobs_fwd(h, w, b, y, -100, 0.7, True, 8, num_splits=3, **blocks)
    again = tk.linear_logprobs_fwd(h, w, b, y, -100, 0.7, True, 8, num_splits=3, **blocks)
    assert all(torch.equal(a, c) for a, c in zip((logp, lse, u), again, strict=True))
    h64.requires_grad_()
    w64.requires_grad_()
    b64.requires_grad_()
    ref = reference.linear_logprobs(h64, w64, y, bias=b64, temperature=1 / 0.7)
    same = reference.linear_logprobs(h, w, y, bias=b, temperature=1 / 0.7)
    assert_close_to_ref(logp, ref, same.float(), dtype=dtype, name="logp")
    g = random_upstream(ref)
    dh, dw, db = tk.linear_logprobs_bwd(h, w, b, y, lse, g.float(), -100, 0.7, True, True, True, 8, **blocks)
    ref_grads = torch.autograd.grad(ref, (h64, w64, b64), g)
    for name, ours, r in zip(("dh", "dw", "db"), (dh, dw, db), ref_grads, strict=True):
        assert_close_to_ref(ours, r, r.to(dtype), dtype=dtype, name=name, rtol=1e-5 if dtype == torch.float32 else 2e-2)
    assert_close_to_ref(
        u * g.float()[:, None],
        ref_grads[0],
        ref_grads[0].to(dtype),
        dtype=dtype,
        name="u",
        rtol=1e-5 if dtype == torch.float32 else 2e-2,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    T, H, V = 6, 5, 13
    h = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 12, -100, 3, 7, 7])
    if backend == "triton":  # float64 is refused, with a clear error
        with pytest.raises(ValueError, match="takes float32, bfloat16 or float16 inputs, got torch.float64"):
            sk.linear_logprobs(h, w, y, bias=b, backend=backend)
        return
    fn = lambda h, w, b: sk.linear_logprobs(
        h,
        w,
        y,
        bias=b,
        temperature=0.8,
        backend=backend,  # noqa: E731
        chunk_bytes=4 * V * 4,
    )
    assert torch.autograd.gradcheck(fn, (h, w, b))
    frozen = lambda h: sk.linear_logprobs(h, w.detach(), y, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(frozen, (h,))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 40),
    H=st.integers(1, 24),
    V=st.integers(2, 300),
    bias=st.booleans(),
    temperature=st.floats(0.25, 4.0),
    frozen=st.booleans(),
    chunk_rows=st.integers(1, 50),
    backend=st.sampled_from(CHUNKED),
)
def test_fuzz_against_reference(T, H, V, bias, temperature, frozen, chunk_rows, backend):
    check_against_reference(
        backend,
        T,
        H,
        V,
        torch.float32,
        bias=bias,
        temperature=temperature,
        frozen=frozen,
        chunk_bytes=4 * V * chunk_rows,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient_and_leading_dims_are_kept(backend):
    h = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(20, 8)
    y = torch.randint(0, 20, (2, 3))
    logp = sk.linear_logprobs(h, w, y, backend=backend)
    assert logp.shape == (2, 3)
    logp.sum().backward()
    assert h.grad.shape == h.shape and w.grad is None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_stay_in_their_row(backend):
    h = torch.randn(6, 8)
    h[2, 3] = float("nan")
    h[4, 0] = float("inf")
    w, y = torch.randn(30, 8), torch.randint(0, 30, (6,))
    logp = sk.linear_logprobs(h, w, y, backend=backend)
    finite = torch.isfinite(logp)
    assert finite.tolist() == [True, True, False, True, False, True]
    torch.testing.assert_close(logp[finite], reference.linear_logprobs(h, w, y)[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_pass_opcheck(backend):
    h, w, b = torch.randn(9, 6, requires_grad=True), torch.randn(17, 6, requires_grad=True), torch.randn(17)
    y = torch.randint(0, 17, (9,))
    for want_u in (False, True):
        torch.library.opcheck(torch.ops.sami_kernels.linear_logprobs_fwd, (h, w, b, y, -100, 0.5, want_u, 4, backend))
    lse = torch.logsumexp(h @ w.T + b, -1).detach()
    torch.library.opcheck(
        torch.ops.sami_kernels.linear_logprobs_bwd,
        (h.detach(), w.detach(), b, y, lse, torch.randn(9), -100, 1.0, True, True, True, 4, backend),
    )


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")  # dynamo's own
def test_torch_compile_traces_the_op():
    h, w = torch.randn(11, 8, requires_grad=True), torch.randn(25, 8, requires_grad=True)
    y = torch.randint(0, 25, (11,))
    fn = lambda h, w: (sk.linear_logprobs(h, w, y) * torch.arange(11.0)).sum()  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager")
    torch.testing.assert_close(compiled(h, w), fn(h, w))
    torch.testing.assert_close(torch.autograd.grad(compiled(h, w), (h, w)), torch.autograd.grad(fn(h, w), (h, w)))


def test_bad_input_errors_name_the_argument():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    cases = [
        (dict(hidden=torch.randn(4, 7)), "disagree on H"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "weight dtype"),
        (dict(weight=torch.randn(10, 8, device="meta")), "weight is on meta"),
        (dict(targets=torch.randint(0, 10, (5,))), "targets shape"),
        (dict(targets=y.float()), "targets must be an int64"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), r"targets\[2\] = 10 is outside \[0, V=10\)"),
        (dict(targets=torch.tensor([0, -1, 3, 2])), r"targets\[1\] = -1"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
        (dict(temperature=0.0), "temperature"),
        (dict(bias=torch.randn(9)), "bias must have shape"),
        (dict(hidden=h.int()), "hidden must be float32"),
    ]
    for override, message in cases:
        args = dict(hidden=h, weight=w, targets=y) | override
        kwargs = {k: args.pop(k) for k in ("temperature", "bias") if k in args}
        with pytest.raises(ValueError, match=message):
            sk.linear_logprobs(args["hidden"], args["weight"], args["targets"], **kwargs)
