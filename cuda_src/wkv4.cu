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
// Scaled adjoints: ah = dL/dnum * e^{pp}, bh = dL/dden * e^{pp}, relative to the pp of the same state.
// Slots: chunk c of sequence s lives at rwkv::chunk_slot(..., c); grids over slots map back by binary search.
#include "common.cuh"

#define WKV4_MAX_CHUNK 64

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
        y[i] = rwkv::from_float<T>((e1 * A + e2 * vt) / (e1 * B + e2));
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
    float a0 = 0.f, b0 = 0.f;
    for (int c = nc - 1; c >= 0; --c) {
        const long long cs = rwkv::chunk_slot(cu_seqlens, Tlen, s, start, L, c);
        float* lo = loc + cs * 3 * C + ch;
        const float la = lo[0], lb = lo[C], carried = lo[2 * C];
        const float* si = sin + cs * 3 * C + ch;
        const float Pin = si[2 * C];
        lo[0] = ah; lo[C] = bh; lo[2 * C] = route;
        const long long Lc = min((long long)L, len - (long long)c * L);
        const float F = expf(((float)Lc * wp + Pin) - Pn);
        ah = F * ah + la;
        bh = F * bh + lb;
        route = carried != 0.f ? route : 0.f;
        Pn = Pin;
        if (c == 0) { a0 = si[0]; b0 = si[C]; }
    }
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
