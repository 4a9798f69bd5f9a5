"""The one validation layer: every call is checked against its op's declaration before anything runs.

Errors name the op, the argument, what was expected and what was given.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _arrays

CPU_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclasses.dataclass
class Plan:
    kind: str                 # the callers' array kind
    device: tuple             # ('cpu', None) or ('cuda', index)
    dtype: str                # the inputs' common dtype
    dims: dict                # bound symbols, e.g. {'B': 2, 'T': 17, 'H': 4, 'N': 64}
    num_seqs: int             # sequences in this call (B, or len(cu_seqlens) - 1)
    varlen: bool
    pool: bool                # state_indices given: state is a pool updated in place
    cu_host: object = None    # cu_seqlens as a host int64 array, when it was given on the host
    idx_host: object = None   # state_indices as a host int32 array, when given on the host
    cached: bool = False      # kept in the op's plan cache (its checks read only array metadata)
    launch: object = None     # torch inference: the rwkvops._gpu.LaunchPlan recorded for this signature, or
                              # False once recording gave up (see rwkvops._dispatch._gpu_forward)
    launch_tries: int = 0
    launch_why: str = None    # why the last recording made no plan (rwkvops._gpu.Recorder.why)
    replay_miss: str = None   # why the last replay of ``launch`` was skipped (diagnostics only)
    same: object = None       # rwkvops._validate.same_signature of a replayed call (False: none to be had)

    @property
    def gpu(self) -> bool:
        return self.device[0] == "cuda"

    def state_shape(self, op) -> tuple:
        """Shape of one state per sequence, ``[num_seqs, ...]`` (computed once per cached plan)."""
        st = self.__dict__.get("_state_shape")
        if st is None:
            st = self.__dict__["_state_shape"] = ((self.num_seqs,) + tuple(self.dims.get(s, s)
                                                                           for s in op.state.shape[1:]))
        return st


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _host_ints(name, op, x):
    """cu_seqlens / state_indices given on the host (list, tuple, NumPy, CPU tensor) as an int64 array."""
    if _arrays.is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{op.name}: {name!r} must be 1-D, got shape {tuple(a.shape)}")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"{op.name}: {name!r} must hold integers (int32), got dtype {a.dtype}")
    return a.astype(np.int64)


_PLANS_MAX = 1024        # plans cached per op (call signature -> Plan), in op.__dict__["_plans"] (which also holds
                         # the op's last replayed plan: rwkvops._dispatch.LAST_REPLAY)


_TENSOR = None           # torch.Tensor once torch is imported (looked up once: the signature runs on every call)


def _call_signature(op, x: dict, state, cu_seqlens, state_indices):
    return signature((*x.values(), state, cu_seqlens, state_indices))


def signature(arrays):
    """What every check below depends on (for device-side index arrays), or None when an object has no cheap
    metadata (lists, generic DLPack producers).  ``arrays``: the inputs in the op's argument order, then state,
    cu_seqlens, state_indices.  One tuple with an entry per array: a tensor's (shape, dtype, device index,
    contiguous), None for None, any other array its ``_arrays.signature`` (a tuple starting with a string, so it
    never equals a tensor's)."""
    global _TENSOR
    Tensor = _TENSOR
    if Tensor is None:
        torch = _arrays._torch()
        Tensor = () if torch is None else torch.Tensor
        if torch is not None:
            _TENSOR = Tensor
    key = []
    for a in arrays:
        if isinstance(a, Tensor):      # the hot case, inlined: _arrays.signature costs a call per array
            key.append((a.shape, a.dtype, a.get_device(), a.is_contiguous()))
        elif a is None:
            key.append(None)
        else:
            k = _arrays.signature(a)
            if k is None:
                return None
            key.append(k)
    return tuple(key)   # host-side index arrays get a key too, but their plans (cu_host/idx_host) are never cached


def tensor_key(arrays):
    """``(signature(arrays), data pointers of the arrays not None, the OR of those pointers)`` when every array is a
    plain ``torch.Tensor`` or None, else None: the signature (the same tuple :func:`signature` makes of them) and
    what a launch-plan replay binds and checks, read in one pass (five C calls per tensor, the least that reads
    all of it; a decode call passes up to nine tensors).  One tuple per tensor appended, not four entries: the
    loop is the host cost of a decode step, and list.append of one tuple is the cheapest way to build the key."""
    Tensor = _TENSOR
    if Tensor is None:
        return None              # no tensor seen yet (signature() looks torch up)
    key = []
    ptrs = []
    acc = 0
    for a in arrays:
        if type(a) is Tensor:
            key.append((a.shape, a.dtype, a.get_device(), a.is_contiguous()))
            p = a.data_ptr()
            ptrs.append(p)
            acc |= p
        elif a is None:
            key.append(None)
        else:
            return None          # subclasses and other arrays: signature() and the general checks
    return tuple(key), ptrs, acc


def same_signature(arrays):
    """``same(others) -> bool``: True only where ``signature(others) == signature(arrays)``, for a plain-tensor
    call (``arrays`` as :func:`tensor_key` takes them); None where torch lacks the check.  The tensors are checked
    in one C call, torch's own guard of compiled graphs (dynamo's ``TensorGuards``: exact Python type, dtype,
    device, dispatch keys, sizes and strides), which is stricter than the signature: what it rejects takes the
    key, so it never admits another signature and at worst costs a lookup."""
    nones = tuple(i for i, a in enumerate(arrays) if a is None)
    ts = [a for a in arrays if a is not None]
    try:
        check = _arrays._torch()._C._dynamo.guards.TensorGuards(
            *ts, tensor_check_names=[f"a{i}" for i in range(len(ts))],
            dynamic_dims_sizes=[list(a.shape) for a in ts], dynamic_dims_strides=[list(a.stride()) for a in ts]).check
        if not check(*ts):
            return None
    except Exception:        # a torch without it (a private API), or one whose constructor differs
        return None

    def same(others):
        for i in nones:
            if others[i] is not None:
                return False
        try:
            return check(*[a for a in others if a is not None])
        except TypeError:    # fewer arrays than recorded (a None where a tensor was)
            return False
    return same


def cached_plan(op, arrays):
    """The cached :class:`Plan` of a call whose ``arrays`` (as :func:`signature` takes them) have these metadata,
    or None (first call of a signature, or no cheap metadata): then :func:`check_call`."""
    plans = op.__dict__.get("_plans")
    if plans is None:
        return None
    key = signature(arrays)
    return None if key is None else plans.get(key)


def check_call(op, x: dict, state, cu_seqlens, state_indices) -> Plan:
    """Validate one call against ``op``'s declaration and return its :class:`Plan` (raises TypeError/ValueError
    naming the argument).  Plans of calls whose checks read only array metadata (type, shape, dtype, device,
    contiguity: everything but host-side index values) are cached by that metadata, so a decode loop pays the
    full checks once; a call that fails is never cached, and a cached plan is exactly what the checks returned."""
    key = _call_signature(op, x, state, cu_seqlens, state_indices)
    plans = op.__dict__.get("_plans")
    if plans is None:
        plans = op.__dict__["_plans"] = {}
    if key is not None:
        plan = plans.get(key)
        if plan is not None:
            return plan
    plan = _check_call(op, x, state, cu_seqlens, state_indices)
    if key is not None and plan.cu_host is None and plan.idx_host is None:
        if len(plans) >= _PLANS_MAX:
            plans.clear()
        plan.cached = True
        plans[key] = plan
    return plan


def _check_device_ints(name, arg, a, device):
    """A device index array is read by the kernels as flat int32 memory on the inputs' device."""
    d = _arrays.device_of(a)
    if d != device:
        raise ValueError(f"{name}: {arg!r} is on cuda:{d[1]} but the inputs are on cuda:{device[1]}")
    if not _arrays.is_c_contiguous(a):
        raise ValueError(f"{name}: {arg!r} must be C-contiguous on the GPU (call .contiguous()); got strides "
                         f"{a.stride() if _arrays.is_torch(a) else getattr(a, 'strides', None)}")


def _check_call(op, x: dict, state, cu_seqlens, state_indices) -> Plan:
    name = op.name
    arrays = dict(x)
    if state is not None:
        arrays[op.state.name] = state
    for k, a in arrays.items():
        if not _is_array(a) and not hasattr(a, "__dlpack__"):
            raise TypeError(f"{name}: argument {k!r} must be an array (NumPy, CuPy, torch, DLPack), "
                            f"got {type(a).__name__}")
    info = {k: _arrays.describe(a) for k, a in arrays.items()}
    kinds = {k: i[0] for k, i in info.items()}
    first = next(iter(arrays))
    if len(set(kinds.values())) > 1:
        raise TypeError(f"{name}: all arrays must be of one type; got " +
                        ", ".join(f"{k}: {v}" for k, v in kinds.items()))
    devices = {k: i[1] for k, i in info.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{name}: all arrays must be on one device; got " +
                         ", ".join(f"{k}: {d[0]}" + ("" if d[1] is None else f":{d[1]}") for k, d in devices.items()))
    device = devices[first]
    kind = kinds[first]
    gpu = device[0] == "cuda"

    # shapes: bind symbols in declaration order
    dims: dict = {}
    where: dict = {}
    for arg in op.inputs:
        a = x[arg.name]
        shape = tuple(a.shape)
        if len(shape) != len(arg.shape):
            raise ValueError(f"{name}: {arg.name!r} must be a {len(arg.shape)}-D array {_fmt(arg.shape)}, "
                             f"got a {len(shape)}-D array of shape {shape}")
        for sym, n in zip(arg.shape, shape):
            if isinstance(sym, int):
                if n != sym:
                    raise ValueError(f"{name}: {arg.name!r} must have shape {_fmt(arg.shape)}, got {shape}")
            elif sym in dims and dims[sym] != n:
                want = tuple(dims.get(s, s) if not isinstance(s, int) else s for s in arg.shape)
                raise ValueError(f"{name}: {arg.name!r} has shape {shape} but {_fmt(arg.shape)} requires "
                                 f"{_fmt(want)} ({sym}={dims[sym]} from {where[sym]!r})")
            else:
                dims.setdefault(sym, n)
                where.setdefault(sym, arg.name)
    for sym, n in dims.items():
        if n < 1 and sym != "T":
            raise ValueError(f"{name}: dimension {sym} (from {where[sym]!r}) must be >= 1, got {n}")

    # dtypes
    dtypes = {a.name: info[a.name][2] for a in op.inputs}
    dtype = dtypes[op.inputs[0].name]
    for k, d in dtypes.items():
        if d != dtype:
            raise TypeError(f"{name}: all inputs must share one dtype; {k!r} is {d} but "
                            f"{op.inputs[0].name!r} is {dtype}")
    allowed = op.dtypes if gpu else CPU_DTYPES
    if dtype not in allowed:
        where_ = "on the GPU" if gpu else "on the CPU"
        raise TypeError(f"{name}: {where_} inputs must be one of {', '.join(allowed)}; got {dtype}")
    if gpu and op.head_sizes is not None and dims.get("N") not in op.head_sizes:
        raise ValueError(f"{name}: head size N={dims.get('N')} (from {where.get('N')!r}) is not supported on the GPU; "
                         f"supported: {', '.join(map(str, op.head_sizes))}")
    if gpu:
        for k, a in arrays.items():
            if not info[k][3]:
                raise ValueError(f"{name}: {k!r} must be C-contiguous on the GPU (call .contiguous() or "
                                 f"cupy.ascontiguousarray); got shape {tuple(a.shape)}, strides {getattr(a, 'strides', None)}")

    # sequences
    varlen = cu_seqlens is not None
    cu_host = idx_host = None
    if varlen:
        if dims.get("B") != 1:
            raise ValueError(f"{name}: with cu_seqlens the batch must be 1 (sequences packed along T), "
                             f"got B={dims.get('B')}")
        cu_on_device = _is_array(cu_seqlens) and _arrays.kind_of(cu_seqlens) == kind and gpu \
            and _arrays.device_of(cu_seqlens)[0] == "cuda"
        if cu_on_device:
            if len(cu_seqlens.shape) != 1 or cu_seqlens.shape[0] < 2:
                raise ValueError(f"{name}: 'cu_seqlens' must be 1-D with at least 2 entries, got shape "
                                 f"{tuple(cu_seqlens.shape)}")
            if _arrays.dtype_name(cu_seqlens) != "int32":
                raise TypeError(f"{name}: 'cu_seqlens' on the GPU must be int32, got {_arrays.dtype_name(cu_seqlens)}")
            _check_device_ints(name, "cu_seqlens", cu_seqlens, device)
            num_seqs = int(cu_seqlens.shape[0]) - 1
        else:
            cu_host = _host_ints("cu_seqlens", op, cu_seqlens)
            if cu_host.size < 2:
                raise ValueError(f"{name}: 'cu_seqlens' must have at least 2 entries [0, ..., T], got {cu_host.tolist()}")
            T = dims.get("T", 0)
            if cu_host[0] != 0 or cu_host[-1] != T or np.any(np.diff(cu_host) < 0):
                raise ValueError(f"{name}: 'cu_seqlens' must be non-decreasing from 0 to T={T}, "
                                 f"got {cu_host.tolist()[:8]}{'...' if cu_host.size > 8 else ''}")
            num_seqs = cu_host.size - 1
    else:
        if dims.get("T", 1) < 1:
            raise ValueError(f"{name}: T must be >= 1 without cu_seqlens, got T=0")
        num_seqs = dims.get("B", 1)

    # state
    pool = state_indices is not None
    st = op.state
    if pool and state is None:
        raise ValueError(f"{name}: 'state_indices' needs 'state' (the pool {_fmt(('P',) + tuple(st.shape[1:]))})")
    if state is not None:
        want = tuple(dims.get(s, s) for s in st.shape[1:])
        shape = tuple(state.shape)
        lead = "P (pool size)" if pool else ("number of sequences" if varlen else "B")
        if len(shape) != len(st.shape) or shape[1:] != want or (not pool and shape[0] != num_seqs):
            exp = ("P" if pool else str(num_seqs),) + want
            raise ValueError(f"{name}: {st.name!r} must have shape {_fmt(st.shape)} = {_fmt(exp)} "
                             f"(leading dimension: {lead}), got {shape}")
        sd = info[st.name][2]
        ok = ("float32",) if gpu else ("float32", "float64")
        if sd not in ok:
            raise TypeError(f"{name}: {st.name!r} must be {' or '.join(ok)} (states are kept in fp32), got {sd}")
    if pool:
        pool_size = int(state.shape[0])
        idx_on_device = _is_array(state_indices) and gpu and _arrays.kind_of(state_indices) == kind \
            and _arrays.device_of(state_indices)[0] == "cuda"
        if idx_on_device:
            if tuple(state_indices.shape) != (num_seqs,):
                raise ValueError(f"{name}: 'state_indices' must have shape [{num_seqs}] (one slot per sequence), "
                                 f"got {tuple(state_indices.shape)}")
            if _arrays.dtype_name(state_indices) != "int32":
                raise TypeError(f"{name}: 'state_indices' on the GPU must be int32, "
                                f"got {_arrays.dtype_name(state_indices)}")
            _check_device_ints(name, "state_indices", state_indices, device)
        else:
            idx_host = _host_ints("state_indices", op, state_indices)
            if idx_host.shape != (num_seqs,):
                raise ValueError(f"{name}: 'state_indices' must have shape [{num_seqs}] (one slot per sequence), "
                                 f"got {tuple(idx_host.shape)}")
            bad = idx_host[(idx_host < -1) | (idx_host >= pool_size)]
            if bad.size:
                raise ValueError(f"{name}: 'state_indices' must lie in [-1, {pool_size}) for a pool of "
                                 f"{pool_size} slots, got {bad[:8].tolist()}")
            used = idx_host[idx_host >= 0]
            if np.unique(used).size != used.size:
                vals, counts = np.unique(used, return_counts=True)
                raise ValueError(f"{name}: 'state_indices' repeats slots {vals[counts > 1][:8].tolist()}; "
                                 "each sequence needs its own slot")
            idx_host = idx_host.astype(np.int32)
    return Plan(kind=kind, device=device, dtype=dtype, dims=dims, num_seqs=num_seqs, varlen=varlen, pool=pool,
                cu_host=cu_host, idx_host=idx_host)
