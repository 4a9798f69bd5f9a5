#!/usr/bin/env python3
"""Accuracy of rwkvops (and of flash-linear-attention, when importable) against a float64 reference.

For each op (wkv7, wkv6 at B=8 T=4096 H=32 N=64; wkv4 at B=8 T=4096 C=2048) this measures the relative RMS
error (``rwkvops.testing.rel_rms``: ||a - ref|| / ||ref||, inf when anything is NaN/inf) of ``y``, the final
state and every gradient (the initial state's included), with a random non-zero initial state and non-zero
upstream gradients on both ``y`` and the final state, for:

* ``rwkvops`` bf16 I/O and ``fla`` bf16 (chunk_rwkv7 / chunk_rwkv6 / fused_recurrent_rwkv4, called through our
  ``to_fla``/``from_fla`` converters as in ``benchmarks/peers``), both on the SAME inputs: float64 inputs rounded
  to bf16 once (the initial state and the upstream gradients too: fla's rwkv4 keeps its state in bf16), compared
  with one float64 reference computed on exactly those rounded values;
* ``rwkvops`` fp32 I/O, on its own fp32-rounded inputs, against its own float64 reference;
* a decay sweep: ``rwkvops`` (bf16 and fp32) with ``w`` uniform in [-8, 4]: are all outputs and gradients finite
  (fla's finiteness is listed for information).

The float64 reference is a plain token loop in torch (vectorized over batch/head/channels), written from the
formulas in DESIGN.md (wkv4 in the stable running-max form), differentiated by torch.autograd and run on the same
device, a few batch elements at a time.  At start-up it is checked against rwkvops' NumPy oracle
(``op.reference_forward`` / ``op.reference_backward``) at a small shape (rel RMS < 1e-10 on everything).

Inputs follow ``benchmarks/bench_ops.make_inputs`` (the realistic ranges used by the benchmarks).

Usage (GPU):  python3 benchmarks/accuracy.py --out DIR [--ops wkv7,wkv6,wkv4] [--no-fla]
CPU check:    python3 benchmarks/accuracy.py --device cpu --small --out /tmp/acc   (CPU path of rwkvops, no fla)

Writes ``DIR/accuracy_<gpu>.json`` ({commit, gpu, versions, records: [{op, impl, dtype, quantity, rel_rms,
target, ...}]}) and ``DIR/accuracy_<gpu>.md`` (ours vs fla side by side).  Prints PASS/FAIL per line; exits 1
when any target is missed or a run of ours fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import rwkvops  # noqa: E402
import harness  # noqa: E402
from rwkvops.testing import TOLERANCES, rel_rms as np_rel_rms  # noqa: E402

T_START = time.time()

FULL = {"wkv7": dict(B=8, T=4096, H=32, N=64), "wkv6": dict(B=8, T=4096, H=32, N=64),
        "wkv4": dict(B=8, T=4096, C=2048)}
SMALL = {"wkv7": dict(B=3, T=37, H=2, N=32), "wkv6": dict(B=3, T=37, H=2, N=32), "wkv4": dict(B=3, T=37, C=24)}
CHECK = {"wkv7": dict(B=2, T=13, H=2, N=32), "wkv6": dict(B=2, T=13, H=2, N=32), "wkv4": dict(B=2, T=13, C=16)}
OPS = ("wkv7", "wkv6", "wkv4")
SWEEP_W = (-8.0, 4.0)
FLA_FN = {"wkv7": "chunk_rwkv7", "wkv6": "chunk_rwkv6", "wkv4": "fused_recurrent_rwkv4"}


def log(msg):
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arg_names(name):
    return tuple(a.name for a in rwkvops.get_op(name).inputs)


def batched(name):
    """Names of the inputs with a leading batch dimension (the others, e.g. u, are shared by the batch)."""
    return {a.name for a in rwkvops.get_op(name).inputs if a.shape and a.shape[0] == "B"}


# ---------------------------------------------------------------- error metric

def rel_rms(a, ref) -> float:
    """``rwkvops.testing.rel_rms`` computed in float64 on the tensors' device (the 0.5 GB arrays of the full
    shapes would take seconds each through NumPy).  Same definition: NaN/inf anywhere in ``a`` gives inf;
    checked equal to the NumPy one at start-up (:func:`check_rel_rms`)."""
    a = a.detach().to(torch.float64)
    ref = ref.detach().to(a.device, torch.float64)
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"rel_rms: shapes differ: {tuple(a.shape)} vs {tuple(ref.shape)}")
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    den = float(torch.sqrt(torch.mean(ref * ref)))
    num = float(torch.sqrt(torch.mean((a - ref) ** 2)))
    return num / den if den > 0 else num


def check_rel_rms(device):
    g = torch.Generator(device="cpu").manual_seed(1)
    ref = torch.randn(5, 7, generator=g, dtype=torch.float64)
    a = ref + 1e-3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    for x, r in ((a, ref), (a.to(torch.bfloat16), ref), (a, torch.zeros_like(ref))):
        ours, theirs = rel_rms(x.to(device), r.to(device)), np_rel_rms(x, r)
        assert abs(ours - theirs) <= 1e-12 * max(1.0, abs(theirs)), (ours, theirs)
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert rel_rms(bad.to(device), ref.to(device)) == float("inf") == np_rel_rms(bad, ref)


# ---------------------------------------------------------------- inputs

def make_inputs64(name, d, device, seed, w_range=None):
    """Float64 inputs in the benchmarks' ranges (``harness.random_inputs``) on ``device``; with ``w_range``, ``w``
    is uniform in that range instead."""
    x = harness.random_inputs(name, d, device=device, seed=seed, dtype=torch.float64, w_range=w_range)
    return {n: x[n] for n in arg_names(name)}


def make_state64(name, d, device, seed):
    """A random non-zero initial state (wkv4: any aa, bb > 0, pp in [-5, 5], like the op's own sampler)."""
    g = torch.Generator(device=device).manual_seed(seed + 7919)
    kw = dict(device=device, dtype=torch.float64)
    if name == "wkv4":
        B, C = d["B"], d["C"]
        aa = torch.randn(B, C, generator=g, **kw)
        bb = torch.randn(B, C, generator=g, **kw).abs() + 0.5
        pp = torch.rand(B, C, generator=g, **kw) * 10.0 - 5.0
        return torch.stack([aa, bb, pp], dim=1)
    B, H, N = d["B"], d["H"], d["N"]
    return 0.5 * torch.randn(B, H, N, N, generator=g, **kw)


def make_upstream64(name, x, s, device, seed):
    g = torch.Generator(device=device).manual_seed(seed + 104729)
    out = x["r"] if "r" in x else x["k"]
    dy = torch.randn(*out.shape, generator=g, device=device, dtype=torch.float64)
    ds = torch.randn(*s.shape, generator=g, device=device, dtype=torch.float64)
    return dy, ds


def rounded(t, dtype):
    """Float64 values exactly representable in ``dtype`` (round to nearest even, once)."""
    return t.to(dtype).to(torch.float64)


# ---------------------------------------------------------------- float64 torch reference (autograd)

def ref_wkv7(x, s0):
    """S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t."""
    dec = torch.exp(-torch.exp(x["w"]))
    r, k, v, a, b, dec = (t.unbind(1) for t in (x["r"], x["k"], x["v"], x["a"], x["b"], dec))
    S, ys = s0, []
    for t in range(len(r)):
        sa = torch.matmul(S, a[t].unsqueeze(-1))                               # S_{t-1} a_t   [B,H,N,1]
        S = S * dec[t].unsqueeze(-2) + sa * b[t].unsqueeze(-2) + v[t].unsqueeze(-1) * k[t].unsqueeze(-2)
        ys.append(torch.matmul(S, r[t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, 1), S


def ref_wkv6(x, s0):
    """y_t[i] = sum_j r_t[j] (u[j] k_t[j] v_t[i] + S_{t-1}[i,j]) = (S_{t-1} r_t)[i] + v_t[i] sum_j r_t[j] u[j] k_t[j],
    S_t[i,j] = S_{t-1}[i,j] exp(-exp(w_t[j])) + k_t[j] v_t[i]."""
    u = x["u"]
    dec = torch.exp(-torch.exp(x["w"]))
    r, k, v, dec = (t.unbind(1) for t in (x["r"], x["k"], x["v"], dec))
    S, ys = s0, []
    for t in range(len(r)):
        bonus = (r[t] * u * k[t]).sum(-1, keepdim=True)                        # [B,H,1]
        ys.append(torch.matmul(S, r[t].unsqueeze(-1)).squeeze(-1) + v[t] * bonus)
        S = S * dec[t].unsqueeze(-2) + v[t].unsqueeze(-1) * k[t].unsqueeze(-2)
    return torch.stack(ys, 1), S


def ref_wkv4(x, s0):
    """The stable form: history (aa, bb, pp) with num = aa e^pp, den = bb e^pp, pp the running max exponent."""
    w, u = x["w"], x["u"]
    wp = -torch.exp(w)
    aa, bb, pp = s0.unbind(1)
    ys = []
    for kt, vt in zip(x["k"].unbind(1), x["v"].unbind(1)):
        uk = u + kt
        q = torch.maximum(pp, uk)
        e1, e2 = torch.exp(pp - q), torch.exp(uk - q)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        pw = pp + wp
        p1 = torch.maximum(pw, kt)
        f1, f2 = torch.exp(pw - p1), torch.exp(kt - p1)
        aa, bb, pp = f1 * aa + f2 * vt, f1 * bb + f2, p1
    return torch.stack(ys, 1), torch.stack([aa, bb, pp], 1)


REF = {"wkv7": ref_wkv7, "wkv6": ref_wkv6, "wkv4": ref_wkv4}
_GROUP: dict = {}  # (op, y shape) -> batch elements per reference group, sized from the first group's peak


def reference(name, x, s, dy, ds, group=None):
    """Float64 y, final state and gradients of sum(dy*y) + sum(ds*state_out), by autograd, in batch groups.

    ``group=None``: the first group is one batch element; its peak memory sizes the next groups (60% of the
    free device memory).  Returns (y, state_out, grads) with grads keyed like rwkvops' (``state`` included)."""
    fn = REF[name]
    per_b = batched(name)
    dev = s.device
    B = s.shape[0]
    y_out = torch.empty_like(dy)
    s_out = torch.empty_like(s)
    grads = {n: torch.zeros_like(t) for n, t in x.items()}
    grads["state"] = torch.empty_like(s)
    key = (name, tuple(dy.shape))
    b0, g = 0, (group or _GROUP.get(key) or (1 if dev.type == "cuda" else B))
    while b0 < B:
        b1 = min(B, b0 + g)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        leaves = {n: (t[b0:b1] if n in per_b else t).detach().clone().requires_grad_(True) for n, t in x.items()}
        st = s[b0:b1].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y, so = fn(leaves, st)
            torch.autograd.backward([y, so], [dy[b0:b1], ds[b0:b1]])
        y_out[b0:b1] = y.detach()
        s_out[b0:b1] = so.detach()
        for n, t in leaves.items():
            if n in per_b:
                grads[n][b0:b1] = t.grad
            else:
                grads[n] += t.grad
        grads["state"][b0:b1] = st.grad
        del y, so, leaves, st
        if dev.type == "cuda" and group is None:
            torch.cuda.synchronize(dev)
            peak = max(torch.cuda.max_memory_allocated(dev) - base, 1) / (b1 - b0)
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(dev)[0]
            g = _GROUP[key] = max(1, int(0.6 * free / peak))
        b0 = b1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return y_out, s_out, grads


def validate_reference(name, device, seed):
    """The torch float64 reference against rwkvops' NumPy oracle at a small shape, with the benchmark input ranges
    and with w uniform in [-8, 4].  Returns the worst rel RMS; raises AssertionError when >= 1e-10."""
    return max(_validate(name, device, seed, None), _validate(name, device, seed + 1, SWEEP_W))


def _validate(name, device, seed, w_range):
    op = rwkvops.get_op(name)
    d = CHECK[name]
    x = make_inputs64(name, d, device, seed, w_range=w_range)
    s = make_state64(name, d, device, seed)
    dy, ds = make_upstream64(name, x, s, device, seed)
    y, so, g = reference(name, x, s, dy, ds)
    y2, so2, g2 = reference(name, x, s, dy, ds, group=1)  # the batch-group path must give the same
    xn = {n: t.cpu().numpy() for n, t in x.items()}
    sn, dyn, dsn = s.cpu().numpy(), dy.cpu().numpy(), ds.cpu().numpy()
    ry, rs = op.reference_forward(xn, sn)
    rg = op.reference_backward(xn, sn, dyn, dsn)
    errs = {"y": np_rel_rms(y.cpu(), ry), "state": np_rel_rms(so.cpu(), rs)}
    errs.update({f"d{n}": np_rel_rms(g[n].cpu(), rg[n]) for n in rg})
    errs["group=1 vs all"] = max([rel_rms(y2, y), rel_rms(so2, so)] + [rel_rms(g2[n], g[n]) for n in g])
    assert set(rg) == set(g), (sorted(rg), sorted(g))
    worst = max(errs.values())
    bad = {k: v for k, v in errs.items() if not v < 1e-10}
    assert not bad, f"{name} (w range {w_range}): torch float64 reference disagrees with the NumPy oracle: {bad}"
    return worst


# ---------------------------------------------------------------- implementations under test

def run_ours(name, x, s, dy, ds, dtype):
    """rwkvops on ``x`` cast to ``dtype`` (exact: the values are already rounded), fp32 state; autograd."""
    op = rwkvops.get_op(name)
    leaves = {n: t.to(dtype).detach().clone().requires_grad_(True) for n, t in x.items()}
    st = s.to(torch.float32).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y, so = op(*leaves.values(), state=st)
        torch.autograd.backward([y, so], [dy.to(y.dtype), ds.to(so.dtype)])
    grads = {n: t.grad for n, t in leaves.items()}
    grads["state"] = st.grad
    return y.detach(), so.detach(), grads


def fla_available(device):
    if device.type != "cuda":
        return False, "fla needs a CUDA device"
    try:
        import fla  # noqa: F401
        from fla.ops.rwkv4.fused_recurrent import fused_recurrent_rwkv4  # noqa: F401
        from fla.ops.rwkv6 import chunk_rwkv6  # noqa: F401
        from fla.ops.rwkv7 import chunk_rwkv7  # noqa: F401
        return True, getattr(fla, "__version__", "?")
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def run_fla(name, x, s, dy, ds):
    """fla in bf16 on the same values, through our converters (as benchmarks/peers do), inside autograd so the
    gradients come back w.r.t. OUR parameters (raw w, our state layout)."""
    bf = torch.bfloat16
    leaves = {n: t.to(bf).detach().clone().requires_grad_(True) for n, t in x.items()}
    st = s.to(torch.float32).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if name == "wkv7":
            from fla.ops.rwkv7 import chunk_rwkv7
            from rwkvops.ops.wkv7 import from_fla, to_fla
            gl, h0 = to_fla(leaves["w"], st)
            p = leaves
            y, sf = chunk_rwkv7(p["r"], gl.contiguous(), p["k"], p["v"], p["a"], p["b"], scale=1.0,
                                initial_state=h0.float().contiguous(), output_final_state=True)
            so = from_fla(None, sf)[1]
        elif name == "wkv6":
            from fla.ops.rwkv6 import chunk_rwkv6
            from rwkvops.ops.wkv6 import to_fla
            r, k, v, gl, u, h0 = to_fla(leaves["r"], leaves["k"], leaves["v"], leaves["w"], leaves["u"], st)
            y, sf = chunk_rwkv6(r, k, v, gl.contiguous(), u, scale=1.0, initial_state=h0.contiguous(),
                                output_final_state=True)
            so = sf.transpose(-1, -2)
        else:
            from fla.ops.rwkv4.fused_recurrent import fused_recurrent_rwkv4
            from rwkvops.ops.wkv4 import from_fla, to_fla
            s0 = to_fla(st).to(leaves["k"].dtype).contiguous()
            y, sf = fused_recurrent_rwkv4(leaves["w"], leaves["u"], leaves["k"], leaves["v"], s0)
            so = from_fla(sf)
        torch.autograd.backward([y, so], [dy.to(y.dtype), ds.to(so.dtype)])
    grads = {n: t.grad for n, t in leaves.items()}
    grads["state"] = st.grad
    return y.detach(), so.detach(), grads


# ---------------------------------------------------------------- measurement

RECORDS: list = []


def quantities(name):
    return ["y", "state"] + [f"d{n}" for n in arg_names(name)] + ["dstate"]


def errors(name, out, ref):
    y, so, g = out
    ry, rs, rg = ref
    e = {"y": rel_rms(y, ry), "state": rel_rms(so, rs)}
    for n in list(arg_names(name)) + ["state"]:
        e[f"d{n}"] = None if g.get(n) is None else rel_rms(g[n], rg[n])
    return e


def finiteness(out):
    y, so, g = out
    f = {"y": bool(torch.isfinite(y).all()), "state": bool(torch.isfinite(so).all())}
    for n, t in g.items():
        f[f"d{n}"] = None if t is None else bool(torch.isfinite(t).all())
    return f


def timed(label, device, fn, *a):
    sync(device)
    t0 = time.time()
    out = fn(*a)
    sync(device)
    log(f"  {label}: {time.time() - t0:.1f}s")
    return out


def measure_op(name, d, device, seed, use_fla, phases):
    op_t0 = time.time()
    tag = {"op": name, **{k: d[k] for k in d}}
    tgt = {"bfloat16": TOLERANCES["bfloat16"], "float32": TOLERANCES["float32"]}
    x64 = make_inputs64(name, d, device, seed)
    s64 = make_state64(name, d, device, seed)
    dy64, ds64 = make_upstream64(name, x64, s64, device, seed)
    for dtype, tdt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        # the SAME rounded values for every implementation and for the reference
        x = {n: rounded(t, tdt) for n, t in x64.items()}
        s, dy, ds = rounded(s64, tdt), rounded(dy64, tdt), rounded(ds64, tdt)
        ref = timed(f"{name} float64 reference on {dtype}-rounded inputs", device, reference, name, x, s, dy, ds)
        if dtype == "bfloat16":  # the floor: the reference itself rounded to the outputs' dtypes
            ref_q = [ref[0], ref[1]] + [ref[2][n] for n in arg_names(name)] + [ref[2]["state"]]
            for q, t in zip(quantities(name), ref_q):
                floor = rel_rms(rounded(t, torch.float32 if q in ("state", "dstate") else tdt), t)
                RECORDS.append(dict(tag, impl="round(ref)", dtype=dtype, case="accuracy", quantity=q,
                                    rel_rms=floor, target=None))
        runs = [("rwkvops", run_ours, (name, x, s, dy, ds, tdt))]
        if dtype == "bfloat16" and use_fla:
            runs.append(("fla", run_fla, (name, x, s, dy, ds)))
        for impl, fn, args in runs:
            rec0 = dict(tag, impl=impl, dtype=dtype, case="accuracy")
            try:
                out = timed(f"{name} {impl} {dtype} fwd+bwd (incl. any first-call compile)", device, fn, *args)
                errs = errors(name, out, ref)
                del out
            except Exception as exc:
                log(f"  {name} {impl} {dtype} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                errs = {q: None for q in quantities(name)}
                rec0["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for q in quantities(name):
                fwd_tol, grad_tol = tgt[dtype]
                target = (fwd_tol if q in ("y", "state") else grad_tol) if impl == "rwkvops" else None
                RECORDS.append(dict(rec0, quantity=q, rel_rms=errs[q], target=target))
        del ref, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    phases[f"{name} accuracy"] = time.time() - op_t0
    # decay sweep: w uniform in [-8, 4]; finiteness of everything
    t0 = time.time()
    xw = make_inputs64(name, d, device, seed + 1, w_range=SWEEP_W)
    runs = [("rwkvops", "bfloat16", lambda x, s, dy, ds: run_ours(name, x, s, dy, ds, torch.bfloat16)),
            ("rwkvops", "float32", lambda x, s, dy, ds: run_ours(name, x, s, dy, ds, torch.float32))]
    if use_fla:
        runs.append(("fla", "bfloat16", lambda x, s, dy, ds: run_fla(name, x, s, dy, ds)))
    for impl, dtype, fn in runs:
        tdt = getattr(torch, dtype)
        x = {n: rounded(t, tdt) for n, t in xw.items()}
        rec0 = dict(tag, impl=impl, dtype=dtype, case="w_sweep", w_range=list(SWEEP_W))
        try:
            out = fn(x, rounded(s64, tdt), rounded(dy64, tdt), rounded(ds64, tdt))
            sync(device)
            fin = finiteness(out)
            del out
        except Exception as exc:
            log(f"  {name} {impl} {dtype} w-sweep FAILED: {type(exc).__name__}: {exc}")
            fin = {q: None for q in quantities(name)}
            rec0["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        for q in quantities(name):
            RECORDS.append(dict(rec0, quantity=q, rel_rms=None, target="finite", finite=fin.get(q)))
    del xw
    if device.type == "cuda":
        torch.cuda.empty_cache()
    phases[f"{name} w-sweep"] = time.time() - t0
    log(f"  {name} w-sweep: {time.time() - t0:.1f}s")


# ---------------------------------------------------------------- verdicts and reports

def fmt(e):
    if e is None:
        return "n/a"
    return "inf" if e == float("inf") else f"{e:.3g}"


def find(op, impl, dtype, q, case="accuracy"):
    for r in RECORDS:
        if (r["op"], r["impl"], r["dtype"], r["quantity"], r["case"]) == (op, impl, dtype, q, case):
            return r
    return None


def verdicts(ops, use_fla, fla_slack):
    """Attach PASS/FAIL to our records; print one line per (op, dtype, quantity).  Returns (n_pass, n_fail)."""
    n_pass = n_fail = 0
    for name in ops:
        for dtype in ("bfloat16", "float32"):
            for q in quantities(name):
                r = find(name, "rwkvops", dtype, q)
                if r is None:
                    continue
                e, tgt = r["rel_rms"], r["target"]
                ok = e is not None and e <= tgt
                r["pass"] = ok
                line = f"{name:5s} {dtype:8s} {q:7s} ours {fmt(e):>9s}  target <= {tgt:g}: {'PASS' if ok else 'FAIL'}"
                n_pass += ok
                n_fail += not ok
                if dtype == "bfloat16" and use_fla:
                    f = find(name, "fla", dtype, q)
                    fe = None if f is None else f["rel_rms"]
                    if fe is None:
                        line += f"   fla {'n/a':>9s}  (no fla figure: not compared)"
                        r["no_worse_than_fla"] = None
                    else:
                        nw = e is not None and e <= fe * fla_slack
                        r["no_worse_than_fla"] = nw
                        r["fla_rel_rms"] = fe
                        ratio = "" if not fe or e is None else f"ours/fla {e / fe:.2g}"
                        line += f"   fla {fmt(fe):>9s}  no worse than fla: {'PASS' if nw else 'FAIL'} {ratio}"
                        n_pass += nw
                        n_fail += not nw
                print(line, flush=True)
        for impl, dtype in (("rwkvops", "bfloat16"), ("rwkvops", "float32"), ("fla", "bfloat16")):
            rs = [r for r in RECORDS if r["op"] == name and r["impl"] == impl and r["dtype"] == dtype
                  and r["case"] == "w_sweep"]
            if not rs:
                continue
            bad = [r["quantity"] for r in rs if r.get("finite") is not True]
            if impl == "rwkvops":
                ok = not bad
                n_pass += ok
                n_fail += not ok
                for r in rs:
                    r["pass"] = ok
                verdict = "PASS" if ok else "FAIL"
            else:
                verdict = "(info)"
            print(f"{name:5s} {dtype:8s} w in [{SWEEP_W[0]:g}, {SWEEP_W[1]:g}] {impl}: "
                  f"{'all finite' if not bad else 'NOT finite: ' + ', '.join(bad)} {verdict}", flush=True)
    return n_pass, n_fail


def json_record(r):
    """Strict JSON: a non-finite error (NaN/inf in the output) is written as rel_rms null, nonfinite true."""
    r = dict(r)
    for k in ("rel_rms", "fla_rel_rms"):
        if isinstance(r.get(k), float) and not np.isfinite(r[k]):
            r[k] = None
            r["nonfinite" if k == "rel_rms" else "fla_nonfinite"] = True
    return r


def environment(device):
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "device": str(device)}
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for mod in ("rwkvops", "cupy", "triton", "fla", "numpy"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            env[mod] = None
    env["commit"] = harness.commit()
    return env


def markdown(env, ops, shapes, use_fla, fla_note, phases, fla_slack):
    L = [f"# rwkvops accuracy on {env['gpu']}", "",
         f"commit `{env['commit']}`, torch {env['torch']}, cupy {env['cupy']}, triton {env['triton']}, "
         f"fla {env['fla']}.  Relative RMS error against a float64 reference on the same rounded inputs "
         "(random non-zero initial state; non-zero upstream gradients on y and the final state).  "
         "bf16: ours and fla on identical bf16 values (state and upstream gradients rounded to bf16 too); "
         "fp32: ours on fp32-rounded inputs with its own float64 reference.", ""]
    if not use_fla:
        L += [f"fla not measured: {fla_note}", ""]
    else:
        L += ["fla is called as in `benchmarks/peers` (our `to_fla`/`from_fla`): its log decay `-exp(w)` is computed "
              "in fp32 from the bf16 `w` and rounded to bf16 (that rounding is part of fla's error), the wkv7/wkv6 "
              "initial state is passed in fp32, the wkv4 state in bf16 (fla keeps it in k's dtype); gradients are "
              "taken through the conversion, i.e. w.r.t. our raw `w` and our state layout.", ""]
    L += ["bf16 rounding floor: the reference itself rounded to the output dtype (bf16 for y and the input "
          "gradients, fp32 for the state and its gradient): no bf16-output implementation can do better.", ""]
    L += [f"Targets: bf16 y/state <= {TOLERANCES['bfloat16'][0]:g}, gradients <= {TOLERANCES['bfloat16'][1]:g}, "
          f"and no worse than fla (ours <= fla x {fla_slack:g}); fp32 <= {TOLERANCES['float32'][0]:g} forward, "
          f"<= {TOLERANCES['float32'][1]:g} gradients.", ""]
    for name in ops:
        dims = ", ".join(f"{k}={v}" for k, v in shapes[name].items())
        L += [f"## {name} ({dims})", "",
              "| quantity | ours bf16 | fla bf16 | ours / fla | bf16 rounding floor | bf16 verdict | ours fp32 "
              "| fp32 verdict |",
              "|---|---|---|---|---|---|---|---|"]
        for q in quantities(name):
            ob, fb, of = (find(name, i, dt, q) for i, dt in
                          (("rwkvops", "bfloat16"), ("fla", "bfloat16"), ("rwkvops", "float32")))
            e_ob = ob and ob["rel_rms"]
            e_fb = fb and fb["rel_rms"]
            e_of = of and of["rel_rms"]
            ratio = f"{e_ob / e_fb:.2g}" if e_ob is not None and e_fb else "n/a"
            vb = "n/a"
            if ob is not None:
                vb = ("PASS" if ob.get("pass") else "FAIL") + f" (<= {ob['target']:g})"
                if ob.get("no_worse_than_fla") is not None:
                    vb += ", " + ("no worse than fla" if ob["no_worse_than_fla"] else "WORSE than fla")
            vf = "n/a" if of is None else ("PASS" if of.get("pass") else "FAIL") + f" (<= {of['target']:g})"
            fl = find(name, "round(ref)", "bfloat16", q)
            L.append(f"| {q} | {fmt(e_ob)} | {fmt(e_fb)} | {ratio} | {fmt(fl and fl['rel_rms'])} | {vb} "
                     f"| {fmt(e_of)} | {vf} |")
        L.append("")
        sw = []
        for impl, dtype in (("rwkvops", "bfloat16"), ("rwkvops", "float32"), ("fla", "bfloat16")):
            rs = [r for r in RECORDS if r["op"] == name and r["impl"] == impl and r["dtype"] == dtype
                  and r["case"] == "w_sweep"]
            if rs:
                bad = [r["quantity"] for r in rs if r.get("finite") is not True]
                sw.append(f"{impl} {dtype}: " + ("all finite" if not bad else "not finite: " + ", ".join(bad)))
        if sw:
            L += [f"w uniform in [{SWEEP_W[0]:g}, {SWEEP_W[1]:g}] (finiteness of y, state and every gradient): "
                  + "; ".join(sw) + ".", ""]
        errs = sorted({f"{r['impl']} {r['dtype']} ({r['case']}): {r['error']}" for r in RECORDS
                       if r["op"] == name and r.get("error")})
        L += [f"- error: {e}" for e in errs] + ([""] if errs else [])
    L += ["Phase times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), ""]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for accuracy_<gpu>.json/.md (default: print only)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of wkv7,wkv6,wkv4")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--small", action="store_true", help="small shapes (a quick check of the script itself)")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fla-slack", type=float, default=1.0,
                    help="'no worse than fla' means ours <= fla * this (default 1.0: strictly no worse)")
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"--ops: unknown {unknown}; choose from {OPS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = {n: (SMALL if args.small else FULL)[n] for n in ops}
    use_fla, fla_note = (False, "--no-fla") if args.no_fla else fla_available(device)
    env = environment(device)
    log(f"accuracy on {env['gpu']} ({device}); ops {ops}; shapes {shapes}; "
        f"fla: {'yes ' + str(fla_note) if use_fla else 'no (' + fla_note + ')'}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference has no tf32, but be explicit
    phases = {}
    t0 = time.time()
    check_rel_rms(device)
    for name in ops:
        worst = validate_reference(name, device, args.seed)
        log(f"torch float64 reference of {name} vs NumPy oracle at {CHECK[name]}: worst rel RMS {worst:.2e} "
            f"(< 1e-10) OK")
    phases["validate reference"] = time.time() - t0
    for name in ops:
        log(f"{name} at {shapes[name]}")
        measure_op(name, shapes[name], device, args.seed, use_fla, phases)
    log("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    n_pass, n_fail = verdicts(ops, use_fla, args.fla_slack)
    n_err = sum(1 for r in RECORDS if r.get("error") and r["impl"] == "rwkvops")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        slug = harness.gpu_slug(env["gpu"]) + ("_small" if args.small else "")
        jpath = os.path.join(args.out, f"accuracy_{slug}.json")
        mpath = os.path.join(args.out, f"accuracy_{slug}.md")
        records = [json_record(r) for r in RECORDS]
        with open(jpath, "w") as f:
            json.dump({**env, "shapes": shapes, "fla_used": use_fla, "fla_note": str(fla_note),
                       "fla_slack": args.fla_slack, "phases_s": phases, "records": records}, f, indent=1,
                      allow_nan=False)
        with open(mpath, "w") as f:
            f.write(markdown(env, ops, shapes, use_fla, fla_note, phases, args.fla_slack))
        log(f"wrote {jpath} and {mpath}")
    log(f"accuracy: {n_pass} PASS, {n_fail} FAIL, {n_err} run errors of ours; total {time.time() - T_START:.0f}s")
    return 0 if (n_fail == 0 and n_err == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
