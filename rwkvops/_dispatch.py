"""Running an op: bind arguments, validate, pick the CPU or GPU path, bridge arrays, autograd for torch.

The Chainer-style pair :func:`forward` / :func:`backward` is the whole engine; ``op(...)`` and the torch
autograd function are thin layers on it.

Inference on torch CUDA tensors (a decode loop) has a shortcut: the first call of a signature (shapes, dtypes,
devices, contiguity: the key of the cached validation plan) records its launches into a launch plan
(:mod:`rwkvops._gpu`); a repeat call looks its validation plan up from the arrays' metadata and replays that plan
on the new data pointers (:func:`_replay`): no launch views, no launcher code, one cuLaunchKernel per kernel.
A decode loop calls each op with one signature, so a call is first offered to the op's last replayed plan, whose
``same`` (:func:`rwkvops._validate.same_signature`) confirms the signature in one C call; any other call builds
the key.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _arrays, _gpu
from ._validate import Plan, cached_plan, check_call, same_signature, tensor_key


@dataclasses.dataclass
class Context:
    """What :func:`forward` keeps for :func:`backward`: compute arrays and the launch description."""

    op: object
    plan: Plan
    bridge: object
    x: dict                   # compute arrays (NumPy or CuPy) of the inputs
    state_in: object          # initial states as used, [num_seqs, ...] (CPU) or the caller's state (GPU)
    seqs: object              # CPU: list of (start, end) or None; GPU: _gpu.Seqs
    saved: object = None      # what the GPU forward returned for its backward
    state_given: bool = False


@dataclasses.dataclass
class GpuCall:
    """Passed to an op's GPU launchers: what they need to know about this call."""

    op: object
    dtype: str
    dims: dict
    seqs: object
    empty: object             # empty(shape, dtype_name) -> CuPy array from the caller's allocator


def _bind(op, args, kwargs):
    names = op.input_names
    if not kwargs and len(args) == len(names):
        return dict(zip(names, args))      # the common positional call
    if len(args) > len(names):
        raise TypeError(f"{op.name}() takes {len(names)} array arguments ({', '.join(names)}), got {len(args)}")
    x = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"{op.name}() got an unexpected argument {k!r}; expected {', '.join(names)}, "
                            f"state, cu_seqlens, state_indices")
        if k in x:
            raise TypeError(f"{op.name}() got argument {k!r} twice")
        x[k] = v
    missing = [n for n in names if n not in x]
    if missing:
        raise TypeError(f"{op.name}() is missing argument(s) {', '.join(map(repr, missing))}")
    return {n: x[n] for n in names}       # the op's argument order (plan signatures and launch plans rely on it)


def _prepare(op, args, kwargs, state, cu_seqlens, state_indices):
    x = _bind(op, args, kwargs)
    plan = check_call(op, x, state, cu_seqlens, state_indices)
    bridge = _arrays.make_bridge(plan.kind, plan.device)
    return x, plan, bridge


def call_op(op, *args, state=None, cu_seqlens=None, state_indices=None, **kwargs):
    """``op(*inputs, state=None, cu_seqlens=None, state_indices=None) -> (y, state_out)``."""
    names = op.input_names
    if kwargs or len(args) != len(names):
        args = tuple(_bind(op, args, kwargs).values())
    arrays = (*args, state, cu_seqlens, state_indices)
    plans = op.__dict__.get("_plans")
    plan = last = ptrs = None
    acc = 0
    if plans is not None:
        # a decode loop repeats one signature per op: first the op's last replayed plan, confirmed by one C check
        # of the tensors (its ``same``); else the key, read with the replay's pointers in one pass for plain tensors
        last = plans.get(LAST_REPLAY)
        if last is not None and last.same(arrays):
            plan = last
        else:
            hit = tensor_key(arrays)
            if hit is None:
                plan = cached_plan(op, arrays)     # the checks' result, from metadata alone
            else:
                plan = plans.get(hit[0])
                ptrs, acc = hit[1], hit[2]
    x = None
    if plan is None:
        x = dict(zip(names, args))
        plan = check_call(op, x, state, cu_seqlens, state_indices)
    if plan.kind == "torch":
        # autograd only when something needs a gradient: inference (no_grad, or plain tensors) skips the
        # autograd Function and runs the lean launch path below
        if _wants_grad(args, state):
            if plan.pool:
                raise ValueError(f"{op.name}: gradients through a state pool (state_indices) are not supported; "
                                 "pass the initial states as a batch [num_seqs, ...] instead")
            from ._torch import apply
            return apply(op, plan, _arrays.make_bridge(plan.kind, plan.device), dict(zip(names, args)), state,
                         cu_seqlens, state_indices)
        lp = plan.launch
        if lp and LAUNCH_PLANS:
            out = _replay(plan, lp, arrays, ptrs, acc)
            if out is not None:
                if plan is not last:
                    _remember(plans, plan, arrays)
                return out
    bridge = _arrays.make_bridge(plan.kind, plan.device)
    x = x or dict(zip(names, args))
    y, s, _ = _forward(op, plan, bridge, x, state, cu_seqlens, state_indices, save=False)
    return y, s


LAST_REPLAY = "last replay"   # the key of an op's last replayed plan in its plan cache (keys are otherwise tuples)


def _remember(plans, plan, arrays):
    """Make ``plan`` its op's last replayed plan (``arrays``: a call of its signature that it served).  Kept in the
    plan cache itself, so that clearing the cache drops it too."""
    if plan.same is None:
        plan.same = same_signature(arrays) or False
    if plan.same and plans is not None and plan.cached:
        plans[LAST_REPLAY] = plan


_GRAD_ENABLED = None     # torch.is_grad_enabled, looked up once torch is in use


def _wants_grad(args, state) -> bool:
    """Whether a torch call must go through autograd: grad mode on and an input or the state requiring grad."""
    global _GRAD_ENABLED
    if _GRAD_ENABLED is None:
        _GRAD_ENABLED = _arrays._torch().is_grad_enabled
    if not _GRAD_ENABLED():
        return False
    if state is not None and state.requires_grad:
        return True
    for t in args:
        if t.requires_grad:
            return True
    return False


def _replay(plan, lp, arrays, ptrs=None, acc=0):
    """A torch inference call through its launch plan (see rwkvops._gpu): ``(y, state_out)``, or None when this
    call must take the general path (an array off a 16-byte boundary, another current device, changed launcher
    settings: the plan is then dropped and recorded again).  ``arrays``: the call's inputs, state, cu_seqlens,
    state_indices (None where not given: the same ones as at the recording, by the signature); ``ptrs``: their
    data pointers, those not None, and ``acc`` their OR (:func:`rwkvops._validate.tensor_key`), or None to read
    them here."""
    if ptrs is None:
        ptrs = [a.data_ptr() for a in arrays if a is not None]     # the recorder's source order
        for p in ptrs:
            acc |= p
    if acc & 15 or lp.get_device() != lp.device:
        plan.replay_miss = "an array off a 16-byte boundary, or another current device"
        return None
    if not lp.current():
        plan.replay_miss = "launcher settings changed: " + lp.changed()
        plan.launch = None          # recorded again by this call (see _MAX_RECORDINGS)
        if lp.used:
            plan.launch_tries = 0
        return None
    if lp.err_word.value:
        _gpu.raise_pending_error(lp.device)
    outs = []
    for new in lp.alloc:
        t = new()
        outs.append(t)
        ptrs.append(t.data_ptr())
    if lp.scratch is not None:
        scratch = lp.scratch()     # freed after the launches: stream-ordered, like call.empty
        base = scratch.data_ptr()
        ptrs += [base + o for o in lp.temps]
    if not lp.launch(ptrs, lp.raw_stream()):
        plan.launch, plan.launch_why = False, "a replayed launch failed"   # the general path from now on
        plan.replay_miss = f"{plan.launch_why}: {lp.failed}"
        return None
    lp.used = True
    r0, r1 = lp.results
    n = len(arrays)
    return (arrays[r0] if r0 < n else outs[r0 - n]), (arrays[r1] if r1 < n else outs[r1 - n])


def forward(op, *args, state=None, cu_seqlens=None, state_indices=None, **kwargs):
    """Explicit forward for NumPy/CuPy callers: ``-> (y, state_out, ctx)``; pass ``ctx`` to :func:`backward`."""
    x, plan, bridge = _prepare(op, args, kwargs, state, cu_seqlens, state_indices)
    if plan.pool:
        raise ValueError(f"{op.name}: forward-for-backward through a state pool is not supported; "
                         "pass the initial states as a batch [num_seqs, ...] instead")
    return _forward(op, plan, bridge, x, state, cu_seqlens, state_indices, save=True)


def backward(ctx: Context, dy=None, dstate=None) -> dict:
    """Gradients of ``sum(dy * y) + sum(dstate * state_out)`` w.r.t. every input and the initial state.

    Returns ``{input name: grad, ..., state name: grad}``, each in the caller's array type; input gradients in
    the inputs' dtype (parameters shared by the batch summed), the state gradient in fp32 (float64 on the CPU
    path for float64 inputs).  ``dy``/``dstate`` of None count as zeros.
    """
    op, plan, bridge = ctx.op, ctx.plan, ctx.bridge
    with bridge.stream():
        dy_c = None if dy is None else bridge.to_compute(_contig(dy))
        ds_c = None if dstate is None else bridge.to_compute(_contig(dstate))
        if plan.gpu:
            call = GpuCall(op, plan.dtype, plan.dims, ctx.seqs, bridge.empty)
            grads = op.gpu_backward(call, ctx.x, ctx.state_in, ctx.saved, dy_c, ds_c)
        else:
            grads = _cpu_backward(op, ctx, dy_c, ds_c)
        out = {}
        for a in op.inputs:
            out[a.name] = bridge.from_compute(grads[a.name], plan.dtype if plan.gpu else _cpu_out_dtype(plan))
        st = grads[op.state.name]
        out[op.state.name] = bridge.from_compute(st, "float64" if (not plan.gpu and plan.dtype == "float64")
                                                 else "float32")
    return out


def _contig(a):
    """Upstream gradients may arrive strided (autograd expands zeros); kernels need C order."""
    if _arrays.is_torch(a):
        return a.contiguous()
    if _arrays.is_cupy(a):
        import cupy
        return cupy.ascontiguousarray(a)
    return a


def _cpu_out_dtype(plan):
    return plan.dtype


def _forward(op, plan, bridge, x, state, cu_seqlens, state_indices, save):
    if plan.gpu:
        _gpu.raise_pending_error(plan.device[1])
    # Inference on a bridge that has them: launch views (pointer, shape, dtype) instead of CuPy arrays, outputs
    # from the caller's allocator as the same views (the host cost of a decode step is mostly per-array objects).
    light = not save and bridge.light_views
    to = bridge.view if light else bridge.to_compute
    # the first inference call of a cached plan records its launches: repeats replay them (rwkvops._gpu)
    rec = _gpu.Recorder() if light and plan.cached and plan.launch is None and LAUNCH_PLANS else None
    with bridge.stream():
        xc = {k: to(v) for k, v in x.items()}
        sc = None if state is None else to(state)
        if plan.gpu:
            y, s_out, ctx = _gpu_forward(op, plan, bridge, xc, sc, cu_seqlens, state_indices, save, light, rec)
        else:
            y, s_out, ctx = _cpu_forward(op, plan, bridge, xc, sc, save)
        y = bridge.from_compute(y, plan.dtype)
        s_dtype = "float64" if (not plan.gpu and plan.dtype == "float64") else "float32"
        s_out = state if plan.pool else bridge.from_compute(s_out, s_dtype)
    if ctx is not None:
        ctx.state_given = state is not None
    return y, s_out, ctx


# ---------------------------------------------------------------- CPU path (NumPy references)

def _compute_dtype(plan):
    return np.float64 if plan.dtype == "float64" else np.float32


def _split(op, xc, start, end):
    """Inputs of one sequence [start, end) of a packed (B = 1) call."""
    out = {}
    for a in op.inputs:
        v = xc[a.name]
        if a.per_token:
            ax = a.shape.index("T")
            v = v[(slice(None),) * ax + (slice(start, end),)]
        out[a.name] = v
    return out


def _cpu_forward(op, plan, bridge, xc, sc, save):
    ct = _compute_dtype(plan)
    xc = {k: np.asarray(v, dtype=ct) for k, v in xc.items()}
    S = plan.num_seqs
    st_shape = (S,) + tuple(plan.dims.get(s, s) for s in op.state.shape[1:])
    if sc is None:
        s0 = np.zeros(st_shape, ct)
    elif plan.pool:
        idx = plan.idx_host
        s0 = np.zeros(st_shape, ct)
        s0[idx >= 0] = sc[idx[idx >= 0]]
    else:
        s0 = np.array(sc, dtype=ct)
    if plan.varlen:
        cu = plan.cu_host
        seqs = [(int(cu[i]), int(cu[i + 1])) for i in range(S)]
        ys, s1 = [], np.empty_like(s0)
        for i, (a, b) in enumerate(seqs):
            xi = _split(op, xc, a, b)
            if b > a:
                yi, s1[i:i + 1] = op.reference_forward(xi, s0[i:i + 1])
            else:
                yi, s1[i] = np.zeros_like(xi[op.output]), s0[i]
            ys.append(yi)
        ax = op.arg(op.output).shape.index("T")
        y = np.concatenate(ys, axis=ax) if ys else np.zeros_like(xc[op.output])
    else:
        seqs = None
        y, s1 = op.reference_forward(xc, s0)
    if plan.pool:
        idx = plan.idx_host
        keep = idx >= 0
        sc[idx[keep]] = s1[keep]  # in place, into the caller's pool (a view of its memory)
        s_out = sc
    else:
        s_out = s1
    ctx = Context(op, plan, bridge, xc, s0, seqs) if save else None
    return y, s_out, ctx


def _cpu_backward(op, ctx, dy, ds):
    plan = ctx.plan
    ct = _compute_dtype(plan)
    x, s0 = ctx.x, ctx.state_in
    dy = np.zeros_like(x[op.output]) if dy is None else np.asarray(dy, dtype=ct)
    ds = np.zeros_like(s0) if ds is None else np.asarray(ds, dtype=ct)
    if ctx.seqs is None:
        return op.reference_backward(x, s0, dy, ds)
    grads = {a.name: np.zeros_like(x[a.name]) for a in op.inputs}
    dstate = np.empty_like(s0)
    oax = op.arg(op.output).shape.index("T")
    for i, (a, b) in enumerate(ctx.seqs):
        if b == a:
            dstate[i] = ds[i]
            continue
        xi = _split(op, x, a, b)
        dyi = dy[(slice(None),) * oax + (slice(a, b),)]
        gi = op.reference_backward(xi, s0[i:i + 1], dyi, ds[i:i + 1])
        for arg in op.inputs:
            if arg.per_token:
                ax = arg.shape.index("T")
                grads[arg.name][(slice(None),) * ax + (slice(a, b),)] = gi[arg.name]
            else:
                grads[arg.name] += gi[arg.name]
        dstate[i] = gi[op.state.name][0]
    grads[op.state.name] = dstate
    return grads


# ---------------------------------------------------------------- GPU path

def _device_ints(bridge, host, given, light=False):
    """A host-validated int array uploaded as int32, or the caller's device array as a view."""
    import cupy
    if host is not None:
        return cupy.asarray(host.astype(np.int32))
    return bridge.view(given) if light else bridge.to_compute(given)


LAUNCH_PLANS = True  # record and replay launch plans for torch inference calls (False: always the general path)
_RECORD_TRIES = 3    # recordings of a signature that may fail (e.g. aliased inputs) before it keeps the general path
_MAX_RECORDINGS = 16  # recordings of a signature with no replay in between (a launcher setting that changes on
                      # every call): then the general path


def _gpu_forward(op, plan, bridge, xc, sc, cu_seqlens, state_indices, save, light=False, rec=None):
    Seqs = _gpu.Seqs
    S = plan.num_seqs
    T = plan.dims.get("T", 0)
    cu = None if not plan.varlen else _device_ints(bridge, plan.cu_host, cu_seqlens, light)
    idx = None if not plan.pool else _device_ints(bridge, plan.idx_host, state_indices, light)
    B = plan.dims.get("B", 1)
    seqs = Seqs(num=S, T=0 if plan.varlen else T, total=B * T, cu_seqlens=cu, state_idx=idx,
                pool_size=0 if sc is None else int(sc.shape[0]))
    empty = bridge.empty_view if light else bridge.empty
    if rec is not None:
        for v in (*xc.values(), sc, cu, idx):   # the order _replay gathers pointers in
            if v is not None:
                rec.source(v)
        empty = rec.empty(empty)
    if plan.pool:
        s_out = sc
    else:
        s_out = empty(plan.state_shape(op), "float32")
    call = GpuCall(op, plan.dtype, plan.dims, seqs, empty)
    if rec is None:
        y, saved = op.gpu_forward(call, xc, sc, s_out, save)
    else:
        with rec:
            y, saved = op.gpu_forward(call, xc, sc, s_out, save)
        lp = rec.finish((y, s_out), plan.device[1], _gpu.launcher_guard(op))
        if lp is not None:
            # results by position among (*inputs, state, cu_seqlens, state_indices, *outputs)
            given = (*xc.values(), sc, cu, idx)
            pos = [i for i, v in enumerate(given) if v is not None]
            lp.results = tuple(pos[r] if r < len(pos) else len(given) + r - len(pos) for r in lp.results)
            lp.alloc = tuple(bridge.allocator(shape, d) for shape, d in lp.outputs)
            lp.scratch = bridge.allocator((lp.temp_bytes,), "uint8") if lp.temp_bytes else None
            lp.raw_stream = bridge.raw_stream     # asked on every replay: torch's current stream may change
        plan.launch_tries += 1
        plan.launch_why = rec.why
        if lp is not None and plan.launch_tries <= _MAX_RECORDINGS:
            plan.launch = lp
        elif plan.launch_tries >= _RECORD_TRIES:
            plan.launch = False
    ctx = Context(op, plan, bridge, xc, sc, seqs, saved) if save else None
    return y, s_out, ctx
