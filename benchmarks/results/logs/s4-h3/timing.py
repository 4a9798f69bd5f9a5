"""CUDA-event medians (benchmarks/harness.cuda_time, bench_ops inputs, bf16, H=32, N=64, no initial state) of the
wkv6 chunked forward variants, fwd+bwd, and a large-shape cross-check of the variants' outputs."""
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_ops  # noqa: E402
import harness  # noqa: E402
import rwkvops  # noqa: E402
from rwkvops.ops import wkv6 as W  # noqa: E402

op = rwkvops.get_op("wkv6")
VARIANTS = {"three-kernel": (False, "auto"), "fused-auto": (True, "auto"), "fused-chain": (True, 0),
            "fused-lookback": (True, 1)}


def setv(name):
    W.FORWARD_FUSED, W.FUSED_LOOKBACK = VARIANTS[name]


def main():
    W.FORWARD_PATH = "chunked"
    for B, T in ((8, 4096), (1, 16384), (1, 4096), (2, 16384)):
        x = bench_ops.make_inputs("wkv6", B, T, "bfloat16")
        ref = None
        for name in VARIANTS:
            setv(name)
            with torch.no_grad():
                ms = harness.cuda_time(lambda: op(*x.values()), reps=20)
                y, S = op(*x.values())
            torch.cuda.synchronize()
            if ref is None:
                ref = (y.float(), S)
                d = ""
            else:
                dy = ((y.float() - ref[0]).norm() / ref[0].norm()).item()
                d = f" rel_diff_y={dy:.2e} S_equal={torch.equal(S, ref[1])}"
            print(f"TIME fwd B={B} T={T} {name:15s} ms={ms:.3f}{d}", flush=True)
        del x, ref
        torch.cuda.empty_cache()
    for B, T in ((8, 4096), (1, 16384)):
        x = bench_ops.make_inputs("wkv6", B, T, "bfloat16")
        for v in x.values():
            v.requires_grad_(True)
        for name in ("three-kernel", "fused-auto"):
            setv(name)
            y, s = op(*x.values())
            gy, gs = torch.randn_like(y), torch.randn_like(s)

            def fn():
                yy, ss = op(*x.values())
                torch.autograd.backward([yy, ss], [gy, gs])
            ms = harness.cuda_time(fn, reps=10)
            print(f"TIME fwdbwd B={B} T={T} {name:15s} ms={ms:.3f}", flush=True)
        del x
        torch.cuda.empty_cache()
    rwkvops.check_errors()


if __name__ == "__main__":
    main()
