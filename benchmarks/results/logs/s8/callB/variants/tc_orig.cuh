// Tensor-core matrix products for the chunked kernels: fp32 matrices in shared (or global) memory, TF32
// inputs, fp32 accumulation, through the PTX instruction mma.sync.m16n8k8 (sm_80+; no header needed).
// A warp computes one 16 x 16 output tile at a time (two m16n8 halves); callers deal tiles to warps.
//
// Precision: plain TF32 rounds each input to 11 significant bits (relative 2^-11), enough for 16-bit I/O.
// With SPLIT = true every input is split x = hi + lo (both TF32) and hi*hi + hi*lo + lo*hi is accumulated
// ("3xTF32"), which matches fp32 products to about 2^-22: the fp32-I/O paths use it.
//
// Fragment layout of m16n8k8 (PTX ISA), lane l, g = l / 4, c = l % 4:
//   A (16 x 8):  a[r] = A(g + 8*(r%2), c + 4*(r/2));   B (8 x 8): b[r] = B(c + 4*r, g);
//   C (16 x 8):  acc[r] = C(g + 8*(r/2), 2*c + r%2).   A 16 x 16 tile holds two C halves: acc[4*half + r].
// Host compilers (the CPU emulation in tests/) provide rwkv_emu_mma_m16n8k8 instead of the instruction.
#pragma once

namespace rwkv {
namespace tc {

template <class T> struct is_f32 { static constexpr bool value = false; };
template <> struct is_f32<float> { static constexpr bool value = true; };

__device__ __forceinline__ unsigned to_tf32(float x) {
#ifdef __CUDA_ARCH__
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
    return u;
#else
    unsigned u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;   // round half away from zero
    return u;
#endif
}

__device__ __forceinline__ float tf32_value(unsigned u) {
    float x;
#ifdef __CUDA_ARCH__
    x = __uint_as_float(u);
#else
    __builtin_memcpy(&x, &u, 4);
#endif
    return x;
}

// acc[0..3] += A(16 x 8) B(8 x 8) for one warp, fragments as above.
__device__ __forceinline__ void mma_m16n8k8(float* acc, const unsigned* a, const unsigned* b) {
#ifdef __CUDA_ARCH__
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    rwkv_emu_mma_m16n8k8(acc, a, b);
#endif
}

// Split x into TF32 hi and (SPLIT) lo parts.
template <bool SPLIT>
__device__ __forceinline__ void split(float x, unsigned& hi, unsigned& lo) {
    hi = to_tf32(x);
    if (SPLIT) lo = to_tf32(x - tf32_value(hi));
}

__device__ __forceinline__ void zero(float* acc) {
#pragma unroll
    for (int r = 0; r < 8; ++r) acc[r] = 0.f;
}

// A 16 x (16 NT) strip with the operands scaled as their fragments load (no scaled copy in shared memory, no
// extra barrier): op(A) element (m, k) times fa[k] (fa null: 1), and B's element stored at row x, column y
// (B[x * ldb + y]: TB ? (n, k) : (k, n)) times fb[y] (null: 1) and, when B2 is given, times B2[x * ldb + y].
// A and B may be in shared or global memory.
template <bool TA, bool TB, bool SPLIT, int NT>
__device__ __forceinline__ void mma_strip_scaled(float (&acc)[NT][8], const float* A, int lda, const float* fa,
                                                 const float* B, const float* B2, int ldb, const float* fb,
                                                 int K) {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    for (int k = 0; k < K; k += 8) {
        unsigned a[4], alo[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int m = g + 8 * (r % 2), kk = k + c + 4 * (r / 2);
            float x = TA ? A[kk * lda + m] : A[m * lda + kk];
            if (fa != nullptr) x *= fa[kk];
            split<SPLIT>(x, a[r], alo[r]);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                unsigned b[2], blo[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int kk = k + c + 4 * r, nn = 16 * n + 8 * half + g;
                    const int o = TB ? nn * ldb + kk : kk * ldb + nn;
                    float x = B[o];
                    if (B2 != nullptr) x *= B2[o];
                    if (fb != nullptr) x *= fb[TB ? kk : nn];
                    split<SPLIT>(x, b[r], blo[r]);
                }
                if (SPLIT) {
                    mma_m16n8k8(acc[n] + 4 * half, alo, b);
                    mma_m16n8k8(acc[n] + 4 * half, a, blo);
                }
                mma_m16n8k8(acc[n] + 4 * half, a, b);
            }
    }
}

// A 16 x (16 NT) strip: acc[n] += op(A)[16 x K] op(B)[K x 16n .. 16n+15] for n < NT, each A fragment loaded
// once per k-step for all NT tiles (B tile n starts at B + 16n, or B + 16n ldb when TB).
template <bool TA, bool TB, bool SPLIT, int NT>
__device__ __forceinline__ void mma_strip(float (&acc)[NT][8], const float* A, int lda, const float* B, int ldb, int K) {
    mma_strip_scaled<TA, TB, SPLIT, NT>(acc, A, lda, nullptr, B, nullptr, ldb, nullptr, K);   // the nulls fold away
}

// acc (a 16 x 16 tile, this lane's 8 values) += op(A)[16 x K] op(B)[K x 16], K a multiple of 8: the one-tile
// strip.  op(A): TA = false: A row-major, element (m, k) at A[m*lda + k]; TA = true: element (m, k) at
// A[k*lda + m].  op(B): TB = false: B row-major, element (k, n) at B[k*ldb + n]; TB = true: at B[n*ldb + k].
// A and B point at the tile's first row / column.
template <bool TA, bool TB, bool SPLIT>
__device__ __forceinline__ void mma_tile(float* acc, const float* A, int lda, const float* B, int ldb, int K) {
    mma_strip<TA, TB, SPLIT, 1>(*reinterpret_cast<float(*)[1][8]>(acc), A, lda, B, ldb, K);
}

// Element (row, col) of this lane's r-th accumulator value (r < 8) inside a 16 x 16 tile.
__device__ __forceinline__ int acc_row(int r) { return (threadIdx.x % 32) / 4 + 8 * ((r % 4) / 2); }
__device__ __forceinline__ int acc_col(int r) { return 8 * (r / 4) + 2 * (threadIdx.x % 4) + r % 2; }

__device__ __forceinline__ void load_tile(float* acc, const float* C, int ldc) {
#pragma unroll
    for (int r = 0; r < 8; ++r) acc[r] = C[acc_row(r) * ldc + acc_col(r)];
}

__device__ __forceinline__ void store_tile(float* C, int ldc, const float* acc) {
#pragma unroll
    for (int r = 0; r < 8; ++r) C[acc_row(r) * ldc + acc_col(r)] = acc[r];
}

// C[M x N] (= or +=) op(A)[M x K] op(B)[K x N], the (M/16)*(N/16) output tiles dealt round-robin to the
// calling warps (warp = this warp's index among nwarps).  M, N multiples of 16, K of 8.  No barrier inside:
// the caller synchronizes before C is read by other threads.
template <bool TA, bool TB, bool ACCUMULATE, bool SPLIT>
__device__ __forceinline__ void matmul(float* C, int ldc, const float* A, int lda, const float* B, int ldb,
                                       int M, int N, int K, int warp, int nwarps) {
    const int tn = N / 16, tiles = (M / 16) * tn;
    for (int tile = warp; tile < tiles; tile += nwarps) {
        const int m = (tile / tn) * 16, n = (tile % tn) * 16;
        float acc[8];
        float* c = C + (long long)m * ldc + n;
        if (ACCUMULATE) load_tile(acc, c, ldc);
        else zero(acc);
        mma_tile<TA, TB, SPLIT>(acc, TA ? A + m : A + (long long)m * lda, lda, TB ? B + (long long)n * ldb : B + n,
                                ldb, K);
        store_tile(c, ldc, acc);
    }
}

}  // namespace tc
}  // namespace rwkv
