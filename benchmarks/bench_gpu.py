"""GPU benchmark of per-token log-probs, forward + backward with a random upstream gradient, in one command:

    python benchmarks/bench_gpu.py [--filter bf16] [--providers sami-cuda,naive] [--csv PATH]

Providers (each skipped with a printed note when not importable / not usable here):
    sami-triton, sami-cuda  sami_kernels.linear_logprobs(backend=...)
    naive                   materialised float32 logits -> log_softmax -> gather
    torch-lce               torch.nn.functional.linear_cross_entropy(reduction="none",
                            options=torch.nn.LinearCrossEntropyOptions())
    liger                   Liger-Kernel liger_fused_linear_cross_entropy(reduction="none")
    cce                     Apple cut-cross-entropy linear_cross_entropy(reduction="none", filter_eps=None): exact
    cce-filter              the same with its default filter_eps="high": skips gradient blocks where
                            |softmax - onehot| is small (approximate gradients)
The peers' calls (PEERS, peer_logprobs) are checked against the installed packages' signatures by
tests/test_peer_signatures.py, without a GPU.
Cases: T in {4096, 16384} x (H, V) in {(576, 49152) SmolLM2-135M, (4096, 128256) Llama-3-8B} x {bf16, fp32} x
{trainable (useful work 8THV), frozen weight (4THV)}. Time: triton.testing.do_bench medians (p20 / p80 too);
TFLOP/s of the useful work and its fraction of the bf16 torch.mm rate measured in the same run at [T, H] x [H, V];
peak memory above the inputs via torch.cuda.max_memory_allocated, less the gradients every provider returns.
Rows print with benchmarks/runner.py's table and append to its CSV. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

MODELS = ((576, 49152), (4096, 128256))
# provider -> (module, function) of the peer's fused linear cross entropy
PEERS = {
    "torch-lce": ("torch.nn.functional", "linear_cross_entropy"),
    "liger": ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
    "cce": ("cut_cross_entropy", "linear_cross_entropy"),
    "cce-filter": ("cut_cross_entropy", "linear_cross_entropy"),
}
PROVIDERS = ("sami-triton", "sami-cuda", "naive", *PEERS)


def cases(dtypes):
    return [
        {"T": T, "H": H, "V": V, "dtype": dtype, "mode": mode, "flops": factor * T * H * V}
        for H, V in MODELS
        for T in (4096, 16384)
        for dtype in dtypes
        for mode, factor in (("trainable", 8), ("frozen", 4))
    ]


def logprob_fn(provider: str):
    """provider -> f(hidden, weight, targets) returning per-token log-probs [T], or a str saying why not here."""
    import torch

    import sami_kernels as sk
    from sami_kernels import backends

    if provider.startswith("sami-"):
        backend = provider.removeprefix("sami-")
        if backend not in backends.usable("cuda"):
            return f"backend {backend!r} is not usable here: {backends.probe()[backend].detail}"
        return lambda h, w, y: sk.linear_logprobs(h, w, y, backend=backend)
    if provider == "naive":
        return lambda h, w, y: torch.log_softmax((h @ w.T).float(), -1).gather(-1, y[:, None])[:, 0]
    if provider in PEERS:
        module, name = PEERS[provider]
        try:
            return peer_logprobs(provider, getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as err:
            return f"{module}.{name} is not importable ({err})"
    return f"unknown provider {provider!r}"


def peer_logprobs(provider: str, fn):
    """f(hidden, weight, targets) -> per-token log-probs [T] float32 = -(per-token loss) of the peer function fn
    (PEERS[provider]), called exactly as the benchmark calls it."""
    if provider == "torch-lce":
        import torch

        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: -fn(h, w, y, reduction="none", options=options).float()
    if provider == "liger":
        return lambda h, w, y: -fn(h, w, y, reduction="none").float()
    if provider == "cce":
        return lambda h, w, y: -fn(h, w, y, reduction="none", filter_eps=None).float()
    if provider == "cce-filter":
        return lambda h, w, y: -fn(h, w, y, reduction="none").float()
    raise ValueError(f"provider must be one of {tuple(PEERS)}, got {provider!r}")


def timings(do_bench, fn) -> tuple[float, float, float]:
    """Median, p20 and p80 milliseconds of fn() by triton.testing.do_bench."""
    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def measure(fn, case, do_bench):
    """Median / p20 / p80 ms of forward + backward, and the extra peak memory of one call (MiB)."""
    import torch

    torch.manual_seed(0)
    dtype = getattr(torch, case["dtype"])
    T, H, V = case["T"], case["H"], case["V"]
    hidden = torch.randn(T, H, device="cuda", dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", dtype=dtype) * H**-0.5).requires_grad_(case["mode"] == "trainable")
    targets = torch.randint(0, V, (T,), device="cuda")
    upstream = torch.randn(T, device="cuda")
    wrt = (hidden, weight) if weight.requires_grad else (hidden,)

    def step():
        return torch.autograd.grad(fn(hidden, weight, targets), wrt, upstream)

    median, p20, p80 = timings(do_bench, step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = step()
    torch.cuda.synchronize()
    out_mb = sum(g.numel() * g.element_size() for g in grads) / 2**20
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 - out_mb
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "peak_extra_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated subset")
    parser.add_argument("--filter", default="", help="run only cases whose shape/mode/dtype contains this text")
    parser.add_argument("--csv", default=runner.DEFAULT_CSV)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); for CPU: bench_logprobs.py")
    import triton.testing

    fns = {}
    for provider in args.providers.split(","):
        fn = logprob_fn(provider)
        if isinstance(fn, str):
            print(f"note: skipping {provider}: {fn}", file=sys.stderr)
        else:
            fns[provider] = fn
    stamp = {
        "machine": f"{platform.node()} {torch.cuda.get_device_name()}",
        "version": runner._version(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", os.path.relpath(__file__)] + sys.argv[1:]),
    }
    rows = []
    for case in cases(args.dtypes.split(",")):
        shape = f"T{case['T']}xH{case['H']}xV{case['V']}"
        label = f"{case['mode']} {shape} {case['dtype']}"
        if args.filter and args.filter not in label:
            continue
        a = torch.randn(case["T"], case["H"], device="cuda", dtype=torch.bfloat16)
        b = torch.randn(case["V"], case["H"], device="cuda", dtype=torch.bfloat16)
        mm_ms = timings(triton.testing.do_bench, lambda a=a, b=b: a @ b.T)[0]
        mm_gflops = 2 * case["T"] * case["H"] * case["V"] / (mm_ms / 1e3) / 1e9
        del a, b
        common = {"op": "linear_logprobs", "mode": case["mode"], "shape": shape, "dtype": case["dtype"], **stamp}
        rows.append({**common, "provider": "torch.mm bf16", "mode": "-", "median_ms": mm_ms, "gflops": mm_gflops,
                     "frac_of_mm": 1.0})  # fmt: skip
        for provider, fn in fns.items():
            row = {**common, "provider": provider}
            try:
                result = measure(fn, case, triton.testing.do_bench)
                gflops = case["flops"] / (result["median_ms"] / 1e3) / 1e9
                row.update(result, gflops=gflops, frac_of_mm=gflops / mm_gflops)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: report it in the table and go on
                row["median_ms"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:60]}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {provider:<12} {label}: {row['median_ms']}", file=sys.stderr, flush=True)
    print("gflops: useful GFLOP/s (8THV trainable, 4THV frozen); frac_of_mm: of the same-run bf16 torch.mm rate")
    runner.print_table(rows)
    runner.append_csv(rows, args.csv)
    print(f"\nappended {len(rows)} rows to {os.path.relpath(args.csv)}")


if __name__ == "__main__":
    main()
