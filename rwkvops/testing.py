"""Testing helpers for rwkvops and its plugins: error metrics, GPU detection, hypothesis strategies, check_op."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def has_gpu() -> bool:
    """True when CuPy is installed and sees a CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# pytest hooks for the ``gpu`` marker, shared by rwkvops' tests and plugins' tests: a conftest.py imports both
# (``from rwkvops.testing import pytest_configure, pytest_collection_modifyitems``) and GPU tests skip without a GPU.
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slow CPU test")


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    import pytest
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def to_numpy(a) -> np.ndarray:
    """Any array (NumPy, CuPy, torch of any dtype incl. bf16) as a float64 NumPy array."""
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    if hasattr(a, "get"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def rel_rms(a, ref) -> float:
    """||a - ref|| / ||ref|| (RMS relative error); NaN or inf anywhere gives inf, so it never passes."""
    a, ref = to_numpy(a), to_numpy(ref)
    if a.shape != ref.shape:
        raise ValueError(f"rel_rms: shapes differ: {a.shape} vs {ref.shape}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = np.sqrt(np.mean(ref ** 2))
    num = np.sqrt(np.mean((a - ref) ** 2))
    return float(num / den) if den > 0 else float(num)


# ---------------------------------------------------------------- inputs

TOLERANCES = {  # (forward, gradients): relative RMS error against the float64 reference on the same inputs
    "float64": (1e-10, 1e-8),
    "float32": (1e-5, 1e-4),
    "float16": (3e-3, 6e-3),
    "bfloat16": (3e-3, 6e-3),
}


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (float32/float16/bfloat16, round-to-nearest-even) and back to float64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x
    if dtype in ("float32", "float16"):
        return x.astype(dtype).astype(np.float64)
    if dtype == "bfloat16":
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(f"round_to: unknown dtype {dtype!r}")


def default_dims(op, B=2, T=17, H=2, N=None, C=None):
    """Concrete values for every symbol an op declares."""
    syms = {s for a in (*op.inputs, op.state) for s in a.shape if isinstance(s, str)}
    n = N or (op.head_sizes[0] if op.head_sizes else 8)
    vals = {"B": B, "T": T, "H": H, "N": n, "C": C or 16}
    return {s: vals.get(s, 4) for s in syms}


def sample_inputs(op, dims, rng, w_range=(-8.0, 4.0)):
    """Random float64 inputs for ``op`` at ``dims``: the op's own sampler when it declares one."""
    if op.sample_inputs is not None:
        return {k: np.asarray(v, dtype=np.float64) for k, v in op.sample_inputs(rng, dims, w_range).items()}
    out = {}
    for a in op.inputs:
        shape = tuple(dims[s] if isinstance(s, str) else s for s in a.shape)
        out[a.name] = rng.uniform(*w_range, size=shape) if a.name == "w" else rng.standard_normal(shape)
    return out


def sample_state(op, dims, num, rng, scale=0.5):
    """Random valid initial states ``[num, ...]``: the op's own sampler when it declares one."""
    if op.sample_state is not None:
        return np.asarray(op.sample_state(rng, dims, num), dtype=np.float64)
    shape = (num,) + tuple(dims[s] if isinstance(s, str) else s for s in op.state.shape[1:])
    return scale * rng.standard_normal(shape)


# ---------------------------------------------------------------- backends

def _to_backend(a, backend, dtype):
    """A float64 NumPy array as the backend's array of ``dtype``."""
    if backend == "numpy":
        if dtype == "bfloat16":
            raise ValueError("NumPy has no bfloat16; use backend='torch'")
        return np.ascontiguousarray(a.astype(dtype))
    if backend == "cupy":
        import cupy
        if dtype == "bfloat16":
            raise ValueError("CuPy has no bfloat16; use backend='torch-cuda'")
        return cupy.asarray(a.astype(dtype))
    import torch
    dev = "cuda" if backend == "torch-cuda" else "cpu"
    return torch.tensor(a, dtype=getattr(torch, dtype), device=dev)


BACKENDS_CPU = ("numpy", "torch-cpu")
BACKENDS_GPU = ("cupy", "torch-cuda")


def _run(op, backend, dtype, x64, s64, dy64, ds64, cu_seqlens=None):
    """Forward + backward on ``backend``; returns float64 NumPy (y, state_out, grads)."""
    import rwkvops
    x = {k: _to_backend(v, backend, dtype) for k, v in x64.items()}
    sdt = "float64" if dtype == "float64" else "float32"
    st = _to_backend(s64, backend, sdt)
    dy = _to_backend(dy64, backend, dtype)
    ds = _to_backend(ds64, backend, sdt)
    if backend.startswith("torch"):
        import torch
        for t in (*x.values(), st):
            t.requires_grad_(True)
        y, s = op(*x.values(), state=st, cu_seqlens=cu_seqlens)
        acc = torch.float64 if dtype == "float64" else torch.float32
        ((y.to(acc) * dy.to(acc)).sum() + (s * ds).sum()).backward()
        grads = {k: t.grad for k, t in x.items()}
        grads[op.state.name] = st.grad
    else:
        y, s, ctx = rwkvops.forward(op, *x.values(), state=st, cu_seqlens=cu_seqlens)
        grads = rwkvops.backward(ctx, dy, ds)
    return to_numpy(y), to_numpy(s), {k: to_numpy(v) for k, v in grads.items()}


def _reference(op, x64, s64, dy64, ds64):
    y, s = op.reference_forward(x64, s64)
    g = op.reference_backward(x64, s64, dy64, ds64)
    return y, s, g


def check_op(name, backend="numpy", dtype="float32", dims=None, seed=0, w_range=(-8.0, 4.0),
             split=None, varlen=True, tol=None):
    """Compare an op's path on ``backend`` with its float64 NumPy reference; raise AssertionError on a mismatch.

    Checks, on fresh random inputs rounded to ``dtype``, a random initial state and non-zero upstream gradients on
    both outputs: ``y``, the final state and every gradient (the initial state's included); continuation (the
    sequence split at ``split`` and resumed from the first call's state gives the same ``y`` and state); and, with
    ``varlen``, a packed ``cu_seqlens`` call (with a zero-length sequence) against per-sequence references.
    ``backend``: 'numpy', 'torch-cpu', 'cupy' or 'torch-cuda'.  Returns a dict of the measured errors.
    """
    from .registry import get_op
    op = get_op(name) if isinstance(name, str) else name
    dims = dict(dims or default_dims(op))
    rng = np.random.default_rng(seed)
    fwd_tol, grad_tol = tol or TOLERANCES[dtype]
    B = dims["B"]
    x64 = {k: round_to(v, dtype) for k, v in sample_inputs(op, dims, rng, w_range).items()}
    s64 = sample_state(op, dims, B, rng)
    out_shape = x64[op.output].shape
    dy64 = round_to(rng.standard_normal(out_shape), dtype)
    ds64 = rng.standard_normal(s64.shape)
    errors, failures = {}, []

    def compare(label, got, ref, limit):
        e = rel_rms(got, ref)
        errors[label] = e
        if not e <= limit:
            failures.append(f"{label}: rel RMS {e:.3g} > {limit:g}")

    y, s, g = _run(op, backend, dtype, x64, s64, dy64, ds64)
    ry, rs, rg = _reference(op, x64, s64, dy64, ds64)
    compare("y", y, ry, fwd_tol)
    compare("state_out", s, rs, fwd_tol)
    for k in rg:
        compare(f"d{k}", g[k], rg[k], grad_tol)

    # continuation: split along T, resume from the first part's state
    T = dims.get("T", 1)
    if T >= 2:
        t = split if split is not None else int(rng.integers(1, T))
        part1 = {}
        part2 = {}
        for a in op.inputs:
            v = x64[a.name]
            if a.per_token:
                ax = a.shape.index("T")
                part1[a.name] = np.take(v, range(0, t), axis=ax)
                part2[a.name] = np.take(v, range(t, T), axis=ax)
            else:
                part1[a.name] = part2[a.name] = v
        z = np.zeros
        y1, s1, _ = _run(op, backend, dtype, part1, s64, z(part1[op.output].shape), z(s64.shape))
        y2, s2, _ = _run(op, backend, dtype, part2, s1, z(part2[op.output].shape), z(s64.shape))
        ax = op.arg(op.output).shape.index("T")
        compare(f"continuation y (split {t})", np.concatenate([y1, y2], axis=ax), ry, fwd_tol)
        compare(f"continuation state (split {t})", s2, rs, fwd_tol)

    # varlen: B sequences of different lengths (one empty) packed along T
    if varlen and "T" in dims and "B" in dims:
        lens = [int(v) for v in rng.integers(1, max(2, T) + 1, size=3)] + [0]
        rng.shuffle(lens)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        dims1 = dict(dims, B=1, T=int(cu[-1]))
        xv = {k: round_to(v, dtype) for k, v in sample_inputs(op, dims1, rng, w_range).items()}
        sv = sample_state(op, dims, len(lens), rng)
        dyv = round_to(rng.standard_normal(xv[op.output].shape), dtype)
        dsv = rng.standard_normal(sv.shape)
        cu_arg = cu
        if backend == "cupy":
            import cupy
            cu_arg = cupy.asarray(cu)
        elif backend == "torch-cuda":
            import torch
            cu_arg = torch.tensor(cu, device="cuda")
        yv, sv_out, gv = _run(op, backend, dtype, xv, sv, dyv, dsv, cu_seqlens=cu_arg)
        ax = op.arg(op.output).shape.index("T")
        ys, ss = [], []
        grads_ref = {k: np.zeros_like(v) for k, v in xv.items()}
        dst = np.zeros_like(sv)
        for i in range(len(lens)):
            a, b = int(cu[i]), int(cu[i + 1])
            if a == b:
                ss.append(sv[i]); dst[i] = dsv[i]
                continue
            xi = {}
            for arg in op.inputs:
                v = xv[arg.name]
                xi[arg.name] = np.take(v, range(a, b), axis=arg.shape.index("T")) if arg.per_token else v
            yi, si, gi = _reference(op, xi, sv[i:i + 1], np.take(dyv, range(a, b), axis=ax), dsv[i:i + 1])
            ys.append(yi); ss.append(si[0]); dst[i] = gi[op.state.name][0]
            for arg in op.inputs:
                if arg.per_token:
                    idx = [slice(None)] * grads_ref[arg.name].ndim
                    idx[arg.shape.index("T")] = slice(a, b)
                    grads_ref[arg.name][tuple(idx)] = gi[arg.name]
                else:
                    grads_ref[arg.name] += gi[arg.name]
        compare("varlen y", yv, np.concatenate(ys, axis=ax), fwd_tol)
        compare("varlen state_out", sv_out, np.stack(ss), fwd_tol)
        for k in grads_ref:
            compare(f"varlen d{k}", gv[k], grads_ref[k], grad_tol)
        compare(f"varlen d{op.state.name}", gv[op.state.name], dst, grad_tol)
    if failures:
        raise AssertionError(f"check_op({op.name!r}, backend={backend!r}, dtype={dtype!r}, dims={dims}, "
                             f"seed={seed}):\n  " + "\n  ".join(failures))
    return errors


# ---------------------------------------------------------------- hypothesis strategies

def _st():
    from hypothesis import strategies as st
    return st


def seq_lengths(max_T=300):
    """T values always exercising the chunk edges, plus random ones."""
    st = _st()
    return st.one_of(st.sampled_from([1, 15, 16, 17, 63, 64, 65]), st.integers(1, max_T))


def shapes(op, max_B=3, max_T=300, max_H=4, head_sizes=None, channels=(8, 16, 32)):
    """Dicts of symbol values for ``op`` (B 1..max_B, T via :func:`seq_lengths`, H 1..max_H, N from head_sizes)."""
    st = _st()
    syms = {s for a in (*op.inputs, op.state) for s in a.shape if isinstance(s, str)}
    parts = {"B": st.integers(1, max_B), "T": seq_lengths(max_T), "H": st.integers(1, max_H),
             "N": st.sampled_from(head_sizes or (op.head_sizes or (8,))), "C": st.sampled_from(channels)}
    return st.fixed_dictionaries({s: parts.get(s, st.integers(1, 4)) for s in syms})


def dtypes(gpu=False):
    st = _st()
    return st.sampled_from(("float32", "float16", "bfloat16") if gpu else ("float32", "float64"))


def decay_ranges():
    """(lo, hi) ranges of raw w: from near-1 decays (w << 0) to near-0 decays (w up to 4)."""
    st = _st()
    return st.sampled_from([(-8.0, -4.0), (-4.0, 0.0), (0.0, 4.0), (-8.0, 4.0)])


def split_points(T):
    st = _st()
    return st.integers(0, T)


# ---------------------------------------------------------------- finite differences

def finite_difference_check(forward, backward, x: dict, state, dy, dstate, eps=1e-6, rtol=1e-6, atol=1e-8):
    """Check a reference backward against central finite differences of its forward (float64, small shapes).

    ``forward(x, state) -> (y, state_out)``; ``backward(x, state, dy, dstate) -> {name: grad, ..., 'state': grad}``
    (the reference signatures).  The loss is ``sum(dy * y) + sum(dstate * state_out)``; every element of every
    input and of the initial state is perturbed.  Raises AssertionError naming the first wrong gradient.
    """
    def loss(xx, ss):
        y, s = forward(xx, ss)
        return float(np.sum(dy * y) + np.sum(dstate * s))

    grads = backward(x, state, dy, dstate)
    for name in (*x, "state"):
        base = state if name == "state" else x[name]
        fd = np.zeros_like(base, dtype=np.float64)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            if name == "state":
                fp, fm = loss(x, plus), loss(x, minus)
            else:
                fp, fm = loss({**x, name: plus}, state), loss({**x, name: minus}, state)
            fd[idx] = (fp - fm) / (2 * eps)
        g = grads["state" if name == "state" else name]
        assert g.shape == base.shape, f"gradient of {name!r} has shape {g.shape}, expected {base.shape}"
        np.testing.assert_allclose(g, fd, rtol=rtol, atol=atol, err_msg=f"gradient of {name!r}")
    return grads
