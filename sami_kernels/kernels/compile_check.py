"""Compile every Triton kernel of sami_kernels for real GPUs (sm_80, sm_90) without one, in every variant its
launcher can produce, and report registers, spills, shared memory and occupancy.

    python -m sami_kernels.kernels.compile_check [--json OUT] [--markdown] [--arch 80 90] [--jobs N] [--dry-run]

1. Discovery (`discover`, no import): every @triton.jit function in the package's modules, by module: "launched"
   (launched with a grid, `kernel[grid](...)`), "helpers" (called by a launched kernel, directly or through other
   helpers: compiled inside their callers) and "unreached" (neither: nothing would compile it; an error).
2. Variants: the real launchers run on meta tensors (no data, no device) over WORKLOADS (shapes x dtypes x bias x
   torch's float32 matmul precision, which picks DOT_PRECISION "ieee" or "tf32"), with each launched kernel's `run`
   replaced by a recorder, so the variants are what the launchers produce (block sizes, warps, stages, constexprs,
   pointer / integer alignment). A launched kernel that no workload reaches is an error: a new kernel cannot go
   unchecked. Identical specialisations are compiled once.
3. Each variant: triton.compile for the target; registers, spills and stack from the `ptxas -v` log of Triton's own
   cubin build (TRITON_DUMP_PTXAS_LOG, the ptxas options of a real launch); shared memory from Triton's metadata;
   CTAs per SM from `occupancy`.
Fails (exit 1) on a compile error, any spill, a variant that cannot be resident (shared memory over the per-CTA
limit), or a matmul kernel with 16-bit inputs or tf32 dots and no tensor-core instruction (mma.sync / wgmma).

Compiling needs TRITON_INTERPRET=0 before triton is imported (kernels decorated under the interpreter cannot be
compiled): main() re-executes itself in a fresh process otherwise. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sami_kernels/
ARCHS = (80, 90)
_CHILD_FLAG = "SAMI_COMPILE_CHECK_CHILD"

# Per-SM resources, CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (8.0: A100,
# 9.0: H100): 64K 32-bit registers, 2048 resident threads (64 warps), 32 resident CTAs; shared memory per SM
# 164 KB (8.0) / 228 KB (9.0), per CTA at most 163 KB / 227 KB. Allocation granularities (CUDA occupancy
# calculator, both): registers in units of 256 per warp, shared memory in units of 128 bytes, and the runtime
# reserves 1 KB of shared memory per CTA.
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, ctas=32, smem=164 << 10, smem_per_cta=163 << 10),
    90: dict(regs=65536, threads=2048, ctas=32, smem=228 << 10, smem_per_cta=227 << 10),
}
REG_UNIT, SMEM_UNIT, SMEM_RESERVED = 256, 128, 1024

# Workloads driving the launchers (each variant costs ~1 s of compile time). (T, H, V): token tiles BLOCK_T = 128
# (64 for fp32), 64, 32 and 16 with rows of H a multiple of 16 elements (long K steps), and BLOCK_T = 128 / 64 and
# 32 with unaligned rows (short K steps, unaligned chunk pointers); the model shapes of SmolLM2 and Llama-3.
LOGPROB_SHAPES = [
    (4096, 576, 49152),
    (40, 4096, 128256),
    (20, 2048, 50257),
    (5, 4096, 32000),
    (1000, 577, 32003),
    (20, 577, 32003),
]
INFONCE_N = (2, 9, 33, 65)  # BLOCK_N = 2, 16, 64, 128: the extremes and two between (N > 128 falls back to torch)
# torch.set_float32_matmul_precision for float32 inputs: the launcher then picks ieee or tf32 fp32 dots
FP32_MATMUL_PRECISIONS = ("highest", "high")


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) of a kernel using `registers` per thread, num_warps warps and
    `shared` bytes of shared memory per CTA; 0 CTAs when the CTA's shared memory exceeds the per-CTA limit.

        CTAs = min(max CTAs, threads per SM // (32 num_warps), (regs per SM // regs per warp) // num_warps,
                   shared per SM // (shared + 1 KB reserved, rounded up to 128 B))
        regs per warp = registers x 32 rounded up to a multiple of 256"""
    limits = SM_LIMITS[arch]
    regs_per_warp = math.ceil(registers * 32 / REG_UNIT) * REG_UNIT
    smem = math.ceil((shared + SMEM_RESERVED) / SMEM_UNIT) * SMEM_UNIT
    bounds = {
        "ctas": limits["ctas"],
        "threads": limits["threads"] // (32 * num_warps),
        "registers": (limits["regs"] // regs_per_warp) // num_warps if registers else limits["ctas"],
        "shared": limits["smem"] // smem if shared <= limits["smem_per_cta"] else 0,
    }
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter


def _is_jit(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(node, ast.Attribute) and node.attr == "jit") or (isinstance(node, ast.Name) and node.id == "jit")


def discover(package_dir: Path = PACKAGE_DIR) -> dict[str, dict[str, list[str]]]:
    """{module: {"launched": [...], "helpers": [...], "unreached": [...]}} for every module of the package (and its
    subpackages) that defines @triton.jit functions, read from the source (nothing is imported)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        jit = {
            node.name: node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)
        }
        if not jit:
            continue
        launched = {
            node.func.value.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in jit
        }
        callees = {
            name: {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            & set(jit)
            for name, fn in jit.items()
        }
        helpers, todo = set(), list(launched)
        while todo:
            for callee in callees[todo.pop()] - helpers - launched:
                helpers.add(callee)
                todo.append(callee)
        module = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
        found[module] = dict(
            launched=sorted(launched), helpers=sorted(helpers), unreached=sorted(set(jit) - launched - helpers)
        )
    return found


# --------------------------------------------------------------------------------------------------------------
# compiling (main() only: needs TRITON_INTERPRET=0 before triton is imported)
# --------------------------------------------------------------------------------------------------------------


def _workloads(torch, modules):
    """(label, call) pairs: each call runs the launchers of a module on meta tensors."""
    from sami_kernels.kernels.ops.linear_logprobs import chunk_rows_for

    lp, nce = modules["sami_kernels.kernels.triton_logprobs"], modules["sami_kernels.kernels.triton_infonce"]

    def meta(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    def logprobs(T, H, V, dtype, bias, precision):
        h, w, y = meta(T, H, dtype=dtype), meta(V, H, dtype=dtype), meta(T, dtype=torch.int64)
        b = meta(V, dtype=dtype) if bias else None
        rows = chunk_rows_for(T, V, torch.device("cuda"), None)  # the chunk the op passes on a GPU
        torch.set_float32_matmul_precision(precision)
        logp, lse, _ = lp.linear_logprobs_fwd(h, w, b, y, -100, 0.7, False, rows)
        lp.linear_logprobs_fwd(h, w, b, y, -100, 0.7, True, rows)  # frozen weight: u in the forward
        lp.linear_logprobs_bwd(h, w, b, y, lse, logp, -100, 0.7, True, True, bias, rows)

    for T, H, V in LOGPROB_SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for bias in (False, True):
                for precision in FP32_MATMUL_PRECISIONS if dtype == torch.float32 else ("highest",):
                    label = f"T{T} H{H} V{V} {str(dtype)[6:]}{' bias' if bias else ''} {precision}"
                    yield label, lambda a=(T, H, V, dtype, bias, precision): logprobs(*a)
    for dtype in (torch.float32, torch.float64):
        for N in INFONCE_N:
            for direction in (0, 1, 2):
                M = meta(3, N, N, dtype=dtype)
                yield f"B3 N{N} {str(dtype)[6:]} direction {direction}", lambda M=M, d=direction: nce.infonce_fwd(M, d)


def _stand_in(torch, value):
    """A CPU tensor with value's dtype and the 16-byte alignment its data pointer would have on the GPU (allocations
    are aligned; a view is offset by storage_offset elements); other arguments are kept."""
    if not isinstance(value, torch.Tensor):
        return value
    offset = value.storage_offset() * value.element_size() % 16 // value.element_size()
    return torch.empty(offset + 16, dtype=value.dtype)[offset:]


def _record(torch, discovered):
    """Run the workloads with every launched kernel's `run` replaced by a recorder -> (launches [(kernel, arguments,
    launch options, workload label)], refused workloads): a launcher's ValueError (an unsupported dtype) skips one."""
    import triton

    modules = {name: importlib.import_module(name) for name in discovered}
    launches, label = [], [None]
    for name, found in discovered.items():
        for kernel_name in found["launched"]:
            kernel = getattr(modules[name], kernel_name)
            if not isinstance(kernel, triton.runtime.jit.JITFunction):
                raise SystemExit(f"compile_check: {name}.{kernel_name} was decorated under TRITON_INTERPRET=1")

            def recorder(*args, grid, warmup, kernel=kernel, **kwargs):
                params = dict(zip(kernel.arg_names, args, strict=False))
                params |= {k: v for k, v in kwargs.items() if k in kernel.arg_names}
                options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
                launches.append((kernel, {k: _stand_in(torch, v) for k, v in params.items()}, options, label[0]))

            kernel.run = recorder
    refused = []
    for label[0], call in _workloads(torch, modules):
        try:
            call()
        except ValueError as err:
            refused.append(f"{label[0]}: {err}")
    torch.set_float32_matmul_precision("highest")
    return launches, refused


def _specialize(kernel, params, backend):
    """(signature, constexprs, attrs) as JITFunction.run would build them for these arguments."""
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for p in kernel.params:
        value = params.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[(p.num,)] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(
            backend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(p.num,)] = attr
        elif isinstance(attr, str):
            attrs[(p.num,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _variants(launches, archs):
    """Deduplicated compile jobs: one per (arch, kernel, specialisation, options), with the labels that made it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    jobs = {}
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for kernel, params, options, label in launches:
            signature, constexprs, attrs = _specialize(kernel, params, backend)
            key = (arch, kernel.__name__, repr(signature), repr(constexprs), repr(attrs), repr(sorted(options.items())))
            job = jobs.setdefault(
                key, dict(arch=arch, kernel=kernel, sig=(signature, constexprs, attrs), options=options, labels=[])
            )
            if label not in job["labels"]:
                job["labels"].append(label)
    return list(jobs.values())


def _ptxas_stats(log: str) -> dict:
    """Registers, spills and stack frame from the `ptxas -v` log of Triton's own cubin build."""
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    if not regs:
        raise RuntimeError(f"no ptxas -v log (TRITON_DUMP_PTXAS_LOG unset or a cached kernel): {log[-500:]!r}")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(
        registers=max(regs),
        spill_stores=sum(int(s) for s, _ in spills),
        spill_loads=sum(int(ld) for _, ld in spills),
        stack_frame=max((int(s) for s in re.findall(r"(\d+) bytes stack frame", log)), default=0),
    )


def _compile(job):
    """One variant -> its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, arch, options = job["kernel"], job["arch"], job["options"]
    signature, constexprs, attrs = job["sig"]
    named = {kernel.arg_names[i[0]]: v for i, v in constexprs.items()}
    first_pointer = next((t for t in signature.values() if t.startswith("*")), "-")
    row = dict(
        kernel=kernel.__name__,
        module=kernel.module,
        arch=f"sm_{arch}",
        dtype=first_pointer.lstrip("*"),
        precision=named.get("DOT_PRECISION", "-"),
        bias=named.get("HAS_BIAS", "-"),
        constexprs={p.name: named[p.name] for p in kernel.params if p.is_constexpr},
        num_warps=options.get("num_warps", 4),
        num_stages=options.get("num_stages", 3),
        workloads=job["labels"],
        error=None,
    )
    start, log = time.perf_counter(), io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: Triton prints its ptxas -v log
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options,
            )
        ptx = compiled.asm["ptx"]
        row.update(
            matmul="tt.dot" in compiled.asm["ttir"],
            mma_sync="mma.sync" in ptx,
            wgmma="wgmma" in ptx,
            shared=int(getattr(compiled.metadata, "shared", 0) or 0),
        )
        row.update(_ptxas_stats(log.getvalue()))
        row["ctas_per_sm"], row["limiter"] = occupancy(arch, row["registers"], row["num_warps"], row["shared"])
    except Exception as err:  # noqa: BLE001 - reported in the row, fails the check
        row["error"] = f"{type(err).__name__}: {err}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    problems = []
    if row["error"]:
        problems.append("compile error")
    else:
        if row["spill_stores"] or row["spill_loads"]:
            problems.append("spills")
        if row["ctas_per_sm"] == 0:
            problems.append("shared memory over the per-CTA limit")
        needs_tc = row["dtype"] in ("bf16", "fp16") or row["precision"] == "tf32"
        if row["matmul"] and needs_tc and not (row["mma_sync"] or row["wgmma"]):
            problems.append("no tensor-core instruction")
    row["problems"], row["ok"] = problems, not problems
    return row


_JOBS: list = []  # read by the forked workers


def _compile_nth(n):
    return _compile(_JOBS[n])


def run(archs=ARCHS, jobs=None, verbose=True, dry_run=False):
    """(rows, discovered, problems outside the rows): compile every variant for every arch (none with dry_run)."""
    import multiprocessing

    import torch

    discovered = discover()
    problems = [f"{m}.{k} is neither launched nor called by a launched kernel" for m, d in discovered.items()
                for k in d["unreached"]]  # fmt: skip
    launches, refused = _record(torch, discovered)
    reached = {(k.module, k.__name__) for k, *_ in launches}
    problems += [f"{m}.{k} is launched but no workload reaches it: add one to compile_check._workloads"
                 for m, d in discovered.items() for k in d["launched"] if (m, k) not in reached]  # fmt: skip
    _JOBS[:] = _variants(launches, archs)
    if verbose:
        print(f"{len(launches)} launches recorded, {len(_JOBS)} variants to compile; refused workloads: {len(refused)}")
        for line in refused[:3]:
            print(f"  refused: {line}")
    if dry_run:
        return [], discovered, problems
    if verbose:
        print(_HEADER, flush=True)
    rows = []
    with multiprocessing.get_context("fork").Pool(jobs or os.cpu_count() or 1) as pool:
        for row in pool.imap(_compile_nth, range(len(_JOBS))):
            rows.append(row)
            if verbose:
                print(_format_row(row), flush=True)
    return rows, discovered, problems


_HEADER = (
    f"{'kernel':<19} {'arch':<6} {'dtype':<5} {'prec':<5} {'bias':<5} {'blocks':<22} {'w/s':<5} {'TC':<6} "
    f"{'regs':>4} {'spill':>7} {'smem':>6} {'CTA/SM':>6} {'limit':<9} {'from':<40} status"
)


def _blocks(constexprs):
    skip = ("HAS_BIAS", "DOT_PRECISION", "CAST_F32")
    return " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in constexprs.items() if k not in skip)


def _format_row(r):
    head = (
        f"{r['kernel']:<19} {r['arch']:<6} {r['dtype']:<5} {r['precision']:<5} {str(r['bias']):<5} "
        f"{_blocks(r['constexprs']):<22} {r['num_warps']}/{r['num_stages']:<3}"
    )
    if r["error"]:
        return f"{head} ERROR {r['error'][:300]}"
    tc = "wgmma" if r["wgmma"] else "mma" if r["mma_sync"] else "none" if r["matmul"] else "-"
    source = r["workloads"][0] + (f" +{len(r['workloads']) - 1}" if len(r["workloads"]) > 1 else "")
    status = "ok" if r["ok"] else "FAIL: " + ", ".join(r["problems"])
    return (
        f"{head} {tc:<6} {r['registers']:>4} {r['spill_stores']:>3}/{r['spill_loads']:<3} {r['shared']:>6} "
        f"{r['ctas_per_sm']:>6} {r['limiter']:<9} {source[:40]:<40} {status}"
    )


def markdown_summary(rows) -> str:
    """The README table: per kernel, arch, input dtype and dot precision, the range over its variants."""
    groups = {}
    for r in rows:
        if not r["error"]:
            groups.setdefault((r["kernel"], r["arch"], r["dtype"], r["precision"]), []).append(r)
    lines = [
        "| kernel | arch | dtype | dot | variants | warps | registers | spills | shared KB | CTAs/SM (limit) | TC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def span(values, fmt="{}"):
        lo, hi = min(values), max(values)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    for (kernel, arch, dtype, precision), rs in sorted(groups.items()):
        tc = sorted({"wgmma" if r["wgmma"] else "mma" if r["mma_sync"] else "-" for r in rs})
        worst = min(rs, key=lambda r: r["ctas_per_sm"])
        lines.append(
            f"| `{kernel}` | {arch} | {dtype} | {precision} | {len(rs)} | {span([r['num_warps'] for r in rs])} | "
            f"{span([r['registers'] for r in rs])} | {max(r['spill_stores'] + r['spill_loads'] for r in rs)} | "
            f"{span([r['shared'] / 1024 for r in rs], '{:.1f}')} | {span([r['ctas_per_sm'] for r in rs])} "
            f"({worst['limiter']}) | {'/'.join(tc)} |"
        )
    return "\n".join(lines)


def _reexec_if_needed(argv):
    """Run again in a fresh process with TRITON_INTERPRET=0 when the interpreter is (or may have been) enabled."""
    if os.environ.get(_CHILD_FLAG) == "1":
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("0", "", "false", "off", "no"):
        return None
    env = dict(os.environ, TRITON_INTERPRET="0", **{_CHILD_FLAG: "1"})
    return subprocess.call([sys.executable, "-m", "sami_kernels.kernels.compile_check", *argv], env=env)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = _reexec_if_needed(argv)
    if rc is not None:
        return rc
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None, help="write the rows and the discovered kernels to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the README summary table at the end")
    parser.add_argument("--arch", type=int, nargs="*", default=list(ARCHS), choices=sorted(SM_LIMITS))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--dry-run", action="store_true", help="discover and record the variants, compile nothing")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sami_triton_cache_")  # empty: every variant builds
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton

    print(f"triton {triton.__version__}")
    rows, discovered, problems = run(args.arch, args.jobs, dry_run=args.dry_run)
    failing = [r for r in rows if not r["ok"]]
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"\n{len(rows)} variants compiled, {len(failing)} failing; discovered: {json.dumps(discovered)}")
    if args.markdown:
        print("\n" + markdown_summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, discovered=discovered, problems=problems), f, indent=1)
    return 1 if failing or problems else 0


if __name__ == "__main__":
    sys.exit(main())
