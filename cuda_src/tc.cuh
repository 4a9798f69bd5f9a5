// Tensor-core matrix products for the chunked kernels: fp32 matrices in shared memory (see mma_strip_scaled), TF32
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
// Cost: the chunked kernels issue far more fragment loads, roundings and scalings than mma instructions, so those are
// what the helpers below keep short (fixed load offsets from per-lane pointers, one F2FP per rounding on sm_90; the
// k-loop's unrolling is left to the compiler).  Session 8, H100, bf16: wkv6 fwd B=8 T=4096 1.047 -> 0.956 ms, wkv7
// fwd 1.657 -> 1.377 ms against the previous helpers (benchmarks/results/logs/s8, call B).  Session 9: ldmatrix for
// the operands stored along k (one LDSM in place of four LDS): wkv6 fwd B=8 T=4096 0.958 -> 0.942
// ms, fwd+bwd 4.04 -> 3.96, wkv7 fwd+bwd 5.69 -> 5.62 (benchmarks/results/logs/s9, call A).
#pragma once

namespace rwkv {
namespace tc {

template <class T> struct is_f32 { static constexpr bool value = false; };
template <> struct is_f32<float> { static constexpr bool value = true; };

// Round to TF32 (10 explicit mantissa bits), to nearest.  sm_90+: cvt.rn (ties to even), one F2FP instruction;
// sm_80: cvt.rna (ties away from zero; ptxas expands it to a compare and a predicated add).  The host version (the CPU
// emulation) rounds ties to even, as sm_90.  NaN stays NaN, infinities stay infinite.
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm("cvt.rn.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
#elif defined(__CUDA_ARCH__)
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
#else
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u;
#endif
    return u;
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

// ldmatrix.x4 (b16) of four 8 x 4 fp32 blocks in shared memory: lane l gives the address of row l % 8 of block
// l / 8 (16-byte aligned) and receives element (l / 4, l % 4) of each block: an 8 x 8 b16 matrix row is 4 fp32, so
// the 32-bit pieces land exactly where an fp32 fragment wants them.  One instruction in place of four LDS at the
// same shared-memory wavefronts (conflict-free when the rows' 16-byte pieces fall in distinct bank groups, as
// with a row stride of 4 mod 32 floats).  Host compilers provide rwkv_emu_ldmatrix_x4, which also checks the
// alignment and that the rows are in shared memory.
__device__ __forceinline__ void ldsm_x4(unsigned* d, const float* row) {
#ifdef __CUDA_ARCH__
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(s));
#else
    rwkv_emu_ldmatrix_x4(d, row);
#endif
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

// acc[0..3] += A B, three products for SPLIT (lo*hi + hi*lo, then hi*hi).
template <bool SPLIT>
__device__ __forceinline__ void mma_split(float* acc, const unsigned* a, const unsigned* alo, const unsigned* b,
                                          const unsigned* blo) {
    if (SPLIT) {
        mma_m16n8k8(acc, alo, b);
        mma_m16n8k8(acc, a, blo);
    }
    mma_m16n8k8(acc, a, b);
}

// ---- Pair loads.  A sum over k does not care about the order of k, so the helpers below permute k inside each
// 8-block: fragment k = c + 4r is column 2c + r.  A lane's two k of a row are then adjacent: one 8-byte load where
// the fragment layout needs two 4-byte ones, for operands stored along k; and a warp's accumulator tiles (C above:
// lane holds columns 2c, 2c + 1) are B fragments of the transposed product as they stand, so a state kept in
// registers as accumulators needs no trip through shared memory.  Row strides of 8 mod 32 floats: conflict-free.

// A fragment of the 16 x 8 block of A (row-major along k) at p = A + g * lda + 2c + k0 (m8 = 8 * lda).
template <bool SPLIT>
__device__ __forceinline__ void a_pairs(unsigned (&a)[4], unsigned (&alo)[4], const float* p, int m8) {
    const float2 x0 = *reinterpret_cast<const float2*>(p);
    const float2 x1 = *reinterpret_cast<const float2*>(p + m8);
    split<SPLIT>(x0.x, a[0], alo[0]);
    split<SPLIT>(x1.x, a[1], alo[1]);
    split<SPLIT>(x0.y, a[2], alo[2]);
    split<SPLIT>(x1.y, a[3], alo[3]);
}

// acc[n] += A[16 x K] B_n^T for n < NT: A (m, k) at A[m * lda + k], B_n (nn, k) at B[(16 n + nn) * ldb + k] (both
// stored along k, pair loads).  K a multiple of 8; A, B 8-byte aligned, lda and ldb even.
template <bool SPLIT, int NT>
__device__ __forceinline__ void mma_strip_pairs(float (&acc)[NT][8], const float* A, int lda, const float* B,
                                                int ldb, int K) {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const float* pa = A + g * lda + 2 * c;
    const float* pb = B + g * ldb + 2 * c;
    for (int k = 0; k < K; k += 8) {
        unsigned a[4], alo[4];
        a_pairs<SPLIT>(a, alo, pa + k, 8 * lda);
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float2 x = *reinterpret_cast<const float2*>(pb + (16 * n + 8 * half) * ldb + k);
                unsigned b[2], blo[2];
                split<SPLIT>(x.x, b[0], blo[0]);
                split<SPLIT>(x.y, b[1], blo[1]);
                mma_split<SPLIT>(acc[n] + 4 * half, a, alo, b, blo);
            }
    }
}

// acc (16 x 16) += A[16 x 16 KT] S^T, S a warp's 16 x 16 KT accumulator strip s[KT][8] (S (n, k) = element (n, k)
// of the strip): B (k, n) = S (n, k) comes from the registers (b[r] of k-block kb, n-half h = s[kb/2][4 (kb%2) +
// 2h + r]).  A (m, k) at A[m * lda + k] (pair loads).
template <bool SPLIT, int KT>
__device__ __forceinline__ void mma_tile_acc_t(float* acc, const float* A, int lda, const float (&s)[KT][8]) {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const float* pa = A + g * lda + 2 * c;
#pragma unroll
    for (int kb = 0; kb < 2 * KT; ++kb) {
        unsigned a[4], alo[4];
        a_pairs<SPLIT>(a, alo, pa + 8 * kb, 8 * lda);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            unsigned b[2], blo[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) split<SPLIT>(s[kb / 2][4 * (kb % 2) + 2 * half + r], b[r], blo[r]);
            mma_split<SPLIT>(acc + 4 * half, a, alo, b, blo);
        }
    }
}

// A 16 x (16 NT) strip with the operands scaled as their fragments load (no scaled copy in shared memory, no
// extra barrier): op(A) element (m, k) times fa[k] (fa null: 1), and B's element stored at row x, column y
// (B[x * ldb + y]: TB ? (n, k) : (k, n)) times fb[y] (null: 1) and, when B2 is given, times B2[x * ldb + y].
// With LDSM, operands stored along k (A when !TA, B and B2 when TB) load by ldmatrix: they must be in shared memory
// with 16-byte aligned rows (pointer and leading dimension multiples of 4 floats); the others may be anywhere.
// LDSM = false keeps scalar loads: ldmatrix saves issue slots but has the longer latency, which a latency-bound
// chain pays (wkv7_tc_chunk: H100, bf16, B=1 T=16384 forward 5% slower with it; wkv6's kernels 2% faster).
template <bool TA, bool TB, bool SPLIT, int NT, bool LDSM = true>
__device__ __forceinline__ void mma_strip_scaled(float (&acc)[NT][8], const float* A, int lda, const float* fa,
                                                 const float* B, const float* B2, int ldb, const float* fb,
                                                 int K) {
    const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4, blk = lane / 8, row = lane % 8;
    // Each lane's elements as fixed offsets from pointers that step once per k-step (the offsets fold into the
    // shared-memory loads' immediates instead of an index computation per element).  ldmatrix rows: A's blocks in
    // fragment order (m 0-7, k 0-3), (m 8-15, k 0-3), (m 0-7, k 4-7), (m 8-15, k 4-7); B's (n 0-7, k 0-3),
    // (n 0-7, k 4-7), (n 8-15, k 0-3), (n 8-15, k 4-7): both n-halves of a 16-column tile in one load.
    const int a_m8 = TA ? 8 : 8 * lda, a_k4 = TA ? 4 * lda : 4, a_k8 = 2 * a_k4;   // A: m + 8, k + 4, k + 8
    const int b_k4 = TB ? 4 : 4 * ldb, b_n8 = TB ? 8 * ldb : 8, b_k8 = 2 * b_k4;   // B: k + 4, n + 8, k + 8
    const float* pa = TA ? A + c * lda + g : LDSM ? A + (row + 8 * (blk % 2)) * lda + 4 * (blk / 2) : A + g * lda + c;
    const float* pb = !TB ? B + c * ldb + g : LDSM ? B + (row + 8 * (blk / 2)) * ldb + 4 * (blk % 2) : B + g * ldb + c;
    const float* pb2 = B2 != nullptr ? B2 + (pb - B) : nullptr;
    const float* pfa = fa != nullptr ? fa + c : nullptr;
    const float* pfb = fb != nullptr ? fb + (TB ? c : g) : nullptr;   // fb[k] (TB) or fb[n]
    for (int k = 0; k < K; k += 8) {
        unsigned a[4], alo[4], araw[4];
        if (!TA && LDSM) ldsm_x4(araw, pa);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float x = TA || !LDSM ? pa[(r % 2) * a_m8 + (r / 2) * a_k4] : tf32_value(araw[r]);
            if (fa != nullptr) x *= pfa[4 * (r / 2)];
            split<SPLIT>(x, a[r], alo[r]);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            unsigned braw[4], b2raw[4];
            if (TB && LDSM) {
                ldsm_x4(braw, pb + 2 * n * b_n8);
                if (B2 != nullptr) ldsm_x4(b2raw, pb2 + 2 * n * b_n8);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                unsigned b[2], blo[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int o = r * b_k4 + (2 * n + half) * b_n8;
                    float x = TB && LDSM ? tf32_value(braw[2 * half + r]) : pb[o];
                    if (B2 != nullptr) x *= TB && LDSM ? tf32_value(b2raw[2 * half + r]) : pb2[o];
                    if (fb != nullptr) x *= pfb[TB ? 4 * r : 16 * n + 8 * half];
                    split<SPLIT>(x, b[r], blo[r]);
                }
                mma_split<SPLIT>(acc[n] + 4 * half, a, alo, b, blo);
            }
        }
        pa += a_k8;
        pb += b_k8;
        if (B2 != nullptr) pb2 += b_k8;
        if (fa != nullptr) pfa += 8;
        if (fb != nullptr && TB) pfb += 8;
    }
}

// A 16 x (16 NT) strip: acc[n] += op(A)[16 x K] op(B)[K x 16n .. 16n+15] for n < NT, each A fragment loaded
// once per k-step for all NT tiles (B tile n starts at B + 16n, or B + 16n ldb when TB).
template <bool TA, bool TB, bool SPLIT, int NT, bool LDSM = true>
__device__ __forceinline__ void mma_strip(float (&acc)[NT][8], const float* A, int lda, const float* B, int ldb, int K) {
    mma_strip_scaled<TA, TB, SPLIT, NT, LDSM>(acc, A, lda, nullptr, B, nullptr, ldb, nullptr, K);   // the nulls fold away
}

// acc (a 16 x 16 tile, this lane's 8 values) += op(A)[16 x K] op(B)[K x 16], K a multiple of 8: the one-tile
// strip.  op(A): TA = false: A row-major, element (m, k) at A[m*lda + k]; TA = true: element (m, k) at
// A[k*lda + m].  op(B): TB = false: B row-major, element (k, n) at B[k*ldb + n]; TB = true: at B[n*ldb + k].
// A and B point at the tile's first row / column.
template <bool TA, bool TB, bool SPLIT, bool LDSM = true>
__device__ __forceinline__ void mma_tile(float* acc, const float* A, int lda, const float* B, int ldb, int K) {
    mma_strip<TA, TB, SPLIT, 1, LDSM>(*reinterpret_cast<float(*)[1][8]>(acc), A, lda, B, ldb, K);
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
