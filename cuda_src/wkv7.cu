// RWKV-7 WKV kernels: S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t.
// State S[i][j] (i = value row, j = key column), fp32, row-major [N][N] per (sequence, head).
// Per-token arrays are flat tokens [total, H, N]; sequences via rwkv::seq_bounds; states via rwkv::state_slot.
//
//  wkv7_forward<T, N>   recurrent forward: block (N*P threads, P = 2 or 4) per (sequence, head); P threads own
//                       row i of the state in registers (interleaved float4 chunks, shuffle-reduced dots);
//                       inputs staged through shared memory TT = 512/N tokens at a time (double buffered,
//                       one barrier per tile).  With ckpt != null it also stores the state
//                       before every CK-th token (fp32) at rwkv::chunk_slot(.., CK, c) for the backward.
//  wkv7_decode<T, N>    one token per sequence (dense T == 1): block (4N threads) per (sequence, head), the
//                       state read and written once with coalesced 16-byte accesses.
//  wkv7_backward<T, N>  reverse walk over the CK-token chunks: recompute the chunk's states from its checkpoint
//                       (rows independent) into a per-block global scratch, then run the adjoint backwards with
//                       thread t holding row t AND column t of dS, so every gradient is an in-thread dot product.
//                       No division by the decay anywhere (exact for decays down to exp(-exp(4)) and below).
#include "common.cuh"

#define WKV7_CK 16

namespace wkv7 {

// Decay factor and (d decay / d w) = -exp(w) * exp(-exp(w)), in fp32.
__device__ __forceinline__ float decay_of(float w) { return expf(-expf(w)); }

template <int N>
__device__ __forceinline__ void load_row(float (&s)[N], const float* p) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        float4 q = *reinterpret_cast<const float4*>(p + j);
        s[j] = q.x; s[j + 1] = q.y; s[j + 2] = q.z; s[j + 3] = q.w;
    }
}

template <int N>
__device__ __forceinline__ void store_row(float* p, const float (&s)[N]) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        *reinterpret_cast<float4*>(p + j) = make_float4(s[j], s[j + 1], s[j + 2], s[j + 3]);
    }
}

// One step of the forward recurrence for one row i of the state: returns y_i; updates s in place and sets sa.
template <int N>
__device__ __forceinline__ float step_row(float (&s)[N], const float* rr, const float* dd, const float* kk,
                                          const float* aa, const float* bb, float vi, float& sa_out) {
    float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        float4 a4 = *reinterpret_cast<const float4*>(aa + j);
        p0 = fmaf(s[j], a4.x, p0); p1 = fmaf(s[j + 1], a4.y, p1);
        p2 = fmaf(s[j + 2], a4.z, p2); p3 = fmaf(s[j + 3], a4.w, p3);
    }
    const float sa = (p0 + p1) + (p2 + p3);
    float y0 = 0.f, y1 = 0.f, y2 = 0.f, y3 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        float4 d4 = *reinterpret_cast<const float4*>(dd + j);
        float4 b4 = *reinterpret_cast<const float4*>(bb + j);
        float4 k4 = *reinterpret_cast<const float4*>(kk + j);
        float4 r4 = *reinterpret_cast<const float4*>(rr + j);
        s[j]     = fmaf(s[j],     d4.x, fmaf(sa, b4.x, vi * k4.x)); y0 = fmaf(s[j],     r4.x, y0);
        s[j + 1] = fmaf(s[j + 1], d4.y, fmaf(sa, b4.y, vi * k4.y)); y1 = fmaf(s[j + 1], r4.y, y1);
        s[j + 2] = fmaf(s[j + 2], d4.z, fmaf(sa, b4.z, vi * k4.z)); y2 = fmaf(s[j + 2], r4.z, y2);
        s[j + 3] = fmaf(s[j + 3], d4.w, fmaf(sa, b4.w, vi * k4.w)); y3 = fmaf(s[j + 3], r4.w, y3);
    }
    sa_out = sa;
    return (y0 + y1) + (y2 + y3);
}

}  // namespace wkv7

// ------------------------------------------------------------------------------------------------ forward

// Threads per state row in the forward: more threads per (sequence, head) hides the per-step latency when
// B*H is small (batch-1 prefill), and keeps the per-thread state small.
template <int N> struct FwdCfg {
    static constexpr int P = (N == 32) ? 2 : 4;   // threads per row
    static constexpr int M = N / (4 * P);         // float4 chunks of the row per thread
    static constexpr int NT = N * P;              // block size
    static constexpr int TT = 512 / N;            // tokens per staged tile
};

// Block (N*P threads) per (sequence, head).  Thread tid = i*P + p owns row i, float4 chunks c = p + P*m
// (columns 4c..4c+3) of the state, in registers.  The two row dot products (S a and S r) are reduced over
// the P lanes of the row with xor shuffles (bit-identical on every lane).  Inputs are staged TT tokens at a
// time (register prefetch + double-buffered shared memory, one barrier per tile).
template <typename T, int N>
__global__ void __launch_bounds__(FwdCfg<N>::NT) wkv7_forward(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    float* __restrict__ ckpt, int H) {
    constexpr int P = FwdCfg<N>::P, M = FwdCfg<N>::M, NT = FwdCfg<N>::NT, TT = FwdCfg<N>::TT;
    constexpr int PER = TT * N / NT;          // elements per array per thread per tile
    // [buffer][array][token][N], arrays: r, decay, k, v, a, b
    __shared__ __align__(16) float sm[2][6][TT][N];

    const int tid = threadIdx.x;
    const int i = tid / P, p = tid % P;
    const int h = blockIdx.x % H;
    const int sq = blockIdx.x / H;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, sq, pool_size, err);
    const int len = (int)(end - start);

    float4 s[M];
    if (state_in != nullptr && slot >= 0) {
        const float* src = state_in + ((slot * H + h) * N + i) * (long long)N;
#pragma unroll
        for (int m = 0; m < M; ++m) s[m] = *reinterpret_cast<const float4*>(src + 4 * (p + P * m));
    } else {
#pragma unroll
        for (int m = 0; m < M; ++m) s[m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }

    const int ntiles = (len + TT - 1) / TT;
    T pre[6][PER];
    auto load_tile = [&](int tile) {
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int e = tid + NT * q;
            const int tl = tile * TT + e / N;
            if (tl < len) {
                const long long o = ((start + tl) * H + h) * N + (e % N);
                pre[0][q] = r[o]; pre[1][q] = w[o]; pre[2][q] = k[o];
                pre[3][q] = v[o]; pre[4][q] = a[o]; pre[5][q] = b[o];
            }
        }
    };
    auto store_tile = [&](int buf, int tile) {
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int e = tid + NT * q;
            const int tt = e / N, col = e % N;
            if (tile * TT + tt < len) {
                sm[buf][0][tt][col] = rwkv::to_float(pre[0][q]);
                sm[buf][1][tt][col] = wkv7::decay_of(rwkv::to_float(pre[1][q]));
                sm[buf][2][tt][col] = rwkv::to_float(pre[2][q]);
                sm[buf][3][tt][col] = rwkv::to_float(pre[3][q]);
                sm[buf][4][tt][col] = rwkv::to_float(pre[4][q]);
                sm[buf][5][tt][col] = rwkv::to_float(pre[5][q]);
            }
        }
    };

    if (ntiles > 0) {
        load_tile(0);
        store_tile(0, 0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < ntiles) load_tile(tile + 1);
        const int n = min(TT, len - tile * TT);
        for (int tt = 0; tt < n; ++tt) {
            const int tl = tile * TT + tt;
            if (ckpt != nullptr && (tl % WKV7_CK) == 0) {
                const long long cs = rwkv::chunk_slot(cu_seqlens, T_len, sq, start, WKV7_CK, tl / WKV7_CK);
                float* dst = ckpt + ((cs * H + h) * N + i) * (long long)N;
#pragma unroll
                for (int m = 0; m < M; ++m) *reinterpret_cast<float4*>(dst + 4 * (p + P * m)) = s[m];
            }
            const float4* r4 = reinterpret_cast<const float4*>(sm[buf][0][tt]);
            const float4* d4 = reinterpret_cast<const float4*>(sm[buf][1][tt]);
            const float4* k4 = reinterpret_cast<const float4*>(sm[buf][2][tt]);
            const float4* a4 = reinterpret_cast<const float4*>(sm[buf][4][tt]);
            const float4* b4 = reinterpret_cast<const float4*>(sm[buf][5][tt]);
            const float vi = sm[buf][3][tt][i];
            float sa0 = 0.f, sa1 = 0.f;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const float4 aa = a4[p + P * m];
                sa0 = fmaf(s[m].x, aa.x, sa0); sa1 = fmaf(s[m].y, aa.y, sa1);
                sa0 = fmaf(s[m].z, aa.z, sa0); sa1 = fmaf(s[m].w, aa.w, sa1);
            }
            float sa = sa0 + sa1;
#pragma unroll
            for (int off = P / 2; off > 0; off >>= 1) sa += __shfl_xor_sync(0xffffffffu, sa, off, P);
            float y0 = 0.f, y1 = 0.f;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int c = p + P * m;
                const float4 dd = d4[c], bb = b4[c], kk = k4[c], rr = r4[c];
                s[m].x = fmaf(s[m].x, dd.x, fmaf(sa, bb.x, vi * kk.x)); y0 = fmaf(s[m].x, rr.x, y0);
                s[m].y = fmaf(s[m].y, dd.y, fmaf(sa, bb.y, vi * kk.y)); y1 = fmaf(s[m].y, rr.y, y1);
                s[m].z = fmaf(s[m].z, dd.z, fmaf(sa, bb.z, vi * kk.z)); y0 = fmaf(s[m].z, rr.z, y0);
                s[m].w = fmaf(s[m].w, dd.w, fmaf(sa, bb.w, vi * kk.w)); y1 = fmaf(s[m].w, rr.w, y1);
            }
            float yy = y0 + y1;
#pragma unroll
            for (int off = P / 2; off > 0; off >>= 1) yy += __shfl_xor_sync(0xffffffffu, yy, off, P);
            if (p == 0) y[((start + tl) * H + h) * N + i] = rwkv::from_float<T>(yy);
        }
        if (tile + 1 < ntiles) store_tile(buf ^ 1, tile + 1);
        __syncthreads();
    }
    if (state_out != nullptr && slot >= 0) {
        float* dst = state_out + ((slot * H + h) * N + i) * (long long)N;
#pragma unroll
        for (int m = 0; m < M; ++m) *reinterpret_cast<float4*>(dst + 4 * (p + P * m)) = s[m];
    }
}

// ------------------------------------------------------------------------------------------------ decode

// One token per sequence (dense T == 1; any other length is handled by wkv7_forward).  Block: 4N threads;
// thread q = tid % (N/4) of row group g = tid / (N/4) owns columns 4q..4q+3 of rows g, g+16, g+32, ...
template <typename T, int N>
__global__ void __launch_bounds__(4 * N) wkv7_decode(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err, int H) {
    constexpr int Q = N / 4;          // threads per row (float4 each)
    constexpr int RG = 16;            // rows per pass (4N threads / Q)
    constexpr int R = N / RG;         // rows per thread
    __shared__ __align__(16) float sm[6][N];   // r, decay, k, v, a, b

    const int tid = threadIdx.x;
    const int h = blockIdx.x % H;
    const int sq = blockIdx.x / H;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, sq, pool_size, err);
    const int len = (int)(end - start);
    const int q = tid % Q, g = tid / Q;

    float4 st[R];
    const long long base = (slot * H + h) * (long long)N * N;
    if (state_in != nullptr && slot >= 0) {
#pragma unroll
        for (int m = 0; m < R; ++m)
            st[m] = *reinterpret_cast<const float4*>(state_in + base + (long long)(g + RG * m) * N + 4 * q);
    } else {
#pragma unroll
        for (int m = 0; m < R; ++m) st[m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (len >= 1) {   // block-uniform
        if (tid < N) {
            const long long o = (start * H + h) * N + tid;
            sm[0][tid] = rwkv::to_float(r[o]);
            sm[1][tid] = wkv7::decay_of(rwkv::to_float(w[o]));
            sm[2][tid] = rwkv::to_float(k[o]);
            sm[3][tid] = rwkv::to_float(v[o]);
            sm[4][tid] = rwkv::to_float(a[o]);
            sm[5][tid] = rwkv::to_float(b[o]);
        }
        __syncthreads();
        const float4 r4 = *reinterpret_cast<const float4*>(&sm[0][4 * q]);
        const float4 d4 = *reinterpret_cast<const float4*>(&sm[1][4 * q]);
        const float4 k4 = *reinterpret_cast<const float4*>(&sm[2][4 * q]);
        const float4 a4 = *reinterpret_cast<const float4*>(&sm[4][4 * q]);
        const float4 b4 = *reinterpret_cast<const float4*>(&sm[5][4 * q]);
#pragma unroll
        for (int m = 0; m < R; ++m) {
            const int row = g + RG * m;
            float sa = st[m].x * a4.x + st[m].y * a4.y + st[m].z * a4.z + st[m].w * a4.w;
#pragma unroll
            for (int off = Q / 2; off > 0; off >>= 1) sa += __shfl_xor_sync(0xffffffffu, sa, off, Q);
            const float vi = sm[3][row];
            st[m].x = fmaf(st[m].x, d4.x, fmaf(sa, b4.x, vi * k4.x));
            st[m].y = fmaf(st[m].y, d4.y, fmaf(sa, b4.y, vi * k4.y));
            st[m].z = fmaf(st[m].z, d4.z, fmaf(sa, b4.z, vi * k4.z));
            st[m].w = fmaf(st[m].w, d4.w, fmaf(sa, b4.w, vi * k4.w));
            float yy = st[m].x * r4.x + st[m].y * r4.y + st[m].z * r4.z + st[m].w * r4.w;
#pragma unroll
            for (int off = Q / 2; off > 0; off >>= 1) yy += __shfl_xor_sync(0xffffffffu, yy, off, Q);
            if (q == 0) y[(start * H + h) * N + row] = rwkv::from_float<T>(yy);
        }
    }
    if (state_out != nullptr && slot >= 0) {
#pragma unroll
        for (int m = 0; m < R; ++m)
            *reinterpret_cast<float4*>(state_out + base + (long long)(g + RG * m) * N + 4 * q) = st[m];
    }
}

// ------------------------------------------------------------------------------------------------ backward

// Grid-stride over (sequence, head) items; block N threads; dynamic shared memory SMEM_FLOATS(N) floats.
// ABI: state_in = gradient w.r.t. the final state (may be null = 0), state_out = gradient w.r.t. the initial
// state (may be null).  ckpt: the forward's checkpoints.  scratch: per block (CK+1) x N x N floats.
template <typename T, int N>
__global__ void __launch_bounds__(N) wkv7_backward(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
    T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk, T* __restrict__ dv,
    T* __restrict__ da, T* __restrict__ db,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    const float* __restrict__ ckpt, float* __restrict__ scratch, int H, int num) {
    constexpr int CK = WKV7_CK;
    extern __shared__ __align__(16) float smem[];
    // [array][CK][N]: 0 r, 1 decay, 2 dwf = -exp(w)*decay, 3 k, 4 v, 5 a, 6 b, 7 dy, 8 sa ; then dsa[2][N]
    float* S_r = smem;
    float* S_d = smem + 1 * CK * N;
    float* S_f = smem + 2 * CK * N;
    float* S_k = smem + 3 * CK * N;
    float* S_v = smem + 4 * CK * N;
    float* S_a = smem + 5 * CK * N;
    float* S_b = smem + 6 * CK * N;
    float* S_y = smem + 7 * CK * N;
    float* S_sa = smem + 8 * CK * N;
    float* S_dsa = smem + 9 * CK * N;

    const int tid = threadIdx.x;
    float* scr = scratch + (long long)blockIdx.x * (CK + 1) * N * N;

    for (long long item = blockIdx.x; item < (long long)num * H; item += gridDim.x) {
        const int h = (int)(item % H);
        const int sq = (int)(item / H);
        long long start, end;
        rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
        const int len = (int)(end - start);
        const long long sbase = ((long long)sq * H + h) * N * N;

        float dSr[N], dSc[N];   // row tid and column tid of the adjoint dL/dS_t
        if (state_in != nullptr) {
            wkv7::load_row<N>(dSr, state_in + sbase + (long long)tid * N);
#pragma unroll
            for (int i = 0; i < N; ++i) dSc[i] = state_in[sbase + (long long)i * N + tid];
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) { dSr[i] = 0.f; dSc[i] = 0.f; }
        }

        const int nch = (len + CK - 1) / CK;
        for (int c = nch - 1; c >= 0; --c) {
            const int t0 = c * CK;
            const int L = min(CK, len - t0);
            __syncthreads();   // the previous chunk / item is done with shared memory and scratch
            for (int tt = 0; tt < L; ++tt) {
                const long long o = ((start + t0 + tt) * H + h) * N + tid;
                const float wv = rwkv::to_float(w[o]);
                const float dec = wkv7::decay_of(wv);
                S_r[tt * N + tid] = rwkv::to_float(r[o]);
                S_d[tt * N + tid] = dec;
                S_f[tt * N + tid] = -expf(wv) * dec;
                S_k[tt * N + tid] = rwkv::to_float(k[o]);
                S_v[tt * N + tid] = rwkv::to_float(v[o]);
                S_a[tt * N + tid] = rwkv::to_float(a[o]);
                S_b[tt * N + tid] = rwkv::to_float(b[o]);
                S_y[tt * N + tid] = dy != nullptr ? rwkv::to_float(dy[o]) : 0.f;
            }
            __syncthreads();
            {   // recompute the chunk's states, row tid: scratch slot m = state before chunk token m (slot L = after)
                float s[N];
                const long long cs = rwkv::chunk_slot(cu_seqlens, T_len, sq, start, CK, c);
                wkv7::load_row<N>(s, ckpt + ((cs * H + h) * N + tid) * (long long)N);
                wkv7::store_row<N>(scr + (long long)tid * N, s);
                for (int tt = 0; tt < L; ++tt) {
                    float sa;
                    wkv7::step_row<N>(s, S_r + tt * N, S_d + tt * N, S_k + tt * N, S_a + tt * N, S_b + tt * N,
                                      S_v[tt * N + tid], sa);
                    S_sa[tt * N + tid] = sa;
                    wkv7::store_row<N>(scr + ((long long)(tt + 1) * N + tid) * N, s);
                }
            }
            __syncthreads();   // scratch (global) and S_sa visible to the block

            float dr_cur = 0.f;   // dr of token L-1: column tid of S_{L-1 after} = slot L
            {
                const float* col = scr + (long long)L * N * N + tid;
                const float* dyv = S_y + (L - 1) * N;
                float p0 = 0.f, p1 = 0.f;
#pragma unroll
                for (int i = 0; i < N; i += 2) {
                    p0 = fmaf(col[(long long)i * N], dyv[i], p0);
                    p1 = fmaf(col[(long long)(i + 1) * N], dyv[i + 1], p1);
                }
                dr_cur = p0 + p1;
            }
            for (int tt = L - 1; tt >= 0; --tt) {
                const long long o = ((start + t0 + tt) * H + h) * N + tid;
                const float* rr = S_r + tt * N;
                const float* dd = S_d + tt * N;
                const float* kk = S_k + tt * N;
                const float* vv = S_v + tt * N;
                const float* aa = S_a + tt * N;
                const float* bb = S_b + tt * N;
                const float* yy = S_y + tt * N;
                float* dsa_buf = S_dsa + (tt & 1) * N;
                // ---- row role (row i = tid): dS_t += dy_t r_t^T; dsa_i = dS_t[i,:].b; dv_i = dS_t[i,:].k
                {
                    const float dyi = yy[tid];
                    float p0 = 0.f, p1 = 0.f, q0 = 0.f, q1 = 0.f;
#pragma unroll
                    for (int j = 0; j < N; j += 4) {
                        float4 r4 = *reinterpret_cast<const float4*>(rr + j);
                        float4 b4 = *reinterpret_cast<const float4*>(bb + j);
                        float4 k4 = *reinterpret_cast<const float4*>(kk + j);
                        dSr[j] = fmaf(dyi, r4.x, dSr[j]); dSr[j + 1] = fmaf(dyi, r4.y, dSr[j + 1]);
                        dSr[j + 2] = fmaf(dyi, r4.z, dSr[j + 2]); dSr[j + 3] = fmaf(dyi, r4.w, dSr[j + 3]);
                        p0 = fmaf(dSr[j], b4.x, p0); p1 = fmaf(dSr[j + 1], b4.y, p1);
                        p0 = fmaf(dSr[j + 2], b4.z, p0); p1 = fmaf(dSr[j + 3], b4.w, p1);
                        q0 = fmaf(dSr[j], k4.x, q0); q1 = fmaf(dSr[j + 1], k4.y, q1);
                        q0 = fmaf(dSr[j + 2], k4.z, q0); q1 = fmaf(dSr[j + 3], k4.w, q1);
                    }
                    const float dsa = p0 + p1;
                    dv[o] = rwkv::from_float<T>(q0 + q1);
                    dsa_buf[tid] = dsa;
#pragma unroll
                    for (int j = 0; j < N; j += 4) {
                        float4 d4 = *reinterpret_cast<const float4*>(dd + j);
                        float4 a4 = *reinterpret_cast<const float4*>(aa + j);
                        dSr[j] = fmaf(dSr[j], d4.x, dsa * a4.x); dSr[j + 1] = fmaf(dSr[j + 1], d4.y, dsa * a4.y);
                        dSr[j + 2] = fmaf(dSr[j + 2], d4.z, dsa * a4.z); dSr[j + 3] = fmaf(dSr[j + 3], d4.w, dsa * a4.w);
                    }
                }
                __syncthreads();   // dsa of step tt visible (double-buffered by tt parity)
                // ---- column role (column j = tid)
                {
                    const float rj = rr[tid];
                    const float* sav = S_sa + tt * N;
                    const float* col = scr + (long long)tt * N * N + tid;   // S_{t-1}[:, j]
                    const float* dyp = S_y + (tt > 0 ? tt - 1 : 0) * N;
                    float dk0 = 0.f, dk1 = 0.f, db0 = 0.f, db1 = 0.f, dw0 = 0.f, dw1 = 0.f;
                    float da0 = 0.f, da1 = 0.f, dr0 = 0.f, dr1 = 0.f;
#pragma unroll
                    for (int i = 0; i < N; i += 2) {
                        float4 yv = make_float4(yy[i], yy[i + 1], vv[i], vv[i + 1]);
                        dSc[i] = fmaf(yv.x, rj, dSc[i]);
                        dSc[i + 1] = fmaf(yv.y, rj, dSc[i + 1]);
                        dk0 = fmaf(dSc[i], yv.z, dk0); dk1 = fmaf(dSc[i + 1], yv.w, dk1);
                        db0 = fmaf(dSc[i], sav[i], db0); db1 = fmaf(dSc[i + 1], sav[i + 1], db1);
                        const float x0 = col[(long long)i * N], x1 = col[(long long)(i + 1) * N];
                        dw0 = fmaf(dSc[i], x0, dw0); dw1 = fmaf(dSc[i + 1], x1, dw1);
                        da0 = fmaf(x0, dsa_buf[i], da0); da1 = fmaf(x1, dsa_buf[i + 1], da1);
                        dr0 = fmaf(x0, dyp[i], dr0); dr1 = fmaf(x1, dyp[i + 1], dr1);
                    }
                    dr[o] = rwkv::from_float<T>(dr_cur);
                    dk[o] = rwkv::from_float<T>(dk0 + dk1);
                    db[o] = rwkv::from_float<T>(db0 + db1);
                    da[o] = rwkv::from_float<T>(da0 + da1);
                    dw[o] = rwkv::from_float<T>((dw0 + dw1) * S_f[tt * N + tid]);
                    dr_cur = dr0 + dr1;   // dr of token tt-1 (unused when tt == 0)
                    const float dj = dd[tid], aj = aa[tid];
#pragma unroll
                    for (int i = 0; i < N; ++i) dSc[i] = fmaf(dSc[i], dj, dsa_buf[i] * aj);
                }
            }
        }
        if (state_out != nullptr) {
#pragma unroll
            for (int i = 0; i < N; ++i) state_out[sbase + (long long)i * N + tid] = dSc[i];
        }
    }
}
