"""wkv4 path sweep (issue #5): every forcing combination of ops/wkv4.py's switches against "auto", by shape.

    python benchmarks/wkv4_paths.py [--out PATH.json]

bf16, C = 2048, CUDA-event medians (harness.cuda_time).  Variants: FORWARD in (fused with 16-token chunks, fused with
64-token chunks where the backward's chunks are 64 long, chunked) x KERNEL_VERSION in (1, 2), and auto.  The data
behind the "auto" rule in the module docstring.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import rwkvops  # noqa: E402
from rwkvops.ops import wkv4 as W  # noqa: E402

C = 2048
SHAPES = [(1, 4096), (1, 16384), (2, 4096), (4, 4096), (8, 4096), (16, 4096)]
VARIANTS = {   # name: (FORWARD, FUSED_L_LONG, KERNEL_VERSION)
    "auto": ("auto", 64, "auto"),
    "fused16_v2": ("fused", 16, 2), "fused64_v2": ("fused", 64, 2), "chunked_v2": ("chunked", 64, 2),
    "fused16_v1": ("fused", 16, 1), "fused64_v1": ("fused", 64, 1), "chunked_v1": ("chunked", 64, 1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    recs = []
    saved = (W.FORWARD, W.FUSED_L_LONG, W.KERNEL_VERSION)
    for B, T in SHAPES:
        x = harness.random_inputs("wkv4", dict(B=B, T=T, C=C), device="cuda", seed=0, dtype=torch.float32)
        x = {k: v.bfloat16().contiguous() for k, v in x.items()}
        xg = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        gy = torch.randn(B, T, C, device="cuda").bfloat16()
        for name, (fwd, fl, ver) in VARIANTS.items():
            W.FORWARD, W.FUSED_L_LONG, W.KERNEL_VERSION = fwd, fl, ver
            with torch.no_grad():
                f_ms = harness.cuda_time(lambda: rwkvops.wkv4(*x.values()), warmup=2, reps=10)

            def fb():
                y, s = rwkvops.wkv4(*xg.values())
                torch.autograd.backward([y], [gy])
            fb_ms = harness.cuda_time(fb, warmup=2, reps=8)
            rec = dict(B=B, T=T, C=C, variant=name, fwd_ms=f_ms, fwdbwd_ms=fb_ms)
            recs.append(rec)
            print("WKV4", json.dumps(rec), flush=True)
        W.FORWARD, W.FUSED_L_LONG, W.KERNEL_VERSION = saved
        del x, xg, gy
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "commit": os.environ.get("RWKVOPS_COMMIT"),
                       "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
