"""Shared assertions: every fast path is judged against float64 reference math, relative to how far plain
PyTorch in the same dtype lands from it, in the max norm over the tensor (elementwise, torch's error is near
zero on some elements by luck of rounding):

    max |ours - ref64| <= max |torch_same_dtype - ref64| + atol + rtol * max |ref64|
"""

from __future__ import annotations

import torch

# Absolute slack per input dtype on top of torch's own error (values of order 1-10).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close_to_ref(ours, ref64, torch_same, *, dtype, name="value", rtol=0.0):
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    ref64 = ref64.detach().to(torch.float64)
    ours64 = ours.detach().to(torch.float64)
    if not bool(torch.isfinite(ours64).eq(torch.isfinite(ref64)).all()):
        raise AssertionError(f"{name}: non-finite pattern differs from the reference")
    finite = torch.isfinite(ref64)
    if not bool(finite.any()):
        return
    err = (ours64 - ref64).abs()[finite]
    base = (torch_same.detach().to(torch.float64) - ref64).abs()[finite]
    allowed = base.max().item() + TOL[dtype] + rtol * ref64[finite].abs().max().item()
    if err.max().item() > allowed:
        worst = int(err.argmax())
        raise AssertionError(
            f"{name} ({dtype}): max error {err.max().item():.3g} > allowed {allowed:.3g} (torch in the same dtype: "
            f"{base.max().item():.3g}); worst element: ours {ours64[finite][worst].item():.8g}, "
            f"ref64 {ref64[finite][worst].item():.8g}"
        )


def random_upstream(like: torch.Tensor) -> torch.Tensor:
    """A random, non-uniform upstream gradient (uniform ones hide real bugs)."""
    return torch.randn(like.shape, dtype=torch.float64, device=like.device).to(like.dtype)
