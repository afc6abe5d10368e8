"""Shared benchmark runner: each (provider, case) runs in a fresh process, so peak memory is its own; results
print as one table and append to a CSV with the machine, versions and date.

A benchmark script defines `CASES` (list of dicts with at least op, mode, shape, dtype and the useful FLOPs
`flops`) and `build(provider, case) -> callable`; then `main(__file__, PROVIDERS, CASES, build)`. A callable with a
`compile_s` attribute (seconds its build spent compiling, e.g. a torch.compile'd peer's first call) has it reported
in its own column, apart from the timings. --rounds N repeats the timing of every provider N times, interleaved
(p1, p2, ..., p1, p2, ...: a shared machine's load drifts over all of them alike); the statistics pool the calls of
all rounds.
Every case is also timed for torch.mm at the same shapes in the same run, and each provider's useful GFLOP/s
is reported as a fraction of that matmul rate.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

FIELDS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "peak_extra_mb",
    "compile_s",
    "gflops",
    "frac_of_mm",
    "machine",
    "version",
    "date",
    "command",
]
DEFAULT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "results.csv")


def _nbytes(result) -> int:
    import torch

    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return 0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def measure_time(fn, *, device: str = "cpu", reps: int = 5, warmup: int = 1) -> dict:
    """Median and 20th / 80th percentile wall time of fn() in ms, after warm-up calls."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return {**time_stats(times), "times_ms": times}


def time_stats(times_ms: list[float]) -> dict:
    """Median and 20th / 80th percentile of call times in ms."""
    q = statistics.quantiles(times_ms, n=5) if len(times_ms) > 1 else times_ms * 4
    return {"median_ms": statistics.median(times_ms), "p20_ms": q[0], "p80_ms": q[3]}


def measure_memory(fn, *, device: str = "cpu") -> dict:
    """Extra peak memory of one warm call of fn() in MiB: the high-water mark above what existed before the call,
    less the tensors it returns (gradients every provider must produce).

    CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up call). The worker runs with
    a fixed glibc mmap threshold so that freed large blocks leave the resident set; that slows allocation, which
    is why time is measured in another process."""
    import torch

    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out_mb = _nbytes(fn()) / 2**20
        torch.cuda.synchronize()
        return {"peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20 - out_mb}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_mb("VmRSS")
    out_mb = _nbytes(fn()) / 2**20
    return {"peak_extra_mb": _status_mb("VmHWM") - base - out_mb}


def matmul_gflops(m: int, k: int, n: int, dtype: str, device: str = "cpu", reps: int = 5) -> float:
    """Same-run torch.mm rate for [m, k] @ [k, n]: the yardstick every provider is divided by."""
    import torch

    a = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(n, k, dtype=getattr(torch, dtype), device=device)
    result = measure_time(lambda: a @ b.T, device=device, reps=reps, warmup=3)
    return 2 * m * k * n / (result["median_ms"] / 1e3) / 1e9


def _worker(build, provider: str, case: dict, what: str, reps: int) -> dict:
    fn = build(provider, case)
    device = case.get("device", "cpu")
    result = measure_memory(fn, device=device) if what == "memory" else measure_time(fn, device=device, reps=reps)
    if hasattr(fn, "compile_s"):
        result["compile_s"] = fn.compile_s
    return result


def _spawn(script: str, provider: str, case: dict, reps: int, what: str) -> dict:
    """Time or memory of one (provider, case), in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if what == "memory" else None
    cmd = [sys.executable, script, "--worker", provider, json.dumps(case), what, "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(script: str, providers: list[str], case: dict, reps: int, rounds: int, measures) -> dict[str, dict]:
    """{provider: result} for one case: `rounds` interleaved timing sweeps (pooled), then memory."""
    results = {p: {} for p in providers}
    times = {p: [] for p in providers}
    for _ in range(rounds if "time" in measures else 0):
        for provider in providers:
            result = _spawn(script, provider, case, reps, "time")
            times[provider] += result.pop("times_ms", [])
            results[provider].update(result)
    for provider in providers:
        if "memory" in measures and "error" not in results[provider]:
            results[provider].update(_spawn(script, provider, case, reps, "memory"))
        if times[provider] and "error" not in results[provider]:
            results[provider].update(time_stats(times[provider]))
    return results


def _version() -> str:
    try:
        from importlib.metadata import version

        import torch

        return f"sami-kernels {version('sami-kernels')}, torch {torch.__version__}"
    except Exception:  # noqa: BLE001 - a report still prints without package metadata
        return "unknown"


def print_table(rows: list[dict]) -> None:
    cols = FIELDS[: FIELDS.index("frac_of_mm") + 1]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def append_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(script: str, providers, cases: list[dict], build) -> None:
    """providers: the default provider list, or a function returning it (called only outside the workers, which
    then import nothing before build())."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("PROVIDER", "CASE_JSON", "WHAT"), help=argparse.SUPPRESS)
    parser.add_argument("--providers", default=None, help="comma-separated subset")
    parser.add_argument("--filter", default="", help="run only cases whose shape/mode/dtype contains this text")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing sweeps over the providers")
    parser.add_argument("--measure", choices=("both", "time", "memory"), default="both")
    parser.add_argument("--csv", default=DEFAULT_CSV)
    args = parser.parse_args()
    if args.worker:
        provider, case, what = args.worker[0], json.loads(args.worker[1]), args.worker[2]
        print(json.dumps(_worker(build, provider, case, what, args.reps)))
        return

    default_providers = providers() if callable(providers) else providers
    command = " ".join(["python", os.path.relpath(script)] + sys.argv[1:])
    stamp = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "version": _version(),
        "date": datetime.date.today().isoformat(),
        "command": command,
    }
    rows = []
    for case in cases:
        label = f"{case['mode']} {case['shape']} {case['dtype']}"
        if args.filter and args.filter not in label:
            continue
        measures = ("time", "memory") if args.measure == "both" else (args.measure,)
        if "time" in measures:
            mm = matmul_gflops(*case["mm_shape"], case["dtype"], case.get("device", "cpu"), reps=args.reps)
            mm_shape = "x".join(map(str, case["mm_shape"]))
            rows.append(
                {
                    "op": "torch.mm",
                    "provider": "torch.mm",
                    "mode": "-",
                    "shape": mm_shape,
                    "dtype": case["dtype"],
                    "gflops": mm,
                    "frac_of_mm": 1.0,
                    **stamp,
                }
            )
        providers = args.providers.split(",") if args.providers else list(default_providers)
        for provider, result in _measure(script, providers, case, args.reps, args.rounds, measures).items():
            row = {
                "op": case["op"],
                "provider": provider,
                "mode": case["mode"],
                "shape": case["shape"],
                "dtype": case["dtype"],
                **stamp,
            }
            if "error" in result:
                row["median_ms"] = f"error: {result['error'][:60]}"
            elif "median_ms" not in result:
                row.update(result)
            else:
                gflops = case["flops"] / (result["median_ms"] / 1e3) / 1e9
                row.update(result, gflops=gflops, frac_of_mm=gflops / mm)
            rows.append(row)
            print(f"  {provider:<14} {label}: {row.get('median_ms')}", file=sys.stderr, flush=True)
    print_table(rows)
    append_csv(rows, args.csv)
    print(f"\nappended {len(rows)} rows to {os.path.relpath(args.csv)}")
