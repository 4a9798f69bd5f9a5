"""Host (CPU) time of one rwkvops call on torch CUDA tensors (bf16 inputs, fp32 states, torch.no_grad as a serving
loop runs it), and where it goes.

    python benchmarks/host_overhead.py [--profile] [--ops wkv7,wkv6,wkv4] [--json PATH]

Cases per op: ``dense`` (B sequences, T = 1, a state batch [B, ...]) and ``pool`` (B sequences packed along T with
device int32 cu_seqlens, every length 1, each on a slot of a pool [2B, ...] given by device int32 state_indices).
``host`` is the CPU time per call without syncing (what the Python call costs); ``wall`` adds the device time
(calls back to back, one sync at the end): at B = 1 the device is idle most of the time unless host < kernel.
With ``--profile`` a cProfile of 300 B = 1 calls of each case is printed (sorted by own time).
"""
import argparse
import cProfile
import json
import pstats
import time

import torch

import rwkvops

H, N, C = 32, 64, 2048


def inputs(op_name, B, mode):
    """(positional inputs, keyword arguments) of one decode call."""
    dev = "cuda"
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


def measure(op, x, kw, n=300):
    with torch.no_grad():
        for _ in range(20):
            op(*x, **kw)
        torch.cuda.synchronize()
        times = []
        t_all = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            op(*x, **kw)
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t_all) / n * 1e3
    times.sort()
    return times[len(times) // 2] * 1e3, sum(times) / n * 1e3, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", default="wkv7,wkv6,wkv4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = []
    for name in args.ops.split(","):
        op = rwkvops.get_op(name)
        for mode in ("dense", "pool"):
            for B in (1, 64, 256):
                x, kw = inputs(name, B, mode)
                med, mean, wall = measure(op, x, kw)
                out.append(dict(op=name, mode=mode, B=B, host_median_ms=med, host_mean_ms=mean, wall_ms=wall))
                print(f"HOST {name} {mode:5s} B={B:3d}: host median {med:.4f} ms/call (mean {mean:.4f}), "
                      f"host+device {wall:.4f} ms/call", flush=True)
            if args.profile:
                x, kw = inputs(name, 1, mode)
                pr = cProfile.Profile()
                with torch.no_grad():
                    for _ in range(20):
                        op(*x, **kw)
                    pr.enable()
                    for _ in range(300):
                        op(*x, **kw)
                    pr.disable()
                torch.cuda.synchronize()
                print(f"--- profile: {name} {mode} B=1, 300 calls")
                pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "commit": __import__("os").environ.get("RWKVOPS_COMMIT"), "records": out}, f, indent=1)


if __name__ == "__main__":
    main()
