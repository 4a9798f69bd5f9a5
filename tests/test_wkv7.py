"""RWKV-7 WKV: the NumPy reference (finite differences, continuation, varlen, pools, fla converters) on the CPU,
and the CUDA kernels against it on the GPU (marked ``gpu``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rwkvops
from rwkvops.ops import wkv7 as W
from rwkvops.testing import has_gpu, rel_rms, to_numpy

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

def _loss(x, s0, dy, ds):
    y, s1 = W.reference_forward(x, s0)
    return float(np.sum(dy * y) + np.sum(ds * s1))


@pytest.mark.parametrize("B,T,H,N", [(1, 1, 1, 3), (2, 4, 1, 3), (1, 5, 2, 2)], ids=lambda v: str(v))
def test_reference_backward_finite_differences(B, T, H, N):
    rng = np.random.default_rng(1)
    x = make_inputs(rng, B, T, H, N, wlo=-3.0, whi=1.0)
    s0 = make_state(rng, B, H, N)
    dy = rng.standard_normal((B, T, H, N))
    ds = rng.standard_normal((B, H, N, N))
    g = W.reference_backward(x, s0, dy, ds)
    eps = 1e-6
    for name in (*NAMES, "state"):
        base = s0 if name == "state" else x[name]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            if name == "state":
                fp, fm = _loss(x, plus, dy, ds), _loss(x, minus, dy, ds)
            else:
                fp, fm = _loss({**x, name: plus}, s0, dy, ds), _loss({**x, name: minus}, s0, dy, ds)
            fd[idx] = (fp - fm) / (2 * eps)
        assert g[name].shape == base.shape
        np.testing.assert_allclose(g[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)


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
    t = torch.full((48 << 20,), float("nan"), device="cuda")
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
    t = torch.tensor(a, device="cuda").to(getattr(torch, dtype)).contiguous()
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
    loss = (y.double() * torch.tensor(gy, device="cuda")).sum() + (s.double() * torch.tensor(gs, device="cuda")).sum()
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
    for cu_arg in (cu, torch.tensor(cu, device="cuda")):
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
    tpool = torch.tensor(pool, device="cuda")
    y2, out2 = rwkvops.wkv7(*(_to_torch(x[n], "float32") for n in NAMES), state=tpool,
                            state_indices=torch.tensor(idx, device="cuda"))
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
    assert rel_rms(o, y_ref) < 3e-2, rel_rms(o, y_ref)
    assert rel_rms(W.from_fla(state=hT)[1], s_ref) < 3e-2
    assert rel_rms(o, y) < 3e-2
