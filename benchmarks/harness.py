"""Benchmark plumbing: CUDA-event timing, peak memory, the results file.

Every figure is a median of CUDA-event timings after warm-up, taken in the same process as the peers it is
compared with.  Training-size cases time one call per event pair (:func:`cuda_time`); one-token decode cases time
calls back to back (:func:`loop_time`): a decode call is shorter than its own host code, so an event pair around
one call would add the idle device's wait for that host code, the events' overhead and the sync's wake-up to the
call (it read 0.067 ms for a wkv7 B = 1 step that a decode loop runs in 0.034 ms).  The host (CPU) time of the
call is reported beside it (:func:`host_time`).  Training-size cases also get the device time of the call with the
host's issue time hidden (:func:`device_time`): the targets of the training cases are kernel times.  Results go to ``benchmarks/results/<gpu>.json`` (see
:func:`write_results`); ``report.py`` turns that file into a Markdown table and a plot.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess

import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RECORDS: list = []
ENV: dict = {}


def random_inputs(op_name, dims, *, device, seed, dtype, w_range=None):
    """Inputs of ``op_name`` in the realistic ranges the benchmarks use, drawn with torch on ``device`` in ``dtype``
    (the NumPy samplers are too slow at benchmark sizes).  ``dims``: B, T and H, N (or C for wkv4).  ``w`` decays lie
    in about (0.37, 0.9999), or ``w`` is uniform in ``w_range``; wkv7 gets a = -kk, b = kk * lr as models make them.
    Returned in the op's argument order."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, **kw) * scale

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, **kw)

    if op_name == "wkv4":
        B, T, C = dims["B"], dims["T"], dims["C"]
        w = randn(C, scale=0.5) - 1.0 if w_range is None else uniform(*w_range, C)
        return {"w": w, "u": randn(C, scale=0.5), "k": randn(B, T, C), "v": randn(B, T, C)}
    B, T, H, N = dims["B"], dims["T"], dims["H"], dims["N"]
    shape = (B, T, H, N)
    w = uniform(-0.5, -5.5, *shape) if w_range is None else uniform(*w_range, *shape)  # -0.5 - 5 * rand
    if op_name == "wkv7":
        kk = randn(*shape)
        kk = kk / kk.norm(dim=-1, keepdim=True)
        lr = torch.sigmoid(randn(*shape))
        return {"r": randn(*shape, scale=0.5), "w": w, "k": randn(*shape, scale=0.5), "v": randn(*shape),
                "a": -kk, "b": kk * lr}
    return {"r": randn(*shape, scale=0.5), "k": randn(*shape, scale=0.5), "v": randn(*shape), "w": w,
            "u": randn(H, N, scale=0.5)}


def cuda_time(fn, warmup=3, reps=10, max_ms=1500.0):
    """Median milliseconds of ``fn()`` on torch's current stream, by CUDA events, after ``warmup`` calls: one call
    per event pair (:func:`loop_time` with ``calls=1``)."""
    return loop_time(fn, calls=1, rounds=reps, warmup=warmup, max_ms=max_ms)


def loop_time(fn, calls=100, rounds=7, warmup=5, max_ms=1500.0):
    """Median milliseconds per call of ``fn`` called ``calls`` times back to back on torch's current stream: one
    CUDA event pair around each round of calls and one sync per round.  What a call costs in a decode loop that
    does nothing else: the larger of its host time and its device time (they overlap), plus whatever of the one
    that does not hide the other (the figure the serving targets are stated in).  Peers are timed the same way."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    budget = 0.0
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        t = a.elapsed_time(b)
        times.append(t / calls)
        budget += t
        if budget > max_ms and len(times) >= 3:
            break
    return float(np.median(times))


_SLEEP_CYCLES_PER_MS = None


def _sleep_cycles_per_ms():
    """torch.cuda._sleep's spin cycles per millisecond, measured once by events (CUDA 13 no longer reports the
    clock rate in the device properties)."""
    global _SLEEP_CYCLES_PER_MS
    if _SLEEP_CYCLES_PER_MS is None:
        import torch
        cycles = 2_000_000
        torch.cuda._sleep(cycles)            # warm-up: the first launch loads the kernel
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        _SLEEP_CYCLES_PER_MS = cycles / a.elapsed_time(b)
    return _SLEEP_CYCLES_PER_MS


def device_time(fn, warmup=3, reps=10, max_ms=1500.0):
    """Median device milliseconds of one call of ``fn``: as :func:`cuda_time`, but a spin kernel queued ahead of the
    start event keeps the device busy while the host issues the call (twice its host time, measured first), so the
    event pair times the call's GPU work, not the idle device's wait for the host code before the first kernel.
    What a training step pays when other work is queued (triton's do_bench hides the host the same way, with an L2
    flush); peers are timed the same way.  Host syncs inside ``fn`` still show up (the host waits, the device idles)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    cover_ms = 2.0 * host_time(fn, reps=5) + 0.05
    cycles = int(cover_ms * _sleep_cycles_per_ms())
    times = []
    budget = 0.0
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        a.record()
        fn()
        b.record()
        b.synchronize()
        t = a.elapsed_time(b)
        times.append(t)
        budget += t + cover_ms
        if budget > max_ms and len(times) >= 3:
            break
    return float(np.median(times))


def host_time(fn, reps=200):
    """Median host-side (CPU) milliseconds per call of ``fn`` (launch overhead), without syncing each call."""
    import time
    import torch
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return float(np.median(ts))


def kernel_times(fn, calls=3, match=None):
    """{kernel name (up to its template arguments): GPU ms per call} of ``fn`` over ``calls`` calls (torch profiler,
    after one warm-up call); ``match``: only kernels whose name contains it."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if match is not None and match not in e.key:
            continue
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        name = e.key.split("(")[0].replace("void ", "").replace("__nv_bfloat16", "bf16")
        out[name] = out.get(name, 0.0) + t / 1e3 / calls
    return out


def peak_mem_mb(fn):
    """Peak CUDA memory (MB, torch's allocator) that one call of ``fn`` adds over what was allocated before."""
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs():
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    import torch
    a = torch.empty(2 * 2**30 // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = cuda_time(lambda: b.copy_(a), warmup=2, reps=10)
    del a, b
    return 2 * 2 * 2**30 / (ms * 1e-3) / 1e9


def environment():
    import torch
    env = {"gpu": torch.cuda.get_device_name(0), "python": platform.python_version(),
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for mod in ("cupy", "triton", "fla", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        import cupy
        env["driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception:
        pass
    env["commit"] = commit()
    return env


def commit():
    """The commit results belong to: ``RWKVOPS_COMMIT`` when set (a copy of the tree without .git, as on the device
    machine), else ``git rev-parse HEAD`` of this checkout; None when neither gives a commit id."""
    c = os.environ.get("RWKVOPS_COMMIT")
    if not c:
        try:
            r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
            c = r.stdout.strip() if r.returncode == 0 else None
        except OSError:
            c = None
    # outside a repository `git rev-parse HEAD` can echo "HEAD": only a hex id counts
    return c if c and re.fullmatch(r"[0-9a-f]{7,40}", c) else None


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("NVIDIA ", "")).strip("_").lower()


def record(**rec):
    RECORDS.append(rec)
    print("BENCH", json.dumps(rec), flush=True)
    write_results()  # after every record, so a run cut short still leaves its results


def write_results(path=None):
    if not RECORDS:
        return None
    env = ENV or environment()
    path = path or os.environ.get("RWKVOPS_BENCH_OUT") or os.path.join(RESULTS_DIR, gpu_slug(env["gpu"]) + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**env, "records": RECORDS}, f, indent=1)
    return path
