// RWKV-6 WKV kernels (see rwkvops/ops/wkv6.py for the math and the launch code).
//
//   d_t[j]   = exp(-exp(w_t[j]))                      (fp32)
//   y_t[i]   = sum_j r_t[j] (u[j] k_t[j] v_t[i] + S_{t-1}[i,j])
//   S_t[i,j] = S_{t-1}[i,j] d_t[j] + k_t[j] v_t[i]
//
// State layout S[slot, h, i (value), j (key)], fp32.  Per-token arrays are flat tokens [total, H, N].
// Recurrent kernels: grid = (num_seqs * H), one block per (sequence, head); chunked ones: see below.
// Chunk-parallel backward (dense batches): the three backward kernels take CL > 0 and then run one block per
// (sequence, chunk of CL tokens, head), started from the chunk's initial state (wkv6_chunk_state + wkv6_chunk_scan)
// and the adjoint at its last token (the same two kernels with rev = 1, k -> r, v -> dy).
//
// Staging scheme (all recurrent kernels): a tile of TT = 1024/N time steps is loaded into shared memory
// with coalesced loads (thread c loads channel c of each step).  Arrays every thread reads ("broadcast")
// are double buffered, so one __syncthreads per tile suffices: a thread writing buffer p^1 for tile n+1 has
// passed the barrier of tile n, which every thread reached only after finishing tile n-1 (the last reader
// of buffer p^1).  Arrays a thread reads only at its own channel ("own") need no barrier and one buffer.
#include "common.cuh"
#include "tc.cuh"

using rwkv::tc::mma_strip_scaled;

namespace wkv6 {

template <int N> struct Tile { static constexpr int TT = 1024 / N; };

__device__ __forceinline__ float decay_of(float w) { return expf(-expf(w)); }

template <typename T>
__device__ __forceinline__ void load4(const T* p, float& a, float& b, float& c, float& d) {
    a = rwkv::to_float(p[0]); b = rwkv::to_float(p[1]); c = rwkv::to_float(p[2]); d = rwkv::to_float(p[3]);
}
template <>
__device__ __forceinline__ void load4<float>(const float* p, float& a, float& b, float& c, float& d) {
    float4 q = *reinterpret_cast<const float4*>(p);
    a = q.x; b = q.y; c = q.z; d = q.w;
}

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// Per-step block sums (a scalar shared by every thread of the step, e.g. r.(u*k) or dy.v): during staging,
// thread c contributes its channel's term and lane 0 of each warp writes the warp's sum to part[warp]; after the
// tile's barrier every thread adds the N/32 warp sums in a fixed order (deterministic).  Every thread of the block
// must call warp_part (full-mask shuffles).
template <int N>
__device__ __forceinline__ void warp_part(float x, float* part) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
}
template <int N>
__device__ __forceinline__ float part_sum(const float* part) {
    float a = part[0];
#pragma unroll
    for (int q = 1; q < N / 32; ++q) a += part[q];
    return a;
}

// Token range of backward unit s.  CL == 0: sequence s (rwkv::seq_bounds).  CL > 0 (chunk-parallel backward,
// dense batches only): unit s = b * nc + c is chunk c of sequence b, tokens [b*T + c*CL, min(.. + CL, (b+1)*T)).
__device__ __forceinline__ void bwd_bounds(const int* cu_seqlens, int Tlen, long long total, int CL, int s,
                                           long long& start, long long& end, int* err) {
    if (CL > 0) {
        const int nc = (Tlen + CL - 1) / CL;
        const int b = s / nc, c = s % nc;
        start = (long long)b * Tlen + (long long)c * CL;
        end = min(start + (long long)CL, (long long)(b + 1) * Tlen);
        return;
    }
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
}

// Checkpoint slot of chunk c (CK tokens) of unit s: one slot per unit (= s) in chunk-parallel mode.
__device__ __forceinline__ long long bwd_ckpt_slot(const int* cu_seqlens, int Tlen, int CL, int s, long long start,
                                                   int CK, int c) {
    return CL > 0 ? (long long)s : rwkv::chunk_slot(cu_seqlens, Tlen, s, start, CK, c);
}

// |x| of a register column (the recurrent backward's norm bounds, see wkv6_bwd_colrev).
template <int N>
__device__ __forceinline__ float col_norm(const float (&x)[N]) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int i = 0; i < N; i += 2) {
        a0 = fmaf(x[i], x[i], a0);
        a1 = fmaf(x[i + 1], x[i + 1], a1);
    }
    return sqrtf(a0 + a1);
}
// Relative slack of those bounds over the fp32 rounding of the norms, of their recursions and of S and G.
constexpr float BOUND_SLACK = 1.f + 1.f / 1024;

}  // namespace wkv6

// ------------------------------------------------------------------------------------------------------
// Forward over tokens [start, start+len) of head h.  Thread i owns state row i (N fp32 registers,
// constant-indexed after unrolling), read from `sin` (row i at sin + i*N; null: zeros) and written to `sout`
// (null: not written).  Broadcast per step: r_j, k_j, d_j and the step's scalar ruk = sum_j r_j u_j k_j (warp
// sums), so that y_i = sum_j r_j S[i,j] + v_i ruk.  Own: v_i.
namespace wkv6 {
template <typename T, int N>
__device__ __forceinline__ void forward_rows(
    long long start, long long len, int H, int h,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u, const float* sin, float* sout, T* __restrict__ y)
{
    constexpr int TT = Tile<N>::TT, NW = N / 32;
    __shared__ __align__(16) float sr[2][TT * N];
    __shared__ __align__(16) float sk[2][TT * N];
    __shared__ __align__(16) float sd[2][TT * N];
    __shared__ float sp[2][TT * NW];
    __shared__ float sv[TT * N];
    const int i = threadIdx.x;

    float st[N];
    if (sin != nullptr) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            float4 a = ld4(sin + 4 * q);
            st[4 * q] = a.x; st[4 * q + 1] = a.y; st[4 * q + 2] = a.z; st[4 * q + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) st[j] = 0.f;
    }
    const float ui = rwkv::to_float(u[h * N + i]);
    int p = 0;
    for (long long t0 = 0; t0 < len; t0 += TT, p ^= 1) {
        const int cnt = (int)min((long long)TT, len - t0);
        for (int tt = 0; tt < cnt; ++tt) {
            const long long off = ((start + t0 + tt) * H + h) * N + i;
            const float kk = rwkv::to_float(k[off]), rr = rwkv::to_float(r[off]);
            sr[p][tt * N + i] = rr;
            sk[p][tt * N + i] = kk;
            sd[p][tt * N + i] = decay_of(rwkv::to_float(w[off]));
            sv[tt * N + i] = rwkv::to_float(v[off]);
            warp_part<N>(rr * (ui * kk), &sp[p][tt * NW]);
        }
        __syncthreads();
        for (int tt = 0; tt < cnt; ++tt) {
            const float vi = sv[tt * N + i];
            const float* pr = &sr[p][tt * N];
            const float* pk = &sk[p][tt * N];
            const float* pd = &sd[p][tt * N];
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 rr = ld4(pr + 4 * q), kk = ld4(pk + 4 * q), dd = ld4(pd + 4 * q);
                a0 = fmaf(rr.x, st[4 * q], a0);
                a1 = fmaf(rr.y, st[4 * q + 1], a1);
                a2 = fmaf(rr.z, st[4 * q + 2], a2);
                a3 = fmaf(rr.w, st[4 * q + 3], a3);
                st[4 * q] = fmaf(st[4 * q], dd.x, kk.x * vi);
                st[4 * q + 1] = fmaf(st[4 * q + 1], dd.y, kk.y * vi);
                st[4 * q + 2] = fmaf(st[4 * q + 2], dd.z, kk.z * vi);
                st[4 * q + 3] = fmaf(st[4 * q + 3], dd.w, kk.w * vi);
            }
            const float ruk = part_sum<N>(&sp[p][tt * NW]);
            y[((start + t0 + tt) * H + h) * N + i] = rwkv::from_float<T>(fmaf(vi, ruk, (a0 + a1) + (a2 + a3)));
        }
    }
    if (sout != nullptr) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q)
            *reinterpret_cast<float4*>(sout + 4 * q) = make_float4(st[4 * q], st[4 * q + 1], st[4 * q + 2], st[4 * q + 3]);
    }
}
}  // namespace wkv6

// Forward, general T (recurrent): one block of N threads per (sequence, head).
template <typename T, int N>
__global__ void __launch_bounds__(N, 1) wkv6_forward(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u,
    const float* state_in, float* state_out, const int* __restrict__ state_idx, int pool_size,
    T* __restrict__ y, int* err)
{
    const int s = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, s, pool_size, err);
    const long long sbase = (slot * H + h) * (long long)(N * N) + (long long)i * N;
    const bool has = slot >= 0;
    wkv6::forward_rows<T, N>(start, end - start, H, h, r, k, v, w, u,
                             (state_in != nullptr && has) ? state_in + sbase : nullptr,
                             (state_out != nullptr && has) ? state_out + sbase : nullptr, y);
}

// ------------------------------------------------------------------------------------------------------
// Chunked forward (dense batches only, cu_seqlens == null): the recurrence split into chunks of L = TC_L
// tokens (seed 000's plan) with the matrix products on tensor cores (rwkv::tc; 3xTF32 for fp32 I/O), no
// division anywhere:
//   1. wkv6_tc_state   (grid B*nc*H, 128 threads): each chunk's local state from a zero state,
//      A_c = V^T Kt with Kt[s, j] = k_s[j] prod_{s < s' < L} d_s'[j], and the product of its decays P_c[j];
//   2. wkv6_chunk_scan (grid B*H*(N*N/1024), block 256): per state element, S_in(c) = S, S = S*P_c + A_c
//      over the chunks in order (A_c is overwritten by S_in(c)); writes the final state (pool aware);
//   3. wkv6_tc_output  (grid B*nc*H, 128 threads, N <= 64): y of each chunk from S_in(c), in parallel over
//      chunks (below); wkv6_chunk_output (block N) is the recurrent form of the same step, used for N = 128.
// buf: fp32 [B, nc, H, N, N]; dec: fp32 [B, nc, H, N]; nc = ceil(T / L).
// rev = 1 runs steps 1-2 for the backward's adjoint (G_{t-1} = G_t d_t + dy_t r_t^T, k -> r, v -> dy, chunks
// in reverse): Kt[s, j] = k_s[j] prod_{s' < s} d_s'[j].
//
// Decay products are exp of sums of log decays -exp(w) taken over exactly the tokens of the product (prefix or
// suffix sums inside 16-token blocks, plus whole-block totals), never differences of long prefix sums, so a
// long run of strong decay cannot wipe out the precision of a later weak one; every exponent is <= 0 except
// inside a diagonal 16-token block (see wkv6_tc_output).
namespace wkv6 {
constexpr int TC_L = 64;          // tokens per chunk (wkv6.py CHUNK_L)
constexpr int TC_THREADS = 128;   // 4 warps
// Inside the chunk kernels log decays are in log2 units (-exp(w) log2(e)): every decay product is one exp2.
constexpr float TC_LOG2E = 1.4426950408889634f, TC_LN2 = 0.6931471805599453f;
constexpr float TC_SAFE_SPAN = 43.28f;   // = 30 / ln 2: a diagonal block whose decays multiply to >= e^-30 in
                                         // every channel is factorized (factors up to e^30); others take the
                                         // exact pairwise path

// 8 consecutive elements of an input array as raw 16-byte words (two for fp32).
template <typename T> struct Raw8 { uint4 q[sizeof(T) / 2]; };

template <typename T>
__device__ __forceinline__ void load8(Raw8<T>& r, const T* p, bool vec) {
    if (vec) {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.q[i] = reinterpret_cast<const uint4*>(p)[i];
    } else {
        T* e = reinterpret_cast<T*>(r.q);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = p[i];
    }
}

// dst[a][t][j] (row stride ld) = src[a] at token start+t, head h, channel j for t < len; 0 in the padding rows.
// Arrays whose bit is set in logmask are stored as log2 decays -exp(x) log2(e) (padding rows: 0, i.e. decay 1).
// Every load of every array is issued before the first store (the staging is one memory round trip); vec:
// the arrays are 16-byte aligned (16-byte loads), else element loads.  ld_last > 0: the last array's row stride.
template <typename T, int N, int NA>
__device__ __forceinline__ void tc_stage(float* const (&dst)[NA], const T* const (&src)[NA], unsigned logmask, int ld,
                                         long long start, int len, int H, int h, bool vec, int ld_last = 0) {
    constexpr int IT = TC_L * N / 8 / TC_THREADS;   // 16-byte vectors per thread and array
    static_assert(IT * 8 * TC_THREADS == TC_L * N, "chunk tile not divisible among the threads");
    Raw8<T> raw[NA][IT];
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = it * TC_THREADS + threadIdx.x, t = e / (N / 8), j = (e % (N / 8)) * 8;
            if (t < len) load8(raw[a][it], src[a] + ((start + t) * H + h) * N + j, vec);
        }
#pragma unroll
    for (int a = 0; a < NA; ++a)
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = it * TC_THREADS + threadIdx.x, t = e / (N / 8), j = (e % (N / 8)) * 8;
            const T* x = reinterpret_cast<const T*>(raw[a][it].q);
            float f[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                f[i] = t < len ? rwkv::to_float(x[i]) : 0.f;
                if (((logmask >> a) & 1u) && t < len) f[i] = -expf(f[i]) * TC_LOG2E;
            }
            float4* o = reinterpret_cast<float4*>(dst[a] + t * ((a == NA - 1 && ld_last > 0) ? ld_last : ld) + j);
            o[0] = make_float4(f[0], f[1], f[2], f[3]);
            o[1] = make_float4(f[4], f[5], f[6], f[7]);
        }
}

// dst[i][j] (row stride ld) = the fp32 N x N matrix src (row-major), all loads issued first.
template <int N>
__device__ __forceinline__ void tc_stage_state(float* dst, int ld, const float* __restrict__ src) {
    constexpr int IT = N * N / 4 / TC_THREADS;
    float4 x[IT];
#pragma unroll
    for (int it = 0; it < IT; ++it) x[it] = reinterpret_cast<const float4*>(src)[it * TC_THREADS + threadIdx.x];
#pragma unroll
    for (int it = 0; it < IT; ++it) {
        const int e = 4 * (it * TC_THREADS + threadIdx.x);
        *reinterpret_cast<float4*>(dst + (e / N) * ld + e % N) = x[it];
    }
}

// Per 16-token block p and channel j of a staged chunk, from the log2 decays lg[t][j] (row stride ld):
// alpha (sum over the block's tokens before t), sigma (after t) and the block total E_p = sE[p][j] (log2 units).
// lg is overwritten by 2^sigma (keep_alpha: by 2^alpha), factors <= 1, unless kscale is given: then
// kscale[t][j] *= 2^sigma_t instead, or fout: fout[t][j] = 2^sigma_t (lg is left as it is); if given, qscale[t][j] *= 2^alpha_t,
// expa[t][j] = 2^alpha_t, and unsafe[p] = 1 where E_p < -TC_SAFE_SPAN in some channel.  Threads take (p, j).
// sE's rows are lde floats apart (0: ld).
template <int N>
__device__ __forceinline__ void tc_block_scan(float* lg, int ld, float* sE, bool keep_alpha, float* qscale,
                                              float* expa, int* unsafe, float* kscale = nullptr,
                                              float* fout = nullptr, int lde = 0) {
    for (int idx = threadIdx.x; idx < (TC_L / 16) * N; idx += TC_THREADS) {
        const int p = idx / N, j = idx % N, o = 16 * p * ld + j;
        float l[16], alpha[16], a = 0.f;
#pragma unroll
        for (int s = 0; s < 16; ++s) l[s] = lg[o + s * ld];
#pragma unroll
        for (int s = 0; s < 16; ++s) { alpha[s] = a; a += l[s]; }
        float sg = 0.f;
#pragma unroll
        for (int s = 15; s >= 0; --s) {
            const float x = exp2f(keep_alpha ? alpha[s] : sg);
            if (kscale != nullptr) kscale[o + s * ld] *= x;
            else (fout != nullptr ? fout : lg)[o + s * ld] = x;
            sg += l[s];
        }
        sE[p * (lde > 0 ? lde : ld) + j] = a;
        if (unsafe != nullptr && a < -TC_SAFE_SPAN) unsafe[p] = 1;
        if (qscale != nullptr) {
#pragma unroll
            for (int s = 0; s < 16; ++s) qscale[o + s * ld] *= exp2f(alpha[s]);
        }
        if (expa != nullptr) {
#pragma unroll
            for (int s = 0; s < 16; ++s) expa[o + s * ld] = exp2f(alpha[s]);
        }
    }
}

// f[j] = 2^(sum_{lo <= p < hi} E_p[j] - (neg >= 0 ? E_neg[j] : 0)): a per-channel factor, one warp's row.
template <int N>
__device__ __forceinline__ void tc_col_factor(float* f, const float* sE, int lo, int hi, int neg) {
    constexpr int LD = N + 4;
    for (int j = threadIdx.x % 32; j < N; j += 32) {
        float g = neg >= 0 ? -sE[neg * LD + j] : 0.f;
        for (int p = lo; p < hi; ++p) g += sE[p * LD + j];
        f[j] = exp2f(g);
    }
    __syncwarp();
}

// Column factor of the pair (query block q, key block p <= q), this warp's row f: the key of block p scaled for
// query block q is Kh_s = k_s 2^sigma_s f[j] with f = 2^(block totals strictly between p and q) (Kh <= |k|), or
// for p == q, 2^-E_q (the diagonal block when it is safe to factorize: <= |k| e^30).  The products apply f as
// their fragments load (mma_strip_scaled).  Every lane must be done reading f's previous values.  One warp.
template <int N>
__device__ __forceinline__ void tc_pair_factor(float* f, const float* sE, int p, int q) {
    if (p == q) tc_col_factor<N>(f, sE, 0, 0, q);
    else tc_col_factor<N>(f, sE, p + 1, q, -1);
}

// Log2 decay -exp(w) log2(e) of token t of the chunk (0 past its end), read again from global memory: only the
// exact pairwise paths of strongly decayed blocks and dw use it.
template <typename T, int N>
__device__ __forceinline__ float tc_log_decay(const T* __restrict__ w, long long start, int len, int H, int h,
                                              int t, int j) {
    return t < len ? -expf(rwkv::to_float(w[((start + t) * H + h) * N + j])) * TC_LOG2E : 0.f;
}

// The exact pairwise sum of a strongly decayed 16-token block for channel j (wkv6_tc_bwd_rkw):
//   sum over u = u0, u0 + du, ... (cnt terms) of coef[u * cstride] x[u][j] 2^(log2 decays of the tokens strictly
//   between u0 - du and u), x with rows of N + 4.
// Rare, so out of line: inlined into the unrolled accumulator loops it made up most of the kernel's code.
template <typename T, int N>
__device__ __noinline__ float tc_pair_exact(const float* coef, int cstride, const float* x, int u0, int du, int cnt,
                                            int j, const T* __restrict__ w, long long start, int len, int H, int h) {
    constexpr int LD = N + 4;
    float gsum = 0.f, acc = 0.f;
    for (int i = 0, u = u0; i < cnt; ++i, u += du) {
        acc += coef[u * cstride] * x[u * LD + j] * exp2f(gsum);
        gsum += tc_log_decay<T, N>(w, start, len, H, h, u, j);
    }
    return acc;
}

// Rows of query block q of the intra-chunk score matrix (row stride la, columns = key tokens of the chunk):
//   A[t, s] = sum_j r_t[j] k_s[j] prod_{s < s' < t} d_s'[j] for s < t,  ruk[t] for s == t,  0 for s > t.
// Qq: Qh of block q (r_t 2^alpha_t); sKs: k_s 2^sigma_s; f: this warp's factor row; unsafe: block q's decays
// are too strong to factorize, its diagonal entries are summed pairwise from the decays (r, k, w re-read from
// global memory).  One warp.
template <typename T, int N, bool SPLIT>
__device__ __forceinline__ void tc_scores(float* Aq, int la, const float* Qq, const float* sKs, const float* sE,
                                          float* f, int q, bool unsafe, const float* sRuk,
                                          const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ w,
                                          long long start, int len, int H, int h) {
    constexpr int LD = N + 4;
    const int lane = threadIdx.x % 32;
    for (int p = 0; p <= q; ++p) {
        if (p == q && unsafe) break;
        __syncwarp();   // every lane is done with f
        tc_pair_factor<N>(f, sE, p, q);
        float sc[1][8];
        rwkv::tc::zero(sc[0]);
        mma_strip_scaled<false, true, SPLIT, 1>(sc, Qq, LD, nullptr, sKs + 16 * p * LD, nullptr, LD, f, N);
        rwkv::tc::store_tile(Aq + 16 * p, la, sc[0]);
    }
    if (unsafe) {
        // lane owns channels j = lane + 32m; for each s the running sum g of log decays over (s, t) grows one
        // token at a time (exactly the product's range)
        for (int s = 0; s < 15; ++s) {
            const int sq = 16 * q + s;
            float g[N / 32], ks[N / 32];
#pragma unroll
            for (int m = 0; m < N / 32; ++m) {
                g[m] = 0.f;
                ks[m] = sq < len ? rwkv::to_float(k[((start + sq) * H + h) * N + lane + 32 * m]) : 0.f;
            }
            for (int t = s + 1; t < 16; ++t) {
                float part = 0.f;
#pragma unroll
                for (int m = 0; m < N / 32; ++m) {
                    const int j = lane + 32 * m, tq = 16 * q + t;
                    if (t > s + 1) g[m] += tc_log_decay<T, N>(w, start, len, H, h, tq - 1, j);
                    const float rt = tq < len ? rwkv::to_float(r[((start + tq) * H + h) * N + j]) : 0.f;
                    part += rt * ks[m] * exp2f(g[m]);
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
                if (lane == 0) Aq[t * la + 16 * q + s] = part;
            }
        }
    }
    __syncwarp();
    for (int e = lane; e < 16 * (TC_L - 16 * q); e += 32) {   // the diagonal block's u term, zeros above it
        const int t = e / (TC_L - 16 * q), s = 16 * q + e % (TC_L - 16 * q);
        if (s > 16 * q + t) Aq[t * la + s] = 0.f;
        else if (s == 16 * q + t) Aq[t * la + s] = sRuk[16 * q + t];
    }
    __syncwarp();
}

// Scan down (SUFFIX) or up the 16 rows of one column of a warp's 16 x 16 accumulator tile: rows g and g + 8
// (g = lane / 4) are `top` and `bot` of the 8 lanes with equal lane % 4.  Replaced by the inclusive or exclusive
// suffix (prefix) sums inside the tile; total = the column's sum.  Every lane of the warp must call it.
template <bool SUFFIX>
__device__ __forceinline__ void col_scan(float& top, float& bot, float& total, bool exclusive) {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
    for (int d = 1; d < 8; d *= 2) {
        const float ot = SUFFIX ? __shfl_down_sync(0xffffffffu, top, 4 * d) : __shfl_up_sync(0xffffffffu, top, 4 * d);
        const float ob = SUFFIX ? __shfl_down_sync(0xffffffffu, bot, 4 * d) : __shfl_up_sync(0xffffffffu, bot, 4 * d);
        if (SUFFIX ? g + d < 8 : g - d >= 0) { top += ot; bot += ob; }
    }
    // SUFFIX: the top rows also get the whole bottom half; else the bottom rows get the whole top half
    if (SUFFIX) top += __shfl_sync(0xffffffffu, bot, c);
    else bot += __shfl_sync(0xffffffffu, top, 28 + c);
    total = SUFFIX ? __shfl_sync(0xffffffffu, top, c) : __shfl_sync(0xffffffffu, bot, 28 + c);
    if (exclusive) {   // the neighbouring row's inclusive sum (no subtraction)
        const float nt = SUFFIX ? __shfl_down_sync(0xffffffffu, top, 4) : __shfl_up_sync(0xffffffffu, top, 4);
        const float nb = SUFFIX ? __shfl_down_sync(0xffffffffu, bot, 4) : __shfl_up_sync(0xffffffffu, bot, 4);
        const float edge = SUFFIX ? __shfl_sync(0xffffffffu, bot, c) : __shfl_sync(0xffffffffu, top, 28 + c);
        if (SUFFIX) { top = g < 7 ? nt : edge; bot = g < 7 ? nb : 0.f; }
        else { bot = g > 0 ? nb : edge; top = g > 0 ? nt : 0.f; }
    }
}

// Write a warp's 16 x N accumulator strip (rows = tokens 16q.. of the chunk) to out [tokens, H, N] through the
// warp's staging rows (row stride la) so that the global stores are coalesced, 8 elements per lane and store (16-byte
// stores when vec: out 16-byte aligned); rows past len are not written.
template <typename T, int N>
__device__ __forceinline__ void tc_write_rows(T* __restrict__ out, const float (&acc)[N / 16][8], float* stage, int la,
                                              int q, long long start, int len, int H, int h, bool vec) {
#pragma unroll
    for (int n = 0; n < N / 16; ++n) rwkv::tc::store_tile(stage + n * 16, la, acc[n]);
    __syncwarp();
    for (int e = 8 * (threadIdx.x % 32); e < 16 * N; e += 8 * 32) {
        const int s = e / N, i = e % N, t = 16 * q + s;
        if (t >= len) continue;
        Raw8<T> raw;
        T* x = reinterpret_cast<T*>(raw.q);
#pragma unroll
        for (int m = 0; m < 8; ++m) x[m] = rwkv::from_float<T>(stage[s * la + i + m]);
        T* o = out + ((start + t) * H + h) * N + i;
        if (vec) {
#pragma unroll
            for (int m = 0; m < (int)(sizeof(T) / 2); ++m) reinterpret_cast<uint4*>(o)[m] = raw.q[m];
        } else {
#pragma unroll
            for (int m = 0; m < 8; ++m) o[m] = x[m];
        }
    }
}

// Shared memory of the score kernels (wkv6_tc_output, wkv6_tc_fused, wkv6_tc_bwd_v; tc_output_smem in wkv6.py),
// rows of N + 4 floats: Q (r, then Qh = r 2^alpha), K (k, then Ks = k 2^sigma), X (v or dy; rows of LDX = N + 8),
// A ([TC_L][TC_L + 4]: the log2 decays, then an N x N state matrix (rows of N + 4), then the scores), E (block
// totals), Ruk (r_t . (u * k_t)), U (u), F (per-warp channel factors), Unsafe (per-block flags).  Three chunk arrays
// and A (73 KB for N = 64): three blocks per SM.  X is only read with the token index as the mma's k (A V, V^T Kt,
// A^T dY): rows of 8 mod 32 floats make those fragment loads free of bank conflicts (N + 4 gives 2-way conflicts).
template <int N> struct TcScoreSmem {
    static constexpr int LDX = N + 8;
    float *Q, *K, *X, *A, *E, *Ruk, *U, *F; int* Unsafe;
};

// Carve the shared memory, stage r, k, w, x of the chunk and u, compute r_t . (u * k_t), run the block scans (Q
// becomes Qh, K Ks), then put the N x N matrix mat (null: none) into A (its loads issued with the chunk's).  Ends
// with a barrier; A's state rows are read by every warp, so a barrier must separate their last use from the scores.
template <typename T, int N>
__device__ __forceinline__ TcScoreSmem<N> tc_score_setup(float* smem, const T* __restrict__ r, const T* __restrict__ k,
                                                         const T* __restrict__ w, const T* __restrict__ x,
                                                         const T* __restrict__ u, const float* __restrict__ mat,
                                                         long long start, int len, int H, int h, bool vec) {
    constexpr int L = TC_L, LD = N + 4, NB = L / 16, IT = N * N / 4 / TC_THREADS, LDX = TcScoreSmem<N>::LDX;
    static_assert(N * LD <= L * (L + 4) && L * LD <= L * (L + 4), "the state and the log decays fit A");
    TcScoreSmem<N> m;
    m.Q = smem; m.K = m.Q + L * LD; m.X = m.K + L * LD; m.A = m.X + L * LDX;
    m.E = m.A + L * (L + 4); m.Ruk = m.E + NB * LD; m.U = m.Ruk + L; m.F = m.U + N;
    m.Unsafe = reinterpret_cast<int*>(m.F + NB * LD);
    const int tid = threadIdx.x;
    float4 st[IT];   // mat, held in registers until A is free
    if (mat != nullptr) {
#pragma unroll
        for (int it = 0; it < IT; ++it) st[it] = reinterpret_cast<const float4*>(mat)[it * TC_THREADS + tid];
    }
    tc_stage<T, N, 4>({m.Q, m.K, m.A, m.X}, {r, k, w, x}, 4u, LD, start, len, H, h, vec, LDX);
    for (int j = tid; j < N; j += TC_THREADS) m.U[j] = rwkv::to_float(u[h * N + j]);
    if (tid < NB) m.Unsafe[tid] = 0;
    __syncthreads();
    {   // r_t . (u * k_t): two threads per token, fixed order
        const int t = tid / 2, half = tid % 2;
        float p = 0.f;
        for (int j = half * (N / 2); j < (half + 1) * (N / 2); ++j) p += m.Q[t * LD + j] * m.U[j] * m.K[t * LD + j];
        p += __shfl_xor_sync(0xffffffffu, p, 1);
        if (half == 0) m.Ruk[t] = p;
    }
    __syncthreads();
    tc_block_scan<N>(m.A, LD, m.E, false, m.Q, nullptr, m.Unsafe, m.K);
    __syncthreads();
    if (mat != nullptr) {
#pragma unroll
        for (int it = 0; it < IT; ++it) {
            const int e = 4 * (it * TC_THREADS + tid);
            *reinterpret_cast<float4*>(m.A + (e / N) * LD + e % N) = st[it];
        }
        __syncthreads();
    }
    return m;
}

// The (sequence b, chunk c, head h) of this block (blockIdx.x = (b * nc + c) * H + h) of a dense batch in chunks of
// L tokens: bc = b * nc + c (the chunk-buffer slot), its first token and its length (the last chunk may be short).
struct TcChunk { int h, len; long long bc, start; };
__device__ __forceinline__ TcChunk tc_chunk_at(int Tlen, int H, int L, long long idx) {
    const int nc = (Tlen + L - 1) / L;
    const long long bc = idx / H, c = bc % nc, b = bc / nc;
    return {(int)(idx % H), (int)min((long long)L, (long long)Tlen - c * L), bc, b * Tlen + c * L};
}
__device__ __forceinline__ TcChunk tc_chunk(int Tlen, int H, int L) { return tc_chunk_at(Tlen, H, L, blockIdx.x); }
}  // namespace wkv6

// Chunks of L <= TC_L tokens (the rows past L are zero padding).  vec: k, v, w 16-byte aligned.  Shared memory:
// tc_state_smem(N) in wkv6.py.
template <typename T, int N>
__global__ void __launch_bounds__(wkv6::TC_THREADS) wkv6_tc_state(
    int Tlen, int H, int L, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    float* __restrict__ buf, float* __restrict__ dec, int rev, int vec)
{
    using namespace wkv6;
    // rows of 8 mod 32 floats: the product below contracts over tokens (V^T, and Kt by rows), and its fragment
    // loads are free of bank conflicts with such rows (N + 4 gave 2-way conflicts)
    constexpr int LD = N + 8;
    extern __shared__ __align__(32) float smem[];
    constexpr int NB = TC_L / 16;
    float* sK = smem;               // k, then Kt
    float* sW = sK + TC_L * LD;     // log decays, then sigma (rev: alpha)
    float* sV = sW + TC_L * LD;     // v
    float* sE = sV + TC_L * LD;     // [NB][N] block totals
    float* sF = sE + NB * N;        // [NB][N] 2^(totals of the later (rev: earlier) blocks)
    const TcChunk ch = tc_chunk(Tlen, H, L);
    const int h = ch.h, len = ch.len;
    const long long bc = ch.bc, start = ch.start;
    if (sizeof(T) * N <= 128) {
        tc_stage<T, N, 3>({sK, sW, sV}, {k, w, v}, 2u, LD, start, len, H, h, vec != 0);
    } else {   // fp32 with N = 128: three round trips rather than too many registers
        tc_stage<T, N, 1>({sK}, {k}, 0u, LD, start, len, H, h, vec != 0);
        tc_stage<T, N, 1>({sW}, {w}, 1u, LD, start, len, H, h, vec != 0);
        tc_stage<T, N, 1>({sV}, {v}, 0u, LD, start, len, H, h, vec != 0);
    }
    __syncthreads();
    tc_block_scan<N>(sW, LD, sE, rev != 0, nullptr, nullptr, nullptr, nullptr, nullptr, N);
    __syncthreads();
    const long long cb = (long long)bc * H + h;
    for (int idx = threadIdx.x; idx < (NB + 1) * N; idx += TC_THREADS) {
        const int p = idx / N, j = idx % N;
        float g = 0.f;
        for (int p2 = 0; p2 < NB; ++p2) g += (p == NB || (rev ? p2 < p : p2 > p)) ? sE[p2 * N + j] : 0.f;
        if (p < NB) sF[p * N + j] = exp2f(g);
        else dec[cb * N + j] = exp2f(g);
    }
    __syncthreads();
    // A_c = V^T Kt, Kt = k * (decays after t in the chunk) (rev: before t), never above |k|: per 16-token block p
    // Kt[t, j] = k_t[j] 2^sigma_t[j] sF[p][j], scaled as the fragments load.  Warp q owns the value rows of the
    // 16-row tiles q, q + 4, ...; each result pair of adjacent columns is one 8-byte store.
    constexpr int NT = N / 16;
    constexpr bool SPLIT = rwkv::tc::is_f32<T>::value;
    float* out = buf + cb * (N * N);
    for (int mt = threadIdx.x / 32; mt < NT; mt += TC_THREADS / 32) {
        float acc[NT][8];
#pragma unroll
        for (int n = 0; n < NT; ++n) rwkv::tc::zero(acc[n]);
#pragma unroll
        for (int p = 0; p < NB; ++p)
            mma_strip_scaled<true, false, SPLIT, NT>(acc, sV + 16 * p * LD + 16 * mt, LD, nullptr, sK + 16 * p * LD,
                                                     sW + 16 * p * LD, LD, sF + p * N, 16);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int r = 0; r < 8; r += 2) {
                const int i = 16 * mt + rwkv::tc::acc_row(r), j = 16 * n + rwkv::tc::acc_col(r);
                *reinterpret_cast<float2*>(out + i * N + j) = make_float2(acc[n][r], acc[n][r + 1]);
            }
    }
}

// Chunk output on tensor cores.  Warp q owns the outputs of the 16 query tokens of block q (t = 16q .. 16q+15) of
// the chunk (and computes the score rows of block NB - 1 - q, for balance):
//   y_t = S_in (r_t * gamma_{t-1}) + sum_{s < t} A[t, s] v_s + (r_t . (u * k_t)) v_t,
//   A[t, s] = sum_j r_t[j] k_s[j] prod_{s < s' < t} d_s'[j],   gamma_{t-1} = prod_{s' < t} d_s' (inside the chunk).
// With alpha_t = log-decay sum of block q's tokens before t, sigma_s = sum over s's block after s, E_p = block p's
// total: Qh_t = r_t exp(alpha_t) (<= |r|); inter-chunk term (Qh_t exp(sum_{p<q} E_p)) S_in^T; for key blocks p < q
// Kh_s = k_s exp(sigma_s + sum_{p<p'<q} E_p') (<= |k|), A_qp = Qh Kh^T; for the diagonal block, when its total
// E_q >= -TC_SAFE_SPAN in every channel, Kh_s = k_s exp(sigma_s - E_q) (<= |k| e^30; the masked entries s >= t
// stay finite), else the entries are summed pairwise from the decays themselves (exact for any decay).
// vec: r, k, v, w, y 16-byte aligned.  Shared memory: tc_output_smem(N) in wkv6.py.
template <typename T, int N>
__global__ void __launch_bounds__(wkv6::TC_THREADS) wkv6_tc_output(
    int Tlen, int H, const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ w, const T* __restrict__ u, const float* __restrict__ buf, T* __restrict__ y, int vec)
{
    using namespace wkv6;
    constexpr int L = TC_L, LD = N + 4, LA = L + 4, NB = L / 16;
    constexpr bool SPLIT = rwkv::tc::is_f32<T>::value;
    static_assert(N <= L && NB == TC_THREADS / 32, "one warp per 16-token block");
    extern __shared__ __align__(32) float smem[];
    const TcChunk ch = tc_chunk(Tlen, H, L);
    const int h = ch.h, len = ch.len, q = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long bc = ch.bc, start = ch.start;
    // sX = v, sA = S_in (N rows), then per warp [16][LA]: the scores, then y
    const TcScoreSmem<N> sm = tc_score_setup<T, N>(smem, r, k, w, v, u, buf + ((long long)bc * H + h) * (N * N),
                                                   start, len, H, h, vec != 0);
    float* sAw = sm.A + q * 16 * LA;
    float* fq = sm.F + q * LD;
    const float* Qq = sm.Q + 16 * q * LD;
    tc_col_factor<N>(fq, sm.E, 0, q, -1);   // the decays of the chunk's earlier blocks
    float acc[N / 16][8];
#pragma unroll
    for (int n = 0; n < N / 16; ++n) rwkv::tc::zero(acc[n]);
    mma_strip_scaled<false, true, SPLIT, N / 16>(acc, Qq, LD, fq, sm.A, nullptr, LD, nullptr, N);   // (Qh f) S_in^T
    __syncthreads();   // every warp is done with S_in: A takes the scores

    // warp q computes the score rows of block qs = NB - 1 - q (qs + 1 tiles) and then y of block q (a product over
    // q + 1 key blocks): NB + 1 tile products per warp instead of 2 (q + 1)
    const int qs = NB - 1 - q;
    tc_scores<T, N, SPLIT>(sm.A + qs * 16 * LA, LA, sm.Q + 16 * qs * LD, sm.K, sm.E, fq, qs, sm.Unsafe[qs] != 0,
                           sm.Ruk, r, k, w, start, len, H, h);
    __syncthreads();   // the rows of block q are written
    rwkv::tc::mma_strip<false, false, SPLIT, N / 16>(acc, sAw, LA, sm.X, TcScoreSmem<N>::LDX, 16 * (q + 1));
    __syncwarp();
    tc_write_rows<T, N>(y, acc, sAw, LA, q, start, len, H, h, vec != 0);
}

// ------------------------------------------------------------------------------------------------------
// Single-pass chunked forward (dense batches, N <= 64): wkv6_tc_state + wkv6_chunk_scan + wkv6_tc_output in one
// launch, each chunk's inputs read once.  Blocks take tickets in the order they start, chunk-major (every (sequence,
// head) of chunk c before chunk c + 1), so the block a ticket waits on (chunk c - 1 of its (sequence, head)) has
// always started: no deadlock.  Per block: the intra-chunk outputs (scores, A V: as wkv6_tc_output) and the chunk's
// own state A_c = V^T Kt with its decay product P_c (as wkv6_tc_state) need nothing from other chunks; then the
// block gets S_in(c) (the initial state, chunk c - 1's publication, or a look-back: step 3), publishes S_in(c + 1) = S_in(c) P_c +
// A_c (the fmaf of wkv6_chunk_scan, so the chunk states are those of the three-kernel path) into buf (the chunk-start
// states the chunked backward reuses) with a release flag, or writes the final state; and only then adds the
// inter-chunk term (Qh f) S_in^T to its outputs, off the chain's critical path.
// buf: fp32 [B, nc, H, N, N] (S_in of every chunk); agg: fp32 [B, nc, H, N * N + N] (lookback != 0; else null);
// flags: int [B * nc * H + 1] (0: nothing, 1: aggregate, 2: inclusive state published), zeroed before the launch,
// the last entry the ticket counter.  A predecessor that never publishes (impossible for a well-formed launch) raises error 3
// after TC_SPIN_LIMIT polls instead of hanging the GPU.
namespace wkv6 {
constexpr int TC_SPIN_LIMIT = 1 << 22;

__device__ __forceinline__ int ld_acquire(const int* p) {
#ifdef __CUDA_ARCH__
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#else
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

__device__ __forceinline__ void st_release(int* p, int v) {
#ifdef __CUDA_ARCH__
    asm volatile("st.release.gpu.global.s32 [%0], %1;" : : "l"(p), "r"(v) : "memory");
#else
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

// Another block's publication is read at L2 (never a stale L1 line).
__device__ __forceinline__ float2 ld_l2(const float* p) {
#ifdef __CUDA_ARCH__
    return __ldcg(reinterpret_cast<const float2*>(p));
#else
    return *reinterpret_cast<const float2*>(p);
#endif
}
}  // namespace wkv6

template <typename T, int N>
__global__ void __launch_bounds__(wkv6::TC_THREADS, 3) wkv6_tc_fused(
    int Tlen, int H, int BH, const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ w, const T* __restrict__ u, float* buf, float* agg, int* flags, int lookback,
    const float* state_in, float* state_out, const int* __restrict__ state_idx, int pool_size, int* err,
    T* __restrict__ y, int vec)
{
    using namespace wkv6;
    using rwkv::tc::acc_row;
    using rwkv::tc::acc_col;
    constexpr int L = TC_L, LD = N + 4, LA = L + 4, NB = L / 16, NT = N / 16, LDX = TcScoreSmem<N>::LDX;
    constexpr bool SPLIT = rwkv::tc::is_f32<T>::value;
    static_assert(N <= L && NB == TC_THREADS / 32, "one warp per 16-token block");
    extern __shared__ __align__(32) float smem[];
    __shared__ int s_ticket, s_back;
    const int nc = (Tlen + L - 1) / L, tid = threadIdx.x, q = tid / 32;
    if (tid == 0) s_ticket = atomicAdd(flags + (long long)BH * nc, 1);
    __syncthreads();
    const int ticket = s_ticket, c = ticket / BH, b = (ticket % BH) / H;
    const long long idx = ((long long)b * nc + c) * H + ticket % H;   // the chunk-buffer slot, as tc_chunk's
    const TcChunk ch = tc_chunk_at(Tlen, H, L, idx);
    const int h = ch.h, len = ch.len;
    const long long start = ch.start;
    const TcScoreSmem<N> sm = tc_score_setup<T, N>(smem, r, k, w, v, u, nullptr, start, len, H, h, vec != 0);
    float* sAw = sm.A + q * 16 * LA;
    float* fq = sm.F + q * LD;

    // 1. intra-chunk outputs of block q (warp q computes the score rows of block NB - 1 - q, as wkv6_tc_output)
    const int qs = NB - 1 - q;
    tc_scores<T, N, SPLIT>(sm.A + qs * 16 * LA, LA, sm.Q + 16 * qs * LD, sm.K, sm.E, fq, qs, sm.Unsafe[qs] != 0,
                           sm.Ruk, r, k, w, start, len, H, h);
    __syncthreads();   // the rows of block q are written; the warps' factor rows are free
    float acc[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(acc[n]);
    rwkv::tc::mma_strip<false, false, SPLIT, NT>(acc, sAw, LA, sm.X, LDX, 16 * (q + 1));
    __syncwarp();
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::store_tile(sAw + 16 * n, LA, acc[n]);   // parked in the warp's own rows
    // the chunk's factors (as wkv6_tc_state): F[p][j] = 2^(totals of the blocks after p), U[j] = P_c[j]
    for (int e = tid; e < (NB + 1) * N; e += TC_THREADS) {
        const int p = e / N, j = e % N;
        float g = 0.f;
        for (int p2 = 0; p2 < NB; ++p2) g += (p == NB || p2 > p) ? sm.E[p2 * LD + j] : 0.f;
        (p < NB ? sm.F + p * LD : sm.U)[j] = exp2f(g);
    }
    __syncthreads();

    // 2. the chunk's own state A_c = V^T Kt, Kt = Ks F[p] for key block p (wkv6_tc_state); warp q: value rows 16q..
    float accS[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(accS[n]);
    if (q < NT) {
#pragma unroll
        for (int p = 0; p < NB; ++p)
            mma_strip_scaled<true, false, SPLIT, NT>(accS, sm.X + 16 * p * LDX + 16 * q, LDX, nullptr,
                                                     sm.K + 16 * p * LD, nullptr, LD, sm.F + p * LD, 16);
    }

    // 3. S_in(c): the initial state, or the state after the nearest predecessor j that has published its inclusive
    //    state (S_in(j + 1), in buf) folded forward through the aggregates (A_m, P_m) of chunks j < m < c, in chunk
    //    order with the fmaf of the chain, so S_in(c) is bit for bit the sequential scan's whatever the timing.
    //    lookback = 0: j = c - 1 always (a pure chain: no aggregates written); 1: every chunk c > 0 publishes its
    //    aggregate first (flag 1), so a waiting chunk need not wait for a whole chain of inclusive states (few
    //    (sequence, head) chains with many chunks); 2 (tests): fold back to chunk 0 every time.
    long long slot = -1;
    if (c == 0 || c == nc - 1) slot = rwkv::state_slot(state_idx, b, pool_size, err);
    constexpr int AGG = N * N + N;   // an aggregate: A_c (N x N), then P_c (N)
    if (lookback != 0 && c > 0) {
        float* a = agg + idx * AGG;
        if (q < NT) {
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 8; e += 2)
                    *reinterpret_cast<float2*>(a + (16 * q + acc_row(e)) * N + 16 * n + acc_col(e)) =
                        make_float2(accS[n][e], accS[n][e + 1]);
        }
        for (int j = tid; j < N; j += TC_THREADS) a[N * N + j] = sm.U[j];
        __threadfence();
        __syncthreads();
        if (tid == 0) st_release(flags + idx, 1);
    }
    if (c > 0 && tid == 0) {
        int cj = c - 1;   // walk back to the nearest inclusive state (chunk 0 only ever publishes one)
        for (int spins = 0;;) {
            const int f = ld_acquire(flags + idx - (long long)(c - cj) * H);
            if (f == 2 && !(lookback == 2 && cj > 0)) break;
            if (f != 0 && lookback != 0) { --cj; continue; }
            if (++spins > TC_SPIN_LIMIT) {   // never expected: report instead of hanging
                if (err) *(volatile int*)err = rwkv::ERR_LOOKBACK_TIMEOUT;
                break;
            }
        }
        __threadfence();
        s_back = cj;
    }
    __syncthreads();   // also: every warp is done with X and K (A_c) and F
    const int cj = c > 0 ? s_back : 0;
    const float* s_in = c > 0 ? buf + (idx - (long long)(c - cj - 1) * H) * (N * N)
                              : (state_in != nullptr && slot >= 0 ? state_in + (slot * H + h) * (long long)(N * N)
                                                                  : nullptr);
    float* pub = c + 1 < nc ? buf + (idx + H) * (N * N)
                            : (state_out != nullptr && slot >= 0 ? state_out + (slot * H + h) * (long long)(N * N)
                                                                 : nullptr);
    if (q < NT) {
        float2 s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                const int o = (16 * q + acc_row(e)) * N + 16 * n + acc_col(e);
                s[n][e / 2] = make_float2(0.f, 0.f);
                if (s_in != nullptr) s[n][e / 2] = c > 0 ? ld_l2(s_in + o) : *reinterpret_cast<const float2*>(s_in + o);
            }
#pragma unroll 1
        for (int m = cj + 1; m < c; ++m) {   // the aggregates after the inclusive state, in order
            const float* a = agg + (idx - (long long)(c - m) * H) * AGG;
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 8; e += 2) {
                    const int j = 16 * n + acc_col(e);
                    const float2 A = ld_l2(a + (16 * q + acc_row(e)) * N + j), P = ld_l2(a + N * N + j);
                    s[n][e / 2] = make_float2(fmaf(s[n][e / 2].x, P.x, A.x), fmaf(s[n][e / 2].y, P.y, A.y));
                }
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                const int i = 16 * q + acc_row(e), j = 16 * n + acc_col(e);
                const float2 x = s[n][e / 2];
                if (c == 0) *reinterpret_cast<float2*>(buf + idx * (N * N) + i * N + j) = x;
                if (pub != nullptr)
                    *reinterpret_cast<float2*>(pub + i * N + j) =
                        make_float2(fmaf(x.x, sm.U[j], accS[n][e]), fmaf(x.y, sm.U[j + 1], accS[n][e + 1]));
                *reinterpret_cast<float2*>(sm.K + i * LD + j) = x;   // S_in for the inter-chunk term
            }
    }
    if (c + 1 < nc) {
        __threadfence();
        __syncthreads();
        if (tid == 0) st_release(flags + idx, 2);
    }
    __syncthreads();   // S_in is in K

    // 4. inter-chunk term of block q: (Qh f) S_in^T, f = the decays of the chunk's earlier blocks
    tc_col_factor<N>(fq, sm.E, 0, q, -1);
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(acc[n]);
    mma_strip_scaled<false, true, SPLIT, NT>(acc, sm.Q + 16 * q * LD, LD, fq, sm.K, nullptr, LD, nullptr, N);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[n][e] += sAw[acc_row(e) * LA + 16 * n + acc_col(e)];
    __syncwarp();
    tc_write_rows<T, N>(y, acc, sAw, LA, q, start, len, H, h, vec != 0);
}

// ------------------------------------------------------------------------------------------------------
// Chunk-parallel backward on tensor cores (dense batches, chunks of TC_L tokens, N <= 64).  Per (sequence,
// chunk, head), from the state at the chunk's start S0 (sbuf, the forward chunk scan) and the adjoint at its
// last token G = dL/dS_end (gbuf, the reverse chunk scan), with B[t, s] = dy_t . v_s and the scores A of
// wkv6_tc_output (ruk on the diagonal):
//   dv_s = sum_{t >= s} A[t, s] dy_t + G Kt_s,                Kt_s = k_s * exp(log decays after s in the chunk)
//   dr_t = u*k_t (dy_t.v_t) + gamma_{t-1} * (S0^T dy_t) + sum_{s<t} B[t, s] k_s prod_{s<s'<t} d_s'
//   dk_s = u*r_s (dy_s.v_s) + Kt_s/k_s * (G^T v_s)     + sum_{t>s} B[t, s] r_t prod_{s<s'<t} d_s'
//   du   = sum_t r_t k_t (dy_t.v_t)                     (per chunk; wkv6_reduce_u sums the chunks in order)
//   dw_t = -exp(w_t) * dlogd_t,  dlogd_m = sum_{t >= m} e_t - r_m dr'_m + sum_j' <G, S_end>_col,
//          e_t = r_t dr'_t - k_t dk'_t (dr', dk' without the u terms)
// (every log decay of a chunk scales the terms whose range covers it: + on the query side, - on the key side,
// + for the chunk's end state).  Decay products use the same block-local sums as the forward.
// wkv6_tc_bwd_v computes dv; wkv6_tc_bwd_rkw dr, dk, dw and the du partials.  vec: inputs and gradients 16-byte
// aligned.

// Shared memory: tc_output_smem(N) in wkv6.py (the layout of wkv6_tc_output).
template <typename T, int N>
__global__ void __launch_bounds__(wkv6::TC_THREADS) wkv6_tc_bwd_v(
    int Tlen, int H, const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ w,
    const T* __restrict__ u, const T* __restrict__ dy, const float* __restrict__ gbuf, T* __restrict__ dv, int vec)
{
    using namespace wkv6;
    constexpr int L = TC_L, LD = N + 4, LA = L + 4, NB = L / 16;
    constexpr bool SPLIT = rwkv::tc::is_f32<T>::value;
    static_assert(N <= L && NB == TC_THREADS / 32, "one warp per 16-token block");
    extern __shared__ __align__(32) float smem[];
    const TcChunk ch = tc_chunk(Tlen, H, L);
    const int h = ch.h, len = ch.len, q = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long bc = ch.bc, start = ch.start;
    // sX = dy; sA = G (N rows), then the scores A, then dv
    const TcScoreSmem<N> sm = tc_score_setup<T, N>(smem, r, k, w, dy, u, gbuf + ((long long)bc * H + h) * (N * N),
                                                   start, len, H, h, vec != 0);
    float* sA = sm.A;
    // inter-chunk part: dv_s += G Kt_s for the warp's key block q, Kt_s = Ks_s f (f: the chunk's later blocks)
    float* Aq = sA + 16 * q * LA;
    float* fq = sm.F + q * LD;
    tc_col_factor<N>(fq, sm.E, q + 1, NB, -1);
    float acc[N / 16][8];
#pragma unroll
    for (int n = 0; n < N / 16; ++n) rwkv::tc::zero(acc[n]);
    mma_strip_scaled<false, true, SPLIT, N / 16>(acc, sm.K + 16 * q * LD, LD, fq, sA, nullptr, LD, nullptr, N);
    __syncthreads();   // every warp is done with G: A takes the scores
    tc_scores<T, N, SPLIT>(Aq, LA, sm.Q + 16 * q * LD, sm.K, sm.E, fq, q, sm.Unsafe[q] != 0, sm.Ruk, r, k, w, start,
                           len, H, h);
    __syncthreads();   // every row of A is written
    // (A^T dY) rows of key block q: op(A)[s, t] = A[t, s]; rows t < 16q of column block q are zero
    rwkv::tc::mma_strip<true, false, SPLIT, N / 16>(acc, sA + 16 * q + 16 * q * LA, LA,
                                                    sm.X + 16 * q * TcScoreSmem<N>::LDX, TcScoreSmem<N>::LDX,
                                                    L - 16 * q);
    __syncthreads();   // every warp is done reading A
    tc_write_rows<T, N>(dv, acc, Aq, LA, q, start, len, H, h, vec != 0);
}

template <typename T, int N>
__global__ void __launch_bounds__(wkv6::TC_THREADS) wkv6_tc_bwd_rkw(
    int Tlen, int H, const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ w, const T* __restrict__ u, const T* __restrict__ dy, const float* __restrict__ sbuf,
    const float* __restrict__ gbuf, T* __restrict__ dr, T* __restrict__ dk, T* __restrict__ dw,
    float* __restrict__ du_part, int vec)
{
    using namespace wkv6;
    using rwkv::tc::acc_row;
    using rwkv::tc::acc_col;
    constexpr int L = TC_L, LD = N + 4, LA = L + 4, NB = L / 16, NT = N / 16;
    constexpr bool SPLIT = rwkv::tc::is_f32<T>::value;
    static_assert(N <= L && NB == TC_THREADS / 32, "one warp per 16-token block");
    extern __shared__ __align__(32) float smem[];
    float* X1 = smem;              // dy, then G, then r
    float* X2 = X1 + L * LD;       // v, then k
    float* X3 = X2 + L * LD;       // S0, then the log2 decays
    float* X4 = X3 + L * LD;       // 2^alpha, then X_t of the exact dw recurrence (chunks with unsafe blocks)
    float* X5 = X4 + L * LD;       // 2^sigma, then its Z, then the output staging
    float* sB = X5 + L * LD;       // [L][LA] B[t, s] = dy_t . v_s for s < t, else 0
    float* sE = sB + L * LA;       // [NB][LD] block totals
    float* sTot = sE + NB * LD;    // [NB][LD] per-block column sums of e
    float* sTot2 = sTot + NB * LD; // [NB][LD] per-block column sums of ki
    float* sTot3 = sTot2 + NB * LD; // [NB][LD] per-block column sums of the intra k part
    float* sDyv = sTot3 + NB * LD; // [L] dy_t . v_t
    float* sU = sDyv + L;          // [N]
    float* sGS = sU + N;           // [N] <G, S0>_col
    float* sF = sGS + N;           // [NB][LD] per-warp channel factors
    int* sUnsafe = reinterpret_cast<int*>(sF + NB * LD);
    const TcChunk ch = tc_chunk(Tlen, H, L);
    const int h = ch.h, len = ch.len, tid = threadIdx.x, q = tid / 32, lane = tid % 32, g8 = lane / 4;
    const long long bc = ch.bc, start = ch.start;
    const long long cb = (long long)bc * H + h;

    // 1. B (rows of query block q) and dY S0
    tc_stage<T, N, 2>({X1, X2}, {dy, v}, 0u, LD, start, len, H, h, vec != 0);
    tc_stage_state<N>(X3, LD, sbuf + cb * (N * N));
    __syncthreads();
    float* Bq = sB + 16 * q * LA;
    // the NB (NB + 1) / 2 tiles (query block qq, key block p <= qq) dealt to the warps in turn (by query block,
    // warp NB - 1 would compute NB tiles and warp 0 one); a diagonal tile's warp masks it (s >= t) and keeps
    // dy_t . v_t; the tiles above the diagonal are zero
    for (int tile = q; tile < NB * (NB + 1) / 2; tile += TC_THREADS / 32) {
        int qq = 0;
        while ((qq + 1) * (qq + 2) / 2 <= tile) ++qq;
        const int p = tile - qq * (qq + 1) / 2;
        float sc[8];
        rwkv::tc::zero(sc);
        rwkv::tc::mma_tile<false, true, SPLIT>(sc, X1 + 16 * qq * LD, LD, X2 + 16 * p * LD, LD, N);
        float* Bt = sB + 16 * qq * LA + 16 * p;
        rwkv::tc::store_tile(Bt, LA, sc);
        if (p == qq) {
            __syncwarp();
            for (int e = lane; e < 256; e += 32) {
                const int t = e / 16, s = e % 16;
                if (s == t) sDyv[16 * qq + t] = Bt[t * LA + s];
                if (s >= t) Bt[t * LA + s] = 0.f;
            }
        }
    }
    for (int e = tid; e < L * (L / 4); e += TC_THREADS) {
        const int t = e / (L / 4), s = 4 * (e % (L / 4));
        if (s >= 16 * (t / 16 + 1)) *reinterpret_cast<float4*>(sB + t * LA + s) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float accR[NT][8], accK[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(accR[n]);
    rwkv::tc::mma_strip<false, false, SPLIT, NT>(accR, X1 + 16 * q * LD, LD, X3, LD, N);
    __syncthreads();
    // 2. V G (rows of key block q) and <G, S0>_col
    tc_stage_state<N>(X1, LD, gbuf + cb * (N * N));
    __syncthreads();
    {   // <G, S0>_col: two threads per column (adjacent lanes), fixed order
        const int j = tid / 2, half = tid % 2;
        float a = 0.f;
        if (j < N)
            for (int i = half * (N / 2); i < (half + 1) * (N / 2); ++i) a += X1[i * LD + j] * X3[i * LD + j];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        if (half == 0 && j < N) sGS[j] = a;
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(accK[n]);
    rwkv::tc::mma_strip<false, false, SPLIT, NT>(accK, X2 + 16 * q * LD, LD, X1, LD, N);
    __syncthreads();
    // 3. r, k, decays; du partial; block scans
    tc_stage<T, N, 3>({X1, X2, X3}, {r, k, w}, 4u, LD, start, len, H, h, vec != 0);
    for (int j = tid; j < N; j += TC_THREADS) sU[j] = rwkv::to_float(u[h * N + j]);
    if (tid < NB) sUnsafe[tid] = 0;
    __syncthreads();
    {   // du partial: two threads per channel (adjacent lanes), fixed order
        const int j = tid / 2, half = tid % 2;
        float a = 0.f;
        if (j < N)
            for (int t = half * (L / 2); t < (half + 1) * (L / 2); ++t)
                a += X1[t * LD + j] * X2[t * LD + j] * sDyv[t];
        a += __shfl_xor_sync(0xffffffffu, a, 1);
        if (half == 0 && j < N) du_part[cb * N + j] = a;
    }
    tc_block_scan<N>(X3, LD, sE, false, nullptr, X4, sUnsafe, nullptr, X5);
    __syncthreads();
    const bool unsafe = sUnsafe[q] != 0;
    float* fq = sF + q * LD;

    // 4. dk' for key block q: exp(sigma_s) * [ (V G)_s exp(E after block q) + sum_{t in later blocks} B[t, s]
    //    r_t exp(alpha_t + E strictly between) + sum_{t in block q} B[t, s] r_t exp(alpha_t - E_q) ]
    tc_col_factor<N>(fq, sE, q + 1, NB, -1);   // the decays of the chunk's later blocks
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) accK[n][e] *= fq[16 * n + acc_col(e)];
    float kin[NT][8];   // the inter-chunk part of dk' (before its exp(sigma_s) factor)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) kin[n][e] = accK[n][e];
    for (int q2 = q + 1; q2 <= NB; ++q2) {
        if (q2 == NB && unsafe) break;
        const int qb = q2 == NB ? q : q2;   // q2 == NB: the diagonal block, last
        __syncwarp();   // every lane is done with fq
        if (qb == q) tc_col_factor<N>(fq, sE, 0, 0, q);
        else tc_col_factor<N>(fq, sE, q + 1, qb, -1);
        // op(A)[s, t] = B[t, s]; the query operand r_t 2^alpha_t f[j] scaled as it loads
        mma_strip_scaled<true, false, SPLIT, NT>(accK, sB + 16 * qb * LA + 16 * q, LA, nullptr, X1 + 16 * qb * LD,
                                                 X4 + 16 * qb * LD, LD, fq, 16);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int s = 16 * q + acc_row(e), j = 16 * n + acc_col(e);
            const float f = X5[s * LD + j];   // 2^sigma_s
            accK[n][e] *= f;
            kin[n][e] *= f;
            if (unsafe)   // exact pairwise sum over the block's later tokens
                accK[n][e] += tc_pair_exact<T, N>(sB + s, LA, X1, s + 1, 1, 16 * q + 15 - s, j, w, start, len, H, h);
        }

    // 5. dr' for query block q: exp(alpha_t) * [ (dY S0)_t exp(E before block q) + sum_{p <= q} B_qp Kh_p ]
    __syncwarp();
    tc_col_factor<N>(fq, sE, 0, q, -1);   // the decays of the chunk's earlier blocks
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) accR[n][e] *= fq[16 * n + acc_col(e)];
    float rin[NT][8];   // the inter-chunk part of dr' (before its exp(alpha_t) factor)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) rin[n][e] = accR[n][e];
    for (int p = 0; p <= q; ++p) {
        if (p == q && unsafe) break;
        __syncwarp();   // every lane is done with fq
        tc_pair_factor<N>(fq, sE, p, q);
        // the key operand k_s 2^sigma_s f[j] scaled as it loads
        mma_strip_scaled<false, false, SPLIT, NT>(accR, Bq + 16 * p, LA, nullptr, X2 + 16 * p * LD, X5 + 16 * p * LD,
                                                  LD, fq, 16);
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int t = 16 * q + acc_row(e), j = 16 * n + acc_col(e);
            accR[n][e] *= X4[t * LD + j];
            rin[n][e] *= X4[t * LD + j];
            if (unsafe)   // exact pairwise sum over the block's earlier tokens
                accR[n][e] += tc_pair_exact<T, N>(sB + t * LA, 1, X2, t - 1, -1, t - 16 * q, j, w, start, len, H, h);
        }

    // 6. dw.  With ki_s = k_s dk'inter_s, ri_t = r_t dr'inter_t and the pair terms of the intra-chunk part,
    //    dlogd_t = gamma_end <G, S0>_col + sum_{s<t} ki_s + sum_{t'>t} ri_t' + X_t,
    //    X_t = sum_{s < t < t'} B[t', s] r_t' k_s prod_{s<s'<t'} d_s'   (the pairs whose decay product covers t).
    //    Every sum is taken over exactly its terms (prefix / suffix scans, no total-minus-part) so that strongly
    //    decayed tokens keep their small gradients.  Where every block is safe, X_t = sum_{t'>t} r_t' dr'intra_t'
    //    - sum_{s>=t} k_s dk'intra_s (pairs not covering t cancel, their size bounded by the safe span); else X_t
    //    comes from an exact per-channel recurrence over the chunk (below), with no subtraction at all.
    __syncthreads();   // X4 (2^alpha) and X5 (2^sigma) are free
    bool chunk_unsafe = false;
    for (int p = 0; p < NB; ++p) chunk_unsafe |= sUnsafe[p] != 0;
    if (chunk_unsafe) {
        // per channel j: Z_t[t'] = sum_{s<t} B[t', s] k_s prod_{s<s'<=t} d_s' (t' > t), Z_{t+1} = d_{t+1} (Z_t + B[:, t] k_t);
        // X_t = sum_{t'>t} r_t' prod_{t<s'<t'} d_s' Z_t[t'].  d = 2^(X3), Z in X5, X_t into X4.
        for (int j = tid; j < N; j += TC_THREADS) {
            for (int t = 0; t < L; ++t) X5[t * LD + j] = 0.f;
            for (int t = 0; t < L; ++t) {
                float pr = 1.f, x = 0.f;
                for (int t2 = t + 1; t2 < L; ++t2) {
                    x += X1[t2 * LD + j] * pr * X5[t2 * LD + j];
                    pr *= exp2f(X3[t2 * LD + j]);
                }
                X4[t * LD + j] = x;
                if (t + 1 < L) {
                    const float dn = exp2f(X3[(t + 1) * LD + j]), kt = X2[t * LD + j];
                    for (int t2 = t + 2; t2 < L; ++t2)
                        X5[t2 * LD + j] = dn * (X5[t2 * LD + j] + sB[t2 * LA + t] * kt);
                }
            }
        }
    }
    // block-local scans (rows g8 and g8 + 8 of a column live on the 8 lanes with equal lane % 4) and per-block
    // column totals: ri (+ intra r part) exclusive suffix, intra k part inclusive suffix, ki exclusive prefix
    float rsx[NT][8], ksx[NT][8], kpx[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if ((e % 4) >= 2) continue;
            const int j = 16 * n + acc_col(e), t0 = 16 * q + acc_row(e), t1 = t0 + 8;
            const float r0 = X1[t0 * LD + j], r1 = X1[t1 * LD + j], k0 = X2[t0 * LD + j], k1 = X2[t1 * LD + j];
            float rt = r0 * (chunk_unsafe ? rin[n][e] : accR[n][e]);
            float rb = r1 * (chunk_unsafe ? rin[n][e + 2] : accR[n][e + 2]);
            float kt = chunk_unsafe ? 0.f : k0 * (accK[n][e] - kin[n][e]);
            float kb = chunk_unsafe ? 0.f : k1 * (accK[n][e + 2] - kin[n][e + 2]);
            float it = k0 * kin[n][e], ib = k1 * kin[n][e + 2];
            float tot;
            wkv6::col_scan<true>(rt, rb, tot, true);
            if (g8 == 0) sTot[q * LD + j] = tot;
            rsx[n][e] = rt; rsx[n][e + 2] = rb;
            wkv6::col_scan<true>(kt, kb, tot, false);
            if (g8 == 0) sTot3[q * LD + j] = tot;
            ksx[n][e] = kt; ksx[n][e + 2] = kb;
            wkv6::col_scan<false>(it, ib, tot, true);
            if (g8 == 0) sTot2[q * LD + j] = tot;
            kpx[n][e] = it; kpx[n][e + 2] = ib;
        }
    __syncthreads();
    // the part of dlogd shared by the tokens of block qq in channel j (the other blocks' totals and the chunk's
    // end-state term), once per (block, channel), into sF (the warps' factor rows are done with)
    for (int idx = tid; idx < NB * N; idx += TC_THREADS) {
        const int qq = idx / N, j = idx % N;
        float gs = 0.f, o = 0.f;
        for (int p = 0; p < NB; ++p) {
            gs += sE[p * LD + j];
            if (p > qq) o += sTot[p * LD + j] - sTot3[p * LD + j];
            if (p < qq) o += sTot2[p * LD + j];
        }
        sF[qq * LD + j] = o + exp2f(gs) * sGS[j];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int t = 16 * q + acc_row(e), j = 16 * n + acc_col(e);
            float dlog = rsx[n][e] - ksx[n][e] + kpx[n][e] + sF[q * LD + j];
            if (chunk_unsafe) dlog += X4[t * LD + j];
            const float rt = X1[t * LD + j], kt = X2[t * LD + j];
            rsx[n][e] = dlog * X3[t * LD + j] * TC_LN2;   // dw (padding rows: never written)
            accR[n][e] += sU[j] * kt * sDyv[t];
            accK[n][e] += sU[j] * rt * sDyv[t];
        }
    // coalesced stores through the warp's 16 rows of X5 (free: the exact recurrence is done with Z; barrier above)
    float* stage = X5 + 16 * q * LD;
    tc_write_rows<T, N>(dr, accR, stage, LD, q, start, len, H, h, vec != 0);
    __syncwarp();
    tc_write_rows<T, N>(dk, accK, stage, LD, q, start, len, H, h, vec != 0);
    __syncwarp();
    tc_write_rows<T, N>(dw, rsx, stage, LD, q, start, len, H, h, vec != 0);
}

template <typename T, int N>
__global__ void __launch_bounds__(256) wkv6_chunk_scan(
    int Tlen, int H, int L, float* __restrict__ buf, const float* __restrict__ dec,
    const float* state_in, float* state_out, const int* __restrict__ state_idx, int pool_size, int* err, int rev)
{
    constexpr int NB = (N * N / 4 + 255) / 256;      // blocks per (b, h): 1, 4, 16
    const int nc = (Tlen + L - 1) / L;
    const int part = blockIdx.x % NB, bh = blockIdx.x / NB, h = bh % H, b = bh / H;
    const int e = part * 256 + threadIdx.x;           // float4 index inside the N x N state
    if (e >= N * N / 4) return;
    const int cq = e % (N / 4);
    const long long slot = rwkv::state_slot(state_idx, b, pool_size, err);
    float4 S = make_float4(0.f, 0.f, 0.f, 0.f);
    if (state_in != nullptr && slot >= 0) S = wkv6::ld4(state_in + (slot * H + h) * (long long)(N * N) + 4 * e);
    const long long cb0 = (long long)b * nc * H + h;   // chunk c of (b, h) sits at cb0 + c*H
    const long long c0 = rev ? nc - 1 : 0;             // rev: chunks in reverse order (the backward's adjoint)
    float4* a = reinterpret_cast<float4*>(buf + (cb0 + c0 * H) * (N * N)) + e;
    const float* pd = dec + (cb0 + c0 * H) * N + 4 * cq;
    const long long astep = (rev ? -1 : 1) * (long long)H * (N * N / 4), dstep = (rev ? -1 : 1) * (long long)H * N;
    // the loads run D chunks ahead of the (serial) scan, so the loop waits on memory once per D chunks rather than
    // once per chunk: few (sequence, head) pairs with many chunks (batch-1 prefill) are latency bound (D = 8 took
    // 110 registers, two blocks per SM, and was slower at B = 8, T = 4096: 216 vs 188 us)
    constexpr int D = 4;
    float4 A[D], P[D];
    const float4* ra = a;    // read cursors, D chunks ahead of a
    const float* rp = pd;
#pragma unroll
    for (int i = 0; i < D; ++i, ra += astep, rp += dstep)
        if (i < nc) { A[i] = *ra; P[i] = wkv6::ld4(rp); }
    for (int cb = 0; cb < nc; cb += D) {
#pragma unroll
        for (int i = 0; i < D; ++i) {
            if (cb + i < nc) {
                const float4 Ac = A[i], Pc = P[i];
                if (cb + i + D < nc) { A[i] = *ra; P[i] = wkv6::ld4(rp); }
                ra += astep; rp += dstep;
                *a = S;
                a += astep;
                S.x = fmaf(S.x, Pc.x, Ac.x);
                S.y = fmaf(S.y, Pc.y, Ac.y);
                S.z = fmaf(S.z, Pc.z, Ac.z);
                S.w = fmaf(S.w, Pc.w, Ac.w);
            }
        }
    }
    if (state_out != nullptr && slot >= 0)
        *reinterpret_cast<float4*>(state_out + (slot * H + h) * (long long)(N * N) + 4 * e) = S;
}

template <typename T, int N>
__global__ void __launch_bounds__(N, 1) wkv6_chunk_output(
    int Tlen, int H, int L,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u, const float* __restrict__ buf, T* __restrict__ y)
{
    const int nc = (Tlen + L - 1) / L;
    const int h = blockIdx.x % H, bc = blockIdx.x / H, c = bc % nc, b = bc / nc, i = threadIdx.x;
    const long long start = (long long)b * Tlen + (long long)c * L;
    const long long len = min((long long)L, (long long)Tlen - (long long)c * L);
    wkv6::forward_rows<T, N>(start, len, H, h, r, k, v, w, u,
                             buf + ((long long)bc * H + h) * (N * N) + (long long)i * N, nullptr, y);
}

// ------------------------------------------------------------------------------------------------------
// Forward for decode (one token per sequence; correct for any length).  256 threads per (sequence, head);
// thread owns the float4 quads (row, 4*cq .. 4*cq+3), cq = tid % (N/4), rows tid/(N/4) + g*(256/(N/4)).
// State traffic is fully coalesced 16-byte accesses; y_i is a sum over the N/4 lanes of a row (shuffles
// inside an aligned lane group).  The state is a stream read and written once per call (134 MB each way at
// 256 sequences, H = 32, N = 64): its loads and stores carry the evict-first hint (ld/st.global.cs), so that it
// does not displace the rest from L2.  H100, 256 sequences (benchmarks/wkv6_decode_sweep.py): 0.101 -> 0.095 ms
// dense, 0.107 -> 0.099 ms pool (a torch copy of the state: 0.093); capping registers at 64 for a fourth resident
// block, cp.async or bulk-copy (TMA) staging in shared memory, 128 or 512 threads were all slower.

namespace wkv6 {
// Evict-first 16-byte state accesses (plain ones without a CUDA arch: the CPU emulation of the tests).
__device__ __forceinline__ float4 ld4_stream(const float* p) {
#ifdef __CUDA_ARCH__
    return __ldcs(reinterpret_cast<const float4*>(p));
#else
    return ld4(p);
#endif
}
__device__ __forceinline__ void st4_stream(float* p, float4 x) {
#ifdef __CUDA_ARCH__
    __stcs(reinterpret_cast<float4*>(p), x);
#else
    *reinterpret_cast<float4*>(p) = x;
#endif
}
}  // namespace wkv6

template <typename T, int N>
__global__ void __launch_bounds__(256) wkv6_forward_stream(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u,
    const float* state_in, float* state_out, const int* __restrict__ state_idx, int pool_size,
    T* __restrict__ y, int* err)
{
    constexpr int NQ = N / 4;              // lanes per row: 8, 16, 32
    constexpr int RPP = 256 / NQ;          // rows per pass
    constexpr int G = N / RPP;             // passes (quads per thread): 1, 4, 16
    static_assert(G * RPP == N, "bad geometry");
    const int s = blockIdx.x / H, h = blockIdx.x % H, tid = threadIdx.x;
    const int cq = tid % NQ, row0 = tid / NQ;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, s, pool_size, err);
    const long long sbase = (slot * H + h) * (long long)(N * N) + 4 * cq;

    float4 st[G];
    if (state_in != nullptr && slot >= 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) st[g] = wkv6::ld4_stream(state_in + sbase + (long long)(row0 + g * RPP) * N);
    } else {
#pragma unroll
        for (int g = 0; g < G; ++g) st[g] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float u0, u1, u2, u3;
    wkv6::load4(u + h * N + 4 * cq, u0, u1, u2, u3);
    for (long long t = start; t < end; ++t) {
        const long long base = (t * H + h) * N;
        float r0, r1, r2, r3, k0, k1, k2, k3, w0, w1, w2, w3;
        wkv6::load4(r + base + 4 * cq, r0, r1, r2, r3);
        wkv6::load4(k + base + 4 * cq, k0, k1, k2, k3);
        wkv6::load4(w + base + 4 * cq, w0, w1, w2, w3);
        const float d0 = wkv6::decay_of(w0), d1 = wkv6::decay_of(w1), d2 = wkv6::decay_of(w2), d3 = wkv6::decay_of(w3);
        const float a0 = u0 * k0, a1 = u1 * k1, a2 = u2 * k2, a3 = u3 * k3;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const int row = row0 + g * RPP;
            const float vi = rwkv::to_float(v[base + row]);
            float4 x = st[g];
            float acc = r0 * fmaf(a0, vi, x.x);
            acc = fmaf(r1, fmaf(a1, vi, x.y), acc);
            acc = fmaf(r2, fmaf(a2, vi, x.z), acc);
            acc = fmaf(r3, fmaf(a3, vi, x.w), acc);
            x.x = fmaf(x.x, d0, k0 * vi);
            x.y = fmaf(x.y, d1, k1 * vi);
            x.z = fmaf(x.z, d2, k2 * vi);
            x.w = fmaf(x.w, d3, k3 * vi);
            st[g] = x;
#pragma unroll
            for (int m = NQ / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
            if (cq == 0) y[base + row] = rwkv::from_float<T>(acc);
        }
    }
    if (state_out != nullptr && slot >= 0) {
#pragma unroll
        for (int g = 0; g < G; ++g)
            wkv6::st4_stream(state_out + sbase + (long long)(row0 + g * RPP) * N, st[g]);
    }
}

// ------------------------------------------------------------------------------------------------------
// Backward pass 1 (forward in time).  Thread j owns key column j of S (S[:, j] in registers).
//   dr_t[j] = u_j k_t[j] (dy_t . v_t) + sum_i dy_t[i] S_{t-1}[i,j]
//   xs[t][j] = (X_t[j], d_t[j] * nS_{t-1}[j] * BOUND_SLACK)             (fp32 scratch, for dw; see pass 2)
//     X_t[j] = r_t[j] * sum_i dy_t[i] S_{t-1}[i,j],  nS_{t-1}[j] >= |S_{t-1}[:, j]|
//   ckpt[chunk c] = S at the end of chunk c (tokens [c*CK, min((c+1)*CK, len)))
// nS: the exact norm at the start and at every chunk end, else nS_t = d_t nS_{t-1} + |k_t[j]| |v_t| (triangle
// inequality; one scalar per step instead of N more FMAs).  fp32 I/O only (CLAMP, see pass 2); else xs[t][j] = X_t[j].
// Broadcast: dy, v, the step's dy.v and (CLAMP) |v|^2 (warp sums).  Own: r_j, k_j, d_j.
template <typename T, int N>
__global__ void __launch_bounds__(N, 1) wkv6_bwd_colfwd(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u, const T* __restrict__ dy,
    const float* __restrict__ state_in, int CK,
    T* __restrict__ dr, float* __restrict__ xs, float* __restrict__ ckpt, int* err, int CL)
{
    constexpr int TT = wkv6::Tile<N>::TT, NW = N / 32;
    constexpr bool CLAMP = rwkv::tc::is_f32<T>::value;
    __shared__ __align__(16) float sdy[2][TT * N];
    __shared__ __align__(16) float sv[2][TT * N];
    __shared__ float sp[2][TT * NW], sq[2][CLAMP ? TT * NW : 1];
    __shared__ float sr[TT * N], sk[TT * N], sd[TT * N];

    const int s = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    long long start, end;
    wkv6::bwd_bounds(cu_seqlens, Tlen, total, CL, s, start, end, err);
    const long long hb = (long long)h * N * N + j;   // + slot*H*N*N + i*N

    float st[N];
    float nS = 0.f;
    if (state_in != nullptr) {
        const float* p0 = state_in + (long long)s * H * N * N + hb;
#pragma unroll
        for (int i = 0; i < N; ++i) st[i] = p0[(long long)i * N];
        if (CLAMP) nS = wkv6::col_norm<N>(st);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) st[i] = 0.f;
    }
    const float uj = rwkv::to_float(u[h * N + j]);
    const long long len = end - start;
    int to_ckpt = CK;   // steps to the chunk's end: a 64-bit (t + 1) % CK per step cost a division sequence
    int p = 0;
    for (long long t0 = 0; t0 < len; t0 += TT, p ^= 1) {
        const int cnt = (int)min((long long)TT, len - t0);
        for (int tt = 0; tt < cnt; ++tt) {
            const long long off = ((start + t0 + tt) * H + h) * N + j;
            const float e = rwkv::to_float(dy[off]), vj = rwkv::to_float(v[off]);
            sdy[p][tt * N + j] = e;
            sv[p][tt * N + j] = vj;
            sr[tt * N + j] = rwkv::to_float(r[off]);
            sk[tt * N + j] = rwkv::to_float(k[off]);
            sd[tt * N + j] = wkv6::decay_of(rwkv::to_float(w[off]));
            wkv6::warp_part<N>(e * vj, &sp[p][tt * NW]);
            if (CLAMP) wkv6::warp_part<N>(vj * vj, &sq[p][tt * NW]);
        }
        __syncthreads();
        for (int tt = 0; tt < cnt; ++tt) {
            const float kj = sk[tt * N + j], dj = sd[tt * N + j], rj = sr[tt * N + j];
            const float* pdy = &sdy[p][tt * N];
            const float* pv = &sv[p][tt * N];
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 g = wkv6::ld4(pdy + 4 * q), vv = wkv6::ld4(pv + 4 * q);
                a0 = fmaf(g.x, st[4 * q], a0);
                a1 = fmaf(g.y, st[4 * q + 1], a1);
                a2 = fmaf(g.z, st[4 * q + 2], a2);
                a3 = fmaf(g.w, st[4 * q + 3], a3);
                st[4 * q] = fmaf(st[4 * q], dj, kj * vv.x);
                st[4 * q + 1] = fmaf(st[4 * q + 1], dj, kj * vv.y);
                st[4 * q + 2] = fmaf(st[4 * q + 2], dj, kj * vv.z);
                st[4 * q + 3] = fmaf(st[4 * q + 3], dj, kj * vv.w);
            }
            const float acc = (a0 + a1) + (a2 + a3);
            const float dyv = wkv6::part_sum<N>(&sp[p][tt * NW]);
            const long long t = t0 + tt;
            const long long off = ((start + t) * H + h) * N + j;
            dr[off] = rwkv::from_float<T>(fmaf(uj * kj, dyv, acc));
            if (CLAMP) {
                *reinterpret_cast<float2*>(xs + 2 * off) = make_float2(rj * acc, dj * nS * wkv6::BOUND_SLACK);
                nS = fmaf(dj, nS, fabsf(kj) * sqrtf(wkv6::part_sum<N>(&sq[p][tt * NW])));
            } else {
                xs[off] = rj * acc;
            }
            if (--to_ckpt == 0 || t + 1 == len) {
                to_ckpt = CK;
                const long long c = wkv6::bwd_ckpt_slot(cu_seqlens, Tlen, CL, s, start, CK, (int)(t / CK));
                float* p0 = ckpt + c * H * N * N + hb;
#pragma unroll
                for (int i = 0; i < N; ++i) p0[(long long)i * N] = st[i];
                if (CLAMP) nS = wkv6::col_norm<N>(st);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// Backward pass 2 (reverse in time).  Thread j owns key column j of the adjoint G (G_t = dL/dS_t).
//   dk_t[j] = r_t[j] u_j (dy_t . v_t) + sum_i G_t[i,j] v_t[i]
//   du[j]  += r_t[j] k_t[j] (dy_t . v_t)              (per (sequence, head) partial; reduced later)
//   G_{t-1}[i,j] = G_t[i,j] d_t[j] + dy_t[i] r_t[j];  dstate = G_{-1}
//   dw: with W_t = sum_i G_t[i,j] S_t[i,j] and Y_t = k_t[j] sum_i G_t[i,j] v_t[i],
//       D_t = dL/dlog d_t[j] = sum_i G_t[i,j] S_{t-1}[i,j] d_t[j] = W_t - Y_t,  W_{t-1} = D_t + X_t,
//       dw_t[j] = D_t * (-exp(w_t[j])).  W is set exactly from the checkpoint at the end of every chunk,
//       so the recursion (no division by the decay) only runs over CK steps.
//   At a strong decay the true D_t is tiny, but W_t - Y_t cancels two O(|G||S|) terms, and the recursion carries
//   every step's rounding (mostly of the fp32 dot products X and G^T v) undamped to the chunk's start; times
//   exp(w) <= 55 that was 1.2e-4 rel. RMS of dw at N = 128 for w in [0, 4] (1.1e-5 with the clamp; CPU emulation
//   of these kernels, tests/test_wkv6.py).  So D_t is clamped to Cauchy-Schwarz,
//   |D_t| <= d_t |G_t[:, j]| |S_{t-1}[:, j]|, with nS from pass 1 and nG >= |G_t[:, j]| (exact at the end and
//   at every chunk end, else nG_{t-1} = d_t nG_t + |r_t[j]| |dy_t|): the true value is inside, so the clamp
//   never moves D_t away from it, and where the decay is strong it takes out the carried error, in dw and in W.
//   fp32 I/O only (CLAMP): the bound's per-token norms cost 10-30% of the two passes (H100, bf16, N = 128 / 64,
//   benchmarks/results/logs/s9 call C), and 16-bit I/O's own rounding (dw bound 6e-3) is far above that error.
// Broadcast: dy, v, the step's dy.v and (CLAMP) |dy|^2 (warp sums).  Own: r_j, k_j, d_j, exp(w_j), X_t[j], (CLAMP)
// the bound factor d_t nS_{t-1}[j].
template <typename T, int N>
__global__ void __launch_bounds__(N, 1) wkv6_bwd_colrev(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u, const T* __restrict__ dy,
    const float* __restrict__ dstate, int CK, const float* __restrict__ xs, const float* __restrict__ ckpt,
    T* __restrict__ dk, T* __restrict__ dw, float* __restrict__ dstate_in, float* __restrict__ du_part, int* err,
    int CL)
{
    constexpr int TT = wkv6::Tile<N>::TT, NW = N / 32;
    constexpr bool CLAMP = rwkv::tc::is_f32<T>::value;
    __shared__ __align__(16) float sdy[2][TT * N];
    __shared__ __align__(16) float sv[2][TT * N];
    __shared__ float sp[2][TT * NW], sq[2][CLAMP ? TT * NW : 1];
    __shared__ float sr[TT * N], sk[TT * N], sd[TT * N], se[TT * N], sx[TT * N], sb[CLAMP ? TT * N : 1];

    const int s = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    long long start, end;
    wkv6::bwd_bounds(cu_seqlens, Tlen, total, CL, s, start, end, err);
    const long long hb = (long long)h * N * N + j;

    float g[N];
    float nG = 0.f;
    if (dstate != nullptr) {
        const float* p0 = dstate + (long long)s * H * N * N + hb;
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = p0[(long long)i * N];
        if (CLAMP) nG = wkv6::col_norm<N>(g);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = 0.f;
    }
    const float uj = rwkv::to_float(u[h * N + j]);
    const long long len = end - start;
    float du = 0.f, W = 0.f;
    int ck_phase = (int)(len % CK);   // (t + 1) % CK, stepped down with t (one 64-bit remainder, not one per step)
    int p = 0;
    const long long ntiles = (len + TT - 1) / TT;
    for (long long tile = ntiles - 1; tile >= 0; --tile, p ^= 1) {
        const long long t0 = tile * TT;
        const int cnt = (int)min((long long)TT, len - t0);
        for (int tt = 0; tt < cnt; ++tt) {
            const long long off = ((start + t0 + tt) * H + h) * N + j;
            const float ww = rwkv::to_float(w[off]);
            const float ew = expf(ww);
            const float e = rwkv::to_float(dy[off]), vj = rwkv::to_float(v[off]);
            sdy[p][tt * N + j] = e;
            sv[p][tt * N + j] = vj;
            wkv6::warp_part<N>(e * vj, &sp[p][tt * NW]);
            if (CLAMP) wkv6::warp_part<N>(e * e, &sq[p][tt * NW]);
            sr[tt * N + j] = rwkv::to_float(r[off]);
            sk[tt * N + j] = rwkv::to_float(k[off]);
            sd[tt * N + j] = expf(-ew);
            se[tt * N + j] = ew;
            if (CLAMP) {
                const float2 xb = *reinterpret_cast<const float2*>(xs + 2 * off);
                sx[tt * N + j] = xb.x;
                sb[tt * N + j] = xb.y;
            } else {
                sx[tt * N + j] = xs[off];
            }
        }
        __syncthreads();
        for (int tt = cnt - 1; tt >= 0; --tt) {
            const long long t = t0 + tt;
            const bool chunk_end = ck_phase == 0 || t + 1 == len;
            ck_phase = (ck_phase == 0 ? CK : ck_phase) - 1;
            if (chunk_end) {   // last step of a chunk: W_t from the checkpoint S_t
                const long long c = wkv6::bwd_ckpt_slot(cu_seqlens, Tlen, CL, s, start, CK, (int)(t / CK));
                const float* p0 = ckpt + c * H * N * N + hb;
                float a0 = 0.f, a1 = 0.f;
#pragma unroll
                for (int i = 0; i < N; i += 2) {
                    a0 = fmaf(g[i], p0[(long long)i * N], a0);
                    a1 = fmaf(g[i + 1], p0[(long long)(i + 1) * N], a1);
                }
                W = a0 + a1;
                if (CLAMP) nG = wkv6::col_norm<N>(g);
            }
            const float kj = sk[tt * N + j], dj = sd[tt * N + j], rj = sr[tt * N + j];
            const float* pdy = &sdy[p][tt * N];
            const float* pv = &sv[p][tt * N];
            float gv0 = 0.f, gv1 = 0.f, gv2 = 0.f, gv3 = 0.f;
            const float dyv = wkv6::part_sum<N>(&sp[p][tt * NW]);
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 e = wkv6::ld4(pdy + 4 * q), vv = wkv6::ld4(pv + 4 * q);
                gv0 = fmaf(g[4 * q], vv.x, gv0);
                gv1 = fmaf(g[4 * q + 1], vv.y, gv1);
                gv2 = fmaf(g[4 * q + 2], vv.z, gv2);
                gv3 = fmaf(g[4 * q + 3], vv.w, gv3);
                g[4 * q] = fmaf(g[4 * q], dj, e.x * rj);
                g[4 * q + 1] = fmaf(g[4 * q + 1], dj, e.y * rj);
                g[4 * q + 2] = fmaf(g[4 * q + 2], dj, e.z * rj);
                g[4 * q + 3] = fmaf(g[4 * q + 3], dj, e.w * rj);
            }
            const float gv = (gv0 + gv1) + (gv2 + gv3);
            const long long off = ((start + t) * H + h) * N + j;
            dk[off] = rwkv::from_float<T>(fmaf(rj * uj, dyv, gv));
            du = fmaf(rj * kj, dyv, du);
            float D = W - kj * gv;
            if (CLAMP) {
                const float bound = nG * sb[tt * N + j];
                if (fabsf(D) > bound) D = copysignf(bound, D);   // NaN bound or D: no clamp
            }
            dw[off] = rwkv::from_float<T>(-D * se[tt * N + j]);
            W = D + sx[tt * N + j];
            if (CLAMP) nG = fmaf(dj, nG, fabsf(rj) * sqrtf(wkv6::part_sum<N>(&sq[p][tt * NW])));
        }
    }
    if (dstate_in != nullptr) {   // null in chunk-parallel mode (the reverse chunk scan yields dstate)
        float* p0 = dstate_in + (long long)s * H * N * N + hb;
#pragma unroll
        for (int i = 0; i < N; ++i) p0[(long long)i * N] = g[i];
    }
    du_part[((long long)s * H + h) * N + j] = du;
}

// ------------------------------------------------------------------------------------------------------
// Backward pass 3 (reverse in time).  Thread i owns value row i of the adjoint G.
//   dv_t[i] = dy_t[i] sum_j r_t[j] u_j k_t[j] + sum_j G_t[i,j] k_t[j]
// Broadcast: r_j, k_j, d_j, the step's r.(u*k) (warp sums).  Own: dy_i.
template <typename T, int N>
__global__ void __launch_bounds__(N, 1) wkv6_bwd_rowrev(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ w,
    const T* __restrict__ u, const T* __restrict__ dy,
    const float* __restrict__ dstate, T* __restrict__ dv, int* err, int CL)
{
    constexpr int TT = wkv6::Tile<N>::TT, NW = N / 32;
    __shared__ __align__(16) float sr[2][TT * N];
    __shared__ __align__(16) float sk[2][TT * N];
    __shared__ __align__(16) float sd[2][TT * N];
    __shared__ float sp[2][TT * NW];
    __shared__ float sdy[TT * N];

    const int s = blockIdx.x / H, h = blockIdx.x % H, i = threadIdx.x;
    long long start, end;
    wkv6::bwd_bounds(cu_seqlens, Tlen, total, CL, s, start, end, err);

    float g[N];
    if (dstate != nullptr) {
        const float* p0 = dstate + ((long long)s * H + h) * N * N + (long long)i * N;
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            float4 a = wkv6::ld4(p0 + 4 * q);
            g[4 * q] = a.x; g[4 * q + 1] = a.y; g[4 * q + 2] = a.z; g[4 * q + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) g[j] = 0.f;
    }
    const float ui = rwkv::to_float(u[h * N + i]);
    const long long len = end - start;
    int p = 0;
    const long long ntiles = (len + TT - 1) / TT;
    for (long long tile = ntiles - 1; tile >= 0; --tile, p ^= 1) {
        const long long t0 = tile * TT;
        const int cnt = (int)min((long long)TT, len - t0);
        for (int tt = 0; tt < cnt; ++tt) {
            const long long off = ((start + t0 + tt) * H + h) * N + i;
            const float kk = rwkv::to_float(k[off]), rr = rwkv::to_float(r[off]);
            sr[p][tt * N + i] = rr;
            sk[p][tt * N + i] = kk;
            sd[p][tt * N + i] = wkv6::decay_of(rwkv::to_float(w[off]));
            sdy[tt * N + i] = rwkv::to_float(dy[off]);
            wkv6::warp_part<N>(rr * (ui * kk), &sp[p][tt * NW]);
        }
        __syncthreads();
        for (int tt = cnt - 1; tt >= 0; --tt) {
            const float e = sdy[tt * N + i];
            const float* pr = &sr[p][tt * N];
            const float* pk = &sk[p][tt * N];
            const float* pd = &sd[p][tt * N];
            const float ruk = wkv6::part_sum<N>(&sp[p][tt * NW]);
            float gk0 = 0.f, gk1 = 0.f, gk2 = 0.f, gk3 = 0.f;
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 rr = wkv6::ld4(pr + 4 * q), kk = wkv6::ld4(pk + 4 * q), dd = wkv6::ld4(pd + 4 * q);
                gk0 = fmaf(g[4 * q], kk.x, gk0);
                gk1 = fmaf(g[4 * q + 1], kk.y, gk1);
                gk2 = fmaf(g[4 * q + 2], kk.z, gk2);
                gk3 = fmaf(g[4 * q + 3], kk.w, gk3);
                g[4 * q] = fmaf(g[4 * q], dd.x, e * rr.x);
                g[4 * q + 1] = fmaf(g[4 * q + 1], dd.y, e * rr.y);
                g[4 * q + 2] = fmaf(g[4 * q + 2], dd.z, e * rr.z);
                g[4 * q + 3] = fmaf(g[4 * q + 3], dd.w, e * rr.w);
            }
            const float gk = (gk0 + gk1) + (gk2 + gk3);
            dv[((start + t0 + tt) * H + h) * N + i] = rwkv::from_float<T>(fmaf(e, ruk, gk));
        }
    }
}

// ------------------------------------------------------------------------------------------------------
// du = sum over sequences of the per-(sequence, head) partials, in a fixed order (deterministic).
// grid = H, block = N.
template <typename T, int N>
__global__ void __launch_bounds__(N) wkv6_reduce_u(const float* __restrict__ du_part, int num, int H,
                                                  T* __restrict__ du)
{
    const int h = blockIdx.x, j = threadIdx.x;
    float a = 0.f;
    for (int s = 0; s < num; ++s) a += du_part[((long long)s * H + h) * N + j];
    du[h * N + j] = rwkv::from_float<T>(a);
}
