"""Command line: ``python -m rwkvops {demo,compile,list}``.

demo     every registered op on realistic shapes on the GPU (checked against its float64 reference, timed with
         CUDA events), or on small shapes on the CPU path when there is no GPU; then the RWKV-7 model demo.
compile  compile every kernel instantiation for the current GPU and print the time; with --nvrtc, compile
         them with NVRTC alone for sm_80 and sm_90 (no GPU needed).
list     the registered ops.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import testing
from .registry import get_op, list_ops


def _compile(nvrtc: bool, archs=("compute_80", "compute_90")) -> int:
    from ._compile import nvrtc_check, _module
    total = 0.0
    n = 0
    for name in list_ops():
        op = get_op(name)
        for kern in op.kernels:
            t0 = time.perf_counter()
            if nvrtc:
                for arch in archs:
                    nvrtc_check(name, kern.source, kern.name_expressions, arch)
            else:   # the modules launches use: one per compile group (element type, head size)
                import cupy
                from ._compile import OPTIONS
                from ._gpu import compile_group
                for group in dict.fromkeys(compile_group(ne, kern.name_expressions) for ne in kern.name_expressions):
                    _module(kern.source, group, OPTIONS, cupy.cuda.Device().id, name)
            dt = time.perf_counter() - t0
            total += dt
            n += len(kern.name_expressions)
            print(f"{name:8s} {kern.source:14s} {len(kern.name_expressions):3d} instantiations  {dt:7.2f} s")
    what = "NVRTC (" + ", ".join(archs) + ")" if nvrtc else "for this GPU"
    print(f"compiled {n} instantiations {what} in {total:.2f} s")
    return 0


def _demo_shapes(op, gpu: bool):
    if gpu:
        return testing.default_dims(op, B=4, T=1024, H=32, N=64, C=2048)
    return testing.default_dims(op, B=2, T=64, H=2, N=16, C=32)


def _time_gpu(fn, reps=20):
    import cupy
    fn()
    cupy.cuda.get_current_stream().synchronize()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _demo_ops(gpu: bool) -> int:
    import rwkvops
    rows = []
    status = 0
    for name in list_ops():
        op = get_op(name)
        if gpu and op.gpu_forward is None:
            continue
        dims = _demo_shapes(op, gpu)
        rng = np.random.default_rng(0)
        dtype = "bfloat16" if gpu else "float32"
        x64 = {k: testing.round_to(v, dtype) for k, v in testing.sample_inputs(op, dims, rng).items()}
        s64 = testing.sample_state(op, dims, dims.get("B", 1), rng)
        ry, rs = op.reference_forward(x64, s64)
        if gpu:
            import torch
            x = {k: torch.tensor(v, dtype=torch.bfloat16, device="cuda") for k, v in x64.items()}
            st = torch.tensor(s64, dtype=torch.float32, device="cuda")
            y, s = op(*x.values(), state=st)
            ms = _time_gpu(lambda: op(*x.values(), state=st))
            tol = testing.TOLERANCES[dtype][0]
        else:
            x = {k: v.astype(np.float32) for k, v in x64.items()}
            st = s64.astype(np.float32)
            t0 = time.perf_counter()
            y, s = op(*x.values(), state=st)
            ms = (time.perf_counter() - t0) * 1e3
            tol = testing.TOLERANCES["float32"][0]
        ey, es = testing.rel_rms(y, ry), testing.rel_rms(s, rs)
        ok = ey <= tol and es <= tol
        status |= not ok
        shape = " ".join(f"{k}={v}" for k, v in sorted(dims.items()))
        rows.append((name, shape, dtype, f"{ms:.3f}", f"{ey:.1e}", f"{es:.1e}", "ok" if ok else "MISMATCH"))
    head = ("op", "shape", "dtype", "fwd ms", "err y", "err state", "check")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkvops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="run every op (GPU if present, else CPU) and the model demo")
    c = sub.add_parser("compile", help="compile every kernel instantiation")
    c.add_argument("--nvrtc", action="store_true", help="NVRTC only, for sm_80 and sm_90 (no GPU needed)")
    sub.add_parser("list", help="list registered ops")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(list_ops()))
        return 0
    if args.cmd == "compile":
        return _compile(args.nvrtc)
    gpu = testing.has_gpu()
    if gpu:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"rwkvops demo on {name}: bf16 inputs, fp32 state, checked against the float64 NumPy reference")
    else:
        print("rwkvops demo: no CUDA GPU found; running the CPU (NumPy reference) path on small shapes")
    status = _demo_ops(gpu)
    try:
        from .model import demo_model
    except ImportError:
        demo_model = None
    if demo_model is not None:
        print()
        status |= bool(demo_model(gpu=gpu))
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
