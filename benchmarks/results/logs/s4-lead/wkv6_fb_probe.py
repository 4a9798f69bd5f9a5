"""wkv6 fwd+bwd at B=1 T=4096 read 3.30 ms in bench_ops at ca383dd (1.59 at 73367d0): time it with the fused
forward and the three-kernel forward, with its spread, and profile per kernel.  PYTHONPATH=.:benchmarks."""
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import harness
import rwkvops
from rwkvops.ops import wkv6 as W

for B, T in ((1, 4096), (8, 4096)):
    x = harness.random_inputs("wkv6", dict(B=B, T=T, H=32, N=64), device="cuda", seed=0, dtype=torch.float32)
    x = {k: v.to(torch.bfloat16).contiguous().requires_grad_(True) for k, v in x.items()}
    y, s = rwkvops.wkv6(*x.values())
    gy, gs = torch.randn_like(y), torch.randn_like(s)

    def fb():
        y, s = rwkvops.wkv6(*x.values())
        torch.autograd.backward([y, s], [gy, gs])
    for fused in (True, False, True):
        W.FORWARD_FUSED = fused
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fb(); b.record(); b.synchronize()
            ts.append(a.elapsed_time(b))
        print(f"PROBE B={B} T={T} fused={fused} fwd+bwd median {np.median(ts):.3f} min {min(ts):.3f} max {max(ts):.3f}",
              flush=True)
    W.FORWARD_FUSED = True
    if B == 1:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fb()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
