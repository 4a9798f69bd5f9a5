"""RWKV-7 WKV: ``S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T``, ``y_t = S_t r_t``.

Pieces, side by side:

* :func:`reference_forward` / :func:`reference_backward`: the NumPy oracle, straight from the formula;
* :func:`gpu_forward` / :func:`gpu_backward`: launchers of the CUDA kernels in ``cuda_src/wkv7.cu``: forward by
  the decode kernel (one token per sequence, no backward), the chunked tensor-core kernels (dense batches with
  T >= TC_MIN_T, N = 32/64: 16-token chunks, one block per (sequence, head), or time segments + a scan over their
  transitions when few (sequence, head) pairs would underfill the GPU; writes the backward's checkpoints too; 16-bit
  I/O through wkv7_tc_wy, the warp-specialized WY form, fp32 through wkv7_tc_chunk), or
  the recurrent kernel (varlen, short T, N = 128); the backward from the fp32 checkpoints every CK tokens: for dense
  batches with T >= TC_MIN_T the chunked tensor-core backward (a reverse pass writing the adjoint at every chunk
  end, in time segments + a reverse scan as the forward's when few (sequence, head) pairs; then all chunks'
  gradients in parallel; chunks with strong decays exactly by the recurrent kernel's per-chunk mode), else the
  recurrent kernel (one block per sequence and head);
* :func:`to_fla` / :func:`from_fla`: converters to and from flash-linear-attention's convention;
* :func:`wkv7`: the public function (NumPy, CuPy, torch; torch autograd).
"""
from __future__ import annotations

import functools
import sys

import numpy as np

from . import _fla
from .. import _gpu
from ..registry import Arg, Kernel, Op, register_op

__all__ = ["wkv7", "to_fla", "from_fla", "reference_forward", "reference_backward", "OP"]

# ----------------------------------------------------------------------------- NumPy reference


def _decay(w):
    """Per-step decay factor exp(-exp(w)) in w's dtype."""
    return np.exp(-np.exp(w))


def reference_forward(x: dict, state):
    """Dense-batch forward in the inputs' dtype.  ``x[name]``: [B, T, H, N]; ``state``: [B, H, N, N] (i=value, j=key)."""
    r, w, k, v, a, b = (x[n] for n in ("r", "w", "k", "v", "a", "b"))
    dt = r.dtype
    B, T, H, N = r.shape
    S = np.array(state, dtype=dt, copy=True)
    dec = _decay(w)
    y = np.empty_like(r)
    for t in range(T):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])                       # S_{t-1} a_t
        S = (S * dec[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        y[:, t] = np.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S


def reference_backward(x: dict, state, dy, dstate):
    """Gradients of ``sum(dy*y) + sum(dstate*S_T)`` w.r.t. r, w, k, v, a, b and the initial state.

    Adjoint recursion (dS_t is the gradient w.r.t. S_t with everything after t accounted for):
    ``dS_t += dy_t r_t^T``; then with G_t = diag(decay_t) + a_t b_t^T, ``dS_{t-1} = dS_t G_t^T``, and
    ``dr_t = S_t^T dy_t``, ``dv_t = dS_t k_t``, ``dk_t = dS_t^T v_t``, ``db_t = dS_t^T (S_{t-1} a_t)``,
    ``da_t = S_{t-1}^T (dS_t b_t)``, ``dw_t[j] = sum_i dS_t[i,j] S_{t-1}[i,j] * decay_t[j] * (-exp(w_t[j]))``.
    """
    r, w, k, v, a, b = (x[n] for n in ("r", "w", "k", "v", "a", "b"))
    dt = r.dtype
    B, T, H, N = r.shape
    dec = _decay(w)
    states = [np.array(state, dtype=dt, copy=True)]
    S = states[0]
    for t in range(T):
        sa = np.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * dec[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        states.append(S)
    g = {n: np.zeros_like(x[n]) for n in ("r", "w", "k", "v", "a", "b")}
    dS = np.array(dstate, dtype=dt, copy=True)
    dy = np.asarray(dy, dtype=dt)
    for t in range(T - 1, -1, -1):
        St, Sp = states[t + 1], states[t]
        dyt = dy[:, t]
        g["r"][:, t] = np.einsum("bhij,bhi->bhj", St, dyt)
        dS = dS + dyt[..., :, None] * r[:, t, :, None, :]
        g["v"][:, t] = np.einsum("bhij,bhj->bhi", dS, k[:, t])
        g["k"][:, t] = np.einsum("bhij,bhi->bhj", dS, v[:, t])
        sa = np.einsum("bhij,bhj->bhi", Sp, a[:, t])
        dsa = np.einsum("bhij,bhj->bhi", dS, b[:, t])
        g["b"][:, t] = np.einsum("bhij,bhi->bhj", dS, sa)
        g["a"][:, t] = np.einsum("bhij,bhi->bhj", Sp, dsa)
        ddec = np.einsum("bhij,bhij->bhj", dS, Sp)
        g["w"][:, t] = ddec * dec[:, t] * (-np.exp(w[:, t]))
        dS = dS * dec[:, t, :, None, :] + dsa[..., None] * a[:, t, :, None, :]
    g["state"] = dS
    return g


# ----------------------------------------------------------------------------- flash-linear-attention

def to_fla(w=None, state=None):
    """Convert our decay parameter and/or state to flash-linear-attention's ``chunk_rwkv7`` convention.

    ``w`` (ours, raw: decay factor ``exp(-exp(w))``) becomes fla's log decay ``-exp(w)`` (same shape and dtype,
    computed in fp32 for 16-bit inputs).  ``state`` ``[B, H, N(value i), N(key j)]`` becomes fla's
    ``[B, H, K, V]``, i.e. ``state.transpose(-1, -2)`` (a contiguous copy).  The other inputs
    (``r, k, v, a, b``, shapes ``[B, T, H, N]``, same argument order) pass unchanged; call fla with
    ``scale=1.0`` (``fused_recurrent_rwkv7`` otherwise defaults to ``1/sqrt(K)``).
    Works on NumPy, CuPy and torch arrays.  Returns ``(w_fla, state_fla)`` (None where not given).
    """
    w_fla = None if w is None else _fla.log_decay(w)
    s_fla = _fla.transpose_state(state)
    return w_fla, s_fla


def from_fla(w=None, state=None):
    """Inverse of :func:`to_fla`: fla's log decay ``g = -exp(w)`` back to ``w = log(-g)``, and fla's state
    ``[B, H, K, V]`` back to ours ``[B, H, V, K]`` (transpose of the last two axes).  Returns ``(w, state)``."""
    w_ours = None if w is None else _fla.raw_decay(w)
    s_ours = _fla.transpose_state(state)
    return w_ours, s_ours


# ----------------------------------------------------------------------------- GPU launchers

SOURCE = "wkv7.cu"
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
HEAD_SIZES = (32, 64, 128)
CK = 16                       # checkpoint interval (tokens) of the training forward / backward


BWD_ROWS_SC = {32: 16, 64: 8}

# Chunked forward (wkv7_tc_chunk / wkv7_tc_scan in wkv7.cu): tensor-core chunks of TC_L = CK tokens for dense
# batches with T >= TC_MIN_T and N in TC_HEAD_SIZES; varlen, decode and short T keep the recurrent kernels.
# FORWARD_PATH forces "recurrent" or "chunked" (dense inputs) for comparisons and tests.
FORWARD_PATH = "auto"
TC_HEAD_SIZES = (32, 64)
TC_L = 16                     # tokens per chunk (wkv7::TC_L; = CK: chunk starts are the checkpoints)
TC_MIN_T = 256                # auto: chunked from this sequence length on
TC_SEG_MIN = 256              # shortest time segment (tokens) of the segmented path
TC_BLOCKS_PER_SM = 2          # segmented path: blocks per SM of both passes (the transition pass fits 2 per SM)
TC_MIN_NSEG = 3               # ... and only when that gives at least this many segments
TC_NSEG = None                # force the number of time segments (None: _tc_segments)
# 16-bit I/O: the four chunked passes by wkv7_tc_wy (the state-independent per-chunk work on producer warps, the
# chain over the chunks on consumer warps with the state in registers) instead of wkv7_tc_chunk; fp32 I/O keeps
# wkv7_tc_chunk (3xTF32).  H100, bf16 H=32 N=64, CUDA events (benchmarks/results/logs/s4-h4, run 2): forward
# B=8 T=4096 1.54 ms (kernel 1.46) vs 1.76 (1.69); B=1 T=16384 1.48-1.56 vs 1.82; adjoint pass B=8 1.23 vs 1.33.
# Off by default: every GPU test and the B=8 T=4096 accuracy check pass with it, but compute-sanitizer's racecheck
# reports hazards between the producers' stage writes and the consumers' stage reads across the stage barrier
# (benchmarks/results/logs/s4-lead, calls A and B; also with that barrier as barrier 0), not yet explained: the
# same hand-off built for the CPU under ThreadSanitizer is race-free (tests/test_wkv7.py::
# test_emulated_wy_kernel_is_race_free), so the report looks like racecheck's, but it stands until shown.
TC_WY = False

# Chunked backward (wkv7_tc_chunk<T, N, 2> + wkv7_tc_bwd + wkv7_backward's per-chunk mode for the chunks with a
# strong decay): dense batches, N in TC_HEAD_SIZES where the row backward fits, T >= TC_MIN_T (as the forward).
# BACKWARD_PATH forces "recurrent" or "chunked" (dense inputs).  BWD_MILD: wkv7_tc_bwd takes a chunk only when
# every exp(w) <= BWD_MILD (at most 30/16: the chunk's factorization stays below exp(30)); the others go to the
# exact per-chunk recurrence (0: all of them).
BACKWARD_PATH = "auto"
BWD_MILD = 1.0
# Adjoint pass in time segments (wkv7_tc_chunk<.., 3> transitions, wkv7_tc_scan backwards, then <.., 2> per
# segment), chosen as the forward's (_tc_segments); TC_BWD_NSEG forces the count (None: _tc_segments).  H100 bf16
# B=1 T=4096: adjoint 0.41 ms in 8 segments vs 1.12 serial; fwd+bwd 2.05 vs 2.84 ms.
TC_BWD_SEGMENTS = True
TC_BWD_NSEG = None
# wkv7_tc_bwd<T, N, warps, strip> template arguments: warps per block, 16 x 16 tiles per mma strip (A fragments
# loaded once per strip).  Every (warps, strip) of the options is compiled, for the sweep.  H100, bf16 B=8 T=4096
# H=32 N=64, per call: (8, 2) 3.73 ms, (8, 4) 4.30 (register-capped at 128), (8, 1) 3.77, (16, 1) 3.95; fwd+bwd
# (16, 2) = (8, 2) within 0.1%.  The kernel is bound by shared-memory operand loads, not by latency
# (benchmarks/results/logs/at-2453368).
TC_BWD_WARPS = {32: 4, 64: 8}
TC_BWD_WARP_OPTIONS = {32: (4, 8), 64: (8, 16)}
TC_BWD_STRIP = {32: 2, 64: 2}
TC_BWD_STRIP_OPTIONS = {32: (2,), 64: (2, 4)}


def _names():
    out = []
    for ct in CTYPE.values():
        for n in HEAD_SIZES:
            out.append(f"wkv7_forward<{ct}, {n}>")       # 4 rows per thread, one-warp blocks
            out.append(f"wkv7_forward<{ct}, {n}, 1>")    # 1 row per thread, 4-warp blocks (few sequences x heads)
            out.append(f"wkv7_decode<{ct}, {n}>")
            out.append(f"wkv7_backward<{ct}, {n}>" if n in BWD_ROWS_SC else f"wkv7_backward_l2<{ct}, {n}>")
            if n in BWD_ROWS_SC:
                out.append(f"wkv7_backward_l2<{ct}, {n}>")   # the scratch backward, kept selectable (BWD_ROWS)
            if n in TC_HEAD_SIZES:
                if ct != "float":                            # the same four passes in WY form (16-bit I/O)
                    out.extend(f"wkv7_tc_wy<{ct}, {n}, {mode}>" for mode in range(4))
                out.append(f"wkv7_tc_chunk<{ct}, {n}, 0>")   # chunked forward: outputs (+ checkpoints)
                out.append(f"wkv7_tc_chunk<{ct}, {n}, 1>")   # chunked forward: segment transitions
                out.append(f"wkv7_tc_chunk<{ct}, {n}, 2>")   # chunked backward: adjoint checkpoints (reverse)
                out.append(f"wkv7_tc_chunk<{ct}, {n}, 3>")   # chunked backward: adjoint segment transitions
                for nw in TC_BWD_WARP_OPTIONS[n]:            # chunked backward: gradients, chunk-parallel
                    for st in TC_BWD_STRIP_OPTIONS[n]:
                        out.append(f"wkv7_tc_bwd<{ct}, {n}, {nw}, {st}>")
    out.extend(f"wkv7_tc_scan<{n}>" for n in TC_HEAD_SIZES)
    return tuple(out)


NAME_EXPRESSIONS = _names()


FWD_RB = 16                   # state rows per forward block (FwdCfg<N, RT>::RB in wkv7.cu)
FWD_R = {n: n // FWD_RB for n in HEAD_SIZES}   # forward row groups (blocks) per (sequence, head): FwdCfg::R
FWD_NT = {4: 32, 1: 128}      # forward block size per rows-per-thread RT (FwdCfg<N, RT>::NT = (16 / RT) * 8)
FWD_WAVE = 2                  # RT = 4 (one-warp blocks) once the grid has >= FWD_WAVE blocks per SM, else RT = 1
BWD_ROWS = {32: True, 64: True, 128: False}  # backward kernel per N: wkv7_backward (rows) or wkv7_backward_l2
BWD_SC = {32: 8, 64: 4, 128: 4}              # wkv7_backward_l2 sub-chunk (BwdCfg::SC in wkv7.cu): scratch slots - 1
BWD_BLOCKS_PER_SM = {32: 8, 64: 3, 128: 1}   # backward grid = min(items, SMs * this): about what is resident


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])


@functools.lru_cache(maxsize=None)
def _smem_optin_of(device: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"])


def _smem_optin() -> int:
    """Largest dynamic shared memory (bytes) one block may opt in to on the current device."""
    import cupy
    return _smem_optin_of(cupy.cuda.Device().id)


def _bwd_rows(N: int) -> bool:
    """Use the row-layout backward for head size N: selected in BWD_ROWS and its shared memory fits the device
    (200 KB for N = 64: H100/H200 yes, A100 (163 KB) falls back to wkv7_backward_l2)."""
    return BWD_ROWS.get(N, False) and _bwd_rows_smem(N) <= _smem_optin()


def _fwd_rt(blocks: int) -> int:
    """Rows per thread of the forward for a grid of ``blocks`` row-group blocks: 4 (one-warp blocks, fewest
    shared-memory loads per FMA) when the grid fills the GPU, else 1 (four warps share each row group's step)."""
    import cupy
    return 4 if blocks >= FWD_WAVE * _sm_count(cupy.cuda.Device().id) else 1


def _bwd_blocks(items: int, N: int) -> int:
    """Backward grid size: grid-stride over (sequence, head) items, capped at about the resident blocks so the
    per-block scratch (BWD_SC+1 states) stays L2-resident."""
    import cupy
    return max(1, min(items, _sm_count(cupy.cuda.Device().id) * BWD_BLOCKS_PER_SM[N]))


def _launch(name, grid, block, args, shared_mem=0):
    from .._gpu import launch
    launch("wkv7", SOURCE, name, NAME_EXPRESSIONS, grid, block, args, shared_mem=shared_mem)


def _bwd_smem(N):
    """Dynamic shared memory (bytes) of wkv7_backward_l2."""
    return (9 * CK * N + 2 * N) * 4


def _bwd_rows_smem(N):
    """Dynamic shared memory (bytes) of wkv7_backward: staged inputs [7][CK][N], S a [CK][N], thread-private
    sub-chunk states [SC][N][N], column partials [SC][5][N/16][N] (200 KB for N = 64: one block per SM)."""
    sc = BWD_ROWS_SC[N]
    return (7 * CK * N + CK * N + sc * N * N + sc * 5 * (N // 16) * N) * 4


def _use_decode(seqs, save) -> bool:
    """The decode kernel (wkv7_decode): inference (no checkpoints for a backward) with one token per sequence,
    dense T == 1 or packed with total tokens <= number of sequences (every length 1 in a serving step; pools and
    -1 slots work as in the recurrent kernel).  wkv7_decode loops over longer sequences, so a device-side
    cu_seqlens that only sums to the count (lengths 0 and 2) is still exact, just not the fast case."""
    if save:
        return False
    if seqs.cu_seqlens is None:
        return seqs.T == 1
    return seqs.total <= seqs.num


def _tc_kernel(ct, N, mode):
    """(name, block size, dynamic shared memory) of chunked pass ``mode`` (0 outputs, 1 transitions, 2 adjoint,
    3 adjoint transitions): wkv7_tc_wy for 16-bit I/O when TC_WY, else wkv7_tc_chunk (same arguments)."""
    if TC_WY and ct != "float":
        return f"wkv7_tc_wy<{ct}, {N}, {mode}>", _wy_threads(N, mode), _wy_smem(N, mode)
    return f"wkv7_tc_chunk<{ct}, {N}, {mode}>", _tc_threads(N, mode), _tc_smem(N, mode)


def _wy_threads(N, mode):
    """Block size of wkv7_tc_wy<T, N, mode> (WyCfg::NT): consumer warps of 16 state rows (32 for the 2N-row
    transitions, modes 1 and 3) plus 2N producer threads."""
    rw = 32 if mode in (1, 3) else 16
    rows = 2 * N if mode in (1, 3) else N
    return 32 * (rows // rw) + 2 * N


def _wy_smem(N, mode):
    """Dynamic shared memory (bytes) of wkv7_tc_wy<T, N, mode> (WyCfg::SMEM_FLOATS): two stages (W, [Rt], U0^T,
    [Y0^T], V^T, Bo^T, Ko^T [16][N] and gamma [N]; [..]: mode 0 only), raw 16-bit inputs [2][6][16][N], four
    token arrays [16][N+4], four intra-chunk matrices and P, PM, QP [16][20], two flags (padded to 4 words), mode 0:
    y staging [consumer warps][16][16] 16-bit."""
    L = TC_L
    y = mode == 0
    stage = (7 if y else 5) * L * N + N
    nc = (2 * N if mode in (1, 3) else N) // (32 if mode in (1, 3) else 16)
    return 4 * (2 * stage + 6 * L * N + 4 * L * (N + 4) + 7 * L * 20 + 4 + (nc * L * 8 if y else 0))


def _tc_threads(N, mode):
    """Block size of wkv7_tc_chunk<T, N, mode> (TcCfg::NT): one warp per 16 state rows, at most 4 warps."""
    rows = 2 * N if mode in (1, 3) else N
    return 32 * min(rows // 16, 4)


def _tc_smem(N, mode):
    """Dynamic shared memory (bytes) of wkv7_tc_chunk<T, N, mode> (TcCfg::SMEM_FLOATS): 10 token arrays [L][N+8],
    U [L][R+8], 4 intra-chunk matrices [L][20], the chunk decay [N] (the state stays in registers)."""
    L, R = TC_L, (2 * N if mode in (1, 3) else N)
    return 4 * (10 * L * (N + 8) + L * (R + 8) + 4 * L * 20 + N)


def _tc_bwd_warps(N):
    nw = TC_BWD_WARPS[N]
    if nw not in TC_BWD_WARP_OPTIONS[N]:
        raise ValueError(f"wkv7: TC_BWD_WARPS[{N}] = {nw} is not compiled (options {TC_BWD_WARP_OPTIONS[N]})")
    return nw


def _tc_bwd_name(ct, N):
    st = TC_BWD_STRIP[N]
    if st not in TC_BWD_STRIP_OPTIONS[N]:
        raise ValueError(f"wkv7: TC_BWD_STRIP[{N}] = {st} is not compiled (options {TC_BWD_STRIP_OPTIONS[N]})")
    return f"wkv7_tc_bwd<{ct}, {N}, {_tc_bwd_warps(N)}, {st}>"


def _tc_bwd_threads(N):
    """Block size of wkv7_tc_bwd<T, N, TC_BWD_WARPS[N]> (TcBwdCfg::NT)."""
    return 32 * _tc_bwd_warps(N)


def _tc_bwd_smem(N):
    """Dynamic shared memory (bytes) of wkv7_tc_bwd<T, N> (TcBwdCfg::SMEM_FLOATS): 16 token arrays [L][N+4],
    S0 and X [N][N+4], 8 token-pair matrices [L][20], diag(X^T S0) [N]; N = 32 also dR, dA (N = 64: over X)."""
    L, ld = TC_L, N + 4
    extra = 0 if N * ld >= 4 * L * ld else 2 * L * ld
    return 4 * (16 * L * ld + 2 * N * ld + 8 * L * 20 + N + extra)


def _use_chunked_bwd(call) -> bool:
    """The chunked tensor-core backward: dense inputs, N in TC_HEAD_SIZES, the row backward (its per-chunk mode
    takes the chunks with strong decays) fits the device, T >= TC_MIN_T (or BACKWARD_PATH == "chunked")."""
    seqs, N = call.seqs, call.dims["N"]
    if BACKWARD_PATH == "recurrent" or seqs.cu_seqlens is not None or N not in TC_HEAD_SIZES or seqs.T < 1:
        return False
    if not _bwd_rows(N):
        return False
    return BACKWARD_PATH == "chunked" or seqs.T >= TC_MIN_T


def _backward_chunked(call, x, saved, dy, dstate, g, dstate_in):
    """Chunked backward of a dense batch: wkv7_tc_chunk<.., 2> per (sequence, head) walks the chunks backwards
    (adjoint checkpoints X at every chunk end into dck, the initial-state gradient; with time segments (as
    _tc_segments picks for the forward): <.., 3> segment transitions, wkv7_tc_scan backwards over the segments, then
    <.., 2> per (sequence, segment, head) from the segment's end adjoint); wkv7_tc_bwd per (sequence,
    chunk, head) computes the gradients of the chunks whose decays are all mild and lists the others in fix;
    wkv7_backward's per-chunk mode does those exactly."""
    from .._gpu import error_ptr, ptr
    i32 = np.int32
    seqs = call.seqs
    B, T, H, N = seqs.num, seqs.T, call.dims["H"], call.dims["N"]
    ct = CTYPE[call.dtype]
    nch = -(-T // TC_L)
    if dy is None:
        dy = call.empty(tuple(x["r"].shape), call.dtype)
        _gpu.zero(dy)
    ins = [ptr(x[n]) for n in ("r", "w", "k", "v", "a", "b")]
    vec = _gpu.aligned(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), dy, *g.values())   # 16-byte accesses
    dck = call.empty((max(seqs.chunk_slots(CK), 1), H, N, N), "float32")
    fix = call.empty((1 + B * nch * H,), "int32")   # [count, chunk ids]
    _gpu.zero(fix)
    # adjoint pass: one block per (sequence, head) walking all chunks backwards, or (few sequences x heads) time
    # segments: their transitions X_start = X_end M' + A' in parallel, a reverse scan for the adjoint at every
    # segment end (and dL/d initial state), then the segments' checkpoints in parallel
    nseg, seg_len = _tc_layout(B, H, T, TC_BWD_NSEG if TC_BWD_NSEG is not None else None if TC_BWD_SEGMENTS else 1)
    segbuf = None if nseg == 1 else call.empty((B, nseg, H, 2, N, N), "float32")

    def adjoint(mode, sin, sout, ck):
        name, nt, smem = _tc_kernel(ct, N, mode)
        _launch(name, (B * nseg * H,), (nt,),
                (ins[0], ins[1], ins[2], ptr(dy), ins[4], ins[5], ptr(None), i32(T), i32(H), i32(seg_len), i32(nseg),
                 ptr(sin), ptr(sout), ptr(None), i32(0), error_ptr(), ptr(ck), ptr(segbuf), i32(vec)),
                shared_mem=smem)
    if nseg == 1:
        adjoint(2, dstate, dstate_in, dck)
    else:
        adjoint(3, None, None, None)
        _launch(f"wkv7_tc_scan<{N}>", (B * H * (N // 16),), (256,),
                (ptr(segbuf), i32(nseg), i32(H), ptr(dstate), ptr(dstate_in), ptr(None), i32(0), error_ptr(), i32(1)))
        adjoint(2, None, None, dck)
    grads = [ptr(g[n]) for n in ("r", "w", "k", "v", "a", "b")]
    mild = np.float32(min(float(BWD_MILD), 30.0 / TC_L))
    _launch(_tc_bwd_name(ct, N), (B * nch * H,), (_tc_bwd_threads(N),),
            (*ins, ptr(dy), *grads, i32(T), i32(H), ptr(saved["ckpt"]), ptr(dck), ptr(fix), mild, i32(vec)),
            shared_mem=_tc_bwd_smem(N))
    _launch(f"wkv7_backward<{ct}, {N}>", (max(1, min(B * nch * H, _device_sms())),), (2 * N,),
            (*ins, ptr(dy), *grads, ptr(None), i32(T), np.int64(seqs.total), ptr(None), ptr(None), ptr(None),
             i32(0), error_ptr(), ptr(saved["ckpt"]), ptr(None), i32(H), i32(B), ptr(dck), ptr(fix)),
            shared_mem=_bwd_rows_smem(N))


def _use_chunked(call) -> bool:
    """The chunked tensor-core forward: dense inputs (no cu_seqlens), N in TC_HEAD_SIZES, T >= TC_MIN_T (or
    FORWARD_PATH == "chunked"); never for decode (T == 1 without checkpoints goes to wkv7_decode first)."""
    seqs, N = call.seqs, call.dims["N"]
    if FORWARD_PATH == "recurrent" or seqs.cu_seqlens is not None or N not in TC_HEAD_SIZES or seqs.T < 1:
        return False
    return FORWARD_PATH == "chunked" or seqs.T >= TC_MIN_T


def _device_sms() -> int:
    import cupy
    return _sm_count(cupy.cuda.Device().id)


def _tc_segments(num, H, T) -> int:
    """Time segments per sequence.  The segmented path costs about twice the chunk work (a transition pass over
    2N-row states, then the outputs) plus a scan, so it pays only when it multiplies the parallelism by >= 3:
    nseg = floor(TC_BLOCKS_PER_SM * SMs / (num * H)) (every block of both passes resident at once) if that is
    >= TC_MIN_NSEG, capped so segments keep >= TC_SEG_MIN tokens; else 1 (one block per (sequence, head)).
    H100 (132 SMs), H = 32, bf16: B = 1 -> 8 segments (T = 16384: 1.96 ms vs 6.15 with one); B = 4 -> 1 (0.55 ms at
    T = 1024 vs 0.68 with 2)."""
    if TC_NSEG is not None:
        return max(1, min(int(TC_NSEG), -(-T // TC_L)))
    nseg = min(TC_BLOCKS_PER_SM * _device_sms() // max(1, num * H), -(-T // TC_SEG_MIN))
    return nseg if nseg >= TC_MIN_NSEG else 1


def _tc_layout(num, H, T, nseg=None):
    """(segments, tokens per segment): whole chunks, nseg (None: :func:`_tc_segments`) segments or fewer."""
    nseg = _tc_segments(num, H, T) if nseg is None else max(1, min(int(nseg), -(-T // TC_L)))
    seg_len = -(-(-(-T // nseg)) // TC_L) * TC_L
    return -(-T // seg_len), seg_len


def _forward_chunked(call, x, y, state_in, state_out, ckpt, vec):
    """Chunked forward of a dense batch (see wkv7.cu): nseg == 1: wkv7_tc_chunk<.., 0> per (sequence, head);
    else wkv7_tc_chunk<.., 1> (segment transitions into segbuf [B, nseg, H, 2, N, N] fp32), wkv7_tc_scan (segment
    start states, final state) and wkv7_tc_chunk<.., 0> per (sequence, segment, head)."""
    from .._gpu import error_ptr, ptr
    i32 = np.int32
    seqs = call.seqs
    B, T, H, N = seqs.num, seqs.T, call.dims["H"], call.dims["N"]
    ct = CTYPE[call.dtype]
    nseg, seg_len = _tc_layout(B, H, T)
    ins = tuple(ptr(x[n]) for n in ("r", "w", "k", "v", "a", "b"))
    segbuf = None if nseg == 1 else call.empty((B, nseg, H, 2, N, N), "float32")

    def chunk(mode, yy, sin, sout, ck):
        name, nt, smem = _tc_kernel(ct, N, mode)
        _launch(name, (B * nseg * H,), (nt,),
                (*ins, ptr(yy), i32(T), i32(H), i32(seg_len), i32(nseg), ptr(sin), ptr(sout), ptr(seqs.state_idx),
                 i32(seqs.pool_size), error_ptr(), ptr(ck), ptr(segbuf), i32(vec)), shared_mem=smem)
    if nseg == 1:
        chunk(0, y, state_in, state_out, ckpt)
        return
    chunk(1, None, None, None, None)
    _launch(f"wkv7_tc_scan<{N}>", (B * H * (N // 16),), (256,),
            (ptr(segbuf), i32(nseg), i32(H), ptr(state_in), ptr(state_out), ptr(seqs.state_idx),
             i32(seqs.pool_size), error_ptr(), i32(0)))
    chunk(0, y, None, None, ckpt)


def gpu_forward(call, x, state_in, state_out, save):
    """Launch the forward.  One token per sequence without backward (:func:`_use_decode`, pools included) uses the
    decode kernel; dense long sequences the chunked tensor-core forward (:func:`_use_chunked`, also writing the
    checkpoints with ``save``); everything else the recurrent kernel (``FWD_R[N]`` one-warp blocks per (sequence, head), each owning ``FWD_RB`` state rows), which with
    ``save`` also writes fp32 state checkpoints every ``CK`` tokens (``saved['ckpt']``)."""
    from .._gpu import error_ptr, ptr
    _gpu.check_aligned('wkv7', state=state_in, state_out=state_out)
    seqs = call.seqs
    H, N = call.dims["H"], call.dims["N"]
    ct = CTYPE[call.dtype]
    y = call.empty(tuple(x["r"].shape), call.dtype)
    ins = [ptr(x[n]) for n in ("r", "w", "k", "v", "a", "b")]
    abi = [ptr(seqs.cu_seqlens), np.int32(seqs.T), np.int64(seqs.total),
           ptr(state_in), ptr(state_out), ptr(seqs.state_idx), np.int32(seqs.pool_size), error_ptr()]
    grid = (seqs.num * H,)
    ckpt = None
    if _use_decode(seqs, save):
        _launch(f"wkv7_decode<{ct}, {N}>", grid, (4 * N,), (*ins, ptr(y), *abi, np.int32(H)))
    else:
        if save:
            ckpt = call.empty((max(seqs.chunk_slots(CK), 1), H, N, N), "float32")
        vec = _gpu.aligned(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), y)   # 16-byte loads (and y stores)
        if _use_chunked(call):
            _forward_chunked(call, x, y, state_in, state_out, ckpt, vec)
            return y, {"ckpt": ckpt}
        blocks = seqs.num * H * FWD_R[N]
        rt = _fwd_rt(blocks)
        name = f"wkv7_forward<{ct}, {N}>" if rt == 4 else f"wkv7_forward<{ct}, {N}, {rt}>"
        _launch(name, (blocks,), (FWD_NT[rt],), (*ins, ptr(y), *abi, ptr(ckpt), np.int32(H), np.int32(vec)))
    return y, {"ckpt": ckpt}


def gpu_backward(call, x, state_in, saved, dy, dstate):
    """Launch the backward: gradients of ``sum(dy*y) + sum(dstate*state_out)`` from the forward's checkpoints."""
    from .._gpu import error_ptr, ptr
    _gpu.check_aligned('wkv7', dstate=dstate)
    seqs = call.seqs
    H, N = call.dims["H"], call.dims["N"]
    ct = CTYPE[call.dtype]
    shape = tuple(x["r"].shape)
    g = {n: call.empty(shape, call.dtype) for n in ("r", "w", "k", "v", "a", "b")}
    dstate_in = call.empty((seqs.num, H, N, N), "float32")
    if _use_chunked_bwd(call):
        _backward_chunked(call, x, saved, dy, dstate, g, dstate_in)
        g["state"] = dstate_in
        return g
    items = seqs.num * H
    rows = _bwd_rows(N)
    nblk = items if rows else _bwd_blocks(items, N)
    scratch = None if rows else call.empty((nblk, BWD_SC[N] + 1, N, N), "float32")
    args = ([ptr(x[n]) for n in ("r", "w", "k", "v", "a", "b")] + [ptr(dy)]
            + [ptr(g[n]) for n in ("r", "w", "k", "v", "a", "b")]
            + [ptr(seqs.cu_seqlens), np.int32(seqs.T), np.int64(seqs.total),
               ptr(dstate), ptr(dstate_in), ptr(None), np.int32(0), error_ptr(),
               ptr(saved["ckpt"]), ptr(scratch), np.int32(H), np.int32(seqs.num)])
    if rows:
        args += [ptr(None), ptr(None)]   # dckpt, fix: the whole-sequence mode
    if rows:
        _launch(f"wkv7_backward<{ct}, {N}>", (nblk,), (2 * N,), tuple(args), shared_mem=_bwd_rows_smem(N))
    else:
        _launch(f"wkv7_backward_l2<{ct}, {N}>", (nblk,), (N * N // 32,), tuple(args), shared_mem=_bwd_smem(N))
    g["state"] = dstate_in
    return g


# ----------------------------------------------------------------------------- declaration

_BTHN = ("B", "T", "H", "N")


def sample_inputs(rng, dims, w_range=(-8.0, 4.0)):
    """Realistic random inputs (float64): w uniform in ``w_range``, a = -kk, b = kk * lr with kk unit-norm per head,
    as RWKV-7 models produce them (random a, b would make the transition expand and the state blow up)."""
    shape = tuple(dims[s] for s in _BTHN)
    x = {n: rng.standard_normal(shape) for n in ("r", "k", "v")}
    x["k"] /= np.sqrt(dims["N"])
    x["w"] = rng.uniform(*w_range, size=shape)
    kk = rng.standard_normal(shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    x["a"] = -kk
    x["b"] = kk * rng.uniform(0.0, 1.0, shape)
    return {n: x[n] for n in ("r", "w", "k", "v", "a", "b")}

OP = register_op(Op(
    name="wkv7",
    inputs=(Arg("r", _BTHN, "receptance"), Arg("w", _BTHN, "raw decay: factor exp(-exp(w))"),
            Arg("k", _BTHN, "key"), Arg("v", _BTHN, "value"), Arg("a", _BTHN, "in-context rate a (models: -kk)"),
            Arg("b", _BTHN, "in-context rate b (models: kk*lr)")),
    state=Arg("state", ("B", "H", "N", "N"), "fp32 state S[b, h, i=value, j=key]"),
    output="r",
    reference_forward=reference_forward,
    reference_backward=reference_backward,
    dtypes=("float32", "float16", "bfloat16"),
    head_sizes=HEAD_SIZES,
    gpu_forward=gpu_forward,
    gpu_backward=gpu_backward,
    kernels=(Kernel(SOURCE, NAME_EXPRESSIONS),),
    sample_inputs=sample_inputs,
    doc="RWKV-7 WKV recurrence",
))


def wkv7(r, w, k, v, a, b, state=None, *, cu_seqlens=None, state_indices=None):
    """RWKV-7 WKV recurrence.

    For every sequence, batch element and head (``i`` = value channel, ``j`` = key channel)::

        S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T
        y_t = S_t r_t

    Parameters
    ----------
    r, w, k, v, a, b : arrays ``[B, T, H, N]``, one dtype: float32, float16 or bfloat16 on the GPU (N in 32, 64,
        128), float64/float32 (also float16/bf16, computed in float32) on the CPU.  ``w`` is the raw decay
        parameter (the factor ``exp(-exp(w))`` is computed in fp32).  Models pass ``a = -kk``, ``b = kk * lr``.
    state : optional ``[B, H, N, N]`` float32 (float64 allowed on the CPU), ``state[b, h, i, j]``; None = zeros.
        With ``state_indices`` it is a pool ``[P, H, N, N]`` updated in place.
    cu_seqlens : optional int32 ``[num_seqs + 1]`` (host or device): sequences packed along T with ``B = 1``.
    state_indices : optional int32 ``[num_seqs]``: pool slot of each sequence (read at its start, written at its
        end); ``-1`` starts from zeros and writes nothing.

    Returns
    -------
    ``(y, state_out)``: ``y`` like ``r`` (same shape and dtype); ``state_out`` ``[num_seqs, H, N, N]`` float32
    (the pool itself with ``state_indices``).  NumPy, CuPy and torch arrays in, the same type out; torch tensors
    are differentiable (``r, w, k, v, a, b`` and ``state``).  A state is exact continuation: splitting ``T``
    and passing ``state_out`` on gives the same results.  flash-linear-attention convention: :func:`to_fla`.
    """
    return OP(r, w, k, v, a, b, state=state, cu_seqlens=cu_seqlens, state_indices=state_indices)
