"""rwkvops-ema: an example rwkvops plugin, the gated elementwise EMA recurrence.

For every sequence, head ``h`` and channel ``n`` (all elementwise; ``g`` is shared by the batch)::

    S_t = S_{t-1} * exp(-exp(w_t)) + x_t
    y_t = S_t * g

Everything an op needs, in one module:

* :func:`reference_forward` / :func:`reference_backward`: the NumPy oracle, written from the formula;
* :func:`gpu_forward` / :func:`gpu_backward`: launchers of the CUDA kernels in ``ema.cu`` (beside this file);
* :data:`OP`: the declaration, registered with :func:`rwkvops.register_op` and exposed to rwkvops through the
  ``rwkvops.ops`` entry point ``ema = rwkvops_ema:OP``;
* :func:`ema`: the public function (NumPy, CuPy and torch arrays; torch autograd).
"""
from __future__ import annotations

import os

import numpy as np

from rwkvops import Arg, Kernel, Op, register_op

__all__ = ["ema", "reference_forward", "reference_backward", "gpu_forward", "gpu_backward", "OP",
           "SOURCE", "NAME_EXPRESSIONS"]

__version__ = "0.1.0"

# ----------------------------------------------------------------------------- NumPy reference


def _decay(w):
    """Per-step decay factor exp(-exp(w)), in w's dtype."""
    return np.exp(-np.exp(w))


def reference_forward(x: dict, state):
    """Dense-batch forward in the inputs' dtype.

    ``x["x"]``, ``x["w"]``: ``[B, T, H, N]``; ``x["g"]``: ``[H, N]``; ``state``: ``[B, H, N]``.
    Returns ``(y [B, T, H, N], state_out [B, H, N])``.
    """
    xs, w, g = x["x"], x["w"], x["g"]
    dt = xs.dtype
    S = np.array(state, dtype=dt, copy=True)
    dec = _decay(w)
    y = np.empty_like(xs)
    for t in range(xs.shape[1]):
        S = S * dec[:, t] + xs[:, t]
        y[:, t] = S * g
    return y, S


def reference_backward(x: dict, state, dy, dstate):
    """Gradients of ``L = sum(dy * y) + sum(dstate * S_T)`` w.r.t. ``x``, ``w``, ``g`` and the initial state.

    With ``d_t = exp(-exp(w_t))`` and ``dS_t`` the total gradient w.r.t. ``S_t``::

        dS_T     = dstate + dy_T g
        dS_{t-1} = dS_t d_t + dy_{t-1} g           (dS_0 is the initial state's gradient, without a dy term)
        dx_t     = dS_t
        dw_t     = dS_t S_{t-1} d_t (-exp(w_t))    (d/dw of exp(-exp(w)) is -exp(w) exp(-exp(w)))
        dg       = sum over batch and time of dy_t S_t
    """
    xs, w, g = x["x"], x["w"], x["g"]
    dt = xs.dtype
    B, T = xs.shape[:2]
    dec = _decay(w)
    states = [np.array(state, dtype=dt, copy=True)]       # states[t] = S_t, t = 0..T
    for t in range(T):
        states.append(states[-1] * dec[:, t] + xs[:, t])
    dy = np.asarray(dy, dtype=dt)
    dS = np.array(dstate, dtype=dt, copy=True)
    dx, dw, dg = np.zeros_like(xs), np.zeros_like(w), np.zeros_like(g)
    for t in range(T - 1, -1, -1):
        dS = dS + dy[:, t] * g
        dg = dg + (dy[:, t] * states[t + 1]).sum(axis=0)
        dx[:, t] = dS
        dw[:, t] = dS * states[t] * dec[:, t] * (-np.exp(w[:, t]))
        dS = dS * dec[:, t]
    return {"x": dx, "w": dw, "g": dg, "state": dS}


# ----------------------------------------------------------------------------- GPU launchers

# A plugin's CUDA source is given by absolute path (rwkvops' compile cache accepts those).
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ema.cu")
CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
KERNELS = ("ema_forward", "ema_backward", "ema_sum_partials")
# Every instantiation, compiled together into one module (and checked by NVRTC in the tests).
NAME_EXPRESSIONS = tuple(f"{k}<{ct}>" for ct in CTYPES.values() for k in KERNELS)
BLOCK = 128


def _launch(call, kernel, grid, args):
    from rwkvops._gpu import launch
    launch("ema", SOURCE, f"{kernel}<{CTYPES[call.dtype]}>", NAME_EXPRESSIONS, grid, (BLOCK, 1, 1), args)


def _seq_args(call, state_in, state_out):
    """The common kernel ABI: (cu_seqlens, T, total) and (state_in, state_out, state_idx, pool_size, err)."""
    from rwkvops._gpu import error_ptr, ptr
    s = call.seqs
    return (ptr(s.cu_seqlens), np.int32(s.T), np.int64(s.total),
            ptr(state_in), ptr(state_out), ptr(s.state_idx), np.int32(s.pool_size), error_ptr())


def _hn(call):
    return call.dims["H"] * call.dims["N"]


def gpu_forward(call, x, state_in, state_out, save):
    """Launch ``ema_forward``; nothing is saved (the backward replays the forward)."""
    from rwkvops._gpu import ptr
    xs = x["x"]
    y = call.empty(xs.shape, call.dtype)
    HN = _hn(call)
    grid = (call.seqs.num, -(-HN // BLOCK), 1)
    _launch(call, "ema_forward", grid,
            (ptr(xs), ptr(x["w"]), ptr(x["g"]), ptr(y), *_seq_args(call, state_in, state_out), np.int32(HN)))
    return y, None


def gpu_backward(call, x, state_in, saved, dy, dstate):
    """Launch ``ema_backward`` (one thread per (sequence, h, n)), then sum the per-sequence ``dg`` partials in a
    fixed order (deterministic)."""
    import cupy
    from rwkvops._gpu import ptr
    xs = x["x"]
    if dy is not None:
        dy = cupy.ascontiguousarray(dy)                          # the kernel reads flat tokens
    if dstate is not None:
        dstate = cupy.ascontiguousarray(dstate, dtype=cupy.float32)
    H, N = call.dims["H"], call.dims["N"]
    HN, num = H * N, call.seqs.num
    dx = call.empty(xs.shape, call.dtype)
    dw = call.empty(xs.shape, call.dtype)
    dg = call.empty((H, N), call.dtype)
    dstate_out = call.empty((num, H, N), "float32")
    dg_part = call.empty((num, H, N), "float32")
    scratch = call.empty(xs.shape, "float32")
    grid = (num, -(-HN // BLOCK), 1)
    _launch(call, "ema_backward", grid,
            (ptr(xs), ptr(x["w"]), ptr(x["g"]), ptr(dy), ptr(dstate), ptr(dx), ptr(dw), ptr(dg_part),
             ptr(dstate_out), ptr(scratch), *_seq_args(call, state_in, None), np.int32(HN)))
    _launch(call, "ema_sum_partials", (-(-HN // BLOCK), 1, 1),
            (ptr(dg_part), ptr(dg), np.int32(num), np.int32(HN)))
    return {"x": dx, "w": dw, "g": dg, "state": dstate_out}


# ----------------------------------------------------------------------------- declaration

_BTHN = ("B", "T", "H", "N")

OP = register_op(Op(
    name="ema",
    inputs=(Arg("x", _BTHN, "input added to the state at every step"),
            Arg("w", _BTHN, "raw decay: the state is multiplied by exp(-exp(w)) at every step"),
            Arg("g", ("H", "N"), "output gate, shared by the batch")),
    state=Arg("state", ("B", "H", "N"), "fp32 state S[b, h, n]"),
    output="x",
    reference_forward=reference_forward,
    reference_backward=reference_backward,
    dtypes=("float32", "float16", "bfloat16"),
    head_sizes=None,                      # any N: one thread per (sequence, h, n)
    gpu_forward=gpu_forward,
    gpu_backward=gpu_backward,
    kernels=(Kernel(SOURCE, NAME_EXPRESSIONS),),
    reduce_batch=("g",),
    doc="gated elementwise EMA (example plugin)",
), replace=True)   # replace=True: importing (or reloading) this module twice must not fail


def ema(x, w, g, state=None, *, cu_seqlens=None, state_indices=None):
    """Gated elementwise EMA recurrence.

    For every sequence, head ``h`` and channel ``n`` (elementwise)::

        S_t = S_{t-1} * exp(-exp(w_t)) + x_t
        y_t = S_t * g

    Parameters
    ----------
    x, w : arrays ``[B, T, H, N]`` of one dtype: float32, float16 or bfloat16 on the GPU (any ``N``),
        float64/float32 (also float16/bfloat16, computed in float32) on the CPU.  ``w`` is the raw decay
        parameter: the factor ``exp(-exp(w))`` is computed in fp32 on the GPU.
    g : array ``[H, N]`` of the same dtype, shared by the whole batch (its gradient is summed over batch and time).
    state : optional ``[B, H, N]`` float32 (float64 allowed on the CPU); None = zeros.  With ``state_indices`` it is
        a pool ``[P, H, N]`` updated in place.
    cu_seqlens : optional int32 ``[num_seqs + 1]`` (host or device): sequences packed along T with ``B = 1``.
    state_indices : optional int32 ``[num_seqs]``: pool slot of each sequence (read at its start, written at its
        end); ``-1`` starts from zeros and writes nothing.

    Returns
    -------
    ``(y, state_out)``: ``y`` like ``x`` (same shape and dtype); ``state_out`` ``[num_seqs, H, N]`` float32 (the
    pool itself with ``state_indices``).  NumPy, CuPy and torch arrays in, the same type out; torch tensors are
    differentiable (``x``, ``w``, ``g`` and ``state``).  Splitting ``T`` and passing ``state_out`` on gives the
    same results.
    """
    return OP(x, w, g, state=state, cu_seqlens=cu_seqlens, state_indices=state_indices)
