// rwkvops-ema: elementwise gated EMA, the example plugin's kernels.
//
//   S_t = S_{t-1} * exp(-exp(w_t)) + x_t ;  y_t = S_t * g      (elementwise over [H, N]; g is [H, N], shared)
//
// `#include "common.cuh"` is resolved by rwkvops' compile cache from its own cuda_src/: the sequence/state ABI
// helpers (rwkv::seq_bounds, rwkv::state_slot, element conversion) are shared with the built-in ops.
//
// Launch layout of the sequence kernels: grid = (num_seqs, ceil(H*N / blockDim.x)), one thread per
// (sequence, h, n) walking that sequence's tokens; per-token arrays are flat tokens [total, H*N].
#include "common.cuh"

namespace ema {

using namespace rwkv;

__device__ __forceinline__ float decay(float w) { return expf(-expf(w)); }

}  // namespace ema

// Forward: y (in F) and the final states.  state_in null = zeros; state_out null = not wanted.  For a pool,
// state_out aliases state_in: this thread reads its element of the slot first and writes it last.
template <typename F>
__global__ void ema_forward(const F* __restrict__ x, const F* __restrict__ w, const F* __restrict__ g,
                            F* __restrict__ y,
                            const int* cu_seqlens, int T, long long total,
                            const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
                            int HN) {
    const int s = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= HN) return;
    long long start, end;
    ema::seq_bounds(cu_seqlens, T, total, s, start, end, err);
    const long long slot = ema::state_slot(state_idx, s, pool_size, err);
    float S = (state_in != nullptr && slot >= 0) ? state_in[slot * HN + c] : 0.f;
    const float gc = ema::to_float(g[c]);
    for (long long tok = start; tok < end; ++tok) {
        const long long i = tok * HN + c;
        S = S * ema::decay(ema::to_float(w[i])) + ema::to_float(x[i]);
        y[i] = ema::from_float<F>(S * gc);
    }
    if (state_out != nullptr && slot >= 0) state_out[slot * HN + c] = S;
}

// Backward: gradients of sum(dy*y) + sum(dstate*S_T).  First replays the forward, keeping S_{t-1} of every
// token in `scratch` (fp32 [total, HN], written and read by this thread only), then walks back:
//   dS += dy_t g ;  dx_t = dS ;  dw_t = dS S_{t-1} d_t (-exp(w_t)) ;  dg += dy_t S_t ;  dS *= d_t.
// dstate (null = zeros) and dstate_out are [num_seqs, HN]; dg_part [num_seqs, HN] gets this sequence's dg.
// state_out is unused (kept for the common ABI).
template <typename F>
__global__ void ema_backward(const F* __restrict__ x, const F* __restrict__ w, const F* __restrict__ g,
                             const F* __restrict__ dy, const float* __restrict__ dstate,
                             F* __restrict__ dx, F* __restrict__ dw, float* __restrict__ dg_part,
                             float* __restrict__ dstate_out, float* __restrict__ scratch,
                             const int* cu_seqlens, int T, long long total,
                             const float* state_in, float* state_out, const int* state_idx, int pool_size, int* err,
                             int HN) {
    const int s = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= HN) return;
    long long start, end;
    ema::seq_bounds(cu_seqlens, T, total, s, start, end, err);
    const long long slot = ema::state_slot(state_idx, s, pool_size, err);
    float S = (state_in != nullptr && slot >= 0) ? state_in[slot * HN + c] : 0.f;
    for (long long tok = start; tok < end; ++tok) {
        const long long i = tok * HN + c;
        scratch[i] = S;
        S = S * ema::decay(ema::to_float(w[i])) + ema::to_float(x[i]);
    }
    const float gc = ema::to_float(g[c]);
    float dS = dstate != nullptr ? dstate[(long long)s * HN + c] : 0.f;
    float dg = 0.f;
    for (long long tok = end; tok-- > start;) {
        const long long i = tok * HN + c;
        const float Sp = scratch[i];
        const float e = expf(ema::to_float(w[i]));
        const float d = expf(-e);
        const float St = Sp * d + ema::to_float(x[i]);          // bit-identical to the forward's S_t
        const float dyt = dy != nullptr ? ema::to_float(dy[i]) : 0.f;
        dS += dyt * gc;
        dg += dyt * St;
        dx[i] = ema::from_float<F>(dS);
        dw[i] = ema::from_float<F>(-(dS * Sp * d * e));
        dS *= d;
    }
    dstate_out[(long long)s * HN + c] = dS;
    dg_part[(long long)s * HN + c] = dg;
}

// dg[c] = sum over sequences of dg_part[s, c], in a fixed order (deterministic), converted to F.
template <typename F>
__global__ void ema_sum_partials(const float* __restrict__ part, F* __restrict__ out, int num, int HN) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= HN) return;
    float acc = 0.f;
    for (int s = 0; s < num; ++s) acc += part[(long long)s * HN + c];
    out[c] = ema::from_float<F>(acc);
}
