"""RWKV-4 WKV: the NumPy reference (naive formula, finite differences, continuation, varlen, pools, extreme k,
fla converters) on the CPU, and the CUDA kernels against it on the GPU (marked ``gpu``)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvops import testing

import cuda_emulation
from hypothesis import HealthCheck, given, settings, strategies as st

import rwkvops
from rwkvops.ops import wkv4 as W
from rwkvops.testing import has_gpu, rel_rms

NAMES = ("w", "u", "k", "v")
T_CASES = (1, 15, 16, 17, 63, 65)


def make_inputs(rng, B, T, C, dtype=np.float64, kscale=1.0, wlo=-3.0, whi=1.0):
    x = {"w": rng.uniform(wlo, whi, C), "u": rng.standard_normal(C) * 0.5,
         "k": rng.standard_normal((B, T, C)) * kscale, "v": rng.standard_normal((B, T, C))}
    return {n: x[n].astype(dtype) for n in NAMES}


def make_state(rng, B, C, dtype=np.float64, plo=-3.0, phi=3.0):
    """A valid non-empty history: bb > 0, aa ~ bb * (a value), pp anywhere."""
    bb = rng.uniform(0.3, 3.0, (B, C))
    aa = bb * rng.standard_normal((B, C))
    pp = rng.uniform(plo, phi, (B, C))
    return np.stack([aa, bb, pp], axis=1).astype(dtype)


def args(x):
    return tuple(x[n] for n in NAMES)


def naive(x, state):
    """Straight from the formula (float64, no stabilisation; moderate k only), with the state's num/den."""
    w, u, k, v = (x[n].astype(np.float64) for n in NAMES)
    wp = -np.exp(w)
    B, T, C = k.shape
    num0 = state[:, 0] * np.exp(state[:, 2])
    den0 = state[:, 1] * np.exp(state[:, 2])
    y = np.zeros((B, T, C))
    for t in range(T):
        num = num0 * np.exp(t * wp) + sum(np.exp((t - 1 - s) * wp + k[:, s]) * v[:, s] for s in range(t))
        den = den0 * np.exp(t * wp) + sum(np.exp((t - 1 - s) * wp + k[:, s]) for s in range(t))
        e = np.exp(u + k[:, t])
        y[:, t] = (num + e * v[:, t]) / (den + e)
    numT = num0 * np.exp(T * wp) + sum(np.exp((T - 1 - s) * wp + k[:, s]) * v[:, s] for s in range(T))
    denT = den0 * np.exp(T * wp) + sum(np.exp((T - 1 - s) * wp + k[:, s]) for s in range(T))
    ppT = np.maximum(state[:, 2] + T * wp, np.max([k[:, s] + (T - 1 - s) * wp for s in range(T)], axis=0))
    return y, numT, denT, ppT


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("zero_state", [False, True], ids=["state", "zeros"])
def test_reference_matches_naive_formula(zero_state):
    rng = np.random.default_rng(0)
    x = make_inputs(rng, 2, 9, 4, kscale=2.0)
    s0 = np.zeros((2, 3, 4)) if zero_state else make_state(rng, 2, 4)
    y, s = W.reference_forward(x, s0)
    yn, num, den, pp = naive(x, s0)
    np.testing.assert_allclose(y, yn, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(s[:, 2], pp, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(s[:, 0] * np.exp(s[:, 2]), num, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(s[:, 1] * np.exp(s[:, 2]), den, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("B,T,C,kscale,zero_state", [(1, 1, 2, 1.0, False), (2, 5, 3, 1.0, False),
                                                      (2, 6, 2, 6.0, False), (1, 4, 3, 1.0, True)],
                         ids=["T1", "B2T5", "wide-k", "zero-state"])
def test_reference_backward_finite_differences(B, T, C, kscale, zero_state):
    """All gradients incl. every state component (dstate[:, 2] = d/dpp as a real input, through the max)."""
    rng = np.random.default_rng(1)
    x = make_inputs(rng, B, T, C, kscale=kscale)
    s0 = np.zeros((B, 3, C)) if zero_state else make_state(rng, B, C)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    testing.finite_difference_check(W.reference_forward, W.reference_backward, x, s0, dy, ds, rtol=1e-5, atol=1e-7)

def test_reference_float32_stays_float32():
    rng = np.random.default_rng(3)
    x = make_inputs(rng, 2, 30, 4, dtype=np.float32, kscale=3.0)
    s0 = make_state(rng, 2, 4, dtype=np.float32)
    y, s = W.reference_forward(x, s0)
    assert y.dtype == np.float32 and s.dtype == np.float32
    g = W.reference_backward(x, s0, np.ones_like(y), np.ones_like(s))
    assert all(v.dtype == np.float32 for v in g.values())
    x64 = {n: v.astype(np.float64) for n, v in x.items()}
    y64, s64 = W.reference_forward(x64, s0.astype(np.float64))
    g64 = W.reference_backward(x64, s0.astype(np.float64), np.ones_like(y64), np.ones_like(s64))
    assert rel_rms(y, y64) < 1e-5 and rel_rms(s, s64) < 1e-5
    for n in g:
        assert rel_rms(g[n], g64[n]) < 1e-4, n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_k_no_overflow(dtype):
    rng = np.random.default_rng(4)
    B, T, C = 2, 300, 6
    x = make_inputs(rng, B, T, C, dtype=dtype)
    x["k"] = rng.uniform(-60, 60, (B, T, C)).astype(dtype)
    x["w"][:2] = np.array([4.0, -12.0], dtype)      # decays ~1e-24 and ~1 - 6e-6
    for s0 in (np.zeros((B, 3, C), dtype), make_state(rng, B, C, dtype, -60, 60)):
        y, s = rwkvops.wkv4(*args(x), state=s0)
        g = W.reference_backward(x, s0, np.ones_like(y), np.ones_like(s))
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(s))
        assert all(np.all(np.isfinite(v)) for v in g.values())
        if dtype == np.float32:
            x64 = {n: v.astype(np.float64) for n, v in x.items()}
            y64, s64 = W.reference_forward(x64, s0.astype(np.float64))
            assert rel_rms(y, y64) < 1e-5


# ----------------------------------------------------------------------------- public API on the CPU

@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), T=st.one_of(st.sampled_from(T_CASES), st.integers(1, 40)), C=st.integers(1, 5),
       kscale=st.sampled_from((0.5, 3.0, 30.0)), wlo=st.sampled_from((-12.0, -3.0, 0.0)),
       whi=st.sampled_from((0.5, 4.0)), zero=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_continuation_and_gradient_composition(B, T, C, kscale, wlo, whi, zero, seed, data):
    """Split anywhere: same y and state; and the split backward (TBPTT) composes into the full gradient."""
    rng = np.random.default_rng(seed)
    x = make_inputs(rng, B, T, C, kscale=kscale, wlo=wlo, whi=whi)
    x["k"] = np.clip(x["k"], -60, 60)
    s0 = np.zeros((B, 3, C)) if zero else make_state(rng, B, C, plo=-20, phi=20)
    split = data.draw(st.integers(0, T))
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    y, s = rwkvops.wkv4(*args(x), state=s0)
    g = W.reference_backward(x, s0, dy, ds)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(s)) and all(np.all(np.isfinite(v)) for v in g.values())
    assert y.shape == (B, T, C) and s.shape == (B, 3, C) and s.dtype == np.float64
    if 0 < split < T:
        x1 = {**x, "k": x["k"][:, :split], "v": x["v"][:, :split]}
        x2 = {**x, "k": x["k"][:, split:], "v": x["v"][:, split:]}
        y1, s1 = rwkvops.wkv4(*args(x1), state=s0)
        y2, s2 = rwkvops.wkv4(*args(x2), state=s1)
        np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s2, s, rtol=1e-10, atol=1e-10)
        g2 = W.reference_backward(x2, s1, dy[:, split:], ds)
        g1 = W.reference_backward(x1, s0, dy[:, :split], g2["state"])

        def close(a, b, name):
            sc = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9 * sc, err_msg=name)
        close(np.concatenate([g1["k"], g2["k"]], axis=1), g["k"], "k")
        close(np.concatenate([g1["v"], g2["v"]], axis=1), g["v"], "v")
        close(g1["w"] + g2["w"], g["w"], "w")
        close(g1["u"] + g2["u"], g["u"], "u")
        close(g1["state"], g["state"], "state")


def test_t1_and_no_state():
    rng = np.random.default_rng(5)
    x = make_inputs(rng, 3, 1, 4)
    y, s = rwkvops.wkv4(*args(x))
    # empty history (zeros), one token: y = v; pp = max(0 + w', k), (aa, bb) = (v, 1) e^{k - pp}
    np.testing.assert_allclose(y[:, 0], x["v"][:, 0], rtol=1e-14)
    pp = np.maximum(x["k"][:, 0], -np.exp(x["w"]))
    np.testing.assert_allclose(s[:, 2], pp, rtol=1e-14)
    np.testing.assert_allclose(s[:, 0], x["v"][:, 0] * np.exp(x["k"][:, 0] - pp), rtol=1e-14)
    np.testing.assert_allclose(s[:, 1], np.exp(x["k"][:, 0] - pp), rtol=1e-14)
    y0, s0 = rwkvops.wkv4(*args(x), state=np.zeros((3, 3, 4)))
    np.testing.assert_array_equal(y0, y)
    np.testing.assert_array_equal(s0, s)


@settings(max_examples=15, deadline=None)
@given(lens=st.lists(st.sampled_from((0, 1, 2, 15, 16, 17, 33)), min_size=1, max_size=4),
       C=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_varlen_equals_separate_calls(lens, C, seed):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total = int(cu[-1])
    x = make_inputs(rng, 1, total, C)
    s0 = make_state(rng, len(lens), C)
    y, s = rwkvops.wkv4(*args(x), state=s0, cu_seqlens=cu)
    assert y.shape == (1, total, C)
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        if b == a:
            np.testing.assert_array_equal(s[i], s0[i])
            continue
        yi, si = rwkvops.wkv4(x["w"], x["u"], x["k"][:, a:b], x["v"][:, a:b], state=s0[i:i + 1])
        np.testing.assert_allclose(y[:, a:b], yi, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(s[i], si[0], rtol=1e-13, atol=1e-14)


def test_varlen_backward_equals_separate():
    rng = np.random.default_rng(6)
    lens = [5, 0, 9, 1]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, C, S = int(cu[-1]), 3, len(lens)
    x = make_inputs(rng, 1, total, C)
    s0 = make_state(rng, S, C)
    dy = rng.standard_normal((1, total, C))
    ds = rng.standard_normal((S, 3, C))
    _, _, ctx = rwkvops.forward(W.OP, *args(x), state=s0, cu_seqlens=cu)
    g = rwkvops.backward(ctx, dy, ds)
    dw = np.zeros(C)
    du = np.zeros(C)
    for i in range(S):
        a, b = int(cu[i]), int(cu[i + 1])
        if a == b:
            np.testing.assert_array_equal(g["state"][i], ds[i])
            continue
        xi = {**x, "k": x["k"][:, a:b], "v": x["v"][:, a:b]}
        gi = W.reference_backward(xi, s0[i:i + 1], dy[:, a:b], ds[i:i + 1])
        np.testing.assert_allclose(g["k"][:, a:b], gi["k"], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(g["v"][:, a:b], gi["v"], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(g["state"][i], gi["state"][0], rtol=1e-12, atol=1e-13)
        dw += gi["w"]
        du += gi["u"]
    np.testing.assert_allclose(g["w"], dw, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g["u"], du, rtol=1e-12, atol=1e-13)


def test_pool_cpu():
    rng = np.random.default_rng(7)
    lens = [3, 0, 4, 2]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    C, P = 3, 6
    x = make_inputs(rng, 1, int(cu[-1]), C)
    pool = make_state(rng, P, C)
    idx = np.array([4, 1, -1, 0], np.int32)
    before = pool.copy()
    y, out = rwkvops.wkv4(*args(x), state=pool, cu_seqlens=cu, state_indices=idx)
    assert out is pool
    for i, slot in enumerate(idx):
        a, b = int(cu[i]), int(cu[i + 1])
        s_in = np.zeros((1, 3, C)) if slot < 0 else before[slot:slot + 1]
        if b > a:
            yi, si = rwkvops.wkv4(x["w"], x["u"], x["k"][:, a:b], x["v"][:, a:b], state=s_in)
            np.testing.assert_allclose(y[:, a:b], yi, rtol=1e-13)
            if slot >= 0:
                np.testing.assert_allclose(pool[slot], si[0], rtol=1e-13)
        elif slot >= 0:
            np.testing.assert_array_equal(pool[slot], before[slot])
    for untouched in (2, 3, 5):
        np.testing.assert_array_equal(pool[untouched], before[untouched])


def test_torch_cpu_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = make_inputs(rng, 2, 7, 3)
    s0 = make_state(rng, 2, 3)
    xt = {n: torch.tensor(v, requires_grad=True) for n, v in x.items()}
    st_ = torch.tensor(s0, requires_grad=True)
    y, s = rwkvops.wkv4(*args(xt), state=st_)
    dy = rng.standard_normal(y.shape)
    ds = rng.standard_normal(s.shape)
    ((y * torch.tensor(dy)).sum() + (s * torch.tensor(ds)).sum()).backward()
    g = W.reference_backward(x, s0, dy, ds)
    for n in NAMES:
        np.testing.assert_allclose(xt[n].grad.numpy(), g[n], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st_.grad.numpy(), g["state"], rtol=1e-10, atol=1e-12)


def test_validation_errors():
    rng = np.random.default_rng(9)
    x = make_inputs(rng, 2, 5, 3)
    with pytest.raises(ValueError, match="'w'"):
        rwkvops.wkv4(x["w"][:2], x["u"], x["k"], x["v"])
    with pytest.raises(ValueError, match="'state'"):
        rwkvops.wkv4(*args(x), state=np.zeros((2, 2, 3)))
    with pytest.raises(TypeError, match="dtype"):
        rwkvops.wkv4(x["w"].astype(np.float32), x["u"], x["k"], x["v"])


def test_fla_converters_round_trip_and_semantics():
    rng = np.random.default_rng(10)
    s = make_state(rng, 2, 5).astype(np.float32)
    f = W.to_fla(s)
    assert f.shape == (2, 3, 1, 5)
    back = W.from_fla(f)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, s)


def test_fla_converters_torch():
    torch = pytest.importorskip("torch")
    s = torch.randn(2, 3, 4)
    f = W.to_fla(s)
    assert tuple(f.shape) == (2, 3, 1, 4)
    b = W.from_fla(f)
    assert b.is_contiguous() and torch.equal(b, s)


def test_declaration():
    op = rwkvops.get_op("wkv4")
    assert op is W.OP and [a.name for a in op.inputs] == list(NAMES) and op.output == "k"
    assert op.reduce_batch == ("w", "u") and op.head_sizes is None
    assert set(op.kernels[0].name_expressions) == set(W.NAME_EXPRESSIONS)
    assert rwkvops.wkv4 is W.wkv4


def test_chunk_len_fills_h100():
    from rwkvops._gpu import Seqs
    assert W._chunk_len(Seqs(num=1, T=16384, total=16384), 2048) == 64
    assert W._chunk_len(Seqs(num=1, T=100000, total=100000), 8) == 64     # the scan is the long chain
    assert W._chunk_len(Seqs(num=2, T=1000, total=2000), 40) == 32
    assert W._chunk_len(Seqs(num=4, T=1, total=4), 64) <= W.MAX_CHUNK


# ----------------------------------------------------------------------------- the chunked GPU algorithm, mirrored
# A step-by-step NumPy mirror of cuda_src/wkv4.cu (same slots, phases, rescalings and max routing; vectorized over
# channels), checked against the reference on the CPU so the chunk algebra is verified without a GPU.
# Keep it in sync with the kernels.

def _mirror_find_chunk(cu, T, L, num, g):
    """Slot g -> (seq, start, end, t0, t1) or None (wkv4::find_chunk)."""
    if cu is None:
        nc = (T + L - 1) // L
        s = g // nc
        if s >= num:
            return None
        start, end = s * T, s * T + T
    else:
        lo, hi = 0, num - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if cu[mid] // L + mid <= g:
                lo = mid
            else:
                hi = mid - 1
        s = lo
        start, end = cu[s], cu[s + 1]
    t0 = start + (g - _mirror_slot(cu, T, s, start, L, 0)) * L
    if t0 < start or t0 >= end:
        return None
    return s, start, end, t0, min(t0 + L, end)


def _mirror_slot(cu, T, s, start, L, c):
    """rwkv::chunk_slot."""
    return s * ((T + L - 1) // L) + c if cu is None else start // L + s + c


def _mirror_step(A, B, P, wp, kt, vt):
    pw = P + wp
    p1 = np.maximum(pw, kt)
    f1, f2 = np.exp(pw - p1), np.exp(kt - p1)
    return f1 * A + f2 * vt, f1 * B + f2, p1


def _mirror_out(A, B, P, uu, kt, vt):
    uk = uu + kt
    m = np.maximum(P, uk)
    e1, e2 = np.exp(P - m), np.exp(uk - m)
    rden = 1 / (e1 * B + e2)
    return (e1 * A + e2 * vt) * rden, e1, e2, rden


def _mirror_run(w, u, k, v, cu, T, num, L, state_in, state_idx, dy, dstate):
    """The kernels' phases on flat [total, C] tokens; returns (y, state_out, grads or None)."""
    total, C = k.shape
    wp = -np.exp(w)
    nslots = num * ((T + L - 1) // L) if cu is None else total // L + num + 1
    bounds = [(s * T, s * T + T) if cu is None else (cu[s], cu[s + 1]) for s in range(num)]
    chunks = {g: q for g in range(nslots) if (q := _mirror_find_chunk(cu, T, L, num, g)) is not None}
    agg, sin = np.full((nslots, 3, C), np.nan), np.full((nslots, 3, C), np.nan)
    for g, (s, start, end, t0, t1) in chunks.items():                       # wkv4_fwd_chunk
        A, B, P = v[t0].copy(), np.ones(C), k[t0].copy()
        for t in range(t0 + 1, t1):
            A, B, P = _mirror_step(A, B, P, wp, k[t], v[t])
        agg[g] = A, B, P
    state_out = state_in if state_idx is not None else np.full((num, 3, C), np.nan)
    fin = np.zeros((num, 3, C))
    for s, (start, end) in enumerate(bounds):                                # wkv4_fwd_scan
        slot = s if state_idx is None else state_idx[s]
        A, B, P = (np.zeros(C),) * 3 if slot < 0 else state_in[slot].copy()
        n = end - start
        for c in range((n + L - 1) // L):
            cs = _mirror_slot(cu, T, s, start, L, c)
            sin[cs] = A, B, P
            a, b, p = agg[cs]
            pw = P + min(L, n - c * L) * wp
            p1 = np.maximum(pw, p)
            f1, f2 = np.exp(pw - p1), np.exp(p - p1)
            A, B, P = f1 * A + f2 * a, f1 * B + f2 * b, p1
        if slot >= 0:
            state_out[slot] = A, B, P
        fin[s] = A, B, P
    y = np.full_like(k, np.nan)
    for g, (s, start, end, t0, t1) in chunks.items():                       # wkv4_fwd_out
        A, B, P = sin[g]
        for t in range(t0, t1):
            y[t] = _mirror_out(A, B, P, u, k[t], v[t])[0]
            A, B, P = _mirror_step(A, B, P, wp, k[t], v[t])
    if dy is None:
        return y, state_out, None
    loc = np.full((nslots, 3, C), np.nan)
    for g, (s, start, end, t0, t1) in chunks.items():                       # wkv4_bwd_chunk
        A, B, P = sin[g]
        Pin, la, lb, off, carried = P.copy(), 0.0, 0.0, 0.0, np.ones(C, bool)
        for t in range(t0, t1):
            yt, e1, e2, rden = _mirror_out(A, B, P, u, k[t], v[t])
            sc = np.exp(off + Pin - P) * dy[t] * e1 * rden
            la, lb = la + sc, lb - sc * yt
            carried &= P + wp >= k[t]
            A, B, P = _mirror_step(A, B, P, wp, k[t], v[t])
            off = off + wp
        loc[g] = la, lb, carried
    dsi = np.zeros((num, 3, C))
    for s, (start, end) in enumerate(bounds):                                # wkv4_bwd_scan
        ga, gb, gp = dstate[s]
        n = end - start
        if n <= 0:
            dsi[s] = ga, gb, gp
            continue
        ah, bh, route, Pn = ga, gb, gp - ga * fin[s, 0] - gb * fin[s, 1], fin[s, 2]
        for c in reversed(range((n + L - 1) // L)):
            cs = _mirror_slot(cu, T, s, start, L, c)
            la, lb, carried = loc[cs].copy()
            Pin = sin[cs, 2]
            loc[cs] = ah, bh, route
            F = np.exp((min(L, n - c * L) * wp + Pin) - Pn)
            ah, bh, route, Pn = F * ah + la, F * bh + lb, np.where(carried != 0, route, 0), Pin
        a0, b0 = sin[_mirror_slot(cu, T, s, start, L, 0), :2]
        dsi[s] = ah, bh, ah * a0 + bh * b0 + route
    dk, dv = np.full_like(k, np.nan), np.full_like(k, np.nan)
    part = np.zeros((nslots, 2, C))
    for g, (s, start, end, t0, t1) in chunks.items():                       # wkv4_bwd_out
        A, B, P = sin[g]
        saved = []
        for t in range(t0, t1):
            saved.append((A, B, P))
            A, B, P = _mirror_step(A, B, P, wp, k[t], v[t])
        Pn = fin[s, 2] if t1 == end else sin[g + 1, 2]
        rs = np.exp(P - Pn)
        ah, bh, route = loc[g, 0] * rs, loc[g, 1] * rs, loc[g, 2].copy()
        dw, du, pt = 0.0, 0.0, P
        for t in reversed(range(t0, t1)):
            aj, bj, pj = saved[t - t0]
            yt, e1, e2, rden = _mirror_out(aj, bj, pj, u, k[t], v[t])
            ek = np.exp(k[t] - pt)
            dku = dy[t] * e2 * (v[t] - yt) * rden
            du = du + dku
            dv[t] = dy[t] * e2 * rden + ah * ek
            dkt = dku + ek * (ah * v[t] + bh)
            pw = pj + wp
            fac = np.exp(pw - pt)
            dw = dw + wp * fac * (ah * aj + bh * bj)
            carry = pw >= k[t]
            dw = dw + np.where(carry, route * wp, 0)
            dk[t] = dkt + np.where(carry, 0, route)
            route = np.where(carry, route, 0)
            ce = dy[t] * e1 * rden
            ah, bh, pt = fac * ah + ce, fac * bh - ce * yt, pj
        part[g] = dw, du
    return y, state_out, dict(w=part[:, 0].sum(0), u=part[:, 1].sum(0), k=dk, v=dv, state=dsi)


@pytest.mark.parametrize("L", [4, 8, 64])
def test_chunked_algorithm_mirror_dense(L):
    rng = np.random.default_rng(20 + L)
    for B, T, C, kscale, p0 in [(2, 1, 3, 1.0, 0.0), (2, 15, 3, 8.0, 0.0), (3, 17, 4, 8.0, 0.0),
                                 (1, 65, 3, 3.0, 0.0), (2, 40, 3, 1.0, 25.0)]:
        x = make_inputs(rng, B, T, C, kscale=kscale, wlo=-12.0 if p0 else -3.0, whi=-8.0 if p0 else 1.0)
        s0 = make_state(rng, B, C)
        s0[:, 2] += p0            # a large incoming pp carried through whole chunks: routes to dstate[:, 2]
        dy = rng.standard_normal((B, T, C))
        ds = rng.standard_normal((B, 3, C))
        yr, sr = W.reference_forward(x, s0)
        gr = W.reference_backward(x, s0, dy, ds)
        y, so, g = _mirror_run(x["w"], x["u"], x["k"].reshape(-1, C), x["v"].reshape(-1, C), None, T, B, L, s0,
                               None, dy.reshape(-1, C), ds)
        np.testing.assert_allclose(y.reshape(B, T, C), yr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(so, sr, rtol=1e-10, atol=1e-12)
        for n in gr:
            np.testing.assert_allclose(g[n].reshape(gr[n].shape), gr[n], rtol=1e-9, atol=1e-11, err_msg=n)


@pytest.mark.parametrize("L", [4, 16])
def test_chunked_algorithm_mirror_varlen_and_pool(L):
    rng = np.random.default_rng(30 + L)
    lens = [5, 0, 17, 1, 9, 0, 4]
    cu = np.concatenate([[0], np.cumsum(lens)])
    total, S, C = int(cu[-1]), len(lens), 3
    x = make_inputs(rng, 1, total, C, kscale=6.0)
    s0 = make_state(rng, S, C)
    dy = rng.standard_normal((1, total, C))
    ds = rng.standard_normal((S, 3, C))
    y, so, g = _mirror_run(x["w"], x["u"], x["k"][0], x["v"][0], cu, 0, S, L, s0.copy(), None, dy[0], ds)
    _, _, ctx = rwkvops.forward(W.OP, *args(x), state=s0, cu_seqlens=cu.astype(np.int32))
    yr, sr, _ = rwkvops.forward(W.OP, *args(x), state=s0, cu_seqlens=cu.astype(np.int32))
    gr = rwkvops.backward(ctx, dy, ds)
    np.testing.assert_allclose(y, yr[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(so, sr, rtol=1e-10, atol=1e-12)
    for n in ("k", "v"):
        np.testing.assert_allclose(g[n], gr[n][0], rtol=1e-9, atol=1e-11, err_msg=n)
    for n in ("w", "u", "state"):
        np.testing.assert_allclose(g[n], gr[n], rtol=1e-9, atol=1e-11, err_msg=n)
    pool = make_state(rng, 9, C)
    idx = np.array([3, -1, 5, 0, -1, 7, 8])
    y, out, _ = _mirror_run(x["w"], x["u"], x["k"][0], x["v"][0], cu, 0, S, L, pool.copy(), idx, None, None)
    ref_pool = pool.copy()
    yr, _ = rwkvops.wkv4(*args(x), state=ref_pool, cu_seqlens=cu.astype(np.int32), state_indices=idx.astype(np.int32))
    np.testing.assert_allclose(y, yr[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, ref_pool, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- GPU (kernels vs the reference)

gpu = pytest.mark.gpu
TOL = {"float32": (1e-5, 1e-4), "float16": (3e-3, 6e-3), "bfloat16": (3e-3, 6e-3)}


def _torch_dtype(torch, name):
    return getattr(torch, name)


def _rounded(x, dtype):
    """Inputs rounded to ``dtype`` (as float64 NumPy) so the oracle sees exactly what the kernel sees."""
    torch = pytest.importorskip("torch")
    return {n: torch.tensor(v).to(_torch_dtype(torch, dtype)).double().numpy() for n, v in x.items()}


def _to_torch_cuda(a, dtype, requires_grad=False):
    import torch
    t = torch.tensor(np.asarray(a)).to(device="cuda", dtype=_torch_dtype(torch, dtype))
    return t.requires_grad_(requires_grad)


def _ref(x64, s0, dy, ds):
    y, s = W.reference_forward(x64, s0)
    g = W.reference_backward(x64, s0, dy, ds)
    return y, s, g


@pytest.fixture
def need_gpu():
    if not has_gpu():
        pytest.skip("no CUDA GPU")


@gpu
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 65, 1000])
def test_gpu_torch_fwd_bwd(need_gpu, monkeypatch, dtype, T, version):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(W, "KERNEL_VERSION", version)
    rng = np.random.default_rng(100 + T)
    B, C = 2, 40
    x = make_inputs(rng, B, T, C, kscale=3.0)
    x64 = _rounded(x, dtype)
    s0 = make_state(rng, B, C).astype(np.float32).astype(np.float64)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    dy64 = _rounded({"dy": dy}, dtype)["dy"]
    ref_y, ref_s, ref_g = _ref(x64, s0, dy64, ds)
    xt = {n: _to_torch_cuda(v, dtype, True) for n, v in x64.items()}
    st_ = torch.tensor(s0, dtype=torch.float32, device="cuda", requires_grad=True)
    y, s = rwkvops.wkv4(*args(xt), state=st_)
    assert y.dtype == xt["k"].dtype and s.dtype == torch.float32 and y.shape == (B, T, C)
    tf, tb = TOL[dtype]
    assert rel_rms(y, ref_y) < tf
    assert rel_rms(s, ref_s) < tf
    loss = (y.float() * _to_torch_cuda(dy64, "float32")).sum() + (s * torch.tensor(ds, device="cuda",
                                                                                  dtype=torch.float32)).sum()
    loss.backward()
    for n in NAMES:
        assert xt[n].grad.dtype == xt[n].dtype
        assert rel_rms(xt[n].grad, ref_g[n]) < tb, n
    assert rel_rms(st_.grad, ref_g["state"]) < tb


@gpu
@pytest.mark.parametrize("B,T,C", [(3, 130, 70), (1, 3000, 130)], ids=["B3T130C70", "B1T3000C130-chunk64"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_cupy_fwd_bwd_and_determinism(need_gpu, dtype, B, T, C):
    import cupy
    rng = np.random.default_rng(11)
    x = make_inputs(rng, B, T, C, kscale=2.0)
    x = {n: v.astype(dtype) for n, v in x.items()}
    x64 = {n: v.astype(np.float64) for n, v in x.items()}
    s0 = make_state(rng, B, C).astype(np.float32)
    dy = rng.standard_normal((B, T, C)).astype(dtype)
    ds = rng.standard_normal((B, 3, C)).astype(np.float32)
    ref_y, ref_s, ref_g = _ref(x64, s0.astype(np.float64), dy.astype(np.float64), ds.astype(np.float64))
    xc = {n: cupy.asarray(v) for n, v in x.items()}
    y, s, ctx = rwkvops.forward(W.OP, *args(xc), state=cupy.asarray(s0))
    assert isinstance(y, cupy.ndarray) and y.dtype == np.dtype(dtype)
    tf, tb = TOL[dtype]
    assert rel_rms(y, ref_y) < tf and rel_rms(s, ref_s) < tf
    g = rwkvops.backward(ctx, cupy.asarray(dy), cupy.asarray(ds))
    for n in (*NAMES, "state"):
        assert rel_rms(g[n], ref_g[n]) < tb, n
    _, _, ctx2 = rwkvops.forward(W.OP, *args(xc), state=cupy.asarray(s0))
    g2 = rwkvops.backward(ctx2, cupy.asarray(dy), cupy.asarray(ds))
    for n in g:
        assert bool(cupy.all(g[n] == g2[n])), f"non-deterministic {n}"
    # no state, no upstream grads
    y0, s0_, ctx0 = rwkvops.forward(W.OP, *args(xc))
    yr0, sr0 = W.reference_forward(x64, np.zeros((B, 3, C)))
    assert rel_rms(y0, yr0) < tf and rel_rms(s0_, sr0) < tf
    g0 = rwkvops.backward(ctx0, None, None)
    for n in g0:
        assert float(cupy.abs(g0[n].astype(cupy.float32)).max()) == 0.0, n
    rwkvops.check_errors()


@gpu
@pytest.mark.parametrize("forward,version", [("auto", None), ("chunked", 2), ("chunked", 3), ("lookback", 3)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_extreme_k(need_gpu, monkeypatch, dtype, forward, version):
    """|k| up to 60, decays from ~1e-24 to 1 - 6e-6, states with pp in [-60, 60]: every forward path and kernel
    version (3: FAST exps and quotients) within tolerance of the reference, forward and backward."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(W, "FORWARD", forward)
    if version is not None:
        monkeypatch.setattr(W, "KERNEL_VERSION", version)
    rng = np.random.default_rng(12)
    B, T, C = 2, 500, 34
    x = make_inputs(rng, B, T, C)
    x["k"] = rng.uniform(-60, 60, (B, T, C))
    x["w"][:3] = [4.0, -12.0, 0.0]
    x64 = _rounded(x, dtype)
    s0 = make_state(rng, B, C, plo=-60, phi=60).astype(np.float32).astype(np.float64)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    dy64 = _rounded({"dy": dy}, dtype)["dy"]
    ref_y, ref_s, ref_g = _ref(x64, s0, dy64, ds)
    xt = {n: _to_torch_cuda(v, dtype, True) for n, v in x64.items()}
    st_ = torch.tensor(s0, dtype=torch.float32, device="cuda", requires_grad=True)
    y, s = rwkvops.wkv4(*args(xt), state=st_)
    # |k| up to 60 makes pp large: fp32 rounding of pp (ulp 4e-6) limits the relative accuracy
    tf, tb = (max(TOL[dtype][0], 3e-5), max(TOL[dtype][1], 3e-4))
    assert rel_rms(y, ref_y) < tf and rel_rms(s, ref_s) < tf
    ((y.float() * _to_torch_cuda(dy64, "float32")).sum()
     + (s * torch.tensor(ds, device="cuda", dtype=torch.float32)).sum()).backward()
    for n in NAMES:
        assert rel_rms(xt[n].grad, ref_g[n]) < tb, n
    assert rel_rms(st_.grad, ref_g["state"]) < tb


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_varlen_zero_length_and_grads(need_gpu, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    lens = [70, 0, 1, 129, 16, 0, 5]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, C, S = int(cu[-1]), 50, len(lens)
    x64 = _rounded(make_inputs(rng, 1, total, C, kscale=2.0), dtype)
    s0 = make_state(rng, S, C).astype(np.float32).astype(np.float64)
    dy64 = _rounded({"dy": rng.standard_normal((1, total, C))}, dtype)["dy"]
    ds = rng.standard_normal((S, 3, C))
    _, _, ctx = rwkvops.forward(W.OP, *args(x64), state=s0, cu_seqlens=cu)
    ref_y, ref_s, _ = rwkvops.forward(W.OP, *args(x64), state=s0, cu_seqlens=cu)
    ref_g = rwkvops.backward(ctx, dy64, ds)
    xt = {n: _to_torch_cuda(v, dtype, True) for n, v in x64.items()}
    st_ = torch.tensor(s0, dtype=torch.float32, device="cuda", requires_grad=True)
    for cu_arg in (cu, torch.tensor(cu, device="cuda")):
        for t in (*xt.values(), st_):
            t.grad = None
        y, s = rwkvops.wkv4(*args(xt), state=st_, cu_seqlens=cu_arg)
        tf, tb = TOL[dtype]
        assert rel_rms(y, ref_y) < tf and rel_rms(s, ref_s) < tf
        for i in (1, 5):
            assert torch.equal(s[i], st_[i].detach())   # zero-length: unchanged
        ((y.float() * _to_torch_cuda(dy64, "float32")).sum()
         + (s * torch.tensor(ds, device="cuda", dtype=torch.float32)).sum()).backward()
        for n in NAMES:
            assert rel_rms(xt[n].grad, ref_g[n]) < tb, n
        assert rel_rms(st_.grad, ref_g["state"]) < tb
    rwkvops.check_errors()


@gpu
def test_gpu_pool_with_empty_slots(need_gpu):
    import cupy
    rng = np.random.default_rng(14)
    lens = [3, 0, 40, 1, 1, 0]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total, C, P = int(cu[-1]), 65, 9
    x = {n: v.astype(np.float32) for n, v in make_inputs(rng, 1, total, C).items()}
    pool = make_state(rng, P, C).astype(np.float32)
    idx = np.array([7, 2, -1, 0, -1, 5], np.int32)
    ref_pool = pool.astype(np.float64).copy()
    ref_y, _ = rwkvops.wkv4(*(v.astype(np.float64) for v in args(x)), state=ref_pool, cu_seqlens=cu,
                            state_indices=idx)
    for idx_arg in (idx, cupy.asarray(idx)):
        gpool = cupy.asarray(pool)
        y, out = rwkvops.wkv4(*(cupy.asarray(v) for v in args(x)), state=gpool, cu_seqlens=cupy.asarray(cu),
                              state_indices=idx_arg)
        assert out is gpool
        assert rel_rms(y, ref_y) < 1e-5
        assert rel_rms(gpool, ref_pool) < 1e-5
        for untouched in (1, 3, 4, 6, 8):
            np.testing.assert_array_equal(cupy.asnumpy(gpool[untouched]), pool[untouched])
    rwkvops.check_errors()


@gpu
def test_gpu_long_sequence_no_overflow(need_gpu):
    import cupy
    rng = np.random.default_rng(15)
    B, T, C = 1, 100000, 4
    x = make_inputs(rng, B, T, C, dtype=np.float32, wlo=-12.0, whi=-4.0)
    x["k"] = rng.uniform(-60, 60, (B, T, C)).astype(np.float32)
    y, s = rwkvops.wkv4(*(cupy.asarray(v) for v in args(x)))
    assert bool(cupy.all(cupy.isfinite(y))) and bool(cupy.all(cupy.isfinite(s)))
    y64, s64 = W.reference_forward({n: v.astype(np.float64) for n, v in x.items()}, np.zeros((B, 3, C)))
    # Over 1e5 steps of very slow decay with k spanning [-60, 60], fp32 itself drifts: the sequential fp32
    # reference is off by ~2e-3 (y) and ~5e-2 (state) here. The kernel must be no worse than that.
    y32, s32 = W.reference_forward(x, np.zeros((B, 3, C), np.float32))
    assert rel_rms(y, y64) <= max(1e-4, 1.5 * rel_rms(y32, y64))
    assert rel_rms(s, s64) <= max(1e-4, 1.5 * rel_rms(s32, s64))


@gpu
def test_gpu_matches_fla(need_gpu):
    torch = pytest.importorskip("torch")
    fla = pytest.importorskip("fla.ops.rwkv4.fused_recurrent")
    rng = np.random.default_rng(16)
    B, T, C = 2, 100, 64
    x = make_inputs(rng, B, T, C, dtype=np.float32, kscale=2.0)
    s0 = make_state(rng, B, C).astype(np.float32)
    xt = {n: torch.tensor(v, device="cuda") for n, v in x.items()}
    st_ = torch.tensor(s0, device="cuda")
    y, s = rwkvops.wkv4(*args(xt), state=st_)
    yf, sf = fla.fused_recurrent_rwkv4(xt["w"], xt["u"], xt["k"], xt["v"], W.to_fla(st_).contiguous())
    assert rel_rms(y, yf) < 1e-5
    assert rel_rms(s, W.from_fla(sf)) < 1e-5


# ----------------------------------------------------------------------------- the CUDA kernels executed on the CPU
# cuda_src/wkv4.cu compiled by g++ with a small stand-in for CUDA (blocks and threads run one after another, which
# is exact for these kernels: none of them synchronizes threads, and each thread only reads back its own column of
# shared memory), driven through the op's own GPU launchers with NumPy arrays.  Checks indexing, chunk slots,
# varlen/pool handling and the launchers' arguments without a GPU, for both kernel versions, and that version 2
# gives version 1's results bit for bit.

# Device functions the look-back forward uses besides those of the other kernels (both shims).
_EMU_EXTRA = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float4 __ldcg(const float4* p) {
    float4 r; for (int i = 0; i < 4; ++i) (&r.x)[i] = ((const volatile float*)p)[i]; return r; }
inline float2 __ldcg(const float2* p) {
    float2 r; for (int i = 0; i < 2; ++i) (&r.x)[i] = ((const volatile float*)p)[i]; return r; }
#define __align__(n) __attribute__((aligned(n)))
"""

_EMU_SHIM = r"""
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
struct dim3_ { unsigned x = 1, y = 1, z = 1; };
inline thread_local uint3_ threadIdx, blockIdx;
inline dim3_ blockDim, gridDim;
using std::min; using std::max;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#include <thread>
#ifdef EMU_THREADED
#define __shared__ static thread_local
#else
#define __shared__ static
#endif
inline void __syncthreads() {}
#ifdef EMU_THREADED
#include <chrono>
#include <random>
// a random delay before every fence (i.e. before publishing): successors often find only an aggregate
inline void __threadfence() {
    thread_local std::minstd_rand rng(std::hash<std::thread::id>{}(std::this_thread::get_id()));
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
#else
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float __ldcg(const float* p) { return *(const volatile float*)p; }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline void __syncwarp() { std::abort(); }               // (the look-back forwards only: their own build)
inline unsigned __ballot_sync(unsigned, int) { std::abort(); }
EMU_EXTRA
""".replace("EMU_EXTRA", _EMU_EXTRA)
_EMU_FP16 = cuda_emulation.FP16_H
_EMU_BF16 = cuda_emulation.BF16_H
_EMU_MAIN = r"""
#include "shim.h"
#include "wkv4.cu"
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
KERNEL_REGISTRY
#define R1(K, T, TS) reg()[#K "<" TS ">"] = wrap(&K<T>);
#define RK(K) R1(K, float, "float") R1(K, __half, "__half") R1(K, __nv_bfloat16, "__nv_bfloat16")
#define R3(K, T, TS) reg()[#K "<" TS ", true>"] = wrap(&K<T, true>);
#define RK3(K) R3(K, float, "float") R3(K, __half, "__half") R3(K, __nv_bfloat16, "__nv_bfloat16")
static int init() { KERNELS return 0; }
extern "C" __attribute__((visibility("default"))) int wkv4_emu_launch(const char* name, int gx, int gy, int gz, int bx, const uint64_t* args) {
    static int once = init(); (void)once;
    auto it = reg().find(name);
    if (it == reg().end()) return -1;
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz; blockDim.x = bx;
#ifdef EMU_THREADED
    // every block at once, one OS thread each (block size 1): blocks really run concurrently
    if (bx != 1) return -2;
    auto fn = it->second;
    std::vector<std::thread> th;
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x)
                th.emplace_back([=] {
                    blockIdx.x = x; blockIdx.y = y; blockIdx.z = z; threadIdx.x = 0; fn(args); });
    for (auto& t : th) t.join();
    return 0;
#endif
    for (int z = 0; z < gz; ++z)
        for (int y = 0; y < gy; ++y)
            for (int x = 0; x < gx; ++x)
                for (int t = 0; t < bx; ++t) {
                    blockIdx.x = x; blockIdx.y = y; blockIdx.z = z; threadIdx.x = t;
                    it->second(args);
                }
    return 0;
}
""".replace("KERNEL_REGISTRY", cuda_emulation.KERNEL_REGISTRY)


# The look-back forward (wkv4_fwd_lb) synchronizes its threads, so it gets a build of its own: every block runs on one
# OS thread with its CUDA threads as fibers (ucontext) that __syncthreads switches between (each thread reaches a
# barrier before any passes it), and `__shared__` is per OS thread, i.e. per block.  Blocks run one after another
# ("sequential": every look-back finds its predecessor's inclusive state) or all at once, one OS thread each, with a
# random delay after a block takes its tile ("concurrent": tiles wait for predecessors that have not published, walk
# back over those that have published only their aggregate, and find tiles in any state).
_EMU_LB_SHIM = r"""
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <chrono>
#include <random>
#include <thread>
#include <vector>
#include <ucontext.h>
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
struct dim3_ { unsigned x = 1, y = 1, z = 1; };
inline thread_local uint3_ threadIdx, blockIdx;
inline thread_local dim3_ blockDim;
inline dim3_ gridDim;
using std::min; using std::max;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
struct EmuFiber { ucontext_t ctx; bool done; int wait; };   // wait: 0 running, 1 block barrier, 2 warp barrier
inline thread_local ucontext_t emu_sched;
inline thread_local EmuFiber* emu_cur;
inline thread_local void (*emu_body)(void*);
inline thread_local void* emu_arg;
inline thread_local bool emu_jitter = false;
inline void __syncthreads() { emu_cur->wait = 1; swapcontext(&emu_cur->ctx, &emu_sched); }
inline void __syncwarp() { emu_cur->wait = 2; swapcontext(&emu_cur->ctx, &emu_sched); }
inline thread_local int emu_vote[32][32];
inline unsigned __ballot_sync(unsigned, int p) {     // (full warps only: every lane of the warp takes part)
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    emu_vote[w][l] = p != 0;
    __syncwarp();
    unsigned m = 0;
    for (int i = 0; i < 32; ++i) m |= (unsigned)emu_vote[w][i] << i;
    __syncwarp();
    return m;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) {
    int r = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    if (emu_jitter) {
        thread_local std::minstd_rand rng(std::hash<std::thread::id>{}(std::this_thread::get_id()));
        std::this_thread::sleep_for(std::chrono::microseconds(rng() % 400));
    }
    return r;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float __ldcg(const float* p) { return *(const volatile float*)p; }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline void emu_fiber_entry() { emu_body(emu_arg); emu_cur->done = true; }
inline void emu_run_block(unsigned bx, unsigned bid, void (*body)(void*), void* arg) {
    constexpr size_t STACK = 1 << 15;
    blockIdx.x = bid; blockDim.x = bx;
    emu_body = body; emu_arg = arg;
    std::vector<EmuFiber> f(bx);
    std::vector<char> stacks(bx * STACK);
    for (unsigned t = 0; t < bx; ++t) {
        getcontext(&f[t].ctx);
        f[t].ctx.uc_stack.ss_sp = stacks.data() + t * STACK;
        f[t].ctx.uc_stack.ss_size = STACK;
        f[t].ctx.uc_link = &emu_sched;
        f[t].done = false;
        f[t].wait = 0;
        makecontext(&f[t].ctx, emu_fiber_entry, 0);
    }
    // Run every running thread up to its next barrier (or its end); then release a warp whose live lanes all wait at
    // __syncwarp, else (none) the block once every live thread waits at __syncthreads.
    while (true) {
        for (unsigned t = 0; t < bx; ++t) {
            if (f[t].done || f[t].wait) continue;
            threadIdx.x = t; emu_cur = &f[t];
            swapcontext(&emu_sched, &f[t].ctx);
        }
        bool live = false, released = false;
        for (unsigned w0 = 0; w0 < bx; w0 += 32) {
            bool all2 = true, any = false;
            for (unsigned t = w0; t < std::min(bx, w0 + 32); ++t)
                if (!f[t].done) { any = true; all2 = all2 && f[t].wait == 2; }
            live = live || any;
            if (any && all2) {
                for (unsigned t = w0; t < std::min(bx, w0 + 32); ++t) f[t].wait = 0;
                released = true;
            }
        }
        if (!live) break;
        if (released) continue;
        for (unsigned t = 0; t < bx; ++t)
            if (!f[t].done && f[t].wait != 1) std::abort();   // threads of a block at different barriers
        for (unsigned t = 0; t < bx; ++t) f[t].wait = 0;
    }
}
EMU_EXTRA
""".replace("EMU_EXTRA", _EMU_EXTRA)
_EMU_LB_MAIN = r"""
#include "shim_lb.h"
#include "wkv4.cu"
#include <functional>
#include <map>
#include <string>
KERNEL_REGISTRY
#define R1(T, TS, NW, S, MB) \
    reg()["wkv4_fwd_lb<" TS ", " #NW ", " #S ", true, " #MB ">"] = wrap(&wkv4_fwd_lb<T, NW, S, true, MB>); \
    reg()["wkv4_fwd_lb<" TS ", " #NW ", " #S ", false, " #MB ">"] = wrap(&wkv4_fwd_lb<T, NW, S, false, MB>);
#define RC(NW, S, MB) R1(float, "float", NW, S, MB) R1(__half, "__half", NW, S, MB) \
    R1(__nv_bfloat16, "__nv_bfloat16", NW, S, MB)
#define RS(T, TS, NW, S, MB) \
    reg()["wkv4_fwd_lbs<" TS ", " #NW ", " #S ", true, " #MB ">"] = wrap(&wkv4_fwd_lbs<T, NW, S, true, MB>); \
    reg()["wkv4_fwd_lbs<" TS ", " #NW ", " #S ", false, " #MB ">"] = wrap(&wkv4_fwd_lbs<T, NW, S, false, MB>);
static int init() { CONFIGS return 0; }
struct EmuCtx { std::function<void(const uint64_t*)>* fn; const uint64_t* a; };
static void emu_body_fn(void* p) { auto* c = static_cast<EmuCtx*>(p); (*c->fn)(c->a); }
extern "C" __attribute__((visibility("default"))) int wkv4lb_launch(const char* name, int gx, int bx,
                                                                    const uint64_t* args, int concurrent) {
    static int once = init(); (void)once;
    auto it = reg().find(name);
    if (it == reg().end()) return -1;
    gridDim.x = gx;
    EmuCtx ctx{&it->second, args};
    if (!concurrent) {
        for (int b = 0; b < gx; ++b) emu_run_block(bx, b, emu_body_fn, &ctx);
        return 0;
    }
    std::vector<std::thread> th;
    for (int b = 0; b < gx; ++b)
        th.emplace_back([=, &ctx] { emu_jitter = true; emu_run_block(bx, b, emu_body_fn, &ctx); });
    for (auto& t : th) t.join();
    return 0;
}
""".replace("KERNEL_REGISTRY", cuda_emulation.KERNEL_REGISTRY)


@pytest.fixture(scope="module")
def emu4_lib(tmp_path_factory):
    import ctypes
    import subprocess
    from rwkvops._compile import CUDA_SRC
    cxx = cuda_emulation.cxx_or_skip()
    d = tmp_path_factory.mktemp("wkv4_emu")
    (d / "inc").mkdir()
    (d / "shim.h").write_text(_EMU_SHIM)
    (d / "inc" / "cuda_fp16.h").write_text(_EMU_FP16)
    (d / "inc" / "cuda_bf16.h").write_text(_EMU_BF16)
    (d / "emu.cpp").write_text(_EMU_MAIN.replace("KERNELS", " ".join(
        [f"RK({k})" for k in W._KERNELS] + [f"RK3({k}2)" for k in W._V2])))
    libs = {}
    for mode, defs in (("sequential", []), ("threaded", ["-DEMU_THREADED"])):
        so = d / f"emu_{mode}.so"
        out = subprocess.run([cxx, "-std=c++20", "-O1", "-w", "-fPIC", "-shared", "-ffp-contract=off", *defs,
                              "-fvisibility=hidden", "-fno-gnu-unique",       # two builds in one process
                              f"-I{d / 'inc'}", f"-I{CUDA_SRC}", str(d / "emu.cpp"), "-o", str(so), "-lpthread"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            if "c++20" in out.stderr or "_Float16" in out.stderr or "inline variable" in out.stderr:
                pytest.skip("the C++ compiler lacks C++20 or _Float16")
            raise AssertionError("compiling wkv4.cu for the CPU emulation failed:\n" + out.stderr[-4000:])
        lib = ctypes.CDLL(str(so))
        lib.wkv4_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_uint64)]
        libs[mode] = lib
    (d / "shim_lb.h").write_text(_EMU_LB_SHIM)
    lbs = [f"RS({t}, \"{t}\", {nw}, {s}, {mb})" for t in W._CTYPES for nw, s, mb in W._LBS_CONFIGS
           if W._lbs_fits((nw, s), W._ESIZE[t])]
    (d / "emu_lb.cpp").write_text(_EMU_LB_MAIN.replace("CONFIGS", " ".join(
        [f"RC({nw}, {s}, {mb})" for nw, s, mb in W._LB_CONFIGS] + lbs)))
    so = d / "emu_lb.so"
    out = subprocess.run([cxx, "-std=c++20", "-O1", "-w", "-fPIC", "-shared", "-ffp-contract=off",
                          "-fvisibility=hidden", "-fno-gnu-unique", f"-I{d / 'inc'}", f"-I{CUDA_SRC}",
                          str(d / "emu_lb.cpp"), "-o", str(so), "-lpthread"], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError("compiling wkv4.cu (look-back build) for the CPU emulation failed:\n" + out.stderr[-4000:])
    lib = ctypes.CDLL(str(so))
    lib.wkv4lb_launch.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64),
                                  ctypes.c_int]
    libs["lookback"] = lib
    return libs


@pytest.fixture(params=["sequential"])
def emu4(emu4_lib, monkeypatch, request):
    """Route the op's GPU launchers to the CPU-compiled kernels; arrays are NumPy (bf16 as uint16 bits).
    Yields a dict: 'err' (the error word) and 'launches' (kernel names launched, in order).
    'threaded': every block runs at once on its own OS thread, with block size 1 (W._BLOCK = 1)."""
    import ctypes
    lib = emu4_lib[request.param]
    lb_lib = emu4_lib["lookback"]
    lb_mode = {"concurrent": 0}
    if request.param == "threaded":
        monkeypatch.setattr(W, "_BLOCK", 1)
    cupy = pytest.importorskip("cupy")
    from rwkvops import _gpu
    err = np.zeros(1, np.int32)
    launches = []

    def ptr(a):
        return np.uint64(0) if a is None else np.uint64(a.ctypes.data)

    def launch(op_name, source, ne, nes, grid, block, args, shared_mem=0):
        assert op_name == "wkv4" and source == W.SOURCE and ne in nes, ne
        vals = [int(a) if isinstance(a, np.uint64) else int(np.int64(a).view(np.uint64)) for a in args]
        g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        launches.append(ne)
        if ne.startswith(("wkv4_fwd_lb<", "wkv4_fwd_lbs<")):
            nw = int(ne.split(",")[1])
            assert g[1:] == (1, 1) and tuple(block) == (32 * nw, 1, 1) and shared_mem == 0
            rc = lb_lib.wkv4lb_launch(ne.encode(), g[0], int(block[0]), (ctypes.c_uint64 * len(vals))(*vals),
                                      lb_mode["concurrent"])
            assert rc == 0, f"{ne} not in the emulation build"
            return
        assert tuple(block) == (W._BLOCK, 1, 1) and shared_mem == 0
        rc = lib.wkv4_emu_launch(ne.encode(), *g, int(block[0]), (ctypes.c_uint64 * len(vals))(*vals))
        assert rc == 0, f"{ne} not in the emulation build"

    monkeypatch.setattr(_gpu, "ptr", ptr)
    monkeypatch.setattr(_gpu, "error_ptr", lambda: np.uint64(err.ctypes.data))
    monkeypatch.setattr(_gpu, "launch", launch)
    monkeypatch.setattr(cupy, "ascontiguousarray",
                        lambda a, dtype=None: np.ascontiguousarray(a, dtype=dtype))
    yield {"err": err, "launches": launches, "lb_mode": lb_mode}
    assert err[0] == 0, "a kernel raised the error word"


def _emu_store(a, dtype):
    return cuda_emulation.bf16_bits(a) if dtype == "bfloat16" else np.ascontiguousarray(a, dtype=dtype)


def _emu_load(a, dtype):
    return cuda_emulation.bf16_values(a) if dtype == "bfloat16" else a.astype(np.float64)


def _emu_poisoned(shape, dtype):
    if dtype == "bfloat16":
        return np.full(shape, 0x7FC0, np.uint16)
    if np.dtype(dtype).kind == "i":
        return np.full(shape, 0x5A5A5A5A, dtype)
    return np.full(shape, np.nan, dtype)


def _emu_run(dtype, x, lens=None, B=None, T=None, s0=None, dy=None, ds=None, pool_idx=None, pool=None, bwd=True):
    """gpu_forward (+ gpu_backward) on emulated kernels; NumPy float64 inputs are rounded to ``dtype`` first.
    Returns y, state_out, grads (None without bwd), all as float64."""
    from rwkvops._dispatch import GpuCall
    from rwkvops._gpu import Seqs
    C = x["w"].shape[0]
    xs = {n: _emu_store(a, dtype) for n, a in x.items()}
    if lens is not None:
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        S, total = len(lens), int(cu[-1])
        seqs = Seqs(num=S, T=0, total=total, cu_seqlens=cu)
        dims = {"B": 1, "T": total, "C": C}
    else:
        cu, S, total = None, B, B * T
        seqs = Seqs(num=B, T=T, total=total)
        dims = {"B": B, "T": T, "C": C}
    if pool_idx is not None:
        seqs.state_idx = np.asarray(pool_idx, np.int32)
        seqs.pool_size = pool.shape[0]
        s_in = s_out = pool
    else:
        s_in = None if s0 is None else np.ascontiguousarray(s0, np.float32)
        s_out = np.full((S, 3, C), np.nan, np.float32)
    call = GpuCall(W.OP, dtype, dims, seqs, _emu_poisoned)
    y, saved = W.gpu_forward(call, xs, s_in, s_out, bwd)
    g = None
    if bwd:
        dys = None if dy is None else _emu_store(dy, dtype)
        dss = None if ds is None else np.ascontiguousarray(ds, np.float32)
        g = W.gpu_backward(call, xs, s_in, saved, dys, dss)
        g = {n: (a.astype(np.float64) if n == "state" else _emu_load(a, dtype)) for n, a in g.items()}
    return _emu_load(y, dtype), s_out.astype(np.float64), g


def _emu_ref(dtype, x, lens=None, s0=None, dy=None, ds=None):
    """The float64 oracle on the inputs as the kernels see them (rounded to dtype; state and dstate to fp32)."""
    xr = {n: _emu_load(_emu_store(a, dtype), dtype) for n, a in x.items()}
    C = x["w"].shape[0]
    S = len(lens) if lens is not None else x["k"].shape[0]
    s64 = np.zeros((S, 3, C)) if s0 is None else s0.astype(np.float32).astype(np.float64)
    dyr = None if dy is None else _emu_load(_emu_store(dy, dtype), dtype)
    ds64 = np.zeros((S, 3, C)) if ds is None else ds.astype(np.float32).astype(np.float64)
    if lens is None:
        y, s = W.reference_forward(xr, s64)
        g = W.reference_backward(xr, s64, np.zeros_like(y) if dyr is None else dyr, ds64)
        return y, s, g
    cu = np.concatenate([[0], np.cumsum(lens)])
    y, s = np.zeros_like(xr["k"]), s64.copy()
    g = {"w": np.zeros(C), "u": np.zeros(C), "k": np.zeros_like(y), "v": np.zeros_like(y), "state": ds64.copy()}
    for i in range(S):
        a, b = int(cu[i]), int(cu[i + 1])
        if a == b:
            continue
        xi = {**xr, "k": xr["k"][:, a:b], "v": xr["v"][:, a:b]}
        yi, si = W.reference_forward(xi, s64[i:i + 1])
        y[:, a:b], s[i] = yi, si[0]
        gi = W.reference_backward(xi, s64[i:i + 1], np.zeros_like(yi) if dyr is None else dyr[:, a:b],
                                  ds64[i:i + 1])
        for n in ("k", "v"):
            g[n][:, a:b] = gi[n]
        g["w"] += gi["w"]
        g["u"] += gi["u"]
        g["state"][i] = gi["state"][0]
    return y, s, g


def _emu_check(dtype, got, ref, tf=None, tb=None):
    tf = tf or TOL[dtype][0]
    tb = tb or TOL[dtype][1]
    y, s, g = got
    yr, sr, gr = ref
    assert rel_rms(y, yr) < tf, ("y", rel_rms(y, yr))
    assert rel_rms(s, sr) < tf, ("state", rel_rms(s, sr))
    if g is not None:
        for n in (*NAMES, "state"):
            assert rel_rms(g[n], gr[n]) < tb, (n, rel_rms(g[n], gr[n]))


def _emu_inputs(seed, B, T, C, kscale=3.0, **kw):
    rng = np.random.default_rng(seed)
    x = make_inputs(rng, B, T, C, kscale=kscale, **kw)
    s0 = make_state(rng, B if B > 0 else 1, C)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    return x, s0, dy, ds


@pytest.mark.parametrize("version,forward,L", [(2, "fused", 16), (2, "fused", 64), (2, "fused", 32),
                                               (2, "chunked", 4), (2, "chunked", 12), (2, "chunked", 64),
                                               (1, "chunked", 4), (1, "chunked", 16), (1, "fused", 64),
                                               (3, "chunked", 12), (3, "chunked", 64), (3, "lookback", 16)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_kernels_dense(emu4, monkeypatch, dtype, L, version, forward):
    monkeypatch.setattr(W, "KERNEL_VERSION", version)
    monkeypatch.setattr(W, "FORWARD", forward)
    monkeypatch.setattr(W, "FUSED_L_LONG", 64)            # exercise wkv4_fwd_fused64 where L allows it
    monkeypatch.setattr(W, "_chunk_len", lambda seqs, C: L)
    for B, T, C in ((2, 1, 5), (1, 15, 3), (2, 17, 130), (1, 65, 3), (2, 130, 4)):
        x, s0, dy, ds = _emu_inputs(B * 1000 + T + L, B, T, C)
        got = _emu_run(dtype, x, B=B, T=T, s0=s0, dy=dy, ds=ds)
        _emu_check(dtype, got, _emu_ref(dtype, x, s0=s0, dy=dy, ds=ds))
    names = set(emu4["launches"])
    fused = {W._name("wkv4_fwd_fused", dtype), W._name("wkv4_fwd_fused64", dtype)}
    if forward == "lookback":     # where C is even; the odd-C shapes fall back
        assert _cur_lb_name(dtype) in names
    else:
        assert bool(names & fused) == (forward == "fused")
    if forward == "fused":   # 64-token fused chunks exactly when the backward's chunks are 64 long
        assert (W._name("wkv4_fwd_fused64", dtype) in names) == (L % 64 == 0)
    v2 = {f"{k}2" for k in W._V2}
    v3 = {W._name(k, dtype)[:-1] + ", true>" for k in v2}
    assert bool(names & v3) == (version == 3)
    assert (names & {W._name(k, dtype) for k in v2}) if version == 2 else not (
        version == 1 and any(n.split("<")[0] in v2 for n in names))


def test_auto_path_selection_by_shape(monkeypatch):
    """FORWARD "auto": the staged look-back forward where sequences average more than one of its tiles (128 tokens);
    shorter ones (decode) and LOOKBACK_STAGED False: the register look-back forward while its tiles (128 tokens x 64
    channels) are at most LB_MAX_TILES_PER_SM per SM (H100, C=2048: B*T up to ~25K tokens), the three-launch one
    beyond; where the look-back forward cannot run (odd C), the 16-token fused forward for short single sequences,
    else the three-launch one; forcing wins."""
    from rwkvops._gpu import Seqs
    monkeypatch.setattr(W, "_sm_count", lambda: 132)
    monkeypatch.setattr(W, "FORWARD", "auto")
    C = 2048
    for B, T in ((1, 129), (1, 1024), (8, 4096), (16, 4096), (1, 100000)):
        assert W._forward_path(Seqs(num=B, T=T, total=B * T), C, 64) == "lookback", (B, T)
    packed = Seqs(num=8, T=0, total=8 * 4096, cu_seqlens=np.zeros(9, np.int32))
    assert W._forward_path(packed, C, 64) == "lookback"
    for B, T, path in ((1, 128, "lookback_reg"), (8, 1, "lookback_reg"), (256, 1, "chunked")):   # decode: as before
        assert W._forward_path(Seqs(num=B, T=T, total=B * T), C, 64) == path, (B, T)
    assert W._forward_path(Seqs(num=256, T=0, total=256, cu_seqlens=np.zeros(257, np.int32)), C, 64) == "chunked"
    monkeypatch.setattr(W, "LOOKBACK_STAGED", False)
    for B, T, path in ((1, 1024, "lookback_reg"), (1, 16384, "lookback_reg"), (2, 4096, "lookback_reg"),
                       (4, 4096, "lookback_reg"), (8, 4096, "chunked"), (1, 32768, "chunked")):
        assert W._forward_path(Seqs(num=B, T=T, total=B * T), C, 64) == path, (B, T)
    assert W._forward_path(packed, C, 64) == "chunked"
    assert W._forward_path(Seqs(num=3, T=0, total=30, cu_seqlens=np.zeros(4, np.int32)), C, 16) == "lookback_reg"
    for B, T, path in ((1, 1024, "fused"), (1, 4096, "fused"), (1, 16384, "chunked"), (2, 4096, "chunked")):
        assert W._fused_or_chunked(Seqs(num=B, T=T, total=B * T), C) == path, (B, T)
    monkeypatch.setattr(W, "FORWARD", "fused")
    assert W._forward_path(Seqs(num=8, T=4096, total=8 * 4096), C, 64) == "fused"
    assert W._fused_len(64) == 16                         # 64-token fused chunks only when asked for
    monkeypatch.setattr(W, "FUSED_L_LONG", 64)
    assert W._fused_len(64) == 64 and W._fused_len(32) == 16


def test_auto_kernel_versions():
    """KERNEL_VERSION "auto": version 3 (FAST) for the forward chunk kernels and the backward's chunk kernel,
    version 2 for the backward's output kernel (each the faster on the H100)."""
    assert W.KERNEL_VERSION == "auto"
    assert W._AUTO_VERSION == {"wkv4_fwd_chunk": 3, "wkv4_fwd_out": 3, "wkv4_bwd_chunk": 3, "wkv4_bwd_out": 2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_emulated_v2_equals_v1_bitwise(emu4, monkeypatch, dtype):
    """Version 2 evaluates the same formulas with fewer operations: identical bits, fwd and bwd."""
    monkeypatch.setattr(W, "FORWARD", "chunked")
    for L in (5, 16, 64):
        monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        x, s0, dy, ds = _emu_inputs(L, 2, 150, 7, kscale=20.0, wlo=-8.0, whi=3.0)
        x["k"][:, ::7] = 0.0                                  # ties: u + k == pp and pp + w' == k happen
        out = {}
        for version in (1, 2):
            monkeypatch.setattr(W, "KERNEL_VERSION", version)
            out[version] = _emu_run(dtype, x, B=2, T=150, s0=s0, dy=dy, ds=ds)
        (y1, s1, g1), (y2, s2, g2) = out[1], out[2]
        np.testing.assert_array_equal(y2, y1)
        np.testing.assert_array_equal(s2, s1)
        for n in g1:
            np.testing.assert_array_equal(g2[n], g1[n], err_msg=n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_varlen_zero_length(emu4, monkeypatch, dtype):
    lens = [70, 0, 1, 129, 16, 0, 5]
    C = 6
    x, _, _, _ = _emu_inputs(3, 1, sum(lens), C)
    rng = np.random.default_rng(4)
    s0 = make_state(rng, len(lens), C)
    dy = rng.standard_normal((1, sum(lens), C))
    ds = rng.standard_normal((len(lens), 3, C))
    for L in (None, 4, 64):
        if L is not None:
            monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        got = _emu_run(dtype, x, lens=lens, s0=s0, dy=dy, ds=ds)
        _emu_check(dtype, got, _emu_ref(dtype, x, lens=lens, s0=s0, dy=dy, ds=ds))
        for i in (1, 5):     # zero-length sequences: state and its gradient pass through
            np.testing.assert_array_equal(got[1][i], s0[i].astype(np.float32))
            np.testing.assert_array_equal(got[2]["state"][i], ds[i].astype(np.float32))


def test_emulated_pool_with_empty_slots(emu4, monkeypatch):
    lens = [3, 0, 40, 1, 1, 0]
    C, P = 5, 9
    x, _, _, _ = _emu_inputs(5, 1, sum(lens), C)
    rng = np.random.default_rng(6)
    pool = make_state(rng, P, C).astype(np.float32)
    before = pool.copy()
    idx = [7, 2, -1, 0, -1, 5]
    s0 = np.stack([np.zeros((3, C)) if i < 0 else before[i] for i in idx]).astype(np.float64)
    yr, sr, _ = _emu_ref("float32", x, lens=lens, s0=s0)
    for L in (4, 16):
        monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        pool[:] = before
        y, _, _ = _emu_run("float32", x, lens=lens, pool_idx=idx, pool=pool, bwd=False)
        assert rel_rms(y, yr) < 1e-5
        for i, slot in enumerate(idx):
            if slot >= 0:
                assert rel_rms(pool[slot], sr[i]) < 1e-5
        for untouched in (1, 3, 4, 6, 8):
            np.testing.assert_array_equal(pool[untouched], before[untouched])
        np.testing.assert_array_equal(pool[2], before[2])      # zero-length sequence: unchanged


def test_emulated_no_state_and_no_grads(emu4):
    x, _, _, ds = _emu_inputs(7, 2, 33, 4)
    got = _emu_run("float32", x, B=2, T=33)
    _emu_check("float32", got, _emu_ref("float32", x))
    for n, a in got[2].items():
        assert np.all(a == 0), n
    got = _emu_run("float32", x, B=2, T=33, ds=ds)        # dy None, dstate given
    _emu_check("float32", got, _emu_ref("float32", x, ds=ds))


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_extreme_k(emu4, monkeypatch, dtype, version):
    monkeypatch.setattr(W, "KERNEL_VERSION", version)
    rng = np.random.default_rng(12)
    B, T, C = 2, 300, 5
    x = make_inputs(rng, B, T, C)
    x["k"] = rng.uniform(-60, 60, (B, T, C))
    x["w"][:3] = [4.0, -12.0, 0.0]
    s0 = make_state(rng, B, C, plo=-60, phi=60)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    for L in (16, 64):
        monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        got = _emu_run(dtype, x, B=B, T=T, s0=s0, dy=dy, ds=ds)
        _emu_check(dtype, got, _emu_ref(dtype, x, s0=s0, dy=dy, ds=ds),
                   tf=max(TOL[dtype][0], 3e-5), tb=max(TOL[dtype][1], 3e-4))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_fused_matches_chunked(emu4, monkeypatch, dtype):
    """The one-launch forward and the three-launch one agree (to rounding), and so do the backwards run from
    their checkpoints."""
    x, s0, dy, ds = _emu_inputs(40, 2, 200, 9, kscale=8.0)
    out = {}
    for forward in ("fused", "chunked"):
        monkeypatch.setattr(W, "FORWARD", forward)
        out[forward] = _emu_run(dtype, x, B=2, T=200, s0=s0, dy=dy, ds=ds)
    (y1, s1, g1), (y2, s2, g2) = out["fused"], out["chunked"]
    assert rel_rms(y1, y2) < 1e-6 if dtype == "float32" else rel_rms(y1, y2) < 1e-2
    assert rel_rms(s1, s2) < 1e-6
    for n in g1:
        assert rel_rms(g1[n], g2[n]) < (1e-5 if dtype == "float32" else 1e-2), n


def test_emulated_fused_deterministic_and_ordered(emu4):
    """Run twice: identical bits (the look-back folds in chunk order, whatever it found)."""
    x, s0, dy, ds = _emu_inputs(41, 3, 100, 5)
    a = _emu_run("float32", x, B=3, T=100, s0=s0, dy=dy, ds=ds)
    b = _emu_run("float32", x, B=3, T=100, s0=s0, dy=dy, ds=ds)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for n in a[2]:
        np.testing.assert_array_equal(a[2][n], b[2][n])


@pytest.mark.slow
@pytest.mark.parametrize("emu4", ["threaded"], indirect=True)
def test_emulated_fused_concurrent_lookback(emu4, monkeypatch):
    """Every block at once on its own OS thread, with random delays before each publication: tiles wait for and
    walk back over predecessors that have published only their aggregate.  Results must equal the sequential run
    bit for bit (dense, varlen with empty sequences, pool) and the reference."""
    monkeypatch.setattr(W, "FORWARD", "fused")
    monkeypatch.setattr(W, "_chunk_len", lambda seqs, C: 32)
    x, s0, dy, ds = _emu_inputs(42, 2, 150, 3, kscale=5.0)
    got = _emu_run("float32", x, B=2, T=150, s0=s0, dy=dy, ds=ds)
    _emu_check("float32", got, _emu_ref("float32", x, s0=s0, dy=dy, ds=ds))
    again = _emu_run("float32", x, B=2, T=150, s0=s0, dy=dy, ds=ds)
    np.testing.assert_array_equal(got[0], again[0])
    np.testing.assert_array_equal(got[1], again[1])
    lens = [40, 0, 1, 70, 16]
    xv, _, _, _ = _emu_inputs(43, 1, sum(lens), 3)
    rng = np.random.default_rng(44)
    sv = make_state(rng, len(lens), 3)
    dyv = rng.standard_normal((1, sum(lens), 3))
    dsv = rng.standard_normal((len(lens), 3, 3))
    got = _emu_run("bfloat16", xv, lens=lens, s0=sv, dy=dyv, ds=dsv)
    _emu_check("bfloat16", got, _emu_ref("bfloat16", xv, lens=lens, s0=sv, dy=dyv, ds=dsv))
    _emu_check_pool(xv, lens, rng, C=3)


def _emu_check_pool(xv, lens, rng, C):
    """Five packed sequences on slots [4, 1, -1, 0, 6] of a pool of 7 (fp32, emulated forward): outputs and the
    written slots equal the reference from the slots' prior contents; slots 2, 3, 5 stay untouched."""
    pool = make_state(rng, 7, C).astype(np.float32)
    before = pool.copy()
    idx = [4, 1, -1, 0, 6]
    y, _, _ = _emu_run("float32", xv, lens=lens, pool_idx=idx, pool=pool, bwd=False)
    s_in = np.stack([np.zeros((3, C)) if i < 0 else before[i] for i in idx]).astype(np.float64)
    yr, sr, _ = _emu_ref("float32", xv, lens=lens, s0=s_in)
    assert rel_rms(y, yr) < 1e-5
    for i, slot in enumerate(idx):
        if slot >= 0:
            assert rel_rms(pool[slot], sr[i]) < 1e-5
    for untouched in (2, 3, 5):
        np.testing.assert_array_equal(pool[untouched], before[untouched])


# ----------------------------------------------------------------------------- the look-back forward (wkv4_fwd_lb)

def _lb_names(launches):
    return [n for n in launches if n.startswith(("wkv4_fwd_lb<", "wkv4_fwd_lbs<"))]


def _cur_lb_name(dtype):
    return W._lbs_name(dtype) if W.LOOKBACK_STAGED else W._lb_name(dtype)


def _set_lb(monkeypatch, kind, cfg):
    """Force the look-back forward ``kind`` ("lb": wkv4_fwd_lb, "lbs": wkv4_fwd_lbs) with tile shape ``cfg`` (for
    "lbs": for every element size it fits, the default shape for the others)."""
    monkeypatch.setattr(W, "FORWARD", "lookback")
    monkeypatch.setattr(W, "LOOKBACK_STAGED", kind == "lbs")
    if kind == "lb":
        monkeypatch.setattr(W, "LOOKBACK", cfg)
    else:
        monkeypatch.setattr(W, "LOOKBACK_S", {e: cfg if W._lbs_fits(cfg, e) else W.LOOKBACK_S[e] for e in (2, 4)})


def _tile_len(kind, cfg, dtype):
    e = 4 if dtype == "float32" else 2
    c = cfg if kind == "lb" or W._lbs_fits(cfg, e) else W.LOOKBACK_S[e]
    return c[0] * c[1]


_LB_KINDS = [("lb", (2, 4, 8)), ("lb", (8, 16, 2)), ("lb", (16, 8, 1)),
             ("lbs", (2, 4, 8)), ("lbs", (4, 32, 6)), ("lbs", (4, 16, 6)), ("lbs", (4, 16, 8)), ("lbs", (8, 16, 3)),
             ("lbs", (4, 24, 7)), ("lbs", (4, 12, 7))]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "precise"])
@pytest.mark.parametrize("kind,cfg", _LB_KINDS, ids=lambda c: f"{c[0]}x{c[1]}" if isinstance(c, tuple) else c)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_emulated_lookback_dense(emu4, monkeypatch, dtype, kind, cfg, fast):
    """Tiles of NW*S tokens: lengths below, at and across tile and sub-chunk (S) boundaries, channel groups of 64 with
    a partial last one, checkpoints every L tokens for L below, equal to and above the tile, fwd and bwd vs the
    float64 reference."""
    _set_lb(monkeypatch, kind, cfg)
    monkeypatch.setattr(W, "LOOKBACK_FAST", fast)
    tl = _tile_len(kind, cfg, dtype)
    S = cfg[1] if kind == "lb" or tl == cfg[0] * cfg[1] else W._lbs_cfg(dtype)[1]
    cases = [(2, 1, 4, 4), (1, S - 1, 2, 12), (2, tl + 1, 130, 64), (1, 3 * tl + S + 3, 66, 4),
             (2, 5 * tl, 4, min(2 * tl, W.MAX_CHUNK)), (1, 2 * tl - 1, 2, 5)]
    for B, T, C, L in cases:
        monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        emu4["launches"].clear()
        x, s0, dy, ds = _emu_inputs(B * 1000 + T + C, B, T, C)
        got = _emu_run(dtype, x, B=B, T=T, s0=s0, dy=dy, ds=ds)
        _emu_check(dtype, got, _emu_ref(dtype, x, s0=s0, dy=dy, ds=ds))
        assert _lb_names(emu4["launches"]) == [_cur_lb_name(dtype)], emu4["launches"]
        fwd = [n for n in emu4["launches"] if n.startswith("wkv4_fwd")]
        assert fwd == [_cur_lb_name(dtype)]               # one launch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_staged_equals_register_lookback_bitwise(emu4, monkeypatch, dtype):
    """The staged look-back forward (k, v in shared memory, per-tile statuses) folds the same states in the same
    order as the register one with the same tile shape: identical y, final state and backward, dense and packed."""
    x, s0, dy, ds = _emu_inputs(31, 3, 77, 130, kscale=4.0)
    lens = [30, 0, 1, 70, 9]
    xv, _, _, _ = _emu_inputs(32, 1, sum(lens), 6)
    rng = np.random.default_rng(33)
    sv, dyv, dsv = make_state(rng, len(lens), 6), rng.standard_normal((1, sum(lens), 6)), rng.standard_normal((5, 3, 6))
    monkeypatch.setattr(W, "_chunk_len", lambda seqs, C: 16)
    out = {}
    for kind in ("lb", "lbs"):
        _set_lb(monkeypatch, kind, (2, 4, 8))
        out[kind] = (_emu_run(dtype, x, B=3, T=77, s0=s0, dy=dy, ds=ds),
                     _emu_run(dtype, xv, lens=lens, s0=sv, dy=dyv, ds=dsv))
    for a, b in zip(out["lb"], out["lbs"]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        for n in a[2]:
            np.testing.assert_array_equal(a[2][n], b[2][n], err_msg=n)


@pytest.mark.parametrize("kind,cfg", [("lb", (2, 4, 8)), ("lb", (8, 16, 2)), ("lbs", (2, 4, 8)), ("lbs", (4, 32, 6))],
                         ids=lambda c: f"{c[0]}x{c[1]}" if isinstance(c, tuple) else c)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_emulated_lookback_varlen_pool(emu4, monkeypatch, dtype, kind, cfg):
    """Packed sequences (zero-length ones pass their state and its gradient through) and a pool updated in place with
    -1 slots, as the auto path takes them (the register kind; the staged one forced: these are short sequences)."""
    _set_lb(monkeypatch, kind, cfg)
    monkeypatch.setattr(W, "FORWARD", "auto" if kind == "lb" else "lookback")
    lens = [70, 0, 1, 129, 16, 0, 5, 8]
    C = 6
    x, _, _, _ = _emu_inputs(3, 1, sum(lens), C)
    rng = np.random.default_rng(4)
    s0 = make_state(rng, len(lens), C)
    dy = rng.standard_normal((1, sum(lens), C))
    ds = rng.standard_normal((len(lens), 3, C))
    for L in (4, 16, 64):
        monkeypatch.setattr(W, "_chunk_len", lambda seqs, C, L=L: L)
        got = _emu_run(dtype, x, lens=lens, s0=s0, dy=dy, ds=ds)
        _emu_check(dtype, got, _emu_ref(dtype, x, lens=lens, s0=s0, dy=dy, ds=ds))
        for i in (1, 5):
            np.testing.assert_array_equal(got[1][i], s0[i].astype(np.float32))
            np.testing.assert_array_equal(got[2]["state"][i], ds[i].astype(np.float32))
    assert _lb_names(emu4["launches"]) and set(_lb_names(emu4["launches"])) == {_cur_lb_name(dtype)}
    P = 11
    pool = make_state(rng, P, C).astype(np.float32)
    before = pool.copy()
    idx = [7, 2, -1, 0, -1, 5, 9, 10]
    s_in = np.stack([np.zeros((3, C)) if i < 0 else before[i] for i in idx]).astype(np.float64)
    yr, sr, _ = _emu_ref("float32", x, lens=lens, s0=s_in)
    y, _, _ = _emu_run("float32", x, lens=lens, pool_idx=idx, pool=pool, bwd=False)
    assert rel_rms(y, yr) < 1e-5
    for i, slot in enumerate(idx):
        if slot >= 0:
            assert rel_rms(pool[slot], sr[i]) < 1e-5
    for untouched in (1, 3, 4, 6, 8):
        np.testing.assert_array_equal(pool[untouched], before[untouched])
    np.testing.assert_array_equal(pool[2], before[2])      # zero-length sequence: unchanged


@pytest.mark.parametrize("kind", ["lb", "lbs"])
def test_emulated_lookback_extreme_k_and_no_state(emu4, monkeypatch, kind):
    _set_lb(monkeypatch, kind, (2, 4, 8))
    rng = np.random.default_rng(12)
    B, T, C = 2, 300, 4
    x = make_inputs(rng, B, T, C)
    x["k"] = rng.uniform(-60, 60, (B, T, C))
    x["w"][:3] = [4.0, -12.0, 0.0]
    s0 = make_state(rng, B, C, plo=-60, phi=60)
    dy = rng.standard_normal((B, T, C))
    ds = rng.standard_normal((B, 3, C))
    for fast in (True, False):
        monkeypatch.setattr(W, "LOOKBACK_FAST", fast)
        for dtype in ("float32", "bfloat16"):
            got = _emu_run(dtype, x, B=B, T=T, s0=s0, dy=dy, ds=ds)
            _emu_check(dtype, got, _emu_ref(dtype, x, s0=s0, dy=dy, ds=ds),
                       tf=max(TOL[dtype][0], 3e-5), tb=max(TOL[dtype][1], 3e-4))
    got = _emu_run("float32", x, B=B, T=T)
    _emu_check("float32", got, _emu_ref("float32", x))


def test_emulated_lookback_falls_back(emu4, monkeypatch):
    """Odd C (channel pairs) or k, v off a two-element boundary: the auto path takes another forward, still right."""
    monkeypatch.setattr(W, "FORWARD", "auto")
    x, s0, dy, ds = _emu_inputs(8, 2, 40, 5)
    got = _emu_run("float32", x, B=2, T=40, s0=s0, dy=dy, ds=ds)
    _emu_check("float32", got, _emu_ref("float32", x, s0=s0, dy=dy, ds=ds))
    assert not _lb_names(emu4["launches"])
    from rwkvops._gpu import Seqs
    buf = np.zeros(2 * 40 * 4 + 1, np.float32)
    k_off = buf[1:].reshape(2, 40, 4)
    for staged in (False, True):
        assert not W._lookback_ok(Seqs(num=2, T=40, total=80), {"k": k_off, "v": k_off}, 4, staged)
        assert W._lookback_ok(Seqs(num=2, T=40, total=80), {"k": buf[:-1].reshape(2, 40, 4),
                                                            "v": np.zeros((2, 40, 4), np.float32)}, 4, staged)


@pytest.mark.slow
@pytest.mark.parametrize("kind,cfg", [("lb", (2, 4, 8)), ("lb", (4, 16, 4)), ("lbs", (2, 4, 8)), ("lbs", (4, 16, 6))],
                         ids=lambda c: f"{c[0]}x{c[1]}" if isinstance(c, tuple) else c)
def test_emulated_lookback_concurrent(emu4, monkeypatch, kind, cfg):
    """Every block at once on its own OS thread, each delayed at random after taking its tile: tiles wait for
    predecessors that have published nothing, walk back over aggregates, and must still give the sequential run's
    results bit for bit (the combine order is fixed), and the reference's."""
    _set_lb(monkeypatch, kind, cfg)
    monkeypatch.setattr(W, "_chunk_len", lambda seqs, C: 16)
    tl = cfg[0] * cfg[1]
    B, T, C = 2, 9 * tl + 3, 130
    x, s0, dy, ds = _emu_inputs(42, B, T, C, kscale=5.0)
    seq = _emu_run("bfloat16", x, B=B, T=T, s0=s0, dy=dy, ds=ds)
    emu4["lb_mode"]["concurrent"] = 1
    for _ in range(2):
        got = _emu_run("bfloat16", x, B=B, T=T, s0=s0, dy=dy, ds=ds)
        np.testing.assert_array_equal(got[0], seq[0])
        np.testing.assert_array_equal(got[1], seq[1])
        for n in got[2]:
            np.testing.assert_array_equal(got[2][n], seq[2][n], err_msg=n)
    _emu_check("bfloat16", got, _emu_ref("bfloat16", x, s0=s0, dy=dy, ds=ds))
    lens = [5 * tl + 1, 0, 1, 3 * tl, tl - 1]
    xv, _, _, _ = _emu_inputs(43, 1, sum(lens), 4)
    rng = np.random.default_rng(44)
    _emu_check_pool(xv, lens, rng, C=4)


_LB_REF: dict = {}
# (kind, tile shape or None for the default, FAST): the staged look-back forward (the default) in every shape, the
# register one in its default shape and the tests' small one
_LB_VARIANTS = ([("lbs", None, True), ("lbs", None, False)]
                + [("lbs", c, True) for c in W._LBS_CONFIGS if c != W.LOOKBACK_S[2]]
                + [("lb", W.LOOKBACK, True), ("lb", (2, 4, 8), True)])


@gpu
@pytest.mark.parametrize("kind,cfg,fast", _LB_VARIANTS, ids=lambda v: "default" if v is None else
                         (f"{v[0]}x{v[1]}x{v[2]}" if isinstance(v, tuple) else
                          (v if isinstance(v, str) else ("fast" if v else "precise"))))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,T,C", [(1, 20000, 2048), (8, 1000, 300), (3, 17, 2048), (2, 4097, 66)])
def test_gpu_lookback_forward(need_gpu, monkeypatch, dtype, B, T, C, kind, cfg, fast):
    """The look-back forward on thousands of tiles, every tile shape: against the float64 reference (fwd, and the
    backward from its checkpoints where the reference is quick), bitwise repeatable, no look-back timed out."""
    torch = pytest.importorskip("torch")
    if cfg is not None and dtype == "float32" and (kind == "lb" or not W._lbs_fits(cfg, 4)):
        pytest.skip("other tile shapes in bf16 only (the code is the same per dtype; each shape compiles apart)")
    if cfg is None:
        monkeypatch.setattr(W, "FORWARD", "lookback")
    else:
        _set_lb(monkeypatch, kind, cfg)
    monkeypatch.setattr(W, "LOOKBACK_FAST", fast)
    key = (B, T, C, dtype)
    if key not in _LB_REF:          # the float64 reference and the device inputs once per shape and dtype
        rng = np.random.default_rng(B * 7 + T)
        x64 = _rounded(make_inputs(rng, B, T, C, kscale=3.0), dtype)
        s0 = make_state(rng, B, C).astype(np.float32).astype(np.float64)
        dy64 = _rounded({"dy": rng.standard_normal((B, T, C))}, dtype)["dy"]
        ds = rng.standard_normal((B, 3, C))
        ref = W.reference_forward(x64, s0)
        ref_g = W.reference_backward(x64, s0, dy64, ds) if B * T <= 5000 else None
        dev = ({n: _to_torch_cuda(v, dtype) for n, v in x64.items()},
               torch.tensor(s0, dtype=torch.float32, device="cuda"), _to_torch_cuda(dy64, "float32"),
               torch.tensor(ds, device="cuda", dtype=torch.float32))
        _LB_REF.clear()
        _LB_REF[key] = (dev, ref, ref_g)
    (xd, sd, dyd, dsd), (ref_y, ref_s), ref_g = _LB_REF[key]
    res = []
    for _ in range(2):
        xt = {n: v.clone().requires_grad_(True) for n, v in xd.items()}
        st_ = sd.clone().requires_grad_(True)
        y, s = rwkvops.wkv4(*args(xt), state=st_)
        ((y.float() * dyd).sum() + (s * dsd).sum()).backward()
        res.append((y.detach(), s.detach(), *(xt[n].grad for n in NAMES), st_.grad))
    rwkvops.check_errors()
    for i, (a, b) in enumerate(zip(*res)):
        assert torch.equal(a, b), f"look-back forward not deterministic (output {i})"
    tf, tb = TOL[dtype]
    assert rel_rms(res[0][0], ref_y) < tf and rel_rms(res[0][1], ref_s) < tf
    if ref_g is not None:
        for n, gr in zip((*NAMES, "state"), res[0][2:]):
            assert rel_rms(gr, ref_g[n]) < tb, n


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,T,C", [(1, 20000, 2048), (8, 1000, 300), (3, 17, 2048)])
def test_gpu_fused_forward_matches_chunked_and_is_deterministic(need_gpu, monkeypatch, dtype, B, T, C):
    """The one-launch look-back forward on many tiles (thousands in flight, several channel blocks): bitwise
    repeatable, equal to the three-launch forward to rounding, its checkpoints give the same backward, and no
    look-back ever timed out (error word)."""
    torch = pytest.importorskip("torch")
    g = torch.Generator(device="cuda").manual_seed(17)
    dt = getattr(torch, dtype)
    w = (torch.rand(C, device="cuda", generator=g) * 4 - 3).to(dt)
    u = torch.randn(C, device="cuda", generator=g).to(dt) * 0.5
    k = (torch.randn(B, T, C, device="cuda", generator=g) * 3).to(dt)
    v = torch.randn(B, T, C, device="cuda", generator=g).to(dt)
    s0 = torch.rand(B, 3, C, device="cuda", generator=g) + 0.5
    dy = torch.randn(B, T, C, device="cuda", generator=g).to(dt)
    ds = torch.randn(B, 3, C, device="cuda", generator=g)
    out = {}
    for forward in ("fused", "fused", "chunked"):
        monkeypatch.setattr(W, "FORWARD", forward)
        xs = [t.clone().requires_grad_(True) for t in (w, u, k, v)]
        st_ = s0.clone().requires_grad_(True)
        y, s = rwkvops.wkv4(*xs, state=st_)
        ((y.float() * dy.float()).sum() + (s * ds).sum()).backward()
        res = (y.detach(), s.detach(), *(t.grad for t in xs), st_.grad)
        if forward in out:
            for a, b in zip(out[forward], res):
                assert torch.equal(a, b), "fused forward not deterministic"
        out[forward] = res
    rwkvops.check_errors()
    tol = 1e-5 if dtype == "float32" else 1e-2
    for i, (a, b) in enumerate(zip(out["fused"], out["chunked"])):
        assert rel_rms(a, b) < tol, i


def _underflow_inputs():
    """u + k far below the state's running max P while the history is empty (aa = bb = 0): the bonus term
    e^{u + k - P} underflows float32 (and flushes in the FAST forms) and y must still be its limit, v."""
    rng = np.random.default_rng(5)
    B, T, C = 2, 40, 4
    x = make_inputs(rng, B, T, C)
    x["u"][:] = [-60.0, -30.0, 0.0, -45.0]
    x["k"] = rng.uniform(-60, -40, (B, T, C))
    s0 = np.zeros((B, 3, C))
    # batch 1: an empty history at a running max above 0, low enough that the first token's own term e^{k - P - w'}
    # stays a normal float (an empty state far above every k, e.g. P = 90, is no float32 state: the history's terms
    # underflow however the outputs are formed)
    s0[1, 2] = [10.0, 20.0, 15.0, 0.0]
    return x, s0


# every forward path: (FORWARD, KERNEL_VERSION, look-back kind with tiles (2, 4, 8) or None for the default)
_UNDERFLOW_PATHS = [("lookback", 3, "lbs"), ("lookback", 3, "lb"), ("fused", 2, None), ("chunked", 1, None),
                    ("chunked", 2, None), ("chunked", 3, None)]


@pytest.mark.parametrize("forward,version,kind", _UNDERFLOW_PATHS)
def test_emulated_empty_history_underflow(emu4, monkeypatch, forward, version, kind):
    monkeypatch.setattr(W, "KERNEL_VERSION", version)
    monkeypatch.setattr(W, "FORWARD", forward)
    if kind is not None:
        _set_lb(monkeypatch, kind, (2, 4, 8))
    x, s0 = _underflow_inputs()
    B, T, C = x["k"].shape
    for fast in (True, False):
        monkeypatch.setattr(W, "LOOKBACK_FAST", fast)
        for dtype in ("float32", "bfloat16"):
            y, s, _ = _emu_run(dtype, x, B=B, T=T, s0=s0, bwd=False)
            yr, sr, _ = _emu_ref(dtype, x, s0=s0)
            assert np.isfinite(y).all() and np.isfinite(s).all(), (forward, dtype, fast)
            assert rel_rms(y, yr) < TOL[dtype][0] and rel_rms(s, sr) < TOL[dtype][0], (forward, dtype, fast)


@gpu
@pytest.mark.parametrize("forward,version,kind", _UNDERFLOW_PATHS + [("lookback", 3, None)])
def test_gpu_empty_history_underflow(need_gpu, monkeypatch, forward, version, kind):
    """As test_emulated_empty_history_underflow on the device, where FAST also flushes e^{u + k - P} below 2^-126."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(W, "KERNEL_VERSION", version)
    monkeypatch.setattr(W, "FORWARD", forward)
    if kind is not None:
        _set_lb(monkeypatch, kind, (2, 4, 8))
    x, s0 = _underflow_inputs()
    for fast in (True, False):
        monkeypatch.setattr(W, "LOOKBACK_FAST", fast)
        for dtype in ("float32", "bfloat16"):
            x64 = _rounded(x, dtype)
            ref_y, ref_s = W.reference_forward(x64, s0)
            xt = {n: _to_torch_cuda(v, dtype) for n, v in x64.items()}
            with torch.no_grad():
                y, s = rwkvops.wkv4(*args(xt), state=torch.tensor(s0, dtype=torch.float32, device="cuda"))
            assert bool(torch.isfinite(y.float()).all()) and bool(torch.isfinite(s).all()), (dtype, fast)
            assert rel_rms(y, ref_y) < TOL[dtype][0] and rel_rms(s, ref_s) < TOL[dtype][0], (dtype, fast)
    rwkvops.check_errors()
