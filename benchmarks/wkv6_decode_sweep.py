"""Variants of wkv6's one-token decode kernel (wkv6_forward_stream), timed at serving sizes (bf16 inputs, fp32
states, H = 32, N = 64), dense [B, H, N, N] and pool (device cu_seqlens 0..B, state_indices a permutation into a
pool of 2B slots).  Each variant is checked bit for bit against the first (the same arithmetic), and against the
op itself (rwkvops.wkv6).  Times: CUDA events around ``reps`` back-to-back launches, median of 5 rounds.

    python benchmarks/wkv6_decode_sweep.py [--sizes 256,64] [--json PATH]

Variants (TPB threads per block, HINT, ASYNC, MINB resident blocks asked of __launch_bounds__); (256, 0, 0, 1) is
the op's kernel as it was, (256, 1, 0, 1) as it is.  HINT 1: evict-first cache hints (ld/st.global.cs) on the
state.  ASYNC: 0 = state quads straight into registers; 1 = per-thread 16-byte cp.async into shared memory, then
each quad computed and stored at once (registers hold one quad); 2 = one bulk copy (sm_90 cp.async.bulk, an
mbarrier) of the whole 16 KB (slot, head) tile into shared memory; 3 = 2 plus a bulk store of the updated tile.
(Sweep-only code: 1-3 write back a zero-length sequence's tile without initializing it, which the op's kernel
must not do.)
"""
import argparse
import json
import sys

import numpy as np

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))

KERNEL = r"""
#include "common.cuh"

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <int TPB, int HINT, int ASYNC, int MINB>
__global__ void __launch_bounds__(TPB, MINB) stream_v(
    const int* __restrict__ cu_seqlens, int Tlen, long long total, int H,
    const __nv_bfloat16* __restrict__ r, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ u,
    const float* state_in, float* state_out, const int* __restrict__ state_idx, int pool_size,
    __nv_bfloat16* __restrict__ y, int* err)
{
    constexpr int N = 64;
    constexpr int NQ = N / 4;
    constexpr int RPP = TPB / NQ;
    constexpr int G = N / RPP;
    __shared__ __align__(128) float4 tile[ASYNC ? N * N / 4 : 1];
    __shared__ __align__(8) unsigned long long bar;
    const int s = blockIdx.x / H, h = blockIdx.x % H, tid = threadIdx.x;
    const int cq = tid % NQ, row0 = tid / NQ;
    long long start, end;
    rwkv::seq_bounds(cu_seqlens, Tlen, total, s, start, end, err);
    const long long slot = rwkv::state_slot(state_idx, s, pool_size, err);
    const long long tbase = (slot * H + h) * (long long)(N * N);
    const long long sbase = tbase + 4 * cq;
    const bool have = state_in != nullptr && slot >= 0;
    float4 st[ASYNC ? 1 : G];
    if (ASYNC == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float4* p = reinterpret_cast<const float4*>(state_in + sbase + (long long)(row0 + g * RPP) * N);
            st[g] = have ? (HINT ? __ldcs(p) : *p) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    } else if (ASYNC == 1) {
        if (have) {
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const int q = (row0 + g * RPP) * NQ + cq;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(&tile[q])),
                             "l"(state_in + sbase + (long long)(row0 + g * RPP) * N) : "memory");
            }
            asm volatile("cp.async.commit_group;\ncp.async.wait_all;" ::: "memory");
        }
    } else {
        if (tid == 0) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bar)) : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        if (have && tid == 0) {
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(&bar)),
                         "r"(N * N * 4) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                         ::"r"(smem_u32(tile)), "l"(state_in + tbase), "r"(N * N * 4), "r"(smem_u32(&bar))
                         : "memory");
        }
    }
    float u0 = rwkv::to_float(u[h * N + 4 * cq]), u1 = rwkv::to_float(u[h * N + 4 * cq + 1]);
    float u2 = rwkv::to_float(u[h * N + 4 * cq + 2]), u3 = rwkv::to_float(u[h * N + 4 * cq + 3]);
    if (ASYNC >= 2 && have) {
        unsigned done = 0;
        while (!done)
            asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                         : "=r"(done) : "r"(smem_u32(&bar)) : "memory");
    }
    for (long long t = start; t < end; ++t) {
        const long long base = (t * H + h) * N + 4 * cq;
        const float r0 = rwkv::to_float(r[base]), r1 = rwkv::to_float(r[base + 1]);
        const float r2 = rwkv::to_float(r[base + 2]), r3 = rwkv::to_float(r[base + 3]);
        const float k0 = rwkv::to_float(k[base]), k1 = rwkv::to_float(k[base + 1]);
        const float k2 = rwkv::to_float(k[base + 2]), k3 = rwkv::to_float(k[base + 3]);
        const float d0 = expf(-expf(rwkv::to_float(w[base]))), d1 = expf(-expf(rwkv::to_float(w[base + 1])));
        const float d2 = expf(-expf(rwkv::to_float(w[base + 2]))), d3 = expf(-expf(rwkv::to_float(w[base + 3])));
        const float a0 = u0 * k0, a1 = u1 * k1, a2 = u2 * k2, a3 = u3 * k3;
        const long long vb = (t * H + h) * N;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const int row = row0 + g * RPP;
            const int q = row * NQ + cq;
            const float vi = rwkv::to_float(v[vb + row]);
            float4 x;
            if (ASYNC == 0) x = st[g];
            else if (t == start && !have) x = make_float4(0.f, 0.f, 0.f, 0.f);
            else x = tile[q];
            float acc = r0 * fmaf(a0, vi, x.x);
            acc = fmaf(r1, fmaf(a1, vi, x.y), acc);
            acc = fmaf(r2, fmaf(a2, vi, x.z), acc);
            acc = fmaf(r3, fmaf(a3, vi, x.w), acc);
            x.x = fmaf(x.x, d0, k0 * vi);
            x.y = fmaf(x.y, d1, k1 * vi);
            x.z = fmaf(x.z, d2, k2 * vi);
            x.w = fmaf(x.w, d3, k3 * vi);
            if (ASYNC == 0) st[g] = x;
            else tile[q] = x;
#pragma unroll
            for (int m = NQ / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
            if (cq == 0) y[vb + row] = rwkv::from_float<__nv_bfloat16>(acc);
        }
    }
    if (state_out == nullptr || slot < 0) return;
    if (ASYNC == 3) {
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (tid == 0) {
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(state_out + tbase),
                         "r"(smem_u32(tile)), "r"(N * N * 4) : "memory");
            asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;" ::: "memory");
        }
        return;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float4* p = reinterpret_cast<float4*>(state_out + sbase + (long long)(row0 + g * RPP) * N);
        const float4 x = ASYNC == 0 ? st[g] : tile[(row0 + g * RPP) * NQ + cq];
        if (HINT) __stcs(p, x); else *p = x;
    }
}
"""

VARIANTS = [  # (TPB, HINT, ASYNC, MINB); the first: the op's kernel before the hints
    (256, 0, 0, 1), (256, 1, 0, 1), (256, 0, 0, 4), (256, 1, 0, 4), (512, 1, 0, 2), (256, 1, 0, 3),
    (256, 0, 0, 6), (256, 0, 0, 8), (128, 0, 0, 8), (512, 0, 0, 2), (512, 0, 0, 3), (256, 1, 0, 6),
    (256, 0, 1, 1), (256, 0, 1, 6), (256, 0, 1, 8), (256, 1, 1, 8),
    (256, 0, 2, 1), (256, 0, 2, 6), (256, 0, 2, 8), (128, 0, 2, 12), (512, 0, 2, 4),
    (256, 0, 3, 6), (256, 0, 3, 8), (128, 0, 3, 12),
]


def main():
    import cupy
    import torch

    import rwkvops
    from rwkvops._compile import read_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,64")
    ap.add_argument("--only", default=None, help="comma-separated indices into VARIANTS (0 is always run)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    H, N = 32, 64
    code = KERNEL.replace('#include "common.cuh"', read_source("common.cuh"))
    variants = VARIANTS if not args.only else [VARIANTS[0]] + [VARIANTS[int(i)] for i in args.only.split(",")]
    names = [f"stream_v<{t}, {hh}, {a}, {m}>" for t, hh, a, m in variants]
    mod = cupy.RawModule(code=code, options=("-std=c++17",), name_expressions=names)
    err = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = []
    bw = None
    for B in map(int, args.sizes.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = [torch.randn(B, 1, H, N, device="cuda", generator=g).bfloat16() for _ in range(4)]
        x[3] = (-torch.rand(B, 1, H, N, device="cuda", generator=g) - 0.5).bfloat16()
        u = torch.randn(H, N, device="cuda", generator=g).bfloat16()
        r, k, v, w = x
        for mode in ("dense", "pool"):
            P = B if mode == "dense" else 2 * B
            s0 = torch.rand(P, H, N, N, device="cuda", generator=g) * 0.1
            if mode == "pool":
                idx = torch.randperm(2 * B, device="cuda", generator=g)[:B].to(torch.int32)
                cu = torch.arange(B + 1, device="cuda", dtype=torch.int32)
                Tlen, total = 0, B
            else:
                idx = cu = None
                Tlen, total = 1, B
            ref = None
            p = lambda t: 0 if t is None else t.data_ptr()
            for name, var in zip(names, variants):
                fn = mod.get_function(name)
                y = torch.empty_like(r)
                so = s0.clone() if mode == "pool" else torch.empty_like(s0)

                def call():
                    fn((B * H,), (var[0],), (p(cu), np.int32(Tlen), np.int64(total), np.int32(H), p(r), p(k), p(v),
                                             p(w), p(u), p(s0 if mode == "dense" else so),
                                             p(so), p(idx), np.int32(P), p(y), p(err)))
                if mode == "pool":
                    so.copy_(s0)
                call()
                torch.cuda.synchronize()
                if ref is None:
                    ref = (y.clone(), so.clone())
                    with torch.no_grad():
                        if mode == "dense":
                            yo, sop = rwkvops.wkv6(r, k, v, w, u, state=s0)
                        else:
                            pool = s0.clone()
                            yo, sop = rwkvops.wkv6(*(t.view(1, B, H, N) for t in (r, k, v, w)), u, state=pool,
                                                   cu_seqlens=cu, state_indices=idx)
                    same_op = bool(torch.equal(yo.view_as(y), y) and torch.equal(sop, so))
                same = bool(torch.equal(ref[0], y) and torch.equal(ref[1], so))
                ts = []
                for _ in range(5):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(args.reps):
                        call()
                    b.record()
                    b.synchronize()
                    ts.append(a.elapsed_time(b) / args.reps)
                ms = float(np.median(ts))
                attrs = fn.attributes
                rec = dict(B=B, mode=mode, variant=name, ms=ms, same=same, same_as_op=same_op,
                           regs=attrs.get("num_regs"), smem=attrs.get("shared_size_bytes"),
                           gbs=2 * B * H * N * N * 4 / ms / 1e6)
                out.append(rec)
                print(f"SWEEP B={B} {mode:5s} {name:26s} {ms:.4f} ms {rec['gbs']:.0f} GB/s regs={rec['regs']} "
                      f"same={same} op={same_op}", flush=True)
        if bw is None:
            a_ = torch.empty(B * H * N * N, device="cuda")
            b_ = torch.empty_like(a_)
            ts = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(args.reps):
                    b_.copy_(a_)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / args.reps)
            bw = float(np.median(ts))
            print(f"SWEEP B={B} torch copy_ of the state: {bw:.4f} ms ({2 * a_.numel() * 4 / bw / 1e6:.0f} GB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": out, "copy_ms": bw}, f, indent=1)


if __name__ == "__main__":
    main()
