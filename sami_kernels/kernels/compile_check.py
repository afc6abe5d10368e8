"""Compile every Triton kernel of sami_kernels for real GPUs (no GPU needed).

    python -m sami_kernels.kernels.compile_check [--json OUT] [--arch 80 90]

Compiles the kernels of sami_kernels/kernels/triton_logprobs.py and
triton_infonce.py for sm_80 / sm_90 with the block sizes the launch heuristics
pick for representative shapes, then runs the ptxas bundled with Triton
(`ptxas -v`) on the PTX to get registers and spills.  Prints a table and exits
non-zero if a bf16/fp16 matmul kernel has no tensor-core instruction
(mma.sync / wgmma) or any kernel spills.

Must run in a process where TRITON_INTERPRET=0 before triton is imported (kernels
decorated under the interpreter cannot be compiled); if that is not the case the
module re-executes itself in a fresh subprocess.
"""

import os
import sys

_CHILD_FLAG = "SAMI_COMPILE_CHECK_CHILD"


def _reexec_if_needed():
    """Re-run in a fresh process when the interpreter was (or may have been) enabled
    before this module ran (e.g. `python -m` imported the package __init__ first)."""
    if os.environ.get(_CHILD_FLAG) == "1":
        return None
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("0", "", "false", "off", "no"):
        return None
    import subprocess

    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env[_CHILD_FLAG] = "1"
    return subprocess.call([sys.executable, "-m", "sami_kernels.kernels.compile_check", *sys.argv[1:]], env=env)


if __name__ == "__main__":
    _rc = _reexec_if_needed()
    if _rc is not None:
        sys.exit(_rc)

os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

_TMP_CACHE = tempfile.mkdtemp(prefix="sami_triton_cache_")
os.environ["TRITON_CACHE_DIR"] = _TMP_CACHE

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from sami_kernels.kernels import triton_infonce as _nce  # noqa: E402
from sami_kernels.kernels import triton_logprobs as _lp  # noqa: E402

for _k in (_lp._lp_fwd_kernel, _lp._lp_merge_kernel, _lp._lp_dlogits_kernel, _nce._infonce_kernel):
    if not isinstance(_k, triton.runtime.jit.JITFunction):
        raise SystemExit(
            "compile_check: kernels were decorated under TRITON_INTERPRET=1; "
            "run `TRITON_INTERPRET=0 python -m sami_kernels.kernels.compile_check`"
        )

_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (T, H, V): two model-like shapes, two small-T shapes and an odd shape whose
# H is not a multiple of 16 (unaligned rows: the heuristic takes a shorter K step).
LOGPROB_SHAPES = [(4096, 576, 49152), (512, 4096, 32000), (8, 2048, 50257), (24, 4096, 32000), (1000, 577, 32003)]
INFONCE_N = [8, 32, 64, 128]  # N > 128 uses a torch fallback
ARCHS = [80, 90]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _t(dtype):
    """A stand-in tensor: only its dtype and (16-byte aligned) data_ptr matter."""
    return torch.empty(16, dtype=dtype)


def _specialize(fn, args, const, backend):
    """Mimic JITFunction._pack_args: ints equal to 1 become constexprs, ints and
    pointers divisible by 16 get tt.divisibility=16 (as at a real launch)."""
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
            constexprs[(fn.arg_names.index(name),)] = const[name]
            continue
        ty, attr = native_specialize_impl(backend, args[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[(fn.arg_names.index(name),)] = attr
        elif isinstance(attr, str):
            attrs[(fn.arg_names.index(name),)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


def _jobs():
    jobs = []
    scale, ign = 0.7, -100
    for T, H, V in LOGPROB_SHAPES:
        shape = f"T{T}_H{H}_V{V}"
        for dt in DTYPES:
            cfg = _lp.fwd_config(T, H, V, dt)
            f32, i64 = _t(torch.float32), _t(torch.int64)
            args = dict(
                h_ptr=_t(dt),
                w_ptr=_t(dt),
                b_ptr=_t(dt),
                y_ptr=i64,
                pm_ptr=f32,
                ps_ptr=f32,
                pt_ptr=f32,
                T=T,
                H=H,
                V=V,
                stride_h=H,
                stride_w=H,
                ignore_index=ign,
                scale=scale,
                v_per_split=cfg["v_per_split"],
            )
            const = dict(
                HAS_BIAS=True,
                BLOCK_T=cfg["BLOCK_T"],
                BLOCK_V=cfg["BLOCK_V"],
                BLOCK_H=cfg["BLOCK_H"],
                CAST_F32=False,
                DOT_PRECISION="ieee",
            )
            jobs.append(
                dict(
                    fn=_lp._lp_fwd_kernel,
                    args=args,
                    const=const,
                    dtype=_SHORT[dt],
                    shape=shape,
                    matmul=True,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                )
            )

            S = cfg["num_splits"]
            mcfg = _lp.merge_config(T, S)
            if dt == torch.float32:  # merge kernel is dtype independent
                args = dict(
                    pm_ptr=f32,
                    ps_ptr=f32,
                    pt_ptr=f32,
                    y_ptr=i64,
                    logp_ptr=f32,
                    lse_ptr=f32,
                    T=T,
                    num_splits=S,
                    ignore_index=ign,
                )
                const = dict(BLOCK_T=mcfg["BLOCK_T"], BLOCK_S=mcfg["BLOCK_S"])
                jobs.append(
                    dict(
                        fn=_lp._lp_merge_kernel,
                        args=args,
                        const=const,
                        dtype="fp32",
                        shape=shape + f"_S{S}",
                        matmul=False,
                        num_warps=mcfg["num_warps"],
                        num_stages=1,
                    )
                )

            R = min(T, 4096)
            dcfg = _lp.dlogits_config(R, H, V, dt)
            args = dict(
                h_ptr=_t(dt),
                w_ptr=_t(dt),
                b_ptr=_t(dt),
                y_ptr=i64,
                lse_ptr=f32,
                g_ptr=f32,
                dz_ptr=_t(_lp._dz_dtype(dt)),
                R=R,
                H=H,
                V=V,
                stride_h=H,
                stride_w=H,
                stride_dz=V,
                ignore_index=ign,
                scale=scale,
            )
            const = dict(
                HAS_BIAS=True,
                BLOCK_T=dcfg["BLOCK_T"],
                BLOCK_V=dcfg["BLOCK_V"],
                BLOCK_H=dcfg["BLOCK_H"],
                GROUP_T=dcfg["GROUP_T"],
                CAST_F32=False,
                DOT_PRECISION="ieee",
            )
            jobs.append(
                dict(
                    fn=_lp._lp_dlogits_kernel,
                    args=args,
                    const=const,
                    dtype=_SHORT[dt],
                    shape=shape,
                    matmul=True,
                    num_warps=dcfg["num_warps"],
                    num_stages=dcfg["num_stages"],
                )
            )
    for N in INFONCE_N:
        cfg = _nce.infonce_config(N)
        for direction in (0, 1, 2):
            f32 = _t(torch.float32)
            args = dict(m_ptr=f32, loss_ptr=f32, dm_ptr=f32, N=N)
            const = dict(DIRECTION=direction, BLOCK_N=cfg["BLOCK_N"])
            jobs.append(
                dict(
                    fn=_nce._infonce_kernel,
                    args=args,
                    const=const,
                    dtype="fp32",
                    shape=f"N{N}_dir{direction}",
                    matmul=False,
                    num_warps=cfg["num_warps"],
                    num_stages=1,
                )
            )
    return jobs


def _ptxas_path():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_stats(ptx: str, arch: int, workdir: str, tag: str):
    path = os.path.join(workdir, f"{tag}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    out = subprocess.run(
        [_ptxas_path(), f"-arch={sm}", "-v", path, "-o", os.path.join(workdir, f"{tag}.cubin")],
        capture_output=True,
        text=True,
    )
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed for {tag}:\n{log}")
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(
        registers=max(int(r) for r in regs) if regs else None,
        spill_stores=sum(int(s) for s, _ in spills),
        spill_loads=sum(int(loads) for _, loads in spills),
        stack_frame=max(int(s) for s in stack) if stack else 0,
    )


def run(archs=ARCHS, verbose=True):
    rows = []
    workdir = tempfile.mkdtemp(prefix="sami_ptx_")
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for n, job in enumerate(_jobs()):
            fn = job["fn"]
            name = fn.__name__
            row = dict(
                kernel=name,
                arch=f"sm_{arch}",
                dtype=job["dtype"],
                shape=job["shape"],
                constexprs={k: v for k, v in job["const"].items()},
                num_warps=job["num_warps"],
                num_stages=job["num_stages"],
                matmul=job["matmul"],
            )
            try:
                sig, constexprs, attrs = _specialize(fn, job["args"], job["const"], backend)
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
                ck = triton.compile(
                    src, target=target, options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"])
                )
                ptx = ck.asm["ptx"]
                row["mma_sync"] = "mma.sync" in ptx
                row["wgmma"] = "wgmma" in ptx
                row["tensor_core"] = row["mma_sync"] or row["wgmma"]
                row["shared"] = int(getattr(ck.metadata, "shared", 0) or 0)
                row.update(_ptxas_stats(ptx, arch, workdir, f"{name}_{arch}_{n}"))
                row["error"] = None
            except Exception as e:  # report and fail
                row["error"] = f"{type(e).__name__}: {e}"
            # verdict
            problems = []
            if row["error"]:
                problems.append("compile error")
            else:
                if row["spill_stores"] or row["spill_loads"]:
                    problems.append("spills")
                if job["matmul"] and job["dtype"] in ("bf16", "fp16") and not row["tensor_core"]:
                    problems.append("no tensor-core instruction")
            row["ok"] = not problems
            row["problems"] = problems
            rows.append(row)
            if verbose:
                print(_fmt_row(row), flush=True)
    return rows


_HDR = (
    f"{'kernel':<20} {'arch':<6} {'dtype':<5} {'shape':<22} {'blocks':<26} {'w/s':<5} "
    f"{'TC':<6} {'regs':>4} {'spill(st/ld)':>12} {'smem':>7}  status"
)


def _fmt_row(r):
    c = r["constexprs"]
    if "BLOCK_N" in c:
        blocks = f"N{c['BLOCK_N']}"
    elif "BLOCK_S" in c:
        blocks = f"T{c['BLOCK_T']} S{c['BLOCK_S']}"
    else:
        blocks = f"T{c['BLOCK_T']} V{c['BLOCK_V']} H{c['BLOCK_H']}"
    ws = f"{r['num_warps']}/{r['num_stages']}"
    if r.get("error"):
        return (
            f"{r['kernel']:<20} {r['arch']:<6} {r['dtype']:<5} {r['shape']:<22} {blocks:<26} "
            f"{ws:<5} ERROR {r['error'][:200]}"
        )
    tc = "wgmma" if r["wgmma"] else ("mma" if r["mma_sync"] else ("-" if not r["matmul"] else "none"))
    sp = f"{r['spill_stores']}/{r['spill_loads']}"
    status = "ok" if r["ok"] else "FAIL: " + ", ".join(r["problems"])
    return (
        f"{r['kernel']:<20} {r['arch']:<6} {r['dtype']:<5} {r['shape']:<22} {blocks:<26} "
        f"{ws:<5} {tc:<6} {r['registers'] or 0:>4} {sp:>12} {r['shared']:>7}  {status}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--arch", type=int, nargs="*", default=ARCHS)
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}; ptxas {_ptxas_path()}")
    print(_HDR)
    rows = run(args.arch)
    n_bad = sum(not r["ok"] for r in rows)
    print(
        f"\n{len(rows)} kernels compiled, {n_bad} failing "
        "(fp32 matmul kernels use exact ieee fp32 dots: no tensor cores expected)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
