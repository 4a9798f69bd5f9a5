"""Why bench_ops' wkv4 fwd+bwd (upstream gradients on y and state_out) reads slower than wkv4_paths' (on y only):
time both ways in one process, then the per-kernel GPU time of each (torch profiler).  Run from the repo root with
PYTHONPATH=.:benchmarks."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import harness
import rwkvops

B, T, C = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (8, 4096, 2048)))
for dtype in (torch.bfloat16, torch.float32):
    x = harness.random_inputs("wkv4", dict(B=B, T=T, C=C), device="cuda", seed=0, dtype=torch.float32)
    x = {k: v.to(dtype).contiguous().requires_grad_(True) for k, v in x.items()}
    y, s = rwkvops.wkv4(*x.values())
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    cases = {"gy": lambda: torch.autograd.backward([rwkvops.wkv4(*x.values())[0]], [gy]),
             "gy+gs": lambda: torch.autograd.backward(list(rwkvops.wkv4(*x.values())), [gy, gs]),
             "gy+0": lambda: torch.autograd.backward(list(rwkvops.wkv4(*x.values())), [gy, torch.zeros_like(gs)])}
    for name, fn in cases.items():
        ms = harness.cuda_time(fn, warmup=3, reps=10)
        for t in x.values():
            t.grad = None
        ms2 = harness.cuda_time(lambda: (fn(), [setattr(t, "grad", None) for t in x.values()]), warmup=2, reps=10)
        print(f"PROBE {dtype} B={B} T={T} {name:6s} fwd+bwd {ms:.3f} ms (grads accumulating), {ms2:.3f} ms (fresh)",
              flush=True)
    for name in ("gy", "gy+gs"):
        fn = cases[name]
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"PROFILE {dtype} {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
