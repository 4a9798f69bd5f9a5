"""wkv6's decode kernel (wkv6_forward_stream) at every head size, for compute-sanitizer: dense T = 1 with and
without a state, a pool with a -1 slot, a packed call with a zero-length sequence (total <= sequences), checked
against the float64 CPU path."""
import numpy as np
import torch

import rwkvops
from rwkvops import testing

op = rwkvops.get_op("wkv6")
worst = 0.0
with torch.no_grad():
    for N in (32, 64, 128):
        for dtype in ("bfloat16", "float32"):
            tol = 3e-3 if dtype == "bfloat16" else 5e-5
            rng = np.random.default_rng(N)
            B, H = 3, 2
            dims = testing.default_dims(op, B=B, T=1, H=H, N=N, C=64)
            x64 = testing.sample_inputs(op, dims, rng)
            tdt = getattr(torch, dtype)
            x = [torch.tensor(x64[a.name], device="cuda").to(tdt) for a in op.inputs]
            xr = [testing.to_numpy(t.float()).astype(np.float64) for t in x]
            st = testing.sample_state(op, dims, B, rng)
            for state in (None, st):
                kw = {} if state is None else {"state": torch.tensor(state, device="cuda", dtype=torch.float32)}
                kr = {} if state is None else {"state": state.astype(np.float32).astype(np.float64)}
                y, s = op(*x, **kw)
                ry, rs = op(*xr, **kr)
                e = max(testing.rel_rms(y, ry), testing.rel_rms(s, rs))
                assert e < tol, (N, dtype, "dense", e)
                worst = max(worst, e / tol)
            # pool: packed [1, B, ...], one token each, slot -1 for the second sequence
            xp = [t.reshape(1, B, *t.shape[2:]) if t.dim() == 4 else t for t in x]
            xpr = [a.reshape(1, B, *a.shape[2:]) if a.ndim == 4 else a for a in xr]
            pool = testing.sample_state(op, dims, 2 * B, rng)
            idx = np.array([4, -1, 1], np.int32)
            tp = torch.tensor(pool, device="cuda", dtype=torch.float32)
            y, s = op(*xp, state=tp, cu_seqlens=torch.arange(B + 1, device="cuda", dtype=torch.int32),
                      state_indices=torch.tensor(idx, device="cuda"))
            pr = pool.astype(np.float32).astype(np.float64)
            ry, rs = op(*xpr, state=pr, cu_seqlens=np.arange(B + 1), state_indices=idx)
            e = max(testing.rel_rms(y, ry), testing.rel_rms(s, rs))
            assert e < tol, (N, dtype, "pool", e)
            # packed with a zero-length sequence: lengths 0, 2, 1 (total 3 = sequences: the decode kernel loops)
            cu = np.array([0, 0, 2, 3], np.int32)
            y, s = op(*xp, state=torch.tensor(st, device="cuda", dtype=torch.float32),
                      cu_seqlens=torch.tensor(cu, device="cuda"))
            ry, rs = op(*xpr, state=st.astype(np.float32).astype(np.float64), cu_seqlens=cu)
            e = max(testing.rel_rms(y, ry), testing.rel_rms(s, rs))
            assert e < tol, (N, dtype, "varlen", e)
            print(f"N={N} {dtype}: dense, pool, varlen ok", flush=True)
rwkvops.check_errors()
print("stream memcheck: done")
