"""cuda_src/tc.cuh's warp-level products on the CPU emulation (one OS thread per lane, tests/cuda_emulation.py),
against NumPy float64: every operand layout (TA, TB), the scalings as fragments load (fa, fb, B2), 3xTF32 (SPLIT),
ldmatrix on and off (LDSM), and ldmatrix's operand rule (16-byte aligned rows in shared memory) enforced; the pair
loads (k permuted inside 8-blocks): mma_strip_pairs, and mma_tile_acc_t with B taken from accumulator registers."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

import cuda_emulation

NT, M = 4, 16          # a 16 x 64 strip (NT 16-column tiles)
NCOL = 16 * NT

_SRC = r"""
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
struct uint3_ { unsigned x = 0, y = 0, z = 0; };
inline thread_local uint3_ threadIdx;
inline std::barrier<>* g_warp = nullptr;
inline void __syncwarp(unsigned = 0xffffffffu) { g_warp->arrive_and_wait(); }
inline float* g_dyn = nullptr;   // the emulated shared memory
struct alignas(8) float2 { float x, y; };
#define __device__
#define __forceinline__ inline
MMA_EMU
#include "tc.cuh"
constexpr int NT = NT_VALUE;

template <bool TA, bool TB, bool SPLIT, bool LDSM>
static void strip(const float* A, int lda, const float* fa, const float* B, const float* B2, int ldb,
                  const float* fb, int K, float* C) {
    float acc[NT][8];
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(acc[n]);
    rwkv::tc::mma_strip_scaled<TA, TB, SPLIT, NT, LDSM>(acc, A, lda, fa, B, B2, ldb, fb, K);
    for (int n = 0; n < NT; ++n)
        for (int r = 0; r < 8; ++r) C[rwkv::tc::acc_row(r) * (16 * NT) + 16 * n + rwkv::tc::acc_col(r)] = acc[n][r];
}

using Fn = void (*)(const float*, int, const float*, const float*, const float*, int, const float*, int, float*);
template <int I> constexpr Fn pick() { return &strip<(I & 1) != 0, (I & 2) != 0, (I & 4) != 0, (I & 8) != 0>; }
static const Fn TABLE[16] = {pick<0>(), pick<1>(), pick<2>(), pick<3>(), pick<4>(), pick<5>(), pick<6>(), pick<7>(),
                             pick<8>(), pick<9>(), pick<10>(), pick<11>(), pick<12>(), pick<13>(), pick<14>(),
                             pick<15>()};

// smem: the emulated shared memory (nsmem floats) holding A, B, B2 at the given offsets (-1: none / null)
extern "C" void run(int variant, float* smem, long nsmem, long a_off, int lda, const float* fa, long b_off,
                    long b2_off, int ldb, const float* fb, int K, float* C) {
    g_dyn = smem;
    g_dyn_floats = nsmem;
    std::barrier<> bar(32);
    g_warp = &bar;
    std::vector<std::thread> th;
    for (int l = 0; l < 32; ++l)
        th.emplace_back([=] {
            threadIdx.x = l;
            TABLE[variant](smem + a_off, lda, fa, smem + b_off, b2_off < 0 ? nullptr : smem + b2_off, ldb, fb, K, C);
        });
    for (auto& t : th) t.join();
}

// C (16 x 16 NT) = A B^T, A [16][K] and B [16 NT][K] both stored along k (mma_strip_pairs)
template <bool SPLIT>
static void pairs(const float* A, int lda, const float* B, int ldb, int K, float* C) {
    float acc[NT][8];
    for (int n = 0; n < NT; ++n) rwkv::tc::zero(acc[n]);
    rwkv::tc::mma_strip_pairs<SPLIT, NT>(acc, A, lda, B, ldb, K);
    for (int n = 0; n < NT; ++n)
        for (int r = 0; r < 8; ++r) C[rwkv::tc::acc_row(r) * (16 * NT) + 16 * n + rwkv::tc::acc_col(r)] = acc[n][r];
}

// C (16 x 16) = C0 + A S^T, A [16][16 NT] along k, S (16 x 16 NT, row-major) held as accumulator tiles
template <bool SPLIT>
static void acc_t(const float* A, int lda, const float* S, const float* C0, float* C) {
    float s[NT][8], acc[8];
    for (int n = 0; n < NT; ++n)
        for (int r = 0; r < 8; ++r) s[n][r] = S[rwkv::tc::acc_row(r) * (16 * NT) + 16 * n + rwkv::tc::acc_col(r)];
    for (int r = 0; r < 8; ++r) acc[r] = C0[rwkv::tc::acc_row(r) * 16 + rwkv::tc::acc_col(r)];
    rwkv::tc::mma_tile_acc_t<SPLIT, NT>(acc, A, lda, s);
    for (int r = 0; r < 8; ++r) C[rwkv::tc::acc_row(r) * 16 + rwkv::tc::acc_col(r)] = acc[r];
}

// which = 0: pairs (B at b_off, ldb), 1: acc_t (S: the host array s, C0: the host array c0)
extern "C" void run_pairs(int which, int split, float* smem, long nsmem, long a_off, int lda, long b_off, int ldb,
                          int K, const float* s, const float* c0, float* C) {
    g_dyn = smem;
    g_dyn_floats = nsmem;
    std::barrier<> bar(32);
    g_warp = &bar;
    std::vector<std::thread> th;
    for (int l = 0; l < 32; ++l)
        th.emplace_back([=] {
            threadIdx.x = l;
            if (which == 0) (split ? pairs<true> : pairs<false>)(smem + a_off, lda, smem + b_off, ldb, K, C);
            else (split ? acc_t<true> : acc_t<false>)(smem + a_off, lda, s, c0, C);
        });
    for (auto& t : th) t.join();
}
""".replace("MMA_EMU", cuda_emulation.MMA_EMU).replace("NT_VALUE", str(NT))


@pytest.fixture(scope="module")
def tc_lib(tmp_path_factory):
    from rwkvops._compile import CUDA_SRC
    cxx = cuda_emulation.cxx_or_skip()
    d = tmp_path_factory.mktemp("tc_emu")
    (d / "tc_emu.cpp").write_text(_SRC)
    out = subprocess.run([cxx, "-std=c++20", "-O1", "-w", "-fPIC", "-shared", f"-I{CUDA_SRC}", str(d / "tc_emu.cpp"),
                          "-o", str(d / "tc_emu.so"), "-lpthread"], capture_output=True, text=True)
    if out.returncode != 0:
        if "barrier" in out.stderr or "c++20" in out.stderr:
            pytest.skip("the C++ compiler lacks C++20 <barrier>")
        raise AssertionError("compiling tc.cuh for the CPU emulation failed:\n" + out.stderr[-4000:])
    return str(d / "tc_emu.so")


def _load(path):
    lib = ctypes.CDLL(path)
    P = ctypes.c_void_p
    lib.run.argtypes = [ctypes.c_int, P, ctypes.c_long, ctypes.c_long, ctypes.c_int, P, ctypes.c_long,
                        ctypes.c_long, ctypes.c_int, P, ctypes.c_int, P]
    lib.run.restype = None
    lib.run_pairs.argtypes = [ctypes.c_int, ctypes.c_int, P, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                              ctypes.c_long, ctypes.c_int, ctypes.c_int, P, P, P]
    lib.run_pairs.restype = None
    return lib


def _ptr(a):
    return None if a is None else a.ctypes.data


def _case(rng, TA, TB, K, scaled, lda_pad=4, ldb_pad=4):
    """Operands as tc.cuh reads them: op(A) (16 x K) stored row-major (TA: K x 16), B stored (k, n) or (TB) (n, k);
    the expected product in float64."""
    A = rng.standard_normal((M, K))
    Bkn = rng.standard_normal((K, NCOL))
    fa = rng.uniform(0.5, 2.0, K) if scaled else None
    B2kn = rng.uniform(0.5, 2.0, (K, NCOL)) if scaled else None
    # fb scales B's stored column: k when TB, n otherwise
    fb = rng.uniform(0.5, 2.0, K if TB else NCOL) if scaled else None
    Ast = A.T if TA else A
    Bst = Bkn.T if TB else Bkn
    lda, ldb = Ast.shape[1] + lda_pad, Bst.shape[1] + ldb_pad
    eff_A = A * (fa[None, :] if scaled else 1.0)
    eff_B = Bkn * (B2kn if scaled else 1.0)
    if scaled:
        eff_B = eff_B * (fb[:, None] if TB else fb[None, :])
    return Ast, lda, fa, Bst, (B2kn.T if TB else B2kn) if scaled else None, ldb, fb, eff_A @ eff_B


def _pack(smem_parts):
    """Place row-padded matrices in one float32 'shared memory' block at 16-byte aligned offsets."""
    offs, cur, blocks = [], 0, []
    for mat, ld in smem_parts:
        if mat is None:
            offs.append(-1)
            continue
        buf = np.full((mat.shape[0], ld), np.nan, np.float32)   # padding read would poison the result
        buf[:, :mat.shape[1]] = mat
        offs.append(cur)
        blocks.append(buf.ravel())
        cur += buf.size + (-buf.size) % 4
        blocks.append(np.zeros((-buf.size) % 4, np.float32))
    smem = np.concatenate(blocks + [np.zeros(4, np.float32)]).astype(np.float32)
    return smem, offs


@pytest.mark.parametrize("ldsm", [True, False], ids=["ldsm", "lds"])
@pytest.mark.parametrize("split", [False, True], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize("TA,TB", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_strip_matches_float64(tc_lib, TA, TB, split, ldsm, scaled):
    lib = _load(tc_lib)
    rng = np.random.default_rng(hash((TA, TB, split, ldsm, scaled)) % 2**32)
    K = 24
    Ast, lda, fa, Bst, B2st, ldb, fb, want = _case(rng, TA, TB, K, scaled)
    smem, (a_off, b_off, b2_off) = _pack([(Ast, lda), (Bst, ldb), (B2st, ldb)])
    C = np.full((M, NCOL), np.nan, np.float32)
    fa32 = None if fa is None else fa.astype(np.float32)
    fb32 = None if fb is None else fb.astype(np.float32)
    variant = int(TA) | int(TB) << 1 | int(split) << 2 | int(ldsm) << 3
    lib.run(variant, smem.ctypes.data, smem.size, a_off, lda, _ptr(fa32), b_off, b2_off, ldb, _ptr(fb32), K,
            C.ctypes.data)
    err = np.sqrt(np.mean((C - want) ** 2) / np.mean(want ** 2))
    # TF32 keeps 11 significant bits per operand, 3xTF32 about 22 (fp32 products); a plain TF32 error far below
    # 2^-11 would mean the rounding went missing
    if split:
        assert err < 2e-6, err
    else:
        assert 1e-5 < err < 2e-3, err


def _run_misplaced(path, a_shift, lda_pad):
    """Run one ldmatrix strip with A shifted by a_shift floats / a row stride that breaks 16-byte rows, in a child
    process (the emulation aborts it, as the instruction would fault)."""
    code = f"""
import sys, numpy as np
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import test_tc_emulation as t
lib = t._load({path!r})
rng = np.random.default_rng(0)
Ast, lda, fa, Bst, B2st, ldb, fb, want = t._case(rng, False, True, 16, False, lda_pad={lda_pad})
smem, (a_off, b_off, b2_off) = t._pack([(Ast, lda), (Bst, ldb), (None, 0)])
C = np.zeros((t.M, t.NCOL), np.float32)
lib.run(8 | 2, smem.ctypes.data, smem.size, a_off + {a_shift}, lda, None, b_off, -1, ldb, None, 16, C.ctypes.data)
print("ran")
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("a_shift,lda_pad", [(1, 4), (0, 5)], ids=["misaligned-pointer", "misaligned-stride"])
def test_ldmatrix_rows_must_be_aligned(tc_lib, a_shift, lda_pad):
    res = _run_misplaced(tc_lib, a_shift, lda_pad)
    assert res.returncode != 0 and "ran" not in res.stdout, res.stdout + res.stderr
    assert "ldmatrix emulation" in res.stderr and "not 16-byte aligned" in res.stderr, res.stderr[-2000:]


def test_ldmatrix_aligned_control_runs(tc_lib):
    res = _run_misplaced(tc_lib, 0, 4)
    assert res.returncode == 0 and "ran" in res.stdout, res.stdout + res.stderr


def _check_tf32(err, split):
    # TF32 keeps 11 significant bits per operand, 3xTF32 about 22 (fp32 products); a plain TF32 error far below
    # 2^-11 would mean the rounding went missing
    if split:
        assert err < 2e-6, err
    else:
        assert 1e-5 < err < 2e-3, err


def _rel(C, want):
    return np.sqrt(np.mean((C - want) ** 2) / np.mean(want ** 2))


@pytest.mark.parametrize("split", [False, True], ids=["tf32", "3xtf32"])
@pytest.mark.parametrize("K", [8, 64])
def test_strip_pairs_matches_float64(tc_lib, split, K):
    """Both operands stored along k (row strides 8 mod 32, as the kernels use), k permuted by the pair loads."""
    lib = _load(tc_lib)
    rng = np.random.default_rng(K + 2 * split)
    A, B = rng.standard_normal((M, K)), rng.standard_normal((NCOL, K))
    smem, (a_off, b_off) = _pack([(A, K + 8), (B, K + 8)])
    C = np.full((M, NCOL), np.nan, np.float32)
    lib.run_pairs(0, int(split), smem.ctypes.data, smem.size, a_off, K + 8, b_off, K + 8, K, None, None,
                  C.ctypes.data)
    _check_tf32(_rel(C, A @ B.T), split)


@pytest.mark.parametrize("split", [False, True], ids=["tf32", "3xtf32"])
def test_tile_acc_t_takes_b_from_accumulators(tc_lib, split):
    """C0 + A S^T with S given as a warp's accumulator tiles (the state kept in registers by wkv7_tc_chunk)."""
    lib = _load(tc_lib)
    rng = np.random.default_rng(7 + split)
    K = NCOL
    A, S, C0 = rng.standard_normal((M, K)), rng.standard_normal((M, K)), rng.standard_normal((M, M))
    smem, (a_off,) = _pack([(A, K + 8)])
    S32, C032 = S.astype(np.float32), C0.astype(np.float32)
    C = np.full((M, M), np.nan, np.float32)
    lib.run_pairs(1, int(split), smem.ctypes.data, smem.size, a_off, K + 8, -1, 0, K, S32.ctypes.data,
                  C032.ctypes.data, C.ctypes.data)
    _check_tf32(_rel(C - C0, A @ S.T), split)
