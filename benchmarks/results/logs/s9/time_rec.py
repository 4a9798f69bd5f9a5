"""Session 9: wkv6's recurrent (sequential) backward in this tree: the fp32 strong-decay case hypothesis found
(check_op, N=128 T=63 w in [0, 4]: dw error), then device time of fwd+bwd where the recurrent backward runs (N=128,
and N=64 forced sequential), bf16.  python time_rec.py LABEL; run once per tree on the same device."""
import json
import sys

import torch

import harness
import rwkvops
from bench_ops import _leaves
from rwkvops import testing
from rwkvops.ops import wkv6

label = sys.argv[1]
for seed, w_range in ((0, (0.0, 4.0)), (1, (0.0, 4.0)), (0, (-8.0, 4.0))):
    try:
        testing.check_op(wkv6.OP, backend="cupy", dtype="float32", dims={"T": 63, "N": 128, "H": 1, "B": 1},
                         seed=seed, w_range=w_range, split=1, tol=(1e-5, 1e-6))   # tight: prints every error
        print("CHECK", label, seed, w_range, "all under 1e-6")
    except AssertionError as e:
        print("CHECK", label, seed, w_range, " | ".join(l.strip() for l in str(e).splitlines()[1:] if "dw" in l))
for N, H, B, T, path in ((128, 16, 8, 1024, "auto"), (64, 32, 8, 1024, "sequential"), (64, 32, 1, 4096, "sequential")):
    wkv6.BACKWARD_PATH = path
    x = harness.random_inputs("wkv6", dict(B=B, T=T, H=H, N=N, C=2048), device="cuda", seed=0, dtype=torch.bfloat16)
    for t in x.values():
        t.requires_grad_(True)
    f = rwkvops.get_op("wkv6")
    y, s = f(*x.values())
    gy, gs, leaves = torch.randn_like(y), torch.randn_like(s), _leaves(y, s)

    def fn():
        y, s = f(*x.values())
        torch.autograd.grad([y, s], leaves, [gy, gs])
    rec = dict(label=label, N=N, H=H, B=B, T=T, path=path, ms=harness.cuda_time(fn, reps=10),
               ms_device=harness.device_time(fn, reps=10))
    print("TIME " + json.dumps(rec), flush=True)
