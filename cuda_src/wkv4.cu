// RWKV-4 WKV, forward and backward, parallel over time (chunks) and channels.  See rwkvops/ops/wkv4.py.
//
// History of one channel: num = aa e^pp, den = bb e^pp (stable form, pp = running max exponent).
// One token: pp' = max(pp + w', k), aa' = e^{pp + w' - pp'} aa + e^{k - pp'} v, bb' likewise with v = 1,
// where w' = -exp(w).  The map is affine with a common decay, so chunks compose:
//   forward:  fwd_chunk  (chunk, channel): the chunk's own history from empty -> agg[slot]
//             fwd_scan   (seq, channel):   incoming state of each chunk -> sin[slot]; final state -> state_out
//             fwd_out    (chunk, channel): y from the chunk's incoming state
//   backward: bwd_chunk  (chunk, channel): the chunk's local adjoint at its start (from dy only) -> loc[slot]
//             bwd_scan   (seq, channel):   reverse scan: adjoint at each chunk's end -> loc[slot]; dstate
//             bwd_out    (chunk, channel): dk, dv, per-chunk partial dw, du -> part[slot]
//             bwd_reduce (channel):        dw, du = sum of partials in a fixed order (deterministic)
//   (version 2 of fwd_chunk, fwd_out, bwd_chunk, bwd_out: same results with fewer exps and no local memory; version 3:
//    version 2 with FAST exps and quotients (wkv4::ex, wkv4::quot); one-launch forwards fwd_fused, fwd_lb and fwd_lbs
//    (k, v staged in shared memory) with a decoupled look-back; see the end of this file.  The launchers pick them.)
// Scaled adjoints: ah = dL/dnum * e^{pp}, bh = dL/dden * e^{pp}, relative to the pp of the same state.
// Slots: chunk c of sequence s lives at rwkv::chunk_slot(..., c); grids over slots map back by binary search.
#include "common.cuh"

#define WKV4_MAX_CHUNK 64
#define WKV4_SCAN_GROUP 8   // chunks whose loads the backward scan issues together

namespace wkv4 {

struct Chunk {
    int s;            // sequence
    int c;            // chunk within the sequence
    long long start;  // sequence's first token
    long long end;    // one past its last token
    long long t0;     // chunk's first token
    long long t1;     // one past its last token
};

// Map slot g to (sequence, chunk); false when the slot holds no chunk (gap or past the end).
__device__ __forceinline__ bool find_chunk(const int* cu, int T, long long total, int L, int num, long long g,
                                           int* err, Chunk& ch) {
    ch.s = -1;
    ch.c = -1;
    int s;
    if (cu == nullptr) {
        long long nc = (T + L - 1) / L;
        s = (int)(g / nc);
        if (s >= num) return false;
    } else {
        // largest s with cu[s] / L + s <= g (strictly increasing in s for valid cu_seqlens)
        int lo = 0, hi = num - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            long long base = (long long)cu[mid] / L + mid;
            if (base <= g) lo = mid; else hi = mid - 1;
        }
        s = lo;
    }
    rwkv::seq_bounds(cu, T, total, s, ch.start, ch.end, err);
    long long base = rwkv::chunk_slot(cu, T, s, ch.start, L, 0);
    long long c = g - base;
    if (c < 0) return false;
    ch.s = s;
    ch.c = (int)c;
    ch.t0 = ch.start + c * L;
    if (ch.t0 >= ch.end) return false;
    ch.t1 = min(ch.t0 + (long long)L, ch.end);
    return true;
}

__device__ __forceinline__ float decay_log(float w) { return -expf(w); }

// An output y = num / den with num = e1 aa + e2 v, den = e1 bb + e2, e1 = e^{pp - m}, e2 = e^{u + k - m},
// m = max(pp, u + k).  One of e1, e2 is 1 and bb is 0 (empty history) or at least 1 (every token adds a term of 1 at
// the running max), so den is 0 or a normal float: 0 only for an empty history whose e2 fell below the float range
// (u + k far below pp), where the limit of y is v.  Taking v there (not 0/0) also lets FAST flush: e2 from
// ex2.approx.ftz and the quotient by div.approx.ftz (no subnormal fix-ups around MUFU.EX2 and MUFU.RCP).  A NaN den
// stays NaN.
template <bool FAST = false>
__device__ __forceinline__ float out_quot(float num, float den, float v) {
    if (den < 1.17549435e-38f) return v;
#ifdef __CUDA_ARCH__
    if (FAST) {
        float r;
        asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(num), "f"(den));
        return r;
    }
#endif
    return num / den;
}

}  // namespace wkv4

// Phase 1: each chunk's own history (from empty): agg[slot] = (aa, bb, pp).
template <typename T>
__global__ void __launch_bounds__(128) wkv4_fwd_chunk(
    const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    float* __restrict__ agg, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    long long i = q.t0 * C + ch;
    float p = rwkv::to_float(k[i]);
    float a = rwkv::to_float(v[i]);
    float b = 1.f;
#pragma unroll 4
    for (long long t = q.t0 + 1; t < q.t1; ++t) {
        i += C;
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        const float pw = p + wp;
        const float p1 = fmaxf(pw, kt);
        const float f1 = expf(pw - p1), f2 = expf(kt - p1);
        a = f1 * a + f2 * vt;
        b = f1 * b + f2;
        p = p1;
    }
    float* o = agg + g * 3 * C + ch;
    o[0] = a;
    o[C] = b;
    o[2 * C] = p;
}

// Phase 2: per (sequence, channel), in chunk order: sin[slot] = incoming state; final state -> state_out (+ fin).
template <typename T>
__global__ void __launch_bounds__(128) wkv4_fwd_scan(
    const T* __restrict__ w,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ agg, float* __restrict__ sin,
    const float* state_in, float* state_out, float* __restrict__ fin,
    const int* state_idx, int pool_size, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    const int s = blockIdx.x;
    if (ch >= C || s >= num) return;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, s, pool_size, err);
    float A = 0.f, B = 0.f, P = 0.f;     // empty history = zeros
    if (state_in != nullptr && slot >= 0) {
        const float* si = state_in + slot * 3 * C + ch;
        A = si[0]; B = si[C]; P = si[2 * C];
    }
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const long long len = end - start;
    const int nc = (int)((len + L - 1) / L);
#pragma unroll 4
    for (int c = 0; c < nc; ++c) {
        const long long cs = rwkv::chunk_slot(cu_seqlens, Tlen, s, start, L, c);
        float* o = sin + cs * 3 * C + ch;
        o[0] = A; o[C] = B; o[2 * C] = P;
        const float* ag = agg + cs * 3 * C + ch;
        const float a = ag[0], b = ag[C], p = ag[2 * C];
        const long long Lc = min((long long)L, len - (long long)c * L);
        const float pw = P + (float)Lc * wp;
        const float p1 = fmaxf(pw, p);
        const float f1 = expf(pw - p1), f2 = expf(p - p1);
        A = f1 * A + f2 * a;
        B = f1 * B + f2 * b;
        P = p1;
    }
    if (state_out != nullptr && slot >= 0) {
        float* so = state_out + slot * 3 * C + ch;
        so[0] = A; so[C] = B; so[2 * C] = P;
    }
    if (fin != nullptr) {
        float* fo = fin + (long long)s * 3 * C + ch;
        fo[0] = A; fo[C] = B; fo[2 * C] = P;
    }
}

// Phase 3: outputs of each chunk from its incoming state.
template <typename T>
__global__ void __launch_bounds__(128) wkv4_fwd_out(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, T* __restrict__ y, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    long long i = q.t0 * C + ch;
#pragma unroll 4
    for (long long t = q.t0; t < q.t1; ++t, i += C) {
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        const float uk = uu + kt;
        const float m = fmaxf(P, uk);
        const float e1 = expf(P - m), e2 = expf(uk - m);
        y[i] = rwkv::from_float<T>(wkv4::out_quot(e1 * A + e2 * vt, e1 * B + e2, vt));
        const float pw = P + wp;
        const float p1 = fmaxf(pw, kt);
        const float f1 = expf(pw - p1), f2 = expf(kt - p1);
        A = f1 * A + f2 * vt;
        B = f1 * B + f2;
        P = p1;
    }
}

// Backward phase 1: the adjoint at each chunk's start produced by the chunk's own dy (zero adjoint at its end),
// scaled relative to the chunk's incoming pp; and whether pp was carried (never reset by a k) through the chunk.
// loc[slot] = (ah_local, bh_local, carried ? 1 : 0).
template <typename T>
__global__ void __launch_bounds__(128) wkv4_bwd_chunk(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ dy,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, float* __restrict__ loc, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    const float Pin = P;
    float la = 0.f, lb = 0.f, off = 0.f;   // off = j * w' (accumulated; 0 for the first token)
    bool carried = true;
    long long i = q.t0 * C + ch;
#pragma unroll 4
    for (long long t = q.t0; t < q.t1; ++t, i += C) {
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        if (dy != nullptr) {
            const float gy = rwkv::to_float(dy[i]);
            const float uk = uu + kt;
            const float m = fmaxf(P, uk);
            const float e1 = expf(P - m), e2 = expf(uk - m);
            const float rden = 1.f / (e1 * B + e2);
            const float yt = (e1 * A + e2 * vt) * rden;
            const float sc = expf(off + Pin - P) * gy * e1 * rden;   // to the chunk start: e^{j w' + pp_in - pp_{t-1}}
            la += sc;
            lb -= sc * yt;
        }
        const float pw = P + wp;
        carried = carried && (pw >= kt);
        const float p1 = fmaxf(pw, kt);
        const float f1 = expf(pw - p1), f2 = expf(kt - p1);
        A = f1 * A + f2 * vt;
        B = f1 * B + f2;
        P = p1;
        off += wp;
    }
    float* o = loc + g * 3 * C + ch;
    o[0] = la;
    o[C] = lb;
    o[2 * C] = carried ? 1.f : 0.f;
}

// Backward phase 2: per (sequence, channel), chunks in reverse.  Replaces loc[slot] by the adjoint at the chunk's
// end (ah, bh relative to the next boundary's pp; route = dL/dpp flowing through the max) and writes dstate.
template <typename T>
__global__ void __launch_bounds__(128) wkv4_bwd_scan(
    const T* __restrict__ w,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, const float* __restrict__ fin, const float* dstate,
    float* __restrict__ loc, float* __restrict__ dstate_in, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    const int s = blockIdx.x;
    if (ch >= C || s >= num) return;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
    float ga = 0.f, gb = 0.f, gp = 0.f;
    if (dstate != nullptr) {
        const float* d = dstate + (long long)s * 3 * C + ch;
        ga = d[0]; gb = d[C]; gp = d[2 * C];
    }
    float* dso = dstate_in + (long long)s * 3 * C + ch;
    const long long len = end - start;
    if (len <= 0) {   // state passed through unchanged
        dso[0] = ga; dso[C] = gb; dso[2 * C] = gp;
        return;
    }
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float* fi = fin + (long long)s * 3 * C + ch;
    float ah = ga, bh = gb;
    float route = gp - ga * fi[0] - gb * fi[C];
    float Pn = fi[2 * C];
    const int nc = (int)((len + L - 1) / L);
    // WKV4_SCAN_GROUP chunks at a time: their loads issued together, then the serial updates (each chunk's entry
    // is read before it is overwritten, by this thread only)
    for (int c1 = nc - 1; c1 >= 0; c1 -= WKV4_SCAN_GROUP) {
        float la[WKV4_SCAN_GROUP], lb[WKV4_SCAN_GROUP], cr[WKV4_SCAN_GROUP], pin[WKV4_SCAN_GROUP];
#pragma unroll
        for (int r = 0; r < WKV4_SCAN_GROUP; ++r) {
            if (c1 - r >= 0) {
                const long long cs = rwkv::chunk_slot(cu_seqlens, Tlen, s, start, L, c1 - r);
                const float* lo = loc + cs * 3 * C + ch;
                la[r] = lo[0]; lb[r] = lo[C]; cr[r] = lo[2 * C];
                pin[r] = sin[cs * 3 * C + 2 * C + ch];
            }
        }
#pragma unroll
        for (int r = 0; r < WKV4_SCAN_GROUP; ++r) {
            const int c = c1 - r;
            if (c >= 0) {
                float* lo = loc + rwkv::chunk_slot(cu_seqlens, Tlen, s, start, L, c) * 3 * C + ch;
                lo[0] = ah; lo[C] = bh; lo[2 * C] = route;
                const long long Lc = min((long long)L, len - (long long)c * L);
                const float F = expf(((float)Lc * wp + pin[r]) - Pn);
                ah = F * ah + la[r];
                bh = F * bh + lb[r];
                route = cr[r] != 0.f ? route : 0.f;
                Pn = pin[r];
            }
        }
    }
    const float* s0 = sin + rwkv::chunk_slot(cu_seqlens, Tlen, s, start, L, 0) * 3 * C + ch;
    const float a0 = s0[0], b0 = s0[C];
    dso[0] = ah;
    dso[C] = bh;
    dso[2 * C] = ah * a0 + bh * b0 + route;
}

// Backward phase 3: per (chunk, channel): recompute the chunk's states, run the adjoints backwards from the
// chunk's end adjoint: dk, dv, and partial dw, du -> part[slot] = (dw, du) (zeros for empty slots).
template <typename T>
__global__ void __launch_bounds__(128) wkv4_bwd_out(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ dy,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, const float* __restrict__ fin, const float* __restrict__ loc,
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ part, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    float* po = part + g * 2 * C + ch;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) {
        po[0] = 0.f; po[C] = 0.f;
        return;
    }
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    float sA[WKV4_MAX_CHUNK], sB[WKV4_MAX_CHUNK], sP[WKV4_MAX_CHUNK];
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    const int n = (int)(q.t1 - q.t0);
    long long i = q.t0 * C + ch;
    for (int j = 0; j < n; ++j, i += C) {
        sA[j] = A; sB[j] = B; sP[j] = P;
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        const float pw = P + wp;
        const float p1 = fmaxf(pw, kt);
        const float f1 = expf(pw - p1), f2 = expf(kt - p1);
        A = f1 * A + f2 * vt;
        B = f1 * B + f2;
        P = p1;
    }
    // adjoint at the chunk's end, given relative to the next boundary's pp; rescale to our recomputed pp
    const float Pn = (q.t1 == q.end) ? fin[(long long)q.s * 3 * C + 2 * C + ch] : sin[(g + 1) * 3 * C + 2 * C + ch];
    const float* lo = loc + g * 3 * C + ch;
    const float rs = expf(P - Pn);
    float ah = lo[0] * rs, bh = lo[C] * rs, route = lo[2 * C];
    float dw = 0.f, du = 0.f;
    float pt = P;   // pp after token j
    i = (q.t1 - 1) * C + ch;
    for (int j = n - 1; j >= 0; --j, i -= C) {
        const float aj = sA[j], bj = sB[j], pj = sP[j];
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        const float gy = dy != nullptr ? rwkv::to_float(dy[i]) : 0.f;
        const float uk = uu + kt;
        const float m = fmaxf(pj, uk);
        const float e1 = expf(pj - m), e2 = expf(uk - m);
        const float rden = 1.f / (e1 * bj + e2);
        const float yt = (e1 * aj + e2 * vt) * rden;
        const float ek = expf(kt - pt);
        const float dku = gy * e2 * (vt - yt) * rden;
        du += dku;
        const float dvt = gy * e2 * rden + ah * ek;
        float dkt = dku + ek * (ah * vt + bh);
        const float pw = pj + wp;
        const float fac = expf(pw - pt);
        dw += wp * fac * (ah * aj + bh * bj);
        if (pw >= kt) {
            dw += route * wp;
        } else {
            dkt += route;
            route = 0.f;
        }
        dk[i] = rwkv::from_float<T>(dkt);
        dv[i] = rwkv::from_float<T>(dvt);
        const float ce = gy * e1 * rden;
        ah = fac * ah + ce;
        bh = fac * bh - ce * yt;
        pt = pj;
    }
    po[0] = dw;
    po[C] = du;
}

// Backward phase 4: dw, du summed over all slots in a fixed order.
template <typename T>
__global__ void __launch_bounds__(128) wkv4_bwd_reduce(
    const float* __restrict__ part, long long nslots, int C, T* __restrict__ dw, T* __restrict__ du) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    float sw[4] = {0.f, 0.f, 0.f, 0.f}, su[4] = {0.f, 0.f, 0.f, 0.f};
    long long g = 0;
    for (; g + 4 <= nslots; g += 4) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const float* p = part + (g + r) * 2 * C + ch;
            sw[r] += p[0];
            su[r] += p[C];
        }
    }
    for (; g < nslots; ++g) {
        const float* p = part + g * 2 * C + ch;
        sw[0] += p[0];
        su[0] += p[C];
    }
    dw[ch] = rwkv::from_float<T>((sw[0] + sw[1]) + (sw[2] + sw[3]));
    du[ch] = rwkv::from_float<T>((su[0] + su[1]) + (su[2] + su[3]));
}

// =====================================================================================================================
// Version 2 of the per-chunk kernels (the scans and the reduction are shared with version 1).
//
// Same slots, same arguments, same results bit for bit (they are the version-1 formulas evaluated with fewer
// operations), but:
//  * one exp per max-normalized pair instead of two: for m = max(a, b), (e^{a-m}, e^{b-m}) is (1, e^{b-a}) when
//    b <= a and (e^{a-b}, 1) otherwise, i.e. one x = e^{-|b-a|} and two selects (e^0 = 1 exactly, and a-b = -(b-a)
//    exactly in IEEE arithmetic, so the values are identical);
//  * the backward's output kernel keeps no per-token arrays in local memory: it stores the chunk's state every
//    WKV4_SUB tokens in shared memory, then for each sub-chunk (last first) recomputes its WKV4_SUB states into
//    registers (fully unrolled) and runs the adjoints back through it.  The decay factors of each step (f1, f2)
//    are kept from the recomputation, so the backward step needs only the output's exp.
// Exps per token: fwd_chunk 1 (was 2), fwd_out 2 (was 4), bwd_chunk 3 (was 5), bwd_out 3 (was 6).
#define WKV4_SUB 8
#define WKV4_BLOCK 128

namespace wkv4 {

// e^x for x <= 0.  FAST (version 3 kernels, the look-back forward's default): exp2f(x log2 e), a few ulp, about a
// third of expf's instructions; every exp here is a max-normalized pair's smaller term (the larger one is exactly 1)
// or a rescaling by at most 1, so a small term's larger relative error stays small in absolute terms.
// ex2.approx.ftz for the state updates (step, fold): exp2f's ex2.approx (no ftz) wraps every MUFU.EX2 in a range
// fix-up (three instructions) to return subnormals, and a decay factor below 2^-126 beside the pair's exact 1 changes
// no state.  The outputs keep exp2f: there the pair's 1 may sit beside an empty history (bb = 0 with pp = 0 above
// u + k), where a flushed e^{u+k-pp} would turn y = v into 0/0.  (Plain exp2f off the device: the CPU emulation.)
__device__ __forceinline__ float ex2_ftz(float x) {
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return exp2f(x);
#endif
}
template <bool FAST> __device__ __forceinline__ float ex(float x) { return FAST ? exp2f(x * 1.4426950408889634f) : expf(x); }
template <bool FAST> __device__ __forceinline__ float ex_ftz(float x) {
    return FAST ? ex2_ftz(x * 1.4426950408889634f) : expf(x);
}
// a / b; FAST: __fdividef (2 ulp for |b| < 2^126; the quotients here have b >= 1, or b = a denominator bb + e >= e).
template <bool FAST> __device__ __forceinline__ float quot(float a, float b) { return FAST ? __fdividef(a, b) : a / b; }

// (e^{a-m}, e^{b-m}) for m = max(a, b), with one exp; returns whether b > a (m = b).  FTZ: see ex2_ftz.
template <bool FAST = false, bool FTZ = false>
__device__ __forceinline__ bool pair_exp(float a, float b, float& ea, float& eb) {
    const float d = b - a;
    const float x = FTZ ? ex_ftz<FAST>(-fabsf(d)) : ex<FAST>(-fabsf(d));
    const bool hi = d > 0.f;
    ea = hi ? x : 1.f;
    eb = hi ? 1.f : x;
    return hi;
}

// One token into the history: pp' = max(pp + w', k); f1 = e^{pp + w' - pp'}, f2 = e^{k - pp'}.
// Returns whether pp was carried (pp' = pp + w', i.e. pp + w' >= k).
template <bool FAST = false>
__device__ __forceinline__ bool step(float& A, float& B, float& P, float wp, float kt, float vt, float& f1,
                                     float& f2) {
    const float pw = P + wp;
    const bool reset = pair_exp<FAST, true>(pw, kt, f1, f2);
    A = f1 * A + f2 * vt;
    B = f1 * B + f2;
    P = reset ? kt : pw;
    return !reset;
}

}  // namespace wkv4

template <typename T, bool FAST = false>
__global__ void __launch_bounds__(128) wkv4_fwd_chunk2(
    const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    float* __restrict__ agg, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    long long i = q.t0 * C + ch;
    float P = rwkv::to_float(k[i]);
    float A = rwkv::to_float(v[i]);
    float B = 1.f;
#pragma unroll 4
    for (long long t = q.t0 + 1; t < q.t1; ++t) {
        i += C;
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        float f1, f2;
        wkv4::step<FAST>(A, B, P, wp, kt, vt, f1, f2);
    }
    float* o = agg + g * 3 * C + ch;
    o[0] = A;
    o[C] = B;
    o[2 * C] = P;
}

template <typename T, bool FAST = false>
__global__ void __launch_bounds__(128) wkv4_fwd_out2(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, T* __restrict__ y, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    long long i = q.t0 * C + ch;
#pragma unroll 4
    for (long long t = q.t0; t < q.t1; ++t, i += C) {
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        float e1, e2;
        wkv4::pair_exp<FAST>(P, uu + kt, e1, e2);
        y[i] = rwkv::from_float<T>(wkv4::out_quot<FAST>(e1 * A + e2 * vt, e1 * B + e2, vt));
        float f1, f2;
        wkv4::step<FAST>(A, B, P, wp, kt, vt, f1, f2);
    }
}

template <typename T, bool FAST = false>
__global__ void __launch_bounds__(128) wkv4_bwd_chunk2(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ dy,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, float* __restrict__ loc, int C, int* err) {
    const int ch = blockIdx.y * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) return;
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    const float Pin = P;
    float la = 0.f, lb = 0.f, off = 0.f;
    bool carried = true;
    long long i = q.t0 * C + ch;
#pragma unroll 4
    for (long long t = q.t0; t < q.t1; ++t, i += C) {
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        if (dy != nullptr) {
            const float gy = rwkv::to_float(dy[i]);
            float e1, e2;
            wkv4::pair_exp<FAST>(P, uu + kt, e1, e2);
            const float rden = wkv4::quot<FAST>(1.f, e1 * B + e2);
            const float yt = (e1 * A + e2 * vt) * rden;
            const float sc = wkv4::ex<FAST>(off + Pin - P) * gy * e1 * rden;
            la += sc;
            lb -= sc * yt;
        }
        float f1, f2;
        carried = wkv4::step<FAST>(A, B, P, wp, kt, vt, f1, f2) && carried;
        off += wp;
    }
    float* o = loc + g * 3 * C + ch;
    o[0] = la;
    o[C] = lb;
    o[2 * C] = carried ? 1.f : 0.f;
}

// Needs blockDim.x == WKV4_BLOCK (the shared checkpoints are indexed by threadIdx.x).
template <typename T, bool FAST = false>
__global__ void __launch_bounds__(WKV4_BLOCK) wkv4_bwd_out2(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ dy,
    const int* cu_seqlens, int Tlen, long long total, int L, int num,
    const float* __restrict__ sin, const float* __restrict__ fin, const float* __restrict__ loc,
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ part, int C, int* err) {
    __shared__ float ck[3][WKV4_MAX_CHUNK / WKV4_SUB][WKV4_BLOCK];
    const int tx = threadIdx.x;
    const int ch = blockIdx.y * blockDim.x + tx;
    if (ch >= C) return;
    const long long g = blockIdx.x;
    float* po = part + g * 2 * C + ch;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, L, num, g, err, q)) {
        po[0] = 0.f; po[C] = 0.f;
        return;
    }
    const float wp = wkv4::decay_log(rwkv::to_float(w[ch]));
    const float uu = rwkv::to_float(u[ch]);
    const float* si = sin + g * 3 * C + ch;
    float A = si[0], B = si[C], P = si[2 * C];
    const int n = (int)(q.t1 - q.t0);    // 1 .. L <= WKV4_MAX_CHUNK
    long long i = q.t0 * C + ch;
    for (int j = 0; j < n; ++j, i += C) {
        if (j % WKV4_SUB == 0) {
            ck[0][j / WKV4_SUB][tx] = A; ck[1][j / WKV4_SUB][tx] = B; ck[2][j / WKV4_SUB][tx] = P;
        }
        const float kt = rwkv::to_float(k[i]), vt = rwkv::to_float(v[i]);
        float f1, f2;
        wkv4::step<FAST>(A, B, P, wp, kt, vt, f1, f2);
    }
    // (each thread reads back only its own column of ck: no barrier needed)
    const float Pn = (q.t1 == q.end) ? fin[(long long)q.s * 3 * C + 2 * C + ch] : sin[(g + 1) * 3 * C + 2 * C + ch];
    const float* lo = loc + g * 3 * C + ch;
    const float rs = wkv4::ex<FAST>(P - Pn);
    float ah = lo[0] * rs, bh = lo[C] * rs, route = lo[2 * C];
    float dw = 0.f, du = 0.f;
    for (int sc = (n - 1) / WKV4_SUB; sc >= 0; --sc) {
        const int j0 = sc * WKV4_SUB;
        const int m = min(WKV4_SUB, n - j0);
        float sA[WKV4_SUB], sB[WKV4_SUB], sP[WKV4_SUB], sK[WKV4_SUB], sV[WKV4_SUB], sF1[WKV4_SUB], sF2[WKV4_SUB];
        bool sC[WKV4_SUB];
        A = ck[0][sc][tx]; B = ck[1][sc][tx]; P = ck[2][sc][tx];
        const long long ib = (q.t0 + j0) * C + ch;
#pragma unroll
        for (int r = 0; r < WKV4_SUB; ++r) {
            if (r < m) {
                sA[r] = A; sB[r] = B; sP[r] = P;
                sK[r] = rwkv::to_float(k[ib + (long long)r * C]);
                sV[r] = rwkv::to_float(v[ib + (long long)r * C]);
                sC[r] = wkv4::step<FAST>(A, B, P, wp, sK[r], sV[r], sF1[r], sF2[r]);
            }
        }
#pragma unroll
        for (int r = WKV4_SUB - 1; r >= 0; --r) {
            if (r < m) {
                const long long it = ib + (long long)r * C;
                const float aj = sA[r], bj = sB[r], pj = sP[r], kt = sK[r], vt = sV[r];
                const float gy = dy != nullptr ? rwkv::to_float(dy[it]) : 0.f;
                float e1, e2;
                wkv4::pair_exp<FAST>(pj, uu + kt, e1, e2);
                const float rden = wkv4::quot<FAST>(1.f, e1 * bj + e2);
                const float yt = (e1 * aj + e2 * vt) * rden;
                const float ek = sF2[r];
                const float dku = gy * e2 * (vt - yt) * rden;
                du += dku;
                const float dvt = gy * e2 * rden + ah * ek;
                float dkt = dku + ek * (ah * vt + bh);
                const float fac = sF1[r];
                dw += wp * fac * (ah * aj + bh * bj);
                if (sC[r]) {
                    dw += route * wp;
                } else {
                    dkt += route;
                    route = 0.f;
                }
                dk[it] = rwkv::from_float<T>(dkt);
                dv[it] = rwkv::from_float<T>(dvt);
                const float ce = gy * e1 * rden;
                ah = fac * ah + ce;
                bh = fac * bh - ce * yt;
            }
        }
    }
    po[0] = dw;
    po[C] = du;
}

// =====================================================================================================================
// Single-pass forward (one launch): decoupled look-back over chunks of WKV4_FL tokens.
//
// Tile = (chunk slot g, channel block).  Tiles take ids from a counter in the order they start (all channel blocks
// of slot g before slot g + 1), so a tile's predecessor (g - 1, same channel block) has always started: waiting on
// it cannot deadlock.  Each tile loads its chunk's k, v into registers (read once), computes the chunk's own
// history `agg` and publishes it (flag 1), then walks back over its predecessors until one has published its
// inclusive state `inc` (flag 2), folds the aggregates after it forward IN CHUNK ORDER, so the incoming state is
// bit for bit the sequential left fold whatever the timing (deterministic), publishes its own inclusive state, and
// writes y from registers.  Chunk 0 of a sequence starts from the initial state (the only reader of state_in; the
// write-back of a pool slot by the sequence's last chunk happens after that read, ordered through the flags).
// It also writes the backward's checkpoints: the incoming state of every Lb-token chunk (sinb) and the final
// state (fin).  flags: int [ntiles + 1], zeroed before the launch; flags[ntiles] is the tile counter.
// A tile only ever waits on a predecessor that has not yet published its own aggregate (local work, no chain of
// waits); if that never comes (only possible with malformed device-side cu_seqlens) it raises error code 3 after
// WKV4_SPIN_LIMIT polls and goes on, instead of hanging the GPU.
#define WKV4_FL 16
#define WKV4_SPIN_LIMIT (1 << 20)   // polls of a predecessor that has not even published its aggregate (~1 s)
#define WKV4_LOOK 8

namespace wkv4 {

// The state after a chunk of Lc tokens with own history (a, b, p), from the incoming state (A, B, P).
// Evaluated with explicitly rounded operations: the look-back forwards evaluate the same fold at different call
// sites (publishing a state, folding a predecessor's), and their results must agree bit for bit, which a contraction
// into FMAs chosen per site would break.
template <bool FAST = false>
__device__ __forceinline__ void fold(float& A, float& B, float& P, float a, float b, float p, float Lc, float wp) {
    const float pw = __fmaf_rn(Lc, wp, P);
    const float d = __fsub_rn(p, pw);
    const float x = FAST ? ex2_ftz(__fmul_rn(-fabsf(d), 1.4426950408889634f)) : expf(-fabsf(d));
    const bool hi = d > 0.f;
    const float f1 = hi ? x : 1.f, f2 = hi ? 1.f : x;
    A = __fmaf_rn(f1, A, __fmul_rn(f2, a));
    B = __fmaf_rn(f1, B, __fmul_rn(f2, b));
    P = hi ? p : pw;
}

}  // namespace wkv4

namespace wkv4 {

// The fused forward with FL-token chunks (see above).  FL = 16 (wkv4_fwd_fused) keeps the tiles small for short and
// batched sequences; FL = 64 (wkv4_fwd_fused64) cuts the serial look-back chain of a long sequence (one hop per
// chunk: T / FL hops per (sequence, channel block)) by 4x, which is what bounds batch-1 long prefill.
template <typename T, int FL>
__device__ __forceinline__ void fwd_fused(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int num, int Lb,
    float* agg, float* inc, int* flags, int ntiles, int ncb,
    const float* state_in, float* state_out, float* __restrict__ fin, float* __restrict__ sinb,
    const int* state_idx, int pool_size, T* __restrict__ y, int C, int* err) {
    __shared__ int s_tile;
    __shared__ long long s_back;
    if (threadIdx.x == 0) s_tile = atomicAdd(flags + ntiles, 1);
    __syncthreads();
    const int tile = s_tile;
    if (tile >= ntiles) return;
    const long long g = tile / ncb;
    const int cbi = tile % ncb;
    const int ch = cbi * blockDim.x + threadIdx.x;
    const bool act = ch < C;          // idle threads still take part in the barriers
    const long long C3 = 3LL * C;
    Chunk q;
    if (!find_chunk(cu_seqlens, Tlen, total, FL, num, g, err, q)) {
        // the first slot of an empty sequence: its state passes through unchanged
        if (q.s >= 0 && q.c == 0 && q.start == q.end && act) {
            const long long slot = rwkv::state_slot(state_idx, q.s, pool_size, err);
            float A = 0.f, B = 0.f, P = 0.f;
            if (state_in != nullptr && slot >= 0) {
                const float* si = state_in + slot * C3 + ch;
                A = si[0]; B = si[C]; P = si[2 * C];
            }
            if (state_out != nullptr && slot >= 0 && state_out != state_in) {
                float* so = state_out + slot * C3 + ch;
                so[0] = A; so[C] = B; so[2 * C] = P;
            }
            if (fin != nullptr) {
                float* fo = fin + (long long)q.s * C3 + ch;
                fo[0] = A; fo[C] = B; fo[2 * C] = P;
            }
        }
        return;                       // uniform over the block (g is)
    }
    const int n = (int)(q.t1 - q.t0);   // 1 .. FL
    const bool last = q.t1 == q.end;
    float wp = 0.f, uu = 0.f;
    float kr[FL], vr[FL];
    if (act) {
        wp = decay_log(rwkv::to_float(w[ch]));
        uu = rwkv::to_float(u[ch]);
        const long long i0 = q.t0 * C + ch;
#pragma unroll
        for (int r = 0; r < FL; ++r) {
            if (r < n) {
                kr[r] = rwkv::to_float(k[i0 + (long long)r * C]);
                vr[r] = rwkv::to_float(v[i0 + (long long)r * C]);
            }
        }
    }
    // the chunk's own history
    float a = 0.f, b = 0.f, p = 0.f;
    if (act) {
        p = kr[0]; a = vr[0]; b = 1.f;
#pragma unroll
        for (int r = 1; r < FL; ++r) {
            if (r < n) {
                float f1, f2;
                step(a, b, p, wp, kr[r], vr[r], f1, f2);
            }
        }
    }
    // incoming state
    float A = 0.f, B = 0.f, P = 0.f;
    long long slot = -1;
    if (q.c == 0 || last) slot = rwkv::state_slot(state_idx, q.s, pool_size, err);
    if (q.c == 0) {
        if (act && state_in != nullptr && slot >= 0) {
            const float* si = state_in + slot * C3 + ch;
            A = si[0]; B = si[C]; P = si[2 * C];
        }
    } else {
        if (act) {
            float* o = agg + g * C3 + ch;
            o[0] = a; o[C] = b; o[2 * C] = p;
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            atomicExch(flags + tile, 1);
            // Walk back WKV4_LOOK predecessors per round trip: the nearest one that is not an aggregate (1) decides:
            // inclusive (2) -> done; not yet published (0) -> wait on it.  Chunk 0 only ever publishes 2, so the
            // walk never leaves the sequence (slots below jmin are never looked at: jmin's flag ends every scan).
            const long long jmin = g - q.c;          // chunk 0 of this sequence
            long long j = g - 1;                     // chunk c - 1
            int spins = 0;
            while (true) {
                int f[WKV4_LOOK];
#pragma unroll
                for (int r = 0; r < WKV4_LOOK; ++r)
                    f[r] = (j - r >= jmin) ? *(volatile const int*)(flags + (j - r) * ncb + cbi) : 2;
                int r = WKV4_LOOK, fr = 1;           // the nearest entry that is not 1 (unrolled: no local memory)
#pragma unroll
                for (int e = WKV4_LOOK - 1; e >= 0; --e)
                    if (f[e] != 1) { r = e; fr = f[e]; }
                if (r == WKV4_LOOK) { j -= WKV4_LOOK; continue; }
                j -= r;
                if (fr == 2) break;
                if (++spins > WKV4_SPIN_LIMIT) {  // never expected: report instead of hanging
                    if (err) *(volatile int*)err = rwkv::ERR_LOOKBACK_TIMEOUT;
                    break;
                }
                __nanosleep(32);
            }
            __threadfence();
            s_back = j;
        }
        __syncthreads();
        const long long j = s_back;
        if (act) {
            const float* si = inc + j * C3 + ch;
            A = __ldcg(si); B = __ldcg(si + C); P = __ldcg(si + 2 * C);
#pragma unroll 4
            for (long long m = j + 1; m < g; ++m) {    // full chunks, in order
                const float* ag = agg + m * C3 + ch;
                fold(A, B, P, __ldcg(ag), __ldcg(ag + C), __ldcg(ag + 2 * C), (float)FL, wp);
            }
        }
    }
    // publish the inclusive state (or write the final state)
    {
        float iA = A, iB = B, iP = P;
        fold(iA, iB, iP, a, b, p, (float)n, wp);
        if (!last) {
            if (act) {
                float* o = inc + g * C3 + ch;
                o[0] = iA; o[C] = iB; o[2 * C] = iP;
            }
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicExch(flags + tile, 2);
        } else if (act) {
            if (state_out != nullptr && slot >= 0) {
                float* so = state_out + slot * C3 + ch;
                so[0] = iA; so[C] = iB; so[2 * C] = iP;
            }
            if (fin != nullptr) {
                float* fo = fin + (long long)q.s * C3 + ch;
                fo[0] = iA; fo[C] = iB; fo[2 * C] = iP;
            }
        }
    }
    if (!act) return;
    // the backward's checkpoint: incoming state of each Lb-token chunk
    if (sinb != nullptr && ((long long)q.c * FL) % Lb == 0) {
        const long long cs = rwkv::chunk_slot(cu_seqlens, Tlen, q.s, q.start, Lb, (int)(((long long)q.c * FL) / Lb));
        float* o = sinb + cs * C3 + ch;
        o[0] = A; o[C] = B; o[2 * C] = P;
    }
    // outputs
    const long long i0 = q.t0 * C + ch;
#pragma unroll
    for (int r = 0; r < FL; ++r) {
        if (r < n) {
            float e1, e2;
            pair_exp(P, uu + kr[r], e1, e2);
            y[i0 + (long long)r * C] = rwkv::from_float<T>(out_quot(e1 * A + e2 * vr[r], e1 * B + e2, vr[r]));
            float f1, f2;
            step(A, B, P, wp, kr[r], vr[r], f1, f2);
        }
    }
}

}  // namespace wkv4

#define WKV4_FUSED_ARGS \
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v, \
    const int* cu_seqlens, int Tlen, long long total, int num, int Lb, \
    float* agg, float* inc, int* flags, int ntiles, int ncb, \
    const float* state_in, float* state_out, float* __restrict__ fin, float* __restrict__ sinb, \
    const int* state_idx, int pool_size, T* __restrict__ y, int C, int* err
#define WKV4_FUSED_PASS w, u, k, v, cu_seqlens, Tlen, total, num, Lb, agg, inc, flags, ntiles, ncb, state_in, \
    state_out, fin, sinb, state_idx, pool_size, y, C, err

template <typename T>
__global__ void __launch_bounds__(WKV4_BLOCK) wkv4_fwd_fused(WKV4_FUSED_ARGS) {
    wkv4::fwd_fused<T, WKV4_FL>(WKV4_FUSED_PASS);
}

template <typename T>
__global__ void __launch_bounds__(WKV4_BLOCK) wkv4_fwd_fused64(WKV4_FUSED_ARGS) {
    wkv4::fwd_fused<T, 64>(WKV4_FUSED_PASS);
}

// =====================================================================================================================
// Single-pass forward, look-back version 2 (wkv4_fwd_lb): one launch, k and v read once, tiles of NW*S tokens x 64
// channels, a block of NW warps per tile.  Warp i holds tokens [i*S, (i+1)*S) of the tile's chunk, every lane two
// adjacent channels (one 32-bit load of k and of v for 16-bit types: each warp reads 128-byte rows), in registers from
// the one read of k, v to the write of y:
//  1. every warp: the history of its S tokens from empty, sub_i -> shared memory;
//  2. warp 0: the tile's own history agg = sub_0 (+) ... (+) sub_{NW-1} -> published as agg[slot]; every other warp i
//     forms its prefix pre_i = sub_0 (+) ... (+) sub_{i-1} meanwhile;
//  3. warp 0, each lane for its own two channels: the incoming state X = inc[j] (+) agg[j+1] (+) ... (+) agg[g-1] from
//     the nearest predecessor j that has published its inclusive state (decoupled look-back), folded IN CHUNK ORDER
//     (so X is bit for bit the sequential left fold whatever j the timing gave: deterministic); publishes
//     inc[slot] = X (+) agg (or, for a sequence's last tile, writes the final state);
//  4. every warp: its incoming state X (+) pre_i (a fixed combine order), y for its tokens, the backward's checkpoints.
// (+) is `fold` (the state after a chunk from a state and the chunk's own history): exact in the max-exponent form.
//
// Publication without flags or fences: the buffer `pub` is zeroed before the launch and a word is published as the
// complement of the value's bits (`~bits`), so 0 reads as "not yet" and each 32-bit word is written once and read
// whole; a reader polls the three words of a state until none is 0.  The only value this cannot carry is the NaN
// with all bits set, stored as the canonical NaN.  Each channel looks back on its own.
// Forward progress: a block takes its tile from the counter pub[0] in the order blocks start (all channel groups of
// slot g before slot g + 1), so the predecessors it waits for are resident or done; it waits only for a predecessor's
// aggregate (local work) and gives up with error code 3 after WKV4_SPIN_LIMIT polls (malformed device cu_seqlens).
// Needs C even and k, v, y aligned to two elements (the launcher checks; otherwise it takes another path).
// FAST: wkv4::ex and wkv4::quot in their fast form (see there).
#define WKV4_LB_CH 64
#define WKV4_LB_LOOK 4   // predecessors the look-back checks per round trip

namespace wkv4 {

template <typename T> struct alignas(2 * sizeof(T)) Two { T x, y; };   // two adjacent channels of one token

// Two adjacent channels, loaded as one word and kept packed in a register until used.
template <typename T> struct TwoIO;
template <> struct TwoIO<float> {
    using raw = float2;
    static __device__ __forceinline__ raw load(const float* p) { return *reinterpret_cast<const float2*>(p); }
    static __device__ __forceinline__ float lo(raw r) { return r.x; }
    static __device__ __forceinline__ float hi(raw r) { return r.y; }
};
template <> struct TwoIO<__nv_bfloat16> {
    using raw = unsigned;
    static __device__ __forceinline__ raw load(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned*>(p); }
    static __device__ __forceinline__ float lo(raw r) { return __uint_as_float(r << 16); }
    static __device__ __forceinline__ float hi(raw r) { return __uint_as_float(r & 0xffff0000u); }
};
template <> struct TwoIO<__half> {
    using raw = unsigned;
    static __device__ __forceinline__ raw load(const __half* p) { return *reinterpret_cast<const unsigned*>(p); }
    static __device__ __forceinline__ float lo(raw r) { return __half2float(__ushort_as_half((unsigned short)(r & 0xffffu))); }
    static __device__ __forceinline__ float hi(raw r) { return __half2float(__ushort_as_half((unsigned short)(r >> 16))); }
};

template <typename T>
__device__ __forceinline__ void store_two(T* p, float a, float b) {
    Two<T> o;
    o.x = rwkv::from_float<T>(a);
    o.y = rwkv::from_float<T>(b);
    *reinterpret_cast<Two<T>*>(p) = o;
}

template <bool FAST>
__device__ __forceinline__ void step_ex(float& A, float& B, float& P, float wp, float kt, float vt) {
    float f1, f2;
    step<FAST>(A, B, P, wp, kt, vt, f1, f2);
}

__device__ __forceinline__ void publish(float* p, float x) {
    unsigned b = __float_as_uint(x);
    if (b == 0xffffffffu) b = 0x7fffffffu;
    *(volatile unsigned*)p = ~b;
}

// The three words of a published state at p (stride C) into (a, b, q); false (and nothing read for sure) if any
// is not yet there.
__device__ __forceinline__ bool take(const float* p, long long C, float& a, float& b, float& q) {
    const unsigned x = *(volatile const unsigned*)p, y = *(volatile const unsigned*)(p + C),
                   z = *(volatile const unsigned*)(p + 2 * C);
    a = __uint_as_float(~x);
    b = __uint_as_float(~y);
    q = __uint_as_float(~z);
    return x != 0u && y != 0u && z != 0u;
}

// ---- the pieces both look-back forwards share (wkv4_fwd_lb, wkv4_fwd_lbs): one lane, channels ch and ch + 1.  Each
// is shaped so that both kernels compile to the same PTX as when they were written out in each kernel (same order of
// statements and loops); the state_in read of a first tile and the aggregates' fold after the look-back stay in the
// kernels, as they read different buffers and folding them changed the code.

// A sequence's state after its last token: into state_out (where the sequence has a pool slot) and fin (the
// backward's copy).
__device__ __forceinline__ void put_final(float* state_out, float* fin, long long slot, int s, int ch, int e, int C,
                                          float A, float B, float P) {
    const long long C3 = 3LL * C;
    if (state_out != nullptr && slot >= 0) {
        float* so = state_out + slot * C3 + ch + e;
        so[0] = A; so[C] = B; so[2 * C] = P;
    }
    if (fin != nullptr) {
        float* fo = fin + (long long)s * C3 + ch + e;
        fo[0] = A; fo[C] = B; fo[2 * C] = P;
    }
}

// A slot without a chunk (find_chunk false): the first slot of an empty sequence passes the sequence's state through
// unchanged (`lead`: warp 0, lanes with channels).
__device__ __forceinline__ void pass_empty(bool lead, const Chunk& q, int ch, int C, const float* state_in,
                                           float* state_out, float* fin, const int* state_idx, int pool_size,
                                           int* err) {
    if (lead && q.s >= 0 && q.c == 0 && q.start == q.end) {
        const long long C3 = 3LL * C;
        const long long slot = rwkv::state_slot(state_idx, q.s, pool_size, err);
        for (int e = 0; e < 2; ++e) {
            float A = 0.f, B = 0.f, P = 0.f;
            if (state_in != nullptr && slot >= 0) {
                const float* si = state_in + slot * C3 + ch + e;
                A = si[0]; B = si[C]; P = si[2 * C];
            }
            if (state_out != nullptr && slot >= 0 && state_out != state_in) {
                float* so = state_out + slot * C3 + ch + e;
                so[0] = A; so[C] = B; so[2 * C] = P;
            }
            if (fin != nullptr) {
                float* fo = fin + (long long)q.s * C3 + ch + e;
                fo[0] = A; fo[C] = B; fo[2 * C] = P;
            }
        }
    }
}

// sub_0 (+) ... (+) sub_{parts-1} of the warps' own histories (s_sub), both channels: warp i's prefix (FULL: every
// part S tokens) or the tile's aggregate (n tokens, the last part possibly short).
template <bool FAST, bool FULL, int S, int NW>
__device__ __forceinline__ void fold_subs(float (&X)[2][3], const float (&sub)[NW][3][WKV4_LB_CH], int c0, int parts,
                                          int n, const float (&wp)[2]) {
    for (int e = 0; e < 2; ++e) {
        X[e][0] = sub[0][0][c0 + e]; X[e][1] = sub[0][1][c0 + e]; X[e][2] = sub[0][2][c0 + e];
        for (int j = 1; j < parts; ++j)
            fold<FAST>(X[e][0], X[e][1], X[e][2], sub[j][0][c0 + e], sub[j][1][c0 + e], sub[j][2][c0 + e],
                       FULL ? (float)S : (float)min(S, n - j * S), wp[e]);
    }
}

// The tile's inclusive state I = X (+) G of channel c from its incoming state X (kept in s_x for phase 4) and its
// aggregate G.
template <bool FAST>
__device__ __forceinline__ void inclusive(float (&I)[3], const float (&X)[3], const float (&G)[3],
                                          float (&sx)[3][WKV4_LB_CH], int c, int n, float wp) {
    I[0] = X[0]; I[1] = X[1]; I[2] = X[2];
    sx[0][c] = I[0]; sx[1][c] = I[1]; sx[2][c] = I[2];
    fold<FAST>(I[0], I[1], I[2], G[0], G[1], G[2], (float)n, wp);
}

// Phase 4: warp wi's incoming state, the tile's (s_x) (+) its prefix.  (Written out per channel, not as a loop over
// them like the rest: a loop here changed the order of the generated code.)
template <bool FAST, int S>
__device__ __forceinline__ void warp_start(float (&X)[2][3], const float (&sx)[3][WKV4_LB_CH], const float (&pre)[2][3],
                                           int c0, int wi, const float (&wp)[2]) {
    X[0][0] = sx[0][c0]; X[0][1] = sx[1][c0]; X[0][2] = sx[2][c0];
    X[1][0] = sx[0][c0 + 1]; X[1][1] = sx[1][c0 + 1]; X[1][2] = sx[2][c0 + 1];
    if (wi > 0) {
        fold<FAST>(X[0][0], X[0][1], X[0][2], pre[0][0], pre[0][1], pre[0][2], (float)(wi * S), wp[0]);
        fold<FAST>(X[1][0], X[1][1], X[1][2], pre[1][0], pre[1][1], pre[1][2], (float)(wi * S), wp[1]);
    }
}

// The first of the backward's checkpoints in warp wi's rows (the state before every token whose offset in the
// sequence is a multiple of Lb): nb, its index in the sequence, and rb, its row (S: none).
template <int TL, int S>
__device__ __forceinline__ void first_checkpoint(long long& nb, int& rb, int cidx, int wi, int Lb, const float* sinb) {
    const long long off0 = (long long)cidx * TL + (long long)wi * S;
    nb = -1;
    rb = S;
    if (sinb != nullptr) {
        nb = (off0 + Lb - 1) / Lb;
        rb = (int)min((long long)S, nb * Lb - off0);
    }
}

// Phase 4: the backward's checkpoint nb (the state X before row rb) into sinb; moves on to the next one.
__device__ __forceinline__ void put_checkpoint(const float (&X)[2][3], long long& nb, int& rb, float* sinb,
                                               const int* cu_seqlens, int Tlen, const Chunk& q, int Lb, int ch, int C) {
    const long long C3 = 3LL * C;
    float* o = sinb + rwkv::chunk_slot(cu_seqlens, Tlen, q.s, q.start, Lb, (int)nb) * C3 + ch;
    o[0] = X[0][0]; o[C] = X[0][1]; o[2 * C] = X[0][2];
    o[1] = X[1][0]; o[C + 1] = X[1][1]; o[2 * C + 1] = X[1][2];
    ++nb;
    rb += Lb;
}

// y of one token from the state before it (see out_quot).
template <bool FAST>
__device__ __forceinline__ float token_y(const float (&X)[3], float uk, float vt) {
    float e1, e2;
    pair_exp<FAST, FAST>(X[2], uk, e1, e2);
    return out_quot<FAST>(e1 * X[0] + e2 * vt, e1 * X[1] + e2, vt);
}

// Phase 4, row r of the warp: y of the token and the state after it; row(kr, vr) gives the row's k, v and yat() where
// its y goes, called only here so that they keep their place in the order of work.
template <typename T, bool FAST, typename Row, typename YAt>
__device__ __forceinline__ void token_out(float (&X)[2][3], Row row, YAt yat, const float (&uu)[2], const float (&wp)[2]) {
    using IO = TwoIO<T>;
    typename IO::raw kr, vr;
    row(kr, vr);
    const float k0 = IO::lo(kr), v0 = IO::lo(vr), k1 = IO::hi(kr), v1 = IO::hi(vr);
    store_two(yat(), token_y<FAST>(X[0], uu[0] + k0, v0), token_y<FAST>(X[1], uu[1] + k1, v1));
    step_ex<FAST>(X[0][0], X[0][1], X[0][2], wp[0], k0, v0);
    step_ex<FAST>(X[1][0], X[1][1], X[1][2], wp[1], k1, v1);
}

}  // namespace wkv4

// pub: zeroed float [1 + 4 (counter, padding) + ns * 6 * C]: per slot agg [3, C] then inc [3, C].
// MINB: blocks per SM the registers must allow (__launch_bounds__): the tile shapes trade registers (k, v of S tokens
// per lane) against resident tiles.
template <typename T, int NW, int S, bool FAST, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) wkv4_fwd_lb(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int num, int Lb,
    float* pub, int ntiles, int ncg,
    const float* state_in, float* state_out, float* __restrict__ fin, float* __restrict__ sinb,
    const int* state_idx, int pool_size, T* __restrict__ y, int C, int* err) {
    using IO = wkv4::TwoIO<T>;
    constexpr int TL = NW * S;
    __shared__ int s_tile;
    __shared__ float s_sub[NW][3][WKV4_LB_CH];
    __shared__ float s_x[3][WKV4_LB_CH];
    const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
    if (threadIdx.x == 0) s_tile = atomicAdd(reinterpret_cast<int*>(pub), 1);
    __syncthreads();
    const int tile = s_tile;
    if (tile >= ntiles) return;
    const long long g = tile / ncg;
    const int cgi = tile - (int)(g * ncg);
    const int c0 = 2 * lane;                       // this lane's channels within the group: c0, c0 + 1
    const int ch = cgi * WKV4_LB_CH + c0;
    const bool act = ch < C;                       // C is even: ch + 1 < C too
    const long long C3 = 3LL * C;
    float* agg = pub + 4;
    float* inc = pub + 4 + C3;                     // slot g: agg + g * 2 * C3, inc + g * 2 * C3
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, TL, num, g, err, q)) {
        wkv4::pass_empty(wi == 0 && act, q, ch, C, state_in, state_out, fin, state_idx, pool_size, err);
        return;                                    // uniform over the block (g is)
    }
    const int n = (int)(q.t1 - q.t0);              // 1 .. TL
    const bool last = q.t1 == q.end;
    const int nw = min(S, max(0, n - wi * S));     // this warp's tokens
    const bool mine = act && nw > 0;
    float wp[2] = {0.f, 0.f}, uu[2] = {0.f, 0.f};
    typename IO::raw kr[S], vr[S];
    const long long i0 = (q.t0 + (long long)wi * S) * C + ch;
    const T* kp = k + i0;                          // row r of this warp's tokens at kp + r * C (int: r < S)
    const T* vp = v + i0;
    if (mine) {
        for (int e = 0; e < 2; ++e) {
            wp[e] = wkv4::decay_log(rwkv::to_float(w[ch + e]));
            uu[e] = rwkv::to_float(u[ch + e]);
        }
#pragma unroll
        for (int r = 0; r < S; ++r) {
            const int rr = min(r, nw - 1);         // (rows past the end: a valid row again, never used)
            kr[r] = IO::load(kp + rr * C);
            vr[r] = IO::load(vp + rr * C);
        }
        // 1. this warp's own history
        float a0 = IO::lo(vr[0]), b0 = 1.f, p0 = IO::lo(kr[0]);
        float a1 = IO::hi(vr[0]), b1 = 1.f, p1 = IO::hi(kr[0]);
#pragma unroll
        for (int r = 1; r < S; ++r) {
            if (r < nw) {
                wkv4::step_ex<FAST>(a0, b0, p0, wp[0], IO::lo(kr[r]), IO::lo(vr[r]));
                wkv4::step_ex<FAST>(a1, b1, p1, wp[1], IO::hi(kr[r]), IO::hi(vr[r]));
            }
        }
        s_sub[wi][0][c0] = a0; s_sub[wi][1][c0] = b0; s_sub[wi][2][c0] = p0;
        s_sub[wi][0][c0 + 1] = a1; s_sub[wi][1][c0 + 1] = b1; s_sub[wi][2][c0 + 1] = p1;
    }
    __syncthreads();
    // 2. prefixes (warp i > 0) and the tile's aggregate (warp 0)
    float pre[2][3];
    if (mine && wi > 0) wkv4::fold_subs<FAST, true, S>(pre, s_sub, c0, wi, n, wp);
    if (wi == 0 && act) {
        const int nact = (n + S - 1) / S;
        float X[2][3], G[2][3];
        wkv4::fold_subs<FAST, false, S>(G, s_sub, c0, nact, n, wp);
        long long slot = -1;
        if (q.c == 0 || last) slot = rwkv::state_slot(state_idx, q.s, pool_size, err);
        if (q.c == 0) {
            for (int e = 0; e < 2; ++e) {
                X[e][0] = 0.f; X[e][1] = 0.f; X[e][2] = 0.f;
                if (state_in != nullptr && slot >= 0) {
                    const float* si = state_in + slot * C3 + ch + e;
                    X[e][0] = si[0]; X[e][1] = si[C]; X[e][2] = si[2 * C];
                }
            }
        } else {
            // publish the aggregate, then look back (both channels together: the nearest slot where both
            // inclusive states are there; past slots where both aggregates are)
            float* ag = agg + g * 2 * C3 + ch;
            for (int e = 0; e < 2; ++e) {
                wkv4::publish(ag + e, G[e][0]); wkv4::publish(ag + e + C, G[e][1]);
                wkv4::publish(ag + e + 2 * C, G[e][2]);
            }
            // Walk back WKV4_LB_LOOK predecessors per round trip (all their words loaded at once): the nearest one
            // with its inclusive state ends the walk if every one after it has its aggregate; a missing aggregate
            // (with no inclusive state) is waited for.  Chunk 0 publishes only its inclusive state, so the walk
            // never passes it (jmin).
            const long long jmin = g - q.c;
            long long j = g - 1;                   // the nearest predecessor not yet known to have its aggregate
            int spins = 0;
            while (true) {
                unsigned inc_ok = 0u, agg_ok = 0u;
#pragma unroll
                for (int r = 0; r < WKV4_LB_LOOK; ++r) {
                    const long long m = j - r;
                    if (m >= jmin) {
                        float t0, t1, t2;
                        const float* ip = inc + m * 2 * C3 + ch;
                        const float* ap = agg + m * 2 * C3 + ch;
                        float x0, x1, x2;
                        if (wkv4::take(ip, C, t0, t1, t2) & wkv4::take(ip + 1, C, x0, x1, x2)) {
                            if (inc_ok == 0u) {        // the nearest inclusive state: kept, no second read
                                X[0][0] = t0; X[0][1] = t1; X[0][2] = t2;
                                X[1][0] = x0; X[1][1] = x1; X[1][2] = x2;
                            }
                            inc_ok |= 1u << r;
                        }
                        if (m > jmin && (wkv4::take(ap, C, t0, t1, t2) & wkv4::take(ap + 1, C, t0, t1, t2)))
                            agg_ok |= 1u << r;
                    }
                }
                const int ri = inc_ok != 0u ? __ffs((int)inc_ok) - 1 : WKV4_LB_LOOK;   // nearest inclusive state
                const int ra = __ffs((int)~agg_ok) - 1;                              // nearest missing aggregate
                if (ri < WKV4_LB_LOOK && ri <= ra) {
                    j -= ri;
                    break;
                }
                if (ra >= WKV4_LB_LOOK) {          // all aggregates, no inclusive state: further back
                    j -= WKV4_LB_LOOK;
                    continue;
                }
                j -= ra;                           // wait for the missing one
                if (++spins > WKV4_SPIN_LIMIT) {   // never expected: report instead of hanging
                    if (err) *(volatile int*)err = rwkv::ERR_LOOKBACK_TIMEOUT;
                    break;
                }
                __nanosleep(64);
            }
            for (long long m0 = j + 1; m0 < g; m0 += 4) {   // the aggregates after j, in chunk order, 4 loads at once
                float ag[4][2][3];
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (m0 + r < g) {
                        const float* ap = agg + (m0 + r) * 2 * C3 + ch;
                        wkv4::take(ap, C, ag[r][0][0], ag[r][0][1], ag[r][0][2]);
                        wkv4::take(ap + 1, C, ag[r][1][0], ag[r][1][1], ag[r][1][2]);
                    }
#pragma unroll
                for (int r = 0; r < 4; ++r)
                    if (m0 + r < g)
                        for (int e = 0; e < 2; ++e)
                            wkv4::fold<FAST>(X[e][0], X[e][1], X[e][2], ag[r][e][0], ag[r][e][1], ag[r][e][2],
                                             (float)TL, wp[e]);
            }
        }
        for (int e = 0; e < 2; ++e) {
            float I[3];
            wkv4::inclusive<FAST>(I, X[e], G[e], s_x, c0 + e, n, wp[e]);
            if (!last) {
                float* ip = inc + g * 2 * C3 + ch + e;
                wkv4::publish(ip, I[0]); wkv4::publish(ip + C, I[1]); wkv4::publish(ip + 2 * C, I[2]);
            } else {
                wkv4::put_final(state_out, fin, slot, q.s, ch, e, C, I[0], I[1], I[2]);
            }
        }
    }
    __syncthreads();
    if (!mine) return;
    // 4. this warp's incoming state, outputs and checkpoints
    float X[2][3];
    wkv4::warp_start<FAST, S>(X, s_x, pre, c0, wi, wp);
    long long nb;
    int rb;
    wkv4::first_checkpoint<TL, S>(nb, rb, q.c, wi, Lb, sinb);
#pragma unroll
    for (int r = 0; r < S; ++r)
        if (r < nw) {
            if (r == rb) wkv4::put_checkpoint(X, nb, rb, sinb, cu_seqlens, Tlen, q, Lb, ch, C);
            wkv4::token_out<T, FAST>(
                X, [&](typename IO::raw& kt, typename IO::raw& vt) { kt = kr[r]; vt = vr[r]; },
                [&] { return y + i0 + r * C; }, uu, wp);
        }
}

// =====================================================================================================================
// Single-pass forward, look-back version 3 (wkv4_fwd_lbs): wkv4_fwd_lb's tile (NW warps x S tokens x 64 channels, a
// lane two adjacent channels, the same four phases and the same folds) with k and v staged in shared memory instead
// of registers, so that a tile costs few registers and an SM holds several tiles' bytes in flight (the look-back forward
// is bound by how many bytes wait on chip while tiles run their serial phases, not by arithmetic):
//  * loads: cp.async of 16-byte pieces (or of channel pairs where rows are not 16-byte aligned or the channel group is
//    partial), each warp its own S rows, so a warp starts its own history as soon as its rows have landed;
//  * look-back per tile, not per channel: the tile's status word (0 none, 1 aggregate, 2 inclusive state; zeroed before
//    the launch, the data arrays need no zeroing) is set after the records it announces (fence, then the flag); warp 0
//    reads the status of 32 predecessors in one round trip (a lane each), then loads only the records it needs (one
//    16-byte record per channel: A, B, P) and folds them in chunk order as wkv4_fwd_lb does (deterministic);
//  * dense batches interleave sequences in tile order (chunk c of every sequence before chunk c + 1): a tile's
//    predecessor is then B * ncg tiles earlier, usually done when the tile looks back.
// flags: int [4 + ncg * ns] zeroed (flags[0]: the tile counter; status of slot g, channel group i at 4 + i * ns + g);
// agg, inc: float4 [ns, C] (no zeroing).
#define WKV4_LBS_WIN 32
#ifndef WKV4_LBS_BATCH
#define WKV4_LBS_BATCH 2   // aggregates loaded together while folding (register budget)
#endif

namespace wkv4 {

// Asynchronous global -> shared copies of N bytes (4, 8 or 16); a plain copy where there is no device (emulation).
template <int N>
__device__ __forceinline__ void copy_async(void* dst, const void* src) {
#ifdef __CUDA_ARCH__
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    if constexpr (N == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(N) : "memory");
#else
    std::memcpy(dst, src, N);
#endif
}

__device__ __forceinline__ void copy_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Warp-wide: every lane's earlier global writes are visible device-wide before `val` lands in *flag (the writer side
// of the status words; each lane fences its own records, the barrier orders them before lane 0's store).
__device__ __forceinline__ void warp_publish(int* flag, int val) {
    __threadfence();
    __syncwarp();
    if ((threadIdx.x & 31) == 0) *(volatile int*)flag = val;
}

}  // namespace wkv4

template <typename T, int NW, int S, bool FAST, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) wkv4_fwd_lbs(
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ k, const T* __restrict__ v,
    const int* cu_seqlens, int Tlen, long long total, int num, int Lb,
    int* flags, float4* agg, float4* inc, int ntiles, int ncg,
    const float* state_in, float* state_out, float* __restrict__ fin, float* __restrict__ sinb,
    const int* state_idx, int pool_size, T* __restrict__ y, int C, int* err) {
    using IO = wkv4::TwoIO<T>;
    constexpr int TL = NW * S;
    constexpr int EPC = 16 / (int)sizeof(T);                 // elements per 16-byte piece
    constexpr int PPR = WKV4_LB_CH / EPC;                    // pieces per row
    __shared__ __align__(16) T s_k[TL][WKV4_LB_CH];
    __shared__ __align__(16) T s_v[TL][WKV4_LB_CH];
    __shared__ float s_sub[NW][3][WKV4_LB_CH];
    __shared__ float s_x[3][WKV4_LB_CH];
    __shared__ int s_tile;
    const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5;
    if (threadIdx.x == 0) s_tile = atomicAdd(flags, 1);
    __syncthreads();
    const int tile = s_tile;
    if (tile >= ntiles) return;
    long long g;
    int cgi;
    if (cu_seqlens == nullptr) {                             // chunk-major over the batch (see above)
        const int per = num * ncg;
        const int c = tile / per, r = tile - c * per, s = r / ncg;
        cgi = r - s * ncg;
        g = (long long)s * ((Tlen + TL - 1) / TL) + c;
    } else {
        g = tile / ncg;
        cgi = tile - (int)(g * ncg);
    }
    const int c0 = 2 * lane;
    const int ch0 = cgi * WKV4_LB_CH;
    const int ch = ch0 + c0;
    const bool act = ch < C;                                 // C is even: ch + 1 < C too
    const long long C3 = 3LL * C;
    wkv4::Chunk q;
    if (!wkv4::find_chunk(cu_seqlens, Tlen, total, TL, num, g, err, q)) {
        wkv4::pass_empty(wi == 0 && act, q, ch, C, state_in, state_out, fin, state_idx, pool_size, err);
        return;                                              // uniform over the block (g is)
    }
    const int n = (int)(q.t1 - q.t0);                        // 1 .. TL
    const bool last = q.t1 == q.end;
    const int nw = min(S, max(0, n - wi * S));               // this warp's tokens
    const bool mine = act && nw > 0;
    // w, u of the lane's channels, loaded before the rows are copied and converted after (their round trip overlaps
    // the copies')
    T wr[2], ur[2];
    if (mine)
        for (int e = 0; e < 2; ++e) {
            wr[e] = w[ch + e];
            ur[e] = u[ch + e];
        }
    // 1. this warp's rows into shared memory
    {
        const long long r0 = q.t0 + (long long)wi * S;
        const int nch = min(WKV4_LB_CH, C - ch0);
        const bool vec = nch == WKV4_LB_CH && (C * (int)sizeof(T)) % 16 == 0 &&
                         ((reinterpret_cast<unsigned long long>(k) | reinterpret_cast<unsigned long long>(v)) & 15) == 0;
        if (vec) {
            for (int e = lane; e < nw * PPR; e += 32) {
                const int r = e / PPR, j = (e - r * PPR) * EPC;
                const long long gi = (r0 + r) * C + ch0 + j;
                wkv4::copy_async<16>(&s_k[wi * S + r][j], k + gi);
                wkv4::copy_async<16>(&s_v[wi * S + r][j], v + gi);
            }
        } else if (act) {
            for (int r = 0; r < nw; ++r) {
                const long long gi = (r0 + r) * C + ch;
                wkv4::copy_async<2 * sizeof(T)>(&s_k[wi * S + r][c0], k + gi);
                wkv4::copy_async<2 * sizeof(T)>(&s_v[wi * S + r][c0], v + gi);
            }
        }
    }
    wkv4::copy_wait();
    __syncwarp();
    float wp[2] = {0.f, 0.f}, uu[2] = {0.f, 0.f};
    if (mine) {
        for (int e = 0; e < 2; ++e) {
            wp[e] = wkv4::decay_log(rwkv::to_float(wr[e]));
            uu[e] = rwkv::to_float(ur[e]);
        }
        // 2. this warp's own history
        const T* kp = &s_k[wi * S][c0];
        const T* vp = &s_v[wi * S][c0];
        typename IO::raw kr = IO::load(kp), vr = IO::load(vp);
        float a0 = IO::lo(vr), b0 = 1.f, p0 = IO::lo(kr);
        float a1 = IO::hi(vr), b1 = 1.f, p1 = IO::hi(kr);
#pragma unroll 8
        for (int r = 1; r < nw; ++r) {
            kr = IO::load(kp + r * WKV4_LB_CH);
            vr = IO::load(vp + r * WKV4_LB_CH);
            wkv4::step_ex<FAST>(a0, b0, p0, wp[0], IO::lo(kr), IO::lo(vr));
            wkv4::step_ex<FAST>(a1, b1, p1, wp[1], IO::hi(kr), IO::hi(vr));
        }
        s_sub[wi][0][c0] = a0; s_sub[wi][1][c0] = b0; s_sub[wi][2][c0] = p0;
        s_sub[wi][0][c0 + 1] = a1; s_sub[wi][1][c0 + 1] = b1; s_sub[wi][2][c0 + 1] = p1;
    }
    __syncthreads();
    // 3. prefixes (warp i > 0); the tile's aggregate, the look-back and the inclusive state (warp 0, all lanes)
    float pre[2][3];
    float I[2][3];                                           // warp 0: the tile's inclusive state
    int* status = flags + 4 + (long long)cgi * (ntiles / ncg);   // status of slot m: status[m] (a group's slots side
                                                                 // by side: the window is one 128-byte read)
    if (mine && wi > 0) wkv4::fold_subs<FAST, true, S>(pre, s_sub, c0, wi, n, wp);
    if (wi == 0) {
        const int nact = (n + S - 1) / S;
        float X[2][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}}, G[2][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}};
        if (act) wkv4::fold_subs<FAST, false, S>(G, s_sub, c0, nact, n, wp);
        long long slot = -1;
        if (q.c == 0 || last) slot = rwkv::state_slot(state_idx, q.s, pool_size, err);
        if (q.c == 0) {
            if (act && state_in != nullptr && slot >= 0)
                for (int e = 0; e < 2; ++e) {
                    const float* si = state_in + slot * C3 + ch + e;
                    X[e][0] = si[0]; X[e][1] = si[C]; X[e][2] = si[2 * C];
                }
        } else {
            if (!last) {                                     // (a sequence's last tile has no successor)
                if (act)
                    for (int e = 0; e < 2; ++e)
                        agg[g * C + ch + e] = make_float4(G[e][0], G[e][1], G[e][2], 0.f);
                wkv4::warp_publish(status + g, 1);
            }
            // lane r reads the status of slot top - r: the nearest inclusive state ends the walk if every slot after it
            // has its aggregate; a missing aggregate (local work) is waited for; chunk 0 (jmin) always has status 2
            const long long jmin = g - q.c;
            long long top = g - 1, j = jmin;
            int spins = 0;
            while (true) {
                const long long m = top - lane;
                const int st = m >= jmin ? *(volatile const int*)(status + m) : 3;
                const unsigned have = __ballot_sync(0xffffffffu, st == 2);
                const unsigned none = __ballot_sync(0xffffffffu, st == 0);
                const int ri = have ? __ffs((int)have) - 1 : WKV4_LBS_WIN;
                const int rn = none ? __ffs((int)none) - 1 : WKV4_LBS_WIN;
                if (ri < rn) { j = top - ri; break; }
                if (rn == WKV4_LBS_WIN) { top -= WKV4_LBS_WIN; continue; }
                top -= rn;                                   // wait for it
                if (++spins > WKV4_SPIN_LIMIT) {             // never expected: report instead of hanging
                    if (err) *(volatile int*)err = rwkv::ERR_LOOKBACK_TIMEOUT;
                    j = top;
                    break;
                }
                __nanosleep(64);
            }
            __threadfence();                                 // the records announced by the statuses read above
            if (act) {
                const float4* ip = inc + j * C + ch;
                const float4 x0 = __ldcg(ip), x1 = __ldcg(ip + 1);
                X[0][0] = x0.x; X[0][1] = x0.y; X[0][2] = x0.z;
                X[1][0] = x1.x; X[1][1] = x1.y; X[1][2] = x1.z;
                for (long long m0 = j + 1; m0 < g; m0 += WKV4_LBS_BATCH) {   // the aggregates after j, in chunk order
                    float ag[WKV4_LBS_BATCH][2][3];          // (A, B, P): the records' 4th word is not loaded
#pragma unroll
                    for (int r = 0; r < WKV4_LBS_BATCH; ++r)
                        if (m0 + r < g)
                            for (int e = 0; e < 2; ++e) {
                                const float* ap = reinterpret_cast<const float*>(agg + (m0 + r) * C + ch + e);
                                const float2 ab = __ldcg(reinterpret_cast<const float2*>(ap));
                                ag[r][e][0] = ab.x; ag[r][e][1] = ab.y; ag[r][e][2] = __ldcg(ap + 2);
                            }
#pragma unroll
                    for (int r = 0; r < WKV4_LBS_BATCH; ++r)
                        if (m0 + r < g)
                            for (int e = 0; e < 2; ++e)
                                wkv4::fold<FAST>(X[e][0], X[e][1], X[e][2], ag[r][e][0], ag[r][e][1], ag[r][e][2],
                                                 (float)TL, wp[e]);
                }
            }
        }
        if (act)
            for (int e = 0; e < 2; ++e) wkv4::inclusive<FAST>(I[e], X[e], G[e], s_x, c0 + e, n, wp[e]);
        if (last && act)
            for (int e = 0; e < 2; ++e) wkv4::put_final(state_out, fin, slot, q.s, ch, e, C, I[e][0], I[e][1], I[e][2]);
    }
    __syncthreads();
    // the inclusive state goes out after the barrier: the other warps start their outputs while its fence drains
    if (wi == 0 && !last) {
        if (act)
            for (int e = 0; e < 2; ++e) inc[g * C + ch + e] = make_float4(I[e][0], I[e][1], I[e][2], 0.f);
        wkv4::warp_publish(status + g, 2);
    }
    if (!mine) return;
    // 4. this warp's incoming state, outputs and checkpoints
    float X[2][3];
    wkv4::warp_start<FAST, S>(X, s_x, pre, c0, wi, wp);
    long long nb;
    int rb;
    wkv4::first_checkpoint<TL, S>(nb, rb, q.c, wi, Lb, sinb);
    const T* kp = &s_k[wi * S][c0];
    const T* vp = &s_v[wi * S][c0];
    T* yp = y + (q.t0 + (long long)wi * S) * C + ch;
    // runs of tokens between checkpoints (rb = S without them: one run), so the token loop has no test per token
    // (yr: row r's y, stepped by C rather than recomputed from r, which cost 64-bit multiplies per token)
    T* yr = yp;
    for (int r = 0;;) {
        const int stop = min(rb, nw);
#pragma unroll 8
        for (; r < stop; ++r, yr += C)
            wkv4::token_out<T, FAST>(
                X,
                [&](typename IO::raw& kt, typename IO::raw& vt) {
                    kt = IO::load(kp + r * WKV4_LB_CH);
                    vt = IO::load(vp + r * WKV4_LB_CH);
                },
                [&] { return yr; }, uu, wp);
        if (r >= nw) break;
        wkv4::put_checkpoint(X, nb, rb, sinb, cu_seqlens, Tlen, q, Lb, ch, C);
    }
}
