"""Host (CPU) time of one rwkvops call on torch CUDA tensors (bf16 inputs, fp32 states, torch.no_grad as a serving
loop runs it), and where it goes.

    python benchmarks/host_overhead.py [--profile] [--ops wkv7,wkv6,wkv4] [--json PATH]

Cases per op: ``dense`` (B sequences, T = 1, a state batch [B, ...]) and ``pool`` (B sequences packed along T with
device int32 cu_seqlens, every length 1, each on a slot of a pool [2B, ...] given by device int32 state_indices).
``host`` is the CPU time per call without syncing (what the Python call costs); ``wall`` adds the device time
(calls back to back, one sync at the end): at B = 1 the device is idle most of the time unless host < kernel.
With ``--profile`` a cProfile of 300 B = 1 calls of each case is printed (sorted by own time).

``--fake`` runs without a GPU: CPU tensors play CUDA tensors and :func:`fake_device` stands in for everything that
touches the device (kernel lookup and launch, memsets, the current device and stream, the error word), so the host
path up to the launch can be profiled anywhere (the launch itself, ~2-4 us of cuLaunchKernel, is not counted).
``--general`` turns launch plans off (``rwkvops._dispatch.LAUNCH_PLANS``): every call takes the general path, for
comparison.
"""
import argparse
import contextlib
import cProfile
import ctypes
import json
import pstats
import time

import numpy as np
import torch

import rwkvops

H, N, C = 32, 64, 2048


def _u64(a):
    """A launch argument as the 8 bytes of its kernel parameter slot (low bytes the value, the rest zero)."""
    from rwkvops._gpu import kernel_scalar
    return int.from_bytes(kernel_scalar(a).tobytes().ljust(8, b"\0"), "little")


class FakeDevice:
    def __init__(self):
        self.launches = []
        self.err = np.zeros(1, np.int32)
        self.fail_plan_launches = 0     # make this many cuLaunchKernel calls fail (as a CUDA error would)
        self.streams = []               # the stream of every replayed launch (cuLaunchKernel's), in order


@contextlib.contextmanager
def fake_device(log_launches=True):
    """CPU torch tensors run rwkvops' torch-CUDA host path on a pretend device 0.  Yields a :class:`FakeDevice`:
    ``launches``, the device work made meanwhile as ``(via, kernel name, grid, block, [parameter slots as
    uint64])`` with via "cupy" (the general path's CuPy launch) or "plan" (a launch-plan replay's cuLaunchKernel),
    or ``("memset", ptr, nbytes)``, so tests can check the pointers a replay used; ``err``, the kernels' error word.
    ``log_launches=False`` (profiling): launches cost nothing.  Large CPU allocations are kept off mmap so that
    torch.empty costs about what the CUDA caching allocator does."""
    from unittest import mock

    import cupy

    from rwkvops import _arrays, _gpu
    from rwkvops.registry import _REGISTRY

    dev = FakeDevice()
    log = dev.launches
    fns = {}

    class Function:          # as cupy.cuda.function.Function: .ptr is the CUfunction handle
        def __init__(self, raw):
            self.raw, self.ptr = raw, id(self)
            fns[self.ptr] = self

    class RawKernel:         # what RawModule.get_function returns: no .ptr; .kernel is the Function
        max_dynamic_shared_size_bytes = 0

        def __init__(self, name):
            self.name, self.nargs = name, 0
            self.kernel = Function(self)

        def __call__(self, grid, block, args, shared_mem=0, stream=None):
            self.nargs = len(args)
            if log_launches:
                log.append(("cupy", self.name, tuple(grid) + (1,) * (3 - len(grid)),
                            tuple(block) + (1,) * (3 - len(block)), [_u64(a) for a in args]))

    def launch_kernel(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        if dev.fail_plan_launches:
            dev.fail_plan_launches -= 1
            raise RuntimeError("fake cuLaunchKernel failure")
        if not log_launches:
            return
        dev.streams.append(stream)
        fn = fns[f].raw
        slots = (ctypes.c_void_p * fn.nargs).from_address(params)
        log.append(("plan", fn.name, (gx, gy, gz), (bx, by, bz),
                    [ctypes.c_uint64.from_address(slots[i]).value for i in range(fn.nargs)]))

    def memset(p, value, n, stream):
        log.append(("memset", int(p), int(n)))

    err_host = dev.err

    class Mem:
        ptr = err_host.ctypes.data

    class Stream:
        ptr = 0

    class Runtime:
        getDevice = staticmethod(lambda: 0)
        memsetAsync = staticmethod(memset)

    class Cuda:
        runtime = Runtime
        get_current_stream = staticmethod(lambda: Stream)

    class Cupy:
        cuda = Cuda

    describe, device_of, new_bridge = _arrays.describe, _arrays.device_of, _arrays._new_bridge

    def fake_describe(x):
        d = describe(x)
        return (d[0], ("cuda", 0), *d[2:]) if d[0] == "torch" else d

    def fake_device_of(x):
        return ("cuda", 0) if _arrays.is_torch(x) else device_of(x)

    def fake_bridge(kind, device):
        b = new_bridge(kind, device)
        if isinstance(b, _arrays.TorchCudaBridge):
            b.tdevice, b.raw_stream = torch.device("cpu"), int    # int() is 0: a C call, as torch's getter
            if b.empty_strided is not None:     # torch's fast allocation entry, for the CPU
                b.empty_strided = torch._C._dynamo.guards._empty_strided_cpu
        return b

    def clear_plans():
        for op in list(_REGISTRY.values()):
            op.__dict__.pop("_plans", None)

    try:   # glibc: no mmap/munmap per large torch.empty on the CPU (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)
        libc.mallopt(-3, 1 << 30)
    except (OSError, AttributeError):
        pass
    with contextlib.ExitStack() as st:
        for target, name, value in (
                (_arrays, "describe", fake_describe), (_arrays, "device_of", fake_device_of),
                (_arrays, "_new_bridge", fake_bridge), (_arrays, "_BRIDGES", {}),
                (_arrays.TorchCudaBridge, "stream", lambda self: contextlib.nullcontext()),
                (_gpu, "_CUPY", Cupy), (_gpu, "get_function", lambda op, src, ne, nes: RawKernel(ne)),
                (_gpu, "_FUNCTIONS", {}), (_gpu, "_ERR_PTRS", {}), (_gpu, "_error_word", lambda dev: (Mem, err_host)),
                (_gpu, "_KERNEL_LAUNCH", launch_kernel),
                (cupy.cuda.runtime, "memsetAsync", memset), (cupy.cuda, "get_current_stream", lambda: Stream)):
            st.enter_context(mock.patch.object(target, name, value))
        clear_plans()
        st.callback(clear_plans)     # plans made here hold fake kernels
        yield dev


def inputs(op_name, B, mode, dev="cuda"):
    """(positional inputs, keyword arguments) of one decode call."""
    T, nb = (B, 1) if mode == "pool" else (1, B)
    if op_name == "wkv4":
        x = [(torch.randn(C, device=dev) * 0.1 - 1).bfloat16(), torch.randn(C, device=dev).bfloat16(),
             torch.randn(nb, T, C, device=dev).bfloat16(), torch.randn(nb, T, C, device=dev).bfloat16()]
        shape = (3, C)
    else:
        n = 6 if op_name == "wkv7" else 5
        x = [torch.randn(nb, T, H, N, device=dev).bfloat16() for _ in range(n)]
        if op_name == "wkv6":
            x[4] = torch.randn(H, N, device=dev).bfloat16()
        x[1] = (-torch.rand(nb, T, H, N, device=dev) - 0.5).bfloat16()
        shape = (H, N, N)
    if mode == "dense":
        s = torch.rand(B, *shape, device=dev) * 0.1
        return x, {"state": s}
    pool = torch.rand(2 * B, *shape, device=dev) * 0.1
    idx = torch.randperm(2 * B, device=dev)[:B].to(torch.int32)
    cu = torch.arange(B + 1, device=dev, dtype=torch.int32)
    return x, {"state": pool, "cu_seqlens": cu, "state_indices": idx}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(op, x, kw, n=300):
    with torch.no_grad():
        for _ in range(20):
            op(*x, **kw)
        _sync()
        times = []
        t_all = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            op(*x, **kw)
            times.append(time.perf_counter() - t0)
        _sync()
        wall = (time.perf_counter() - t_all) / n * 1e3
    times.sort()
    return times[len(times) // 2] * 1e3, sum(times) / n * 1e3, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", default="wkv7,wkv6,wkv4")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fake", action="store_true", help="no GPU: CPU tensors on a fake device (host path only)")
    ap.add_argument("--general", action="store_true", help="no launch plans: the general path on every call")
    ap.add_argument("--sizes", default="1,64,256")
    args = ap.parse_args()
    with contextlib.ExitStack() as st:
        if args.fake:
            st.enter_context(fake_device(log_launches=False))
        if args.general:
            from unittest import mock

            from rwkvops import _dispatch
            st.enter_context(mock.patch.object(_dispatch, "LAUNCH_PLANS", False))
        run(args, "cpu" if args.fake else "cuda")


def run(args, dev):
    out = []
    for name in args.ops.split(","):
        op = rwkvops.get_op(name)
        for mode in ("dense", "pool"):
            for B in map(int, args.sizes.split(",")):
                x, kw = inputs(name, B, mode, dev)
                med, mean, wall = measure(op, x, kw)
                out.append(dict(op=name, mode=mode, B=B, host_median_ms=med, host_mean_ms=mean, wall_ms=wall,
                                launch_plans=not args.general))
                print(f"HOST{' general' if args.general else ''} {name} {mode:5s} B={B:3d}: host median {med:.4f} ms/call (mean {mean:.4f}), "
                      f"host+device {wall:.4f} ms/call", flush=True)
            if args.profile:
                x, kw = inputs(name, 1, mode, dev)
                pr = cProfile.Profile()
                with torch.no_grad():
                    for _ in range(20):
                        op(*x, **kw)
                    pr.enable()
                    for _ in range(300):
                        op(*x, **kw)
                    pr.disable()
                _sync()
                print(f"--- profile: {name} {mode} B=1, 300 calls")
                pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "fake", "torch": torch.__version__,
                       "commit": _commit(), "records": out}, f, indent=1)


def _commit():
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    return harness.commit()


if __name__ == "__main__":
    main()
