// RWKV-7 WKV kernels: S_t = S_{t-1} diag(exp(-exp(w_t))) + (S_{t-1} a_t) b_t^T + v_t k_t^T,  y_t = S_t r_t.
// State S[i][j] (i = value row, j = key column), fp32, row-major [N][N] per (sequence, head).
// Per-token arrays are flat tokens [total, H, N]; sequences via rwkv::seq_bounds; states via rwkv::state_slot.
//
//  wkv7_forward<T, N>   recurrent forward: each (sequence, head) split over R = N/16 blocks ("row groups" of 16
//                       state rows; rows evolve independently), block = one warp; a thread owns 4 rows x N/8
//                       columns in registers (each shared-memory value feeds 4 rows), shuffle-reduced dots over
//                       8 lanes; inputs staged TT = 512/N tokens at a time with 16-byte loads (double buffered,
//                       one barrier per tile).  With ckpt != null it also stores the state rows before every
//                       CK-th token (fp32) at rwkv::chunk_slot(.., CK, c) for the backward (full [N][N] layout).
//  wkv7_decode<T, N>    one token per sequence (dense T == 1, or packed with every length 1, pools included):
//                       block (4N threads) per (sequence, head), the state read and written once with coalesced
//                       16-byte accesses (loops for the rare longer sequence, so it is correct for any length).
//  wkv7_backward<T, N>  (N = 32, 64) reverse walk over the CK-token chunks, block per (sequence, head), one warp
//                       per 16 state rows, the forward's thread layout for both S and dS; recomputed sub-chunk
//                       states kept in shared memory (thread-private slots); column sums over rows reduced
//                       through shuffles and shared memory in a fixed order (see the kernel).
//  wkv7_backward_l2<T, N> (N = 128, or where wkv7_backward's shared memory does not fit, e.g. N = 64 on A100):
//                       reverse walk over the CK-token chunks: recompute the chunk's states from its checkpoint
//                       (rows independent) into a per-block global scratch, then run the adjoint backwards with
//                       P = N/32 threads holding row x AND column x of dS, so every gradient is a short in-thread
//                       dot product plus a P-lane shuffle reduction.
//                       No division by the decay anywhere (exact for decays down to exp(-exp(4)) and below).
//                       With fix != null: per-chunk mode for the chunked backward (the chunks wkv7_tc_bwd listed,
//                       each from its adjoint checkpoint).
//  wkv7_tc_chunk<T, N, MODE>, wkv7_tc_scan<N>  (N = 32, 64; dense batches) the chunked forward on tensor cores, in
//                       16-token chunks whose starts are the checkpoints above; see "chunked forward" below.
//                       MODE 2: the backward's reverse-time adjoint pass (dL/dS at every chunk end).
//  wkv7_tc_wy<T, N, MODE> (16-bit I/O) the same four passes as wkv7_tc_chunk, warp-specialized: producer warps
//                       compute each chunk's state-independent factors (WY form), consumer warps carry the state in
//                       mma registers; see "chunked forward, WY form" below.
//  wkv7_tc_bwd<T, N>    (N = 32, 64; dense batches) the chunked backward's gradients, one block per (sequence,
//                       chunk, head) from the two checkpoints; see "chunked backward" below.
#include "common.cuh"
#include "tc.cuh"

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

// Row dots of a thread's RT state rows with a broadcast vector a (float4 chunks p + P*m): out[rr] = S[row rr, :] . a,
// two accumulators per row, then a full butterfly over the P lanes of the row (bit-identical on every lane).
template <int RT, int MC, int P>
__device__ __forceinline__ void row_dots(const float4 (&s)[RT][MC], const float4* a4, int p, float (&out)[RT]) {
    float sb[RT];
#pragma unroll
    for (int rr = 0; rr < RT; ++rr) { out[rr] = 0.f; sb[rr] = 0.f; }
#pragma unroll
    for (int m = 0; m < MC; ++m) {
        const float4 aa = a4[p + P * m];
#pragma unroll
        for (int rr = 0; rr < RT; ++rr) {
            out[rr] = fmaf(s[rr][m].x, aa.x, out[rr]); sb[rr] = fmaf(s[rr][m].y, aa.y, sb[rr]);
            out[rr] = fmaf(s[rr][m].z, aa.z, out[rr]); sb[rr] = fmaf(s[rr][m].w, aa.w, sb[rr]);
        }
    }
#pragma unroll
    for (int rr = 0; rr < RT; ++rr) out[rr] += sb[rr];
#pragma unroll
    for (int off = P / 2; off > 0; off >>= 1) {
#pragma unroll
        for (int rr = 0; rr < RT; ++rr) out[rr] += __shfl_xor_sync(0xffffffffu, out[rr], off, P);
    }
}

}  // namespace wkv7

// ------------------------------------------------------------------------------------------------ forward

// Forward geometry.  The rows i of the state evolve independently in the forward, so each (sequence, head) is
// split over R = N / RB blocks ("row groups") of RB rows; each block stages the same r, w, k, a, b tiles (and v)
// and owns only its rows of the state, y, the checkpoints and the final state.  Inside a block a warp-sized
// group of NT = (RB / RT) * P threads: lane p (of P) owns the float4 column chunks c = p + P*m (m < MC) of RT
// consecutive rows, so every value read from shared memory is used RT times (the recurrent form is otherwise
// bound by shared-memory loads, 5 floats per state element and step).  = FWD_* in wkv7.py.
// RT = 4 (default): one-warp blocks, least shared-memory traffic per FMA (throughput: many sequences x heads);
// RT = 1: 4-warp blocks of 16 rows, a quarter of the per-warp work per step (latency: few sequences x heads).
template <int N, int RT_ = 4> struct FwdCfg {
    static constexpr int P = 8;                   // lanes per row (column split)
    static constexpr int RT = RT_;                // rows per thread
    static constexpr int RB = 16;                 // rows per block (row group)
    static constexpr int R = N / RB;              // row groups per (sequence, head)
    static constexpr int NT = (RB / RT) * P;      // block size (RT = 4: 32, one warp; RT = 1: 128)
    static constexpr int MC = N / (4 * P);        // float4 column chunks per thread
    static constexpr int TT = 512 / N;            // tokens per staged tile
    static constexpr int NCH = TT * N / 8;        // 8-element chunks per array per tile (64)
    static constexpr int CPA = (NCH + NT - 1) / NT;   // chunks per array per thread per tile
    static_assert(MC * 4 * P == N && R * RB == N, "wkv7 forward geometry");
    static_assert(P == 8 && (RT == 4 || RT == 1), "wkv7_forward's S r reductions are written for 8 lanes, 1 or 4 rows");
};

namespace wkv7 {

__device__ __forceinline__ float bits_to_float(unsigned short u, const __half*) { return __half2float(__ushort_as_half(u)); }
__device__ __forceinline__ float bits_to_float(unsigned short u, const __nv_bfloat16*) {
    return __bfloat162float(__ushort_as_bfloat16(u));
}

// 8 consecutive input elements, loaded with one 16-byte (2-byte types) or two 16-byte (fp32) accesses when the
// arrays are 16-byte aligned (vec), element by element otherwise.
template <typename T> struct Chunk8 {
    uint4 u;
    __device__ __forceinline__ void load(const T* p, bool vec) {
        if (vec) {
            u = *reinterpret_cast<const uint4*>(p);
        } else {
            const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
            u.x = q[0] | ((unsigned)q[1] << 16); u.y = q[2] | ((unsigned)q[3] << 16);
            u.z = q[4] | ((unsigned)q[5] << 16); u.w = q[6] | ((unsigned)q[7] << 16);
        }
    }
    __device__ __forceinline__ void get(float (&f)[8]) const {
        const unsigned wd[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            f[2 * j] = bits_to_float((unsigned short)(wd[j] & 0xffffu), (const T*)nullptr);
            f[2 * j + 1] = bits_to_float((unsigned short)(wd[j] >> 16), (const T*)nullptr);
        }
    }
    // 8 consecutive output elements from fp32 (one 16-byte store when vec)
    static __device__ __forceinline__ void store(T* p, const float (&f)[8], bool vec) {
        if (vec) {
            T x[8];
#pragma unroll
            for (int m = 0; m < 8; ++m) x[m] = rwkv::from_float<T>(f[m]);
            *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(x);
        } else {
#pragma unroll
            for (int m = 0; m < 8; ++m) p[m] = rwkv::from_float<T>(f[m]);
        }
    }
};
template <> struct Chunk8<float> {
    float4 lo, hi;
    __device__ __forceinline__ void load(const float* p, bool vec) {
        if (vec) {
            lo = *reinterpret_cast<const float4*>(p); hi = *reinterpret_cast<const float4*>(p + 4);
        } else {
            lo = make_float4(p[0], p[1], p[2], p[3]); hi = make_float4(p[4], p[5], p[6], p[7]);
        }
    }
    static __device__ __forceinline__ void store(float* p, const float (&f)[8], bool vec) {
        if (vec) {
            *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
            *reinterpret_cast<float4*>(p + 4) = make_float4(f[4], f[5], f[6], f[7]);
        } else {
#pragma unroll
            for (int m = 0; m < 8; ++m) p[m] = f[m];
        }
    }
    __device__ __forceinline__ void get(float (&f)[8]) const {
        f[0] = lo.x; f[1] = lo.y; f[2] = lo.z; f[3] = lo.w; f[4] = hi.x; f[5] = hi.y; f[6] = hi.z; f[7] = hi.w;
    }
};

}  // namespace wkv7

// Grid: num * H * R blocks, blockIdx.x = (sq * H + h) * R + g; block FwdCfg<N, RT>::NT threads.  Thread tid = q*P + p
// owns rows i0 .. i0+RT-1 (i0 = g*RB + q*RT), float4 column chunks c = p + P*m.  The row dot products (S a, S r)
// are reduced over the P lanes with xor shuffles: S a by a full butterfly (bit-identical on every lane), S r (RT = 4)
// by a reduce-scatter that leaves row i0 + 2*bit2(p) + bit1(p) on lanes p and p^1.  Inputs are staged TT tokens at a
// time (register prefetch of the next tile + double-buffered shared memory, one barrier per tile).  vec != 0: the
// six input arrays are 16-byte aligned (vector loads).  With ckpt != null it also stores the state rows before
// every CK-th token (fp32) at rwkv::chunk_slot(.., CK, c) (full [N][N] layout: the backward is unchanged).
template <typename T, int N, int RT_ = 4>
__global__ void __launch_bounds__(FwdCfg<N, RT_>::NT) wkv7_forward(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    float* __restrict__ ckpt, int H, int vec) {
    using C = FwdCfg<N, RT_>;
    constexpr int P = C::P, RT = C::RT, RB = C::RB, R = C::R, NT = C::NT, MC = C::MC, TT = C::TT, CPA = C::CPA;
    constexpr int NCH = C::NCH;
    constexpr int N8 = N / 8;
    // [buffer][array][token][N], arrays: r, decay, k, v, a, b
    __shared__ __align__(16) float sm[2][6][TT][N];
    // RT = 1: the S r partials of the 8 lanes of each row, summed once per tile (keeps the y reduction off the
    // step's dependency chain); [token][row of the block][lane]
    __shared__ __align__(16) float sy[RT == 1 ? TT : 1][RB][P];

    const int tid = threadIdx.x;
    const int q = tid / P, p = tid % P;
    const int g = blockIdx.x % R;
    const int h = (blockIdx.x / R) % H;
    const int sq = blockIdx.x / (R * H);
    const int i0 = g * RB + q * RT;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, sq, pool_size, err);
    const int len = (int)(end - start);
    const bool vv = vec != 0;

    float4 s[RT][MC];
    if (state_in != nullptr && slot >= 0) {
        const float* src = state_in + ((slot * H + h) * N + i0) * (long long)N;
#pragma unroll
        for (int rr = 0; rr < RT; ++rr)
#pragma unroll
            for (int m = 0; m < MC; ++m) s[rr][m] = *reinterpret_cast<const float4*>(src + rr * N + 4 * (p + P * m));
    } else {
#pragma unroll
        for (int rr = 0; rr < RT; ++rr)
#pragma unroll
            for (int m = 0; m < MC; ++m) s[rr][m] = make_float4(0.f, 0.f, 0.f, 0.f);
    }

    const int ntiles = (len + TT - 1) / TT;
    const T* const ins[6] = {r, w, k, v, a, b};
    wkv7::Chunk8<T> pre[6][CPA];
    auto load_tile = [&](int tile) {
#pragma unroll
        for (int j = 0; j < CPA; ++j) {
            const int e = tid + NT * j;             // chunk of the tile: token e / N8, columns 8*(e % N8) ..
            const int tl = tile * TT + e / N8;
            if ((NCH % NT == 0 || e < NCH) && tl < len) {
                const long long o = ((start + tl) * H + h) * N + 8 * (e % N8);
#pragma unroll
                for (int arr = 0; arr < 6; ++arr) pre[arr][j].load(ins[arr] + o, vv);
            }
        }
    };
    auto store_tile = [&](int buf, int tile) {
#pragma unroll
        for (int j = 0; j < CPA; ++j) {
            const int e = tid + NT * j;
            const int tt = e / N8, col = 8 * (e % N8);
            if ((NCH % NT == 0 || e < NCH) && tile * TT + tt < len) {
#pragma unroll
                for (int arr = 0; arr < 6; ++arr) {
                    float f[8];
                    pre[arr][j].get(f);
                    if (arr == 1) {
#pragma unroll
                        for (int z = 0; z < 8; ++z) f[z] = wkv7::decay_of(f[z]);
                    }
                    *reinterpret_cast<float4*>(&sm[buf][arr][tt][col]) = make_float4(f[0], f[1], f[2], f[3]);
                    *reinterpret_cast<float4*>(&sm[buf][arr][tt][col + 4]) = make_float4(f[4], f[5], f[6], f[7]);
                }
            }
        }
    };

    // reduce-scatter target of this lane for S r: row i0 + yrow (lanes p and p^1 hold the same full sum)
    const int yrow = 2 * ((p >> 2) & 1) + ((p >> 1) & 1);

    if (ntiles > 0) {
        load_tile(0);
        store_tile(0, 0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int buf = tile & 1;
        if (tile + 1 < ntiles) load_tile(tile + 1);
        const int n = min(TT, len - tile * TT);
        // RT = 1 is latency-bound: unrolling by 2 lets the next token's shared-memory loads issue early
#pragma unroll (RT == 1 ? 2 : 1)
        for (int tt = 0; tt < n; ++tt) {
            const int tl = tile * TT + tt;
            if (ckpt != nullptr && (tl % WKV7_CK) == 0) {
                const long long cs = rwkv::chunk_slot(cu_seqlens, T_len, sq, start, WKV7_CK, tl / WKV7_CK);
                float* dst = ckpt + ((cs * H + h) * N + i0) * (long long)N;
#pragma unroll
                for (int rr = 0; rr < RT; ++rr)
#pragma unroll
                    for (int m = 0; m < MC; ++m) *reinterpret_cast<float4*>(dst + rr * N + 4 * (p + P * m)) = s[rr][m];
            }
            const float4* r4 = reinterpret_cast<const float4*>(sm[buf][0][tt]);
            const float4* d4 = reinterpret_cast<const float4*>(sm[buf][1][tt]);
            const float4* k4 = reinterpret_cast<const float4*>(sm[buf][2][tt]);
            const float4* a4 = reinterpret_cast<const float4*>(sm[buf][4][tt]);
            const float4* b4 = reinterpret_cast<const float4*>(sm[buf][5][tt]);
            float vr[RT];
            if constexpr (RT == 4) {
                const float4 v4 = *reinterpret_cast<const float4*>(&sm[buf][3][tt][i0]);
                vr[0] = v4.x; vr[1] = v4.y; vr[2] = v4.z; vr[3] = v4.w;
            } else {
                vr[0] = sm[buf][3][tt][i0];
            }
            float sa[RT], sb[RT];   // sa: S[i0+rr, :] . a; sb: the second accumulator of y below
            wkv7::row_dots<RT, MC, P>(s, a4, p, sa);
            float yp[RT];
#pragma unroll
            for (int rr = 0; rr < RT; ++rr) { yp[rr] = 0.f; sb[rr] = 0.f; }
#pragma unroll
            for (int m = 0; m < MC; ++m) {
                const int c = p + P * m;
                const float4 dd = d4[c], bb = b4[c], kk = k4[c], ro = r4[c];
#pragma unroll
                for (int rr = 0; rr < RT; ++rr) {
                    float4& x = s[rr][m];
                    const float sv = sa[rr], vi = vr[rr];
                    x.x = fmaf(x.x, dd.x, fmaf(sv, bb.x, vi * kk.x)); yp[rr] = fmaf(x.x, ro.x, yp[rr]);
                    x.y = fmaf(x.y, dd.y, fmaf(sv, bb.y, vi * kk.y)); sb[rr] = fmaf(x.y, ro.y, sb[rr]);
                    x.z = fmaf(x.z, dd.z, fmaf(sv, bb.z, vi * kk.z)); yp[rr] = fmaf(x.z, ro.z, yp[rr]);
                    x.w = fmaf(x.w, dd.w, fmaf(sv, bb.w, vi * kk.w)); sb[rr] = fmaf(x.w, ro.w, sb[rr]);
                }
            }
#pragma unroll
            for (int rr = 0; rr < RT; ++rr) yp[rr] += sb[rr];
            if constexpr (RT == 4) {
                // reduce-scatter of yp[0..3] over the 8 lanes: xor 4 halves the rows, xor 2 halves again, xor 1 sums
                const bool b2 = (p & 4) != 0, b1 = (p & 2) != 0;
                float k0 = b2 ? yp[2] : yp[0], k1 = b2 ? yp[3] : yp[1];
                k0 += __shfl_xor_sync(0xffffffffu, b2 ? yp[0] : yp[2], 4, P);
                k1 += __shfl_xor_sync(0xffffffffu, b2 ? yp[1] : yp[3], 4, P);
                float yy = b1 ? k1 : k0;
                yy += __shfl_xor_sync(0xffffffffu, b1 ? k0 : k1, 2, P);
                yy += __shfl_xor_sync(0xffffffffu, yy, 1, P);
                if ((p & 1) == 0) y[((start + tl) * H + h) * N + i0 + yrow] = rwkv::from_float<T>(yy);
            } else {
                sy[tt][q][p] = yp[0];
            }
        }
        if constexpr (RT == 1) {
            __syncthreads();   // the tile's S r partials visible
            for (int e = tid; e < n * RB; e += NT) {
                const int tt = e / RB, row = e % RB;
                float yy = 0.f;
#pragma unroll
                for (int z = 0; z < P; ++z) yy += sy[tt][row][z];
                y[((start + tile * TT + tt) * H + h) * N + g * RB + row] = rwkv::from_float<T>(yy);
            }
        }
        if (tile + 1 < ntiles) store_tile(buf ^ 1, tile + 1);
        __syncthreads();   // next tile staged; (RT = 1) this tile's partials consumed
    }
    if (state_out != nullptr && slot >= 0) {
        float* dst = state_out + ((slot * H + h) * N + i0) * (long long)N;
#pragma unroll
        for (int rr = 0; rr < RT; ++rr)
#pragma unroll
            for (int m = 0; m < MC; ++m) *reinterpret_cast<float4*>(dst + rr * N + 4 * (p + P * m)) = s[rr][m];
    }
}

// ------------------------------------------------------------------------------------------------ decode

// Decode: one token per sequence (dense T == 1, or a packed call whose lengths sum to the number of sequences,
// i.e. every length 1 in serving).  Correct for any length: the launcher cannot see device-side cu_seqlens
// without a sync, so a packed call with total == num may still hold a 0/2 pair; such a sequence just loops.
// Pools: the state comes from slot state_idx[s] (rwkv::state_slot: -1 = zeros and no write-back, an index
// outside [-1, pool_size) sets the error word and is treated as -1), so nothing outside the pool is touched.
// Block: 4N threads; thread q = tid % (N/4) of row group g = tid / (N/4) owns columns 4q..4q+3 of rows
// g, g+16, g+32, ...
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
    for (long long t = start; t < end; ++t) {   // block-uniform; one pass in decode
        if (t > start) __syncthreads();          // every thread has read sm of the previous token
        if (tid < N) {
            const long long o = (t * H + h) * N + tid;
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
            if (q == 0) y[(t * H + h) * N + row] = rwkv::from_float<T>(yy);
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
__global__ void __launch_bounds__(BwdCfg<N>::NT, BwdCfg<N>::MINB) wkv7_backward_l2(
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

// ------------------------------------------------------------------------------------------------ backward (rows)

// Row-layout backward (used for N = 32, 64): block per (sequence, head), NW = N/16 warps; warp wp owns state rows
// wp*16 .. wp*16+15 and, like the forward, thread (q = lane/8, p = lane%8) owns rows i0 = wp*16 + 4q .. i0+3 x
// float4 column chunks c = p + 8m of both the recomputed state S and the adjoint dS (rows of dS are independent:
// dS_{t-1}[i,:] = dS_t[i,:] diag(d) + (dS_t[i,:].b) a^T).  Row dots (dv, dsa, and S a in the recompute) are
// reduced over the 8 lanes of a row quad; the column sums over rows (dr, dk, db, da, dw) are summed in-thread
// over 4 rows, reduce-scattered over the 4 row quads of the warp (shuffles), and summed over the NW warps in a
// fixed order from shared memory: deterministic, no atomics, no global scratch.  Per CK-token chunk (reverse):
// stage its inputs; per SC-token sub-chunk (reverse): (A) recompute from the checkpoint, keeping each thread's
// part of S_{t-1} for the sub-chunk's tokens in shared memory (thread-private slots) and S a per row; (B) walk
// the sub-chunk backwards (S_t carried in registers, S_{t-1} from the private slots), (C) sum the per-warp column
// partials and write dr, dk, db, da, dw.  dynamic shared memory: wkv7.py _bwd_rows_smem(N).
// ABI as wkv7_backward_l2 (state_in = dL/dS_final or null, state_out = dL/dS_initial or null; scratch and num
// unused).
template <int N> struct BwdRowCfg {
    static constexpr int P = 8, RT = 4, RB = 16;
    static constexpr int NW = N / RB;             // warps per block
    static constexpr int NT = 32 * NW;            // block size
    static constexpr int MC = N / (4 * P);        // float4 column chunks per thread
    static constexpr int V = 4 * MC;              // columns per thread
    static constexpr int SC = (N <= 32) ? 16 : 8; // sub-chunk: = BWD_ROWS_SC in wkv7.py
    static constexpr int NA = 7;                  // staged arrays: r, decay, k, v, a, b, dy
    static_assert(MC * 4 * P == N && V % 4 == 0, "wkv7 row backward geometry");
};

namespace wkv7 {

// Sum x over the 4 row quads of a warp (lanes with equal lane%8), reduce-scattered: quad q keeps the V/4 sums of
// local columns (q&2 ? V/2 : 0) + (q&1 ? V/4 : 0) + j, j < V/4.
template <int V>
__device__ __forceinline__ void quad_scatter(const float (&x)[V], float (&out)[V / 4], int q) {
    constexpr int H1 = V / 2, H2 = V / 4;
    const bool b1 = (q & 2) != 0, b0 = (q & 1) != 0;
    float w1[H1];
#pragma unroll
    for (int j = 0; j < H1; ++j) {
        const float keep = b1 ? x[H1 + j] : x[j];
        const float send = b1 ? x[j] : x[H1 + j];
        w1[j] = keep + __shfl_xor_sync(0xffffffffu, send, 16, 32);
    }
#pragma unroll
    for (int j = 0; j < H2; ++j) {
        const float keep = b0 ? w1[H2 + j] : w1[j];
        const float send = b0 ? w1[j] : w1[H2 + j];
        out[j] = keep + __shfl_xor_sync(0xffffffffu, send, 8, 32);
    }
}

__device__ __forceinline__ void acc4(float* c, float4 x, float s) {
    c[0] = fmaf(x.x, s, c[0]); c[1] = fmaf(x.y, s, c[1]); c[2] = fmaf(x.z, s, c[2]); c[3] = fmaf(x.w, s, c[3]);
}
__device__ __forceinline__ void acc4v(float* c, float4 x, float4 s) {
    c[0] = fmaf(x.x, s.x, c[0]); c[1] = fmaf(x.y, s.y, c[1]); c[2] = fmaf(x.z, s.z, c[2]); c[3] = fmaf(x.w, s.w, c[3]);
}

}  // namespace wkv7

template <typename T, int N>
__global__ void __launch_bounds__(BwdRowCfg<N>::NT, 1) wkv7_backward(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
    T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk, T* __restrict__ dv,
    T* __restrict__ da, T* __restrict__ db,
    const int* cu_seqlens, int T_len, long long total,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    const float* __restrict__ ckpt, float* __restrict__ scratch, int H, int num,
    const float* __restrict__ dckpt, const int* fix) {
    using C = BwdRowCfg<N>;
    constexpr int CK = WKV7_CK;
    constexpr int P = C::P, RT = C::RT, RB = C::RB, NW = C::NW, NT = C::NT, MC = C::MC, V = C::V, SC = C::SC;
    constexpr int NA = C::NA;
    extern __shared__ __align__(16) float smem[];
    float* S_in = smem;                                                  // [NA][CK][N]
    float* S_sa = smem + NA * CK * N;                                    // [CK][N]
    float4* S_st = reinterpret_cast<float4*>(S_sa + CK * N);             // [SC][RT][MC][NT] thread-private
    float* S_cp = S_sa + CK * N + SC * N * N;                            // [SC][5][NW][N] column partials

    const int tid = threadIdx.x;
    const int lane = tid & 31, wp = tid >> 5, q = lane >> 3, p = lane & 7;
    const int i0 = wp * RB + q * RT;
    const int yrow = 2 * ((p >> 2) & 1) + ((p >> 1) & 1);   // row (of the 4) whose dv this lane pair writes
    // fix != null (dense only): per-chunk mode, grid-stride over the chunks listed by wkv7_tc_bwd (fix[0] of them,
    // ids (sequence * chunks + chunk) * H + head at fix[1..]), each from its adjoint checkpoint in dckpt
    const int nitems = fix != nullptr ? fix[0] : 1;
    const int nchk_dense = (T_len + CK - 1) / CK;
    for (int item = fix != nullptr ? (int)blockIdx.x : 0; item < nitems; item += fix != nullptr ? (int)gridDim.x : 1) {
        const int id = fix != nullptr ? fix[1 + item] : (int)blockIdx.x;
        const int h = id % H;
        const int sq = fix != nullptr ? id / (H * nchk_dense) : id / H;
        long long start, end;
        rwkv::seq_bounds(cu_seqlens, T_len, total, sq, start, end, err);
        const int len = (int)(end - start);
        const long long sbase = ((long long)sq * H + h) * N * N + (long long)i0 * N;
        const int nch = (len + CK - 1) / CK;
        const int c_hi = fix != nullptr ? (id / H) % nchk_dense : nch - 1;
        const int c_lo = fix != nullptr ? c_hi : 0;

        float4 dS[RT][MC];
        const float* dsrc = state_in != nullptr ? state_in + sbase : nullptr;
        if (fix != nullptr)
            dsrc = dckpt + ((rwkv::chunk_slot(nullptr, T_len, sq, 0, CK, c_hi) * H + h) * N + i0) * (long long)N;
#pragma unroll
        for (int rr = 0; rr < RT; ++rr)
#pragma unroll
            for (int m = 0; m < MC; ++m)
                dS[rr][m] = dsrc != nullptr ? *reinterpret_cast<const float4*>(dsrc + rr * N + 4 * (p + P * m))
                                            : make_float4(0.f, 0.f, 0.f, 0.f);

        for (int c = c_hi; c >= c_lo; --c) {
            const int t0 = c * CK;
            const int L = min(CK, len - t0);
            __syncthreads();   // the previous chunk is done with the staged inputs and column partials
            for (int e = tid; e < L * N; e += NT) {
                const int tt = e / N, col = e % N;
                const long long o = ((start + t0 + tt) * H + h) * N + col;
                S_in[(0 * CK + tt) * N + col] = rwkv::to_float(r[o]);
                S_in[(1 * CK + tt) * N + col] = wkv7::decay_of(rwkv::to_float(w[o]));
                S_in[(2 * CK + tt) * N + col] = rwkv::to_float(k[o]);
                S_in[(3 * CK + tt) * N + col] = rwkv::to_float(v[o]);
                S_in[(4 * CK + tt) * N + col] = rwkv::to_float(a[o]);
                S_in[(5 * CK + tt) * N + col] = rwkv::to_float(b[o]);
                S_in[(6 * CK + tt) * N + col] = dy != nullptr ? rwkv::to_float(dy[o]) : 0.f;
            }
            __syncthreads();
            const long long cs = rwkv::chunk_slot(cu_seqlens, T_len, sq, start, CK, c);
            const float* ck = ckpt + ((cs * H + h) * N + i0) * (long long)N;
            const int nsub = (L + SC - 1) / SC;
            for (int sub = nsub - 1; sub >= 0; --sub) {
                const int u0 = sub * SC;
                const int Ls = min(SC, L - u0);
                // ---- (A) recompute from the checkpoint up to the sub-chunk's end
                float4 st[RT][MC];
#pragma unroll
                for (int rr = 0; rr < RT; ++rr)
#pragma unroll
                    for (int m = 0; m < MC; ++m) st[rr][m] = *reinterpret_cast<const float4*>(ck + rr * N + 4 * (p + P * m));
                for (int tt = 0; tt < u0 + Ls; ++tt) {
                    const bool keep = tt >= u0;
                    if (keep) {
#pragma unroll
                        for (int rr = 0; rr < RT; ++rr)
#pragma unroll
                            for (int m = 0; m < MC; ++m) S_st[(((tt - u0) * RT + rr) * MC + m) * NT + tid] = st[rr][m];
                    }
                    const float4* a4 = reinterpret_cast<const float4*>(S_in + (4 * CK + tt) * N);
                    const float4* b4 = reinterpret_cast<const float4*>(S_in + (5 * CK + tt) * N);
                    const float4* d4 = reinterpret_cast<const float4*>(S_in + (1 * CK + tt) * N);
                    const float4* k4 = reinterpret_cast<const float4*>(S_in + (2 * CK + tt) * N);
                    const float4 v4 = *reinterpret_cast<const float4*>(S_in + (3 * CK + tt) * N + i0);
                    const float vr[RT] = {v4.x, v4.y, v4.z, v4.w};
                    float sa[RT];
                    wkv7::row_dots<RT, MC, P>(st, a4, p, sa);
                    if (keep && p == 0)
                        *reinterpret_cast<float4*>(S_sa + tt * N + i0) = make_float4(sa[0], sa[1], sa[2], sa[3]);
#pragma unroll
                    for (int m = 0; m < MC; ++m) {
                        const int cc = p + P * m;
                        const float4 dd = d4[cc], bb = b4[cc], kk = k4[cc];
#pragma unroll
                        for (int rr = 0; rr < RT; ++rr) {
                            float4& x = st[rr][m];
                            x.x = fmaf(x.x, dd.x, fmaf(sa[rr], bb.x, vr[rr] * kk.x));
                            x.y = fmaf(x.y, dd.y, fmaf(sa[rr], bb.y, vr[rr] * kk.y));
                            x.z = fmaf(x.z, dd.z, fmaf(sa[rr], bb.z, vr[rr] * kk.z));
                            x.w = fmaf(x.w, dd.w, fmaf(sa[rr], bb.w, vr[rr] * kk.w));
                        }
                    }
                }
                __syncthreads();   // S_sa visible; the previous sub-chunk's (C) is done with S_cp
                // ---- (B) adjoint over the sub-chunk, backwards; st = S_t (the state after token tt)
                for (int tt = u0 + Ls - 1; tt >= u0; --tt) {
                    const int lt = tt - u0;
                    float4 sp[RT][MC];   // S_{t-1}
#pragma unroll
                    for (int rr = 0; rr < RT; ++rr)
#pragma unroll
                        for (int m = 0; m < MC; ++m) sp[rr][m] = S_st[((lt * RT + rr) * MC + m) * NT + tid];
                    const float4* r4 = reinterpret_cast<const float4*>(S_in + (0 * CK + tt) * N);
                    const float4* d4 = reinterpret_cast<const float4*>(S_in + (1 * CK + tt) * N);
                    const float4* k4 = reinterpret_cast<const float4*>(S_in + (2 * CK + tt) * N);
                    const float4* a4 = reinterpret_cast<const float4*>(S_in + (4 * CK + tt) * N);
                    const float4* b4 = reinterpret_cast<const float4*>(S_in + (5 * CK + tt) * N);
                    const float4 v4 = *reinterpret_cast<const float4*>(S_in + (3 * CK + tt) * N + i0);
                    const float4 y4 = *reinterpret_cast<const float4*>(S_in + (6 * CK + tt) * N + i0);
                    const float4 s4 = *reinterpret_cast<const float4*>(S_sa + tt * N + i0);
                    const float vr[RT] = {v4.x, v4.y, v4.z, v4.w};
                    const float yr[RT] = {y4.x, y4.y, y4.z, y4.w};
                    const float sar[RT] = {s4.x, s4.y, s4.z, s4.w};
                    float cp[5][V];   // column partials over this thread's rows: dr, dk, db, da, dw (before * f)
#pragma unroll
                    for (int z = 0; z < 5; ++z)
#pragma unroll
                        for (int j = 0; j < V; ++j) cp[z][j] = 0.f;
                    float pb[RT], pk[RT];
#pragma unroll
                    for (int rr = 0; rr < RT; ++rr) { pb[rr] = 0.f; pk[rr] = 0.f; }
#pragma unroll
                    for (int m = 0; m < MC; ++m) {
                        const int cc = p + P * m;
                        const float4 rv = r4[cc], bv = b4[cc], kv = k4[cc];
#pragma unroll
                        for (int rr = 0; rr < RT; ++rr) {
                            wkv7::acc4(&cp[0][4 * m], st[rr][m], yr[rr]);          // dr_t = S_t^T dy_t
                            float4& g = dS[rr][m];
                            g.x = fmaf(yr[rr], rv.x, g.x); g.y = fmaf(yr[rr], rv.y, g.y);   // dS += dy r^T
                            g.z = fmaf(yr[rr], rv.z, g.z); g.w = fmaf(yr[rr], rv.w, g.w);
                            pb[rr] = dot4(g, bv, pb[rr]);
                            pk[rr] = dot4(g, kv, pk[rr]);
                            wkv7::acc4(&cp[1][4 * m], g, vr[rr]);                  // dk = dS^T v
                            wkv7::acc4(&cp[2][4 * m], g, sar[rr]);                 // db = dS^T (S_{t-1} a)
                            wkv7::acc4v(&cp[4][4 * m], g, sp[rr][m]);              // sum_i dS * S_{t-1}
                        }
                    }
#pragma unroll
                    for (int off = P / 2; off > 0; off >>= 1) {
#pragma unroll
                        for (int rr = 0; rr < RT; ++rr) pb[rr] += __shfl_xor_sync(0xffffffffu, pb[rr], off, P);
                    }
                    {   // dv: reduce-scatter of pk over the 8 lanes (as y in the forward)
                        const bool b2 = (p & 4) != 0, b1 = (p & 2) != 0;
                        float k0 = b2 ? pk[2] : pk[0], k1 = b2 ? pk[3] : pk[1];
                        k0 += __shfl_xor_sync(0xffffffffu, b2 ? pk[0] : pk[2], 4, P);
                        k1 += __shfl_xor_sync(0xffffffffu, b2 ? pk[1] : pk[3], 4, P);
                        float vv = b1 ? k1 : k0;
                        vv += __shfl_xor_sync(0xffffffffu, b1 ? k0 : k1, 2, P);
                        vv += __shfl_xor_sync(0xffffffffu, vv, 1, P);
                        if ((p & 1) == 0) dv[((start + t0 + tt) * H + h) * N + i0 + yrow] = rwkv::from_float<T>(vv);
                    }
#pragma unroll
                    for (int m = 0; m < MC; ++m) {
                        const int cc = p + P * m;
                        const float4 dd = d4[cc], av = a4[cc];
#pragma unroll
                        for (int rr = 0; rr < RT; ++rr) {
                            wkv7::acc4(&cp[3][4 * m], sp[rr][m], pb[rr]);          // da = S_{t-1}^T dsa
                            float4& g = dS[rr][m];                                 // dS_{t-1} = dS diag(d) + dsa a^T
                            g.x = fmaf(g.x, dd.x, pb[rr] * av.x); g.y = fmaf(g.y, dd.y, pb[rr] * av.y);
                            g.z = fmaf(g.z, dd.z, pb[rr] * av.z); g.w = fmaf(g.w, dd.w, pb[rr] * av.w);
                            st[rr][m] = sp[rr][m];
                        }
                    }
                    // column partials: over the warp's 4 row quads (shuffles), then to shared memory per warp
#pragma unroll
                    for (int z = 0; z < 5; ++z) {
                        float part[V / 4];
                        wkv7::quad_scatter<V>(cp[z], part, q);
                        const int base = ((q & 2) ? V / 2 : 0) + ((q & 1) ? V / 4 : 0);
#pragma unroll
                        for (int j = 0; j < V / 4; ++j) {
                            const int lc = base + j;                       // local column: chunk lc/4, component lc%4
                            const int col = 4 * (p + P * (lc / 4)) + (lc % 4);
                            S_cp[((lt * 5 + z) * NW + wp) * N + col] = part[j];
                        }
                    }
                }
                __syncthreads();   // column partials of the sub-chunk visible
                // ---- (C) sum the warps' partials in a fixed order, write the column gradients
                for (int e = tid; e < Ls * 5 * N; e += NT) {
                    const int lt = e / (5 * N), z = (e / N) % 5, col = e % N;
                    float acc = 0.f;
#pragma unroll
                    for (int q2 = 0; q2 < NW; ++q2) acc += S_cp[((lt * 5 + z) * NW + q2) * N + col];
                    const long long o = ((start + t0 + u0 + lt) * H + h) * N + col;
                    if (z == 0) dr[o] = rwkv::from_float<T>(acc);
                    else if (z == 1) dk[o] = rwkv::from_float<T>(acc);
                    else if (z == 2) db[o] = rwkv::from_float<T>(acc);
                    else if (z == 3) da[o] = rwkv::from_float<T>(acc);
                    else {
                        const float wv = rwkv::to_float(w[o]);
                        dw[o] = rwkv::from_float<T>(acc * (-expf(wv) * wkv7::decay_of(wv)));
                    }
                }
            }   // sub-chunks
        }
        if (state_out != nullptr && fix == nullptr) {
#pragma unroll
            for (int rr = 0; rr < RT; ++rr)
#pragma unroll
                for (int m = 0; m < MC; ++m)
                    *reinterpret_cast<float4*>(state_out + sbase + rr * N + 4 * (p + P * m)) = dS[rr][m];
        }
    }   // items
}

// ------------------------------------------------------------------------------------------------ chunked forward
//
// Chunked forward on tensor cores (dense batches, N = 32 or 64): the recurrence in chunks of TC_L = 16 tokens
// (= WKV7_CK, so the chunk starts are exactly the backward's checkpoints).  In a chunk starting from S (rows i =
// value, columns j = key), with lw_t = -exp(w_t) (log decay), G(s, u) = sum_{s < s' <= u} lw_s' (per channel), and
// u_t = S_{t-1} a_t:
//   U = (I - M_ab)^{-1} (A_g S^T + M_ak V)                       (rows of U, V: tokens; columns: value i)
//   Y = R_g S^T + Q_ab U + Q_ak V
//   S' = S diag(exp(G(-1, 15))) + U^T B_g + V^T K_g
// with A_g[t] = a_t exp(G(-1, t-1)), R_g[t] = r_t exp(G(-1, t)), B_g[s] = b_s exp(G(s, 15)), K_g likewise from k,
// strictly lower M_ab[t, s] = sum_j a_t b_s exp(G(s, t-1)) (M_ak from k), lower Q_ab[t, s] = sum_j r_t b_s
// exp(G(s, t)) (Q_ak from k; the diagonal has no decay).  Every exponent above is <= 0 except in the factorized
// intra-chunk matrices: M_ab = A_g Bi^T with Bi[s] = b_s exp(-G(-1, s)), which is exact only while the chunk's total
// log decay is >= -TC_SAFE_SPAN in every channel (exponents up to +30, masked entries finite); a chunk with a
// stronger decay computes the four 16 x 16 matrices pairwise, with G summed over exactly each entry's tokens.
// Never a division, never a difference of long prefix sums: exact for any decay exp(-exp(w)), w in [-8, 4] and
// beyond.  Products on tensor cores (rwkv::tc, TF32; 3xTF32 for fp32 I/O), the solve and the decays in fp32.
//
//  wkv7_tc_chunk<T, N, 0>  block per (sequence, segment, head): runs the segment's chunks in order from its initial
//                          state (nseg == 1: state_in (pool slot) / zeros, final state to state_out; nseg > 1: the
//                          segment's start state from segbuf); writes y and, with ckpt, the state at every chunk
//                          start (rwkv::chunk_slot(.., WKV7_CK, c)).
//  wkv7_tc_chunk<T, N, 2>  block per (sequence, segment, head): the adjoint X = dL/dS walked backwards over the
//                          segment's chunks, the same form transposed (rows of X evolve independently; V = dY, no
//                          outputs; nseg > 1: the adjoint at the segment's end from segbuf):
//                            Z = (I - M_ab^T)^{-1} (B_g X^T + Q_ab^T dY),  X' = X diag(exp(G(-1, 15))) + Z^T A_g + dY^T R_g
//                          (z_t = E_t b_t, E_t = dL/dS_t); X before each chunk (= at its end) to ckpt, the last X
//                          (dL/d initial state) to state_out; state_in = dL/d final state or null (nseg == 1).
//  wkv7_tc_chunk<T, N, 3>  block per (sequence, segment, head): the adjoint's segment transition X_start = X_end M'
//                          + A' (rows 0..N-1 from 0 with the real dY, rows N..2N-1 from the identity without), the
//                          reverse counterpart of mode 1; wkv7_tc_scan with rev = 1 then runs the segments backwards.
//  wkv7_tc_chunk<T, N, 1>  block per (sequence, segment, head): the segment's transition S_end = S_start M + A as a
//                          2N-row "state": rows 0..N-1 start at 0 with the real v (-> A), rows N..2N-1 start at the
//                          identity with v = 0 (-> M, rows of the homogeneous map); written to segbuf [A; M].
//  wkv7_tc_scan<N>         block per (sequence, head, 16 state rows): S <- S M_g + A_g over the segments in order
//                          (fp32 FMA), the start state of each segment written over its A_g; final state to
//                          state_out.  Together: batch-1 long prefill runs nseg-way parallel over time.
// Warp q owns state rows q*RW .. q*RW+RW-1 and the same columns of U (and Y): S, U and Y never cross warps, so
// the only block barriers are around the per-chunk token matrices (staged inputs, decays, intra-chunk matrices).
namespace wkv7 {

// In-place unit-triangular solves of one column u against the strictly lower L x L matrix M (row stride LD):
// forward_subst: u <- (I - M)^{-1} u;  back_subst: u <- (I - M^T)^{-1} u.  Two accumulators halve the chain.
template <int L, int LD>
__device__ __forceinline__ void forward_subst(float (&u)[L], const float* M) {
#pragma unroll
    for (int t = 1; t < L; ++t) {
        float s0 = u[t], s1 = 0.f;
#pragma unroll
        for (int s = 0; s < t; s += 2) {
            s0 = fmaf(M[t * LD + s], u[s], s0);
            if (s + 1 < t) s1 = fmaf(M[t * LD + s + 1], u[s + 1], s1);
        }
        u[t] = s0 + s1;
    }
}

template <int L, int LD>
__device__ __forceinline__ void back_subst(float (&u)[L], const float* M) {
#pragma unroll
    for (int t = L - 2; t >= 0; --t) {
        float s0 = u[t], s1 = 0.f;
#pragma unroll
        for (int s = t + 1; s < L; s += 2) {
            s0 = fmaf(M[s * LD + t], u[s], s0);
            if (s + 1 < L) s1 = fmaf(M[(s + 1) * LD + t], u[s + 1], s1);
        }
        u[t] = s0 + s1;
    }
}

constexpr int TC_L = 16;
constexpr float TC_SAFE_SPAN = 30.f;
static_assert(TC_L == WKV7_CK, "the chunk starts are the backward's checkpoints");

// One intra-chunk matrix of a chunk with a strong decay (where the factorization over- or underflows), pairwise
// from the decays: Im[t][s] = sum_j x(t, j) y(s, j) exp(G(s, t)) for s <= t, or exp(G(s, t-1)) for s < t when
// strict, the rest zero.  One warp; lane owns channels lane + 32*jj; for each key token s, G(s, t) accumulates one
// token at a time (exactly the entry's range): gstep(g, s, t, j) = G(s, t) from g = G(s, t-1) (0 at t = s).  The
// readers are callables so that each kernel reads its inputs where it keeps them (global, staged fp32, raw 16-bit)
// in the order it did: where gstep reads the log decay decides the generated code.
template <int L, int N, int LDI, typename GStep, typename X, typename Y>
__device__ __forceinline__ void intra_pairwise(float* Im, bool strict, int lane, const GStep& gstep, const X& x,
                                               const Y& y) {
    for (int e = lane; e < L * L; e += 32) {
        const int t = e / L, s = e % L;
        if (s > t || (strict && s == t)) Im[t * LDI + s] = 0.f;
    }
    for (int s = 0; s < L; ++s) {
        float g[N / 32];
#pragma unroll
        for (int jj = 0; jj < N / 32; ++jj) g[jj] = 0.f;
        for (int t = s; t < L; ++t) {
            float part = 0.f;
#pragma unroll
            for (int jj = 0; jj < N / 32; ++jj) {
                const int j = lane + 32 * jj;
                const float gq = gstep(g[jj], s, t, j);   // G(s, t)
                const float f = expf(strict ? g[jj] : gq);  // M: G(s, t-1)
                part = fmaf(x(t, j) * y(s, j), f, part);
                g[jj] = gq;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o, 32);
            if (lane == 0 && !(strict && t == s)) Im[t * LDI + s] = part;
        }
    }
}
}  // namespace wkv7

template <int N, int MODE> struct TcCfg {
    static constexpr int L = wkv7::TC_L;
    static constexpr bool TRANS = MODE == 1 || MODE == 3;   // segment transitions (2N-row states)
    static constexpr int R = TRANS ? 2 * N : N;         // state rows (MODE 2 / 3: the adjoint's rows)
    static constexpr int NW = R / 16 < 4 ? R / 16 : 4;  // warps
    static constexpr int NT = 32 * NW;                  // block size (= wkv7.py _tc_threads)
    static constexpr int RW = R / NW;                   // state rows (and U columns) per warp
    // token arrays [L][N + 8]: rows 8 mod 32 floats apart, conflict-free for pair loads along the channel (the
    // products over channels, rwkv::tc::*_pairs) and for fragment loads with the token as the k index
    static constexpr int LDA = N + 8;
    static constexpr int LDU = R + 8;
    static constexpr int LDI = 20;      // the 16 x 16 intra-chunk matrices
    static constexpr int A_ = L * LDA;
    // floats: Rg Ag Bi Ki LW Braw Kraw V Bg Kg [L][LDA]; U [L][LDU]; I [4][L][LDI]; gam [N].  The state is in
    // registers (each warp's rows as mma accumulators), not here.
    static constexpr int O_RG = 0, O_AG = A_, O_BI = 2 * A_, O_KI = 3 * A_, O_LW = 4 * A_, O_B = 5 * A_,
                         O_K = 6 * A_, O_V = 7 * A_, O_BG = 8 * A_, O_KG = 9 * A_, O_U = 10 * A_,
                         O_I = O_U + L * LDU, O_GAM = O_I + 4 * L * LDI;
    static constexpr int SMEM_FLOATS = O_GAM + N;       // = wkv7.py _tc_smem
    static constexpr int NCH = L * N / 8;               // 8-element input chunks per array per chunk
    static constexpr int CPA = (NCH + NT - 1) / NT;
    static_assert(N == 32 || N == 64, "chunked forward: N = 32 or 64");
    static_assert(RW % 16 == 0 && RW <= 32 && (TRANS || RW == 16), "warp tiles");
};

template <typename T, int N, int MODE>
__global__ void __launch_bounds__(TcCfg<N, MODE>::NT) wkv7_tc_chunk(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
    int T_len, int H, int seg_len, int nseg,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    float* __restrict__ ckpt, float* segbuf, int vec) {
    using C = TcCfg<N, MODE>;
    using namespace rwkv::tc;   // LDSM = false below: a latency-bound chain (see mma_strip_scaled)
    constexpr int L = C::L, R = C::R, NT = C::NT, RW = C::RW, LDA = C::LDA, LDU = C::LDU,
                  LDI = C::LDI, CPA = C::CPA, NCH = C::NCH, N8 = N / 8, NTL = N / 16, RT = RW / 16;
    constexpr bool SPLIT = is_f32<T>::value;
    extern __shared__ __align__(16) float smem[];
    float* sRg = smem + C::O_RG;  float* sAg = smem + C::O_AG;  float* sBi = smem + C::O_BI;
    float* sKi = smem + C::O_KI;  float* sLW = smem + C::O_LW;  float* sB = smem + C::O_B;
    float* sK = smem + C::O_K;    float* sV = smem + C::O_V;    float* sBg = smem + C::O_BG;
    float* sKg = smem + C::O_KG;  float* sU = smem + C::O_U;
    float* sI = smem + C::O_I;    float* sGam = smem + C::O_GAM;

    constexpr bool REV = MODE >= 2;     // the reverse-time adjoint passes
    constexpr bool TRANS = C::TRANS;    // segment transition: rows N..2N-1 start at the identity, no dy / v
    const int tid = threadIdx.x, q = tid / 32, lane = tid % 32;
    const int h = blockIdx.x % H;
    const int seg = (blockIdx.x / H) % nseg;
    const int sq = blockIdx.x / (H * nseg);
    const long long start = (long long)sq * T_len + (long long)seg * seg_len;   // first token of the segment
    const int len = min(seg_len, T_len - seg * seg_len);
    const bool vv = vec != 0;
    float* seg_state = segbuf != nullptr ? segbuf + ((long long)blockIdx.x * 2) * N * N : nullptr;   // [A; M]

    // ---- initial state (each warp its own rows)
    long long slot = -1;
    const float* src = nullptr;
    if (!TRANS) {
        if (nseg == 1) {
            slot = rwkv::state_slot(state_idx, sq, pool_size, err);
            if (state_in != nullptr && slot >= 0) src = state_in + (slot * H + h) * (long long)(N * N);
        } else {
            src = seg_state;
        }
    }
    // The warp's state rows q*RW + 16 rt + (0..15) as RT strips of NTL accumulator tiles (columns j): element
    // (acc_row(e), 16 n + acc_col(e)) of strip rt in S[rt][n][e].  Kept in registers for the whole segment: the
    // products with S^T take them as B fragments (mma_tile_acc_t), the update accumulates onto them.
    float S[RT][NTL][8];
    // this lane's pairs of S (e even: columns acc_col(e), acc_col(e) + 1) from or to global memory (row-major N x N)
    auto pair_at = [&](int rt, int n, int e, int& i, int& j) {
        i = q * RW + 16 * rt + acc_row(e);
        j = 16 * n + acc_col(e);
    };
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int n = 0; n < NTL; ++n)
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                int i, j;
                pair_at(rt, n, e, i, j);
                float2 x = make_float2(0.f, 0.f);
                if (TRANS) x = make_float2(i - N == j ? 1.f : 0.f, i - N == j + 1 ? 1.f : 0.f);
                else if (src != nullptr) x = *reinterpret_cast<const float2*>(src + (long long)i * N + j);
                S[rt][n][e] = x.x;
                S[rt][n][e + 1] = x.y;
            }
    auto store_state = [&](float* dst) {
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int n = 0; n < NTL; ++n)
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    int i, j;
                    pair_at(rt, n, e, i, j);
                    *reinterpret_cast<float2*>(dst + (long long)i * N + j) = make_float2(S[rt][n][e], S[rt][n][e + 1]);
                }
    };

    const T* const ins[6] = {r, w, k, v, a, b};
    float* const dst_of[6] = {sRg, sLW, sK, sV, sAg, sB};
    wkv7::Chunk8<T> pre[6][CPA];
    auto load = [&](int t0) {
#pragma unroll
        for (int jj = 0; jj < CPA; ++jj) {
            const int e = tid + NT * jj, t = e / N8;
            if ((NCH % NT == 0 || e < NCH) && t0 + t < len) {
                const long long o = ((start + t0 + t) * H + h) * N + 8 * (e % N8);
#pragma unroll
                for (int arr = 0; arr < 6; ++arr) pre[arr][jj].load(ins[arr] + o, vv);
            }
        }
    };
    auto stage = [&](int t0) {
#pragma unroll
        for (int jj = 0; jj < CPA; ++jj) {
            const int e = tid + NT * jj, t = e / N8, col = 8 * (e % N8);
            if (NCH % NT == 0 || e < NCH) {
                const bool in = t0 + t < len;   // padding tokens: all zero (decay 1, no contribution)
#pragma unroll
                for (int arr = 0; arr < 6; ++arr) {
                    float f[8];
                    pre[arr][jj].get(f);
#pragma unroll
                    for (int z = 0; z < 8; ++z) f[z] = in ? (arr == 1 ? -expf(f[z]) : f[z]) : 0.f;
                    float* d = dst_of[arr] + t * LDA + col;
                    *reinterpret_cast<float4*>(d) = make_float4(f[0], f[1], f[2], f[3]);
                    *reinterpret_cast<float4*>(d + 4) = make_float4(f[4], f[5], f[6], f[7]);
                }
            }
        }
    };

    const int nchunks = (len + L - 1) / L;
    if (nchunks > 0) load(REV ? (nchunks - 1) * L : 0);
    for (int ci = 0; ci < nchunks; ++ci) {
        const int c = REV ? nchunks - 1 - ci : ci;
        const int t0 = c * L;
        // the state before this chunk (own rows) = checkpoint; MODE 2: the adjoint after the chunk's last token
        // (w.r.t. the state the chunk ends with, everything later included)
        if (!TRANS && ckpt != nullptr) {
            const long long cs = rwkv::chunk_slot(nullptr, T_len, sq, 0, WKV7_CK, (seg * seg_len + t0) / WKV7_CK);
            store_state(ckpt + ((cs * H + h) * N) * (long long)N);
        }
        __syncthreads();   // (B1) the previous chunk is done with the token matrices
        stage(t0);
        if (ci + 1 < nchunks) load(REV ? t0 - L : t0 + L);
        __syncthreads();   // (B2) staged
        // ---- decays, per channel j: prefix role (A_g, R_g in place; Bi, Ki; gamma; safety) / suffix role (B_g, K_g)
        int bad = 0;   // a channel of this chunk decays below exp(-TC_SAFE_SPAN) (or is NaN)
        for (int e = tid; e < 2 * N; e += NT) {
            const int j = e % N;
            float g = 0.f;
            if (e < N) {
                float ex = 1.f;                         // exp(G(-1, t-1)): the previous token's exp(G(-1, t))
#pragma unroll 4
                for (int t = 0; t < L; ++t) {
                    g += sLW[t * LDA + j];              // G(-1, t)
                    const float eg = expf(g);
                    sAg[t * LDA + j] *= ex;
                    sRg[t * LDA + j] *= eg;
                    const float inv = expf(-g);         // overflows only in unsafe chunks (then unused)
                    sBi[t * LDA + j] = sB[t * LDA + j] * inv;
                    sKi[t * LDA + j] = sK[t * LDA + j] * inv;
                    ex = eg;
                }
                sGam[j] = ex;
                if (!(g >= -wkv7::TC_SAFE_SPAN)) bad = 1;
            } else {
#pragma unroll 4
                for (int t = L - 1; t >= 0; --t) {      // g = G(t, L-1)
                    const float f = expf(g);
                    sBg[t * LDA + j] = sB[t * LDA + j] * f;
                    sKg[t * LDA + j] = sK[t * LDA + j] * f;
                    g += sLW[t * LDA + j];
                }
            }
        }
        const bool unsafe = __syncthreads_or(bad) != 0;   // (B3)
        // ---- intra-chunk matrices: m = 0 M_ab, 1 M_ak (strictly lower), 2 Q_ab, 3 Q_ak (lower)
        for (int m = q; m < 4; m += C::NW) {
            if (REV && (m & 1)) continue;   // the adjoint needs M_ab and Q_ab only
            float* Im = sI + m * L * LDI;
            const bool strict = m < 2;
            if (!unsafe) {
                float acc[1][8];
                zero(acc[0]);
                mma_strip_pairs<SPLIT, 1>(acc, m < 2 ? sAg : sRg, LDA, (m & 1) ? sKi : sBi, LDA, N);
#pragma unroll
                for (int rr = 0; rr < 8; ++rr) {
                    const int t = acc_row(rr), s = acc_col(rr);
                    Im[t * LDI + s] = (strict ? s < t : s <= t) ? acc[0][rr] : 0.f;
                }
            } else {
                // x from global memory (a or r), y from the staged b or k, the log decays staged
                const T* xs = m < 2 ? a : r;
                const float* ys = (m & 1) ? sK : sB;
                wkv7::intra_pairwise<L, N, LDI>(
                    Im, strict, lane,
                    [&](float g, int s, int t, int j) { return t > s ? g + sLW[t * LDA + j] : 0.f; },
                    [&](int t, int j) {
                        return t0 + t < len ? rwkv::to_float(xs[((start + t0 + t) * H + h) * N + j]) : 0.f;
                    },
                    [&](int s, int j) { return ys[s * LDA + j]; });
            }
        }
        __syncthreads();   // (B4)
        const float* Mab = sI;
        const float* Mak = sI + 1 * L * LDI;
        const float* Qab = sI + 2 * L * LDI;
        const float* Qak = sI + 3 * L * LDI;
        // ---- X = A_g S^T + M_ak V (own columns), into sU.  MODE 2 (X: the adjoint, V: dy): B_g X^T + Q_ab^T dY
#pragma unroll
        for (int rt = 0; rt < RW / 16; ++rt) {
            const int base = q * RW + 16 * rt;
            float acc[8];
            zero(acc);
            mma_tile_acc_t<SPLIT>(acc, REV ? sBg : sAg, LDA, S[rt]);
            if (base < N) {
                if (REV) mma_tile<true, false, SPLIT, false>(acc, Qab, LDI, sV + base, LDA, L);
                else mma_tile<false, false, SPLIT, false>(acc, Mak, LDI, sV + base, LDA, L);
            }
            store_tile(sU + base, LDU, acc);
        }
        __syncwarp();
        {   // ---- U = (I - M_ab)^{-1} X: forward substitution per column, fp32 (lanes >= RW duplicate lane % RW)
            const int col = q * RW + lane % RW;
            float u[L];
#pragma unroll
            for (int t = 0; t < L; ++t) u[t] = sU[t * LDU + col];
            if (REV) {   // Z = (I - M_ab^T)^{-1} X: back substitution
                wkv7::back_subst<L, LDI>(u, Mab);
            } else {
                wkv7::forward_subst<L, LDI>(u, Mab);
            }
            __syncwarp();
            if (lane < RW) {
#pragma unroll
                for (int t = 0; t < L; ++t) sU[t * LDU + col] = u[t];
            }
        }
        __syncwarp();
        // ---- Y = R_g S^T + Q_ab U + Q_ak V (MODE 0: one 16-column tile per warp), from the state before the update
        float yacc[8];
        if (MODE == 0) {
            const int base = q * RW;
            zero(yacc);
            mma_tile_acc_t<SPLIT>(yacc, sRg, LDA, S[0]);
            mma_tile<false, false, SPLIT, false>(yacc, Qab, LDI, sU + base, LDU, L);
            mma_tile<false, false, SPLIT, false>(yacc, Qak, LDI, sV + base, LDA, L);
        }
        __syncwarp();
        // ---- S' = S diag(gamma) + U^T B_g + V^T K_g (own rows).  MODE 2: X' = X diag(gamma) + Z^T A_g + dY^T R_g
        // (the N/16 column tiles of a row block as one strip: the A fragments of U^T and V^T loaded once), onto
        // the registers
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
            const int base = q * RW + 16 * rt;
#pragma unroll
            for (int n = 0; n < NTL; ++n)
#pragma unroll
                for (int rr = 0; rr < 8; ++rr) S[rt][n][rr] *= sGam[16 * n + acc_col(rr)];
            if (REV) {
                mma_strip<true, false, SPLIT, NTL, false>(S[rt], sU + base, LDU, sAg, LDA, L);
                if (base < N) mma_strip<true, false, SPLIT, NTL, false>(S[rt], sV + base, LDA, sRg, LDA, L);
            } else {
                mma_strip<true, false, SPLIT, NTL, false>(S[rt], sU + base, LDU, sBg, LDA, L);
                if (base < N) mma_strip<true, false, SPLIT, NTL, false>(S[rt], sV + base, LDA, sKg, LDA, L);
            }
        }
        if (MODE == 0) {   // y through the warp's own U columns (no longer needed): lane -> 8 values of a token
            const int base = q * RW;
            __syncwarp();
            store_tile(sU + base, LDU, yacc);
            __syncwarp();
            const int t = lane / 2, i = base + 8 * (lane % 2);
            if (t0 + t < len) {
                float f[8];
#pragma unroll
                for (int m = 0; m < 8; ++m) f[m] = sU[t * LDU + i + m];
                wkv7::Chunk8<T>::store(y + ((start + t0 + t) * H + h) * N + i, f, vv);
            }
        }
    }
    // ---- results (own rows)
    float* out = nullptr;
    if (TRANS) out = seg_state;
    else if (nseg == 1 && state_out != nullptr && slot >= 0) out = state_out + (slot * H + h) * (long long)(N * N);
    if (out != nullptr) store_state(out);
}

// Scan over segments: grid num * H * (N / 16), block 256; block (sequence sq, head h, rows 16*rb ..) carries its 16
// state rows through S <- S M_g + A_g (segbuf [num][nseg][H][2][N][N], part 0 = A_g, part 1 = M_g), writing the
// start state of segment g over A_g.  Start: state_in at the sequence's pool slot (or zeros); end: state_out.
// rev = 1 (the adjoint): segments in reverse order (g = nseg-1 .. 0), "start" = the adjoint at the segment's end.
template <int N>
__global__ void __launch_bounds__(256) wkv7_tc_scan(
    float* segbuf, int nseg, int H, const float* state_in, float* state_out, const int* state_idx, int pool_size,
    int* err, int rev) {
    constexpr int RB = 16, NR = N / RB, PT = RB * N / 256, MT = N * N / 256;
    __shared__ __align__(16) float sM[N * N];
    __shared__ __align__(16) float sS[RB * N];
    const int tid = threadIdx.x;
    const int rb = blockIdx.x % NR, h = (blockIdx.x / NR) % H, sq = blockIdx.x / (NR * H);
    const long long slot = rwkv::state_slot(state_idx, sq, pool_size, err);
    const long long rows = (long long)rb * RB * N;   // offset of the block's rows inside an N x N matrix
    float s[PT], pa[PT], pm[MT];
#pragma unroll
    for (int m = 0; m < PT; ++m)
        s[m] = (state_in != nullptr && slot >= 0) ? state_in[(slot * H + h) * (long long)(N * N) + rows + tid + 256 * m] : 0.f;
    auto seg_ptr = [&](int g) { return segbuf + (((long long)sq * nseg + g) * H + h) * 2 * N * N; };
    auto fetch = [&](int g) {
        const float* p = seg_ptr(g);
#pragma unroll
        for (int m = 0; m < PT; ++m) pa[m] = p[rows + tid + 256 * m];
#pragma unroll
        for (int m = 0; m < MT; ++m) pm[m] = p[N * N + tid + 256 * m];
    };
    fetch(rev ? nseg - 1 : 0);
    for (int gi = 0; gi < nseg; ++gi) {
        const int g = rev ? nseg - 1 - gi : gi;
        float* p = seg_ptr(g);
#pragma unroll
        for (int m = 0; m < PT; ++m) {
            p[rows + tid + 256 * m] = s[m];   // start state of segment g (over A_g, already fetched)
            sS[tid + 256 * m] = s[m];
            s[m] = pa[m];
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) sM[tid + 256 * m] = pm[m];
        __syncthreads();
        if (gi + 1 < nseg) fetch(rev ? g - 1 : g + 1);
#pragma unroll
        for (int m = 0; m < PT; ++m) {
            const int e = tid + 256 * m, i = e / N, j = e % N;
            float acc0 = s[m], acc1 = 0.f;
#pragma unroll 8
            for (int kk = 0; kk < N; kk += 2) {
                acc0 = fmaf(sS[i * N + kk], sM[kk * N + j], acc0);
                acc1 = fmaf(sS[i * N + kk + 1], sM[(kk + 1) * N + j], acc1);
            }
            s[m] = acc0 + acc1;
        }
        __syncthreads();
    }
    if (state_out != nullptr && slot >= 0) {
#pragma unroll
        for (int m = 0; m < PT; ++m) state_out[(slot * H + h) * (long long)(N * N) + rows + tid + 256 * m] = s[m];
    }
}

// ------------------------------------------------------------------------------------------------ chunked forward, WY form
//
// wkv7_tc_wy<T, N, MODE> (16-bit I/O, N = 32 or 64): the four passes of wkv7_tc_chunk (same arguments, same
// results up to rounding) with everything that does not depend on the carried state moved off the serial chain.
// In a chunk (notation of the chunked forward above; P = (I - M_ab)^{-1}):
//   U = W S^T + U0,  Y = Rt S^T + Y0,  S' = S diag(gamma) + U^T B_g + V^T K_g,   with
//   W = P A_g,  U0 = P M_ak V,  Rt = R_g + Q_ab W,  Y0 = Q_ab U0 + Q_ak V      (state-independent, per chunk).
// The adjoint (MODE 2 / 3) is the same chain with W = P^T B_g, U0 = P^T Q_ab^T dY, B_g -> A_g, V -> dY, K_g -> R_g
// (no outputs).  A block is warp-specialized:
//   consumer warps: warp q owns RW = 16 (MODE 0 / 2) or 32 (the 2N-row transitions) state rows as mma accumulator
//     fragments in registers (S never goes to shared memory); per chunk U^T = S W^T + U0^T and Y^T = S Rt^T + Y0^T
//     (S's accumulator fragments are the A operands directly: the k index (key channel j) is permuted within each
//     8-step, k = c <-> j = 2c and k = c + 4 <-> j = 2c + 1), then S' = S diag(gamma) + U^T B_g + V^T K_g (U^T's
//     fragments again the A operands, the token index permuted the same way).  64 mma per 16 rows and chunk
//     (N = 64) and no block barrier: the chain is a few mma latencies per chunk.
//   producer warps (2N threads: one per (role, channel)): per chunk, the decays (prefix role: A_g, R_g, Bi, Ki,
//     gamma; suffix role: B_g, K_g), the intra-chunk matrices (factorized on tensor cores or, for chunks with a
//     strong decay, pairwise, as wkv7_tc_chunk), the 16 x 16 factors P, P M_ak, Q_ab P by column solves in fp32,
//     then per warp 16 channels of W, Rt, U0, Y0 on tensor cores (3xTF32), written into one of two stages in shared
//     memory (the consumers' operands pre-rounded to TF32).  Inputs arrive by cp.async one chunk ahead.
// Hand-over: one block-wide named barrier FULL per chunk (the producers reach it with chunk ci staged, the consumers
// with chunk ci-1 done), so the producers work on chunk ci+1 while the consumers run chunk ci; the producers
// synchronize among themselves on PROD.  Stage layouts avoid bank conflicts by xor swizzles: [t][j] arrays
// (W, Rt) at t*N + (j ^ 8(t&3)); [i][t] arrays (U0^T, Y0^T, V^T, Bo^T, Ko^T) at i*16 + (t ^ 8((i>>1)&1)).
namespace wkv7 {

__device__ __forceinline__ unsigned f2u(float x) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(x);
#else
    unsigned u;
    __builtin_memcpy(&u, &x, 4);
    return u;
#endif
}
__device__ __forceinline__ float tf32r(float x) { return rwkv::tc::tf32_value(rwkv::tc::to_tf32(x)); }

// Named barriers (bar.sync with a thread count; id 0 is __syncthreads').  Host compilers
// (the CPU emulation in tests/) provide rwkv_emu_bar_* instead.
__device__ __forceinline__ void nb_sync(int id, int n) {
#ifdef __CUDA_ARCH__
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(n) : "memory");
#else
    rwkv_emu_bar_sync(id, n);
#endif
}
// 16-byte global -> shared copy (cp.async, sm_80+), zero-filled when !full; cp_wait: this thread's copies landed.
__device__ __forceinline__ void cp16z(void* dst, const void* src, bool full) {
#ifdef __CUDA_ARCH__
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(full ? 16 : 0) : "memory");
#else
    if (full) __builtin_memcpy(dst, src, 16);
    else __builtin_memset(dst, 0, 16);
#endif
}
__device__ __forceinline__ void cp_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Stage swizzles (see above)
__device__ __forceinline__ int swz_tj(int t, int j) { return j ^ (8 * (t & 3)); }
__device__ __forceinline__ int swz_it(int i, int t) { return t ^ (8 * ((i >> 1) & 1)); }

}  // namespace wkv7

template <int N, int MODE> struct WyCfg {
    static constexpr int L = wkv7::TC_L;
    static constexpr bool TRANS = MODE == 1 || MODE == 3;   // segment transitions (2N-row states)
    static constexpr bool REV = MODE >= 2;                  // the adjoint, chunks in reverse order
    static constexpr bool YOUT = MODE == 0;                 // outputs y (and needs Rt, Y0)
    static constexpr int R = TRANS ? 2 * N : N;             // chain rows
    static constexpr int RW = TRANS ? 32 : 16;              // rows per consumer warp
    static constexpr int RB = RW / 16;                      // 16-row blocks per consumer warp
    static constexpr int NC = R / RW;                       // consumer warps
    static constexpr int NP = 2 * N;                        // producer threads (prefix and suffix role per channel)
    static constexpr int NPW = NP / 32;                     // producer warps
    static constexpr int NT = 32 * NC + NP;                 // block size (= wkv7.py _wy_threads)
    static constexpr int NJ = N / 8;                        // 8-column tiles of a state row block
    static constexpr int LDA = N + 4;                       // producer token arrays [L][LDA] (mma operands)
    static constexpr int LDI = 20;                          // the 16 x 16 intra-chunk matrices
    // stage (floats): W [L][N], Rt [L][N] (MODE 0), U0^T [N][L], Y0^T [N][L] (MODE 0), V^T [N][L], Bo^T [N][L],
    // Ko^T [N][L], gamma [N]
    static constexpr int S_W = 0, S_RT = L * N, S_U0 = S_RT + (YOUT ? L * N : 0), S_Y0 = S_U0 + N * L,
                         S_V = S_Y0 + (YOUT ? N * L : 0), S_BO = S_V + N * L, S_KO = S_BO + N * L,
                         S_GAM = S_KO + N * L, STAGE = S_GAM + N;
    // two stages; raw 16-bit inputs [2][6][L][N]; Ag Rg Bi Ki(MODE 2/3: B_g) [L][LDA]; intra-chunk matrices
    // [4][L][LDI]; P, PM, QP [3][L][LDI]; the strong-decay flags of the two chunks in flight [2] (int, padded to
    // 4); y staging per consumer warp [L][16] (16-bit)
    static constexpr int O_RAW = 2 * STAGE, O_AG = O_RAW + 6 * L * N, O_RG = O_AG + L * LDA, O_BI = O_RG + L * LDA,
                         O_KI = O_BI + L * LDA, O_I = O_KI + L * LDA, O_P = O_I + 4 * L * LDI,
                         O_F = O_P + 3 * L * LDI, O_Y = O_F + 4,
                         SMEM_FLOATS = O_Y + (YOUT ? NC * L * 8 : 0);   // = wkv7.py _wy_smem
    static constexpr int BAR_FULL = 1, BAR_PROD = 2;
    static_assert(N == 32 || N == 64, "chunked forward (WY): N = 32 or 64");
    static_assert(L * N / 8 == NP, "one 8-element input piece per producer thread and array");
    static_assert(NT <= 256, "two blocks per SM");
    static_assert(STAGE % 4 == 0 && (L * LDA) % 4 == 0, "16-byte aligned regions");
};

template <typename T, int N, int MODE>
__global__ void __launch_bounds__(WyCfg<N, MODE>::NT, 2) wkv7_tc_wy(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
    int T_len, int H, int seg_len, int nseg,
    const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
    float* __restrict__ ckpt, float* segbuf, int vec) {
    using C = WyCfg<N, MODE>;
    using namespace rwkv::tc;
    constexpr int L = C::L, RB = C::RB, NC = C::NC, NP = C::NP, NPW = C::NPW, NT = C::NT, NJ = C::NJ,
                  LDA = C::LDA, LDI = C::LDI, N8 = N / 8;
    constexpr bool TRANS = C::TRANS, REV = C::REV, YOUT = C::YOUT;
    extern __shared__ __align__(16) float smem[];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int h = blockIdx.x % H;
    const int seg = (blockIdx.x / H) % nseg;
    const int sq = blockIdx.x / (H * nseg);
    const long long start = (long long)sq * T_len + (long long)seg * seg_len;   // first token of the segment
    const int len = min(seg_len, T_len - seg * seg_len);
    const int nchunks = (len + L - 1) / L;
    float* seg_state = segbuf != nullptr ? segbuf + ((long long)blockIdx.x * 2) * N * N : nullptr;   // [A; M]

    if (warp < NC) {
        // ================================================================ consumers: the chain over the chunks
        const int g = lane / 4, c = lane % 4;
        const int base0 = C::RW * warp;
        const bool hasv = base0 < N;   // rows with v (TRANS: rows N.. start at the identity, without v)
        float s[RB][NJ][4];            // s[rb][n][2*hr + e] = S(base0 + 16 rb + g + 8 hr, 8n + 2c + e)
        long long slot = -1;
        const float* src = nullptr;
        if (!TRANS) {
            if (nseg == 1) {
                slot = rwkv::state_slot(state_idx, sq, pool_size, err);
                if (state_in != nullptr && slot >= 0) src = state_in + (slot * H + h) * (long long)(N * N);
            } else {
                src = seg_state;
            }
        }
#pragma unroll
        for (int rb = 0; rb < RB; ++rb)
#pragma unroll
            for (int n = 0; n < NJ; ++n)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int i = base0 + 16 * rb + g + 8 * hr, j = 8 * n + 2 * c;
                    float2 x = make_float2(0.f, 0.f);
                    if (TRANS) {
                        x.x = (i - N == j) ? 1.f : 0.f;
                        x.y = (i - N == j + 1) ? 1.f : 0.f;
                    } else if (src != nullptr) {
                        x = *reinterpret_cast<const float2*>(src + (long long)i * N + j);
                    }
                    s[rb][n][2 * hr] = x.x;
                    s[rb][n][2 * hr + 1] = x.y;
                }
        auto store_state = [&](float* dst) {
#pragma unroll
            for (int rb = 0; rb < RB; ++rb)
#pragma unroll
                for (int n = 0; n < NJ; ++n)
#pragma unroll
                    for (int hr = 0; hr < 2; ++hr)
                        *reinterpret_cast<float2*>(dst + (long long)(base0 + 16 * rb + g + 8 * hr) * N + 8 * n + 2 * c) =
                            make_float2(s[rb][n][2 * hr], s[rb][n][2 * hr + 1]);
        };
        T* ybuf = reinterpret_cast<T*>(smem + C::O_Y) + warp * L * 16;
        for (int ci = 0; ci < nchunks; ++ci) {
            const int cc = REV ? nchunks - 1 - ci : ci;
            const int t0 = cc * L, st = ci & 1;
            if (!TRANS && ckpt != nullptr) {   // MODE 0: the state before the chunk; MODE 2: the adjoint after it
                const long long cs = rwkv::chunk_slot(nullptr, T_len, sq, 0, WKV7_CK, (seg * seg_len + t0) / WKV7_CK);
                store_state(ckpt + ((cs * H + h) * N) * (long long)N);
            }
            const float* stg = smem + st * C::STAGE;
            wkv7::nb_sync(C::BAR_FULL, NT);   // chunk ci staged (and the producers move on to chunk ci+1)
            // ---- U^T = S W^T + U0^T, Y^T = S Rt^T + Y0^T (per 16-row block: 16 rows x 16 tokens)
            float u[RB][2][4], yy[2][4];
#pragma unroll
            for (int rb = 0; rb < RB; ++rb)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int hr = 0; hr < 2; ++hr) {
                        const int i = base0 + 16 * rb + g + 8 * hr, t = 8 * hh + 2 * c;
                        float2 x = make_float2(0.f, 0.f), z = make_float2(0.f, 0.f);
                        if (hasv) x = *reinterpret_cast<const float2*>(stg + C::S_U0 + i * L + wkv7::swz_it(i, t));
                        if (YOUT) z = *reinterpret_cast<const float2*>(stg + C::S_Y0 + i * L + wkv7::swz_it(i, t));
                        u[rb][hh][2 * hr] = x.x; u[rb][hh][2 * hr + 1] = x.y;
                        if (YOUT) { yy[hh][2 * hr] = z.x; yy[hh][2 * hr + 1] = z.y; }
                    }
#pragma unroll
            for (int n = 0; n < NJ; ++n) {
                unsigned bw[2][2], br[2][2];
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int t = 8 * hh + g, o = t * N + wkv7::swz_tj(t, 8 * n + 2 * c);
                    const float2 wv = *reinterpret_cast<const float2*>(stg + C::S_W + o);
                    bw[hh][0] = wkv7::f2u(wv.x); bw[hh][1] = wkv7::f2u(wv.y);
                    if (YOUT) {
                        const float2 rv = *reinterpret_cast<const float2*>(stg + C::S_RT + o);
                        br[hh][0] = wkv7::f2u(rv.x); br[hh][1] = wkv7::f2u(rv.y);
                    }
                }
#pragma unroll
                for (int rb = 0; rb < RB; ++rb) {
                    const unsigned af[4] = {to_tf32(s[rb][n][0]), to_tf32(s[rb][n][2]), to_tf32(s[rb][n][1]),
                                            to_tf32(s[rb][n][3])};
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        mma_m16n8k8(u[rb][hh], af, bw[hh]);
                        if (YOUT) mma_m16n8k8(yy[hh], af, br[hh]);
                    }
                }
            }
            // ---- S' = S diag(gamma) + U^T Bo + V^T Ko
#pragma unroll
            for (int n = 0; n < NJ; ++n) {
                const float2 gm = *reinterpret_cast<const float2*>(stg + C::S_GAM + 8 * n + 2 * c);
#pragma unroll
                for (int rb = 0; rb < RB; ++rb) {
                    s[rb][n][0] *= gm.x; s[rb][n][1] *= gm.y; s[rb][n][2] *= gm.x; s[rb][n][3] *= gm.y;
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int t = 8 * hh + 2 * c;
                unsigned av[RB][4], au[RB][4];
#pragma unroll
                for (int rb = 0; rb < RB; ++rb) {
                    if (hasv) {
                        const int i0 = base0 + 16 * rb + g, i1 = i0 + 8;
                        const float2 v0 = *reinterpret_cast<const float2*>(stg + C::S_V + i0 * L + wkv7::swz_it(i0, t));
                        const float2 v1 = *reinterpret_cast<const float2*>(stg + C::S_V + i1 * L + wkv7::swz_it(i1, t));
                        av[rb][0] = wkv7::f2u(v0.x); av[rb][1] = wkv7::f2u(v1.x);
                        av[rb][2] = wkv7::f2u(v0.y); av[rb][3] = wkv7::f2u(v1.y);
                    }
                    au[rb][0] = to_tf32(u[rb][hh][0]); au[rb][1] = to_tf32(u[rb][hh][2]);
                    au[rb][2] = to_tf32(u[rb][hh][1]); au[rb][3] = to_tf32(u[rb][hh][3]);
                }
#pragma unroll
                for (int n = 0; n < NJ; ++n) {
                    const int jr = 8 * n + g, o = jr * L + wkv7::swz_it(jr, t);
                    const float2 bv = *reinterpret_cast<const float2*>(stg + C::S_BO + o);
                    const unsigned bb[2] = {wkv7::f2u(bv.x), wkv7::f2u(bv.y)};
                    unsigned bk[2] = {0u, 0u};
                    if (hasv) {
                        const float2 kv = *reinterpret_cast<const float2*>(stg + C::S_KO + o);
                        bk[0] = wkv7::f2u(kv.x); bk[1] = wkv7::f2u(kv.y);
                    }
#pragma unroll
                    for (int rb = 0; rb < RB; ++rb) {
                        if (hasv) mma_m16n8k8(s[rb][n], av[rb], bk);
                        mma_m16n8k8(s[rb][n], au[rb], bb);
                    }
                }
            }
            if (YOUT) {   // y through the warp's staging tile, 16-byte stores of 8 values
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        ybuf[(8 * hh + 2 * c + (e & 1)) * 16 + g + 8 * (e >> 1)] = rwkv::from_float<T>(yy[hh][e]);
                __syncwarp();
                const int t = lane / 2, half = lane % 2;
                if (t0 + t < len)
                    *reinterpret_cast<uint4*>(y + ((start + t0 + t) * H + h) * N + base0 + 8 * half) =
                        *reinterpret_cast<const uint4*>(ybuf + t * 16 + 8 * half);
                __syncwarp();
            }
        }
        float* out = nullptr;
        if (TRANS) out = seg_state;
        else if (nseg == 1 && state_out != nullptr && slot >= 0) out = state_out + (slot * H + h) * (long long)(N * N);
        if (out != nullptr) store_state(out);
        return;
    }

    // ==================================================================== producers: the chunks' factors
    const int p = tid - 32 * NC;           // 0 .. 2N-1
    const int pw = p / 32;
    const bool pre = p < N;                // prefix role (A_g, R_g, Bi, Ki, gamma) of channel j; else suffix role
    const int j = pre ? p : p - N;
    T* sRaw = reinterpret_cast<T*>(smem + C::O_RAW);   // [buf][arr][t][N]: 0 r, 1 w, 2 k, 3 v (dy), 4 a, 5 b
    float* sAg = smem + C::O_AG;  float* sRg = smem + C::O_RG;  float* sBi = smem + C::O_BI;
    float* sKi = smem + C::O_KI;  float* sI = smem + C::O_I;
    float* sBg = sKi;             // MODE 2 / 3 (no K_i): B_g for W
    float* sP = smem + C::O_P;    float* sPM = sP + L * LDI;  float* sQP = sP + 2 * L * LDI;
    // chunk ci's "some channel decays below exp(-TC_SAFE_SPAN)" flag at sFlag[ci & 1]: set by atomicOr before P2,
    // read after it, cleared after P3 (an smem flag and plain barriers rather than bar.red, which
    // compute-sanitizer's racecheck does not order against the named barriers)
    int* sFlag = reinterpret_cast<int*>(smem + C::O_F);
    if (p < 2) sFlag[p] = 0;
    const float* Mab = sI;
    const float* Mak = sI + L * LDI;
    const float* Qab = sI + 2 * L * LDI;
    const float* Qak = sI + 3 * L * LDI;
    const bool vv = vec != 0;
    const T* const ins[6] = {r, w, k, v, a, b};
    auto needed = [](int arr) { return arr == 0 ? MODE != 1 : arr == 2 ? MODE < 2 : true; };
    const int pt = p / N8, pcol = 8 * (p % N8);   // this thread's 8-element piece of every array
    auto fetch = [&](int ci) {   // chunk ci's inputs into raw buffer ci & 1; padding tokens zero
        const int t0 = (REV ? nchunks - 1 - ci : ci) * L;
        const bool in = t0 + pt < len;
        const long long o = ((start + t0 + (in ? pt : 0)) * H + h) * N + pcol;
#pragma unroll
        for (int arr = 0; arr < 6; ++arr)
            if (needed(arr)) {
                T* d = sRaw + (((ci & 1) * 6 + arr) * L + pt) * N + pcol;
                if (vv) {
                    wkv7::cp16z(d, ins[arr] + o, in);
                } else {
                    wkv7::Chunk8<T> c8;
                    uint4 u4 = make_uint4(0u, 0u, 0u, 0u);
                    if (in) { c8.load(ins[arr] + o, false); u4 = c8.u; }
                    *reinterpret_cast<uint4*>(d) = u4;
                }
            }
    };
    if (nchunks > 0) fetch(0);
    for (int ci = 0; ci < nchunks; ++ci) {
        const int t0 = (REV ? nchunks - 1 - ci : ci) * L, st = ci & 1;
        const T* raw = sRaw + (st * 6) * L * N;
        auto rd = [&](int arr, int t, int col) { return rwkv::to_float(raw[(arr * L + t) * N + col]); };
        float* stg = smem + st * C::STAGE;
        wkv7::cp_wait();
        wkv7::nb_sync(C::BAR_PROD, NP);   // (P1) chunk ci's inputs landed; chunk ci-1's scratch no longer read
        if (ci + 1 < nchunks) fetch(ci + 1);
        // ---- decays of channel j (fast exponentials: their relative error, <= 2 + 1.2|x| ulp, is far below the
        // TF32 rounding of every product they enter).  Prefix role: A_g, R_g, Bi, Ki, gamma; suffix role: B_g, K_g.
        // The value column j (v, or dy in the adjoint) goes to V^T by the role that does not stage Bo^T / Ko^T.
        int bad = 0;
        if (pre) {
            float gs = 0.f, ex = 1.f, xa[4], xb[4];
#pragma unroll
            for (int t = 0; t < L; ++t) {
                gs += t0 + t < len ? -__expf(rd(1, t, j)) : 0.f;   // G(-1, t)
                const float e = __expf(gs);
                const float inv = __fdividef(1.f, e);   // unbounded only in unsafe chunks (then unused)
                const float ag = rd(4, t, j) * ex;      // ex = G(-1, t-1)
                const float rg = MODE != 1 ? rd(0, t, j) * e : 0.f;
                ex = e;
                sAg[t * LDA + j] = ag;
                if (MODE != 1) sRg[t * LDA + j] = rg;
                sBi[t * LDA + j] = rd(5, t, j) * inv;
                if (MODE < 2) sKi[t * LDA + j] = rd(2, t, j) * inv;
                if (REV) {   // Bo^T = A_g^T, Ko^T = R_g^T (row j)
                    xa[t & 3] = wkv7::tf32r(ag);
                    xb[t & 3] = wkv7::tf32r(rg);
                } else {     // V^T (row j)
                    xa[t & 3] = rd(3, t, j);
                }
                if ((t & 3) == 3) {
                    const int o = j * L + wkv7::swz_it(j, t - 3);
                    if (REV) {
                        *reinterpret_cast<float4*>(stg + C::S_BO + o) = make_float4(xa[0], xa[1], xa[2], xa[3]);
                        *reinterpret_cast<float4*>(stg + C::S_KO + o) = make_float4(xb[0], xb[1], xb[2], xb[3]);
                    } else {
                        *reinterpret_cast<float4*>(stg + C::S_V + o) = make_float4(xa[0], xa[1], xa[2], xa[3]);
                    }
                }
            }
            if (!(gs >= -wkv7::TC_SAFE_SPAN)) bad = 1;
            stg[C::S_GAM + j] = ex;
        } else {
            float gs = 0.f, xa[4], xb[4];
#pragma unroll
            for (int t = L - 1; t >= 0; --t) {   // gs = G(t, L-1)
                const float f = __expf(gs);
                const float bg = rd(5, t, j) * f;
                if (REV) {   // B_g for W; V^T = dY^T (row j)
                    sBg[t * LDA + j] = bg;
                    xa[t & 3] = rd(3, t, j);
                } else {     // Bo^T = B_g^T, Ko^T = K_g^T (row j)
                    xa[t & 3] = wkv7::tf32r(bg);
                    xb[t & 3] = wkv7::tf32r(rd(2, t, j) * f);
                }
                if ((t & 3) == 0) {
                    const int o = j * L + wkv7::swz_it(j, t);
                    if (REV) {
                        *reinterpret_cast<float4*>(stg + C::S_V + o) = make_float4(xa[0], xa[1], xa[2], xa[3]);
                    } else {
                        *reinterpret_cast<float4*>(stg + C::S_BO + o) = make_float4(xa[0], xa[1], xa[2], xa[3]);
                        *reinterpret_cast<float4*>(stg + C::S_KO + o) = make_float4(xb[0], xb[1], xb[2], xb[3]);
                    }
                }
                gs += t0 + t < len ? -__expf(rd(1, t, j)) : 0.f;
            }
        }
        if (bad) atomicOr(&sFlag[st], 1);
        wkv7::nb_sync(C::BAR_PROD, NP);   // (P2) token matrices staged
        const bool unsafe = sFlag[st] != 0;
        // ---- intra-chunk matrices: MODE 0: M_ab, M_ak, Q_ab, Q_ak; MODE 1: M_ab, M_ak; MODE 2/3: M_ab, Q_ab
        constexpr int NMAT = MODE == 0 ? 4 : 2;
        for (int mi = pw; mi < NMAT; mi += NPW) {
            const int m = MODE < 2 ? mi : 2 * mi;
            float* Im = sI + m * L * LDI;
            const bool strict = m < 2;
            if (!unsafe) {
                float acc[8];
                zero(acc);
                mma_tile<false, true, false>(acc, m < 2 ? sAg : sRg, LDA, (m & 1) ? sKi : sBi, LDA, N);
#pragma unroll
                for (int rr = 0; rr < 8; ++rr) {
                    const int t = acc_row(rr), s2 = acc_col(rr);
                    Im[t * LDI + s2] = (strict ? s2 < t : s2 <= t) ? acc[rr] : 0.f;
                }
            } else {
                // every operand from the raw 16-bit inputs, the log decays from w
                const int xs = m < 2 ? 4 : 0, ys = (m & 1) ? 2 : 5;
                wkv7::intra_pairwise<L, N, LDI>(
                    Im, strict, lane,
                    [&](float g, int s2, int t, int jc) {
                        const float lw = t0 + t < len ? -expf(rd(1, t, jc)) : 0.f;
                        return t > s2 ? g + lw : 0.f;
                    },
                    [&](int t, int jc) { return rd(xs, t, jc); }, [&](int s2, int jc) { return rd(ys, s2, jc); });
            }
        }
        wkv7::nb_sync(C::BAR_PROD, NP);   // (P3) the intra-chunk matrices ready; the flag read by all
        if (p == 0) sFlag[st] = 0;
        // ---- 16 x 16 factors by column solves in fp32, 16 lanes each: P = (I - M_ab)^{-1}; PM = P M_ak (MODE 0/1);
        // QP = Q_ab P (MODE 0/2/3, row by row: QP^T = (I - M_ab^T)^{-1} Q_ab^T)
        {
            const int task = p / 16, cc = p % 16;
            const int kind = task == 0 ? 0 : task == 1 ? (MODE < 2 ? 1 : 2) : (MODE == 0 && task == 2) ? 2 : -1;
            if (kind >= 0) {
                float u[L];
#pragma unroll
                for (int t = 0; t < L; ++t)
                    u[t] = kind == 0 ? (t == cc ? 1.f : 0.f) : kind == 1 ? Mak[t * LDI + cc] : Qab[cc * LDI + t];
                if (kind == 2) {
                    wkv7::back_subst<L, LDI>(u, Mab);
#pragma unroll
                    for (int t = 0; t < L; ++t) sQP[cc * LDI + t] = u[t];
                } else {
                    wkv7::forward_subst<L, LDI>(u, Mab);
                    float* dst = kind == 0 ? sP : sPM;
#pragma unroll
                    for (int t = 0; t < L; ++t) dst[t * LDI + cc] = u[t];
                }
            }
        }
        wkv7::nb_sync(C::BAR_PROD, NP);   // (P4) the factors ready
        // ---- warp pw: channels J .. J+15 of every stage matrix, on tensor cores (3xTF32: fp32-accurate products)
        {
            const int g = lane / 4, c4 = lane % 4, J = 16 * pw;
            {   // W = P A_g (MODE 0/1) or P^T B_g (MODE 2/3), Rt = R_g + QP A_g (MODE 0): rows t, columns j
                float wacc[8], racc[8];
                zero(wacc);
                mma_tile<REV, false, true>(wacc, sP, LDI, (REV ? sBg : sAg) + J, LDA, L);
                if (YOUT) {
                    load_tile(racc, sRg + J, LDA);
                    mma_tile<false, false, true>(racc, sQP, LDI, sAg + J, LDA, L);
                }
#pragma unroll
                for (int rr = 0; rr < 8; ++rr) {
                    const int t = acc_row(rr), o = t * N + wkv7::swz_tj(t, J + acc_col(rr));
                    stg[C::S_W + o] = wkv7::tf32r(wacc[rr]);
                    if (YOUT) stg[C::S_RT + o] = wkv7::tf32r(racc[rr]);
                }
            }
            // U0^T = V^T PM^T (MODE 0/1) or dY^T QP (MODE 2/3); Y0^T = V^T Q_ak^T + U0^T Q_ab^T (MODE 0): rows i
            // (value channels J..), columns t; V^T (16-bit values) is exact in TF32
            float u0[2][4], y0[2][4];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int e = 0; e < 4; ++e) { u0[hh][e] = 0.f; y0[hh][e] = 0.f; }
#pragma unroll
            for (int k0 = 0; k0 < L; k0 += 8) {
                unsigned av[4];
#pragma unroll
                for (int rr = 0; rr < 4; ++rr) av[rr] = to_tf32(rd(3, k0 + c4 + 4 * (rr / 2), J + g + 8 * (rr % 2)));
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int t = 8 * hh + g;
                    unsigned bh[2], bl[2], qh[2], ql[2];
#pragma unroll
                    for (int rr = 0; rr < 2; ++rr) {
                        const int s2 = k0 + c4 + 4 * rr;
                        split<true>(REV ? sQP[s2 * LDI + t] : sPM[t * LDI + s2], bh[rr], bl[rr]);
                        if (YOUT) split<true>(Qak[t * LDI + s2], qh[rr], ql[rr]);
                    }
                    mma_m16n8k8(u0[hh], av, bl);
                    mma_m16n8k8(u0[hh], av, bh);
                    if (YOUT) {
                        mma_m16n8k8(y0[hh], av, ql);
                        mma_m16n8k8(y0[hh], av, qh);
                    }
                }
            }
            if (YOUT) {   // + U0^T Q_ab^T: U0^T's accumulators as the A operand (token index permuted as above)
#pragma unroll
                for (int hs = 0; hs < 2; ++hs) {
                    unsigned ah[4], al[4];
                    split<true>(u0[hs][0], ah[0], al[0]); split<true>(u0[hs][2], ah[1], al[1]);
                    split<true>(u0[hs][1], ah[2], al[2]); split<true>(u0[hs][3], ah[3], al[3]);
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const float2 q = *reinterpret_cast<const float2*>(Qab + (8 * hh + g) * LDI + 8 * hs + 2 * c4);
                        unsigned bh[2], bl[2];
                        split<true>(q.x, bh[0], bl[0]);
                        split<true>(q.y, bh[1], bl[1]);
                        mma_m16n8k8(y0[hh], al, bh);
                        mma_m16n8k8(y0[hh], ah, bl);
                        mma_m16n8k8(y0[hh], ah, bh);
                    }
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {
                    const int i = J + g + 8 * hr, o = i * L + wkv7::swz_it(i, 8 * hh + 2 * c4);
                    *reinterpret_cast<float2*>(stg + C::S_U0 + o) = make_float2(u0[hh][2 * hr], u0[hh][2 * hr + 1]);
                    if (YOUT)
                        *reinterpret_cast<float2*>(stg + C::S_Y0 + o) = make_float2(y0[hh][2 * hr], y0[hh][2 * hr + 1]);
                }
        }
        wkv7::nb_sync(C::BAR_FULL, NT);   // stage st holds chunk ci; the consumers are done with chunk ci-1
    }
}

// ------------------------------------------------------------------------------------------------ chunked backward
//
// Chunked backward on tensor cores (dense batches, N = 32 or 64), from the forward's checkpoints (the state S0 at
// every chunk start) and the adjoint checkpoints of wkv7_tc_chunk<T, N, 2> (X = dL/dS at every chunk end, all later
// tokens included).  One block per (sequence, chunk, head), all chunks in parallel.  In a chunk (notation of the
// chunked forward; G(s, t) = sum of the log decays lw of tokens s+1..t, Gam_t = exp(G(-1, t)), Kd_t =
// exp(G(t, L-1)), gamma = Gam_{L-1}; A_g[t] = a_t Gam_{t-1}, R_g[t] = r_t Gam_t, Bi = b / Gam, Ki = k / Gam,
// B_g = b Kd, K_g = k Kd):
//   U = (I - M_ab)^{-1} (A_g S0^T + M_ak V)                  u_t = S_{t-1} a_t (rows of U: tokens)
//   Z = (I - M_ab^T)^{-1} (B_g X^T + Q_ab^T dY)              z_t = E_t b_t, E_t = dL/dS_t with dy_t r_t^T included
//   dV = K_g X^T + Q_ak^T dY + M_ak^T Z
//   dR = Gam   o (dY S0 + tril(dY U^T) Bi + tril(dY V^T) Ki)
//   dA = Gam_- o (Z S0 + stril(Z U^T) Bi + stril(Z V^T) Ki)   (Gam_-[t] = Gam_{t-1})
//   dK = Kd o (V X) + Gam^-1 o (tril(dY V^T)^T R_g + stril(Z V^T)^T A_g)
//   dB = Kd o (U X) + Gam^-1 o (tril(dY U^T)^T R_g + stril(Z U^T)^T A_g)
// and the decay gradient from the invariance of the chunk under S_t -> S_t diag(Gam_t)^{-1} (the loss depends on
// G(-1, t) only through r Gam, a Gam_-, b / Gam, k / Gam and the end state S_{L-1}):
//   dlw_t = sum_{t' >= t} (r dr - b db - k dk)_{t'} + sum_{t' > t} (a da)_{t'} + diag(X^T S_{L-1}),
//   diag(X^T S_{L-1}) = gamma o diag(X^T S0) + sum_t Kd_t o (b_t o (U X)_t + k_t o (V X)_t),   dw = dlw * lw.
// Every factor is an exponent <= 0 or, in Bi / Ki / Gam^-1, <= 16 * BWD_MILD: the block takes its chunk only when
// every token decays mildly (exp(w) <= mild); a chunk with a stronger decay (where the invariance sum would cancel
// and the factorization overflow) is appended to the list `fix` ([count, ids]) and done exactly by
// wkv7_backward's per-chunk mode.  Products on tensor cores (TF32; 3xTF32 for fp32 I/O), the rest in fp32.
namespace wkv7 {
// Sums of the log decays lw (column p[s * LD], s < L) before and after each of the TPG tokens t0 .. t0+TPG-1:
// gp[u] = G(-1, t-1) (summed in token order) and gs[u] = G(t, L-1) (summed from the chunk's end), each over
// exactly its tokens; running sums, so a thread's TPG tokens share the additions.
template <int L, int LD, int TPG>
__device__ __forceinline__ void chunk_sums(const float* p, int t0, float (&gp)[TPG], float (&gs)[TPG]) {
    float a = 0.f, b = 0.f;
    for (int s = 0; s < t0; ++s) a += p[s * LD];
    for (int s = L - 1; s >= t0 + TPG; --s) b += p[s * LD];
#pragma unroll
    for (int u = 0; u < TPG; ++u) {
        gp[u] = a;
        a += p[(t0 + u) * LD];
    }
#pragma unroll
    for (int u = TPG - 1; u >= 0; --u) {
        gs[u] = b;
        b += p[(t0 + u) * LD];
    }
}
}  // namespace wkv7

template <int N, int NW_, int ST_> struct TcBwdCfg {
    static constexpr int L = wkv7::TC_L;
    // warps: N = 64 has 16 output tiles per mma phase (16 warps: one tile each; 8: two); the latency-bound
    // phases gain from more resident warps, at the price of a 64-register cap (2 blocks of 16 warps per SM)
    static constexpr int NW = NW_;
    static constexpr int NT = 32 * NW;                  // = wkv7.py _tc_bwd_threads
    // blocks per SM the register allocation must allow (as many as the shared memory lets in: N = 64: 2 of ~112 KB)
    static constexpr int MINB = NW >= 8 ? 2 : 4;
    static constexpr int ST = ST_;                      // 16 x 16 tiles per mma strip (A fragments shared)
    static constexpr int LD = N + 4;                    // token arrays [L][LD] and N x N matrices [N][LD]
    static constexpr int LDI = 20;                      // the 16 x 16 token-pair matrices
    static constexpr int TA = L * LD;
    // token arrays: 0 r, 1 lw, 2 k, 3 v, 4 a, 5 b, 6 dy, 7 A_g, 8 R_g, 9 Bi, 10 Ki, 11 B_g (then U X), 12 K_g (then
    // V X), 13 U, 14 Z, 15 dV; S0 [N][LD], X [N][LD] (then dK, dB, and for N = 64 dR, dA); 8 matrices [L][LDI]
    // (M_ab, M_ak, Q_ab, Q_ak, then P_yu, P_yv, P_zu, P_zv); diag(X^T S0) [N]
    static constexpr int O_S = 16 * TA, O_X = O_S + N * LD, O_I = O_X + N * LD, O_C = O_I + 8 * L * LDI,
                         O_EXTRA = O_C + N;
    static constexpr bool DR_IN_X = N * LD >= 4 * TA;
    static constexpr int O_DK = O_X, O_DB = O_X + TA, O_DR = DR_IN_X ? O_X + 2 * TA : O_EXTRA,
                         O_DA = O_DR + TA;
    static constexpr int SMEM_FLOATS = DR_IN_X ? O_EXTRA : O_EXTRA + 2 * TA;   // = wkv7.py _tc_bwd_smem
    static_assert(N == 32 || N == 64, "chunked backward: N = 32 or 64");
    static_assert(NW == 4 || NW == 8 || NW == 16, "warps");
    static_assert(ST >= 1 && (N / 16) % ST == 0, "strip");
};

// 16-byte global -> shared copy without registers (cp.async, sm_80+): the checkpoints S0 and X are requested at
// block start, so their latency overlaps the input loads instead of following the decay check's barrier.  Host
// compilers (the CPU emulation) copy at once.
__device__ __forceinline__ void wkv7_cp16(float* dst, const float* src) {
#ifdef __CUDA_ARCH__
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(d), "l"(src) : "memory");
#else
    __builtin_memcpy(dst, src, 16);
#endif
}
__device__ __forceinline__ void wkv7_cp_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

template <typename T, int N, int NW_, int ST_>
__global__ void __launch_bounds__(TcBwdCfg<N, NW_, ST_>::NT, TcBwdCfg<N, NW_, ST_>::MINB) wkv7_tc_bwd(
    const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ dy,
    T* __restrict__ dr, T* __restrict__ dw, T* __restrict__ dk, T* __restrict__ dv,
    T* __restrict__ da, T* __restrict__ db,
    int T_len, int H, const float* __restrict__ ckpt, const float* __restrict__ dckpt, int* fix, float mild, int vec) {
    using C = TcBwdCfg<N, NW_, ST_>;
    using namespace rwkv::tc;
    constexpr int L = C::L, NW = C::NW, NT = C::NT, LD = C::LD, LDI = C::LDI, TA = C::TA, NB = N / 16;
    static_assert(NB % C::ST == 0, "strip");
    constexpr int ST = C::ST, NS = NB / ST;   // tiles per strip, strips per 16 x N product
    constexpr int TPG = L / (NT / N);         // tokens per thread in the per-element phases
    static_assert(NT % N == 0 && L % (NT / N) == 0, "per-element phases");
    constexpr bool SPLIT = is_f32<T>::value;
    extern __shared__ __align__(16) float smem[];
    float* sR = smem;            float* sLW = smem + TA;      float* sK = smem + 2 * TA;  float* sV = smem + 3 * TA;
    float* sA = smem + 4 * TA;   float* sB = smem + 5 * TA;   float* sY = smem + 6 * TA;
    float* sAg = smem + 7 * TA;  float* sRg = smem + 8 * TA;  float* sBi = smem + 9 * TA; float* sKi = smem + 10 * TA;
    float* sBg = smem + 11 * TA; float* sKg = smem + 12 * TA; float* sU = smem + 13 * TA; float* sZ = smem + 14 * TA;
    float* sdV = smem + 15 * TA;
    float* sUX = sBg;            float* sVX = sKg;            // after phase 1
    float* sS = smem + C::O_S;   float* sX = smem + C::O_X;   float* sI = smem + C::O_I;  float* sC = smem + C::O_C;
    float* sdK = smem + C::O_DK; float* sdB = smem + C::O_DB; float* sdR = smem + C::O_DR; float* sdA = smem + C::O_DA;
    float* Mab = sI;             float* Mak = sI + L * LDI;   float* Qab = sI + 2 * L * LDI; float* Qak = sI + 3 * L * LDI;
    float* Pyu = sI + 4 * L * LDI; float* Pyv = sI + 5 * L * LDI; float* Pzu = sI + 6 * L * LDI;
    float* Pzv = sI + 7 * L * LDI;

    const int tid = threadIdx.x, wq = tid / 32;
    const int nch = (T_len + L - 1) / L;
    const int h = blockIdx.x % H;
    const int c = (blockIdx.x / H) % nch;
    const int sq = blockIdx.x / (H * nch);
    const int t0 = c * L;
    const int len = min(L, T_len - t0);
    const long long tok0 = (long long)sq * T_len + t0;

    {   // S0 (forward checkpoint) and X (adjoint checkpoint) of this chunk: requested now, waited for below
        const long long cs = rwkv::chunk_slot(nullptr, T_len, sq, 0, WKV7_CK, c);
        const float* s0 = ckpt + ((cs * H + h) * N) * (long long)N;
        const float* x0 = dckpt + ((cs * H + h) * N) * (long long)N;
#pragma unroll
        for (int e = tid; e < N * N / 4; e += NT) {
            const int i = e / (N / 4), j4 = 4 * (e % (N / 4));
            wkv7_cp16(sS + i * LD + j4, s0 + (long long)i * N + j4);
            wkv7_cp16(sX + i * LD + j4, x0 + (long long)i * N + j4);
        }
    }
    // ---- inputs (padding tokens: zeros, decay 1), 16-byte loads when aligned (vec); is every decay mild?  The
    // 7 arrays x L x N/8 8-element pieces are dealt over all threads (at most CI per thread, all loads issued before
    // the first is used): one array's pieces per thread would leave most warps idle and hold 7 pieces in registers.
    int strong = 0;
    {
        constexpr int N8 = N / 8, PIECES = L * N8, ITEMS = 7 * PIECES, CI = (ITEMS + NT - 1) / NT;
        wkv7::Chunk8<T> ch[CI];
#pragma unroll
        for (int u = 0; u < CI; ++u) {
            const int e = tid + NT * u, arr = e / PIECES, t = (e % PIECES) / N8, col = 8 * (e % N8);
            if ((ITEMS % NT == 0 || e < ITEMS) && t < len) {
                const T* src = arr == 0 ? r : arr == 1 ? w : arr == 2 ? k : arr == 3 ? v : arr == 4 ? a : arr == 5 ? b : dy;
                ch[u].load(src + ((tok0 + t) * H + h) * N + col, vec != 0);
            }
        }
#pragma unroll
        for (int u = 0; u < CI; ++u) {
            const int e = tid + NT * u, arr = e / PIECES, t = (e % PIECES) / N8, col = 8 * (e % N8);
            if (ITEMS % NT == 0 || e < ITEMS) {
                const bool in = t < len;
                float f[8];
                if (in) ch[u].get(f);
#pragma unroll
                for (int z = 0; z < 8; ++z) {
                    if (!in) f[z] = 0.f;
                    else if (arr == 1) {
                        f[z] = -expf(f[z]);
                        if (!(-f[z] <= mild)) strong = 1;
                    }
                }
                float* d = smem + arr * TA + t * LD + col;
                *reinterpret_cast<float4*>(d) = make_float4(f[0], f[1], f[2], f[3]);
                *reinterpret_cast<float4*>(d + 4) = make_float4(f[4], f[5], f[6], f[7]);
            }
        }
    }
    wkv7_cp_wait();   // this thread's S0 / X copies landed (the barrier below makes all of them visible)
    if (__syncthreads_or(strong)) {
        if (tid == 0) {
            const int pos = atomicAdd(fix, 1);
            fix[1 + pos] = blockIdx.x;
        }
        return;
    }
    {   // diag(X^T S0): NT / N partial sums per channel over row quarters, into the P area (free until phase 3);
        // next to the decay factors: both need only the staged inputs (one barrier for the two)
        constexpr int PARTS = NT / N, RPP = N / PARTS;
        const int j = tid % N, part = tid / N;
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int i = part * RPP; i < (part + 1) * RPP; i += 2) {
            d0 = fmaf(sX[i * LD + j], sS[i * LD + j], d0);
            d1 = fmaf(sX[(i + 1) * LD + j], sS[(i + 1) * LD + j], d1);
        }
        Pyu[part * N + j] = d0 + d1;
    }
    // ---- decay factors per (token, channel), each from sums over exactly its tokens: A_g, R_g, Bi, Ki, B_g, K_g
    // the per-element phases: thread -> channel dj, tokens dt0 .. dt0+TPG-1 (their decay sums shared)
    const int dj = tid % N, dt0 = TPG * (tid / N);
    float gp[TPG], gs[TPG];
    wkv7::chunk_sums<L, LD, TPG>(sLW + dj, dt0, gp, gs);
#pragma unroll
    for (int u = 0; u < TPG; ++u) {
        const int o = (dt0 + u) * LD + dj;
        const float g = gp[u] + sLW[o];
        const float inv = expf(-g), kd = expf(gs[u]);
        sAg[o] = sA[o] * expf(gp[u]);
        sRg[o] = sR[o] * expf(g);
        sBi[o] = sB[o] * inv;
        sKi[o] = sK[o] * inv;
        sBg[o] = sB[o] * kd;
        sKg[o] = sK[o] * kd;
    }
    __syncthreads();   // decay factors and diag partials done
    if (tid < N) {
        float d = 0.f;
#pragma unroll
        for (int part = 0; part < NT / N; ++part) d += Pyu[part * N + tid];
        sC[tid] = d;
    }
    // ---- phase 1: intra-chunk matrices (masked); U <- A_g S0^T, Z <- B_g X^T, dV <- K_g X^T.  The 16 x N
    // products go as strips of ST 16 x 16 tiles sharing their A fragments (shared-memory loads, not the tensor
    // cores, bound this kernel: 2 blocks per SM, every operand fetched from shared memory per tile)
    for (int job = wq; job < 4 + 3 * NS; job += NW) {
        if (job < 4) {
            float acc[8];
            zero(acc);
            const int m = job;
            mma_tile<false, true, SPLIT>(acc, m < 2 ? sAg : sRg, LD, (m & 1) ? sKi : sBi, LD, N);
            float* Im = sI + m * L * LDI;
#pragma unroll
            for (int rr = 0; rr < 8; ++rr) {
                const int t = acc_row(rr), s = acc_col(rr);
                Im[t * LDI + s] = (m < 2 ? s < t : s <= t) ? acc[rr] : 0.f;
            }
        } else {
            const int which = (job - 4) / NS, n = 16 * ST * ((job - 4) % NS);
            const float* lhs = which == 0 ? sAg : which == 1 ? sBg : sKg;
            float acc[ST][8];
#pragma unroll
            for (int u = 0; u < ST; ++u) zero(acc[u]);
            mma_strip<false, true, SPLIT, ST>(acc, lhs, LD, (which == 0 ? sS : sX) + n * LD, LD, N);
            float* out = (which == 0 ? sU : which == 1 ? sZ : sdV) + n;
#pragma unroll
            for (int u = 0; u < ST; ++u) store_tile(out + 16 * u, LD, acc[u]);
        }
    }
    __syncthreads();
    // ---- phase 2: U += M_ak V, Z += Q_ab^T dY, dV += Q_ak^T dY
    for (int job = wq; job < 3 * NS; job += NW) {
        const int which = job / NS, n = 16 * ST * (job % NS);
        float* out = (which == 0 ? sU : which == 1 ? sZ : sdV) + n;
        float acc[ST][8];
#pragma unroll
        for (int u = 0; u < ST; ++u) load_tile(acc[u], out + 16 * u, LD);
        if (which == 0) mma_strip<false, false, SPLIT, ST>(acc, Mak, LDI, sV + n, LD, L);
        else mma_strip<true, false, SPLIT, ST>(acc, which == 1 ? Qab : Qak, LDI, sY + n, LD, L);
#pragma unroll
        for (int u = 0; u < ST; ++u) store_tile(out + 16 * u, LD, acc[u]);
    }
    __syncthreads();
    // ---- solves, one column per thread: U by forward substitution, Z by back substitution (fp32)
    if (tid < 2 * N) {
        const bool zz = tid >= N;
        const int col = tid % N;
        float* M = zz ? sZ : sU;
        float u[L];
#pragma unroll
        for (int t = 0; t < L; ++t) u[t] = M[t * LD + col];
        if (!zz) {
            wkv7::forward_subst<L, LDI>(u, Mab);
        } else {
            wkv7::back_subst<L, LDI>(u, Mab);
        }
#pragma unroll
        for (int t = 0; t < L; ++t) M[t * LD + col] = u[t];
    }
    __syncthreads();
    // ---- phase 3: token-pair products P (masked), dV += M_ak^T Z, U X, V X (into the B_g, K_g arrays)
    for (int job = wq; job < 4 + 3 * NS; job += NW) {
        if (job < 4) {
            const int m = job;   // 0 P_yu = dY U^T, 1 P_yv = dY V^T (lower); 2 P_zu = Z U^T, 3 P_zv = Z V^T (strict)
            float acc[8];
            zero(acc);
            mma_tile<false, true, SPLIT>(acc, m < 2 ? sY : sZ, LD, (m & 1) ? sV : sU, LD, N);
            float* Pm = sI + (4 + m) * L * LDI;
#pragma unroll
            for (int rr = 0; rr < 8; ++rr) {
                const int t = acc_row(rr), s = acc_col(rr);
                Pm[t * LDI + s] = (m < 2 ? s <= t : s < t) ? acc[rr] : 0.f;
            }
        } else {
            const int which = (job - 4) / NS, n = 16 * ST * ((job - 4) % NS);
            float acc[ST][8];
            float* out = (which == 0 ? sdV : which == 1 ? sUX : sVX) + n;
            if (which == 0) {
#pragma unroll
                for (int u = 0; u < ST; ++u) load_tile(acc[u], out + 16 * u, LD);
                mma_strip<true, false, SPLIT, ST>(acc, Mak, LDI, sZ + n, LD, L);
            } else {
#pragma unroll
                for (int u = 0; u < ST; ++u) zero(acc[u]);
                mma_strip<false, false, SPLIT, ST>(acc, which == 1 ? sU : sV, LD, sX + n, LD, N);
            }
#pragma unroll
            for (int u = 0; u < ST; ++u) store_tile(out + 16 * u, LD, acc[u]);
        }
    }
    __syncthreads();
    // ---- phase 4: dR, dA, dK, dB before their per-channel decay factors (X is dead: dK, dB (dR, dA) over it)
    for (int job = wq; job < 4 * NS; job += NW) {
        const int which = job / NS, n = 16 * ST * (job % NS);
        float acc[ST][8];
#pragma unroll
        for (int u = 0; u < ST; ++u) zero(acc[u]);
        if (which < 2) {   // dR (P_yu, P_yv; dY S0) / dA (P_zu, P_zv; Z S0)
            mma_strip<false, false, SPLIT, ST>(acc, which == 0 ? sY : sZ, LD, sS + n, LD, N);
            mma_strip<false, false, SPLIT, ST>(acc, which == 0 ? Pyu : Pzu, LDI, sBi + n, LD, L);
            mma_strip<false, false, SPLIT, ST>(acc, which == 0 ? Pyv : Pzv, LDI, sKi + n, LD, L);
        } else {           // dK (P_yv, P_zv) / dB (P_yu, P_zu), transposed
            mma_strip<true, false, SPLIT, ST>(acc, which == 2 ? Pyv : Pyu, LDI, sRg + n, LD, L);
            mma_strip<true, false, SPLIT, ST>(acc, which == 2 ? Pzv : Pzu, LDI, sAg + n, LD, L);
        }
        float* out = (which == 0 ? sdR : which == 1 ? sdA : which == 2 ? sdK : sdB) + n;
#pragma unroll
        for (int u = 0; u < ST; ++u) store_tile(out + 16 * u, LD, acc[u]);
    }
    __syncthreads();
    // ---- per (token, channel): the decay factors of dR, dA, dK, dB (in place); the decay gradient's terms:
    // sU <- r dr - b db - k dk, sV <- a da, sBi <- Kd (b (U X) + k (V X))   (U, V, Bi are dead after phase 4)
    wkv7::chunk_sums<L, LD, TPG>(sLW + dj, dt0, gp, gs);   // again (as above): cheaper than registers held
#pragma unroll
    for (int u = 0; u < TPG; ++u) {
        const int o = (dt0 + u) * LD + dj;
        const float g = gp[u] + sLW[o];
        const float inv = expf(-g), kd = expf(gs[u]);
        const float vdr = expf(g) * sdR[o];
        const float vda = expf(gp[u]) * sdA[o];
        const float vdk = fmaf(kd, sVX[o], inv * sdK[o]);
        const float vdb = fmaf(kd, sUX[o], inv * sdB[o]);
        sdR[o] = vdr; sdA[o] = vda; sdK[o] = vdk; sdB[o] = vdb;
        sU[o] = sR[o] * vdr - sB[o] * vdb - sK[o] * vdk;
        sV[o] = sA[o] * vda;
        sBi[o] = kd * fmaf(sB[o], sUX[o], sK[o] * sVX[o]);
    }
    __syncthreads();
    // ---- per channel: dlw_t = sum_{t' >= t} sU + sum_{t' > t} sV + diag(X^T S_{L-1}), over sU
    if (tid < N) {
        const int j = tid;
        float g = 0.f, ce = 0.f;
#pragma unroll
        for (int t = 0; t < L; ++t) { g += sLW[t * LD + j]; ce += sBi[t * LD + j]; }
        float acc = fmaf(expf(g), sC[j], ce);
#pragma unroll
        for (int t = L - 1; t >= 0; --t) {
            const int o = t * LD + j;
            acc += sU[o];
            sU[o] = acc;
            acc += sV[o];
        }
    }
    __syncthreads();
    // ---- outputs (dw = dlw * lw): 8 consecutive channels of one token and array per item (16-byte stores)
    {
        constexpr int N8 = N / 8, PIECES = L * N8;
        for (int e = tid; e < 6 * PIECES; e += NT) {
            const int arr = e / PIECES, t = (e % PIECES) / N8, j = 8 * (e % N8), o = t * LD + j;
            if (t >= len) continue;
            const float* src = arr == 0 ? sdR : arr == 1 ? sU : arr == 2 ? sdK : arr == 3 ? sdV : arr == 4 ? sdA : sdB;
            T* dst = arr == 0 ? dr : arr == 1 ? dw : arr == 2 ? dk : arr == 3 ? dv : arr == 4 ? da : db;
            float f[8];
#pragma unroll
            for (int m = 0; m < 8; ++m) f[m] = arr == 1 ? src[o + m] * sLW[o + m] : src[o + m];
            wkv7::Chunk8<T>::store(dst + ((tok0 + t) * H + h) * N + j, f, vec != 0);
        }
    }
}
