"""What GPU launchers share: the sequence description, launch helpers and the in-kernel error flag.

Kernel ABI shared by every op (so varlen, pools and dense batches are one code path in CUDA):

* per-token arrays are addressed as flat tokens ``[total_tokens, ...]``; sequence ``s`` covers tokens
  ``cu_seqlens[s] .. cu_seqlens[s+1]`` when ``cu_seqlens`` is non-null, else ``s*T .. s*T+T``;
* ``state_in`` may be null (zero initial state); ``state_out`` may be null (not wanted);
  with ``state_idx`` non-null, sequence ``s`` reads slot ``state_idx[s]`` of ``state_in`` and writes the same
  slot of ``state_out`` (a pool, in place: they alias); slot ``-1`` starts from zero and writes nothing;
* ``err`` points at a pinned host word the kernel sets (never clears) when it meets a bad device-side index;
  the next call on that device raises (see :func:`raise_pending_error`).

Launch plans (torch inference calls): the first call of a validation plan (one call signature) runs the op's
``gpu_forward`` under a :class:`Recorder`, which notes every :func:`launch` and :func:`zero` with the arguments it
got; :meth:`Recorder.finish` turns that into a :class:`LaunchPlan`: per launch the CUfunction, the geometry and a
prebuilt parameter buffer whose pointer slots are bound to "source k" (an input, the state, an index array, or an
array the call allocated).  A repeat call with the same signature then only reads ``data_ptr()``s, allocates its
outputs, writes the pointers into the buffers and calls ``cuLaunchKernel``.  A launcher keeps the recording exact
by doing its device work only through :func:`launch` and :func:`zero` on arrays it got (inputs, states,
``call.empty``), taking pointers with :func:`ptr`, and by choosing kernels from shapes, dtypes, the device, 16-byte
alignment and module-level settings only (the plan is keyed by the first four and guarded by a snapshot of the op
module's globals that its ``gpu_forward`` can read by name: :func:`globals_guard`).  What the recorder cannot
replay (a pointer of an array it does not know, a derived pointer, an array argument, a view's CuPy fallback or
``nbytes``: device work it does not see) leaves the call on the general path.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import operator
import re
import sys
import threading
import types

import numpy as _np

from ._arrays import DeviceView
from ._compile import get_function

_u64 = _np.uint64
_NULL = _u64(0)

ERR_BAD_CU_SEQLENS = 1
ERR_BAD_STATE_INDEX = 2
ERR_LOOKBACK_TIMEOUT = 3
ERR_MESSAGES = {
    ERR_BAD_CU_SEQLENS: "cu_seqlens (on the GPU) was not non-decreasing from 0 to T",
    ERR_BAD_STATE_INDEX: "state_indices (on the GPU) held an index outside [-1, pool size)",
    ERR_LOOKBACK_TIMEOUT: "a single-pass scan timed out waiting for an earlier block (wkv4 fused forward)",
}


@dataclasses.dataclass
class Seqs:
    """How tokens split into sequences for one launch.

    num: number of sequences (grid dimension); T: tokens per sequence when dense (0 with cu_seqlens);
    total: total tokens; cu_seqlens: int32 CuPy array [num + 1] or None; max_len: a host-side upper bound
    on any sequence's length (T when dense, the total otherwise).
    """

    num: int
    T: int
    total: int
    cu_seqlens: object = None
    state_idx: object = None
    pool_size: int = 0

    @property
    def max_len(self) -> int:
        return self.T if self.cu_seqlens is None else self.total

    def chunk_slots(self, chunk: int) -> int:
        """Upper bound on sum over sequences of ceil(len/chunk); sequence s's chunks start at
        cu[s] // chunk + s (see the kernels), so checkpoints need no host copy of cu_seqlens."""
        if self.cu_seqlens is None:
            return self.num * (-(-self.T // chunk))
        return self.total // chunk + self.num + 1


def ptr(x):
    """Raw device pointer of a CuPy array or launch view (``x.data.ptr``), or 0 (null) for None."""
    if x is None:
        return _NULL
    if _RECORDING:
        _note_ptr(x)
    return _u64(x.ptr) if type(x) is DeviceView else _u64(x.data.ptr)


def aligned(*arrays, n=16) -> bool:
    """True when every array's data starts on an n-byte boundary (kernels then take their vector-load path)."""
    return all(int(ptr(a)) % n == 0 for a in arrays)


def check_aligned(op_name, **arrays):
    """Kernels use 16-byte vector accesses: refuse (rather than fault on) an array whose data starts off a 16-byte
    boundary (a view at an odd offset).  None entries are skipped."""
    for name, a in arrays.items():
        off = 0 if a is None else int(ptr(a)) % 16
        if off:
            raise ValueError(f"{op_name}: {name!r} must start at a 16-byte aligned address on the GPU (its data "
                             f"pointer is {int(ptr(a)):#x}, a view at offset {off} bytes?); pass a fresh contiguous "
                             "copy (.clone())")


_FUNCTIONS: dict = {}
_SMEM: dict = {}  # the dynamic shared-memory limit already raised per function


_CUPY = None   # the cupy module, looked up once: an import statement per launch costs host time in decode loops


def _cupy():
    global _CUPY
    if _CUPY is None:
        import cupy
        _CUPY = cupy
    return _CUPY


def _group_key(name_expression):
    """(element type, head size) of an instantiation: its first non-numeric and first numeric template argument."""
    args = [a.strip() for a in name_expression[name_expression.find("<") + 1:name_expression.rfind(">")].split(",")]
    return (next((a for a in args if a and not a.lstrip("-").isdigit()), None),
            next((a for a in args if a.lstrip("-").isdigit()), None))


def compile_group(name_expression, name_expressions):
    """The instantiations compiled together with ``name_expression``: those of the same element type and head size,
    so that a first call compiles only what its shapes need (a whole op's module takes a minute of NVRTC)."""
    key = _group_key(name_expression)
    return tuple(ne for ne in name_expressions if _group_key(ne) == key)


def launch(op_name, source, name_expression, name_expressions, grid, block, args, shared_mem=0):
    """Launch ``name_expression`` on the current stream (compiled once, with its compile_group)."""
    cupy = _CUPY or _cupy()
    key = (cupy.cuda.runtime.getDevice(), source, name_expression)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = get_function(op_name, source, name_expression,
                                            compile_group(name_expression, name_expressions))
    if shared_mem > 48 * 1024 and _SMEM.get(key, 0) < shared_mem:
        fn.max_dynamic_shared_size_bytes = shared_mem
        _SMEM[key] = shared_mem
    fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem, stream=cupy.cuda.get_current_stream())
    if _RECORDING:
        rec = _recorder()
        if rec is not None:
            rec.steps.append((fn, tuple(grid), tuple(block), tuple(args), shared_mem))


def zero(a):
    """Set every byte of ``a`` (a launch view or CuPy array; a NumPy array for the CPU emulation) to zero, on the
    current stream.  Launchers zero scratch through this so that launch plans replay it."""
    if isinstance(a, _np.ndarray):
        a.fill(0)
        return
    cupy = _CUPY or _cupy()
    if _RECORDING:
        rec = _recorder()
        if rec is not None:
            rec.steps.append((None, a))
    p = a.ptr if type(a) is DeviceView else a.data.ptr
    n = a.size * a.dtype.itemsize
    if n:
        cupy.cuda.runtime.memsetAsync(p, 0, n, cupy.cuda.get_current_stream().ptr)


@functools.lru_cache(maxsize=None)
def _error_word(device: int):
    import cupy
    import numpy as np
    with cupy.cuda.Device(device):
        mem = cupy.cuda.alloc_pinned_memory(4)
        host = np.frombuffer(mem, dtype=np.int32, count=1)
        host[0] = 0
    return mem, host


_ERR_PTRS: dict = {}


def error_ptr():
    """Device-visible pointer to this device's pinned error word (pinned host memory is mapped under UVA)."""
    cupy = _CUPY or _cupy()
    dev = cupy.cuda.runtime.getDevice()
    p = _ERR_PTRS.get(dev)
    if p is None:
        p = _ERR_PTRS[dev] = _u64(_error_word(dev)[0].ptr)
    return p


def raise_pending_error(device: int, sync: bool = False) -> None:
    """Raise (and clear) an error a kernel reported on ``device``; with ``sync``, wait for the device first."""
    mem, host = _error_word(device)
    if sync:
        import cupy
        with cupy.cuda.Device(device):
            cupy.cuda.Device(device).synchronize()
    code = int(host[0])
    if code:
        host[0] = 0
        raise ValueError("rwkvops: a previous kernel call reported bad input: " + ERR_MESSAGES.get(code, f"code {code}")
                         + "; its outputs are invalid")


# ---------------------------------------------------------------- launch plans (see the module docstring)

_RECORDING = 0               # recordings in progress in any thread: ptr() and launch() look further only then
_TLS = threading.local()
_REC_LOCK = threading.Lock()


def _recorder():
    return getattr(_TLS, "rec", None)


def _note_ptr(x):
    rec = _recorder()
    if rec is not None and rec.index.get(id(x), (None,))[0] is not x:
        rec.refuse(f"ptr() of an array the call neither got nor allocated ({type(x).__name__})")


def current_device() -> int:
    return (_CUPY or _cupy()).cuda.runtime.getDevice()


_KERNEL_LAUNCH = None        # cuLaunchKernel (cupy_backends' driver.launchKernel), looked up on first use


def _launch_kernel():
    global _KERNEL_LAUNCH
    if _KERNEL_LAUNCH is None:
        from cupy_backends.cuda.api import driver
        _KERNEL_LAUNCH = driver.launchKernel
    return _KERNEL_LAUNCH


def _memset(p, nbytes, stream):
    (_CUPY or _cupy()).cuda.runtime.memsetAsync(p, 0, nbytes, stream)


def kernel_scalar(a):
    """A launch argument as the NumPy scalar CuPy passes for it (Python bool/int/float as bool/int64/float64), or
    None when it is not a scalar of at most 8 bytes."""
    if isinstance(a, (bool, _np.bool_)):
        return _np.bool_(a)
    if isinstance(a, int):
        return _np.int64(a)
    if isinstance(a, float):
        return _np.float64(a)
    if isinstance(a, _np.generic) and a.dtype.kind in "iuf" and a.dtype.itemsize <= 8:
        return a
    return None


class Recorder:
    """Notes what one inference forward does on the device, to build its :class:`LaunchPlan`.

    The dispatcher registers the call's arrays as sources in a fixed order (inputs, state, cu_seqlens,
    state_indices: those not None) and wraps ``call.empty`` with :meth:`empty`; ``with recorder:`` makes it current
    in this thread while the op's ``gpu_forward`` runs (its launches run for real)."""

    def __init__(self):
        self.sources = []        # launch views: the caller's arrays, then allocations in allocation order
        self.index = {}          # id(view) -> (view, source index)
        self.allocs = []         # (source index, shape, dtype name)
        self.steps = []          # (fn, grid, block, args, shared_mem) per launch; (None, view) per zero()
        self.why = None          # first reason the call cannot be replayed

    def refuse(self, why):
        if self.why is None:
            self.why = why

    def source(self, view):
        if type(view) is not DeviceView:
            self.refuse(f"a {type(view).__name__} among the call's arrays")
            return
        view._rec = self         # its nbytes / CuPy fallback now refuse the recording
        self.index[id(view)] = (view, len(self.sources))
        self.sources.append(view)

    def empty(self, empty_view):
        def alloc(shape, dtype):
            v = empty_view(shape, dtype)
            self.allocs.append((len(self.sources), tuple(shape), dtype))
            self.source(v)
            return v
        return alloc

    def __enter__(self):
        global _RECORDING
        _TLS.rec = self
        with _REC_LOCK:
            _RECORDING += 1
        return self

    def __exit__(self, *exc):
        global _RECORDING
        _TLS.rec = None
        with _REC_LOCK:
            _RECORDING -= 1
        return False

    def finish(self, results, device, guard):
        """The :class:`LaunchPlan` of the recorded call (``results``: the views it returns), or None (``why``).
        Never raises: the recorded call has run already, and a plan is only a shortcut for its repeats."""
        try:
            return self._finish(results, device, guard) if self.why is None else None
        except Exception as exc:
            self.refuse(f"building the plan failed: {exc!r}")
            return None
        finally:
            for v in self.sources:
                v._rec = None    # no cycle keeping the call's tensors alive

    def _slot(self, v, what):
        hit = self.index.get(id(v))
        if hit is None or hit[0] is not v:
            self.refuse(f"{what} of an array the call neither got nor allocated")
            return None
        return hit[1]

    def _finish(self, results, device, guard):
        srcs = self.sources
        ptrs = [v.ptr for v in srcs]
        if any(p % 16 for p in ptrs):
            self.refuse("an array off a 16-byte boundary (launchers may pick other kernels by alignment)")
            return None
        nbytes = [v.size * v.dtype.itemsize for v in srcs]
        by_ptr = {}
        for i, p in enumerate(ptrs):
            if p:
                by_ptr.setdefault(p, []).append(i)
        ranges = [(p, p + n) for p, n in zip(ptrs, nbytes) if p]
        # renumber: the caller's arrays, then outputs (returned: fresh tensors per call), then scratch (one block)
        alloc_at = {i for i, _, _ in self.allocs}
        out_srcs = []
        res = []
        ncaller = len(srcs) - len(self.allocs)
        for r in results:
            i = self._slot(r, "a result")
            if i is None:
                return None
            if i in alloc_at:
                if i not in out_srcs:
                    out_srcs.append(i)
                res.append(ncaller + out_srcs.index(i))
            else:
                res.append(i)
        order = list(range(ncaller)) + out_srcs + [i for i, _, _ in self.allocs if i not in out_srcs]
        new = {old: k for k, old in enumerate(order)}
        shapes = {i: (s, d) for i, s, d in self.allocs}
        outputs = tuple(shapes[i] for i in out_srcs)
        temps, off = [], 0
        for i, _, _ in self.allocs:
            if i not in out_srcs:
                temps.append(off)
                off += -(-nbytes[i] // 256) * 256
        steps = []
        for st in self.steps:
            if st[0] is None:
                i = self._slot(st[1], "zero()")
                if i is None:
                    return None
                steps.append((None, new[i], nbytes[i], i < ncaller))
                continue
            fn, grid, block, args, smem = st
            step = self._launch_step(fn, grid, block, args, smem, by_ptr, ranges, new)
            if step is None:
                return None
            steps.append(step)
        host = _error_word(device)[1]
        return LaunchPlan(device, tuple(steps), outputs, tuple(temps), off, tuple(res), guard, host)

    def _launch_step(self, fn, grid, block, args, smem, by_ptr, ranges, new):
        dims = []
        for d in (grid, block):
            d = tuple(int(v) for v in d) + (1,) * (3 - len(d))
            if len(d) != 3:
                self.refuse("a grid or block of more than 3 dimensions")
                return None
            dims.extend(d)
        # one 8-byte slot per kernel parameter, the pointer parameters' first (one slice assignment per replay)
        bound, const = [], []
        for k, a in enumerate(args):
            c = kernel_scalar(a)
            if c is None:
                self.refuse(f"launch argument {k} is a {type(a).__name__}, not a scalar or ptr()")
                return None
            if c.dtype.kind in "iu":
                v = int(c)
                hit = by_ptr.get(v)
                if hit is not None:
                    if len(hit) > 1:
                        self.refuse("two of the call's arrays share a data pointer")
                        return None
                    if c.dtype.itemsize != 8:
                        self.refuse(f"launch argument {k} holds a pointer in {c.dtype}")
                        return None
                    bound.append((k, new[hit[0]]))
                    continue
                if any(lo < v < hi for lo, hi in ranges):
                    self.refuse(f"launch argument {k} points inside one of the call's arrays")
                    return None
            const.append((k, c))
        n = max(len(args), 1)
        vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(vals)
        slot = [0] * n
        for j, (k, _) in enumerate(bound):
            slot[k] = j
        for j, (k, c) in enumerate(const, len(bound)):
            slot[k] = j
            ctypes.memmove(base + 8 * j, c.tobytes(), c.dtype.itemsize)
        params = (ctypes.c_void_p * n)(*[base + 8 * j for j in slot])
        srcs = [i for _, i in bound]
        pick = operator.itemgetter(*srcs) if len(srcs) > 1 else (lambda p, i=srcs[0]: (p[i],)) if srcs else None
        # RawModule.get_function gives a RawKernel: its .kernel is the cupy.cuda.Function loaded on the current device
        # (the recording's, still current here), whose .ptr is the CUfunction
        func = getattr(fn, "kernel", fn)
        fptr = getattr(func, "ptr", None)
        if not fptr:
            self.refuse(f"no CUfunction handle on {type(fn).__name__}")
            return None
        # cuLaunchKernel with everything but (stream, params, extra) bound: a replay passes three arguments, not
        # eleven picked out of the step one by one
        go = functools.partial(_KERNEL_LAUNCH or _launch_kernel(), int(fptr), *dims, int(smem))
        return (go, vals, len(srcs), pick, ctypes.addressof(params), func, params)


class LaunchPlan:
    """The launches of one recorded call, replayed on new pointers (see the module docstring).

    ``outputs``: (shape, dtype name) of the arrays a call allocates and returns (fresh per call; the dispatcher
    turns them into its bridge's allocators, ``alloc``); ``temps``: byte offsets of its scratch arrays in one block of
    ``temp_bytes``; ``results``: per returned array, its index among the call's arrays followed by the outputs.
    Pointer sources at replay: the caller's arrays (the order the recorder got them), the outputs, the scratch
    arrays.  ``guard``: :func:`globals_guard` of the launcher's module."""

    __slots__ = ("device", "steps", "outputs", "temps", "temp_bytes", "results", "guard", "err", "lock",
                 "alloc", "scratch", "raw_stream", "get_device", "err_word", "checks", "used", "failed")

    def __init__(self, device, steps, outputs, temps, temp_bytes, results, guard, err):
        self.device, self.steps, self.outputs, self.temps = device, steps, outputs, temps
        self.temp_bytes, self.results, self.guard, self.err = temp_bytes, results, guard, err
        self.lock = threading.Lock()   # the parameter buffers are shared: one replay at a time
        self.alloc = None              # per output, () -> a fresh tensor (the bridge's allocator); set by the dispatcher
        self.scratch = None            # () -> a fresh scratch block of temp_bytes, where temp_bytes; likewise
        self.raw_stream = None         # () -> the raw cudaStream_t of torch's current stream (the bridge's); likewise
        self.get_device = (_CUPY or _cupy()).cuda.runtime.getDevice   # () -> the current device (cudaGetDevice)
        # the pinned error word (a NumPy int32 array) read through ctypes: .value costs a fifth of err[0]
        self.err_word = ctypes.c_int32.from_address(err.ctypes.data)
        self.checks = _guard_checks(guard)   # (f, d, snapshot): current while f(d) == snapshot for each
        self.used = False              # replayed at least once
        self.failed = None             # the exception of a first launch that failed (diagnostics)

    def current(self) -> bool:
        """Whether the launcher's module settings are still those of the recording."""
        try:
            for f, d, snap in self.checks:
                if f(d) != snap:
                    return False
            return True
        except Exception:       # a name gone, or a new value that does not compare to a bool (an array)
            return False

    def changed(self) -> str:
        """What :meth:`current` found changed, in words (for diagnostics; not on the replay path)."""
        for d, get, snap, mget, msnap, n in self.guard:
            where = d.get("__name__", "an op")
            try:
                if get is not None:
                    now = get(d)
                    names = [k for k, a, b in zip(_names_of(get, d), now, snap) if a is not b]
                    if now != snap:
                        return f"{where}: {names or 'a guarded name'} rebound"
                    if n is not None and len(d) != n:
                        return f"{where}: its globals went from {n} to {len(d)} names"
                    if mget is not None and mget(d) != msnap:
                        return f"{where}: a setting held in a container changed"
                    continue
                now = tuple(d.values())
                if len(now) != len(snap):
                    return f"{where}: its globals went from {len(snap)} to {len(now)} names"
                names = [k for k, a, b in zip(d.keys(), now, snap) if a is not b and a != b]
                if names:
                    return f"{where}: {names[:5]} rebound"
                if mget is not None and mget(d) != msnap:
                    return f"{where}: a setting held in a container changed"
            except Exception as exc:
                return f"{where}: the comparison raised {type(exc).__name__}"
        return "nothing"

    def launch(self, ptrs, stream):
        """Write ``ptrs`` into the parameter buffers and launch every step on ``stream`` (a raw cudaStream_t).
        Returns False, having run no kernel, when the first kernel launch fails (the caller then takes the general
        path, which reports a real device error itself); a failure after a kernel ran raises."""
        ran = False
        lock = self.lock
        lock.acquire()          # not ``with``: acquire/release in try/finally costs half as much per call
        try:
            for st in self.steps:
                go = st[0]
                if go is None:
                    if st[2]:
                        _memset(ptrs[st[1]], st[2], stream)
                        ran = ran or st[3]      # zeroing the caller's memory counts as work done
                    continue
                if st[2]:
                    st[1][:st[2]] = st[3](ptrs)     # the pointer slots (a launch step: see Recorder._launch_step)
                try:
                    go(stream, st[4], 0)
                except Exception as exc:
                    if ran:
                        raise
                    self.failed = repr(exc)
                    return False
                ran = True
        finally:
            lock.release()
        return True


def _all_values(d):
    return tuple(d.values())


def _guard_checks(guard):
    """A :func:`globals_guard` as one flat tuple of ``(f, d, snapshot)`` (what :meth:`LaunchPlan.current` loops
    over on every replay)."""
    checks = []
    for d, get, snap, mget, msnap, n in guard:
        checks.append((_all_values if get is None else get, d, snap))
        if n is not None:
            checks.append((len, d, n))
        if mget is not None:
            checks.append((mget, d, msnap))
    return tuple(checks)


def _names_of(get, d):
    """The names a :func:`_getter` reads (its itemgetter repr or its default argument), for messages."""
    names = getattr(get, "__defaults__", None)
    if names:
        return [names[0]]
    m = re.findall(r"'([^']+)'", repr(get))
    return m or [None] * len(get(d))


def _getter(names):
    """``d -> tuple of d[name]`` (itemgetter returns a bare value for one name)."""
    if len(names) == 1:
        return lambda d, k=names[0]: (d[k],)
    return operator.itemgetter(*names)


def globals_guard(*specs):
    """``(namespace object or dict, names or None[, roots])`` -> the guard of a :class:`LaunchPlan`, checked on
    every replay.

    With names: those attributes by identity.  None: the globals of a module by identity, and settings held in
    containers (UPPERCASE dicts, lists, sets) also by value, so that ``FWD_R[64] = 2`` counts as a change too:
    with ``roots`` (the launcher's entry points), the globals their code can read by name (:func:`_read_names`)
    and the number of globals (a new name may shadow a builtin); else, or where the code reaches for the module's
    namespace itself (``globals()``, ``vars()``, ``__dict__``), every global (one tuple of the dict's values).
    Rebinding any guarded name (``monkeypatch.setattr(wkv4, "FORWARD", ...)``, a replaced helper) changes it."""
    guard = []
    for obj, names, *roots in specs:
        d = obj if type(obj) is dict else obj.__dict__
        if names is None:
            try:
                read = _read_names(d, roots[0]) if roots else None
            except Exception:       # an object that would not be looked at: guard every global
                read = None
            keys = d.keys() if read is None else read
            mut = tuple(k for k in keys if k.isupper() and type(d[k]) in (dict, list, set))
            mget = _getter(mut) if mut else None
            msnap = tuple(v.copy() for v in mget(d)) if mut else None
            if read is None:
                guard.append((d, None, tuple(d.values()), mget, msnap, None))
            else:
                get = _getter(tuple(read)) if read else (lambda d: ())
                guard.append((d, get, get(d), mget, msnap, len(d)))
        else:
            get = _getter(tuple(names))
            guard.append((d, get, get(d), None, None, None))
    return tuple(guard)


_NAMESPACE_NAMES = frozenset(("globals", "vars", "__dict__", "locals"))


def _read_names(d, roots):
    """The globals of module namespace ``d`` that the code of ``roots`` can read by name: every name its code
    objects (nested ones too) mention that ``d`` holds, and so on through the functions, classes (their methods),
    ``functools`` wrappers and partials, and containers of them that those names hold, as long as they belong to
    ``d``.  None when some of that code can reach the namespace itself (then only a whole-module guard is safe)."""
    names, seen, todo = [], set(), list(roots)
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, types.ModuleType):
            continue
        v = getattr(v, "__wrapped__", v)                    # functools.wraps / lru_cache
        if isinstance(v, functools.partial):
            todo += [v.func, *v.args, *v.keywords.values()]
            continue
        if isinstance(v, (dict, list, tuple, set, frozenset)):
            todo += list(v.values()) if isinstance(v, dict) else list(v)
            continue
        if isinstance(v, type):
            if v.__module__ == d.get("__name__"):
                todo += [getattr(f, "__func__", f) for f in vars(v).values()]
            continue
        if isinstance(v, (staticmethod, classmethod)):
            todo.append(v.__func__)
            continue
        code = getattr(v, "__code__", None)
        if not isinstance(v, types.FunctionType) or v.__globals__ is not d or code is None:
            continue
        todo += [c for c in (v.__defaults__ or ()) if callable(c)]
        stack = [code]
        while stack:
            c = stack.pop()
            if not _NAMESPACE_NAMES.isdisjoint(c.co_names):
                return None
            for n in c.co_names:
                if n in d and n not in names:
                    names.append(n)
                    todo.append(d[n])
            stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


def launcher_guard(op):
    """The guard of a plan recorded for ``op``: the globals its ``gpu_forward`` can read (a plain function: those of
    its own namespace; any other callable: every global of its module) and this module's launch entry points."""
    fn = op.gpu_forward
    specs = [(sys.modules[__name__], ("launch", "ptr", "zero", "error_ptr")), (op, ("gpu_forward",))]
    if isinstance(fn, types.FunctionType):
        specs.append((fn.__globals__, None, (fn,)))
    else:
        mod = sys.modules.get(getattr(fn, "__module__", None))
        if mod is not None:
            specs.append((mod, None))
    return globals_guard(*specs)
