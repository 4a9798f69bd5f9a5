"""RWKV-6 WKV: ``wkv6(r, k, v, w, u, state=None) -> (y, state_out)``.

Formula (per batch b and head h; ``i`` is the value channel, ``j`` the key channel)::

    d_t[j]   = exp(-exp(w_t[j]))                                      (computed in fp32 on the GPU)
    y_t[i]   = sum_j r_t[j] * (u[j] * k_t[j] * v_t[i] + S_{t-1}[i, j])
    S_t[i,j] = S_{t-1}[i, j] * d_t[j] + k_t[j] * v_t[i]

Files: this module (declaration, NumPy reference forward/backward, GPU launchers, fla converters) and
``cuda_src/wkv6.cu`` (kernels).  GPU design (see the .cu file for details):

* forward, recurrent (general T, varlen): one block per (sequence, head), thread ``i`` owns state row ``i``
  in registers, r/k/decay/u*k of a tile of time steps staged in shared memory (double buffered, one barrier
  per tile);
* forward, chunked (dense batches with T >= CHUNKED_MIN_T and few (sequence, head) blocks; seed 000's plan),
  on tensor cores (``cuda_src/tc.cuh``: mma.sync m16n8k8 TF32; 3xTF32 for fp32 inputs, so fp32 stays at fp32
  accuracy): each 64-token chunk's local state V^T Kt (wkv6_tc_state) in parallel, a scan over chunks per state
  element (wkv6_chunk_scan), then every chunk's outputs from its true initial state in parallel (wkv6_tc_output:
  the inter-chunk term (r*gamma) S^T plus the intra-chunk scores A = Qh Kh^T in 16-token blocks).  Decay
  products are exp of sums of log decays over exactly their tokens (never a ratio of cumulative products), and a
  16-token block whose decays multiply below e^-30 gets its diagonal scores pairwise from the decays, so any w in
  [-8, 4] is exact.  Decay factors multiply the mma operands as their fragments load (no scaled copies in
  shared memory), so the score kernels (wkv6_tc_output, wkv6_tc_bwd_v) fit three blocks per SM at N = 64.
  For N <= 64 (``FORWARD_FUSED``) the three steps run as one launch, wkv6_tc_fused: blocks take tickets
  chunk-major, do each chunk's local work (intra-chunk outputs, local state), then get S_in(c) from chunk c - 1's
  publication (a chain of flags; with few (sequence, head) chains a decoupled look-back over published chunk
  aggregates, ``FUSED_LOOKBACK``), publish S_in(c + 1) and add the inter-chunk term: each input read once, no
  separate passes over the chunk states (B=8 T=4096 and B=1 T=16384 timings: benchmarks/results/logs/s4-h3).
  ``FORWARD_PATH`` forces "recurrent" or "chunked" for comparisons;
* forward, one-token decode (T == 1, or varlen with one token per sequence on average): 256 threads per
  (sequence, head), each owning float4 quads of the state (coalesced 16-byte state traffic), row sums by
  warp shuffles;
* the per-step scalars r.(u*k) (forward, dv) and dy.v (dr, dk) are block sums computed once per step during
  staging (warp shuffles, fixed order), not by every thread;
* backward, chunk-parallel (dense inputs with T >= BWD_CHUNKED_MIN_T; ``BACKWARD_PATH`` forces "sequential" or
  "chunked"): the state at every BWD_CHUNK_L-token chunk's start (the forward chunk scan, or the chunked forward's
  saved one) and the adjoint G at every chunk's last token (the same kernels run in reverse: local reverse
  accumulation of G_{t-1} = G_t d_t + dy_t r_t^T per chunk from zero, then a reverse scan over chunks, which also
  yields dstate).  With 64-token chunks and N <= 64 two tensor-core kernels then finish every (sequence, chunk,
  head) in parallel (wkv6_tc_bwd_v: dv; wkv6_tc_bwd_rkw: dr, dk, dw and du partials; formulas in wkv6.cu; dw from
  prefix/suffix scans over exactly their terms, and an exact per-channel recurrence in chunks with strong decays);
  otherwise the three recurrent passes below run per chunk.  du is reduced over the chunks in a fixed order
  (deterministic);
* backward, sequential (varlen, short T): three passes over the recurrence, none divides by the decay (no clamp;
  decays down to 1e-24):
  (1) forward, thread = key column ``j``: recomputes S, writes dr, the terms X_t[j] = r_t[j] (dy_t . S_{t-1}[:, j])
      with bounds of |S_{t-1}[:, j]|, and fp32 checkpoints of S at the end of every CK-token chunk;
  (2) reverse, thread = key column ``j`` of the adjoint G: dk, du partials (per sequence and head, reduced
      deterministically afterwards), dstate, and dw through W_t = <G_t, S_t>_col, re-anchored exactly from the
      checkpoint at every chunk and stepped inside a chunk with W_{t-1} = W_t - Y_t + X_t, Y_t = k_t (G_t^T v_t);
      for fp32 I/O the step's term D_t = W_t - Y_t is clamped to d_t |G_t[:, j]| |S_{t-1}[:, j]| (Cauchy-Schwarz,
      norm bounds carried by both passes), which removes the carried fp32 rounding at strongly decayed steps (16-bit
      I/O skips it: its own rounding is far above that error, and the bounds cost 10-30% of the passes);
  (3) reverse, thread = value row ``i`` of G: dv.
  The recurrent forward saves nothing for the backward (it recomputes from the inputs and the initial state);
  the chunked forward with save=True keeps its chunk-start states for the chunk-parallel backward.
"""
from __future__ import annotations

import numpy as np

from . import _fla
from .. import _gpu
from ..registry import Arg, Kernel, Op, register_op

__all__ = ["wkv6", "to_fla", "from_fla", "reference_forward", "reference_backward", "OP"]

SOURCE = "wkv6.cu"
HEAD_SIZES = (32, 64, 128)
_CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
CK = 64              # checkpoint interval (tokens) of the backward pass
STREAM_THREADS = 256  # block size of the decode kernel

_KERNEL_NAMES = ("wkv6_forward", "wkv6_forward_stream", "wkv6_tc_state", "wkv6_chunk_scan", "wkv6_tc_output",
                 "wkv6_tc_fused", "wkv6_tc_bwd_v", "wkv6_tc_bwd_rkw",
                 "wkv6_chunk_output", "wkv6_bwd_colfwd", "wkv6_bwd_colrev", "wkv6_bwd_rowrev", "wkv6_reduce_u")

# Forward path selection: "auto" (below), or force "recurrent" / "chunked" (for comparisons and tests).
FORWARD_PATH = "auto"
_TC_L = 64                 # TC_L in wkv6.cu
CHUNK_L = _TC_L            # tokens per chunk of the chunked forward (fixed by the kernels)
TC_OUTPUT_MAX_N = 64       # wkv6_tc_output and the tensor-core backward serve N <= 64 (shared memory); N = 128
                           # uses wkv6_chunk_output and the recurrent per-chunk backward passes
_TC_N_LIMITED = ("wkv6_tc_output", "wkv6_tc_fused", "wkv6_tc_bwd_v", "wkv6_tc_bwd_rkw")
FORWARD_FUSED = True       # N <= 64: the single-pass chunked forward (wkv6_tc_fused); False: the three kernels
# wkv6_tc_fused's hand-off of chunk states: "auto" (a decoupled look-back when at most FUSED_LOOKBACK_MAX_CHAINS
# (sequence, head) chains share the GPU, e.g. batch-1 prefill, where a pure chain of T/64 hops bounds the time; else
# the pure chain, which writes no aggregates), or 0 (chain), 1 (look-back), 2 (look-back folding to chunk 0: tests)
FUSED_LOOKBACK = "auto"
FUSED_LOOKBACK_MAX_CHAINS = 32   # H100, bf16, H = 32: B = 1 T = 16384 0.670 ms look-back vs 0.937 chain; B = 2 T = 16384
                                 # (64 chains) 1.198 vs 1.142 (benchmarks/results/logs/s4-h3)
CHUNKED_MIN_T = 256        # auto: chunked only for dense inputs with T >= this ...
CHUNKED_MAX_BLOCKS = 1024  # ... and fewer than this many (sequence, head) blocks (the recurrent form underfills)

# Backward path selection: "auto" (chunk-parallel for dense inputs with T >= BWD_CHUNKED_MIN_T), or force
# "sequential" (the three full-sequence passes, one block per (sequence, head); also the varlen path) or
# "chunked" (dense inputs only).
BACKWARD_PATH = "auto"
BWD_CHUNK_L = 64           # tokens per chunk of the chunk-parallel backward
BWD_CHUNKED_MIN_T = 128
BWD_CHUNKED_MAX_BLOCKS = 2048  # auto: ... and fewer (sequence, head) blocks than this (bounds the 3 chunk-state
                               # buffers of [B, T/L, H, N, N] fp32; larger batches fill the GPU sequentially)


def _ne(name, ctype, n):
    return f"{name}<{ctype}, {n}>"


NAME_EXPRESSIONS = tuple(_ne(k, c, n) for k in _KERNEL_NAMES for c in _CTYPES.values() for n in HEAD_SIZES
                         if not (k in _TC_N_LIMITED and n > TC_OUTPUT_MAX_N))


def tc_state_smem(N) -> int:
    """Dynamic shared memory (bytes) of wkv6_tc_state: k, log decays and v of one chunk (rows of N + 8 floats) and
    the 16-token block totals and factors (rows of N).  56 KB for N = 64: four blocks per SM."""
    return 4 * (3 * CHUNK_L * (N + 8) + 2 * (CHUNK_L // 16) * N)


def tc_bwd_smem(N) -> int:
    """Dynamic shared memory (bytes) of wkv6_tc_bwd_rkw."""
    L, nb = CHUNK_L, CHUNK_L // 16
    return 4 * (5 * L * (N + 4) + L * (L + 4) + 5 * nb * (N + 4) + L + 2 * N + nb)


def tc_output_smem(N) -> int:
    """Dynamic shared memory (bytes) of wkv6_tc_output, wkv6_tc_fused and wkv6_tc_bwd_v (TcScoreSmem in wkv6.cu):
    two chunk arrays of rows of N + 4 floats and one of N + 8, the [L, L + 4] score matrix, block totals and
    per-warp factors (rows of N + 4), r.(u*k), u and the block flags.  73 KB for N = 64: three blocks per SM."""
    L, nb = CHUNK_L, CHUNK_L // 16
    return 4 * (2 * L * (N + 4) + L * (N + 8) + L * (L + 4) + 2 * nb * (N + 4) + L + N + nb)


# ---------------------------------------------------------------- NumPy reference (the test oracle)

def _decay(w):
    return np.exp(-np.exp(w))


def reference_forward(x: dict, state):
    """Dense-batch NumPy reference; computes in the inputs' dtype.  state [B, H, N(value i), N(key j)]."""
    r, k, v, w, u = (x[n] for n in ("r", "k", "v", "w", "u"))
    dt = r.dtype
    B, T, H, N = r.shape
    S = np.array(state, dtype=dt, copy=True)
    y = np.empty_like(r)
    d = _decay(w).astype(dt)
    for t in range(T):
        kv = v[:, t, :, :, None] * k[:, t, :, None, :]                  # [B,H,i,j]
        y[:, t] = np.einsum("bhij,bhj->bhi", S + u[None, :, None, :] * kv, r[:, t])
        S = S * d[:, t, :, None, :] + kv
    return y, S


def reference_backward(x: dict, state, dy, dstate):
    """Gradients of sum(dy*y) + sum(dstate*state_out) w.r.t. r, k, v, w, u (summed over batch) and state.

    Derived by hand from the recurrence, with G_t the adjoint of S_t (G_{T-1} = dstate)::

        dr_t[j] = sum_i dy_t[i] (u_j k_t[j] v_t[i] + S_{t-1}[i,j])
        dk_t[j] = r_t[j] u_j (dy_t . v_t) + sum_i G_t[i,j] v_t[i]
        dv_t[i] = dy_t[i] sum_j r_t[j] u_j k_t[j] + sum_j G_t[i,j] k_t[j]
        dw_t[j] = (sum_i G_t[i,j] S_{t-1}[i,j]) * d_t[j] * (-exp(w_t[j]))
        du[j]   = sum_{b,t} r_t[j] k_t[j] (dy_t . v_t)
        G_{t-1}[i,j] = G_t[i,j] d_t[j] + dy_t[i] r_t[j];   dstate = G_{-1}
    """
    r, k, v, w, u = (x[n] for n in ("r", "k", "v", "w", "u"))
    dt = r.dtype
    B, T, H, N = r.shape
    d = _decay(w).astype(dt)
    states = np.empty((T + 1, B, H, N, N), dt)
    states[0] = state
    for t in range(T):
        states[t + 1] = states[t] * d[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
    dy = np.asarray(dy, dtype=dt)
    G = np.array(dstate, dtype=dt, copy=True)
    dr, dk, dv, dw = (np.empty_like(r) for _ in range(4))
    du = np.zeros((B, H, N), dt)
    for t in range(T - 1, -1, -1):
        Sp = states[t]                                   # S_{t-1}
        rt, kt, vt, dyt, dtt = r[:, t], k[:, t], v[:, t], dy[:, t], d[:, t]
        dyv = np.sum(dyt * vt, axis=-1)                  # [B,H]
        ruk = np.sum(rt * u[None] * kt, axis=-1)         # [B,H]
        dr[:, t] = u[None] * kt * dyv[..., None] + np.einsum("bhi,bhij->bhj", dyt, Sp)
        dk[:, t] = rt * u[None] * dyv[..., None] + np.einsum("bhij,bhi->bhj", G, vt)
        dv[:, t] = dyt * ruk[..., None] + np.einsum("bhij,bhj->bhi", G, kt)
        dw[:, t] = np.sum(G * Sp, axis=-2) * dtt * (-np.exp(w[:, t]))
        du += rt * kt * dyv[..., None]
        G = G * dtt[:, :, None, :] + dyt[..., :, None] * rt[..., None, :]
    return {"r": dr, "k": dk, "v": dv, "w": dw, "u": du.sum(axis=0), "state": G}


# ---------------------------------------------------------------- GPU launchers

def _launch(name, call, grid, block, args, shared_mem=0):
    from .._gpu import launch
    n = call.dims["N"]
    launch("wkv6", SOURCE, _ne(name, _CTYPES[call.dtype], n), NAME_EXPRESSIONS, grid, block, args, shared_mem)


def _use_stream(seqs) -> bool:
    """The decode kernel: one token per sequence (dense T == 1, or varlen with total <= number of sequences)."""
    if seqs.cu_seqlens is None:
        return seqs.T == 1
    return seqs.total <= seqs.num


def _forward_path(call) -> str:
    """'stream' (decode), 'chunked' (dense long sequences, few blocks) or 'recurrent'."""
    seqs = call.seqs
    if FORWARD_PATH == "chunked" and seqs.cu_seqlens is None:
        return "chunked"
    if FORWARD_PATH == "recurrent":
        return "recurrent"
    if _use_stream(seqs):
        return "stream"
    if (FORWARD_PATH == "auto" and seqs.cu_seqlens is None and seqs.T >= CHUNKED_MIN_T
            and seqs.num * call.dims["H"] < CHUNKED_MAX_BLOCKS):
        return "chunked"
    return "recurrent"


def _forward_chunked(call, x, state_in, state_out, y):
    """Chunk-parallel forward for dense batches (see wkv6.cu): local chunk states, a scan over chunks, outputs
    (N <= 64 with FORWARD_FUSED: all three in one launch)."""
    from .._gpu import error_ptr, ptr, zero
    i32 = np.int32
    seqs = call.seqs
    B, T, H, N = seqs.num, seqs.T, call.dims["H"], call.dims["N"]
    L = CHUNK_L
    if L != _TC_L:
        raise ValueError(f"wkv6.CHUNK_L is fixed at {_TC_L} by the tensor-core chunk kernels (TC_L in wkv6.cu), "
                         f"got {L}")
    nc = -(-T // L)
    if FORWARD_FUSED and N <= TC_OUTPUT_MAX_N:
        # one launch: tickets chunk-major, chunk c waits for chunk c - 1's state (see wkv6_tc_fused)
        buf = call.empty((B, nc, H, N, N), "float32")
        flags = call.empty((B * nc * H + 1,), "int32")   # per chunk: what it has published; last: the ticket counter
        zero(flags)
        lb = FUSED_LOOKBACK
        if lb == "auto":
            lb = 1 if B * H <= FUSED_LOOKBACK_MAX_CHAINS and nc > 1 else 0
        agg = call.empty((B * nc * H, N * N + N), "float32") if lb else None
        vec = i32(_gpu.aligned(x["r"], x["k"], x["v"], x["w"], y))
        _launch("wkv6_tc_fused", call, (B * nc * H,), (128,),
                (i32(T), i32(H), i32(B * H), ptr(x["r"]), ptr(x["k"]), ptr(x["v"]), ptr(x["w"]), ptr(x["u"]),
                 ptr(buf), ptr(agg), ptr(flags), i32(lb), ptr(state_in), ptr(state_out), ptr(seqs.state_idx),
                 i32(seqs.pool_size), error_ptr(), ptr(y), vec), tc_output_smem(N))
        return buf
    buf = _chunk_states(call, x["k"], x["v"], x["w"], state_in, state_out, seqs.state_idx, seqs.pool_size, L, False)
    rkvwu = (ptr(x["r"]), ptr(x["k"]), ptr(x["v"]), ptr(x["w"]), ptr(x["u"]), ptr(buf), ptr(y))
    if N <= TC_OUTPUT_MAX_N:
        vec = i32(_gpu.aligned(x["r"], x["k"], x["v"], x["w"], y))
        _launch("wkv6_tc_output", call, (B * nc * H,), (128,), (i32(T), i32(H)) + rkvwu + (vec,), tc_output_smem(N))
    else:
        _launch("wkv6_chunk_output", call, (B * nc * H,), (N,), (i32(T), i32(H), i32(L)) + rkvwu)
    return buf


def _chunk_states(call, k, v, w, state_in, state_out, state_idx, pool_size, L, rev):
    """Per-chunk states of a dense batch: wkv6_chunk_state (local chunk states from zero) + wkv6_chunk_scan.

    rev=False: returns buf [B, nc, H, N, N] with buf[b, c] = S at the start of chunk c (the state after token c*L-1);
    the final state goes to state_out.  rev=True (the backward's adjoint G_{t-1} = G_t d_t + dy_t r_t^T; pass
    k=r, v=dy, state_in=dstate): buf[b, c] = G at the last token of chunk c, state_out gets G_{-1} = dstate_in.
    """
    from .._gpu import error_ptr, ptr
    i32 = np.int32
    seqs = call.seqs
    B, T, H, N = seqs.num, seqs.T, call.dims["H"], call.dims["N"]
    nc = -(-T // L)
    buf = call.empty((B, nc, H, N, N), "float32")
    dec = call.empty((B, nc, H, N), "float32")
    assert 1 <= L <= CHUNK_L, "wkv6_tc_state takes chunks of at most CHUNK_L tokens"
    _launch("wkv6_tc_state", call, (B * nc * H,), (128,),
            (i32(T), i32(H), i32(L), ptr(k), ptr(v), ptr(w), ptr(buf), ptr(dec), i32(1 if rev else 0),
             i32(_gpu.aligned(k, v, w))), tc_state_smem(N))
    nb = -(-(N * N // 4) // 256)
    _launch("wkv6_chunk_scan", call, (B * H * nb,), (256,),
            (i32(T), i32(H), i32(L), ptr(buf), ptr(dec), ptr(state_in), ptr(state_out), ptr(state_idx),
             i32(pool_size), error_ptr(), i32(1 if rev else 0)))
    return buf


def gpu_forward(call, x, state_in, state_out, save):
    from .._gpu import error_ptr, ptr
    i32, i64 = np.int32, np.int64
    seqs = call.seqs
    H, N = call.dims["H"], call.dims["N"]
    y = call.empty(x["r"].shape, call.dtype)
    if seqs.num == 0:
        return y, None
    _gpu.check_aligned('wkv6', state=state_in, state_out=state_out, **(x if call.dtype == "float32" else {}))
    path = _forward_path(call)
    if path == "chunked":
        buf = _forward_chunked(call, x, state_in, state_out, y)
        # the chunk-start states serve the chunk-parallel backward when its chunk length matches
        return y, ({"L": CHUNK_L, "S": buf} if save else None)
    common = (ptr(seqs.cu_seqlens), i32(seqs.T), i64(seqs.total), i32(H),
              ptr(x["r"]), ptr(x["k"]), ptr(x["v"]), ptr(x["w"]), ptr(x["u"]),
              ptr(state_in), ptr(state_out), ptr(seqs.state_idx), i32(seqs.pool_size), ptr(y), error_ptr())
    if path == "stream":
        _launch("wkv6_forward_stream", call, (seqs.num * H,), (STREAM_THREADS,), common)
    else:
        _launch("wkv6_forward", call, (seqs.num * H,), (N,), common)
    return y, None   # backward recomputes what it needs from the inputs and the initial state


def _backward_path(call) -> str:
    seqs = call.seqs
    if BACKWARD_PATH == "sequential" or seqs.cu_seqlens is not None or seqs.num == 0:
        return "sequential"
    if BACKWARD_PATH == "chunked":
        return "chunked"
    if seqs.T >= BWD_CHUNKED_MIN_T and seqs.num * call.dims["H"] < BWD_CHUNKED_MAX_BLOCKS:
        return "chunked"
    return "sequential"


def _bwd_scratch(call):
    """Per-token scratch of the recurrent backward passes (from the caller's allocator, like the state checkpoints
    and du partials), written by pass 1 for pass 2's dw: X_t[j], and for fp32 I/O (the kernels' CLAMP) pairs
    (X_t[j], d_t[j] * bound of |S_{t-1}[:, j]|)."""
    pair = (2,) if call.dtype == "float32" else ()
    return call.empty((max(call.seqs.total, 1), call.dims["H"], call.dims["N"], *pair), "float32")


def gpu_backward(call, x, state_in, saved, dy, dstate):
    from .._gpu import error_ptr, ptr
    i32, i64 = np.int32, np.int64
    seqs = call.seqs
    H, N = call.dims["H"], call.dims["N"]
    shape = x["r"].shape
    _gpu.check_aligned('wkv6', state=state_in, dstate=dstate)
    if dy is None:
        dy = call.empty(shape, call.dtype)
        dy.fill(0)
    grads = {n: call.empty(shape, call.dtype) for n in ("r", "k", "v", "w")}
    du = call.empty((H, N), call.dtype)
    dstate_in = call.empty((seqs.num, H, N, N), "float32")
    head = (ptr(seqs.cu_seqlens), i32(seqs.T), i64(seqs.total), i32(H),
            ptr(x["r"]), ptr(x["k"]), ptr(x["v"]), ptr(x["w"]), ptr(x["u"]), ptr(dy))
    err = error_ptr()
    if _backward_path(call) == "chunked":
        # Chunk-parallel: every (sequence, chunk, head) is one unit of the three passes below, started from the
        # state at the chunk's start (forward chunk scan, or the forward's saved one) and the adjoint at the
        # chunk's last token (reverse chunk scan of G, which also yields dstate).
        L = BWD_CHUNK_L
        T = seqs.T
        nc = -(-T // L)
        units = seqs.num * nc
        if isinstance(saved, dict) and saved.get("L") == L:
            sbuf = saved["S"]
        else:
            sbuf = _chunk_states(call, x["k"], x["v"], x["w"], state_in, None, None, 0, L, False)
        if dstate is None:
            dstate = call.empty((seqs.num, H, N, N), "float32")
            dstate.fill(0)
        gbuf = _chunk_states(call, x["r"], dy, x["w"], dstate, dstate_in, None, 0, L, True)
        du_part = call.empty((units, H, N), "float32")
        if L == CHUNK_L and N <= TC_OUTPUT_MAX_N:   # tensor-core chunk backward
            vec = i32(_gpu.aligned(x["r"], x["k"], x["v"], x["w"], dy, *grads.values()))
            grid, smem = (units * H,), tc_bwd_smem(N)
            _launch("wkv6_tc_bwd_v", call, grid, (128,),
                    (i32(T), i32(H), ptr(x["r"]), ptr(x["k"]), ptr(x["w"]), ptr(x["u"]), ptr(dy), ptr(gbuf),
                     ptr(grads["v"]), vec), tc_output_smem(N))
            _launch("wkv6_tc_bwd_rkw", call, grid, (128,),
                    (i32(T), i32(H), ptr(x["r"]), ptr(x["k"]), ptr(x["v"]), ptr(x["w"]), ptr(x["u"]), ptr(dy),
                     ptr(sbuf), ptr(gbuf), ptr(grads["r"]), ptr(grads["k"]), ptr(grads["w"]), ptr(du_part), vec),
                    smem)
            _launch("wkv6_reduce_u", call, (H,), (N,), (ptr(du_part), i32(units), i32(H), ptr(du)))
            grads["u"] = du
            grads["state"] = dstate_in
            return grads
        ckpt = call.empty((units, H, N, N), "float32")
        xs = _bwd_scratch(call)
        grid, block, cl = (units * H,), (N,), i32(L)
        _launch("wkv6_bwd_colfwd", call, grid, block,
                head + (ptr(sbuf), i32(L), ptr(grads["r"]), ptr(xs), ptr(ckpt), err, cl))
        _launch("wkv6_bwd_colrev", call, grid, block,
                head + (ptr(gbuf), i32(L), ptr(xs), ptr(ckpt), ptr(grads["k"]), ptr(grads["w"]),
                        ptr(None), ptr(du_part), err, cl))
        _launch("wkv6_bwd_rowrev", call, grid, block,
                head + (ptr(gbuf), ptr(grads["v"]), err, cl))
        _launch("wkv6_reduce_u", call, (H,), (N,), (ptr(du_part), i32(units), i32(H), ptr(du)))
        grads["u"] = du
        grads["state"] = dstate_in
        return grads
    ckpt = call.empty((max(seqs.chunk_slots(CK), 1), H, N, N), "float32")
    xs = _bwd_scratch(call)
    du_part = call.empty((max(seqs.num, 1), H, N), "float32")
    grid, block = (seqs.num * H,), (N,)
    if seqs.num > 0:
        _launch("wkv6_bwd_colfwd", call, grid, block,
                head + (ptr(state_in), i32(CK), ptr(grads["r"]), ptr(xs), ptr(ckpt), err, i32(0)))
        _launch("wkv6_bwd_colrev", call, grid, block,
                head + (ptr(dstate), i32(CK), ptr(xs), ptr(ckpt), ptr(grads["k"]), ptr(grads["w"]),
                        ptr(dstate_in), ptr(du_part), err, i32(0)))
        _launch("wkv6_bwd_rowrev", call, grid, block,
                head + (ptr(dstate), ptr(grads["v"]), err, i32(0)))
    else:
        du_part[...] = 0
    _launch("wkv6_reduce_u", call, (H,), (N,), (ptr(du_part), i32(max(seqs.num, 1)), i32(H), ptr(du)))
    grads["u"] = du
    grads["state"] = dstate_in
    return grads


# ---------------------------------------------------------------- declaration

_BTHN = ("B", "T", "H", "N")
OP = register_op(Op(
    name="wkv6",
    inputs=(Arg("r", _BTHN, "receptance"), Arg("k", _BTHN, "key"), Arg("v", _BTHN, "value"),
            Arg("w", _BTHN, "raw decay: the step's decay factor is exp(-exp(w))"),
            Arg("u", ("H", "N"), "bonus of the current token, shared by the batch")),
    state=Arg("state", ("B", "H", "N", "N"), "fp32 state S[b, h, i=value, j=key]"),
    output="v",
    reference_forward=reference_forward,
    reference_backward=reference_backward,
    dtypes=("float32", "float16", "bfloat16"),
    head_sizes=HEAD_SIZES,
    gpu_forward=gpu_forward,
    gpu_backward=gpu_backward,
    kernels=(Kernel(SOURCE, NAME_EXPRESSIONS),),
    reduce_batch=("u",),
    doc="RWKV-6 WKV (data-dependent decay, bonus u).",
))


def wkv6(r, k, v, w, u, state=None, *, cu_seqlens=None, state_indices=None):
    """RWKV-6 WKV recurrence.

    Parameters
    ----------
    r, k, v, w : arrays ``[B, T, H, N]`` (NumPy, CuPy or torch; float32/float16/bfloat16 on the GPU,
        also float64 on the CPU), one dtype for all.  ``w`` is the raw decay parameter: the per-step decay
        factor is ``exp(-exp(w))`` (computed in fp32 inside the kernels).
    u : array ``[H, N]``, the bonus applied to the current token; shared by the batch (its gradient is summed
        over batch and time).
    state : optional fp32 ``[B, H, N, N]`` initial state ``S[b, h, i, j]`` (``i`` value channel, ``j`` key
        channel; the official RWKV layout).  None means zeros.  With ``state_indices`` it is a pool
        ``[P, H, N, N]`` updated in place.
    cu_seqlens : optional int ``[S + 1]``: sequences packed along T (B must be 1), FlashAttention style.
    state_indices : optional int ``[S]``: pool slot of each sequence (-1: start from zero, write nothing).

    Returns
    -------
    y : like ``v`` ``[B, T, H, N]``, in the inputs' dtype.
    state_out : fp32 ``[B, H, N, N]`` final states (the pool itself when ``state_indices`` is given).

    Formula::

        y_t[i]   = sum_j r_t[j] (u[j] k_t[j] v_t[i] + S_{t-1}[i, j])
        S_t[i,j] = S_{t-1}[i, j] exp(-exp(w_t[j])) + k_t[j] v_t[i]

    Gradients (torch autograd, or :func:`rwkvops.forward`/:func:`rwkvops.backward`) cover r, k, v, w, u and
    the initial state.
    """
    return OP(r, k, v, w, u, state=state, cu_seqlens=cu_seqlens, state_indices=state_indices)


# ---------------------------------------------------------------- flash-linear-attention conventions

def to_fla(r, k, v, w, u, state=None):
    """Our arguments in flash-linear-attention's RWKV-6 convention (``chunk_rwkv6``/``fused_recurrent_rwkv6``).

    Returns ``(r, k, v, g, u, initial_state)`` where ``g = -exp(w)`` is fla's log decay and
    ``initial_state = state.transpose(-1, -2)`` is fla's ``[B, H, K, V]`` layout (None stays None).
    Call fla with ``scale=1.0`` (fla's default scale is ``1/sqrt(K)``).  Works on NumPy, CuPy and torch.
    """
    return r, k, v, _fla.log_decay(w), u, _fla.transpose_state(state)


def from_fla(r, k, v, g, u, initial_state=None):
    """Inverse of :func:`to_fla`: fla's ``(r, k, v, g, u, initial_state)`` (``g`` the log decay, must be < 0;
    state ``[B, H, K, V]``) as our ``(r, k, v, w, u, state)`` with ``w = log(-g)`` and the state transposed to
    ``[B, H, V(i), K(j)]``.  fla outputs convert the same way: ``y`` is unchanged, final states transpose."""
    return r, k, v, _fla.raw_decay(g), u, _fla.transpose_state(initial_state)
