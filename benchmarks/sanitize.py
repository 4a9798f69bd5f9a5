"""Exercise every GPU kernel of every registered op at a few small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize.py [--quick] [--ops=wkv6,wkv7]

Shapes: T not a multiple of any chunk (1, 17, 65 and one long enough for every chunked path), a varlen batch
with a zero-length sequence, a pool with a -1 slot, forward and backward, every dtype once.
"""
import sys

import numpy as np

import rwkvops
from rwkvops import testing


def run(op, dims, dtype, varlen=False, pool=False, backward=True, seed=0):
    import cupy
    import torch
    rng = np.random.default_rng(seed)
    tdt = getattr(torch, dtype)
    x64 = testing.sample_inputs(op, dims, rng)
    x = {k: torch.tensor(v, dtype=tdt, device="cuda") for k, v in x64.items()}
    kw = {}
    if varlen:
        T = dims["T"]
        cuts = sorted(rng.integers(0, T + 1, size=2).tolist())
        kw["cu_seqlens"] = torch.tensor([0, cuts[0], cuts[0], cuts[1], T], dtype=torch.int32, device="cuda")
        nseq = 4
    else:
        nseq = dims.get("B", 1)
    st = torch.tensor(testing.sample_state(op, dims, nseq + (2 if pool else 0), rng), dtype=torch.float32,
                      device="cuda")
    if pool:
        idx = [-1] + list(range(1, nseq)) if nseq > 1 else [-1]
        kw["state_indices"] = torch.tensor(idx[:nseq], dtype=torch.int32, device="cuda")
        y, s = op(*x.values(), state=st, **kw)
    elif backward:
        for t in (*x.values(), st):
            t.requires_grad_(True)
        y, s = op(*x.values(), state=st, **kw)
        torch.autograd.backward([y, s], [torch.randn_like(y), torch.randn_like(s)])
    else:
        y, s = op(*x.values(), state=st, **kw)
    torch.cuda.synchronize()
    cupy.cuda.Device().synchronize()
    rwkvops.check_errors()


def main(quick=False, ops=None):
    for name in rwkvops.list_ops():
        if ops and name not in ops:
            continue
        op = rwkvops.get_op(name)
        if op.gpu_forward is None:
            continue
        Ns = op.head_sizes or (None,)
        Ts = (1, 17, 300) if quick else (1, 17, 65, 300)   # 300: long enough for every chunked path
        for N in Ns:
            for T in Ts:
                dims = testing.default_dims(op, B=2, T=T, H=2, N=N, C=64)
                for dtype in (("bfloat16",) if quick else ("float32", "bfloat16")):
                    run(op, dims, dtype)
            dims = testing.default_dims(op, B=1, T=70, H=2, N=N, C=64)
            run(op, dims, "bfloat16", varlen=True)
            run(op, dims, "float32", varlen=True, pool=True)
            dims = testing.default_dims(op, B=5, T=1, H=2, N=N, C=64)
            run(op, dims, "bfloat16", pool=True)
            if quick:
                break
        print(f"{name}: kernels exercised", flush=True)
    print("sanitize: done")


if __name__ == "__main__":
    ops = [a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--ops=")]
    main(quick="--quick" in sys.argv, ops=ops[0] if ops else None)
