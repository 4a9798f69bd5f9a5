"""RWKV-7 WKV: the NumPy reference (finite differences, continuation, varlen, pools, fla converters) on the CPU,
and the CUDA kernels against it on the GPU (marked ``gpu``)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from rwkvops import testing
from hypothesis import HealthCheck, given, settings, strategies as st

import rwkvops
from rwkvops.ops import wkv7 as W
from rwkvops.testing import has_gpu, rel_rms, to_numpy
import cuda_emulation

NAMES = ("r", "w", "k", "v", "a", "b")
T_CASES = (1, 15, 16, 17, 63, 65)


def make_inputs(rng, B, T, H, N, dtype=np.float64, wlo=-8.0, whi=4.0, scale=1.0):
    """Random inputs in a realistic regime: w in [wlo, whi] (decays from ~1 to ~1e-24), a = -kk, b = kk*lr."""
    x = {n: rng.standard_normal((B, T, H, N)) * scale for n in ("r", "k", "v")}
    x["w"] = rng.uniform(wlo, whi, (B, T, H, N))
    kk = rng.standard_normal((B, T, H, N))
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    lr = rng.uniform(0.0, 1.0, (B, T, H, N))
    x["a"] = -kk
    x["b"] = kk * lr
    x["k"] = x["k"] / np.sqrt(N)
    return {n: x[n].astype(dtype) for n in NAMES}


def make_state(rng, B, H, N, dtype=np.float64):
    return (rng.standard_normal((B, H, N, N)) * 0.5).astype(dtype)


def args(x):
    return tuple(x[n] for n in NAMES)


# ----------------------------------------------------------------------------- reference: backward by FD

@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 3), (2, 4, 1, 3), (1, 5, 2, 2)], ids=lambda v: str(v))
def test_reference_backward_finite_differences(B, T, H, N):
    rng = np.random.default_rng(1)
    x = make_inputs(rng, B, T, H, N, wlo=-3.0, whi=1.0)
    s0 = make_state(rng, B, H, N)
    dy = rng.standard_normal((B, T, H, N))
    ds = rng.standard_normal((B, H, N, N))
    testing.finite_difference_check(W.reference_forward, W.reference_backward, x, s0, dy, ds, rtol=1e-6, atol=1e-8)

def test_reference_formula_single_step():
    """One step by hand, with explicit loops over i, j (the formula in the docstring)."""
    rng = np.random.default_rng(2)
    N = 3
    x = make_inputs(rng, 1, 1, 1, N)
    s0 = make_state(rng, 1, 1, N)
    r, w, k, v, a, b = (x[n][0, 0, 0] for n in NAMES)
    S = s0[0, 0]
    d = np.exp(-np.exp(w))
    sa = [sum(S[i, j] * a[j] for j in range(N)) for i in range(N)]
    S1 = np.array([[S[i, j] * d[j] + sa[i] * b[j] + v[i] * k[j] for j in range(N)] for i in range(N)])
    y = np.array([sum(S1[i, j] * r[j] for j in range(N)) for i in range(N)])
    yr, sr = W.reference_forward(x, s0)
    np.testing.assert_allclose(yr[0, 0, 0], y, rtol=1e-13)
    np.testing.assert_allclose(sr[0, 0], S1, rtol=1e-13)


def test_reference_float32_stays_float32():
    rng = np.random.default_rng(3)
    x = make_inputs(rng, 2, 5, 2, 4, dtype=np.float32)
    s0 = make_state(rng, 2, 2, 4, dtype=np.float32)
    y, s = W.reference_forward(x, s0)
    assert y.dtype == np.float32 and s.dtype == np.float32
    g = W.reference_backward(x, s0, np.ones_like(y), np.ones_like(s))
    assert all(v.dtype == np.float32 for v in g.values())
    y64, s64 = W.reference_forward({n: v.astype(np.float64) for n, v in x.items()}, s0.astype(np.float64))
    assert rel_rms(y, y64) < 1e-5 and rel_rms(s, s64) < 1e-5


def test_extreme_decays_stay_finite():
    rng = np.random.default_rng(4)
    x = make_inputs(rng, 1, 40, 1, 4)
    x["w"][:] = 4.0               # decay exp(-e^4) ~ 1e-24
    x["w"][:, ::2] = -8.0         # decay ~ 1 - 3e-4
    s0 = make_state(rng, 1, 1, 4)
    y, s = rwkvops.wkv7(*args(x), state=s0)
    g = W.reference_backward(x, s0, np.ones_like(y), np.ones_like(s))
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(v)) for v in g.values())


# ----------------------------------------------------------------------------- public API on the CPU

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), T=st.one_of(st.sampled_from(T_CASES), st.integers(1, 40)), H=st.integers(1, 4),
       N=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_continuation(B, T, H, N, seed, data):
    rng = np.random.default_rng(seed)
    x = make_inputs(rng, B, T, H, N)
    s0 = make_state(rng, B, H, N)
    split = data.draw(st.integers(0, T))
    y, s = rwkvops.wkv7(*args(x), state=s0)
    if 0 < split < T:
        y1, s1 = rwkvops.wkv7(*(x[n][:, :split] for n in NAMES), state=s0)
        y2, s2 = rwkvops.wkv7(*(x[n][:, split:] for n in NAMES), state=s1)
        np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s2, s, rtol=1e-10, atol=1e-12)
    assert y.shape == (B, T, H, N) and s.shape == (B, H, N, N) and s.dtype == np.float64


def test_t1_and_no_state():
    rng = np.random.default_rng(5)
    x = make_inputs(rng, 3, 1, 2, 4)
    y, s = rwkvops.wkv7(*args(x))
    # from zeros, one step: S = v k^T, y = v (k . r)
    v, k, r = x["v"][:, 0], x["k"][:, 0], x["r"][:, 0]
    np.testing.assert_allclose(s, v[..., :, None] * k[..., None, :], rtol=1e-13)
    np.testing.assert_allclose(y[:, 0], v * np.sum(k * r, -1, keepdims=True), rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(lens=st.lists(st.sampled_from((0, 1, 2, 15, 16, 17, 33)), min_size=1, max_size=4),
       H=st.integers(1, 3), N=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_varlen_equals_separate_calls(lens, H, N, seed):
    rng = np.random.default_rng(seed)
    if sum(lens) == 0:
        lens = lens + [3]
    total = sum(lens)
    x = make_inputs(rng, 1, total, H, N)
    s0 = make_state(rng, len(lens), H, N)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    y, s = rwkvops.wkv7(*args(x), state=s0, cu_seqlens=cu)
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        if hi == lo:
            np.testing.assert_array_equal(s[i], s0[i])
            continue
        yi, si = rwkvops.wkv7(*(x[n][:, lo:hi] for n in NAMES), state=s0[i:i + 1])
        np.testing.assert_allclose(y[:, lo:hi], yi, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s[i:i + 1], si, rtol=1e-12, atol=1e-14)


def test_varlen_backward_equals_separate():
    rng = np.random.default_rng(6)
    lens = [5, 0, 3]
    cu = np.array([0, 5, 5, 8], np.int32)
    x = make_inputs(rng, 1, 8, 2, 3)
    s0 = make_state(rng, 3, 2, 3)
    dy = rng.standard_normal((1, 8, 2, 3))
    ds = rng.standard_normal((3, 2, 3, 3))
    y, s, ctx = rwkvops.forward(W.OP, *args(x), state=s0, cu_seqlens=cu)
    g = rwkvops.backward(ctx, dy, ds)
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        if hi == lo:
            np.testing.assert_array_equal(g["state"][i], ds[i])
            continue
        gi = W.reference_backward({n: x[n][:, lo:hi] for n in NAMES}, s0[i:i + 1], dy[:, lo:hi], ds[i:i + 1])
        for n in NAMES:
            np.testing.assert_allclose(g[n][:, lo:hi], gi[n], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(g["state"][i:i + 1], gi["state"], rtol=1e-12, atol=1e-14)
    assert lens[1] == 0


def test_pool_cpu():
    rng = np.random.default_rng(7)
    x = make_inputs(rng, 3, 4, 2, 3)
    pool = make_state(rng, 5, 2, 3)
    before = pool.copy()
    idx = np.array([3, -1, 0], np.int32)
    y, out = rwkvops.wkv7(*args(x), state=pool, state_indices=idx)
    assert out is pool
    s0 = np.stack([before[3], np.zeros_like(before[0]), before[0]])
    y_ref, s_ref = W.reference_forward(x, s0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(pool[3], s_ref[0], rtol=1e-12)
    np.testing.assert_allclose(pool[0], s_ref[2], rtol=1e-12)
    for untouched in (1, 2, 4):
        np.testing.assert_array_equal(pool[untouched], before[untouched])


def test_torch_cpu_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x = make_inputs(rng, 2, 6, 2, 3)
    s0 = make_state(rng, 2, 2, 3)
    gy = rng.standard_normal((2, 6, 2, 3))
    gs = rng.standard_normal((2, 2, 3, 3))
    tx = {n: torch.tensor(x[n], requires_grad=True) for n in NAMES}
    ts = torch.tensor(s0, requires_grad=True)
    y, s = rwkvops.wkv7(*args(tx), state=ts)
    ((y * torch.tensor(gy)).sum() + (s * torch.tensor(gs)).sum()).backward()
    g = W.reference_backward(x, s0, gy, gs)
    for n in NAMES:
        np.testing.assert_allclose(tx[n].grad.numpy(), g[n], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ts.grad.numpy(), g["state"], rtol=1e-10, atol=1e-12)


def test_validation_errors():
    rng = np.random.default_rng(9)
    x = make_inputs(rng, 2, 3, 2, 4)
    with pytest.raises(ValueError, match="state"):
        rwkvops.wkv7(*args(x), state=np.zeros((2, 2, 4, 3)))
    bad = dict(x, k=x["k"][:, :2])
    with pytest.raises(ValueError, match="'k'"):
        rwkvops.wkv7(*args(bad))


# ----------------------------------------------------------------------------- flash-linear-attention converters

def fla_convention_reference(r, g, k, v, a, b, h0):
    """fla's documented RWKV-7 (DPLR) recurrence, state h [B, H, K, V], log decay g:
    h_t = diag(exp(g_t)) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T,  o_t = h_t^T r_t  (scale 1)."""
    h = h0.copy()
    o = np.empty_like(v)
    for t in range(r.shape[1]):
        ah = np.einsum("bhk,bhkv->bhv", a[:, t], h)
        h = np.exp(g[:, t])[..., None] * h + b[:, t, ..., None] * ah[:, :, None, :] + k[:, t, ..., None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhkv,bhk->bhv", h, r[:, t])
    return o, h


def test_fla_converters_round_trip_and_semantics():
    rng = np.random.default_rng(10)
    x = make_inputs(rng, 2, 7, 3, 4)
    s0 = make_state(rng, 2, 3, 4)
    g, h0 = W.to_fla(x["w"], s0)
    assert g.shape == x["w"].shape and h0.shape == s0.shape
    np.testing.assert_allclose(g, -np.exp(x["w"]))
    np.testing.assert_array_equal(h0, s0.swapaxes(-1, -2))
    w_back, s_back = W.from_fla(g, h0)
    np.testing.assert_allclose(w_back, x["w"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s_back, s0)
    assert W.to_fla(state=s0)[0] is None and W.from_fla(w=g)[1] is None
    o, hT = fla_convention_reference(x["r"], g, x["k"], x["v"], x["a"], x["b"], h0)
    y, sT = rwkvops.wkv7(*args(x), state=s0)
    np.testing.assert_allclose(o, y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(W.from_fla(state=hT)[1], sT, rtol=1e-10, atol=1e-12)


def test_fla_converters_torch():
    torch = pytest.importorskip("torch")
    w = torch.randn(2, 3, 2, 4, dtype=torch.bfloat16)
    s = torch.randn(2, 2, 4, 4)
    g, h = W.to_fla(w, s)
    assert g.dtype == torch.bfloat16 and h.is_contiguous() and torch.equal(h, s.transpose(-1, -2))
    w2, s2 = W.from_fla(g, h)
    assert torch.equal(s2, s)
    assert (w2.float() - w.float()).abs().max() < 0.05


def test_declaration():
    op = rwkvops.get_op("wkv7")
    assert op is W.OP and [a.name for a in op.inputs] == list(NAMES)
    names = set(op.kernels[0].name_expressions)
    for ct in ("float", "__half", "__nv_bfloat16"):
        for n in (32, 64, 128):
            assert f"wkv7_forward<{ct}, {n}>" in names


def test_nvrtc_compiles_every_instantiation():
    pytest.importorskip("cupy")
    from rwkvops._compile import nvrtc_check
    try:
        from cupy.cuda import nvrtc  # noqa: F401
        nvrtc.getVersion()
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"NVRTC unavailable: {exc!r}")
    for arch in ("compute_80", "compute_90"):
        nvrtc_check("wkv7", W.SOURCE, W.NAME_EXPRESSIONS, arch)


# ============================================================================= GPU (marked gpu)

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="no CUDA device")
TOL = {"float32": (1e-5, 1e-4), "float16": (3e-3, 6e-3), "bfloat16": (3e-3, 6e-3)}
DEV = "cuda"


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


@pytest.fixture
def poison():
    """Fill torch's and CuPy's cached free memory with NaN so outputs a kernel forgets to write show up."""
    torch = _torch()
    import cupy
    t = torch.full((48 << 20,), float("nan"), device=DEV)
    del t
    c = cupy.full((48 << 20,), np.nan, dtype=np.float32)
    del c
    yield


def _round(a, dtype):
    """Round float64 NumPy data through ``dtype`` (fp32/fp16/bf16) and back to float64."""
    torch = _torch()
    return torch.tensor(a).to(getattr(torch, dtype)).double().numpy()


def _gpu_case(rng, B, T, H, N, dtype, nstate=None):
    x = make_inputs(rng, B, T, H, N)
    x = {n: _round(v, dtype) for n, v in x.items()}
    s0 = make_state(rng, B if nstate is None else nstate, H, N).astype(np.float32).astype(np.float64)
    return x, s0


def _to_torch(a, dtype, grad=False):
    torch = _torch()
    t = torch.tensor(a, device=DEV).to(getattr(torch, dtype)).contiguous()
    return t.requires_grad_(grad)


def _check_grads(got, ref, tol, what=""):
    for n in (*NAMES, "state"):
        err = rel_rms(got[n], ref[n])
        assert err < tol, f"{what} d{n}: rel RMS {err:.3g} >= {tol}"


def _torch_fwd_bwd(x, s0, gy, gs, dtype, **kw):
    torch = _torch()
    tx = {n: _to_torch(x[n], dtype, True) for n in NAMES}
    ts = _to_torch(s0, "float32", True)
    y, s = rwkvops.wkv7(*args(tx), state=ts, **kw)
    assert y.dtype == getattr(torch, dtype) and s.dtype == torch.float32
    loss = (y.double() * torch.tensor(gy, device=DEV)).sum() + (s.double() * torch.tensor(gs, device=DEV)).sum()
    loss.backward()
    g = {n: tx[n].grad for n in NAMES}
    g["state"] = ts.grad
    for n in NAMES:
        assert g[n].dtype == getattr(torch, dtype)
    return y, s, g


@gpu
@needs_gpu
@pytest.mark.parametrize("N", (32, 64, 128))
@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16"))
def test_gpu_torch_vs_reference(dtype, N, poison):
    rng = np.random.default_rng(100 + N)
    fwd_tol, bwd_tol = TOL[dtype]
    for T in ((1, 17, 65) if N == 128 else (1, 16, 17, 63)):
        B, H = 2, 2
        x, s0 = _gpu_case(rng, B, T, H, N, dtype)
        gy = _round(rng.standard_normal((B, T, H, N)), dtype)
        gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
        y, s, g = _torch_fwd_bwd(x, s0, gy, gs, dtype)
        y_ref, s_ref = W.reference_forward(x, s0)
        assert rel_rms(y, y_ref) < fwd_tol, (T, rel_rms(y, y_ref))
        assert rel_rms(s, s_ref) < fwd_tol, (T, rel_rms(s, s_ref))
        _check_grads(g, W.reference_backward(x, s0, gy, gs), bwd_tol, f"T={T}")
        # the no-grad path (decode kernel for T == 1) must agree too
        with _torch().no_grad():
            y2, s2 = rwkvops.wkv7(*(_to_torch(x[n], dtype) for n in NAMES), state=_to_torch(s0, "float32"))
        assert rel_rms(y2, y_ref) < fwd_tol and rel_rms(s2, s_ref) < fwd_tol


@gpu
@needs_gpu
@pytest.mark.parametrize("T", (1, 15, 16, 17, 63, 65, 200))
def test_gpu_lengths_fp32(T, poison):
    rng = np.random.default_rng(200 + T)
    B, H, N = 2, 3, 64
    x, s0 = _gpu_case(rng, B, T, H, N, "float32")
    gy = rng.standard_normal((B, T, H, N)).astype(np.float32).astype(np.float64)
    gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = _torch_fwd_bwd(x, s0, gy, gs, "float32")
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, s0, gy, gs), 1e-4, f"T={T}")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ("float32", "float16"))
def test_gpu_cupy_forward_backward(dtype, poison):
    import cupy
    rng = np.random.default_rng(300)
    B, T, H, N = 2, 33, 2, 64
    x, s0 = _gpu_case(rng, B, T, H, N, dtype)
    gy = _round(rng.standard_normal((B, T, H, N)), dtype)
    gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    cx = {n: cupy.asarray(x[n].astype(dtype)) for n in NAMES}
    y, s, ctx = rwkvops.forward(W.OP, *args(cx), state=cupy.asarray(s0.astype(np.float32)))
    g = rwkvops.backward(ctx, cupy.asarray(gy.astype(dtype)), cupy.asarray(gs.astype(np.float32)))
    assert isinstance(y, cupy.ndarray) and y.dtype == np.dtype(dtype)
    y_ref, s_ref = W.reference_forward(x, s0)
    fwd_tol, bwd_tol = TOL[dtype]
    assert rel_rms(y, y_ref) < fwd_tol and rel_rms(s, s_ref) < fwd_tol
    _check_grads(g, W.reference_backward(x, s0, gy, gs), bwd_tol)
    # dy / dstate of None count as zeros
    g0 = rwkvops.backward(ctx, None, None)
    assert all(float(cupy.abs(v).max()) == 0.0 for v in g0.values())


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_gpu_varlen_with_empty_sequence(dtype, poison):
    torch = _torch()
    rng = np.random.default_rng(400)
    lens = [17, 0, 1, 40, 16]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    H, N = 2, 64
    x, s0 = _gpu_case(rng, 1, int(cu[-1]), H, N, dtype, nstate=len(lens))
    gy = _round(rng.standard_normal((1, int(cu[-1]), H, N)), dtype)
    gs = rng.standard_normal((len(lens), H, N, N)).astype(np.float32).astype(np.float64)
    for cu_arg in (cu, torch.tensor(cu, device=DEV)):
        y, s, g = _torch_fwd_bwd(x, s0, gy, gs, dtype, cu_seqlens=cu_arg)
        fwd_tol, bwd_tol = TOL[dtype]
        for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
            if hi == lo:
                assert torch.equal(s[i].cpu(), torch.tensor(s0[i], dtype=torch.float32))
                assert torch.equal(g["state"][i].cpu(), torch.tensor(gs[i], dtype=torch.float32))
                continue
            xi = {n: x[n][:, lo:hi] for n in NAMES}
            yr, sr = W.reference_forward(xi, s0[i:i + 1])
            assert rel_rms(y[:, lo:hi], yr) < fwd_tol and rel_rms(s[i:i + 1], sr) < fwd_tol
            gr = W.reference_backward(xi, s0[i:i + 1], gy[:, lo:hi], gs[i:i + 1])
            gi = {n: g[n][:, lo:hi] for n in NAMES}
            gi["state"] = g["state"][i:i + 1]
            _check_grads(gi, gr, bwd_tol, f"seq {i}")


@gpu
@needs_gpu
@pytest.mark.parametrize("T", (1, 5))
def test_gpu_pool(T, poison):
    import cupy
    torch = _torch()
    rng = np.random.default_rng(500 + T)
    B, H, N, P = 6, 2, 64, 9
    x, _ = _gpu_case(rng, B, T, H, N, "float32")
    pool = make_state(rng, P, H, N).astype(np.float32)
    idx = np.array([4, -1, 0, 7, -1, 2], np.int32)
    s0 = np.stack([pool[i] if i >= 0 else np.zeros_like(pool[0]) for i in idx]).astype(np.float64)
    y_ref, s_ref = W.reference_forward(x, s0)
    # CuPy pool, host indices
    cpool = cupy.asarray(pool)
    y, out = rwkvops.wkv7(*(cupy.asarray(x[n].astype(np.float32)) for n in NAMES), state=cpool, state_indices=idx)
    assert out is cpool
    # torch pool, device indices
    tpool = torch.tensor(pool, device=DEV)
    y2, out2 = rwkvops.wkv7(*(_to_torch(x[n], "float32") for n in NAMES), state=tpool,
                            state_indices=torch.tensor(idx, device=DEV))
    for yy, pp in ((y, cpool), (y2, tpool)):
        assert rel_rms(yy, y_ref) < 1e-5
        got = to_numpy(pp)
        for n, slot in enumerate(idx):
            if slot >= 0:
                assert rel_rms(got[slot], s_ref[n]) < 1e-5
        for slot in set(range(P)) - set(idx.tolist()):
            np.testing.assert_array_equal(got[slot], pool[slot])


@gpu
@needs_gpu
def test_gpu_decode_large_batch(poison):
    torch = _torch()
    rng = np.random.default_rng(600)
    B, H, N = 64, 4, 64
    x, s0 = _gpu_case(rng, B, 1, H, N, "bfloat16")
    with torch.no_grad():
        y, s = rwkvops.wkv7(*(_to_torch(x[n], "bfloat16") for n in NAMES), state=_to_torch(s0, "float32"))
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 1e-5


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_gpu_packed_decode_pool(dtype, poison, monkeypatch):
    """Issue #6 decode step: torch pool [P, H, N, N], device int32 cu_seqlens (every length 1) and state_indices with
    -1 slots: the decode kernel runs and equals the reference; then bad device indices raise on check_errors()
    without touching other slots."""
    torch = _torch()
    launched = []
    real = W._launch
    monkeypatch.setattr(W, "_launch", lambda name, *a, **k: (launched.append(name), real(name, *a, **k))[1])
    rng = np.random.default_rng(700)
    S, H, N, P = 7, 4, 64, 11
    x, _ = _gpu_case(rng, 1, S, H, N, dtype)
    pool = make_state(rng, P, H, N).astype(np.float32)
    idx = np.array([9, -1, 0, 4, -1, 10, 2], np.int32)
    tpool = torch.tensor(pool, device=DEV)
    tx = [_to_torch(x[n], dtype) for n in NAMES]
    cu = torch.arange(S + 1, dtype=torch.int32, device=DEV)
    with torch.no_grad():
        y, out = rwkvops.wkv7(*tx, state=tpool, cu_seqlens=cu, state_indices=torch.tensor(idx, device=DEV))
    rwkvops.check_errors()
    assert out is tpool and launched[-1].startswith("wkv7_decode<")
    got = to_numpy(tpool)
    fwd_tol = TOL[dtype][0]
    for s, slot in enumerate(idx):
        s0 = pool[slot:slot + 1] if slot >= 0 else np.zeros_like(pool[:1])
        yr, sr = W.reference_forward({n: x[n][:, s:s + 1] for n in NAMES}, s0.astype(np.float64))
        assert rel_rms(y[:, s:s + 1], yr) < fwd_tol
        if slot >= 0:
            assert rel_rms(got[slot], sr[0]) < 1e-5
    for slot in set(range(P)) - set(idx.tolist()):
        np.testing.assert_array_equal(got[slot], pool[slot])
    # bad device-side slots: reported on the next check, valid slots still written, the rest untouched
    bad = torch.tensor([1, P, -1, -5, 3, 2 ** 30, 5], dtype=torch.int32, device=DEV)
    before = to_numpy(tpool).copy()
    with torch.no_grad():
        rwkvops.wkv7(*tx, state=tpool, cu_seqlens=cu, state_indices=bad)
    with pytest.raises(ValueError, match="state_indices"):
        rwkvops.check_errors()
    rwkvops.check_errors()   # cleared once raised
    after = to_numpy(tpool)
    for slot in set(range(P)) - {1, 3, 5}:
        np.testing.assert_array_equal(after[slot], before[slot])
    for s, slot in ((0, 1), (4, 3), (6, 5)):
        yr, sr = W.reference_forward({n: x[n][:, s:s + 1] for n in NAMES}, before[slot:slot + 1].astype(np.float64))
        assert rel_rms(after[slot], sr[0]) < 1e-5


@gpu
@needs_gpu
def test_gpu_extreme_decays(poison):
    rng = np.random.default_rng(700)
    B, T, H, N = 1, 40, 2, 64
    x, s0 = _gpu_case(rng, B, T, H, N, "float32")
    x["w"][:, ::2] = 4.0      # decay ~1e-24
    x["w"][:, 1::2] = -8.0    # decay ~1 - 3e-4
    gy = rng.standard_normal((B, T, H, N)).astype(np.float32).astype(np.float64)
    gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = _torch_fwd_bwd(x, s0, gy, gs, "float32")
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, s0, gy, gs), 1e-4)


@gpu
@needs_gpu
def test_gpu_continuation(poison):
    torch = _torch()
    rng = np.random.default_rng(800)
    B, T, H, N = 2, 50, 2, 64
    x, s0 = _gpu_case(rng, B, T, H, N, "float32")
    tx = {n: _to_torch(x[n], "float32") for n in NAMES}
    y, s = rwkvops.wkv7(*args(tx), state=_to_torch(s0, "float32"))
    y1, s1 = rwkvops.wkv7(*(tx[n][:, :23].contiguous() for n in NAMES), state=_to_torch(s0, "float32"))
    y2, s2 = rwkvops.wkv7(*(tx[n][:, 23:].contiguous() for n in NAMES), state=s1)
    assert rel_rms(torch.cat([y1, y2], 1), y) < 1e-6 and rel_rms(s2, s) < 1e-6


@gpu
@needs_gpu
def test_gpu_against_fla_chunk_nonzero_state():
    torch = _torch()
    fla = pytest.importorskip("fla.ops.rwkv7")
    rng = np.random.default_rng(900)
    B, T, H, N = 2, 70, 2, 64
    x = make_inputs(rng, B, T, H, N, wlo=-6.0, whi=1.0)
    x = {n: _round(v, "bfloat16") for n, v in x.items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    tx = {n: _to_torch(x[n], "bfloat16") for n in NAMES}
    ts = _to_torch(s0, "float32")
    y, s = rwkvops.wkv7(*args(tx), state=ts)
    g, h0 = W.to_fla(tx["w"], ts)
    o, hT = fla.chunk_rwkv7(tx["r"], g, tx["k"], tx["v"], tx["a"], tx["b"], scale=1.0,
                            initial_state=h0, output_final_state=True)
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 1e-5
    # loose: fla computes in chunks with bf16 matmuls; a layout mistake (e.g. an untransposed state) is O(1)
    assert rel_rms(o, y_ref) < 5e-2, rel_rms(o, y_ref)
    assert rel_rms(W.from_fla(state=hT)[1], s_ref) < 5e-2
    assert rel_rms(o, y) < 5e-2


# ============================================================================= CPU emulation of the CUDA kernels
# The real cuda_src/wkv7.cu, compiled as C++ with a tiny CUDA shim: one std::thread per CUDA thread, std::barrier
# for __syncthreads, blocks run one after another (so `__shared__` becomes `static`).  It checks the kernels'
# indexing, chunking, varlen/pool logic and the launchers' arguments on machines without a GPU (needs g++ with
# C++20).  It says nothing about warp-level timing or memory-model races (the GPU tests and compute-sanitizer do).

_EMU_SHIM = r'''
#pragma once
#include <cmath>
#include <cstring>
#include <cstdint>
#include <thread>
#include <barrier>
#include <vector>
#include <memory>
#include <atomic>
#include <algorithm>
#include <mutex>
struct __half { _Float16 x; };
inline float __half2float(__half h) { return (float)h.x; }
inline __half __float2half_rn(float f) { __half h; h.x = (_Float16)f; return h; }
struct __nv_bfloat16 { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.x << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); __nv_bfloat16 h; h.x = (uint16_t)(u >> 16); return h; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __expf expf
#define __fdividef(x, y) ((x) / (y))
#define __align__(n) __attribute__((aligned(n)))
struct dim3s { unsigned x, y, z; };
thread_local dim3s threadIdx, blockIdx;
dim3s gridDim, blockDim;
std::barrier<>* g_bar;
float* g_dyn;
std::vector<float> g_x;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline __half __ushort_as_half(unsigned short u) { __half h; memcpy(&h, &u, 2); return h; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.x = u; return h; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
std::barrier<>* g_wbar[32];   // one per warp: __syncwarp, shuffles and the mma fragment exchange
inline void __syncwarp(unsigned = 0xffffffffu) { g_wbar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off, int = 32) {   // every lane of the warp calls it together
    int t = threadIdx.x; g_x[t] = v; __syncwarp(); float r = g_x[t ^ off]; __syncwarp(); return r; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
std::atomic<int> g_or{0};
inline int __syncthreads_or(int p) {
    __syncthreads(); if (p) g_or.store(1); __syncthreads(); int r = g_or.load(); __syncthreads();
    if (threadIdx.x == 0) g_or.store(0);   // the next call's stores come after its first barrier
    return r; }
// named barriers (bar.sync with a thread count), created at first use in each block
std::mutex g_nb_mu;
std::barrier<>* g_nb[16];
inline std::barrier<>* emu_nbar(int id, int n) {
    std::lock_guard<std::mutex> lk(g_nb_mu);
    if (!g_nb[id]) g_nb[id] = new std::barrier<>(n);
    return g_nb[id]; }
inline void rwkv_emu_bar_sync(int id, int n) { emu_nbar(id, n)->arrive_and_wait(); }
MMA_EMU
using std::min;
template <class F> void emu_run(int grid, int block, size_t dyn, F f) {
    std::vector<float> dynbuf(dyn / 4 + 16, NAN);
    g_dyn = dynbuf.data();
    g_dyn_floats = (long)(dyn / 4);
    gridDim = {(unsigned)grid, 1, 1}; blockDim = {(unsigned)block, 1, 1};
    g_x.assign(block, 0.f);
    for (int b = 0; b < grid; ++b) {
        for (int i = 0; i < 16; ++i) { delete g_nb[i]; g_nb[i] = nullptr; }
        std::barrier<> bar(block); g_bar = &bar;
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        for (int w = 0; w * 32 < block; ++w) {
            wb.emplace_back(new std::barrier<>(std::min(32, block - 32 * w))); g_wbar[w] = wb.back().get(); }
        std::vector<std::thread> th;
        for (int t = 0; t < block; ++t)
            th.emplace_back([&, b, t] { blockIdx = {(unsigned)b, 0, 0}; threadIdx = {(unsigned)t, 0, 0}; f(); });
        for (auto& x : th) x.join();
    }
}
'''.replace("MMA_EMU", cuda_emulation.MMA_EMU)

_EMU_DRIVER = r'''
#define P_(i) ((void*)a[i])
#define I_(i) ((int)(int64_t)a[i])
#define L_(i) ((long long)a[i])
template <typename T, int N> void fwd(const uint64_t* a, int grid, int blk) {
  if (blk != FwdCfg<N>::NT) {
    emu_run(grid, blk, 0, [&]{ wkv7_forward<T, N, 1>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(T*)P_(6),(const int*)P_(7), I_(8), L_(9), (const float*)P_(10), (float*)P_(11),
     (const int*)P_(12), I_(13), (int*)P_(14), (float*)P_(15), I_(16), I_(17)); });
    return; }
  emu_run(grid, blk, 0, [&]{ wkv7_forward<T, N>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(T*)P_(6),(const int*)P_(7), I_(8), L_(9), (const float*)P_(10), (float*)P_(11),
     (const int*)P_(12), I_(13), (int*)P_(14), (float*)P_(15), I_(16), I_(17)); }); }
template <typename T, int N> void dec(const uint64_t* a, int grid, int blk) {
  emu_run(grid, blk, 0, [&]{ wkv7_decode<T, N>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(T*)P_(6),(const int*)P_(7), I_(8), L_(9), (const float*)P_(10), (float*)P_(11),
     (const int*)P_(12), I_(13), (int*)P_(14), I_(15)); }); }
template <typename T, int N> void bwd_rows(const uint64_t* a, int grid, int blk, size_t smem) {
  emu_run(grid, blk, smem, [&]{ wkv7_backward<T, N>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(const T*)P_(6),(T*)P_(7),(T*)P_(8),(T*)P_(9),(T*)P_(10),(T*)P_(11),(T*)P_(12),
     (const int*)P_(13), I_(14), L_(15), (const float*)P_(16), (float*)P_(17), (const int*)P_(18), I_(19), (int*)P_(20),
     (const float*)P_(21), (float*)P_(22), I_(23), I_(24), (const float*)P_(25), (const int*)P_(26)); }); }
template <typename T, int N> void bwd(const uint64_t* a, int grid, int blk, size_t smem) {
  emu_run(grid, blk, smem, [&]{ wkv7_backward_l2<T, N>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(const T*)P_(6),(T*)P_(7),(T*)P_(8),(T*)P_(9),(T*)P_(10),(T*)P_(11),(T*)P_(12),
     (const int*)P_(13), I_(14), L_(15), (const float*)P_(16), (float*)P_(17), (const int*)P_(18), I_(19), (int*)P_(20),
     (const float*)P_(21), (float*)P_(22), I_(23), I_(24)); }); }
template <typename T, int N, int M> void tcc(const uint64_t* a, int grid, int blk, size_t smem) {
  if (smem != (size_t)TcCfg<N, M>::SMEM_FLOATS * 4 || blk != TcCfg<N, M>::NT) std::abort();   // launcher mismatch
  emu_run(grid, blk, smem, [&]{ wkv7_tc_chunk<T, N, M>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(T*)P_(6), I_(7), I_(8), I_(9), I_(10), (const float*)P_(11), (float*)P_(12),
     (const int*)P_(13), I_(14), (int*)P_(15), (float*)P_(16), (float*)P_(17), I_(18)); }); }
template <typename T, int N, int M> void tcw(const uint64_t* a, int grid, int blk, size_t smem) {
  if (smem != (size_t)WyCfg<N, M>::SMEM_FLOATS * 4 || blk != WyCfg<N, M>::NT) std::abort();   // launcher mismatch
  emu_run(grid, blk, smem, [&]{ wkv7_tc_wy<T, N, M>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(T*)P_(6), I_(7), I_(8), I_(9), I_(10), (const float*)P_(11), (float*)P_(12),
     (const int*)P_(13), I_(14), (int*)P_(15), (float*)P_(16), (float*)P_(17), I_(18)); }); }
template <typename T, int N> void tcw_any(int mode, const uint64_t* a, int grid, int blk, size_t smem) {
  if (mode == 0) tcw<T, N, 0>(a, grid, blk, smem); else if (mode == 1) tcw<T, N, 1>(a, grid, blk, smem);
  else if (mode == 2) tcw<T, N, 2>(a, grid, blk, smem); else tcw<T, N, 3>(a, grid, blk, smem); }
template <typename T, int N, int NW, int ST> void tcb(const uint64_t* a, int grid, int blk, size_t smem) {
  float mild; const uint32_t mb = (uint32_t)a[18]; std::memcpy(&mild, &mb, 4);
  emu_run(grid, blk, smem, [&]{ wkv7_tc_bwd<T, N, NW, ST>((const T*)P_(0),(const T*)P_(1),(const T*)P_(2),(const T*)P_(3),
     (const T*)P_(4),(const T*)P_(5),(const T*)P_(6),(T*)P_(7),(T*)P_(8),(T*)P_(9),(T*)P_(10),(T*)P_(11),(T*)P_(12),
     I_(13), I_(14), (const float*)P_(15), (const float*)P_(16), (int*)P_(17), mild, I_(19)); }); }
template <int N> void tcs(const uint64_t* a, int grid, int blk) {
  emu_run(grid, blk, 0, [&]{ wkv7_tc_scan<N>((float*)P_(0), I_(1), I_(2), (const float*)P_(3), (float*)P_(4),
     (const int*)P_(5), I_(6), (int*)P_(7), I_(8)); }); }
#define DISP_TC(T) \
  if (kind == 4) { if (N == 32) tcc<T, 32, 0>(a, grid, blk, smem); else tcc<T, 64, 0>(a, grid, blk, smem); } \
  else if (kind == 5) { if (N == 32) tcc<T, 32, 1>(a, grid, blk, smem); else tcc<T, 64, 1>(a, grid, blk, smem); } \
  else if (kind == 6) { if (N == 32) tcc<T, 32, 2>(a, grid, blk, smem); else tcc<T, 64, 2>(a, grid, blk, smem); } \
  else if (kind == 10) { if (N == 32) tcc<T, 32, 3>(a, grid, blk, smem); else tcc<T, 64, 3>(a, grid, blk, smem); } \
  else if (N == 32) { if (blk == 128) tcb<T, 32, 4, 2>(a, grid, blk, smem); else tcb<T, 32, 8, 2>(a, grid, blk, smem); } \
  else if (strip == 4) { if (blk == 256) tcb<T, 64, 8, 4>(a, grid, blk, smem); else tcb<T, 64, 16, 4>(a, grid, blk, smem); } \
  else { if (blk == 256) tcb<T, 64, 8, 2>(a, grid, blk, smem); else tcb<T, 64, 16, 2>(a, grid, blk, smem); }
#define DISP(T) \
  if (kind >= 4) { DISP_TC(T) } else \
  if (kind == 0) { if (N == 32) fwd<T, 32>(a, grid, blk); else if (N == 64) fwd<T, 64>(a, grid, blk); else fwd<T, 128>(a, grid, blk); } \
  else if (kind == 1) { if (N == 32) dec<T, 32>(a, grid, blk); else if (N == 64) dec<T, 64>(a, grid, blk); else dec<T, 128>(a, grid, blk); } \
  else if (kind == 2) { if (N == 32) bwd_rows<T, 32>(a, grid, blk, smem); else bwd_rows<T, 64>(a, grid, blk, smem); } \
  else { if (N == 32) bwd<T, 32>(a, grid, blk, smem); else if (N == 64) bwd<T, 64>(a, grid, blk, smem); else bwd<T, 128>(a, grid, blk, smem); }
extern "C" void emu(int kind, int dt, int N, const uint64_t* a, int grid, int blk, long smem, int strip) {
  if (kind == 8) { if (N == 32) tcs<32>(a, grid, blk); else tcs<64>(a, grid, blk); return; }
  if (kind >= 11) {   // wkv7_tc_wy, mode kind - 11 (16-bit types only)
    if (dt == 1) { if (N == 32) tcw_any<__half, 32>(kind - 11, a, grid, blk, smem); else tcw_any<__half, 64>(kind - 11, a, grid, blk, smem); }
    else { if (N == 32) tcw_any<__nv_bfloat16, 32>(kind - 11, a, grid, blk, smem); else tcw_any<__nv_bfloat16, 64>(kind - 11, a, grid, blk, smem); }
    return; }
  if (dt == 0) { DISP(float) } else if (dt == 1) { DISP(__half) } else { DISP(__nv_bfloat16) }
}
'''


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    import ctypes
    from rwkvops._compile import read_source
    cxx = cuda_emulation.cxx_or_skip()
    d = tmp_path_factory.mktemp("wkv7_emu")
    src = read_source(W.SOURCE)   # common.cuh inlined
    src = "\n".join(l for l in src.splitlines() if not l.strip().startswith("#include <cuda_"))
    src = src.replace("extern __shared__ __align__(16) float smem[];", "float* smem = g_dyn;")
    src = src.replace("__shared__", "static")
    (d / "emu.cpp").write_text(_EMU_SHIM + src + _EMU_DRIVER)
    so = d / "libemu.so"
    # RWKVOPS_EMU_TSAN=1: build with ThreadSanitizer (test_emulated_wy_kernel_is_race_free runs that in a subprocess)
    tsan = ["-g", "-fsanitize=thread"] if os.environ.get("RWKVOPS_EMU_TSAN") == "1" else []
    res = subprocess.run([cxx, "-std=c++20", "-O1", *tsan, "-fPIC", "-shared", "-o", str(so), str(d / "emu.cpp"),
                          "-lpthread"], capture_output=True, text=True)
    if res.returncode != 0:
        if "barrier" in res.stderr or "_Float16" in res.stderr:
            pytest.skip("C++ compiler lacks <barrier>/_Float16 for the kernel emulation")
        raise AssertionError("emulation build failed:\n" + res.stderr[-4000:])
    lib = ctypes.CDLL(str(so))
    lib.emu.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                        ctypes.c_long, ctypes.c_int]
    return lib


class _EmuCall:
    def __init__(self, dtype, dims, seqs):
        self.dtype, self.dims, self.seqs = dtype, dims, seqs

    @staticmethod
    def empty(shape, dt):   # poisoned: NaN (bf16 NaN bits for bf16)
        if dt == "bfloat16":
            return np.full(shape, 0x7FC1, np.uint16)
        return np.full(shape, np.nan, np.dtype(dt))


def _bf16_enc(a):
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_dec(u):
    return (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _enc(a, dt):
    return _bf16_enc(a) if dt == "bfloat16" else np.ascontiguousarray(np.asarray(a).astype(dt))


def _dec(a, dt):
    return _bf16_dec(a) if dt == "bfloat16" else a.astype(np.float64)


@pytest.fixture
def emu(emu_lib, monkeypatch):
    """``run(x, s0, dt, B, T, H, cu=None, idx=None, pool=None, save=True, dy=None, ds=None)`` through the real
    launchers (gpu_forward/gpu_backward) and the emulated kernels; returns float64 NumPy results."""
    import rwkvops._gpu as G
    from rwkvops._gpu import Seqs
    err = np.zeros(1, np.int32)
    monkeypatch.setattr(G, "ptr", lambda a: np.uint64(0) if a is None else np.uint64(a.ctypes.data))
    monkeypatch.setattr(G, "error_ptr", lambda: np.uint64(err.ctypes.data))
    monkeypatch.setattr(W, "_bwd_blocks", lambda items, N: min(items, 3))   # exercise the grid-stride loop
    monkeypatch.setattr(W, "_smem_optin", lambda: 227 * 1024)                # as on an H100
    # forward rows per thread: RT = 1 for grids of fewer than 8 blocks (as on a GPU with 4 SMs), else RT = 4
    monkeypatch.setattr(W, "_fwd_rt", lambda blocks: 4 if blocks >= 8 else 1)
    monkeypatch.setattr(W, "_device_sms", lambda: 4)                         # chunked path: segments as on 4 SMs
    launches = []

    def fake_launch(name, grid, block, args, shared_mem=0):
        import re
        assert name in W.NAME_EXPRESSIONS, name
        a = np.array([(int(np.float32(v).view(np.uint32)) if isinstance(v, (float, np.floating)) else int(v))
                      & 0xFFFFFFFFFFFFFFFF for v in args], dtype=np.uint64)
        launches.append(name)
        ms = re.match(r"wkv7_tc_scan<(\d+)>$", name)
        if ms:
            assert int(block[0]) == 256
            emu_lib.emu(8, 0, int(ms.group(1)), a.ctypes.data, int(grid[0]), int(block[0]), 0, 0)
            return
        m = re.match(r"wkv7_(\w+)<(\w+), (\d+)(?:, (\d+))?(?:, (\d+))?>$", name)
        assert m, name
        if m.group(1) == "forward":   # block size must match the instantiation (the driver picks it by block)
            assert int(block[0]) == W.FWD_NT[int(m.group(4) or 4)], (name, block)
        if m.group(1) == "tc_wy":
            assert int(block[0]) == W._wy_threads(int(m.group(3)), int(m.group(4))), (name, block)
            assert int(shared_mem) == W._wy_smem(int(m.group(3)), int(m.group(4))), (name, shared_mem)
            kind = 11 + int(m.group(4))
        elif m.group(1) == "tc_chunk":
            assert int(block[0]) == W._tc_threads(int(m.group(3)), int(m.group(4))), (name, block)
            assert int(shared_mem) == W._tc_smem(int(m.group(3)), int(m.group(4))), (name, shared_mem)
            kind = {0: 4, 1: 5, 2: 6, 3: 10}[int(m.group(4))]
        elif m.group(1) == "tc_bwd":
            assert int(block[0]) == 32 * int(m.group(4)) == W._tc_bwd_threads(int(m.group(3))), (name, block)
            assert int(shared_mem) == W._tc_bwd_smem(int(m.group(3))), (name, shared_mem)
            kind = 7
        else:
            kind = {"forward": 0, "decode": 1, "backward": 2, "backward_l2": 3}[m.group(1)]
        dt = {"float": 0, "__half": 1, "__nv_bfloat16": 2}[m.group(2)]
        emu_lib.emu(kind, dt, int(m.group(3)), a.ctypes.data, int(grid[0]), int(block[0]), int(shared_mem),
                    int(m.group(5) or 0))
    monkeypatch.setattr(W, "_launch", fake_launch)

    def run(x, s0, dt, B, T, H, cu=None, idx=None, pool=None, save=True, dy=None, ds=None, expect_err=0):
        N = x["r"].shape[-1]
        num = B if cu is None else len(cu) - 1
        seqs = Seqs(num=num, T=0 if cu is not None else T, total=B * T,
                    cu_seqlens=None if cu is None else np.asarray(cu, np.int32),
                    state_idx=None if idx is None else np.asarray(idx, np.int32),
                    pool_size=(pool.shape[0] if pool is not None else (0 if s0 is None else s0.shape[0])))
        call = _EmuCall(dt, {"B": B, "T": T, "H": H, "N": N}, seqs)
        xe = {n: _enc(x[n], dt) for n in NAMES}
        if pool is not None:
            sin = sout = pool
        else:
            sin = None if s0 is None else np.ascontiguousarray(s0.astype(np.float32))
            sout = call.empty((num, H, N, N), "float32")
        y, saved = W.gpu_forward(call, xe, sin, sout, save)
        out = [_dec(y, dt), sout.astype(np.float64)]
        if save:
            g = W.gpu_backward(call, xe, sin, saved, None if dy is None else _enc(dy, dt),
                               None if ds is None else np.ascontiguousarray(ds.astype(np.float32)))
            out.append({n: g[n].astype(np.float64) if n == "state" else _dec(g[n], dt) for n in g})
        code, err[0] = err[0], 0
        assert code == expect_err, f"error word {code}, expected {expect_err}"
        return out
    run.launches = launches
    return run


def _rounded(rng, B, T, H, N, dt, nstate=None):
    x = {n: _dec(_enc(v, dt), dt) for n, v in make_inputs(rng, B, T, H, N).items()}
    s0 = make_state(rng, B if nstate is None else nstate, H, N).astype(np.float32).astype(np.float64)
    return x, s0


@pytest.mark.parametrize("dt,N,T", [("float32", 32, 17), ("float32", 64, 33), ("bfloat16", 64, 5),
                                    ("float16", 32, 16), ("float32", 128, 18)], ids=str)
def test_emulated_kernels_dense(emu, dt, N, T):
    rng = np.random.default_rng(N + T)
    B, H = 2, 2
    x, s0 = _rounded(rng, B, T, H, N, dt)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    fwd_tol, bwd_tol = (1e-5, 1e-4) if dt == "float32" else (3e-3, 6e-3)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    ct = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}[dt]
    assert emu.launches[-2:] == [f"wkv7_forward<{ct}, {N}>",
                                 f"wkv7_backward{'' if W.BWD_ROWS[N] else '_l2'}<{ct}, {N}>"]
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < fwd_tol and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, s0, dy, ds), bwd_tol)
    y2, s2 = emu(x, s0, dt, B, T, H, save=False)
    assert rel_rms(y2, y_ref) < fwd_tol and rel_rms(s2, s_ref) < 1e-5


@pytest.mark.parametrize("N", (32, 64, 128))
def test_emulated_decode(emu, N):
    rng = np.random.default_rng(N)
    x, s0 = _rounded(rng, 3, 1, 2, N, "bfloat16")
    y, s = emu(x, s0, "bfloat16", 3, 1, 2, save=False)
    assert emu.launches[-1] == f"wkv7_decode<__nv_bfloat16, {N}>"
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 1e-5
    y, s = emu(x, None, "bfloat16", 3, 1, 2, save=False)
    y_ref, s_ref = W.reference_forward(x, np.zeros_like(s0))
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 1e-5


@pytest.mark.parametrize("T", (1, 5))
def test_emulated_pool(emu, T):
    rng = np.random.default_rng(T)
    B, H, N, P = 4, 2, 64, 6
    x, _ = _rounded(rng, B, T, H, N, "float32")
    pool = make_state(rng, P, H, N).astype(np.float32)
    before = pool.copy()
    idx = np.array([3, -1, 0, 5], np.int32)
    s0 = np.stack([before[i] if i >= 0 else np.zeros_like(before[0]) for i in idx]).astype(np.float64)
    y, _ = emu(x, None, "float32", B, T, H, idx=idx, pool=pool, save=False)
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 1e-5
    for n, slot in enumerate(idx):
        if slot >= 0:
            assert rel_rms(pool[slot], s_ref[n]) < 1e-5
    for slot in (1, 2, 4):
        np.testing.assert_array_equal(pool[slot], before[slot])


def _pool_case(rng, S, H, N, P, dt):
    """Packed one-token step of S sequences (cu_seqlens = 0..S) and a pool of P slots."""
    x, _ = _rounded(rng, 1, S, H, N, dt)
    pool = make_state(rng, P, H, N).astype(np.float32)
    return x, pool, np.arange(S + 1, dtype=np.int32)


def _check_pool_step(x, before, pool, idx, y, tol, lens=None):
    """y and pool after a packed step against the reference, sequence by sequence: slot idx[s] (or zeros for -1 and
    bad slots) in, written back only to valid slots; every other slot bit-identical."""
    S = len(idx)
    lens = [1] * S if lens is None else lens
    cu = np.concatenate([[0], np.cumsum(lens)])
    P = before.shape[0]
    for s, slot in enumerate(idx):
        lo, hi = cu[s], cu[s + 1]
        s0 = before[slot:slot + 1] if 0 <= slot < P else np.zeros_like(before[:1])
        if hi == lo:
            if 0 <= slot < P:
                np.testing.assert_array_equal(pool[slot], before[slot])
            continue
        yr, sr = W.reference_forward({n: x[n][:, lo:hi] for n in NAMES}, s0.astype(np.float64))
        assert rel_rms(y[:, lo:hi], yr) < tol, (s, rel_rms(y[:, lo:hi], yr))
        if 0 <= slot < P:
            assert rel_rms(pool[slot], sr[0]) < 1e-5, s
    for slot in set(range(P)) - {int(i) for i in idx}:
        np.testing.assert_array_equal(pool[slot], before[slot])


@pytest.mark.parametrize("dt,N", [("float32", 64), ("bfloat16", 64), ("float16", 32), ("float32", 128)], ids=str)
def test_emulated_packed_decode_pool(emu, dt, N):
    """Issue #6: a packed call with every length 1 over a pool (-1 slots included) runs the decode kernel and equals
    the reference; slots not named stay bit-identical."""
    rng = np.random.default_rng(N)
    S, H, P = 5, 2, 8
    x, pool, cu = _pool_case(rng, S, H, N, P, dt)
    before = pool.copy()
    idx = np.array([6, -1, 0, 3, -1], np.int32)
    y, _ = emu(x, None, dt, 1, S, H, cu=cu, idx=idx, pool=pool, save=False)
    ct = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}[dt]
    assert emu.launches[-1] == f"wkv7_decode<{ct}, {N}>"
    _check_pool_step(x, before, pool, idx, y, 1e-5 if dt == "float32" else 3e-3)
    # the training forward (save) keeps the checkpointing kernel
    y2, s2, _ = emu(x, before[:S].astype(np.float64), dt, 1, S, H, cu=cu, save=True)
    assert emu.launches[-2].startswith("wkv7_forward")


def test_emulated_packed_decode_bad_device_index(emu):
    """Out-of-range device-side slots (P, -2, huge) set the error word, read zeros and write nothing: no memory
    outside the pool is touched, and the valid sequences of the same launch are still exact."""
    from rwkvops._gpu import ERR_BAD_STATE_INDEX
    rng = np.random.default_rng(21)
    S, H, N, P = 5, 2, 64, 4
    x, pool, cu = _pool_case(rng, S, H, N, P, "float32")
    guard = np.concatenate([make_state(rng, 1, H, N).astype(np.float32), pool,
                            make_state(rng, 1, H, N).astype(np.float32)])   # a slot of canary on either side
    pool = guard[1:1 + P]
    before = guard.copy()
    idx = np.array([1, P, -2, 2 ** 30, 3], np.int32)
    y, _ = emu(x, None, "float32", 1, S, H, cu=cu, idx=idx, pool=pool, save=False, expect_err=ERR_BAD_STATE_INDEX)
    assert emu.launches[-1] == "wkv7_decode<float, 64>"
    np.testing.assert_array_equal(guard[0], before[0])
    np.testing.assert_array_equal(guard[-1], before[-1])
    _check_pool_step(x, before[1:1 + P], pool, idx, y, 1e-5)


def test_emulated_packed_decode_uneven_lengths(emu):
    """total == number of sequences does not mean every length is 1 (device cu_seqlens can't be read without a
    sync): lengths 0 and 2 still give exact results through the decode kernel's loop."""
    rng = np.random.default_rng(22)
    lens = [1, 0, 2, 1, 0, 2, 1]
    S, H, N, P = len(lens), 2, 32, 9
    T = sum(lens)
    assert T == S
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    x, _ = _rounded(rng, 1, T, H, N, "float32")
    pool = make_state(rng, P, H, N).astype(np.float32)
    before = pool.copy()
    idx = np.array([8, 2, -1, 0, 5, 7, 1], np.int32)
    y, _ = emu(x, None, "float32", 1, T, H, cu=cu, idx=idx, pool=pool, save=False)
    assert emu.launches[-1] == "wkv7_decode<float, 32>"
    _check_pool_step(x, before, pool, idx, y, 1e-5, lens=lens)


@pytest.mark.parametrize("dt", ("float32", "float16"))
def test_emulated_varlen_grads(emu, dt):
    rng = np.random.default_rng(11)
    lens = [17, 0, 1, 40, 0, 16]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    H, N, T, S = 2, 32, int(cu[-1]), len(lens)
    x, s0 = _rounded(rng, 1, T, H, N, dt, nstate=S)
    dy = _dec(_enc(rng.standard_normal((1, T, H, N)), dt), dt)
    ds = rng.standard_normal((S, H, N, N)).astype(np.float32).astype(np.float64)
    fwd_tol, bwd_tol = (1e-5, 1e-4) if dt == "float32" else (3e-3, 6e-3)
    for gdy, gds in ((dy, ds), (None, ds), (dy, None)):
        y, s, g = emu(x, s0, dt, 1, T, H, cu=cu, dy=gdy, ds=gds)
        ddy = np.zeros_like(dy) if gdy is None else gdy
        dds = np.zeros_like(ds) if gds is None else gds
        for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
            if hi == lo:
                np.testing.assert_array_equal(s[i], s0[i])
                np.testing.assert_array_equal(g["state"][i], dds[i])
                continue
            xi = {n: x[n][:, lo:hi] for n in NAMES}
            y_ref, s_ref = W.reference_forward(xi, s0[i:i + 1])
            assert rel_rms(y[:, lo:hi], y_ref) < fwd_tol and rel_rms(s[i:i + 1], s_ref) < 1e-5
            gr = W.reference_backward(xi, s0[i:i + 1], ddy[:, lo:hi], dds[i:i + 1])
            gi = {n: g[n][:, lo:hi] for n in NAMES}
            gi["state"] = g["state"][i:i + 1]
            _check_grads(gi, gr, bwd_tol, f"seq {i}")


def test_emulated_extreme_decays_and_null_state(emu):
    rng = np.random.default_rng(12)
    B, T, H, N = 2, 20, 2, 64
    x, s0 = _rounded(rng, B, T, H, N, "float32")
    x["w"][:, ::2] = 4.0
    x["w"][:, 1::2] = -8.0
    dy = rng.standard_normal((B, T, H, N)).astype(np.float32).astype(np.float64)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, "float32", B, T, H, dy=dy, ds=ds)
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 1e-4)
    z = np.zeros_like(s0)
    y, s, g = emu(x, None, "float32", B, T, H, dy=dy)
    y_ref, s_ref = W.reference_forward(x, z)
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, z, dy, z), 1e-4)


def test_emulated_misaligned_state_is_refused(emu):
    from rwkvops._gpu import Seqs
    B, T, H, N = 1, 3, 1, 32
    x = {n: np.zeros((B, T, H, N), np.float32) for n in NAMES}
    buf = np.zeros(H * N * N + 1, np.float32)
    bad = buf[1:].reshape(B, H, N, N)            # 4 bytes past a 16-byte boundary
    if bad.ctypes.data % 16 == 0:
        pytest.skip("allocator gave an unexpected alignment")
    call = _EmuCall("float32", {"B": B, "T": T, "H": H, "N": N}, Seqs(num=B, T=T, total=B * T, pool_size=B))
    with pytest.raises(ValueError, match="16-byte aligned"):
        W.gpu_forward(call, x, bad, call.empty((B, H, N, N), "float32"), False)


@pytest.mark.parametrize("dt", ("float32", "bfloat16"))
def test_emulated_unaligned_inputs_use_scalar_loads(emu, dt):
    """Input views that are not 16-byte aligned take the forward's element-by-element staging path."""
    from rwkvops._gpu import Seqs
    rng = np.random.default_rng(13)
    B, T, H, N = 2, 21, 2, 64
    x, s0 = _rounded(rng, B, T, H, N, dt)
    y_ref, s_ref = W.reference_forward(x, s0)
    call = _EmuCall(dt, {"B": B, "T": T, "H": H, "N": N}, Seqs(num=B, T=T, total=B * T, pool_size=B))
    xe = {}
    for n in NAMES:
        e = _enc(x[n], dt)
        buf = np.empty(e.size + 1, e.dtype)
        view = buf[1:].reshape(e.shape)
        view[...] = e
        assert view.ctypes.data % 16 != 0
        xe[n] = view
    sout = call.empty((B, H, N, N), "float32")
    y, _ = W.gpu_forward(call, xe, np.ascontiguousarray(s0.astype(np.float32)), sout, False)
    assert emu.launches[-1].startswith("wkv7_forward")
    tol = 1e-5 if dt == "float32" else 3e-3
    assert rel_rms(_dec(y, dt), y_ref) < tol and rel_rms(sout.astype(np.float64), s_ref) < 1e-5


@pytest.mark.parametrize("rows", (True, False), ids=("rows", "l2"))
@pytest.mark.parametrize("N,T", [(64, 41), (32, 35)], ids=str)
def test_emulated_backward_kernels(emu, monkeypatch, rows, N, T):
    """Both backward kernels (row layout with shared-memory sub-chunks, and the global-scratch one) on lengths with
    partial chunks and partial sub-chunks, bf16, zero and non-zero initial state."""
    monkeypatch.setitem(W.BWD_ROWS, N, rows)
    rng = np.random.default_rng(T)
    B, H, dt = 2, 3, "bfloat16"
    x, s0 = _rounded(rng, B, T, H, N, dt)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    assert emu.launches[-1] == f"wkv7_backward{'' if rows else '_l2'}<__nv_bfloat16, {N}>"
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 6e-3)
    y, s, g = emu(x, None, dt, B, T, H, dy=dy)
    z = np.zeros_like(s0)
    _check_grads(g, W.reference_backward(x, z, dy, z), 6e-3)


@pytest.mark.parametrize("N,T", [(32, 37), (64, 21), (128, 9)], ids=str)
def test_emulated_forward_one_row_per_thread(emu, monkeypatch, N, T):
    """The forward's RT = 1 variant (4-warp blocks, picked for grids that underfill the GPU): dense with
    checkpoints (+ backward), without, zero-length varlen sequences, and a pool with -1 slots."""
    monkeypatch.setattr(W, "_fwd_rt", lambda blocks: 1)
    rng = np.random.default_rng(N + 7 * T)
    B, H, dt = 2, 2, "float32"
    x, s0 = _rounded(rng, B, T, H, N, dt)
    dy = rng.standard_normal((B, T, H, N)).astype(np.float32).astype(np.float64)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    assert emu.launches[-2] == f"wkv7_forward<float, {N}, 1>"
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 1e-4)
    y, s = emu(x, None, dt, B, T, H, save=False)
    y_ref, s_ref = W.reference_forward(x, np.zeros_like(s0))
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    # varlen with empty sequences (B = 1 packing of the two sequences around two empty ones)
    lens = [0, T, 0, T]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    xv = {n: np.concatenate([x[n][0:1], x[n][1:2]], axis=1) for n in NAMES}
    sv = np.concatenate([s0[:1], s0, s0[1:]])
    y, s = emu(xv, sv, dt, 1, 2 * T, H, cu=cu, save=False)
    for i, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        if hi == lo:
            np.testing.assert_array_equal(s[i], sv[i])
            continue
        yr, sr = W.reference_forward({n: xv[n][:, lo:hi] for n in NAMES}, sv[i:i + 1])
        assert rel_rms(y[:, lo:hi], yr) < 1e-5 and rel_rms(s[i:i + 1], sr) < 1e-5
    # pool, one -1 slot
    pool = make_state(rng, 3, H, N).astype(np.float32)
    before = pool.copy()
    idx = np.array([2, -1], np.int32)
    y, _ = emu(x, None, dt, B, T, H, idx=idx, pool=pool, save=False)
    y_ref, s_ref = W.reference_forward(x, np.stack([before[2], np.zeros_like(before[0])]).astype(np.float64))
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(pool[2], s_ref[0]) < 1e-5
    np.testing.assert_array_equal(pool[:2], before[:2])


# ----------------------------------------------------------------------------- chunked (tensor-core) forward, emulated

@pytest.mark.parametrize("dt,N,T,nseg,wr", [("float32", 64, 37, 1, "model"), ("bfloat16", 32, 50, 3, "wide"),
                                             ("float32", 32, 70, 2, "model"), ("bfloat16", 64, 33, 2, "model"),
                                             ("float32", 32, 20, 1, "wide")], ids=str)
def test_emulated_chunked_forward(emu, monkeypatch, dt, N, T, nseg, wr):
    """wkv7_tc_chunk (one segment, or segments: transitions + wkv7_tc_scan + outputs) against the reference, with a
    partial last chunk, an initial state, and the checkpoints it writes for the (unchanged) backward.  w: "model"
    (in [-5.5, -0.5] as models make it: every chunk takes the factorized tensor-core path) or "wide" ([-8, 4]:
    mostly the pairwise path of chunks with a strong decay)."""
    monkeypatch.setattr(W, "FORWARD_PATH", "chunked")
    monkeypatch.setattr(W, "TC_NSEG", nseg)
    rng = np.random.default_rng(N + T)
    B, H = 2, 1
    lo, hi = (-5.5, -0.5) if wr == "model" else (-8.0, 4.0)
    x = {n: _dec(_enc(v, dt), dt) for n, v in make_inputs(rng, B, T, H, N, wlo=lo, whi=hi).items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    fwd_tol, bwd_tol = (1e-5, 1e-4) if dt == "float32" else (3e-3, 6e-3)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    ct = {"float32": "float", "bfloat16": "__nv_bfloat16"}[dt]
    tcn = [W._tc_kernel(ct, N, mode)[0] for mode in (0, 1)]
    want = [tcn[0]] if nseg == 1 else [tcn[1], f"wkv7_tc_scan<{N}>", tcn[0]]
    assert emu.launches[-1 - len(want):-1] == want
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < fwd_tol and rel_rms(s, s_ref) < (1e-5 if dt == "float32" else 3e-3)
    _check_grads(g, W.reference_backward(x, s0, dy, ds), bwd_tol)


@pytest.mark.parametrize("wy", (True, False))
def test_emulated_chunked_16bit_with_and_without_wy(emu, monkeypatch, wy):
    """16-bit I/O through wkv7_tc_wy (TC_WY, opt-in) or wkv7_tc_chunk (the default), segments and the adjoint
    included."""
    monkeypatch.setattr(W, "FORWARD_PATH", "chunked")
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    monkeypatch.setattr(W, "TC_WY", wy)
    monkeypatch.setattr(W, "TC_NSEG", 2)
    monkeypatch.setattr(W, "TC_BWD_NSEG", 2)
    rng = np.random.default_rng(21)
    B, T, H, N, dt = 1, 40, 1, 32, "bfloat16"
    x = {n: _dec(_enc(v, dt), dt) for n, v in make_inputs(rng, B, T, H, N, wlo=-5.5, whi=-0.5).items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    kern = "wkv7_tc_wy" if wy else "wkv7_tc_chunk"
    assert any(n.startswith("wkv7_tc_wy") for n in emu.launches) == wy
    assert f"{kern}<__nv_bfloat16, 32, 1>" in emu.launches and f"{kern}<__nv_bfloat16, 32, 3>" in emu.launches
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 3e-3
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 6e-3)


@pytest.mark.parametrize("wy", (True, False), ids=("wy", "chunk"))
@pytest.mark.parametrize("N", (32, 64))
def test_emulated_chunked_16bit_strong_decays(emu, monkeypatch, wy, N):
    """As above with w in [-8, 4]: most chunks decay below exp(-TC_SAFE_SPAN) and take the pairwise intra-chunk
    matrices (wkv7_tc_wy's producers and wkv7_tc_chunk), forward, transitions and adjoint."""
    monkeypatch.setattr(W, "FORWARD_PATH", "chunked")
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    monkeypatch.setattr(W, "TC_WY", wy)
    monkeypatch.setattr(W, "TC_NSEG", 2)
    monkeypatch.setattr(W, "TC_BWD_NSEG", 2)
    rng = np.random.default_rng(22 + N)
    B, T, H, dt = 1, 40, 1, "bfloat16"
    x = {n: _dec(_enc(v, dt), dt) for n, v in make_inputs(rng, B, T, H, N, wlo=-8.0, whi=4.0).items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    assert any(n.startswith("wkv7_tc_wy") for n in emu.launches) == wy
    y_ref, s_ref = W.reference_forward(x, s0)
    assert rel_rms(y, y_ref) < 3e-3 and rel_rms(s, s_ref) < 3e-3
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 6e-3)


def test_emulated_wy_kernel_is_race_free():
    """The producer/consumer hand-off of wkv7_tc_wy under ThreadSanitizer: the emulated 16-bit chunked run above
    (every pass of the kernel: forward, transitions, adjoint) built with -fsanitize=thread, one OS thread per CUDA
    thread and the named barriers as std::barrier, in a subprocess with libtsan preloaded.  compute-sanitizer's
    racecheck reports hazards between the stage writes and reads of this kernel on the GPU (why TC_WY is off);
    ThreadSanitizer does flag them when the consumers read the wrong stage (checked by hand: 8 reports)."""
    cxx = cuda_emulation.cxx_or_skip()
    lib = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(lib):
        pytest.skip("the C++ compiler has no ThreadSanitizer runtime")
    env = dict(os.environ, RWKVOPS_EMU_TSAN="1", LD_PRELOAD=lib,
               TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 history_size=4")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
                          "-k", "test_emulated_chunked_16bit_with_and_without_wy and True"],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(here), timeout=1800)
    out = res.stdout + res.stderr
    assert "ThreadSanitizer" not in out, out[-6000:]
    assert res.returncode == 0 and "1 passed" in out, out[-3000:]


def test_emulated_chunked_extreme_decays_and_pool(emu, monkeypatch):
    """Chunks whose decays multiply below exp(-30) (w = 4: log decay -54.6 per token) take the pairwise path, others
    the factorized one; fp32 exact to 1e-5.  Then a pool with a -1 slot, one segment and two."""
    monkeypatch.setattr(W, "FORWARD_PATH", "chunked")
    rng = np.random.default_rng(5)
    B, T, H, N = 2, 40, 1, 32
    x, s0 = _rounded(rng, B, T, H, N, "float32")
    x["w"][:, 16:32] = np.where(rng.random((B, 16, H, N)) < 0.5, 4.0, -8.0)   # the second chunk: unsafe
    x["w"][:, 32:] = -8.0                                                     # the third: no decay at all
    y_ref, s_ref = W.reference_forward(x, s0)
    for nseg in (1, 2):
        monkeypatch.setattr(W, "TC_NSEG", nseg)
        y, s = emu(x, s0, "float32", B, T, H, save=False)
        assert rel_rms(y, y_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5, nseg
        pool = make_state(rng, 3, H, N).astype(np.float32)
        before = pool.copy()
        idx = np.array([2, -1], np.int32)
        y, _ = emu(x, None, "float32", B, T, H, idx=idx, pool=pool, save=False)
        yr, sr = W.reference_forward(x, np.stack([before[2], np.zeros_like(before[0])]).astype(np.float64))
        assert rel_rms(y, yr) < 1e-5 and rel_rms(pool[2], sr[0]) < 1e-5, nseg
        np.testing.assert_array_equal(pool[:2], before[:2])


def test_chunked_path_selection(monkeypatch):
    """Auto: chunked for dense T >= TC_MIN_T and N in TC_HEAD_SIZES; recurrent for varlen, short T, N = 128;
    one segment when the (sequence, head) blocks fill the GPU, else about TC_BLOCKS_PER_SM blocks per SM."""
    from rwkvops._gpu import Seqs
    monkeypatch.setattr(W, "_device_sms", lambda: 132)

    def call(num, T, N, cu=None):
        return _EmuCall("bfloat16", {"H": 32, "N": N}, Seqs(num=num, T=T, total=num * T, cu_seqlens=cu))
    assert W._use_chunked(call(8, 4096, 64)) and W._use_chunked(call(1, W.TC_MIN_T, 32))
    assert not W._use_chunked(call(8, W.TC_MIN_T - 1, 64)) and not W._use_chunked(call(8, 4096, 128))
    assert not W._use_chunked(call(1, 4096, 64, cu=np.array([0, 4096], np.int32)))
    assert W._tc_segments(8, 32, 4096) == 1 and W._tc_segments(4, 32, 1024) == 1
    assert W._tc_segments(1, 32, 16384) == 8 and W._tc_segments(1, 32, 1024) == 4
    assert W._tc_segments(1, 4, 16384) == 64   # capped by TC_SEG_MIN tokens per segment
    # the chunked backward: where the forward is chunked and the row backward (its per-chunk mode) fits
    monkeypatch.setattr(W, "_smem_optin", lambda: 227 * 1024)
    assert W._use_chunked_bwd(call(8, 4096, 64)) and W._use_chunked_bwd(call(1, W.TC_MIN_T, 32))
    assert not W._use_chunked_bwd(call(8, W.TC_MIN_T - 1, 64)) and not W._use_chunked_bwd(call(8, 4096, 128))
    assert not W._use_chunked_bwd(call(1, 4096, 64, cu=np.array([0, 4096], np.int32)))
    monkeypatch.setattr(W, "_smem_optin", lambda: 163 * 1024)   # A100: the row backward does not fit
    assert not W._use_chunked_bwd(call(8, 4096, 64))


def _spy_launches(monkeypatch):
    names = []
    orig = W._launch

    def spy(name, *a, **kw):
        names.append(name)
        return orig(name, *a, **kw)
    monkeypatch.setattr(W, "_launch", spy)
    return names


@gpu
@needs_gpu
@pytest.mark.parametrize("nseg", (1, 3, None), ids=("one-segment", "three-segments", "auto"))
@pytest.mark.parametrize("dtype,N", [("float32", 64), ("bfloat16", 64), ("float16", 32), ("bfloat16", 32)], ids=str)
def test_gpu_chunked_vs_reference(dtype, N, nseg, poison, monkeypatch):
    """The chunked forward (T = 300 >= TC_MIN_T: auto) with one segment, three, or the automatic count, decays over
    the whole range and as models make them, non-zero initial state; fwd+bwd through its checkpoints, and no-grad."""
    monkeypatch.setattr(W, "TC_NSEG", nseg)
    launches = _spy_launches(monkeypatch)
    rng = np.random.default_rng(1000 + N)
    fwd_tol, bwd_tol = TOL[dtype]
    B, T, H = 2, 300, 2
    for lo, hi in ((-8.0, 4.0), (-5.5, -0.5)):
        x = {n: _round(v, dtype) for n, v in make_inputs(rng, B, T, H, N, wlo=lo, whi=hi).items()}
        s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
        gy = _round(rng.standard_normal((B, T, H, N)), dtype)
        gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
        y, s, g = _torch_fwd_bwd(x, s0, gy, gs, dtype)
        y_ref, s_ref = W.reference_forward(x, s0)
        assert rel_rms(y, y_ref) < fwd_tol and rel_rms(s, s_ref) < fwd_tol, (lo, rel_rms(y, y_ref), rel_rms(s, s_ref))
        _check_grads(g, W.reference_backward(x, s0, gy, gs), bwd_tol, f"w in [{lo}, {hi}]")
        with _torch().no_grad():
            y2, s2 = rwkvops.wkv7(*(_to_torch(x[n], dtype) for n in NAMES), state=_to_torch(s0, "float32"))
        assert rel_rms(y2, y_ref) < fwd_tol and rel_rms(s2, s_ref) < fwd_tol
    assert any(n.startswith(("wkv7_tc_chunk", "wkv7_tc_wy")) for n in launches)
    assert not any(n.startswith("wkv7_forward") for n in launches)
    if nseg == 3:
        assert any(n.startswith("wkv7_tc_scan") for n in launches)


@gpu
@needs_gpu
@pytest.mark.parametrize("nseg", (1, 2))
def test_gpu_chunked_pool(nseg, poison, monkeypatch):
    """Dense call over a pool with a -1 slot through the chunked forward: slots read and written in place."""
    torch = _torch()
    monkeypatch.setattr(W, "TC_NSEG", nseg)
    rng = np.random.default_rng(1100 + nseg)
    B, T, H, N = 3, 260, 2, 64
    x, _ = _gpu_case(rng, B, T, H, N, "float32")
    pool = make_state(rng, 5, H, N).astype(np.float32)
    idx = np.array([4, -1, 1], np.int32)
    tp = torch.tensor(pool, device=DEV)
    with torch.no_grad():
        y, _ = rwkvops.wkv7(*(_to_torch(x[n], "float32") for n in NAMES), state=tp,
                            state_indices=torch.tensor(idx, device=DEV))
    s0 = np.stack([pool[4], np.zeros_like(pool[0]), pool[1]]).astype(np.float64)
    y_ref, s_ref = W.reference_forward(x, s0)
    got = tp.cpu().numpy()
    assert rel_rms(y, y_ref) < 1e-5 and rel_rms(got[4], s_ref[0]) < 1e-5 and rel_rms(got[1], s_ref[2]) < 1e-5
    np.testing.assert_array_equal(got[[0, 2, 3]], pool[[0, 2, 3]])


# ----------------------------------------------------------------------------- chunked (tensor-core) backward, emulated

@pytest.mark.parametrize("dt,N,T,wr,fwd,bseg", [("float32", 64, 50, "model", "chunked", 3),
                                               ("bfloat16", 32, 17, "model", "chunked", 1),
                                               ("bfloat16", 64, 48, "mixed", "recurrent", 2),
                                               ("float32", 32, 33, "wide", "chunked", 2),
                                               ("float16", 32, 40, "model", "recurrent", 1)], ids=str)
def test_emulated_chunked_backward(emu, monkeypatch, dt, N, T, wr, fwd, bseg):
    """The chunked backward (wkv7_tc_chunk<.., 2> adjoint checkpoints, wkv7_tc_bwd, wkv7_backward's per-chunk mode for
    the chunks with a strong decay) against the float64 reference gradients: partial last chunks, non-zero initial
    state and final-state gradient; w "model" ([-5.5, -0.5]: every chunk on tensor cores), "wide" ([-8, 4]: every
    chunk exact per chunk), "mixed" (one chunk with w up to 4, one with w = -8).  bseg: time segments of the adjoint
    pass (> 1: transitions <.., 3>, the reverse wkv7_tc_scan, then <.., 2> per segment)."""
    monkeypatch.setattr(W, "FORWARD_PATH", fwd)
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    monkeypatch.setattr(W, "TC_BWD_NSEG", bseg)
    rng = np.random.default_rng(3 * N + T)
    B, H = 2, 1
    lo, hi = (-5.5, -0.5) if wr != "wide" else (-8.0, 4.0)
    x = make_inputs(rng, B, T, H, N, wlo=lo, whi=hi)
    if wr == "mixed":
        x["w"][:, 16:32] = rng.uniform(-8.0, 4.0, (B, 16, H, N))
        x["w"][:, 32:] = -8.0
    x = {n: _dec(_enc(v, dt), dt) for n, v in x.items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    fwd_tol, bwd_tol = (1e-5, 1e-4) if dt == "float32" else (3e-3, 6e-3)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    ct = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}[dt]
    assert emu.launches[-3:] == [W._tc_kernel(ct, N, 2)[0], W._tc_bwd_name(ct, N),
                                 f"wkv7_backward<{ct}, {N}>"]
    seg_kernels = [W._tc_kernel(ct, N, 3)[0], f"wkv7_tc_scan<{N}>"]
    assert (emu.launches[-5:-3] == seg_kernels) == (bseg > 1), emu.launches
    _check_grads(g, W.reference_backward(x, s0, dy, ds), bwd_tol, wr)
    # no final-state gradient, zero initial state
    y, s, g = emu(x, None, dt, B, T, H, dy=dy)
    z = np.zeros_like(s0)
    _check_grads(g, W.reference_backward(x, z, dy, z), bwd_tol, wr + ", no state")


def test_emulated_chunked_backward_all_exact(emu, monkeypatch):
    """BWD_MILD = 0: every chunk goes to the exact per-chunk recurrence (the list of wkv7_tc_bwd); only a final-state
    gradient (dy None)."""
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    monkeypatch.setattr(W, "BWD_MILD", 0.0)
    rng = np.random.default_rng(11)
    B, T, H, N, dt = 2, 37, 2, 32, "float32"
    x, s0 = _rounded(rng, B, T, H, N, dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = emu(x, s0, dt, B, T, H, ds=ds)
    assert emu.launches[-2:] == [W._tc_bwd_name("float", 32), "wkv7_backward<float, 32>"]
    _check_grads(g, W.reference_backward(x, s0, np.zeros((B, T, H, N)), ds), 1e-4)


@pytest.mark.parametrize("dt,N,st", [("bfloat16", 64, 4), ("float32", 32, 2), ("float32", 64, 4)], ids=str)
def test_emulated_chunked_backward_other_warps(emu, monkeypatch, dt, N, st):
    """wkv7_tc_bwd with the other compiled warp count (TC_BWD_WARP_OPTIONS) and strip st: the same gradients up to
    rounding."""
    nw = [o for o in W.TC_BWD_WARP_OPTIONS[N] if o != W.TC_BWD_WARPS[N]][0]
    monkeypatch.setitem(W.TC_BWD_STRIP, N, st)
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    rng = np.random.default_rng(5 * N)
    B, T, H = 1, 37, 2
    x = make_inputs(rng, B, T, H, N, wlo=-5.5, whi=-0.5)
    x = {n: _dec(_enc(v, dt), dt) for n, v in x.items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    dy = _dec(_enc(rng.standard_normal((B, T, H, N)), dt), dt)
    ds = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    monkeypatch.setitem(W.TC_BWD_WARPS, N, nw)
    y, s, g = emu(x, s0, dt, B, T, H, dy=dy, ds=ds)
    ct = {"float32": "float", "bfloat16": "__nv_bfloat16"}[dt]
    assert f"wkv7_tc_bwd<{ct}, {N}, {nw}, {st}>" in emu.launches
    _check_grads(g, W.reference_backward(x, s0, dy, ds), 1e-4 if dt == "float32" else 6e-3, f"{nw} warps")


@gpu
@needs_gpu
@pytest.mark.parametrize("fwd,mild,nw,bseg,st", [("recurrent", None, None, None, None), ("chunked", 0.0, None, None, None),
                                                 ("chunked", None, 8, 1, 4), ("chunked", None, 16, 3, 2)],
                         ids=("recurrent-fwd", "all-exact", "w8-strip4", "w16-adjoint-segments"))
def test_gpu_chunked_backward_variants(fwd, mild, nw, bseg, st, poison, monkeypatch):
    """The chunked backward after the recurrent forward (same checkpoints), with every chunk sent to the exact
    per-chunk recurrence (BWD_MILD = 0), and wkv7_tc_bwd at each compiled warp count, the adjoint pass in one or 3
    time segments; bf16, T = 300 (a partial last chunk), decays as models make them."""
    monkeypatch.setattr(W, "FORWARD_PATH", fwd)
    monkeypatch.setattr(W, "BACKWARD_PATH", "chunked")
    if bseg is not None:
        monkeypatch.setattr(W, "TC_BWD_NSEG", bseg)
    if mild is not None:
        monkeypatch.setattr(W, "BWD_MILD", mild)
    if nw is not None:
        monkeypatch.setitem(W.TC_BWD_WARPS, 64, nw)
    if st is not None:
        monkeypatch.setitem(W.TC_BWD_STRIP, 64, st)
    launches = _spy_launches(monkeypatch)
    rng = np.random.default_rng(1200)
    B, T, H, N, dtype = 2, 300, 2, 64, "bfloat16"
    x = {n: _round(v, dtype) for n, v in make_inputs(rng, B, T, H, N, wlo=-5.5, whi=-0.5).items()}
    s0 = make_state(rng, B, H, N).astype(np.float32).astype(np.float64)
    gy = _round(rng.standard_normal((B, T, H, N)), dtype)
    gs = rng.standard_normal((B, H, N, N)).astype(np.float32).astype(np.float64)
    y, s, g = _torch_fwd_bwd(x, s0, gy, gs, dtype)
    _check_grads(g, W.reference_backward(x, s0, gy, gs), TOL[dtype][1], fwd)
    assert any(n.startswith("wkv7_tc_bwd") for n in launches)
    assert any(n.endswith(", 3>") for n in launches) == (bseg is not None and bseg > 1)
