"""Pieces shared by the tests that compile the real CUDA sources with a host C++ compiler (one OS thread per
CUDA thread) to check kernel logic without a GPU: stand-in fp16/bf16 headers and bf16 bit conversions."""
import numpy as np

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
