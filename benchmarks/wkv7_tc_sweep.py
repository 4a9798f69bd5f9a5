"""RWKV-7 chunked forward: path and segment sweep, and accuracy at the issue's shapes (bf16, H=32, N=64).

Times the forward (no grad) with the recurrent kernel and with the chunked tensor-core path (automatic segment
count, and forced counts), fwd+bwd of both (the backward reads the forward's checkpoints), and measures relative
RMS errors of y and the final state against a float64 recurrence run on the GPU (torch).  CUDA-event medians
(benchmarks/harness.cuda_time).  Prints one ``TC ...`` line per result and writes them to --out (JSON).

    python3 benchmarks/wkv7_tc_sweep.py --out tc_sweep.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

H, N = 32, 64
SHAPES = ((1, 1024), (1, 4096), (1, 16384), (8, 4096), (16, 4096), (4, 1024), (8, 512), (8, 256))
NAMES = ("r", "w", "k", "v", "a", "b")


def _set(path, nseg):
    from rwkvops.ops import wkv7 as W
    W.FORWARD_PATH = path
    W.TC_NSEG = nseg


def _fwd(x):
    import torch
    import rwkvops
    with torch.no_grad():
        return rwkvops.wkv7(*x)


def _fwd_bwd(x, gy):
    import rwkvops
    y, s = rwkvops.wkv7(*x)
    y.backward(gy)


def reference64(x, s0=None):
    """float64 recurrence on the GPU (torch), inputs [B, T, H, N] -> (y, S)."""
    import torch
    r, w, k, v, a, b = (t.double() for t in x)
    B, T, _, _ = r.shape
    S = torch.zeros(B, H, N, N, dtype=torch.float64, device=r.device) if s0 is None else s0.double().clone()
    d = torch.exp(-torch.exp(w))
    y = torch.empty_like(r)
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * d[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = torch.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S


def rel(a, b):
    return float(((a.double() - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt())


def main():
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tc_sweep.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    opt = ap.parse_args()
    res = []

    def emit(**kw):
        res.append(kw)
        print("TC " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()),
              flush=True)

    dev = torch.cuda.get_device_name(0)
    for B, T in SHAPES:
        x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=0,
                                        dtype=torch.bfloat16).values())
        cfgs = [("recurrent", None), ("auto", None)]
        if B * H < 132:
            cfgs += [("chunked", n) for n in (1, 2, 4, 8, 12, 16, 32, 64) if n * 16 * 16 <= T]
        else:
            cfgs += [("chunked", 1), ("chunked", 2)]
        for path, nseg in cfgs:
            _set(path, nseg)
            ms = harness.cuda_time(lambda: _fwd(x), reps=7)
            emit(kind="fwd", B=B, T=T, path=path, nseg=str(nseg), ms=ms)
        if (B, T) in ((8, 4096), (1, 16384), (1, 4096)):
            xg = tuple(t.detach().clone().requires_grad_(True) for t in x)
            gy = torch.randn_like(x[0])
            for path, nseg in (("recurrent", None), ("auto", None)):
                _set(path, nseg)
                ms = harness.cuda_time(lambda: _fwd_bwd(xg, gy), reps=5)
                emit(kind="fwd+bwd", B=B, T=T, path=path, nseg=str(nseg), ms=ms)
        _set("auto", None)
        del x
        torch.cuda.empty_cache()
    if opt.no_accuracy:
        _dump(opt.out, dev, res)
        return
    # accuracy against the float64 recurrence
    cases = [(8, 4096, torch.bfloat16, None), (8, 4096, torch.float32, None),
             (2, 1024, torch.bfloat16, (-8.0, 4.0)), (2, 1024, torch.float32, (-8.0, 4.0))]
    if opt.quick:
        cases = cases[2:]
    for B, T, dt, wr in cases:
        x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=1,
                                        dtype=dt, w_range=wr).values())
        s0 = torch.randn(B, H, N, N, device="cuda") * 0.5
        y_ref, s_ref = reference64(x, s0)
        for path, nseg in (("recurrent", None), ("auto", None), ("chunked", 1), ("chunked", 4)):
            _set(path, nseg)
            import rwkvops
            with torch.no_grad():
                y, s = rwkvops.wkv7(*x, state=s0)
            emit(kind="acc", B=B, T=T, dtype=str(dt).split(".")[-1], w=str(wr), path=path, nseg=str(nseg),
                 y_err=rel(y, y_ref), s_err=rel(s, s_ref), finite=bool(torch.isfinite(y).all()))
        _set("auto", None)
        del x, y_ref, s_ref
        torch.cuda.empty_cache()
    _dump(opt.out, dev, res)


def _dump(path, dev, res):
    import rwkvops
    with open(path, "w") as f:
        json.dump({"device": dev, "commit": os.environ.get("RWKVOPS_COMMIT", ""),
                   "rwkvops": getattr(rwkvops, "__version__", ""), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
