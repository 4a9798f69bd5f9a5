"""Pieces shared by the tests that compile the real CUDA sources with a host C++ compiler (one OS thread per
CUDA thread) to check kernel logic without a GPU: stand-in fp16/bf16 headers and bf16 bit conversions."""
import shutil

import numpy as np
import pytest

FP16_H = r"""
#pragma once
#include <cstdint>
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { __half h; h.v = (_Float16)f; return h; }
"""

BF16_H = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t b; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.b << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); __nv_bfloat16 h; h.b = (uint16_t)(u >> 16); return h; }
"""


def bf16_bits(a):
    """float values as bf16 bit patterns (uint16), round to nearest even."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits):
    """bf16 bit patterns (uint16) as float64 values."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# mma.sync.m16n8k8 (tf32 in, fp32 accumulate) for one warp, with the fragment layout of cuda_src/tc.cuh: every
# lane publishes its fragments, the warp meets (__syncwarp, which the including shim defines per warp), and each
# lane computes its four accumulator values from the whole matrices.  ldmatrix.x4 the same way: every lane publishes
# its row address and takes its four 32-bit pieces from the rows of the others; a row that is not 16-byte aligned or
# not inside the block's dynamic shared memory (g_dyn, g_dyn_floats: set by the launcher) stops the process with a
# message, as the instruction would fault or read garbage on the GPU.  Needs <cstring>, threadIdx and g_dyn.
MMA_EMU = r"""
#include <cstdio>
#include <cstdlib>
inline const float* g_ldsm[32][32];
inline long g_dyn_floats = 0;
inline void rwkv_emu_ldmatrix_x4(unsigned* d, const float* row) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    if (reinterpret_cast<unsigned long>(row) % 16 != 0 || row < g_dyn || row + 4 > g_dyn + g_dyn_floats) {
        std::fprintf(stderr, "ldmatrix emulation: lane %d row address %p not 16-byte aligned or outside shared "
                     "memory [%p, +%ld floats)\n", l, (const void*)row, (const void*)g_dyn, g_dyn_floats);
        std::abort();
    }
    g_ldsm[w][l] = row;
    __syncwarp();
    for (int i = 0; i < 4; ++i) std::memcpy(&d[i], g_ldsm[w][8 * i + l / 4] + l % 4, 4);
    __syncwarp();
}
inline float g_mma[32][32][6];
inline void rwkv_emu_mma_m16n8k8(float* acc, const unsigned* a, const unsigned* b) {
    const int w = threadIdx.x / 32, l = threadIdx.x % 32;
    std::memcpy(&g_mma[w][l][0], a, 16); std::memcpy(&g_mma[w][l][4], b, 8);
    __syncwarp();
    for (int r = 0; r < 4; ++r) {
        const int row = l / 4 + 8 * (r / 2), col = 2 * (l % 4) + r % 2;
        float s = 0.f;
        for (int k = 0; k < 8; ++k)
            s += g_mma[w][(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)] * g_mma[w][col * 4 + k % 4][4 + k / 4];
        acc[r] += s;
    }
    __syncwarp();
}
"""


# Launch-by-name registry of an emulation build: reg()["kernel<T, ...>"] calls the kernel with arguments passed as
# uint64 words (pointers and integers), wrap(&kernel<T>) builds the entry.
KERNEL_REGISTRY = r"""
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
template <class A> A conv(uint64_t x) { if constexpr (std::is_pointer_v<A>) return reinterpret_cast<A>(x); else return (A)(int64_t)x; }
template <class... A, size_t... I> void call_impl(void (*f)(A...), const uint64_t* a, std::index_sequence<I...>) { f(conv<A>(a[I])...); }
template <class... A> std::function<void(const uint64_t*)> wrap(void (*f)(A...)) {
    return [f](const uint64_t* a) { call_impl(f, a, std::index_sequence_for<A...>{}); }; }
static std::map<std::string, std::function<void(const uint64_t*)>>& reg() {
    static std::map<std::string, std::function<void(const uint64_t*)>> m; return m; }
"""


def cxx_or_skip() -> str:
    """The host C++ compiler for the kernel emulations (the emulation tests skip without one)."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return cxx
