"""The fast paths of linear_logprobs against float64 reference math, forward and backward with random upstream
gradients, on shapes that are multiples of no block or chunk size:

- kept logits (max_logits_bytes): the forward keeps the [T, V] logits and the backward reuses them instead of
  recomputing them (chunked backends); trainable weight and / or bias, frozen weight (nothing kept), a second backward
  of the same graph, and the op-level contract (the backward computes dz from the logits it is given);
- the cpu backend's vocabulary-tiled forward (online logsumexp merged across [T, Vc] tiles);
- the cpu backend's float32 GEMMs through ATen's at::mm instead of oneDNN (SAMI_KERNELS_ONEDNN=0, a subprocess);
- the cpu epilogue's AVX2 clones are vectorised (objdump)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_ref, random_upstream

import sami_kernels as sk
from sami_kernels import backends, reference

BACKENDS = backends.usable("cpu")
CHUNKED = [b for b in BACKENDS if b != "triton"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
KEEP_ALL = 1 << 30
T, H, V = 37, 33, 2531  # all odd; V > 2 * 1024 + 64: three vocabulary tiles of 1024 columns with a ragged tail
# 16-row budgets: the recomputing backward (and the cpu forward without u) use [37, 1024] vocabulary tiles
TILED = 4 * V * 16
# which inputs are trainable: hidden always; weight and bias, bias only (weight frozen), or neither (frozen: u path)
GRADS = {"weight+bias": (True, True), "bias-only": (False, True), "frozen": (False, False)}


def make_inputs(dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * 3
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (T,), generator=g)
    y[::6] = -100
    return (h, w, b, y), tuple(t.to(dtype) for t in (h, w, b))


def grads_of(fn, inputs, trainable, upstream):
    leaves = [t.detach().clone().requires_grad_(flag) for t, flag in zip(inputs, trainable, strict=True)]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, [t for t in leaves if t.requires_grad], upstream.to(out.dtype))


def check(backend, dtype, grads, **options):
    (h64, w64, b64, y), cast = make_inputs(dtype)
    trainable = (True, *GRADS[grads])
    upstream = random_upstream(h64[:, 0])

    def ours_fn(h, w, b):
        return sk.linear_logprobs(h, w, y, bias=b, temperature=0.8, backend=backend, **options)

    def ref_fn(h, w, b):
        return reference.linear_logprobs(h, w, y, bias=b, temperature=0.8)

    ours, same, ref = (
        grads_of(f, x, trainable, upstream) for f, x in ((ours_fn, cast), (ref_fn, cast), (ref_fn, (h64, w64, b64)))
    )
    assert_close_to_ref(ours[0], ref[0], same[0].float(), dtype=dtype, name="logp")
    names = [n for n, t in zip(("d_hidden", "d_weight", "d_bias"), trainable, strict=True) if t]
    for name, a, s, r in zip(names, ours[1], same[1], ref[1], strict=True):
        assert a.dtype == dtype
        assert_close_to_ref(a, r, s, dtype=dtype, name=name, rtol=1e-5 if dtype == torch.float32 else 2e-2)


# triton keeps nothing (its kernels fuse the GEMMs): one dtype there, the interpreter is slow
KEPT_CASES = [(b, d) for b in BACKENDS for d in DTYPES if b != "triton" or d == "f32"]


@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("backend,dtype", KEPT_CASES)
def test_kept_logits_match_reference(backend, dtype, grads):
    check(backend, DTYPES[dtype], grads, chunk_bytes=TILED, max_logits_bytes=KEEP_ALL)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", CHUNKED)
def test_vocabulary_tiles_without_kept_logits_match_reference(backend, dtype):
    check(backend, DTYPES[dtype], "weight+bias", chunk_bytes=TILED, max_logits_bytes=0)


@pytest.mark.parametrize("backend", CHUNKED)
def test_backward_computes_dz_from_the_logits_it_is_given(backend):
    """Op-level contract: the forward with keep_logits returns x = h @ W^T, and the backward given logits x' uses
    them (not h @ W^T): dz = g s (onehot - exp(s (x' + b) - lse)), dh = dz W, dW = dz^T h, db = sum_t dz."""
    (h, w, b, y), _ = make_inputs(torch.float64)
    scale, rows = 0.8, 5
    logp, lse, _, kept = torch.ops.sami_kernels.linear_logprobs_fwd(h, w, b, y, -100, scale, False, rows, backend, True)
    torch.testing.assert_close(kept, h @ w.T)
    torch.testing.assert_close(logp, reference.linear_logprobs(h, w, y, bias=b, temperature=1 / scale))
    g = random_upstream(lse)
    other = torch.randn(T, V, dtype=torch.float64)  # logits the backward must use as given
    valid = (y != -100)[:, None]
    dz = torch.zeros(T, V, dtype=torch.float64)
    dz[valid[:, 0], y[valid[:, 0]]] = 1.0
    dz = torch.where(valid, g[:, None] * scale * (dz - torch.exp(scale * (other + b) - lse[:, None])), 0.0)
    grads = torch.ops.sami_kernels.linear_logprobs_bwd(
        h, w, b, y, lse, g, -100, scale, True, True, True, rows, backend, other.clone()
    )
    for name, ours, expected in zip(("dh", "dw", "db"), grads, (dz @ w, dz.T @ h, dz.sum(0)), strict=True):
        torch.testing.assert_close(ours, expected, msg=name)


@pytest.mark.parametrize("backend", CHUNKED)
def test_registered_ops_with_kept_logits_pass_opcheck(backend):
    (h, w, b, y), _ = make_inputs(torch.float32)
    fwd_args = (h.float(), w.float(), b.float(), y, -100, 0.8, False, 7, backend, True)
    torch.library.opcheck(torch.ops.sami_kernels.linear_logprobs_fwd, fwd_args)
    _, lse, _, kept = torch.ops.sami_kernels.linear_logprobs_fwd(*fwd_args)
    bwd_args = (*fwd_args[:4], lse, torch.randn(T), -100, 0.8, True, True, True, 7, backend, kept)
    torch.library.opcheck(torch.ops.sami_kernels.linear_logprobs_bwd, bwd_args)


def test_max_logits_bytes_decides_what_is_kept(monkeypatch):
    """Kept when the [T, V] float32 logits fit and a trainable weight or bias needs the backward; max_logits_bytes
    defaults to chunk_bytes."""
    from sami_kernels.kernels import torch_logprobs

    calls = []
    original = torch_logprobs.linear_logprobs_fwd

    def spy(*args):  # (hidden, weight, bias, targets, ignore_index, scale, want_u, chunk_rows[, keep_logits])
        calls.append(len(args) > 8 and args[8])
        return original(*args)

    monkeypatch.setattr(torch_logprobs, "linear_logprobs_fwd", spy)
    (_, _, _, y), (h, w, b) = make_inputs(torch.float32)
    fits = 4 * T * V
    cases = [
        (dict(max_logits_bytes=fits), (True, True), True),
        (dict(max_logits_bytes=fits - 1), (True, True), False),
        (dict(chunk_bytes=fits), (False, True), True),  # bias only: the default budget is chunk_bytes
        (dict(chunk_bytes=fits - 1), (True, False), False),
        (dict(max_logits_bytes=fits), (False, False), False),  # frozen: u is formed in the forward instead
    ]
    for options, (weight_grad, bias_grad), kept in cases:
        calls.clear()
        sk.linear_logprobs(h.requires_grad_(), w.requires_grad_(weight_grad), y, bias=b.requires_grad_(bias_grad),
                           backend="torch", **options)  # fmt: skip
        assert calls == [kept], (options, weight_grad, bias_grad)
    calls.clear()
    with torch.no_grad():
        sk.linear_logprobs(h, w.requires_grad_(), y, backend="torch", max_logits_bytes=fits)
    assert calls == [False]


@pytest.mark.parametrize("backend", CHUNKED)
def test_a_second_backward_of_the_same_graph_recomputes(backend):
    (_, _, _, y), (h, w, b) = make_inputs(torch.float32)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    logp = sk.linear_logprobs(*leaves[:2], y, bias=leaves[2], backend=backend, max_logits_bytes=KEEP_ALL)
    g = random_upstream(logp)
    first = torch.autograd.grad(logp, leaves, g, retain_graph=True)  # consumes the kept logits
    second = torch.autograd.grad(logp, leaves, g)
    for a, c in zip(first, second, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, 1.5, "32MB", True])
def test_max_logits_bytes_must_be_a_byte_count(value):
    (_, _, _, y), (h, w, _) = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="max_logits_bytes must be a number of bytes"):
        sk.linear_logprobs(h, w.requires_grad_(), y, max_logits_bytes=value)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.skipif(os.environ.get("SAMI_KERNELS_ONEDNN") == "0", reason="already running on the fallback")
def test_aten_gemm_fallback_matches_reference():
    """The exactness tests of this file for the cpu backend again, with float32 GEMMs in at::mm (a fresh process:
    the GEMM library is chosen once per process)."""
    env = dict(os.environ, SAMI_KERNELS_ONEDNN="0")
    select = "cpu and f32 and not fallback"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=600,
    )  # fmt: skip
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def _clones(library: Path) -> dict[str, str]:
    """{symbol: disassembly} of the AVX2 (x86-64-v3) clones of the cpu epilogue's row kernels."""
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True).stdout
    bodies = re.split(r"\n(?=[0-9a-f]+ <)", dump)
    return {b.split(">:")[0]: b for b in bodies if re.match(r"[0-9a-f]+ <\S*(fwd|bwd)_rows_f32\S*arch_x86_64_v3>:", b)}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not found")
@pytest.mark.skipif("cpu" not in BACKENDS or not sys.platform.startswith("linux"), reason="no C++ extension")
def test_avx2_clones_of_the_epilogue_are_vectorised():
    library = Path(backends.cpu_extension().__file__)
    clones = _clones(library)
    if not clones:
        pytest.skip("no x86-64-v3 clones in this build (not GCC on x86-64 Linux)")
    assert len(clones) == 2, sorted(clones)
    for name, body in clones.items():
        fmas = re.findall(r"\tvfn?madd\w*ps\s+%ymm", body)
        assert len(fmas) >= 6, f"{name}: {len(fmas)} packed ymm FMAs: the exp polynomial is not vectorised"
