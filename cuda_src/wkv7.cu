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
//                       P = N/32 threads holding row x AND column x of dS, so every gradient is a short
//                       in-thread dot product plus a P-lane shuffle reduction.
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

template <int N> struct BwdCfg {
    static constexpr int P = N / 32;              // threads per row (and per column) of the adjoint
    static constexpr int M = N / (4 * P);         // float4 chunks per thread (8)
    static constexpr int NT = N * P;              // block size
    static constexpr int SC = (N == 32) ? 8 : 4;  // sub-chunk (tokens) whose states are kept in scratch: keeps
                                                  // the resident blocks' scratch ((SC+1) N^2 fp32) in L2
    static constexpr int MINB = (N == 32) ? 8 : (N == 64) ? 3 : 1;   // resident blocks per SM (register cap);
                                                  // = BWD_BLOCKS_PER_SM in wkv7.py
};

// Reduce over the P lanes of a row group (xor butterfly: bit-identical result on every lane).
template <int P>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int off = P / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off, P);
    return x;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    return fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, acc))));
}

// Grid-stride over (sequence, head) items; block N*P threads, thread tid = x*P + p.  For each CK-token chunk,
// in reverse, its inputs are staged in shared memory; then for each SC-token sub-chunk, in reverse: (A) recompute
// from the forward's checkpoint (thread owns row x, float4 column chunks p + P*m) up to the sub-chunk's end,
// writing the sub-chunk's states to a per-block global scratch [SC+1][N][N] (slot m = state before sub-chunk
// token m, slot Ls = after the last) and S a to shared memory; (B) walk the sub-chunk backwards with the adjoint dS held
// twice: row x (column chunks p + P*m) for dsa = dS b and dv = dS k, and column x (row chunks p + P*m) for
// dk, db, dw, da, dr (streaming the column of S_{t-1} from scratch).  Every gradient element is written by one
// thread after a fixed-order reduction: deterministic, no atomics.  dynamic shared memory: bwd_smem_floats(N).
// ABI: state_in = gradient w.r.t. the final state (may be null = 0), state_out = gradient w.r.t. the initial
// state (may be null).  ckpt: the forward's checkpoints.  scratch: gridDim.x x (SC+1) x N x N floats.
template <typename T, int N>
__global__ void __launch_bounds__(BwdCfg<N>::NT, BwdCfg<N>::MINB) wkv7_backward(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
    T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk, T* __restrict__ dv,
    T* __restrict__ da, T* __restrict__ db,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    const float* __restrict__ ckpt, float* __restrict__ scratch, int H, int num) {
    constexpr int CK = WKV7_CK;
    constexpr int P = BwdCfg<N>::P, M = BwdCfg<N>::M, NT = BwdCfg<N>::NT, SC = BwdCfg<N>::SC;
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
    const int x = tid / P, p = tid % P;
    float* scr = scratch + (long long)blockIdx.x * (SC + 1) * N * N;

    for (long long item = blockIdx.x; item < (long long)num * H; item += gridDim.x) {
        const int h = (int)(item % H);
        const int sq = (int)(item / H);
        long long start, end;
        rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
        const int len = (int)(end - start);
        const long long sbase = ((long long)sq * H + h) * N * N;

        float4 dSr[M];   // dS[x][4c..4c+3], c = p + P*m   (row x)
        float4 dSc[M];   // dS[4c..4c+3][x], c = p + P*m   (column x)
        if (state_in != nullptr) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int c = p + P * m;
                dSr[m] = *reinterpret_cast<const float4*>(state_in + sbase + (long long)x * N + 4 * c);
                dSc[m].x = state_in[sbase + (long long)(4 * c + 0) * N + x];
                dSc[m].y = state_in[sbase + (long long)(4 * c + 1) * N + x];
                dSc[m].z = state_in[sbase + (long long)(4 * c + 2) * N + x];
                dSc[m].w = state_in[sbase + (long long)(4 * c + 3) * N + x];
            }
        } else {
#pragma unroll
            for (int m = 0; m < M; ++m) { dSr[m] = make_float4(0.f, 0.f, 0.f, 0.f); dSc[m] = dSr[m]; }
        }

        const int nch = (len + CK - 1) / CK;
        for (int c = nch - 1; c >= 0; --c) {
            const int t0 = c * CK;
            const int L = min(CK, len - t0);
            __syncthreads();   // the previous chunk / item is done with shared memory and scratch
            for (int e = tid; e < L * N; e += NT) {
                const int tt = e / N, col = e % N;
                const long long o = ((start + t0 + tt) * H + h) * N + col;
                const float wv = rwkv::to_float(w[o]);
                const float dec = wkv7::decay_of(wv);
                S_r[e] = rwkv::to_float(r[o]);
                S_d[e] = dec;
                S_f[e] = -expf(wv) * dec;
                S_k[e] = rwkv::to_float(k[o]);
                S_v[e] = rwkv::to_float(v[o]);
                S_a[e] = rwkv::to_float(a[o]);
                S_b[e] = rwkv::to_float(b[o]);
                S_y[e] = dy != nullptr ? rwkv::to_float(dy[o]) : 0.f;
            }
            __syncthreads();
            const int nsub = (L + SC - 1) / SC;
            for (int sub = nsub - 1; sub >= 0; --sub) {
                const int u0 = sub * SC;                 // first chunk token of this sub-chunk
                const int Ls = min(SC, L - u0);
                if (sub != nsub - 1) __syncthreads();    // the previous sub-chunk is done with scratch
                {   // (A) recompute from the checkpoint, row x; keep the states of tokens u0 .. u0+Ls in scratch
                    float4 st[M];
                    const long long cs = rwkv::chunk_slot(cu_seqlens, T_len, sq, start, CK, c);
                    const float* src = ckpt + ((cs * H + h) * N + x) * (long long)N;
    #pragma unroll
                    for (int m = 0; m < M; ++m) st[m] = *reinterpret_cast<const float4*>(src + 4 * (p + P * m));
                    for (int tt = 0; tt < u0 + Ls; ++tt) {
                        if (tt == u0) {
    #pragma unroll
                            for (int m = 0; m < M; ++m)
                                *reinterpret_cast<float4*>(scr + (long long)x * N + 4 * (p + P * m)) = st[m];
                        }
                        const float4* a4 = reinterpret_cast<const float4*>(S_a + tt * N);
                        const float4* b4 = reinterpret_cast<const float4*>(S_b + tt * N);
                        const float4* d4 = reinterpret_cast<const float4*>(S_d + tt * N);
                        const float4* k4 = reinterpret_cast<const float4*>(S_k + tt * N);
                        float sa0 = 0.f, sa1 = 0.f;
    #pragma unroll
                        for (int m = 0; m < M; m += 2) {
                            sa0 = dot4(st[m], a4[p + P * m], sa0);
                            sa1 = dot4(st[m + 1], a4[p + P * (m + 1)], sa1);
                        }
                        const float sa = group_sum<P>(sa0 + sa1);
                        const bool keep = tt >= u0;
                        if (keep && p == 0) S_sa[tt * N + x] = sa;
                        const float vx = S_v[tt * N + x];
                        float* dst = scr + ((long long)(tt - u0 + 1) * N + x) * N;
    #pragma unroll
                        for (int m = 0; m < M; ++m) {
                            const int cc = p + P * m;
                            const float4 dd = d4[cc], bb = b4[cc], kk = k4[cc];
                            st[m].x = fmaf(st[m].x, dd.x, fmaf(sa, bb.x, vx * kk.x));
                            st[m].y = fmaf(st[m].y, dd.y, fmaf(sa, bb.y, vx * kk.y));
                            st[m].z = fmaf(st[m].z, dd.z, fmaf(sa, bb.z, vx * kk.z));
                            st[m].w = fmaf(st[m].w, dd.w, fmaf(sa, bb.w, vx * kk.w));
                            if (keep) *reinterpret_cast<float4*>(dst + 4 * cc) = st[m];
                        }
                    }
                }
                __syncthreads();   // scratch (global) and S_sa visible to the block

                float dr_cur;      // dr of token u0+Ls-1: column x of scratch slot Ls (the state after it) . dy
                {
                    const float* col = scr + (long long)Ls * N * N + x;
                    const float4* y4 = reinterpret_cast<const float4*>(S_y + (u0 + Ls - 1) * N);
                    float acc = 0.f;
    #pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const int cc = p + P * m;
                        const float4 yv = y4[cc];
                        acc = fmaf(col[(long long)(4 * cc) * N], yv.x, acc);
                        acc = fmaf(col[(long long)(4 * cc + 1) * N], yv.y, acc);
                        acc = fmaf(col[(long long)(4 * cc + 2) * N], yv.z, acc);
                        acc = fmaf(col[(long long)(4 * cc + 3) * N], yv.w, acc);
                    }
                    dr_cur = group_sum<P>(acc);
                }
                for (int tt = u0 + Ls - 1; tt >= u0; --tt) {
                    const long long orow = ((start + t0 + tt) * H + h) * N + x;
                    const float4* r4 = reinterpret_cast<const float4*>(S_r + tt * N);
                    const float4* d4 = reinterpret_cast<const float4*>(S_d + tt * N);
                    const float4* k4 = reinterpret_cast<const float4*>(S_k + tt * N);
                    const float4* v4 = reinterpret_cast<const float4*>(S_v + tt * N);
                    const float4* a4 = reinterpret_cast<const float4*>(S_a + tt * N);
                    const float4* b4 = reinterpret_cast<const float4*>(S_b + tt * N);
                    const float4* y4 = reinterpret_cast<const float4*>(S_y + tt * N);
                    const float4* sa4 = reinterpret_cast<const float4*>(S_sa + tt * N);
                    const float4* yp4 = reinterpret_cast<const float4*>(S_y + (tt > 0 ? tt - 1 : 0) * N);
                    float* dsa_buf = S_dsa + (tt & 1) * N;
                    // ---- row role (row x): dS_t += dy_t r_t^T; dsa_x = dS_t[x,:].b; dv_x = dS_t[x,:].k
                    {
                        const float dyx = S_y[tt * N + x];
                        float pb = 0.f, pk = 0.f;
    #pragma unroll
                        for (int m = 0; m < M; ++m) {
                            const int cc = p + P * m;
                            const float4 rr = r4[cc];
                            dSr[m].x = fmaf(dyx, rr.x, dSr[m].x); dSr[m].y = fmaf(dyx, rr.y, dSr[m].y);
                            dSr[m].z = fmaf(dyx, rr.z, dSr[m].z); dSr[m].w = fmaf(dyx, rr.w, dSr[m].w);
                            pb = dot4(dSr[m], b4[cc], pb);
                            pk = dot4(dSr[m], k4[cc], pk);
                        }
                        const float dsa = group_sum<P>(pb);
                        const float dvx = group_sum<P>(pk);
                        if (p == 0) {
                            dv[orow] = rwkv::from_float<T>(dvx);
                            dsa_buf[x] = dsa;
                        }
    #pragma unroll
                        for (int m = 0; m < M; ++m) {
                            const int cc = p + P * m;
                            const float4 dd = d4[cc], aa = a4[cc];
                            dSr[m].x = fmaf(dSr[m].x, dd.x, dsa * aa.x); dSr[m].y = fmaf(dSr[m].y, dd.y, dsa * aa.y);
                            dSr[m].z = fmaf(dSr[m].z, dd.z, dsa * aa.z); dSr[m].w = fmaf(dSr[m].w, dd.w, dsa * aa.w);
                        }
                    }
                    __syncthreads();   // dsa of step tt visible (double-buffered by tt parity)
                    // ---- column role (column x)
                    {
                        const float rx = S_r[tt * N + x];
                        const float dx = S_d[tt * N + x], ax = S_a[tt * N + x];
                        const float4* dsa4 = reinterpret_cast<const float4*>(dsa_buf);
                        const float* col = scr + (long long)(tt - u0) * N * N + x;   // S_{t-1}[:, x]
                        float pk = 0.f, pb = 0.f, pw = 0.f, pa = 0.f, pr = 0.f;
    #pragma unroll
                        for (int m = 0; m < M; ++m) {
                            const int cc = p + P * m;
                            const float4 yv = y4[cc];
                            dSc[m].x = fmaf(yv.x, rx, dSc[m].x); dSc[m].y = fmaf(yv.y, rx, dSc[m].y);
                            dSc[m].z = fmaf(yv.z, rx, dSc[m].z); dSc[m].w = fmaf(yv.w, rx, dSc[m].w);
                            pk = dot4(dSc[m], v4[cc], pk);
                            pb = dot4(dSc[m], sa4[cc], pb);
                            float4 sv;
                            sv.x = col[(long long)(4 * cc) * N];
                            sv.y = col[(long long)(4 * cc + 1) * N];
                            sv.z = col[(long long)(4 * cc + 2) * N];
                            sv.w = col[(long long)(4 * cc + 3) * N];
                            pw = dot4(dSc[m], sv, pw);
                            const float4 ds = dsa4[cc];
                            pa = dot4(sv, ds, pa);
                            pr = dot4(sv, yp4[cc], pr);
                            dSc[m].x = fmaf(dSc[m].x, dx, ds.x * ax); dSc[m].y = fmaf(dSc[m].y, dx, ds.y * ax);
                            dSc[m].z = fmaf(dSc[m].z, dx, ds.z * ax); dSc[m].w = fmaf(dSc[m].w, dx, ds.w * ax);
                        }
                        pk = group_sum<P>(pk);
                        pb = group_sum<P>(pb);
                        pw = group_sum<P>(pw);
                        pa = group_sum<P>(pa);
                        pr = group_sum<P>(pr);
                        if (p == 0) {
                            dr[orow] = rwkv::from_float<T>(dr_cur);
                            dk[orow] = rwkv::from_float<T>(pk);
                            db[orow] = rwkv::from_float<T>(pb);
                            da[orow] = rwkv::from_float<T>(pa);
                            dw[orow] = rwkv::from_float<T>(pw * S_f[tt * N + x]);
                        }
                        dr_cur = pr;   // dr of token tt-1 (unused when tt == 0)
                    }
                }
            }   // sub-chunks
        }
        if (state_out != nullptr) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int c = p + P * m;
                state_out[sbase + (long long)(4 * c + 0) * N + x] = dSc[m].x;
                state_out[sbase + (long long)(4 * c + 1) * N + x] = dSc[m].y;
                state_out[sbase + (long long)(4 * c + 2) * N + x] = dSc[m].z;
                state_out[sbase + (long long)(4 * c + 3) * N + x] = dSc[m].w;
            }
        }
    }
}
