"""RWKV-4 WKV: declaration, NumPy reference (stable form, forward and backward), GPU launchers, fla converters.

Math (per channel c; ``w, u`` are ``[C]``, ``k, v`` are ``[B, T, C]``)::

    y_t = (sum_{s<t} e^{-(t-1-s) e^w + k_s} v_s + e^{u+k_t} v_t) / (sum_{s<t} e^{-(t-1-s) e^w + k_s} + e^{u+k_t})

State (fp32 ``[B, 3, C]``): ``(aa, bb, pp)`` with the true numerator ``num = aa * e^pp`` and denominator
``den = bb * e^pp`` of the history (all tokens seen so far, as the next token needs them).  With the per-step
log decay ``w' = -e^w`` one token updates ``num <- e^{w'} num + e^{k} v``, ``den <- e^{w'} den + e^{k}``, and
the state is kept in the numerically stable form: ``pp`` is the running max exponent,
``pp_t = max(pp_{t-1} + w', k_t)``, i.e. after T tokens ``pp = max(pp_0 + T w', max_s (k_s + (T-1-s) w'))``,
and ``aa = num e^{-pp}``, ``bb = den e^{-pp}``.

The empty history is any state with ``aa = bb = 0``; in particular the all-zeros state ``(0, 0, 0)``, which is
what ``state=None`` means (``pp = 0`` then only takes part in the max of later ``pp`` values; it changes the
representation of later states, never their value ``num, den`` nor any output ``y``).  A state is exact
continuation: splitting a sequence anywhere and continuing from ``state_out`` gives the same ``y``.

Gradients: ``dstate[:, 0]`` and ``dstate[:, 1]`` are the derivatives w.r.t. ``aa`` and ``bb``;
``dstate[:, 2]`` is the derivative w.r.t. ``pp`` as a real-valued input of the function as computed: through the
history value (``aa dL/daa + bb dL/dbb``) plus, when ``state_out``'s ``pp`` has a gradient, through the max that
forms ``pp_out`` (the max's derivative goes to its largest term, like ``torch.max``).  Where ``dstate_out`` comes
from a continuation call (TBPTT), these compose into the exact gradient of the whole sequence.

GPU paths, chosen by shape (``FORWARD = "auto"``; the switches below force one, as benchmarks do), from the sweeps
``benchmarks/wkv4_paths.py`` on an H100 (C = 2048; device ms of a CUDA-graph replay, i.e. the launches and memsets
alone, at cc8bc99 + the staged forward; logs in benchmarks/results/logs/s4-h2/):

* forward, sequences longer than one tile on average (prefill, training): the staged look-back forward
  ``wkv4_fwd_lbs`` (one launch after zeroing a status word per tile; tiles of 4 warps x 32 tokens (bf16/fp16) or
  4 x 16 (fp32) x 64 channels; k and v read once, by cp.async into shared memory; decoupled look-back over tiles with
  a status word per tile, deterministic; dense batches interleaved chunk by chunk).  bf16: B=1 T=16384 0.115 ms (the
  register look-back forward below: 0.171, three launches 0.213; byte floor 0.068), B=8 T=4096 0.216 (0.329, 0.305;
  floor 0.135), B=1 T=4096 0.047 (0.053); fp32: B=1 T=16384 0.180 (0.227, 0.307; floor 0.135), B=8 T=4096 0.349
  (0.428, 0.505; floor 0.271).  Session 7 (logs/s7/, H100, against the older kernels compiled in the same process):
  outputs with flushing exps and quotient, token runs between checkpoints, w/u loaded beside the row copies: bf16
  0.109-0.111 / 0.203-0.206 / 0.043-0.045, fp32 0.177 / 0.323-0.325 / 0.060-0.061.  Other shapes (_LBS_CONFIGS:
  4 x 16, 8 x 16, 4 x 24 at 7 tiles per SM in bf16, 4 x 12 at 7 in fp32) measured slower.  A variant
  with fully unrolled phases, two token segments per warp side by side (four independent chains per lane) and a
  quotient without __fdividef's fix-ups measured slower (bf16 B=1 T=16384: 0.152 ms, 0.139 with one segment; its
  code was 2.3x larger) and was dropped;
* shorter sequences (decode steps over a batch or packed; not measured against the staged forward): the register
  look-back forward ``wkv4_fwd_lb`` (8 warps x 16 tokens, k and v in registers) while its tiles are at most
  ``LB_MAX_TILES_PER_SM`` per SM, else the three-launch forward (chunk aggregates, scan over chunks, outputs; k, v
  read twice).  Odd C (the look-back forwards load channel pairs): the 16-token fused forward for short single
  sequences (at most ``FUSED_MAX_TILES_PER_SM`` tiles per SM), else the three-launch one;
* per-chunk kernels (``KERNEL_VERSION = "auto"``): version 3 (FAST exps and quotients, see ``wkv4::ex``) for the
  forward's chunk kernels and the backward's chunk-local adjoints (B=8: 0.19 vs 0.27 ms), version 2 for the
  backward's output kernel (0.88 vs 0.94 ms); versions 1, 2, 3 stay selectable.  FAST state updates (step, fold) use
  ex2.approx.ftz (``wkv4::ex2_ftz``: no subnormal fix-ups around each exp);
* 64-token fused chunks (``FUSED_L_LONG = 64``) and other look-back tile shapes (``_LB_CONFIGS``) were slower, kept
  for experiments.
"""
from __future__ import annotations

import numpy as np

from ..registry import Arg, Kernel, Op, register_op

__all__ = ["wkv4", "to_fla", "from_fla", "reference_forward", "reference_backward"]


# ---------------------------------------------------------------- NumPy reference (the oracle)

def _states(x, state):
    """Run the stable recurrence; return y and the state before every token (aa, bb, pp: [T+1, B, C])."""
    w, u, k, v = x["w"], x["u"], x["k"], x["v"]
    wp = -np.exp(w)
    B, T, C = k.shape
    A = np.empty((T + 1, B, C), k.dtype)
    Bs = np.empty_like(A)
    P = np.empty_like(A)
    aa, bb, pp = state[:, 0].astype(k.dtype), state[:, 1].astype(k.dtype), state[:, 2].astype(k.dtype)
    y = np.empty_like(k)
    for t in range(T):
        A[t], Bs[t], P[t] = aa, bb, pp
        kt, vt = k[:, t], v[:, t]
        uk = u + kt
        q = np.maximum(pp, uk)
        e1, e2 = np.exp(pp - q), np.exp(uk - q)
        y[:, t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        pw = pp + wp
        p1 = np.maximum(pw, kt)
        f1, f2 = np.exp(pw - p1), np.exp(kt - p1)
        aa, bb, pp = f1 * aa + f2 * vt, f1 * bb + f2, p1
    A[T], Bs[T], P[T] = aa, bb, pp
    return y, A, Bs, P


def reference_forward(x: dict, state):
    """``(y [B,T,C], state_out [B,3,C])`` from NumPy inputs of one float dtype (computed in that dtype)."""
    y, A, Bs, P = _states(x, state)
    return y, np.stack([A[-1], Bs[-1], P[-1]], axis=1).astype(state.dtype)


def reference_backward(x: dict, state, dy, dstate):
    """Gradients of ``sum(dy*y) + sum(dstate*state_out)``; ``w``, ``u`` summed over batch and time.

    With scaled adjoints ``ah_t = dL/dnum_t * e^{pp_t}``, ``bh_t = dL/dden_t * e^{pp_t}`` (num_t/den_t: the history
    after token t), the backward recursion is ``ah_{t-1} = e^{w' + pp_{t-1} - pp_t} ah_t + dy_t e1_t / den_t`` (and
    ``bh`` with ``-dy_t y_t e1_t / den_t``), every factor <= 1, so it is as stable as the forward.
    """
    w, u, k, v = x["w"], x["u"], x["k"], x["v"]
    dt = k.dtype
    wp = -np.exp(w)
    y, A, Bs, P = _states(x, state)
    B, T, C = k.shape
    ga, gb, gp = (dstate[:, i].astype(dt) for i in range(3))
    ah, bh = ga.copy(), gb.copy()
    route = gp - ga * A[T] - gb * Bs[T]        # dL/dpp_out beyond its effect through aa_out, bb_out
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    dw = np.zeros((B, C), dt)
    du = np.zeros((B, C), dt)
    for t in reversed(range(T)):
        aj, bj, pj, pt = A[t], Bs[t], P[t], P[t + 1]
        kt, vt, g = k[:, t], v[:, t], dy[:, t]
        uk = u + kt
        q = np.maximum(pj, uk)
        e1, e2 = np.exp(pj - q), np.exp(uk - q)
        den = e1 * bj + e2
        yt = (e1 * aj + e2 * vt) / den
        ek = np.exp(kt - pt)
        dku = g * e2 * (vt - yt) / den
        du += dku
        dv[:, t] = g * e2 / den + ah * ek
        dkt = dku + ek * (ah * vt + bh)
        pw = pj + wp
        fac = np.exp(pw - pt)
        dw += wp * fac * (ah * aj + bh * bj)
        carry = pw >= kt                       # pp_t = pp_{t-1} + w' (else pp_t = k_t)
        dw += np.where(carry, route * wp, 0)
        dkt = dkt + np.where(carry, 0, route)
        route = np.where(carry, route, 0)
        dk[:, t] = dkt
        ah = fac * ah + g * e1 / den
        bh = fac * bh - g * yt * e1 / den
    a0, b0 = state[:, 0].astype(dt), state[:, 1].astype(dt)
    ds = np.stack([ah, bh, ah * a0 + bh * b0 + route], axis=1).astype(state.dtype)
    return {"w": dw.sum(0), "u": du.sum(0), "k": dk, "v": dv, "state": ds}


# ---------------------------------------------------------------- GPU launchers

SOURCE = "wkv4.cu"
_KERNELS = ("wkv4_fwd_chunk", "wkv4_fwd_scan", "wkv4_fwd_out", "wkv4_bwd_chunk", "wkv4_bwd_scan",
            "wkv4_bwd_out", "wkv4_bwd_reduce",
            "wkv4_fwd_chunk2", "wkv4_fwd_out2", "wkv4_bwd_chunk2", "wkv4_bwd_out2", "wkv4_fwd_fused",
            "wkv4_fwd_fused64")
_CTYPES = ("float", "__half", "__nv_bfloat16")
# wkv4_fwd_lb<T, NW, S, FAST, MINB>: (NW warps x S tokens per tile, MINB resident blocks per SM) shapes swept by
# benchmarks/wkv4_paths.py; (2, 4, 8) gives many small tiles for the tests.
_LB_CONFIGS = ((8, 16, 2), (8, 16, 3), (4, 16, 4), (8, 8, 2), (8, 8, 4), (16, 8, 1), (2, 4, 8))
# wkv4_fwd_lbs<T, NW, S, FAST, MINB> (k, v of a tile staged in shared memory: NW * S * 64 channels * 2 arrays, at
# most _LBS_MAX_BYTES of static shared memory): the shapes (NW, S, MINB) per element size that
# benchmarks/wkv4_paths.py sweeps; (2, 4, 8) gives many small tiles for the tests.
_LBS_CONFIGS = ((4, 32, 6), (4, 16, 6), (4, 16, 8), (8, 16, 3), (4, 24, 7), (4, 12, 7), (2, 4, 8))
_LBS_MAX_BYTES = 40 * 1024
_ESIZE = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def _lbs_fits(cfg, esize: int) -> bool:
    return 2 * cfg[0] * cfg[1] * 64 * esize <= _LBS_MAX_BYTES


_V2 = ("wkv4_fwd_chunk", "wkv4_fwd_out", "wkv4_bwd_chunk", "wkv4_bwd_out")
NAME_EXPRESSIONS = (tuple(f"{k}<{t}>" for k in _KERNELS for t in _CTYPES)
                    + tuple(f"{k}2<{t}, true>" for k in _V2 for t in _CTYPES)     # version 3
                    + tuple(f"wkv4_fwd_lb<{t}, {nw}, {s}, {f}, {mb}>" for t in _CTYPES for nw, s, mb in _LB_CONFIGS
                            for f in ("true", "false"))
                    + tuple(f"wkv4_fwd_lbs<{t}, {nw}, {s}, {f}, {mb}>" for t in _CTYPES
                            for nw, s, mb in _LBS_CONFIGS if _lbs_fits((nw, s), _ESIZE[t])
                            for f in ("true", "false")))
MAX_CHUNK = 64        # must match WKV4_MAX_CHUNK in wkv4.cu (the backward's checkpoint arrays are sized by it)
# Which per-chunk kernels the launchers use: 2 (one exp per max-normalized pair, no local-memory arrays in the
# backward; same results bit for bit) or 1 (the original kernels), or 3 (version 2 with FAST exps and quotients:
# wkv4::ex, wkv4::quot in wkv4.cu).  The scans and the reduction are shared.
KERNEL_VERSION = "auto"
# Forward: "lookback" (one launch, decoupled look-back over tiles: k, v read once; the staged or the register kernel as
# LOOKBACK_STAGED says), "lookback_reg" (the register one), "fused" (one launch, decoupled look-back over FUSED_L-token
# chunks), "chunked" (three launches: chunk aggregates, scan over chunks, outputs; k, v read twice) or "auto" (by
# shape: _forward_path).
# Both give the same checkpoints to the backward (the incoming state of every _chunk_len-token chunk and the final
# state).  The forcing values stay for benchmarks and tests.
FORWARD = "auto"
# The register look-back forward: tiles of LOOKBACK = (warps, tokens per warp, resident blocks per SM the registers
# must allow; one of _LB_CONFIGS); LOOKBACK_FAST (both look-back forwards): exp2-based exps and __fdividef for the
# output quotient (see wkv4_fwd_lb), else expf and IEEE division.
LOOKBACK = (8, 16, 2)
LOOKBACK_FAST = True
# LOOKBACK_STAGED: the look-back forward with k, v staged in shared memory (wkv4_fwd_lbs), tiles of
# LOOKBACK_S[element size] (one of _LBS_CONFIGS that fits); False: wkv4_fwd_lb with LOOKBACK.
LOOKBACK_STAGED = True
LOOKBACK_S = {2: (4, 32, 6), 4: (4, 16, 6)}
FUSED_L = 16          # must match WKV4_FL in wkv4.cu (wkv4_fwd_fused)
FUSED_L_LONG = 16     # 64: wkv4_fwd_fused64 (64-token chunks) where the backward's chunks are 64 long; see above
FUSED_MAX_TILES_PER_SM = 40   # "auto": fused forward up to this many 16-token x 128-channel tiles per SM
LB_MAX_TILES_PER_SM = 48   # "auto": the look-back forward up to this many of its tiles per SM (see _forward_path)
_FILL_THREADS = 132 * 2048   # threads that fill an H100
_BLOCK = 128
_LB_CH = 64           # channels per wkv4_fwd_lb tile (WKV4_LB_CH)


def _chunk_len(seqs, C: int) -> int:
    """Chunk length (16, 32 or 64).

    64 when (chunk, channel) threads fill an H100 at that length (B=1, T=16384, C=2048 gives 256 chunks x 2048
    channels); otherwise the GPU is not full and latency rules, so take the length that minimizes one thread's
    serial chain, chunk length (phases 1 and 3) + number of chunks (the scan).
    """
    n = seqs.T if seqs.cu_seqlens is None else max(seqs.total, 1)

    def slots(L):
        return seqs.num * (-(-seqs.T // L)) if seqs.cu_seqlens is None else seqs.total // L + seqs.num

    if slots(MAX_CHUNK) * C >= _FILL_THREADS:
        return MAX_CHUNK
    return min((MAX_CHUNK, 32, 16), key=lambda L: L + -(-n // L))


def _sm_count() -> int:
    try:
        import cupy
        return _sm_count_of(cupy.cuda.Device().id)
    except Exception:       # no device (CPU emulation): an H100's count
        return 132


_SM_CACHE: dict = {}


def _sm_count_of(device: int) -> int:
    n = _SM_CACHE.get(device)
    if n is None:
        import cupy
        n = _SM_CACHE[device] = int(cupy.cuda.Device(device).attributes["MultiProcessorCount"])
    return n


def _forward_path(seqs, C: int, L: int) -> str:
    """'lookback' (the look-back forward LOOKBACK_STAGED picks), 'lookback_reg' (wkv4_fwd_lb), 'fused' or 'chunked' for
    this call: FORWARD, or by shape when it is "auto": the staged look-back forward where sequences are longer than
    one of its tiles on average (prefill, training: it moves the most bytes per second at every such shape measured);
    shorter ones (decode steps, T = 1 over a batch or packed) keep the rule from before it, not measured against it:
    the register look-back forward while its tiles number at most LB_MAX_TILES_PER_SM per SM (C=2048 on an H100: up
    to ~200 sequences), else the three-launch forward (see the module docstring).  Where the look-back forward cannot
    run (odd C, k or v off a two-element boundary), gpu_forward takes _fused_or_chunked instead."""
    if FORWARD != "auto":
        return FORWARD
    if LOOKBACK_STAGED and seqs.total > LOOKBACK_S[2][0] * LOOKBACK_S[2][1] * seqs.num:
        return "lookback"
    nw, s, _ = LOOKBACK
    tiles = seqs.chunk_slots(nw * s) * -(-C // _LB_CH)
    return "lookback_reg" if tiles <= LB_MAX_TILES_PER_SM * _sm_count() else "chunked"


def _fused_or_chunked(seqs, C: int) -> str:
    """The one-launch 16-token fused forward for short single sequences (at most FUSED_MAX_TILES_PER_SM of its tiles
    per SM), else the three-launch forward."""
    tiles = seqs.chunk_slots(FUSED_L) * -(-C // _BLOCK)
    return "fused" if tiles <= FUSED_MAX_TILES_PER_SM * _sm_count() else "chunked"


def _lookback_ok(seqs, x, C: int, staged: bool) -> bool:
    """Whether a look-back forward (wkv4_fwd_lbs if ``staged``, else wkv4_fwd_lb) can take the call: C even and k, v
    aligned to two elements (they load channel pairs)."""
    from .._gpu import aligned
    k = x["k"]
    nw, s = (LOOKBACK_S[k.dtype.itemsize] if staged else LOOKBACK)[:2]
    return (C % 2 == 0 and aligned(k, x["v"], n=2 * k.dtype.itemsize)
            and seqs.chunk_slots(nw * s) * -(-C // _LB_CH) < 2**31 - 1)


def _kernel_version(seqs, C: int):
    """KERNEL_VERSION: 1, 2, 3 or "auto" (per kernel: _AUTO_VERSION)."""
    return KERNEL_VERSION


# "auto": the faster version of each per-chunk kernel on the H100 (bf16, C=2048, B=8 T=4096: fwd_chunk + fwd_out
# 0.42 ms wall with version 3 vs 0.52 with 2; bwd_chunk 0.19 vs 0.27 ms; bwd_out 0.88 (2) vs 0.94 (3)).
_AUTO_VERSION = {"wkv4_fwd_chunk": 3, "wkv4_fwd_out": 3, "wkv4_bwd_chunk": 3, "wkv4_bwd_out": 2}


def _name(kernel, dtype):
    from .._compile import CTYPES
    return f"{kernel}<{CTYPES[dtype]}>"


def _launch(kernel, dtype, grid, args, version=2):
    from .._gpu import launch
    if version == "auto":
        version = _AUTO_VERSION.get(kernel, 2)
    name = _name(kernel, dtype)
    if version >= 2 and kernel in _V2:
        name = _name(kernel + "2", dtype)
        if version == 3:
            name = name[:-1] + ", true>"
    launch("wkv4", SOURCE, name, NAME_EXPRESSIONS, grid, (_BLOCK, 1, 1), args)


def _forward_fused(call, x, state_in, state_out, save):
    """One launch: see wkv4_fwd_fused in wkv4.cu."""
    from .._gpu import error_ptr, ptr, zero
    seqs = call.seqs
    C = call.dims["C"]
    k = x["k"]
    L = _chunk_len(seqs, C)                 # the backward's chunk length (a multiple of the fused chunk)
    fl = _fused_len(L)
    ns = seqs.chunk_slots(fl)
    ncb = -(-C // _BLOCK)
    ntiles = ns * ncb
    i32 = np.int32
    agg = call.empty((ns, 3, C), "float32")
    inc = call.empty((ns, 3, C), "float32")
    flags = call.empty((ntiles + 1,), "int32")
    zero(flags)
    fin = call.empty((seqs.num, 3, C), "float32") if save else None
    sinb = call.empty((seqs.chunk_slots(L), 3, C), "float32") if save else None
    y = call.empty(tuple(k.shape), call.dtype)
    _launch("wkv4_fwd_fused" if fl == FUSED_L else "wkv4_fwd_fused64", call.dtype, (ntiles, 1, 1),
            (ptr(x["w"]), ptr(x["u"]), ptr(k), ptr(x["v"]), ptr(seqs.cu_seqlens), i32(seqs.T), np.int64(seqs.total),
             i32(seqs.num), i32(L), ptr(agg), ptr(inc), ptr(flags), i32(ntiles), i32(ncb), ptr(state_in),
             ptr(state_out), ptr(fin), ptr(sinb), ptr(seqs.state_idx), i32(seqs.pool_size), ptr(y), i32(C),
             error_ptr()))
    saved = {"L": L, "sin": sinb, "fin": fin} if save else None
    return y, saved


def _lbs_cfg(dtype):
    from .._compile import CTYPES
    return LOOKBACK_S[_ESIZE[CTYPES[dtype]]]


def _lookback_name(kernel: str, dtype, cfg) -> str:
    """``kernel<T, NW, S, FAST, MINB>`` for tile shape ``cfg`` = (NW, S, MINB) and LOOKBACK_FAST."""
    from .._compile import CTYPES
    nw, s, mb = cfg
    return f"{kernel}<{CTYPES[dtype]}, {nw}, {s}, {'true' if LOOKBACK_FAST else 'false'}, {mb}>"


def _lb_name(dtype) -> str:
    """The wkv4_fwd_lb instantiation of LOOKBACK and LOOKBACK_FAST for ``dtype``."""
    return _lookback_name("wkv4_fwd_lb", dtype, LOOKBACK)


def _lbs_name(dtype) -> str:
    """The wkv4_fwd_lbs instantiation of LOOKBACK_S and LOOKBACK_FAST for ``dtype``."""
    return _lookback_name("wkv4_fwd_lbs", dtype, _lbs_cfg(dtype))


def _forward_lookback(call, x, state_in, state_out, save, staged: bool):
    """One launch after zeroing its status words (``staged``: wkv4_fwd_lbs) or its publication buffer (wkv4_fwd_lb);
    see them in wkv4.cu."""
    from .._gpu import error_ptr, launch, ptr, zero
    seqs = call.seqs
    C = call.dims["C"]
    k = x["k"]
    L = _chunk_len(seqs, C)                 # the backward's chunk length (checkpoints every L tokens)
    nw, s = (_lbs_cfg(call.dtype) if staged else LOOKBACK)[:2]
    ns = seqs.chunk_slots(nw * s)
    ncg = -(-C // _LB_CH)
    ntiles = ns * ncg
    i32 = np.int32
    if staged:
        flags = call.empty((4 + ntiles,), "int32")      # tile counter, then a status word per (slot, channel group)
        zero(flags)
        agg = call.empty((ns, C, 4), "float32")          # per slot and channel: a 16-byte record (A, B, P, unused)
        inc = call.empty((ns, C, 4), "float32")
        bufs = (ptr(flags), ptr(agg), ptr(inc))
    else:
        pub = call.empty((4 + ns * 6 * C,), "float32")   # tile counter, then per slot: aggregate, inclusive state
        zero(pub)
        bufs = (ptr(pub),)
    fin = call.empty((seqs.num, 3, C), "float32") if save else None
    sinb = call.empty((seqs.chunk_slots(L), 3, C), "float32") if save else None
    y = call.empty(tuple(k.shape), call.dtype)
    name = _lbs_name(call.dtype) if staged else _lb_name(call.dtype)
    launch("wkv4", SOURCE, name, NAME_EXPRESSIONS, (ntiles, 1, 1), (32 * nw, 1, 1),
           (ptr(x["w"]), ptr(x["u"]), ptr(k), ptr(x["v"]), ptr(seqs.cu_seqlens), i32(seqs.T), np.int64(seqs.total),
            i32(seqs.num), i32(L), *bufs, i32(ntiles), i32(ncg), ptr(state_in), ptr(state_out), ptr(fin), ptr(sinb),
            ptr(seqs.state_idx), i32(seqs.pool_size), ptr(y), i32(C), error_ptr()))
    saved = {"L": L, "sin": sinb, "fin": fin} if save else None
    return y, saved


def _fused_len(L: int) -> int:
    """Chunk length of the fused forward: 64 tokens when the backward's chunks are 64 long (long sequences: a quarter
    of the look-back hops of 16-token chunks), else 16."""
    return FUSED_L_LONG if L % FUSED_L_LONG == 0 else FUSED_L


def gpu_forward(call, x, state_in, state_out, save):
    """Path "fused": one launch (_forward_fused).  "chunked": three launches: chunk aggregates, scan over
    chunks (incoming states, final state), outputs.  See _forward_path."""
    from .._gpu import error_ptr, ptr
    seqs = call.seqs
    C = call.dims["C"]
    k = x["k"]
    L = _chunk_len(seqs, C)
    ver = _kernel_version(seqs, C)
    path = _forward_path(seqs, C, L)
    if path in ("lookback", "lookback_reg"):
        staged = path == "lookback" and LOOKBACK_STAGED
        if _lookback_ok(seqs, x, C, staged):
            return _forward_lookback(call, x, state_in, state_out, save, staged)
        path = _fused_or_chunked(seqs, C)
    if (path == "fused" and L % FUSED_L == 0
            and seqs.chunk_slots(FUSED_L) * -(-C // _BLOCK) < 2**31 - 1):
        return _forward_fused(call, x, state_in, state_out, save)
    nslots = seqs.chunk_slots(L)
    cb = -(-C // _BLOCK)
    i32 = np.int32
    seq_args = (ptr(seqs.cu_seqlens), i32(seqs.T), np.int64(seqs.total), i32(L), i32(seqs.num))
    agg = call.empty((nslots, 3, C), "float32")
    sin = call.empty((nslots, 3, C), "float32")
    fin = call.empty((seqs.num, 3, C), "float32") if save else None
    y = call.empty(tuple(k.shape), call.dtype)
    err = error_ptr()
    _launch("wkv4_fwd_chunk", call.dtype, (nslots, cb, 1),
            (ptr(x["w"]), ptr(k), ptr(x["v"]), *seq_args, ptr(agg), i32(C), err), ver)
    _launch("wkv4_fwd_scan", call.dtype, (seqs.num, cb, 1),
            (ptr(x["w"]), *seq_args, ptr(agg), ptr(sin), ptr(state_in), ptr(state_out), ptr(fin),
             ptr(seqs.state_idx), i32(seqs.pool_size), i32(C), err))
    _launch("wkv4_fwd_out", call.dtype, (nslots, cb, 1),
            (ptr(x["w"]), ptr(x["u"]), ptr(k), ptr(x["v"]), *seq_args, ptr(sin), ptr(y), i32(C), err), ver)
    saved = {"L": L, "sin": sin, "fin": fin} if save else None
    return y, saved


def gpu_backward(call, x, state_in, saved, dy, dstate):
    """Four launches: chunk-local adjoints, reverse scan over chunks (+ dstate), dk/dv and partial dw/du per chunk,
    then a fixed-order reduction of the partials (deterministic; no atomics)."""
    import cupy
    from .._gpu import error_ptr, ptr
    seqs = call.seqs
    C = call.dims["C"]
    k = x["k"]
    L, sin, fin = saved["L"], saved["sin"], saved["fin"]
    nslots = seqs.chunk_slots(L)
    cb = -(-C // _BLOCK)
    i32 = np.int32
    if dy is not None:
        if dy.dtype != k.dtype and dy.dtype.kind == "f" and k.dtype.kind == "f":
            dy = dy.astype(k.dtype)
        bf16_views = {np.dtype(np.int16), np.dtype(np.uint16)}
        same = dy.dtype == k.dtype or {np.dtype(dy.dtype), np.dtype(k.dtype)} <= bf16_views
        if not same or tuple(dy.shape) != tuple(k.shape):
            raise TypeError(f"wkv4 backward: dy must be like y ({tuple(k.shape)}, {call.dtype}), "
                            f"got {tuple(dy.shape)} {dy.dtype}")
        dy = cupy.ascontiguousarray(dy)
    if dstate is not None:
        dstate = cupy.ascontiguousarray(dstate, dtype=cupy.float32)
        if tuple(dstate.shape) != (seqs.num, 3, C):
            raise ValueError(f"wkv4 backward: dstate must have shape {(seqs.num, 3, C)}, got {tuple(dstate.shape)}")
    seq_args = (ptr(seqs.cu_seqlens), i32(seqs.T), np.int64(seqs.total), i32(L), i32(seqs.num))
    loc = call.empty((nslots, 3, C), "float32")
    part = call.empty((nslots, 2, C), "float32")
    ds = call.empty((seqs.num, 3, C), "float32")
    dk = call.empty(tuple(k.shape), call.dtype)
    dv = call.empty(tuple(k.shape), call.dtype)
    dw = call.empty((C,), call.dtype)
    du = call.empty((C,), call.dtype)
    err = error_ptr()
    ver = _kernel_version(seqs, C)
    _launch("wkv4_bwd_chunk", call.dtype, (nslots, cb, 1),
            (ptr(x["w"]), ptr(x["u"]), ptr(k), ptr(x["v"]), ptr(dy), *seq_args, ptr(sin), ptr(loc), i32(C), err), ver)
    _launch("wkv4_bwd_scan", call.dtype, (seqs.num, cb, 1),
            (ptr(x["w"]), *seq_args, ptr(sin), ptr(fin), ptr(dstate), ptr(loc), ptr(ds), i32(C), err))
    _launch("wkv4_bwd_out", call.dtype, (nslots, cb, 1),
            (ptr(x["w"]), ptr(x["u"]), ptr(k), ptr(x["v"]), ptr(dy), *seq_args, ptr(sin), ptr(fin), ptr(loc),
             ptr(dk), ptr(dv), ptr(part), i32(C), err), ver)
    _launch("wkv4_bwd_reduce", call.dtype, (cb, 1, 1),
            (ptr(part), np.int64(nslots), i32(C), ptr(dw), ptr(du)))
    return {"w": dw, "u": du, "k": dk, "v": dv, "state": ds}


# ---------------------------------------------------------------- declaration

def sample_state(rng, dims, num):
    """Valid states for tests: a positive denominator (a real history never has bb <= 0)."""
    C = dims["C"]
    aa = rng.standard_normal((num, C))
    bb = np.abs(rng.standard_normal((num, C))) + 0.5
    pp = rng.uniform(-5.0, 5.0, (num, C))
    return np.stack([aa, bb, pp], axis=1)


OP = register_op(Op(
    name="wkv4",
    inputs=(Arg("w", ("C",), "raw decay: per-step factor exp(-exp(w))"),
            Arg("u", ("C",), "bonus of the current token"),
            Arg("k", ("B", "T", "C"), "keys"),
            Arg("v", ("B", "T", "C"), "values")),
    state=Arg("state", ("B", 3, "C"), "(aa, bb, pp): num = aa e^pp, den = bb e^pp"),
    output="k",
    reference_forward=reference_forward,
    reference_backward=reference_backward,
    head_sizes=None,
    gpu_forward=gpu_forward,
    gpu_backward=gpu_backward,
    kernels=(Kernel(SOURCE, NAME_EXPRESSIONS),),
    reduce_batch=("w", "u"),
    sample_state=sample_state,
    doc=__doc__,
))


def wkv4(w, u, k, v, state=None, *, cu_seqlens=None, state_indices=None):
    """RWKV-4 WKV: ``(y, state_out) = wkv4(w, u, k, v, state=None)``.

    Parameters
    ----------
    w : [C]  raw decay parameter; the per-step decay factor is ``exp(-exp(w))`` (computed in fp32 on the GPU).
    u : [C]  bonus applied to the current token.
    k, v : [B, T, C]  keys and values (time-major, contiguous).
    state : [B, 3, C] fp32, optional  the history ``(aa, bb, pp)`` with numerator ``aa * e^pp`` and denominator
        ``bb * e^pp``.  ``None`` is the empty history, the same as all zeros (any ``aa = bb = 0`` is empty).
        With ``state_indices`` it is a pool ``[P, 3, C]`` updated in place.
    cu_seqlens : int32 [S+1], optional  sequences packed along T (then B = 1); zero-length sequences pass their
        state through unchanged.
    state_indices : int32 [S], optional  pool slot of each sequence (-1: start empty, write nothing back).

    Returns
    -------
    y : [B, T, C] in the inputs' dtype (float32, float16 or bfloat16 on the GPU; float64/float32 on the CPU)::

        y_t = (sum_{s<t} e^{-(t-1-s) e^w + k_s} v_s + e^{u+k_t} v_t) / (sum_{s<t} e^{-(t-1-s) e^w + k_s} + e^{u+k_t})

    state_out : [B, 3, C] fp32 (float64 for float64 CPU inputs): the history after the last token, in the stable
        form ``pp = max(pp_0 + T w', max_s (k_s + (T-1-s) w'))`` with ``w' = -e^w``, ``aa = num e^-pp``,
        ``bb = den e^-pp``.  Continuing from it is exact: splitting a sequence anywhere gives the same outputs.

    Gradients (torch autograd or :func:`rwkvops.backward`) flow to all inputs and the state; ``w`` and ``u`` get
    gradients summed over batch and time.  ``dstate[:, 2]`` is the derivative w.r.t. ``pp`` as a real input
    (through ``aa e^pp`` and ``bb e^pp``, plus through the max forming ``state_out``'s ``pp``).

    Stable for k in [-60, 60] and any T; needs ``w < 88`` (``e^w`` finite in fp32).  The empty history written as
    zeros keeps ``pp = 0`` in the running max, so a first token with ``u + k < -87`` underflows in fp32.
    """
    return OP(w, u, k, v, state=state, cu_seqlens=cu_seqlens, state_indices=state_indices)


# ---------------------------------------------------------------- flash-linear-attention conventions

def to_fla(state):
    """Our ``[B, 3, C]`` state as fla's ``fused_recurrent_rwkv4`` state ``[B, 3, 1, C]`` (alpha, beta, eps).

    The meaning is the same (num = alpha e^eps, den = beta e^eps, eps the running max exponent), and fla's
    ``fused_recurrent_rwkv4`` takes the same raw ``w`` (it applies ``-exp(w)`` itself): only the shape differs.
    """
    return state[:, :, None, :]


def from_fla(state):
    """fla's ``[B, 3, 1, C]`` rwkv4 state as ours ``[B, 3, C]`` (contiguous, fp32 kept as given)."""
    s = state[:, :, 0, :]
    if hasattr(s, "contiguous"):
        return s.contiguous()
    if hasattr(s, "get"):
        import cupy
        return cupy.ascontiguousarray(s)
    return np.ascontiguousarray(s)
