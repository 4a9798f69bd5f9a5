"""RWKV-7 chunked forward: path and segment sweep, and accuracy at the issue's shapes (bf16, H=32, N=64).

Times the forward (no grad) with the recurrent kernel and with the chunked tensor-core path (automatic segment
count, and forced counts), fwd+bwd of both (the backward reads the forward's checkpoints), and measures relative
RMS errors of y and the final state against a float64 recurrence run on the GPU (torch).  CUDA-event medians
(benchmarks/harness.cuda_time).  Prints one ``TC ...`` line per result and writes them to --out (JSON).
With --bwd: the backward paths instead (recurrent wkv7_backward vs the chunked tensor-core backward): fwd+bwd
times, the two paths' gradients against each other at B=8 T=4096, and every gradient against a float64 torch
backward (B=2 T=1024; decays as models make them and over the whole range [-8, 4]).

    python3 benchmarks/wkv7_tc_sweep.py --out tc_sweep.json [--quick] [--bwd]
    compute-sanitizer --tool racecheck python3 benchmarks/wkv7_tc_sweep.py --sanitize   (the chunked paths, small)
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


def reference64(x, s0):
    """float64 (y, S) on the GPU: benchmarks/accuracy.py's torch recurrence, inputs [B, T, H, N]."""
    import torch
    from accuracy import ref_wkv7
    with torch.no_grad():
        return ref_wkv7({n: t.double() for n, t in zip(NAMES, x)}, s0.double())


def rel(a, b):
    return float(((a.double() - b) ** 2).mean().sqrt() / (b ** 2).mean().sqrt())


def main():
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tc_sweep.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--wy", action="store_true", help="wkv7_tc_wy vs wkv7_tc_chunk (TC_WY): times, per-kernel "
                    "GPU times, segment counts, accuracy")
    ap.add_argument("--fla", action="store_true", help="--bwd: fla's fwd+bwd time and peak memory alongside")
    opt = ap.parse_args()
    if opt.sanitize:
        sanitize_chunked()
        return
    res = []

    def emit(**kw):
        res.append(kw)
        print("TC " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()),
              flush=True)

    dev = torch.cuda.get_device_name(0)
    for wanted, sweep in ((opt.wy, wy_sweep), (opt.bwd, bwd_sweep)):
        if wanted:
            try:
                sweep(emit, opt)
            finally:
                _dump(opt.out, dev, res)
            return
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


def reference64_backward(x, s0, gy, gs):
    """float64 gradients (dict r..b, state) on the GPU: benchmarks/accuracy.py's autograd reference."""
    from accuracy import reference
    _, _, grads = reference("wkv7", {n: t.double() for n, t in zip(NAMES, x)}, s0.double(), gy.double(),
                            gs.double())
    return grads


def _grads(x, s0, gy, gs):
    import torch
    import rwkvops
    xg = [t.detach().clone().requires_grad_(True) for t in x]
    sg = s0.detach().clone().requires_grad_(True)
    y, s = rwkvops.wkv7(*xg, state=sg)
    torch.autograd.backward([y, s], [gy, gs])
    out = {n: t.grad for n, t in zip(NAMES, xg)}
    out["state"] = sg.grad
    return out


def bwd_sweep(emit, opt):
    import torch
    from rwkvops.ops import wkv7 as W
    shapes = ((8, 4096), (1, 4096)) if opt.quick else ((8, 4096), (1, 4096), (16, 4096), (1, 16384), (4, 1024))
    defaults = (W.TC_BWD_WARPS[N], W.TC_BWD_STRIP[N], W.TC_BWD_SEGMENTS)
    for B, T in shapes:
        x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=0,
                                        dtype=torch.bfloat16).values())
        xg = tuple(t.detach().clone().requires_grad_(True) for t in x)
        gy = torch.randn_like(x[0])
        W.BACKWARD_PATH = "auto"
        emit(kind="fwd", B=B, T=T, ms=harness.cuda_time(lambda: _fwd(x), reps=7))
        # chunked variants: wkv7_tc_bwd (warps, strip) (TC_BWD_WARPS / TC_BWD_STRIP) x adjoint pass in time
        # segments (B = 1) or not
        variants = [("recurrent", None, None, None)] + [
            ("chunked", nw, st, seg) for nw in W.TC_BWD_WARP_OPTIONS[N] for st in W.TC_BWD_STRIP_OPTIONS[N]
            for seg in ((False, True) if B == 1 else (True,))]
        for bp, nw, st, seg in variants:
            W.BACKWARD_PATH = bp
            if nw is not None:
                W.TC_BWD_WARPS[N], W.TC_BWD_STRIP[N], W.TC_BWD_SEGMENTS = nw, st, seg
            emit(kind="fwd+bwd", B=B, T=T, bwd=bp, warps=nw, strip=st, adj_segments=seg,
                 ms=harness.cuda_time(lambda: _fwd_bwd(xg, gy), reps=5),
                 peak_mem_mb=harness.peak_mem_mb(lambda: _fwd_bwd(xg, gy)))
        W.TC_BWD_WARPS[N], W.TC_BWD_STRIP[N], W.TC_BWD_SEGMENTS = defaults
        del x, xg
        torch.cuda.empty_cache()
        if opt.fla:   # fla's chunk_rwkv7 fwd+bwd in the same process (peak memory as bench_ops records it)
            try:
                import bench_ops
                xf = bench_ops.make_inputs("wkv7", B, T, "bfloat16")
                for t in xf.values():
                    t.requires_grad_(True)
                fwd = bench_ops._peer("wkv7", "fla")(xf, None, True)
                yf, sf = fwd()
                gyf, gsf = torch.randn_like(yf), torch.randn_like(sf)

                def fla_fb():
                    yy, ss = fwd()
                    torch.autograd.backward([yy, ss], [gyf, gsf])
                emit(kind="fwd+bwd", B=B, T=T, bwd="fla", ms=harness.cuda_time(fla_fb, reps=5),
                     peak_mem_mb=harness.peak_mem_mb(fla_fb))
                # ours with the same inputs / gradients (bench_ops' setting: state gradient too)
                fo = bench_ops._ours("wkv7", xf, None, True)

                def ours_fb():
                    yy, ss = fo()
                    torch.autograd.backward([yy, ss], [gyf, gsf])
                emit(kind="fwd+bwd", B=B, T=T, bwd="ours(bench_ops)", ms=harness.cuda_time(ours_fb, reps=5),
                     peak_mem_mb=harness.peak_mem_mb(ours_fb))
                del xf, yf, sf
            except Exception as exc:
                emit(kind="fla", B=B, T=T, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.empty_cache()
    # the two backward paths against each other at the benchmark shape (same forward)
    for dt, B in ((torch.bfloat16, 8), (torch.float32, 8), (torch.bfloat16, 1)):   # B = 1: adjoint in segments
        x = tuple(harness.random_inputs("wkv7", {"B": B, "T": 4096, "H": H, "N": N}, device="cuda", seed=1,
                                        dtype=dt).values())
        s0 = torch.randn(B, H, N, N, device="cuda") * 0.5
        gy = torch.randn_like(x[0])
        gs = torch.randn_like(s0)
        gg = {}
        for bp in ("recurrent", "chunked"):
            W.BACKWARD_PATH = bp
            gg[bp] = _grads(x, s0, gy, gs)
        for n in (*NAMES, "state"):
            emit(kind="paths", B=B, T=4096, dtype=str(dt).split(".")[-1], grad=n,
                 diff=rel(gg["chunked"][n], gg["recurrent"][n].double()),
                 finite=bool(torch.isfinite(gg["chunked"][n]).all()))
        del gg, x
        torch.cuda.empty_cache()
    # every gradient against float64
    for dt in (torch.bfloat16, torch.float32):
        for wr in (None, (-8.0, 4.0)):
            B, T = 2, 1024
            x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=2,
                                            dtype=dt, w_range=wr).values())
            s0 = torch.randn(B, H, N, N, device="cuda") * 0.5
            gy = torch.randn_like(x[0])
            gs = torch.randn_like(s0)
            ref = reference64_backward(x, s0, gy.double(), gs)
            for bp in ("recurrent", "chunked"):
                W.BACKWARD_PATH = bp
                g = _grads(x, s0, gy, gs)
                emit(kind="acc_bwd", B=B, T=T, dtype=str(dt).split(".")[-1], w=str(wr), bwd=bp,
                     **{f"d{n}": rel(g[n], ref[n]) for n in (*NAMES, "state")})
            del ref
            torch.cuda.empty_cache()
    W.BACKWARD_PATH = "auto"


def wy_sweep(emit, opt):
    """wkv7_tc_wy (TC_WY = True) against wkv7_tc_chunk at the issue's shapes: CUDA-event times and per-kernel GPU
    times of the forward and fwd+bwd, the segment count of the B = 1 passes, gradients of the two against each other
    and everything against float64."""
    import torch
    from rwkvops.ops import wkv7 as W
    for mode, B, T in (("fwd", 8, 4096), ("fwd", 1, 16384), ("fwd+bwd", 8, 4096), ("fwd+bwd", 1, 4096)):
        x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=0,
                                        dtype=torch.bfloat16).values())
        xg = tuple(t.detach().clone().requires_grad_(True) for t in x)
        gy = torch.randn_like(x[0])
        fn = (lambda: _fwd(x)) if mode == "fwd" else (lambda: _fwd_bwd(xg, gy))
        for wy in (False, True):
            W.TC_WY = wy
            emit(kind=mode, B=B, T=T, wy=wy, ms=harness.cuda_time(fn, reps=7))
            for name, ms in sorted(harness.kernel_times(fn, match="wkv7").items(), key=lambda kv: -kv[1]):
                emit(kind="kernel", case=f"{mode}-B{B}-T{T}", wy=wy, name=name, ms=ms)
        W.TC_WY = True
        if B == 1:   # time segments of the B = 1 passes (forward: TC_NSEG; adjoint: TC_BWD_NSEG)
            for nseg in (4, 8, 16):
                if mode == "fwd":
                    W.TC_NSEG = nseg
                else:
                    W.TC_BWD_NSEG = nseg
                emit(kind=mode, B=B, T=T, wy=True, nseg=nseg, ms=harness.cuda_time(fn, reps=5))
            W.TC_NSEG = W.TC_BWD_NSEG = None
        del x, xg
        torch.cuda.empty_cache()
    # the two implementations against each other at B = 8 T = 4096 (forward and gradients), then float64
    x = tuple(harness.random_inputs("wkv7", {"B": 8, "T": 4096, "H": H, "N": N}, device="cuda", seed=1,
                                    dtype=torch.bfloat16).values())
    s0 = torch.randn(8, H, N, N, device="cuda") * 0.5
    gy, gs = torch.randn_like(x[0]), torch.randn_like(s0)
    out = {}
    for wy in (False, True):
        W.TC_WY = wy
        import rwkvops
        with torch.no_grad():
            y, s = rwkvops.wkv7(*x, state=s0)
        out[wy] = (y, s, _grads(x, s0, gy, gs))
    emit(kind="wy_vs_chunk", B=8, T=4096, y=rel(out[True][0], out[False][0].double()),
         s=rel(out[True][1], out[False][1].double()),
         **{f"d{n}": rel(out[True][2][n], out[False][2][n].double()) for n in (*NAMES, "state")})
    del out, x
    torch.cuda.empty_cache()
    W.TC_WY = True
    for wr in (None, (-8.0, 4.0)):
        for B, T in ((2, 1024), (1, 1024)):   # B = 1: forward and adjoint in time segments
            x = tuple(harness.random_inputs("wkv7", {"B": B, "T": T, "H": H, "N": N}, device="cuda", seed=2,
                                            dtype=torch.bfloat16, w_range=wr).values())
            s0 = torch.randn(B, H, N, N, device="cuda") * 0.5
            gy, gs = torch.randn_like(x[0]), torch.randn_like(s0)
            y_ref, s_ref = reference64(x, s0)
            ref = reference64_backward(x, s0, gy.double(), gs)
            import rwkvops
            with torch.no_grad():
                y, s = rwkvops.wkv7(*x, state=s0)
            g = _grads(x, s0, gy, gs)
            emit(kind="acc_wy", B=B, T=T, w=str(wr), y=rel(y, y_ref), s=rel(s, s_ref),
                 **{f"d{n}": rel(g[n], ref[n]) for n in (*NAMES, "state")})
            del ref, y_ref, s_ref
            torch.cuda.empty_cache()


def sanitize_chunked():
    """Chunked forward and backward at small shapes (partial chunk, both decay regimes: tensor-core chunks and the
    exact per-chunk recurrence), N = 32 and 64, bf16 and fp32, for compute-sanitizer."""
    import torch
    import rwkvops
    from rwkvops.ops import wkv7 as W
    W.FORWARD_PATH, W.BACKWARD_PATH = "chunked", "chunked"
    for n in (32, 64):
        for dt in (torch.bfloat16, torch.float32):
            for wr in (None, (-8.0, 4.0)):
                # every compiled wkv7_tc_bwd warp count; the adjoint pass in 2 time segments (T = 40: 3 chunks)
                nw = W.TC_BWD_WARP_OPTIONS[n][int(wr is None)]
                W.TC_BWD_WARPS[n], W.TC_BWD_NSEG, W.TC_NSEG = nw, (2 if dt == torch.bfloat16 else None), 2
                x = tuple(harness.random_inputs("wkv7", {"B": 2, "T": 40, "H": 2, "N": n}, device="cuda", seed=3,
                                                dtype=dt, w_range=wr).values())
                xg = [t.detach().clone().requires_grad_(True) for t in x]
                s0 = torch.randn(2, 2, n, n, device="cuda", requires_grad=True)
                y, s = rwkvops.wkv7(*xg, state=s0)
                torch.autograd.backward([y, s], [torch.randn_like(y), torch.randn_like(s)])
                torch.cuda.synchronize()
                rwkvops.check_errors()
                ok = all(bool(torch.isfinite(t.grad).all()) for t in (*xg, s0))
                print(f"sanitize N={n} {dt} w={wr} tc_bwd warps={nw} adjoint segments={W.TC_BWD_NSEG}: finite={ok}",
                      flush=True)
    W.FORWARD_PATH, W.BACKWARD_PATH = "auto", "auto"
    W.TC_BWD_NSEG = W.TC_NSEG = None


def _dump(path, dev, res):
    import rwkvops
    with open(path, "w") as f:
        json.dump({"device": dev, "commit": harness.commit(),
                   "rwkvops": getattr(rwkvops, "__version__", ""), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
