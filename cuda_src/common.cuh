// Shared by every rwkvops kernel: element conversion and the sequence/state ABI (see rwkvops/_gpu.py).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace rwkv {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

enum ErrorCode { ERR_BAD_CU_SEQLENS = 1, ERR_BAD_STATE_INDEX = 2, ERR_LOOKBACK_TIMEOUT = 3 };

// Token range [start, end) of sequence s: packed by cu_seqlens, or dense with T tokens each.
// A malformed device-side cu_seqlens yields an empty range and raises the error word.
__device__ __forceinline__ void seq_bounds(const int* cu_seqlens, int T, long long total, int s,
                                           long long& start, long long& end, int* err) {
    if (cu_seqlens == nullptr) { start = (long long)s * T; end = start + T; return; }
    start = cu_seqlens[s]; end = cu_seqlens[s + 1];
    if (start < 0 || end < start || end > total) {
        if (err) *(volatile int*)err = ERR_BAD_CU_SEQLENS;
        start = end = 0;
    }
}

// Slot of sequence s in the state arrays: s itself, or state_idx[s] for a pool (-1: no slot).
// An index outside [-1, pool_size) raises the error word and is treated as -1.
__device__ __forceinline__ long long state_slot(const int* state_idx, int s, int pool_size, int* err) {
    if (state_idx == nullptr) return s;
    int i = state_idx[s];
    if (i < -1 || i >= pool_size) { if (err) *(volatile int*)err = ERR_BAD_STATE_INDEX; return -1; }
    return i;
}

// Checkpoint slot of chunk c of sequence s when chunks are `chunk` tokens long: needs no host copy of
// cu_seqlens, and never overlaps the next sequence's slots (see Seqs.chunk_slots).
__device__ __forceinline__ long long chunk_slot(const int* cu_seqlens, int T, int s, long long start, int chunk, int c) {
    if (cu_seqlens == nullptr) return (long long)s * ((T + chunk - 1) / chunk) + c;
    return start / chunk + s + c;
}

}  // namespace rwkv
