"""Host (CPU) time of one rwkvops call on torch CUDA tensors, profiled: where the Python overhead goes.

    python benchmarks/host_overhead.py [--profile]
"""
import cProfile
import pstats
import sys
import time

import torch

import rwkvops


def inputs(op_name, B, H=32, N=64, C=2048):
    if op_name == "wkv4":
        x = [(torch.randn(C, device="cuda") * 0.1 - 1).bfloat16(), torch.randn(C, device="cuda").bfloat16(),
             torch.randn(B, 1, C, device="cuda").bfloat16(), torch.randn(B, 1, C, device="cuda").bfloat16()]
        s = torch.rand(B, 3, C, device="cuda")
        return [t.contiguous() for t in x], s
    n = 6 if op_name == "wkv7" else 5
    x = [torch.randn(B, 1, H, N, device="cuda").bfloat16() for _ in range(n)]
    if op_name == "wkv6":
        x[4] = torch.randn(H, N, device="cuda").bfloat16()
    if op_name == "wkv7":
        x[1] = -torch.rand(B, 1, H, N, device="cuda").bfloat16() - 0.5
    return x, torch.zeros(B, H, N, N, device="cuda")


def main(profile=False):
    for name in ("wkv7", "wkv6", "wkv4"):
        op = rwkvops.get_op(name)
        for B in (1, 256):
            x, s = inputs(name, B)
            for _ in range(20):
                op(*x, state=s)
            torch.cuda.synchronize()
            n = 300
            t0 = time.perf_counter()
            for _ in range(n):
                op(*x, state=s)
            host = (time.perf_counter() - t0) / n * 1e3
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n * 1e3
            print(f"{name} B={B}: host {host:.4f} ms/call, host+device {wall:.4f} ms/call", flush=True)
        if profile:
            x, s = inputs(name, 1)
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                op(*x, state=s)
            pr.disable()
            torch.cuda.synchronize()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main("--profile" in sys.argv)
