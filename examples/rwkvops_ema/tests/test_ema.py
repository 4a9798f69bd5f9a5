"""Tests of the rwkvops-ema plugin, through its public API and rwkvops.testing only.

Run after ``pip install -e examples/rwkvops_ema``: the op must be found through the ``rwkvops.ops`` entry point.
"""
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest

import rwkvops
import rwkvops_ema
from rwkvops import testing
from rwkvops._compile import nvrtc_check
from rwkvops_ema import ema, reference_backward, reference_forward


def _inputs(B=2, T=7, H=3, N=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, H, N))
    w = rng.uniform(-6, 2, (B, T, H, N))
    g = rng.standard_normal((H, N))
    s = rng.standard_normal((B, H, N))
    return tuple(a.astype(dtype) for a in (x, w, g, s))


# ---------------------------------------------------------------- discovery

def test_entry_point_is_declared():
    eps = [ep for ep in entry_points(group="rwkvops.ops") if ep.name == "ema"]
    assert len(eps) == 1 and eps[0].value == "rwkvops_ema:OP", eps


def test_found_through_registry():
    op = rwkvops.get_op("ema")
    assert op is rwkvops_ema.OP
    assert "ema" in rwkvops.list_ops()
    assert op.gpu_forward is not None and op.gpu_backward is not None and op.kernels
    assert op.reduce_batch == ("g",)


def test_discovered_without_importing_the_plugin_and_reimport_is_safe():
    # A fresh process that never imports rwkvops_ema itself: rwkvops must load it through the entry point.
    # Then reloading the module (registration runs again) must not fail.
    code = ("import sys, importlib, rwkvops\n"
            "assert 'rwkvops_ema' not in sys.modules\n"
            "op = rwkvops.get_op('ema')\n"
            "mod = sys.modules['rwkvops_ema']\n"
            "assert op is mod.OP\n"
            "importlib.reload(mod)\n"
            "assert rwkvops.get_op('ema') is mod.OP\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(rwkvops.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ---------------------------------------------------------------- the NumPy reference (the oracle)

def test_reference_gradients_by_finite_differences():
    x, w, g, s = _inputs(B=2, T=4, H=1, N=2)
    inputs = dict(x=x, w=w, g=g)
    rng = np.random.default_rng(1)
    dy, ds = rng.standard_normal(x.shape), rng.standard_normal(s.shape)

    testing.finite_difference_check(reference_forward, reference_backward, inputs, s, dy, ds, rtol=1e-6, atol=1e-8)

def test_reference_matches_the_formula_by_hand():
    x, w, g, s = _inputs(B=1, T=3, H=2, N=2)
    y, s1 = reference_forward(dict(x=x, w=w, g=g), s)
    S = s[0].copy()
    for t in range(3):
        S = S * np.exp(-np.exp(w[0, t])) + x[0, t]
        np.testing.assert_allclose(y[0, t], S * g, rtol=1e-14)
    np.testing.assert_allclose(s1[0], S, rtol=1e-14)


# ---------------------------------------------------------------- CPU path through rwkvops

CPU_DIMS = [dict(B=2, T=17, H=2, N=8), dict(B=1, T=1, H=1, N=3), dict(B=3, T=33, H=3, N=5)]


@pytest.mark.parametrize("dims", CPU_DIMS, ids=lambda d: "B{B}T{T}H{H}N{N}".format(**d))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
def test_check_op_cpu(backend, dtype, dims):
    if backend == "torch-cpu":
        pytest.importorskip("torch")
    errs = testing.check_op("ema", backend=backend, dtype=dtype, dims=dims)
    assert errs["y"] <= testing.TOLERANCES[dtype][0]


def test_public_function_numpy_and_continuation():
    x, w, g, s = _inputs(B=2, T=9)
    y, s1 = ema(x, w, g, s)
    ry, rs = reference_forward(dict(x=x, w=w, g=g), s)
    np.testing.assert_allclose(y, ry, rtol=1e-12)
    np.testing.assert_allclose(s1, rs, rtol=1e-12)
    ya, sa = ema(x[:, :4], w[:, :4], g, state=s)
    yb, sb = ema(x[:, 4:], w[:, 4:], g, state=sa)
    np.testing.assert_allclose(np.concatenate([ya, yb], axis=1), ry, rtol=1e-12)
    np.testing.assert_allclose(sb, rs, rtol=1e-12)
    y0, _ = ema(x, w, g)                     # state=None is zeros
    np.testing.assert_allclose(y0, reference_forward(dict(x=x, w=w, g=g), np.zeros_like(s))[0], rtol=1e-12)


def test_public_function_pool_cpu():
    x, w, g, _ = _inputs(B=1, T=9, dtype=np.float32)
    pool = np.random.default_rng(3).standard_normal((5, 3, 4)).astype(np.float32)
    before = pool.copy()
    y, out = ema(x, w, g, state=pool, cu_seqlens=[0, 4, 4, 9, 9], state_indices=[3, 1, -1, 0])
    assert out is pool
    ry0, rs0 = reference_forward(dict(x=x[:, :4], w=w[:, :4], g=g), before[3:4])
    ry2, _ = reference_forward(dict(x=x[:, 4:], w=w[:, 4:], g=g), np.zeros_like(before[:1]))
    np.testing.assert_allclose(pool[3], rs0[0], rtol=1e-5)
    np.testing.assert_array_equal(pool[1], before[1])        # zero-length sequence: slot unchanged
    np.testing.assert_array_equal(pool[0], before[0])        # zero-length sequence: slot unchanged
    np.testing.assert_array_equal(pool[[2, 4]], before[[2, 4]])
    np.testing.assert_allclose(y, np.concatenate([ry0, ry2], axis=1), rtol=1e-5)


def test_torch_cpu_autograd_matches_reference():
    torch = pytest.importorskip("torch")
    x, w, g, s = _inputs(B=2, T=5, H=2, N=3)
    ts = [torch.tensor(a, requires_grad=True) for a in (x, w, g, s)]
    y, s1 = ema(*ts)
    assert y.dtype == torch.float64 and s1.dtype == torch.float64
    rng = np.random.default_rng(2)
    dy, ds = rng.standard_normal(x.shape), rng.standard_normal(s.shape)
    ((y * torch.tensor(dy)).sum() + (s1 * torch.tensor(ds)).sum()).backward()
    ref = reference_backward(dict(x=x, w=w, g=g), s, dy, ds)
    for k, t in zip(("x", "w", "g", "state"), ts):
        np.testing.assert_allclose(t.grad.numpy(), ref[k], rtol=1e-12, atol=1e-14, err_msg=k)


# ---------------------------------------------------------------- kernels compile (NVRTC, no GPU needed)

@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_every_instantiation(arch):
    (kern,) = rwkvops.get_op("ema").kernels
    assert os.path.isabs(kern.source) and os.path.isfile(kern.source)
    assert len(kern.name_expressions) == 9            # 3 kernels x (float, __half, __nv_bfloat16)
    ptx = nvrtc_check("ema", kern.source, kern.name_expressions, arch)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert ptx.count(".entry") == len(kern.name_expressions)
    assert ".local" not in ptx                         # no local-memory spills in these one-thread loops


# ---------------------------------------------------------------- GPU (skipped without one)

GPU_DIMS = [dict(B=2, T=17, H=2, N=8), dict(B=1, T=1, H=1, N=1), dict(B=3, T=16, H=3, N=5),
            dict(B=2, T=15, H=1, N=64), dict(B=1, T=65, H=3, N=100), dict(B=4, T=63, H=4, N=64),
            dict(B=2, T=300, H=2, N=33)]
_ids = lambda d: "B{B}T{T}H{H}N{N}".format(**d)  # noqa: E731


@pytest.mark.gpu
@pytest.mark.parametrize("dims", GPU_DIMS, ids=_ids)
@pytest.mark.parametrize("backend", ["cupy", "torch-cuda"])
def test_check_op_gpu_float32(backend, dims):
    if backend == "torch-cuda":
        pytest.importorskip("torch")
    for seed in (0, 1):
        testing.check_op("ema", backend=backend, dtype="float32", dims=dims, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dims", GPU_DIMS, ids=_ids)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_check_op_gpu_half(dtype, dims):
    pytest.importorskip("torch")
    testing.check_op("ema", backend="torch-cuda", dtype=dtype, dims=dims)


@pytest.mark.gpu
@pytest.mark.parametrize("w_range", [(-8.0, -4.0), (-4.0, 0.0), (0.0, 4.0)])
def test_check_op_gpu_decay_ranges(w_range):
    testing.check_op("ema", backend="cupy", dtype="float32", dims=dict(B=2, T=65, H=2, N=16), w_range=w_range)


@pytest.mark.gpu
def test_gpu_pool_in_place_with_empty_and_unused_slots():
    import cupy
    x, w, g, _ = _inputs(B=1, T=40, H=2, N=33, seed=5, dtype=np.float32)
    rng = np.random.default_rng(6)
    pool = rng.standard_normal((6, 2, 33)).astype(np.float32)
    cu = [0, 7, 7, 20, 40]
    idx = [4, 0, -1, 2]
    y_ref, pool_ref = ema(x, w, g, state=pool.copy(), cu_seqlens=cu, state_indices=idx)   # CPU path
    for cu_arg, idx_arg in ((cu, idx), (cupy.asarray(cu, dtype=cupy.int32), cupy.asarray(idx, dtype=cupy.int32))):
        pool_d = cupy.asarray(pool)
        y, out = ema(*(cupy.asarray(a) for a in (x, w, g)), state=pool_d, cu_seqlens=cu_arg, state_indices=idx_arg)
        assert out is pool_d
        rwkvops.check_errors()
        assert testing.rel_rms(y, y_ref) < 1e-5
        np.testing.assert_allclose(pool_d.get(), pool_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(pool_d.get()[[0, 1, 3, 5]], pool[[0, 1, 3, 5]])   # untouched / empty


@pytest.mark.gpu
def test_gpu_bad_device_cu_seqlens_sets_the_error_word():
    import cupy
    x, w, g, _ = (cupy.asarray(a) for a in _inputs(B=1, T=7, dtype=np.float32))
    ema(x, w, g, cu_seqlens=cupy.asarray([0, 5, 3, 7], dtype=cupy.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        rwkvops.check_errors()
    rwkvops.check_errors()                                # cleared


@pytest.mark.gpu
def test_gpu_dg_is_deterministic():
    import cupy
    x, w, g, s = _inputs(B=64, T=33, H=2, N=40, seed=7, dtype=np.float32)
    args = [cupy.asarray(a) for a in (x, w, g)]
    st = cupy.asarray(s)
    rng = np.random.default_rng(8)
    dy = cupy.asarray(rng.standard_normal(x.shape).astype(np.float32))
    ds = cupy.asarray(rng.standard_normal(s.shape).astype(np.float32))
    grads = []
    for _ in range(3):
        _, _, ctx = rwkvops.forward(rwkvops.get_op("ema"), *args, state=st)
        grads.append(rwkvops.backward(ctx, dy, ds))
    for k in grads[0]:
        for other in grads[1:]:
            assert bool((grads[0][k] == other[k]).all()), k
    ref = reference_backward(dict(x=x.astype(np.float64), w=w.astype(np.float64), g=g.astype(np.float64)),
                             s.astype(np.float64), dy.get().astype(np.float64), ds.get().astype(np.float64))
    for k in ref:
        assert testing.rel_rms(grads[0][k], ref[k]) < 1e-4, k


@pytest.mark.gpu
def test_gpu_backward_without_upstream_gradients_and_state():
    import cupy
    x, w, g, _ = _inputs(B=2, T=10, dtype=np.float32)
    args = [cupy.asarray(a) for a in (x, w, g)]
    _, _, ctx = rwkvops.forward(rwkvops.get_op("ema"), *args)
    grads = rwkvops.backward(ctx)                          # dy = dstate = None: all gradients zero
    for k, v in grads.items():
        assert bool((v == 0).all()), k


@pytest.mark.gpu
def test_torch_cuda_autograd_without_state_and_long_sequence():
    torch = pytest.importorskip("torch")
    x, w, g, _ = _inputs(B=2, T=1000, H=2, N=48, seed=9, dtype=np.float32)
    ts = [torch.tensor(a, device="cuda", requires_grad=True) for a in (x, w, g)]
    y, s = ema(*ts)
    dy = torch.randn_like(y)
    ((y * dy).sum() + s.sum()).backward()
    x64 = dict(x=x.astype(np.float64), w=w.astype(np.float64), g=g.astype(np.float64))
    s0 = np.zeros((2, 2, 48))
    ry, rs = reference_forward(x64, s0)
    ref = reference_backward(x64, s0, testing.to_numpy(dy), np.ones_like(s0))
    assert testing.rel_rms(y, ry) < 1e-5 and testing.rel_rms(s, rs) < 1e-5
    for k, t in zip(("x", "w", "g"), ts):
        assert testing.rel_rms(t.grad, ref[k]) < 1e-4, k
