"""One rwkvops call for ncu: python benchmarks/ncu_one.py op B T mode (see profile_kernels.py)."""
import sys

import torch

import rwkvops
from harness import random_inputs

op, B, T, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = random_inputs(op, dict(B=B, T=T, H=32, N=64, C=2048), device="cuda", seed=0, dtype=torch.bfloat16)
for t in x.values():
    t.requires_grad_(mode == "fwdbwd")
y, s = rwkvops.get_op(op)(*x.values())
if mode == "fwdbwd":
    torch.autograd.backward([y, s], [torch.ones_like(y), torch.ones_like(s)])
torch.cuda.synchronize()
