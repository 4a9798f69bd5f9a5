"""Does compute-sanitizer's racecheck order accesses across the hand-off that wkv7_tc_wy uses?  A minimal kernel with
the same protocol: NP producer threads write a double-buffered stage in shared memory, NC consumer threads read it;
one block-wide barrier FULL per chunk (producers reach it with chunk ci staged, consumers with chunk ci-1 done, so
a stage is rewritten only after a FULL the consumers passed after reading it), and a producers-only barrier PROD
inside the producers' loop (as wkv7_tc_wy's P1..P4).  Variants: PROD on/off, FULL as barrier 1 or 0.  Every read must
see the value of its own chunk (checked: bad = 0).  Run under racecheck: python race_named_barriers.py."""
import cupy as cp

SRC = r"""
extern "C" __global__ void handoff(float* out, int* bad, int nchunks, int use_prod, int full_id) {
    __shared__ float stage[2][64];
    const int NC = 64, NP = 64, NT = NC + NP, tid = threadIdx.x;
    if (tid < NC) {                                  // consumers
        float acc = 0.f;
        for (int ci = 0; ci < nchunks; ++ci) {
            asm volatile("bar.sync %0, %1;" :: "r"(full_id), "r"(NT) : "memory");
            const float x = stage[ci & 1][(tid + 7) % 64];   // written by another thread
            if (x != (float)(ci * 1000 + (tid + 7) % 64)) atomicAdd(bad, 1);
            acc += x;
        }
        out[tid] = acc;
        return;
    }
    const int p = tid - NC;                          // producers
    for (int ci = 0; ci < nchunks; ++ci) {
        if (use_prod) asm volatile("bar.sync 2, %0;" :: "r"(NP) : "memory");
        stage[ci & 1][p] = (float)(ci * 1000 + p);
        if (use_prod) asm volatile("bar.sync 2, %0;" :: "r"(NP) : "memory");
        asm volatile("bar.sync %0, %1;" :: "r"(full_id), "r"(NT) : "memory");
    }
}
"""

k = cp.RawKernel(SRC, "handoff")
for use_prod in (1, 0):
    for full_id in (1, 0):
        out = cp.zeros(64, cp.float32)
        bad = cp.zeros(1, cp.int32)
        k((4,), (128,), (out, bad, cp.int32(16), cp.int32(use_prod), cp.int32(full_id)))
        cp.cuda.Device().synchronize()
        print(f"handoff use_prod={use_prod} full_id={full_id}: bad={int(bad[0])}", flush=True)
