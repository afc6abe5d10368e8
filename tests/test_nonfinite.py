"""Non-finite inputs of linear_logprobs on every backend usable here (semantics: ops/linear_logprobs.py), against
the float64 reference (which implements the same semantics), forward and backward with random upstream gradients:
masked vocabularies (-inf bias), rows that are all -inf or whose target logit is -inf (-inf, zero gradient), NaN in
hidden / weight / bias (NaN in the affected rows), +inf logits (never a finite number), logits in the thousands
(finite and exact), ignored rows whatever their values (0, zero gradient); and the raw C++ op's target check.
Shapes are not multiples of any block: the triton interpreter runs them too, so they stay small."""

import math

import pytest
import torch
from helpers import assert_close_to_ref, random_upstream

import sami_kernels as sk
from sami_kernels import backends, reference

BACKENDS = backends.usable("cpu")
INF, NAN = math.inf, math.nan
T, H, V = 13, 24, 1300
# C++ chunk loop with 11-row budgets (C = 11): 2 forward chunks; the backward takes all 13 rows and vocabulary tiles
# of 1088 columns (budget 11 * 1300 / 13 = 1100, rounded down to 64s). With 4-row budgets: row chunks of full rows.
CHUNKINGS = {"vocab-tiles": 4 * V * 11, "row-chunks": 4 * V * 4}
# -inf bias on whole blocks: a triton vocabulary block [128, 256), a CPU epilogue block [512, 1024), the last
# backward vocabulary tile [1088, 1300), plus a scattering of single columns elsewhere.
MASKED_SPANS = ((128, 256), (512, 1024), (1088, V))

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter


def make_inputs(*, dtype=torch.float32, seed=0, logit_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * logit_scale
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[3, 10]] = -100
    return hidden, weight, bias, targets


def masked_bias(bias, seed=1):
    g = torch.Generator().manual_seed(seed)
    masked = torch.rand(V, generator=g) < 0.3
    for lo, hi in MASKED_SPANS:
        masked[lo:hi] = True
    return bias.masked_fill(masked, -INF), masked


def run(fn, inputs, trainable, upstream):
    """logp and the gradients w.r.t. the trainable inputs (hidden, weight, bias) for a random upstream gradient."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(train)
        for t, train in zip(inputs, trainable, strict=True)
    ]
    logp = fn(*leaves)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return logp, torch.autograd.grad(logp, wrt, upstream.to(logp.dtype))


def assert_same_nonfinite(ours, ref, name):
    """NaN, +inf and -inf exactly where the reference has them."""
    ours, ref = ours.detach().double(), ref.detach()
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        diff = (test(ours) != test(ref)).nonzero()
        assert diff.numel() == 0, f"{name}: {kind} pattern differs from the reference at {diff[:5].tolist()}"


def check(backend, h64, w64, b64, y, *, frozen, dtype=torch.float32, temperature=1.0, chunk_bytes=None):
    """Ours vs the float64 reference: the same non-finite entries, finite ones within the same-dtype criterion.
    Returns ours (logp, grads) for extra checks."""
    inputs64 = (h64, w64, b64)
    trainable = (True, not frozen, b64 is not None and not frozen)
    upstream = random_upstream(h64[:, 0])

    def ours_fn(h, w, b):
        return sk.linear_logprobs(h, w, y, bias=b, temperature=temperature, backend=backend, chunk_bytes=chunk_bytes)

    def ref_fn(h, w, b):
        return reference.linear_logprobs(h, w, y, bias=b, temperature=temperature)

    cast = [None if t is None else t.to(dtype) for t in inputs64]
    ours = run(ours_fn, cast, trainable, upstream)
    same = run(ref_fn, cast, trainable, upstream)
    ref = run(ref_fn, inputs64, trainable, upstream)
    names = ["logp"] + [n for n, t in zip(("d_hidden", "d_weight", "d_bias"), trainable, strict=True) if t]
    for name, a, s, r in zip(names, (ours[0], *ours[1]), (same[0], *same[1]), (ref[0], *ref[1]), strict=True):
        assert_same_nonfinite(a, r, name)
        rtol = 0.0 if name == "logp" else 1e-5 if dtype == torch.float32 else 2e-2
        assert_close_to_ref(a, r, s.float(), dtype=dtype, name=name, rtol=rtol)
    return ours


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_is_exact(backend, frozen, dtype, chunking):
    h, w, b, y = make_inputs()
    b, masked = masked_bias(b)
    finite = (~masked).nonzero()[:, 0]
    y = torch.where(y == -100, y, finite[y % finite.numel()])  # targets among the finite logits
    logp, grads = check(backend, h, w, b, y, frozen=frozen, dtype=dtype, temperature=0.7,
                        chunk_bytes=CHUNKINGS[chunking])  # fmt: skip
    assert bool(torch.isfinite(logp).all())
    if not frozen:  # masked columns have probability 0: exactly zero gradient
        assert bool((grads[1][masked] == 0).all()) and bool((grads[2][masked] == 0).all())


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_a_minus_inf_target_or_all_minus_inf_are_minus_inf_with_zero_gradient(backend, frozen):
    h, w, b, y = make_inputs()
    b[7] = -INF
    y[[0, 5]] = 7  # -inf target logit, the other logits finite
    w[:, 0] = w[:, 0].abs() + 0.1
    h[[2, 8], 0] = -INF  # every logit of rows 2 and 8 is -inf (and -inf * 0 must not reach dW)
    h[3, 1] = NAN  # an ignored row: nothing of it may leak either
    logp, grads = check(backend, h, w, b, y, frozen=frozen, chunk_bytes=CHUNKINGS["vocab-tiles"])
    dead = [0, 2, 5, 8]
    assert logp[dead].tolist() == [-INF] * 4
    assert bool(torch.isfinite(logp[[t for t in range(T) if t not in dead]]).all())
    assert bool((grads[0][dead + [3]] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_logit_minus_inf_gives_minus_inf_and_zero_gradient(backend, frozen):
    h, w, _, y = make_inputs()
    logp, grads = check(backend, h, w, torch.full((V,), -INF, dtype=torch.float64), y, frozen=frozen)
    assert logp.tolist() == [0.0 if t == -100 else -INF for t in y.tolist()]
    assert all(bool((g == 0).all()) for g in grads)


NAN_PLACES = {"hidden": (0, (4, 5)), "weight": (1, (600, 2)), "bias": (2, 1200)}  # (input, index)


@pytest.mark.parametrize("place", NAN_PLACES)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_the_affected_rows(backend, frozen, place):
    inputs = make_inputs()
    which, index = NAN_PLACES[place]
    inputs[which][index] = NAN
    h, w, b, y = inputs
    logp, _ = check(backend, h, w, b, y, frozen=frozen, chunk_bytes=CHUNKINGS["vocab-tiles"])
    affected = [4] if place == "hidden" else [t for t in range(T) if y[t] != -100]
    assert bool(logp[affected].isnan().all())
    assert bool((logp[y == -100] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_logits_never_give_a_finite_logprob(backend):
    h, w, b, y = make_inputs()
    b[[9, 1250]] = INF
    y[0] = 9  # the +inf logit is the target of row 0
    logp = sk.linear_logprobs(h.float(), w.float(), y, bias=b.float(), backend=backend)
    valid = y != -100
    assert bool((logp[valid].isnan() | logp[valid].isposinf()).all()), logp.tolist()


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_in_the_thousands_are_finite_and_exact(backend, frozen):
    h, w, b, y = make_inputs(logit_scale=400.0)  # logits of order +-1000; log-probs in the hundreds
    logp, grads = check(backend, h, w, b * 300, y, frozen=frozen, chunk_bytes=CHUNKINGS["row-chunks"])
    assert logp.abs().max() > 100
    assert bool(torch.isfinite(logp).all()) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zero_whatever_their_values(backend):
    h, w, b, y = make_inputs()
    y[[1, 6]] = -100
    h[1] = NAN
    h[3, 0] = -INF
    h[6] *= 1e4  # logits of order 1e4
    h[10, 2] = INF
    logp, grads = check(backend, h, w, b, y, frozen=False, chunk_bytes=CHUNKINGS["row-chunks"])
    assert bool((logp[y == -100] == 0).all()) and bool((grads[0][y == -100] == 0).all())
    assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_raw_cpu_op_refuses_out_of_range_targets():
    h, w, b = torch.randn(4, 8), torch.randn(7, 8), torch.randn(7)
    ops = torch.ops.sami_kernels_C
    lse, g = torch.zeros(4), torch.ones(4)
    for bad, message in ((7, r"targets\[2\] = 7 is outside \[0, V=7\) and is not ignore_index=-100"), (-3, "= -3")):
        y = torch.tensor([0, -100, bad, 6])
        with pytest.raises(ValueError, match=message):
            ops.linear_logprobs_fwd(h, w, b, y, -100, 1.0, False, 2)
        with pytest.raises(ValueError, match=message):
            ops.linear_logprobs_bwd(h, w, b, y, lse, g, -100, 1.0, True, True, True, 2)
    logp, *_ = ops.linear_logprobs_fwd(h, w, b, torch.tensor([0, -100, 3, 6]), -100, 1.0, False, 2)
    assert logp[1] == 0 and bool(torch.isfinite(logp).all())
