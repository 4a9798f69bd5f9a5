"""wkv4 path sweep (issue #5): forcing combinations of ops/wkv4.py's switches against "auto", by shape, and fla's
``fused_recurrent_rwkv4`` in the same process.

    python benchmarks/wkv4_paths.py [--out PATH.json] [--quick] [--dtype bfloat16,float32] [--variants a,b]
                                    [--shapes 1x16384,8x4096] [--no-fla] [--graph] [--baseline-source OLD.cu]
                                    [--source NAME=PATH ...]

C = 2048, CUDA-event medians (harness.cuda_time).  Forward variants: the look-back forward (wkv4_fwd_lb) per tile
shape (warps x tokens per warp) with FAST or precise math, the staged look-back forward (wkv4_fwd_lbs, k and v in
shared memory) per tile shape, the 16-token fused forward and the three-launch chunked forward with kernel versions 2
and 3; fwd+bwd for the variants marked so (the backward's kernel version is the variant's).  ``--graph`` adds
``fwd_graph_ms``: the forward captured in a CUDA graph and replayed (device time alone: its launches and memsets,
no host path), beside ``fwd_ms`` (one call between two events, as benchmarks/bench_ops.py times it: the host path
up to the first launch included).  ``--baseline-source`` adds the variant ``auto@base``: "auto" compiled from another
copy of wkv4.cu (e.g. ``git show HEAD~1:cuda_src/wkv4.cu``), so a kernel change is timed against its predecessor in
the same process; ``--source NAME=PATH`` (repeatable) adds ``auto@NAME``, the forward alone compiled from PATH with
only the staged look-back forward's instantiations (a few seconds of NVRTC, not the whole module's), for A/B sweeps
of one kernel's variants (PATH may be two lines: ``#define WKV4_LBS_BATCH 4`` and ``#include "wkv4.cu"``).  The data
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
SHAPES = [(1, 4096), (1, 16384), (2, 4096), (8, 4096), (16, 4096)]


def _lb(nw, s, mb, fast=True, ver=2, fb=False):
    return dict(FORWARD="lookback", LOOKBACK_STAGED=False, LOOKBACK=(nw, s, mb), LOOKBACK_FAST=fast,
                KERNEL_VERSION=ver), fb


def _lbs(c2, c4, fast=True, fb=False):
    """The staged look-back forward with tile shape c2 for 2-byte inputs and c4 for fp32."""
    return dict(FORWARD="lookback", LOOKBACK_STAGED=True, LOOKBACK_S={2: c2, 4: c4}, LOOKBACK_FAST=fast), fb


VARIANTS = {   # name: (module settings, whether to time fwd+bwd too)
    "auto": ({}, True),
    "lb8x16x2_fast": _lb(8, 16, 2), "lb8x16x2_precise": _lb(8, 16, 2, False), "lb8x16x3_fast": _lb(8, 16, 3),
    "lb4x16x4_fast": _lb(4, 16, 4), "lb8x8x2_fast": _lb(8, 8, 2), "lb8x8x4_fast": _lb(8, 8, 4),
    "lb16x8x1_fast": _lb(16, 8, 1),
    "lb8x16x2_fast_v3": _lb(8, 16, 2, True, 3, True),
    "lbs4x32x6_fast": _lbs((4, 32, 6), (4, 16, 6), fb=True), "lbs4x32x6_precise": _lbs((4, 32, 6), (4, 16, 6), False),
    "lbs4x16x6_fast": _lbs((4, 16, 6), (4, 16, 6)), "lbs8x16x3_fast": _lbs((8, 16, 3), (4, 16, 6)),
    "lbs4x16x8_fast": _lbs((4, 16, 8), (4, 16, 8)),
    "lbs4x24x7_fast": _lbs((4, 24, 7), (4, 12, 7), fb=True),
    "fused16_v2": (dict(FORWARD="fused", FUSED_L_LONG=16, KERNEL_VERSION=2), False),
    "chunked_v2": (dict(FORWARD="chunked", KERNEL_VERSION=2), True),
    "chunked_v3": (dict(FORWARD="chunked", KERNEL_VERSION=3), True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--plans", action="store_true", help="keep launch plans for no-grad calls (host path)")
    ap.add_argument("--dtype", default="bfloat16", help="comma-separated: bfloat16, float32, float16")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variants (fla: 'fla')")
    ap.add_argument("--shapes", default=None, help="comma-separated BxT, e.g. 1x16384,8x4096")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays of the forward")
    ap.add_argument("--baseline-source", default=None, help="another wkv4.cu, timed as variant auto@base")
    ap.add_argument("--source", action="append", default=[], help="NAME=PATH: forward variant auto@NAME")
    args = ap.parse_args()
    variants = dict(VARIANTS)
    lbs_only = tuple(n for n in W.NAME_EXPRESSIONS if n.startswith("wkv4_fwd_lbs<"))
    sources = [("base", args.baseline_source, True)] if args.baseline_source else []
    for spec in args.source:
        sources.append((*spec.split("=", 1), False))
    for name, path, whole in sources:    # whole: every instantiation, fwd+bwd timed too; else the forward alone
        only = {} if whole else {"NAME_EXPRESSIONS": lbs_only}
        variants[f"auto@{name}"] = (dict(SOURCE=os.path.abspath(path), **only), whole)
    want = None if args.variants is None else set(args.variants.split(","))
    shapes = SHAPES if args.shapes is None else [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")]
    reps = 5 if args.quick else 10
    if not args.plans:      # the kernels compared, on the general host path (the same for every variant)
        from rwkvops import _dispatch       # (a bare `import rwkvops._dispatch` here would make rwkvops local)
        _dispatch.LAUNCH_PLANS = False
    recs = []
    names = ("FORWARD", "LOOKBACK", "LOOKBACK_FAST", "KERNEL_VERSION", "FUSED_L_LONG", "LOOKBACK_STAGED", "LOOKBACK_S",
             "SOURCE", "NAME_EXPRESSIONS")
    saved = {n: getattr(W, n) for n in names}
    try:
        from peers import wkv4 as peers
        import fla.ops.rwkv4.fused_recurrent  # noqa: F401
        have_fla = True
    except Exception as e:      # no fla: our variants only
        print("no fla:", e, flush=True)
        have_fla = False
    have_fla = have_fla and not args.no_fla and (want is None or "fla" in want)
    for dtype, (B, T) in [(d, bt) for d in args.dtype.split(",") for bt in shapes]:
        dt = getattr(torch, dtype)
        x = harness.random_inputs("wkv4", dict(B=B, T=T, C=C), device="cuda", seed=0, dtype=torch.float32)
        x = {k: v.to(dt).contiguous() for k, v in x.items()}
        xg = {k: v.clone().requires_grad_(True) for k, v in x.items()}
        gy = torch.randn(B, T, C, device="cuda").to(dt)
        for name, (settings, fb) in variants.items():
            if want is not None and name not in want and not name.startswith("auto@"):
                continue
            for n, val in saved.items():
                setattr(W, n, val)
            for n, val in settings.items():
                setattr(W, n, val)
            with torch.no_grad():
                f_ms = harness.cuda_time(lambda: rwkvops.wkv4(*x.values()), warmup=2, reps=reps)
            rec = dict(B=B, T=T, C=C, dtype=dtype, variant=name, fwd_ms=f_ms)
            if args.graph:
                rec["fwd_graph_ms"] = _graph_ms(lambda: rwkvops.wkv4(*x.values()), reps)
            if fb:
                def step():
                    y, s = rwkvops.wkv4(*xg.values())
                    torch.autograd.backward([y], [gy])
                rec["fwdbwd_ms"] = harness.cuda_time(step, warmup=2, reps=reps)
            recs.append(rec)
            print("WKV4", json.dumps(rec), flush=True)
        for n, val in saved.items():
            setattr(W, n, val)
        if have_fla:
            with torch.no_grad():
                run = peers.fla(x, None, False)
                f_ms = harness.cuda_time(run, warmup=2, reps=reps)
            runb = peers.fla(x, None, True)

            def fstep():
                y, s = runb()
                torch.autograd.backward([y], [gy])
            rec = dict(B=B, T=T, C=C, dtype=dtype, variant="fla", fwd_ms=f_ms,
                       fwdbwd_ms=harness.cuda_time(fstep, warmup=2, reps=reps))
            recs.append(rec)
            print("WKV4", json.dumps(rec), flush=True)
        del x, xg, gy
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "commit": harness.commit(),
                       "records": recs}, f, indent=1)


def _graph_ms(fn, reps):
    """Median ms of one replay of ``fn`` captured in a CUDA graph (no grad): the device time of its launches."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = harness.cuda_time(graph.replay, warmup=2, reps=max(reps, 10))
        del graph
    return ms


if __name__ == "__main__":
    main()
