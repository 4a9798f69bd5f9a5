"""A/B timing of the chunked wkv6/wkv7 paths across variant trees: device and call time of the training-size cases
(bf16, H=32, N=64), one JSON line per case (``TIME``), after an accuracy check of the chunked forward and backward at
B=2 T=300 against the float64 reference (``CHECK``), and with ``--profile`` each case's device time per kernel
(torch.profiler, ``KERNELS``).

    cd VARIANT_TREE && PYTHONPATH=.:benchmarks python benchmarks/ab_time.py LABEL [--profile] [--ops=wkv7]

Run once per copy of the tree (each with its variant of cuda_src/), one after another on the same device, and compare
the lines: only the bf16 / fp32 N=64 instantiations are compiled, minutes saved per variant.  (Sessions 8 and 9 ran it
from benchmarks/results/logs/s8|s9/time_ops.py; session 8's copy also dropped the N-less wkv7_tc_scan<64>, so its
wkv7 B=1 and fwd+bwd cases did not run.)"""
import json
import sys

import numpy as np
import torch

import harness
import rwkvops
from bench_ops import _leaves
from rwkvops.ops import wkv6, wkv7
from rwkvops.testing import rel_rms

for m in (wkv6, wkv7):   # only what the bf16 / fp32 N = 64 cases use: minutes of compile saved per variant tree
    m.NAME_EXPRESSIONS = tuple(e for e in m.NAME_EXPRESSIONS
                               if "__nv_bfloat16, 64" in e or "float, 64" in e or e.endswith("<64>"))
label, profile = sys.argv[1], "--profile" in sys.argv
ops = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--ops=")), ["wkv6", "wkv7"])

# correctness first: chunked forward and backward (T = 300) against the float64 reference on the same rounded inputs
for mod in (m for m in (wkv6, wkv7) if m.OP.name in ops):
    for dt in (torch.float32, torch.bfloat16):
        x = harness.random_inputs(mod.OP.name, dict(B=2, T=300, H=2, N=64, C=128), device="cuda", seed=1, dtype=dt)
        s0 = torch.randn(2, 2, 64, 64, device="cuda") * 0.1
        for t in (*x.values(), s0):
            t.requires_grad_(True)
        y, s = mod.OP(*x.values(), state=s0)
        gy, gs = torch.randn_like(y), torch.randn_like(s)
        g = torch.autograd.grad([y, s], [*x.values(), s0], [gy, gs])
        xn = {k: v.detach().double().cpu().numpy() for k, v in x.items()}
        s0n = s0.detach().double().cpu().numpy()
        yr, sr = mod.reference_forward(xn, s0n)
        gr = mod.reference_backward(xn, s0n, gy.double().cpu().numpy(), gs.double().cpu().numpy())
        errs = dict(y=rel_rms(y, yr), state=rel_rms(s, sr))
        errs.update({k: rel_rms(gk, gr[k]) for k, gk in zip([*x.keys(), "state"], g)})
        print("CHECK", label, mod.OP.name, str(dt)[6:], " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)

cases = [("wkv6", "fwd", 8, 4096), ("wkv6", "fwd", 1, 16384), ("wkv6", "fwdbwd", 8, 4096),
         ("wkv7", "fwd", 8, 4096), ("wkv7", "fwd", 1, 16384), ("wkv7", "fwdbwd", 8, 4096)]
for op_name, mode, B, T in (c for c in cases if c[0] in ops):
    x = harness.random_inputs(op_name, dict(B=B, T=T, H=32, N=64, C=2048), device="cuda", seed=0,
                              dtype=torch.bfloat16)
    f = rwkvops.get_op(op_name)
    if mode == "fwdbwd":
        for t in x.values():
            t.requires_grad_(True)
        y, s = f(*x.values())
        gy, gs, leaves = torch.randn_like(y), torch.randn_like(s), _leaves(y, s)

        def fn():
            y, s = f(*x.values())
            torch.autograd.grad([y, s], leaves, [gy, gs])
    else:
        def fn():
            with torch.no_grad():
                f(*x.values())
    rec = dict(label=label, op=op_name, mode=mode, B=B, T=T, ms=harness.cuda_time(fn, reps=20),
               ms_device=harness.device_time(fn, reps=20))
    print("TIME " + json.dumps(rec), flush=True)
    if profile:
        top = sorted(harness.kernel_times(fn, calls=5).items(), key=lambda kv: -kv[1])[:10]
        print("KERNELS " + json.dumps(dict(label=label, op=op_name, mode=mode, B=B, T=T,
                                           ms_per_call={k: round(v, 4) for k, v in top})), flush=True)
    del x
    torch.cuda.empty_cache()
