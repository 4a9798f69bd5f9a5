"""The lean host path of inference calls: cached validation plans (CPU) and launch views instead of CuPy arrays for
torch CUDA tensors (GPU, marked ``gpu``).  Every check must still fire on the call that breaks it."""
from __future__ import annotations

import numpy as np
import pytest

import rwkvops
from rwkvops import _arrays, _validate
from rwkvops.testing import has_gpu, rel_rms, to_numpy

NAMES = ("r", "w", "k", "v", "a", "b")


def _x(B=1, T=1, H=2, N=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((B, T, H, N)).astype(dtype) * 0.3 for n in NAMES}
    x["w"] = -np.abs(x["w"]) - 0.5
    return x


def test_plan_is_cached_per_signature_and_errors_still_raise():
    op = rwkvops.get_op("wkv7")
    x = _x()
    s = np.zeros((1, 2, 4, 4), np.float32)
    p1 = _validate.check_call(op, x, s, None, None)
    p2 = _validate.check_call(op, dict(_x(seed=1)), np.ones_like(s), None, None)
    assert p1 is p2                                    # same metadata: the cached plan
    # a different shape / dtype / contiguity is validated afresh and fails with its own message
    bad = dict(x, k=x["k"][:, :, :, :3].copy())
    with pytest.raises(ValueError, match="'k'"):
        _validate.check_call(op, bad, s, None, None)
    with pytest.raises(TypeError, match="'v' is float64"):
        _validate.check_call(op, dict(x, v=x["v"].astype(np.float64)), s, None, None)
    with pytest.raises(ValueError, match="'state' must have shape"):
        _validate.check_call(op, x, np.zeros((2, 2, 4, 4), np.float32), None, None)
    with pytest.raises(TypeError, match="'state' must be float32"):
        _validate.check_call(op, x, s.astype(np.float16), None, None)
    # and the good call still hits the cache afterwards
    assert _validate.check_call(op, x, s, None, None) is p1


def test_host_side_indices_are_checked_on_every_call():
    """Plans built from host index values (ranges, repeats) are never reused: the same shapes with a bad value
    must still raise."""
    op = rwkvops.get_op("wkv7")
    x = _x(T=3)
    pool = np.zeros((4, 2, 4, 4), np.float32)
    cu = np.array([0, 1, 2, 3], np.int32)
    ok = _validate.check_call(op, x, pool, cu, np.array([0, 3, -1], np.int32))
    assert ok.pool and ok.idx_host is not None
    with pytest.raises(ValueError, match="must lie in"):
        _validate.check_call(op, x, pool, cu, np.array([0, 4, -1], np.int32))
    with pytest.raises(ValueError, match="repeats slots"):
        _validate.check_call(op, x, pool, cu, np.array([1, 1, -1], np.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        _validate.check_call(op, x, pool, np.array([0, 2, 1, 3], np.int32), np.array([0, 1, 2], np.int32))


def test_plan_cache_is_bounded():
    op = rwkvops.get_op("wkv7")
    for T in range(1, _validate._PLANS_MAX + 10):
        _validate.check_call(op, _x(T=T, N=2), None, None, None)
    assert len(op.__dict__["_plans"]) <= _validate._PLANS_MAX


def test_torch_cpu_no_grad_matches_autograd_path():
    torch = pytest.importorskip("torch")
    x = {n: torch.tensor(v) for n, v in _x(T=3).items()}
    s = torch.randn(1, 2, 4, 4) * 0.1
    with torch.no_grad():
        y0, s0 = rwkvops.wkv7(*x.values(), state=s)
    xg = {n: v.clone().requires_grad_(True) for n, v in x.items()}
    y1, s1 = rwkvops.wkv7(*xg.values(), state=s)
    assert y1.requires_grad and not y0.requires_grad
    assert torch.equal(y0, y1.detach()) and torch.equal(s0, s1.detach())


# ----------------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="no CUDA device")


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch


@gpu
@needs_gpu
@pytest.mark.parametrize("op_name", ("wkv7", "wkv6", "wkv4"))
def test_gpu_inference_uses_launch_views(op_name, monkeypatch):
    """No CuPy array per input on the no-grad torch path; results equal the autograd path's bit for bit."""
    torch = _torch()
    op = rwkvops.get_op(op_name)
    dims = rwkvops.testing.default_dims(op, B=3, T=5, H=2, N=64, C=256)
    rng = np.random.default_rng(3)
    x64 = rwkvops.testing.sample_inputs(op, dims, rng)
    x = {k: torch.tensor(v, device="cuda", dtype=torch.bfloat16) for k, v in x64.items()}
    xg = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    y1, s1 = op(*xg.values())                                   # autograd path: CuPy views
    made = []
    real = _arrays.TorchCudaBridge._view
    monkeypatch.setattr(_arrays.TorchCudaBridge, "_view", lambda self, t: (made.append(t), real(self, t))[1])
    with torch.no_grad():
        y0, s0 = op(*x.values())
    assert made == []
    assert isinstance(y0, torch.Tensor) and y0.dtype == torch.bfloat16 and s0.dtype == torch.float32
    xr = {k: to_numpy(v.float()).astype(np.float64) for k, v in x.items()}
    ry, rs = op.reference_forward(xr, np.zeros(tuple(s0.shape)))
    for y, s in ((y0, s0), (y1.detach(), s1.detach())):
        assert rel_rms(y, ry) < 3e-3 and rel_rms(s, rs) < 1e-4
    y2, s2 = op(*x.values())                                    # grad enabled but nothing requires it
    assert made == [] and torch.equal(y2, y0) and torch.equal(s2, s0)


@gpu
@needs_gpu
def test_gpu_device_view_falls_back_to_cupy():
    torch = _torch()
    import cupy
    t = torch.zeros(3, 8, device="cuda", dtype=torch.bfloat16)
    b = _arrays.make_bridge("torch", ("cuda", t.device.index))
    v = b.view(t)
    assert v.data.ptr == t.data_ptr() and v.shape == (3, 8) and v.dtype == np.uint16 and v.nbytes == 48
    with b.stream():
        v.fill(0x3F80)                       # bf16 1.0, through the CuPy view made on demand
        c = cupy.asarray(v)                  # __cuda_array_interface__: zero copy
    assert c.data.ptr == t.data_ptr()
    assert torch.equal(t, torch.ones_like(t))
    e = b.empty_view((2, 5), "float32")
    assert b.from_compute(e, "float32").shape == (2, 5)


@gpu
@needs_gpu
def test_gpu_lean_path_still_validates():
    torch = _torch()
    x = {n: torch.tensor(v, device="cuda") for n, v in _x(B=2, N=64).items()}
    s = torch.zeros(2, 2, 64, 64, device="cuda")
    with torch.no_grad():
        rwkvops.wkv7(*x.values(), state=s)
        with pytest.raises(ValueError, match="C-contiguous"):
            rwkvops.wkv7(*x.values(), state=s.transpose(-1, -2))
        with pytest.raises(TypeError, match="'w' is float16"):
            rwkvops.wkv7(*dict(x, w=x["w"].half()).values(), state=s)
        with pytest.raises(ValueError, match="state_indices"):
            rwkvops.wkv7(*x.values(), state=s, state_indices=torch.zeros(3, dtype=torch.int32, device="cuda"))
        y, _ = rwkvops.wkv7(*x.values(), state=s)
    ref, _ = rwkvops.get_op("wkv7").reference_forward({n: to_numpy(v).astype(np.float64) for n, v in x.items()},
                                                       np.zeros((2, 2, 64, 64)))
    assert rel_rms(y, ref) < 1e-5
