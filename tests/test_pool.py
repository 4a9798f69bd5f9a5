"""State-pool semantics (``state_indices``) for every built-in op, generically from the op declarations.

A pool ``[P, ...]`` is addressed by one slot per sequence: the slot is read at the sequence's start and written at
its end, in place; slot -1 starts from a zero state and writes nothing; slots no sequence names are left exactly
as they were; a zero-length sequence passes its slot's state through unchanged.  Checked against the op's float64
NumPy reference run per sequence (dense, B = 1) on the CPU (NumPy, torch CPU) with hypothesis, and on the GPU
(CuPy, torch CUDA; marked ``gpu``), where out-of-range indices given on the device are reported by the kernel
through the pinned error word and raised by :func:`rwkvops.check_errors` (or the next call).

Ops are looked up in the registry; one that is not registered yet is skipped (the tests are written for all of
wkv7, wkv6 and wkv4).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rwkvops
from rwkvops import testing
from rwkvops.testing import has_gpu, rel_rms, round_to, to_numpy

OPS = ("wkv7", "wkv6", "wkv4")
FWD_TOL = {"float64": 1e-12, "float32": 1e-6}
GPU_TOL = 5e-5          # fp32 kernels against the float64 reference (semantic errors are O(1))


def get_op(name):
    try:
        return rwkvops.get_op(name)
    except KeyError:
        pytest.skip(f"op {name!r} is not registered yet")


# ----------------------------------------------------------------------------- generic inputs from declarations

def shape_of(arg, dims):
    return tuple(dims[s] if isinstance(s, str) else s for s in arg.shape)


def make_case(op, lens, P, slots, seed, N=8, H=2, C=8, dense_B=None):
    """Packed inputs (B = 1, T = sum(lens)) or a dense batch (``dense_B`` sequences of ``lens[0]`` tokens) and a
    random pool, all float64 NumPy, from the op's declared symbolic shapes and its own samplers."""
    rng = np.random.default_rng(seed)
    if dense_B is None:
        dims = testing.default_dims(op, B=1, T=int(sum(lens)), H=H, N=N, C=C)
    else:
        dims = testing.default_dims(op, B=dense_B, T=int(lens[0]), H=H, N=N, C=C)
    if int(sum(lens)) == 0:   # samplers may not like T = 0: sample one token and cut it away
        x = testing.sample_inputs(op, dict(dims, T=1), rng)
        x = {a.name: (np.take(x[a.name], [], axis=a.shape.index("T")) if a.per_token else x[a.name])
             for a in op.inputs}
    else:
        x = testing.sample_inputs(op, dims, rng)
    pool = testing.sample_state(op, dims, P, rng)
    for a in op.inputs:
        assert x[a.name].shape == shape_of(a, dims), (a.name, x[a.name].shape)
    return dims, x, pool


def reference_per_sequence(op, x, pool, cu, slots):
    """Expected (y, pool after): each sequence run alone with the dense reference from its slot (or zeros)."""
    out_arg = op.arg(op.output)
    tax = out_arg.shape.index("T")
    ys, pool_after = [], pool.copy()
    for i, slot in enumerate(slots):
        a, b = int(cu[i]), int(cu[i + 1])
        s0 = pool[slot][None].copy() if slot >= 0 else np.zeros((1,) + pool.shape[1:])
        if b == a:
            s1 = s0
            ys.append(np.take(x[op.output], [], axis=tax))
        else:
            xi = {arg.name: (np.take(x[arg.name], range(a, b), axis=arg.shape.index("T")) if arg.per_token
                             else x[arg.name]) for arg in op.inputs}
            yi, s1 = op.reference_forward(xi, s0)
            ys.append(yi)
        if slot >= 0:
            pool_after[slot] = s1[0]
    return np.concatenate(ys, axis=tax), pool_after


def to_backend(a, backend, dtype):
    if backend == "numpy":
        return np.ascontiguousarray(a.astype(dtype))
    if backend == "cupy":
        import cupy
        return cupy.asarray(a.astype(dtype))
    import torch
    return torch.tensor(a, dtype=getattr(torch, dtype), device="cuda" if backend == "torch-cuda" else "cpu")


def ints_on(a, backend, device_side):
    a = np.asarray(a, dtype=np.int32)
    if not device_side or backend in ("numpy", "torch-cpu"):
        return a
    return to_backend(a, backend, "int32")


def run_pool(op, backend, dtype, x64, pool64, cu, slots, device_ints=False):
    """Call ``op`` on ``backend``; return (y, the pool after, the pool object passed, the state returned)."""
    x = [to_backend(round_to(x64[a.name], dtype), backend, dtype) for a in op.inputs]
    sdt = "float64" if dtype == "float64" else "float32"
    pool = to_backend(pool64, backend, sdt)
    kw = {"state": pool, "state_indices": ints_on(slots, backend, device_ints)}
    if cu is not None:
        kw["cu_seqlens"] = ints_on(cu, backend, device_ints)
    y, s = op(*x, **kw)
    return y, pool, s


def check_case(op, backend, dtype, lens, P, slots, seed, tol, N=8, device_ints=False):
    dims, x64, pool64 = make_case(op, lens, P, slots, seed, N=N)
    # the reference sees exactly what the op sees: inputs rounded to dtype, states as stored (fp32 or float64)
    xr = {k: round_to(v, dtype) for k, v in x64.items()}
    p_in = pool64 if dtype == "float64" else pool64.astype(np.float32).astype(np.float64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    y, pool, s = run_pool(op, backend, dtype, xr, p_in, cu, slots, device_ints)
    if backend in ("numpy", "torch-cpu"):
        # the CPU path computes in the inputs' dtype: so does the expected result (this is about semantics)
        ct = np.dtype(dtype)
        y_ref, pool_ref = reference_per_sequence(op, {k: v.astype(ct) for k, v in xr.items()}, p_in.astype(ct),
                                                 cu, slots)
    else:
        y_ref, pool_ref = reference_per_sequence(op, xr, p_in, cu, slots)
    assert s is pool, "with state_indices the returned state must be the pool itself"
    got = to_numpy(pool)
    used = [sl for sl in slots if sl >= 0]
    untouched = [i for i in range(P) if i not in used]
    # untouched slots (including those only named by nobody; -1 sequences write nothing): bit for bit
    np.testing.assert_array_equal(got[untouched], p_in[untouched])
    for i, sl in enumerate(slots):
        if sl < 0:
            continue
        if lens[i] == 0:       # zero-length: the state passes through unchanged
            np.testing.assert_array_equal(got[sl], p_in[sl])
        else:
            e = rel_rms(got[sl], pool_ref[sl])
            assert e <= tol, f"slot {sl} (sequence {i}, {lens[i]} tokens): rel RMS {e:.3g} > {tol:g}"
    if sum(lens):
        e = rel_rms(y, y_ref)
        assert e <= tol, f"y: rel RMS {e:.3g} > {tol:g}"
    for i in range(len(lens)):   # each sequence's own y, so a mix-up between sequences cannot hide in the total
        a, b = int(cu[i]), int(cu[i + 1])
        if b > a:
            tax = op.arg(op.output).shape.index("T")
            yi = np.take(to_numpy(y), range(a, b), axis=tax)
            e = rel_rms(yi, np.take(y_ref, range(a, b), axis=tax))
            assert e <= tol, f"y of sequence {i} (slot {slots[i]}): rel RMS {e:.3g} > {tol:g}"


@st.composite
def pool_cases(draw, max_len=6, max_seqs=5):
    lens = draw(st.lists(st.integers(0, max_len), min_size=1, max_size=max_seqs))
    n = len(lens)
    P = draw(st.integers(n, n + 3))
    perm = draw(st.permutations(range(P)))
    neg = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    slots = [-1 if z else int(perm[i]) for i, z in enumerate(neg)]
    return lens, P, slots, draw(st.integers(0, 2 ** 31 - 1))


# ----------------------------------------------------------------------------- CPU: semantics

@pytest.mark.parametrize("backend", ["numpy", "torch-cpu"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", OPS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pool_cases())
def test_pool_semantics_cpu(name, dtype, backend, case):
    op = get_op(name)
    if backend == "torch-cpu":
        pytest.importorskip("torch")
    lens, P, slots, seed = case
    check_case(op, backend, dtype, lens, P, slots, seed, FWD_TOL[dtype])


@pytest.mark.parametrize("name", OPS)
def test_pool_fixed_mix_cpu(name):
    """A fixed case with everything at once: long and short pieces, -1 slots, a zero-length piece, spare slots."""
    op = get_op(name)
    check_case(op, "numpy", "float64", [5, 1, 0, 7, 1, 3], 9, [4, 0, 7, -1, 8, -1], seed=3, tol=1e-12)


@pytest.mark.parametrize("name", OPS)
def test_pool_dense_batch_cpu(name):
    """state_indices without cu_seqlens: a dense batch of B sequences over a pool."""
    op = get_op(name)
    B, T, P, slots = 3, 5, 6, [5, -1, 1]
    dims, x, pool = make_case(op, [T], P, slots, seed=4, dense_B=B)
    y, pool_t, s = run_pool(op, "numpy", "float64", x, pool, None, slots)
    assert s is pool_t
    bax = op.arg(op.output).shape.index("B")
    for i, sl in enumerate(slots):
        xi = {a.name: (np.take(x[a.name], [i], axis=a.shape.index("B")) if "B" in a.shape else x[a.name])
              for a in op.inputs}
        s0 = pool[sl][None] if sl >= 0 else np.zeros((1,) + pool.shape[1:])
        yi, s1 = op.reference_forward(xi, s0)
        assert rel_rms(np.take(y, [i], axis=bax), yi) <= 1e-12
        if sl >= 0:
            assert rel_rms(pool_t[sl], s1[0]) <= 1e-12
    for u in (0, 2, 3, 4):
        np.testing.assert_array_equal(pool_t[u], pool[u])


@pytest.mark.parametrize("name", OPS)
def test_pool_sequential_calls_are_continuation(name):
    """Prefill a slot in chunks over several calls, interleaved with other sequences: same as one dense call."""
    op = get_op(name)
    T, P, slot = 11, 4, 2
    dims, x, pool = make_case(op, [T], P, [slot], seed=5)
    start = pool[slot][None].copy()
    y_ref, s_ref = op.reference_forward(x, start)
    p = pool.copy()
    ys = []
    tax = op.arg(op.output).shape.index("T")
    for a, b in ((0, 4), (4, 5), (5, 11)):
        xi = {arg.name: (np.take(x[arg.name], range(a, b), axis=arg.shape.index("T")) if arg.per_token
                         else x[arg.name]) for arg in op.inputs}
        yi, _ = op(*(xi[arg.name] for arg in op.inputs), state=p, cu_seqlens=[0, b - a], state_indices=[slot])
        ys.append(yi)
    assert rel_rms(np.concatenate(ys, axis=tax), y_ref) <= 1e-12
    assert rel_rms(p[slot], s_ref[0]) <= 1e-12
    for u in range(P):
        if u != slot:
            np.testing.assert_array_equal(p[u], pool[u])


# ----------------------------------------------------------------------------- CPU: bad indices

def _bad_call(op, slots=None, pool_shape=None, pool_dtype=np.float64, lens=(2, 3), P=4, cu=None, state=True):
    dims, x, pool = make_case(op, list(lens), P, [0, 1], seed=0)
    if pool_shape is not None:
        pool = np.zeros(pool_shape)
    pool = pool.astype(pool_dtype)
    before = pool.copy()
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32) if cu is None else cu
    args = [x[a.name] for a in op.inputs]
    try:
        op(*args, state=pool if state else None, cu_seqlens=cu, state_indices=slots)
    finally:
        np.testing.assert_array_equal(pool, before)    # nothing written when the call is refused


BAD = [
    ("out of range", [0, 4], ValueError, r"state_indices.*\[-1, 4\)"),
    ("below -1", [-2, 0], ValueError, "state_indices"),
    ("repeated", [1, 1], ValueError, "state_indices.*repeats"),
    ("float dtype", np.array([0.0, 1.0]), TypeError, "state_indices"),
    ("2-D", np.array([[0, 1]], np.int32), ValueError, "state_indices"),
    ("too short", np.array([0], np.int32), ValueError, "state_indices"),
    ("too long", np.array([0, 1, 2], np.int32), ValueError, "state_indices"),
]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("label,slots,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_state_indices_cpu(name, label, slots, exc, match):
    op = get_op(name)
    with pytest.raises(exc, match=match):
        _bad_call(op, slots=slots)


@pytest.mark.parametrize("name", OPS)
def test_bad_pool_cpu(name):
    op = get_op(name)
    sname = op.state.name
    with pytest.raises(ValueError, match="state_indices.*needs"):
        _bad_call(op, slots=[0, 1], state=False)
    dims, _, pool = make_case(op, [2, 3], 4, [0, 1], seed=0)
    wrong = (4,) + tuple(n + 1 for n in pool.shape[1:])
    with pytest.raises(ValueError, match=sname):
        _bad_call(op, slots=[0, 1], pool_shape=wrong)
    with pytest.raises(TypeError, match=sname):
        _bad_call(op, slots=[0, 1], pool_dtype=np.float16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _bad_call(op, slots=[0, 1], cu=np.array([0, 3, 2], np.int32))


# ----------------------------------------------------------------------------- GPU

GPU_BACKENDS = ["cupy", "torch-cuda"]


def _gpu(backend):
    if not has_gpu():
        pytest.skip("no CUDA GPU")
    if backend == "torch-cuda":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch without CUDA")


def _gpu_N(op):
    return op.head_sizes[0] if op.head_sizes else 8


@pytest.mark.gpu
@pytest.mark.parametrize("device_ints", [False, True], ids=["host-ints", "device-ints"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pool_cases(max_len=40, max_seqs=6))
def test_pool_semantics_gpu(name, backend, device_ints, case):
    _gpu(backend)
    op = get_op(name)
    lens, P, slots, seed = case
    check_case(op, backend, "float32", lens, P, slots, seed, GPU_TOL, N=_gpu_N(op),
               device_ints=device_ints)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_pool_fixed_mix_gpu(name, backend):
    _gpu(backend)
    op = get_op(name)
    for N in (op.head_sizes or (None,)):
        check_case(op, backend, "float32", [65, 1, 0, 17, 1, 16], 9, [4, 0, 7, -1, 8, -1], seed=3, tol=GPU_TOL,
                   N=N or 8, device_ints=True)


def _device_bad_call(op, backend, slots=None, cu=None, lens=(3, 2), P=4):
    dims, x, pool = make_case(op, list(lens), P, [0, 1], seed=1, N=_gpu_N(op))
    xs = [to_backend(x[a.name], backend, "float32") for a in op.inputs]
    pool_d = to_backend(pool, backend, "float32")
    cu = np.concatenate([[0], np.cumsum(lens)]) if cu is None else np.asarray(cu)
    op(*xs, state=pool_d, cu_seqlens=ints_on(cu, backend, True),
       state_indices=ints_on(slots if slots is not None else [0, 1], backend, True))
    return xs, pool_d, cu


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [[0, 4], [-2, 1], [7, 1]], ids=["P", "-2", "far"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_device_side_out_of_range_index_is_reported(name, backend, bad):
    _gpu(backend)
    op = get_op(name)
    rwkvops.check_errors()                         # start clean
    _device_bad_call(op, backend, slots=bad)       # no host check: the kernel must catch it
    with pytest.raises(ValueError, match="state_indices"):
        rwkvops.check_errors()
    rwkvops.check_errors()                         # reported once, then cleared
    # a good call afterwards works and is right
    check_case(op, backend, "float32", [3, 2], 4, [2, -1], seed=9, tol=GPU_TOL, N=_gpu_N(op), device_ints=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_device_side_error_raises_on_next_call(name, backend):
    _gpu(backend)
    op = get_op(name)
    rwkvops.check_errors()
    xs, pool_d, cu = _device_bad_call(op, backend, slots=[4, 0])
    import cupy
    cupy.cuda.Device().synchronize()
    with pytest.raises(ValueError, match="state_indices"):
        op(*xs, state=pool_d, cu_seqlens=ints_on(cu, backend, True), state_indices=ints_on([0, 1], backend, True))
    rwkvops.check_errors()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_device_side_bad_cu_seqlens_is_reported(name, backend):
    _gpu(backend)
    op = get_op(name)
    rwkvops.check_errors()
    _device_bad_call(op, backend, cu=[0, 4, 5])     # valid (lengths 4, 1): nothing reported
    rwkvops.check_errors()
    _device_bad_call(op, backend, cu=[0, 6, 5])     # decreasing, and 6 > 5 tokens
    with pytest.raises(ValueError, match="cu_seqlens"):
        rwkvops.check_errors()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_bad_host_indices_gpu(name, backend):
    """Host-side indices are validated on the host before any launch, on the GPU path too."""
    _gpu(backend)
    op = get_op(name)
    dims, x, pool = make_case(op, [2, 3], 4, [0, 1], seed=0, N=_gpu_N(op))
    xs = [to_backend(x[a.name], backend, "float32") for a in op.inputs]
    pool_d = to_backend(pool, backend, "float32")
    for slots, exc in (([0, 4], ValueError), ([1, 1], ValueError), (np.array([0.0, 1.0]), TypeError)):
        with pytest.raises(exc, match="state_indices"):
            op(*xs, state=pool_d, cu_seqlens=np.array([0, 2, 5], np.int32), state_indices=slots)
    np.testing.assert_array_equal(to_numpy(pool_d), pool.astype(np.float32))
    if backend == "cupy":
        import cupy
        with pytest.raises(TypeError, match="state_indices"):        # device indices must be int32
            op(*xs, state=pool_d, cu_seqlens=np.array([0, 2, 5], np.int32),
               state_indices=cupy.asarray([0, 1], dtype=cupy.int64))
