"""Latency of a serial chain of 16 KB state hand-offs between blocks (the fused wkv6 forward's look-back design):
blocks take tickets chunk-major; block (c, chain) optionally spins `work` ns (stand-in for its local chunk work),
waits for chunk c-1's flag, loads its 16 KB state, S = S*0.5 + 1, stores it for chunk c+1, fences, flags.
Prints total ms and ms per hop for B=1 T=16384 (32 chains x 256) and B=8 T=4096 (256 chains x 64)."""
import cupy as cp

SRC = r'''
extern "C" __global__ void __launch_bounds__(128) chain(float* st, int* flags, int nchains, int nchunks,
                                                       long long work_ns, int sleep_ns) {
    extern __shared__ float sm[];
    __shared__ int s_t;
    if (threadIdx.x == 0) s_t = atomicAdd(flags + nchains * nchunks, 1);
    __syncthreads();
    const int t = s_t, c = t / nchains, ch = t % nchains;
    if (work_ns > 0) {
        unsigned long long a, b;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(a));
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(b)); } while (b - a < (unsigned long long)work_ns);
    }
    sm[threadIdx.x] = 0.f;
    if (c > 0) {
        if (threadIdx.x == 0) {
            const int* f = flags + (c - 1) * nchains + ch;
            int v;
            while (true) {
                asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
                if (v) break;
                if (sleep_ns) __nanosleep(sleep_ns);
            }
        }
        __syncthreads();
    }
    const float4* src = reinterpret_cast<const float4*>(st + ((long long)c * nchains + ch) * 4096);
    float4* dst = reinterpret_cast<float4*>(st + ((long long)(c + 1) * nchains + ch) * 4096);
    float4 x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __ldcg(src + i * 128 + threadIdx.x);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        x[i].x = fmaf(x[i].x, 0.5f, 1.f); x[i].y = fmaf(x[i].y, 0.5f, 1.f);
        x[i].z = fmaf(x[i].z, 0.5f, 1.f); x[i].w = fmaf(x[i].w, 0.5f, 1.f);
        __stcg(dst + i * 128 + threadIdx.x, x[i]);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* f = flags + c * nchains + ch;
        asm volatile("st.release.gpu.global.s32 [%0], %1;" :: "l"(f), "r"(1) : "memory");
    }
}
'''


def main():
    k = cp.RawKernel(SRC, "chain")
    k.max_dynamic_shared_size_bytes = 72 * 1024
    for nchains, nchunks in ((32, 256), (256, 64)):
        st = cp.zeros(((nchunks + 1) * nchains * 4096,), cp.float32)
        flags = cp.zeros((nchains * nchunks + 1,), cp.int32)
        for work in (0, 5000, 15000):
            for sleep in (0, 32):
                times = []
                for rep in range(6):
                    flags.fill(0)
                    a, b = cp.cuda.Event(), cp.cuda.Event()
                    a.record()
                    k((nchains * nchunks,), (128,), (st, flags, cp.int32(nchains), cp.int32(nchunks),
                                                      cp.int64(work), cp.int32(sleep)), shared_mem=72 * 1024)
                    b.record()
                    b.synchronize()
                    times.append(cp.cuda.get_elapsed_time(a, b))
                t = sorted(times[1:])[len(times[1:]) // 2]
                print(f"CHAIN chains={nchains} chunks={nchunks} work_us={work/1000:.0f} sleep={sleep} "
                      f"ms={t:.3f} per_hop_us={1000 * t / nchunks:.2f}", flush=True)


if __name__ == "__main__":
    main()
