"""Per-kernel GPU time of one rwkvops call (torch profiler / CUPTI), to see where a forward or backward goes:

    python benchmarks/profile_kernels.py [op=wkv6] [B=8] [T=4096] [mode=fwd|fwdbwd] ...

Arguments are key=value pairs; several 'op=...' groups may follow each other (each starts a new case)."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import rwkvops
from harness import random_inputs


def run(op="wkv6", B=8, T=4096, H=32, N=64, C=2048, mode="fwd", dtype="bfloat16"):
    dims = dict(B=int(B), T=int(T), H=int(H), N=int(N), C=int(C))
    x = random_inputs(op, dims, device="cuda", seed=0, dtype=getattr(torch, dtype))
    f = rwkvops.get_op(op)
    grad = mode == "fwdbwd"
    for t in x.values():
        t.requires_grad_(grad)

    def step():
        y, s = f(*x.values())
        if grad:
            torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== {op} {mode} B={B} T={T} {dtype} (5 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    cases, cur = [], None
    for a in sys.argv[1:]:
        k, v = a.split("=", 1)
        if k == "op":
            cur = {"op": v}
            cases.append(cur)
        else:
            (cur if cur is not None else cases.append({}) or cases[-1]).__setitem__(k, v)
    for c in cases or [{}]:
        run(**c)
