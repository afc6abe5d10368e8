"""Per-token log-probs, forward + backward with a random upstream gradient, side by side:

    sami-<backend>  sami_kernels.linear_logprobs on each backend usable here (cpu, torch; triton on a GPU), defaults
    sami-cpu-keep   the cpu backend with max_logits_bytes large enough to keep the [T, V] logits (6THV when trainable)
    sami-cpu-mkl    the cpu backend with its float32 GEMMs in ATen's at::mm (MKL) instead of oneDNN
                    (SAMI_KERNELS_ONEDNN=0): the GEMM library the other providers use
    naive           materialised logits -> log_softmax -> gather (what the reference SAMI code does, minus copies)
    torch-lce       torch.nn.functional.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())
    cce             Apple's cut-cross-entropy, linear_cross_entropy(reduction="none", impl="torch_compile") (its CPU
                    implementation: torch.compile of logits -> cross_entropy; keeps the float32 logits); its first
                    call compiles, which is timed on its own (compile_s) and left out of the timings

Modes: trainable weight (useful work counted as 8THV: forward 2THV + recompute, dH, dW 2THV each) and
frozen weight (4THV: forward + dH). Shapes: SmolLM2-135M's head, H=576, V=49152.
A provider `NAME@DIR` runs NAME with the sami_kernels of another source tree DIR (extension built in place there,
`python setup.py build_ext --inplace`): a baseline commit, timed interleaved with this tree under --rounds.
Run: python benchmarks/bench_logprobs.py [--filter bf16] [--providers naive,sami-cpu] [--reps 5] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

H, V = 576, 49152


def _cases():
    cases = []
    for T in (1024, 4096):
        for dtype in ("float32", "bfloat16"):
            for mode, factor in (("trainable", 8), ("frozen", 4)):
                cases.append(
                    {
                        "op": "linear_logprobs",
                        "mode": mode,
                        "shape": f"T{T}xH{H}xV{V}",
                        "dtype": dtype,
                        "T": T,
                        "flops": factor * T * H * V,
                        "mm_shape": [T, H, V],
                    }
                )
    return cases


def _providers():
    import importlib.util

    from sami_kernels import backends

    usable = [name for name in backends.usable("cpu") if name != "triton"]
    sami = [f"sami-{name}" for name in usable] + (["sami-cpu-keep", "sami-cpu-mkl"] if "cpu" in usable else [])
    peers = ["cce"] if importlib.util.find_spec("cut_cross_entropy") else []
    return sami + ["naive", "torch-lce"] + peers


def build(provider: str, case: dict):
    provider, _, tree = provider.partition("@")
    if tree:  # before anything imports sami_kernels in this worker
        sys.path.insert(0, os.path.abspath(tree))
    import torch
    import torch.nn.functional as F

    import sami_kernels as sk

    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    T = case["T"]
    hidden = torch.randn(T, H, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, dtype=dtype) * H**-0.5).requires_grad_(case["mode"] == "trainable")
    targets = torch.randint(0, V, (T,))
    upstream = torch.randn(T, dtype=torch.float32)

    if provider == "sami-cpu-keep":
        logprobs = lambda: sk.linear_logprobs(hidden, weight, targets, backend="cpu", max_logits_bytes=1 << 40)  # noqa: E731
    elif provider == "sami-cpu-mkl":
        os.environ["SAMI_KERNELS_ONEDNN"] = "0"  # read at the first GEMM, in this worker process
        logprobs = lambda: sk.linear_logprobs(hidden, weight, targets, backend="cpu")  # noqa: E731
    elif provider.startswith("sami-"):
        backend = provider.removeprefix("sami-")
        logprobs = lambda: sk.linear_logprobs(hidden, weight, targets, backend=backend)  # noqa: E731
    elif provider == "naive":

        def logprobs():
            logits = (hidden @ weight.T).float()
            return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    elif provider == "torch-lce":
        options = torch.nn.LinearCrossEntropyOptions()
        logprobs = lambda: (
            -F.linear_cross_entropy(
                hidden,
                weight,
                targets,
                reduction="none",  # noqa: E731
                options=options,
            ).float()
        )
    elif provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        logprobs = lambda: -linear_cross_entropy(hidden, weight, targets, reduction="none", impl="torch_compile")  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}")

    params = [p for p in (hidden, weight) if p.requires_grad]

    def step():
        grads = torch.autograd.grad(logprobs(), params, upstream)
        return grads

    if provider == "cce":  # the first call compiles: timed here, apart from the measured calls
        start = time.perf_counter()
        step()
        step.compile_s = time.perf_counter() - start
    return step


if __name__ == "__main__":
    runner.main(__file__, _providers, _cases(), build)
