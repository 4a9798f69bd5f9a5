"""The lean host path of inference calls: cached validation plans, launch views instead of CuPy arrays for torch
CUDA tensors, and launch plans (a signature's first torch inference call recorded, repeats replayed on new
pointers).  Every check must still fire on the call that breaks it, and a plan must never launch on pointers,
kernels or settings other than those the general path would use.

The CPU tests run the torch-CUDA host path on CPU tensors with a fake device (benchmarks/host_overhead.py:
fake_device) that logs every launch's parameter slots: a replay is checked against the general path launch by
launch, pointer by pointer.  The GPU tests (marked ``gpu``) check replayed results against the reference."""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np
import pytest

import rwkvops
from rwkvops import _arrays, _dispatch, _gpu, _validate
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


# ------------------------------------------------------------------------------------- launch plans, fake device

def _host_overhead():
    pytest.importorskip("torch")
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "host_overhead.py"
    spec = importlib.util.spec_from_file_location("rwkvops_host_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake():
    """(fake device, inputs(op_name, B, mode, dtype) -> (positional inputs, keywords)) with torch.no_grad."""
    import torch
    ho = _host_overhead()

    def inputs(name, B=2, mode="dense", dtype=torch.bfloat16):
        x, kw = ho.inputs(name, B, mode, "cpu")
        return [a.to(dtype) for a in x], kw

    with ho.fake_device() as dev, torch.no_grad():
        yield dev, inputs


def _plan(op, x, kw):
    names = op.input_names
    return _validate.check_call(op, dict(zip(names, x)), kw.get("state"), kw.get("cu_seqlens"),
                                kw.get("state_indices"))


def _roles(launches, x, kw, y, s):
    """The launches with every pointer replaced by what it points at (argument k, y, state_out, other memory)."""
    known = {a.data_ptr(): f"arg{k}" for k, a in enumerate([*x, *(kw.get(n) for n in ("state", "cu_seqlens",
                                                                                     "state_indices"))])
             if a is not None}
    known.setdefault(y.data_ptr(), "y")
    known.setdefault(s.data_ptr(), "state_out")

    def role(v):
        return known.get(v, "scratch" if v >= 2 ** 32 else v)
    out = []
    for entry in launches:
        if entry[0] == "memset":
            out.append(("memset", role(entry[1]), entry[2]))
        else:
            out.append((entry[1], entry[2], entry[3], [role(v) for v in entry[4]]))
    return out


def _general(monkeypatch, op, x, kw, dev):
    """The same call through the general path: its launches (by role) and results."""
    monkeypatch.setattr(_dispatch, "LAUNCH_PLANS", False)
    dev.launches.clear()
    y, s = op(*x, **kw)
    monkeypatch.setattr(_dispatch, "LAUNCH_PLANS", True)
    assert dev.launches and all(e[0] in ("cupy", "memset") for e in dev.launches)
    return _roles(dev.launches, x, kw, y, s)


@pytest.mark.parametrize("mode", ("dense", "pool"))
@pytest.mark.parametrize("name", ("wkv7", "wkv6", "wkv4"))
def test_replay_launches_what_the_general_path_launches(fake, monkeypatch, name, mode):
    """Fresh tensors per call: a replay binds each new pointer where the general path puts it, allocates fresh
    outputs, and keeps every constant (kernel, geometry, scalars)."""
    dev, inputs = fake
    op = rwkvops.get_op(name)
    op(*inputs(name, 2, mode)[0], **inputs(name, 2, mode)[1])     # records
    x, kw = inputs(name, 2, mode)
    assert _plan(op, x, kw).launch, "no launch plan was recorded"
    seen, kept = set(), []
    for _ in range(3):
        x, kw = inputs(name, 2, mode)
        dev.launches.clear()
        y, s = op(*x, **kw)
        assert dev.launches and all(e[0] in ("plan", "memset") for e in dev.launches)
        replayed = _roles(dev.launches, x, kw, y, s)
        assert replayed == _general(monkeypatch, op, x, kw, dev)
        assert all(y is not a for a in x) and y.dtype == x[0].dtype and y.shape == x[0 if name != "wkv4" else 2].shape
        assert (s is kw["state"]) == (mode == "pool") and s.dtype == kw["state"].dtype
        seen.add(y.data_ptr())
        kept.append(y)          # alive: the next call's outputs must be other memory
    assert len(seen) == 3


def test_plan_cannot_serve_a_changed_call(fake, monkeypatch):
    import torch
    dev, inputs = fake
    op = rwkvops.get_op("wkv7")
    x, kw = inputs("wkv7", 2)
    op(*x, **kw)
    plan = _plan(op, x, kw)
    assert plan.launch
    # changed strides / non-contiguous arrays: the validation error, not a replay
    with pytest.raises(ValueError, match="'state' must be C-contiguous"):
        op(*x, state=kw["state"].transpose(-1, -2))
    nc = torch.empty(2, 1, 64, 32, dtype=torch.bfloat16).transpose(-1, -2)
    with pytest.raises(ValueError, match="'k' must be C-contiguous"):
        op(*x[:2], nc, *x[3:], **kw)
    # another dtype: its own plan, its own kernel
    x16 = [a.to(torch.float16) for a in x]
    dev.launches.clear()
    op(*x16, **kw)
    op(*x16, **kw)
    assert [e[0] for e in dev.launches] == ["cupy", "plan"]
    assert all("__half" in e[1] for e in dev.launches)
    assert _plan(op, x16, kw) is not plan
    # another shape: its own plan (a grid for 3 sequences)
    x3, kw3 = inputs("wkv7", 3)
    dev.launches.clear()
    op(*x3, **kw3)
    assert dev.launches[0][0] == "cupy" and dev.launches[0][2][0] == 3 * 32   # (sequences x heads) blocks
    # an input off a 16-byte boundary (contiguous, same metadata): the general path, which picks by alignment
    base = torch.empty(2 * 32 * 64 + 8, dtype=torch.bfloat16)
    r = base[2:2 + 2 * 32 * 64].view(2, 1, 32, 64)
    assert r.is_contiguous() and r.data_ptr() % 16 == 4
    dev.launches.clear()
    y, s = op(r, *x[1:], **kw)
    assert [e[0] for e in dev.launches] == ["cupy"]
    dev.launches.clear()
    y, s = op(*x, **kw)
    assert [e[0] for e in dev.launches] == ["plan"]      # the plan survives the detour


def test_changed_setting_is_recorded_again(fake, monkeypatch):
    """Launchers choose kernels by module settings: rebinding one (or changing a setting dict in place) must not
    replay the old choice."""
    from rwkvops.ops import wkv6 as W6
    from rwkvops.ops import wkv7 as W7
    dev, inputs = fake
    op = rwkvops.get_op("wkv6")
    x, kw = inputs("wkv6", 2)
    op(*x, **kw)
    op(*x, **kw)
    assert dev.launches[-1][:2] == ("plan", dev.launches[0][1]) and "stream" in dev.launches[0][1]
    monkeypatch.setattr(W6, "FORWARD_PATH", "recurrent")
    dev.launches.clear()
    op(*x, **kw)
    op(*x, **kw)
    assert [e[0] for e in dev.launches] == ["cupy", "plan"]
    assert all("wkv6_forward<" in e[1] for e in dev.launches)
    assert "FORWARD_PATH" in _plan(op, x, kw).replay_miss          # the skipped replay says what changed
    op7 = rwkvops.get_op("wkv7")
    x, kw = inputs("wkv7", 2)
    op7(*x, **kw)
    monkeypatch.setitem(W7.CTYPE, "bfloat16", "__nv_bfloat16 /* changed */")
    dev.launches.clear()
    op7(*x, **kw)
    assert dev.launches[0][0] == "cupy" and "changed" in dev.launches[0][1]
    assert "container" in _plan(op7, x, kw).replay_miss


def test_guard_covers_what_the_launcher_can_read(fake, monkeypatch):
    """The guard follows the launcher's code: a helper it calls, rebound, or a new global (it may shadow a builtin)
    skips the replay; a global only other code reads (the CPU reference) does not.  A launcher that reaches for its
    module's namespace itself is guarded on every global."""
    import types
    from rwkvops.ops import wkv6 as W6
    dev, inputs = fake
    op = rwkvops.get_op("wkv6")
    x, kw = inputs("wkv6", 2)

    def kinds():
        dev.launches.clear()
        op(*x, **kw)
        return [e[0] for e in dev.launches]
    kinds()
    assert kinds() == ["plan"]
    real = W6._use_stream
    monkeypatch.setattr(W6, "_use_stream", lambda seqs: real(seqs))     # same answer, another function
    assert kinds() == ["cupy"] and "_use_stream" in _plan(op, x, kw).replay_miss
    assert kinds() == ["plan"]
    monkeypatch.setattr(W6, "reference_backward", lambda *a: None, raising=True)
    assert kinds() == ["plan"]                                          # not read by gpu_forward
    monkeypatch.setattr(W6, "min", min, raising=False)                  # a new name
    assert kinds() == ["cupy"] and "globals went from" in _plan(op, x, kw).replay_miss
    assert kinds() == ["plan"]
    d = {"__name__": "fake_launcher", "SETTING": 1}
    exec("def f():\n    return globals()['SETTING']\n", d)
    assert _gpu._read_names(d, (d["f"],)) is None
    exec("def g():\n    return SETTING + h()\ndef h():\n    return OTHER\nOTHER = 2\nUNUSED = 3\n", d)
    assert sorted(_gpu._read_names(d, (d["g"],))) == ["OTHER", "SETTING", "h"]
    ns = types.SimpleNamespace(**d)
    guard = _gpu.globals_guard((ns, None, (d["g"],)))
    assert len(guard) == 1 and guard[0][1] is not None and guard[0][5] == len(d)


def test_a_setting_that_keeps_changing_ends_on_the_general_path(fake, monkeypatch):
    from rwkvops.ops import wkv6 as W6
    dev, inputs = fake
    op = rwkvops.get_op("wkv6")
    x, kw = inputs("wkv6", 2)
    for i in range(2 * _dispatch._MAX_RECORDINGS + 2):
        monkeypatch.setattr(W6, "FORWARD_PATH", ("auto", "recurrent")[i % 2])
        dev.launches.clear()
        op(*x, **kw)
        assert [e[0] for e in dev.launches] == ["cupy"]
    assert _plan(op, x, kw).launch is False
    # a sweep over settings (each one used for a while) keeps its plans however many settings it visits
    x, kw = inputs("wkv6", 3)
    for i in range(2 * _dispatch._MAX_RECORDINGS + 2):
        monkeypatch.setattr(W6, "FORWARD_PATH", ("auto", "recurrent")[i % 2])
        dev.launches.clear()
        op(*x, **kw)
        op(*x, **kw)
        assert [e[0] for e in dev.launches] == ["cupy", "plan"]


def test_a_replay_whose_launch_fails_falls_back_to_the_general_path(fake):
    dev, inputs = fake
    op = rwkvops.get_op("wkv4")
    x, kw = inputs("wkv4", 2, "pool")
    op(*x, **kw)
    dev.fail_plan_launches = 1
    dev.launches.clear()
    op(*x, **kw)
    assert [e[0] for e in dev.launches if e[0] != "memset"] == ["cupy"]
    plan = _plan(op, x, kw)
    assert plan.launch is False and "failed" in plan.launch_why
    assert plan.replay_miss.startswith(plan.launch_why + ": ") and len(plan.replay_miss) > len(plan.launch_why) + 2


def test_last_replayed_plan_serves_only_its_signature(fake):
    """A repeat call is first offered to the op's last replayed plan (one C check of the tensors): another shape,
    dtype, layout or set of given arguments must still take the key (its own plan, or the checks' error)."""
    import torch
    dev, inputs = fake
    op = rwkvops.get_op("wkv7")
    x, kw = inputs("wkv7", 2)
    op(*x, **kw)
    op(*x, **kw)                                        # records, replays: now the op's last replayed plan
    plan = _plan(op, x, kw)
    if not plan.same:
        pytest.skip("this torch has no TensorGuards")
    assert op.__dict__["_plans"][_dispatch.LAST_REPLAY] is plan

    def kinds(*a, **k):
        dev.launches.clear()
        op(*a, **k)
        return [e[0] for e in dev.launches if e[0] != "memset"]
    x2, kw2 = inputs("wkv7", 2)
    assert kinds(*x2, **kw2) == ["plan"]               # fresh tensors, same signature
    # strides that differ only on a size-1 dimension: the same signature (contiguous); the C check is stricter and
    # refuses it, the key serves it with the same plan
    odd = torch.empty_strided((2, 1, 32, 64), (2048, 7, 64, 1), dtype=x[0].dtype).copy_(x[0])
    assert odd.is_contiguous() and kinds(odd, *x[1:], **kw) == ["plan"]
    assert kinds(*[a.half() for a in x], **kw) == ["cupy"]          # another dtype: its own plan
    x3, kw3 = inputs("wkv7", 3)
    assert kinds(*x3, **kw3) == ["cupy"]                            # another shape
    assert kinds(*x) == ["cupy"]                                    # no state given
    with pytest.raises(ValueError, match="'state' must be C-contiguous"):
        op(*x, state=kw["state"].transpose(-1, -2))
    assert kinds(*x, **kw) == ["plan"] and op.__dict__["_plans"][_dispatch.LAST_REPLAY] is plan
    # clearing the plan cache drops the last replayed plan with it
    op.__dict__["_plans"].clear()
    assert kinds(*x, **kw) == ["cupy"]


def test_same_signature_checks_every_array():
    torch = pytest.importorskip("torch")
    a, b, c = (torch.randn(2, 3, 4) for _ in range(3))
    same = _validate.same_signature((a, b, None, c))
    if same is None:
        pytest.skip("this torch has no TensorGuards")
    assert same((a, b, None, c)) and same(tuple(t.clone() for t in (a, b)) + (None, c.clone()))
    assert not same((a, b, c, None)) and not same((a, None, b, c)) and not same((a, b, None, None))
    assert not same((a, b, None, c.double())) and not same((a, b, None, torch.randn(2, 3, 5)))
    assert not same((a, b, None, c.transpose(0, 1).contiguous().transpose(0, 1)))     # strides
    assert not same((a, b, None, torch.nn.Parameter(c)))                             # a subclass
    assert not same((a, b, None, np.zeros((2, 3, 4), np.float32)))


def test_replay_follows_the_current_stream(fake):
    """A replay asks for torch's current stream on every call (it may change between calls)."""
    dev, inputs = fake
    op = rwkvops.get_op("wkv6")
    current = [0]
    _arrays.make_bridge("torch", ("cuda", 0)).raw_stream = lambda: current[0]
    x, kw = inputs("wkv6", 2)
    op(*x, **kw)                                        # records
    for s in (7, 9, 7):
        current[0] = s
        op(*x, **kw)
    assert dev.streams == [7, 9, 7]


def test_replay_allocates_without_torchs_fast_entry(fake):
    """torch's fast allocation entry is a private API: where it is missing or misbehaves, replays use torch.empty."""
    dev, inputs = fake
    op = rwkvops.get_op("wkv4")

    def broken(*a):
        raise TypeError("changed signature")
    _arrays.make_bridge("torch", ("cuda", 0)).empty_strided = broken
    x, kw = inputs("wkv4", 2)
    op(*x, **kw)
    dev.launches.clear()
    y, s = op(*x, **kw)
    assert "plan" in [e[0] for e in dev.launches] and all(e[0] in ("plan", "memset") for e in dev.launches)
    assert y.shape == x[2].shape and y.dtype == x[2].dtype and s.shape == kw["state"].shape


def test_pending_device_error_raises_on_a_replay(fake):
    dev, inputs = fake
    op = rwkvops.get_op("wkv6")
    x, kw = inputs("wkv6", 2, "pool")
    op(*x, **kw)
    op(*x, **kw)
    dev.err[0] = _gpu.ERR_BAD_STATE_INDEX              # as a kernel would set it
    with pytest.raises(ValueError, match="state_indices"):
        op(*x, **kw)
    assert dev.err[0] == 0
    op(*x, **kw)


def test_device_index_arrays_must_be_contiguous(fake):
    import torch
    dev, inputs = fake
    op = rwkvops.get_op("wkv7")
    x, kw = inputs("wkv7", 2, "pool")
    op(*x, **kw)
    idx = torch.tensor([0, 9, 3, 9], dtype=torch.int32)[::2]
    with pytest.raises(ValueError, match="'state_indices' must be C-contiguous"):
        op(*x, **dict(kw, state_indices=idx))
    cu = torch.tensor([0, 9, 1, 9, 2], dtype=torch.int32)[::2]
    with pytest.raises(ValueError, match="'cu_seqlens' must be C-contiguous"):
        op(*x, **dict(kw, cu_seqlens=cu))


# a toy op whose GPU launcher breaks one rule of launch plans at a time (see rwkvops._gpu's docstring)

def _toy_forward(rule):
    def gpu_forward(call, x, state_in, state_out, save):
        from rwkvops._gpu import error_ptr, launch, ptr
        y = call.empty(tuple(x["x"].shape), call.dtype)
        args = [ptr(x["x"]), ptr(x["w"]), ptr(x["g"]), ptr(y), ptr(state_in), ptr(state_out), error_ptr(),
                np.int32(call.seqs.num), np.float32(0.5)]
        if rule == "foreign":          # memory the call neither got nor allocated
            args.append(ptr(_arrays.DeviceView(1 << 40, (4,), np.dtype(np.float32), None, 0)))
        elif rule == "derived":        # a pointer computed from one of the call's
            args.append(np.uint64(int(ptr(x["x"])) + 64))
        elif rule == "nbytes":         # device work on the memory without launch()/zero()
            args.append(np.int64(x["x"].nbytes))
        launch("toy", "toy.cu", "toy<float>", ("toy<float>",), (call.seqs.num,), (32,), tuple(args))
        return y, None
    return gpu_forward


@pytest.mark.parametrize("rule", ("ok", "foreign", "derived", "nbytes", "aliased"))
def test_recorder_refuses_what_it_cannot_replay(fake, monkeypatch, rule):
    import torch
    import toyop
    from rwkvops.registry import _REGISTRY
    dev, _ = fake
    op = dataclasses.replace(toyop.make(f"toy_plan_{rule}"), gpu_forward=_toy_forward(rule))
    monkeypatch.setitem(_REGISTRY, op.name, op)
    for i in range(5):
        x = torch.randn(2, 1, 2, 8)
        w = x if rule == "aliased" else torch.randn(2, 1, 2, 8)
        s = torch.randn(2, 2, 8)
        g = torch.randn(2, 8)
        dev.launches.clear()
        y, s1 = op(x, w, g, state=s)
        assert [e[0] for e in dev.launches] == ["plan" if rule == "ok" and i else "cupy"]
        want = [x.data_ptr(), w.data_ptr(), g.data_ptr(), y.data_ptr(), s.data_ptr(), s1.data_ptr()]
        assert dev.launches[0][4][:6] == want
        assert dev.launches[0][4][7:9] == [2, int(np.float32(0.5).view(np.uint32))]
    plan = _plan(op, [x, w, g], {"state": s})
    assert (plan.launch is False) == (rule != "ok") and (bool(plan.launch) == (rule == "ok"))


# ------------------------------------------------------------------------------------- launch plans, GPU

def _decode_case(op, mode, dtype, seed, B=3):
    """A decode step on the GPU (torch tensors of ``dtype``) and the same step for the float64 CPU path:
    ((inputs, keywords) on the GPU, (inputs, keywords) in NumPy).  dense: [B, 1, ...] and a state [B, ...];
    pool: [1, B, ...] packed, device int32 cu_seqlens / state_indices into a pool of 2B slots."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    dims = rwkvops.testing.default_dims(op, B=B if mode == "dense" else 1, T=1 if mode == "dense" else B, H=2,
                                        N=64, C=256)
    x64 = rwkvops.testing.sample_inputs(op, dims, rng)
    tdt = getattr(torch, dtype)
    x = [torch.tensor(x64[a.name], device="cuda").to(tdt) for a in op.inputs]
    xr = [to_numpy(t.float()).astype(np.float64) for t in x]
    num = B if mode == "dense" else 2 * B
    st = rwkvops.testing.sample_state(op, dims, num, rng)
    kw = {"state": torch.tensor(st, device="cuda", dtype=torch.float32)}
    kr = {"state": st.astype(np.float32).astype(np.float64)}
    if mode == "pool":
        idx = rng.permutation(2 * B)[:B].astype(np.int32)
        idx[1] = -1
        kw.update(cu_seqlens=torch.arange(B + 1, device="cuda", dtype=torch.int32),
                  state_indices=torch.tensor(idx, device="cuda"))
        kr.update(cu_seqlens=np.arange(B + 1), state_indices=idx)
    return (x, kw), (xr, kr)


def _count_general(monkeypatch):
    calls = []
    real = _dispatch._forward
    monkeypatch.setattr(_dispatch, "_forward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
@pytest.mark.parametrize("mode", ("dense", "pool"))
@pytest.mark.parametrize("name", ("wkv7", "wkv6", "wkv4"))
def test_gpu_replays_match_general_path_and_reference(name, mode, dtype, monkeypatch):
    torch = _torch()
    op = rwkvops.get_op(name)
    tol = 3e-3 if dtype == "bfloat16" else 5e-5     # bf16 outputs; fp32 as tests/test_pool.py's GPU_TOL
    with torch.no_grad():
        (x, kw), _ = _decode_case(op, mode, dtype, seed=0)
        op(*x, **kw)                                                   # records
        assert _plan(op, x, kw).launch
        general = _count_general(monkeypatch)
        fallbacks = []
        for seed in (1, 2, 3):
            (x, kw), (xr, kr) = _decode_case(op, mode, dtype, seed)
            kw2 = dict(kw, state=kw["state"].clone())
            lp = _plan(op, x, kw).launch
            general.clear()      # (the float64 CPU call below goes through _forward too)
            y, s = op(*x, **kw)                                        # replay on new pointers
            if general:      # the general path ran instead: note why, and check the answers all the same
                p = _plan(op, x, kw)
                fallbacks.append((seed, bool(lp), p.replay_miss, p.launch_why))
            monkeypatch.setattr(_dispatch, "LAUNCH_PLANS", False)
            y2, s2 = op(*x, **kw2)
            monkeypatch.setattr(_dispatch, "LAUNCH_PLANS", True)
            assert torch.equal(y, y2) and torch.equal(s, s2)
            ry, rs = op(*xr, **kr)
            assert rel_rms(y, ry) < tol and rel_rms(s, rs) < max(tol, 5e-5)
            assert (s is kw["state"]) == (mode == "pool")
        # (seed, had a plan, why its replay was skipped, why not recorded) per call that did not replay
        assert fallbacks == []


@gpu
@needs_gpu
def test_gpu_replay_refuses_what_it_cannot_serve(monkeypatch):
    torch = _torch()
    op = rwkvops.get_op("wkv7")
    with torch.no_grad():
        (x, kw), (xr, kr) = _decode_case(op, "dense", "bfloat16", seed=0)
        op(*x, **kw)
        general = _count_general(monkeypatch)
        # an input off a 16-byte boundary, same metadata: the general path (its kernels pick by alignment)
        base = torch.empty(x[0].numel() + 8, device="cuda", dtype=torch.bfloat16)
        r = base[2:2 + x[0].numel()].view(x[0].shape)
        r.copy_(x[0])
        y, s = op(r, *x[1:], **kw)
        assert general == [1]
        ry, rs = op(*xr, **kr)
        assert rel_rms(y, ry) < 3e-3 and rel_rms(s, rs) < 1e-4
        # changed strides: the validation error
        with pytest.raises(ValueError, match="C-contiguous"):
            op(*x, state=kw["state"].transpose(-1, -2))
        # another dtype: its own plan, right answers
        x16 = [a.half() for a in x]
        for _ in range(2):
            y, s = op(*x16, **kw)
        ry, rs = op(*[to_numpy(a.float()).astype(np.float64) for a in x16], **kr)
        assert y.dtype == torch.float16 and rel_rms(y, ry) < 3e-3 and rel_rms(s, rs) < 1e-4
        # another device: CPU tensors of the same metadata take the CPU path
        y, s = op(*[a.cpu() for a in x], state=kw["state"].cpu())
        assert y.device.type == "cpu" and s.device.type == "cpu"
        # a replayed call's outputs are fresh tensors
        y1, s1 = op(*x, **kw)
        y2, s2 = op(*x, **kw)
        assert y1.data_ptr() != y2.data_ptr() and s1.data_ptr() != s2.data_ptr() and torch.equal(y1, y2)


@gpu
@needs_gpu
def test_gpu_replay_is_captured_by_a_cuda_graph():
    """A replay inside torch.cuda.graph capture launches on the capture stream with graph-pool outputs."""
    torch = _torch()
    op = rwkvops.get_op("wkv7")
    with torch.no_grad():
        (x, kw), _ = _decode_case(op, "dense", "bfloat16", seed=0)
        op(*x, **kw)
        op(*x, **kw)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, s = op(*x, **kw)
        (x2, kw2), (xr, kr) = _decode_case(op, "dense", "bfloat16", seed=5)
        for a, b in zip(x, x2):
            a.copy_(b)
        kw["state"].copy_(kw2["state"])
        graph.replay()
        torch.cuda.synchronize()
        ry, rs = op(*xr, **kr)
        assert rel_rms(y, ry) < 3e-3 and rel_rms(s, rs) < 1e-4
