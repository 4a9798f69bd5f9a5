#!/bin/bash
# One H100 device call: GPU tests of the chunked paths, bwd sweep ((warps, strip) x adjoint segments, peak memory),
# kernel profiles, racecheck, fla fwd+bwd (time, peak memory) last.  Logs into $OUT.
export PYTHONPATH=$PWD:/tmp/site RWKVOPS_COMMIT=2453368a8869e8f97b19a1fb2aea5f93820715e2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
timeout 80 python3 -m pytest -q -m gpu tests/test_wkv7.py -x -k chunked > $OUT/pytest_gpu.log 2>&1; echo "rc $?" >> $OUT/pytest_gpu.log
timeout 100 python3 benchmarks/wkv7_tc_sweep.py --bwd --quick --out $OUT/wkv7_bwd_sweep.json > $OUT/sweep.log 2>&1; echo "rc $?" >> $OUT/sweep.log
timeout 30 python3 - > $OUT/profile.log 2>&1 <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from rwkvops.ops import wkv7 as W
import profile_kernels as P
for st, B, mode, T in ((2, 8, "fwdbwd", 4096), (4, 8, "fwdbwd", 4096), (2, 1, "fwdbwd", 4096), (2, 1, "fwd", 16384)):
    W.TC_BWD_STRIP[64] = st
    print(f"### TC_BWD_STRIP[64] = {st}", flush=True)
    P.run(op="wkv7", B=B, T=T, mode=mode)
PY
echo "rc $?" >> $OUT/profile.log
timeout 40 compute-sanitizer --tool racecheck python3 benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/racecheck.log 2>&1; echo "rc $?" >> $OUT/racecheck.log
timeout $((262 - SECONDS)) python3 - > $OUT/fla.log 2>&1 <<'PY'
import sys, torch
sys.path.insert(0, "benchmarks")
import harness, bench_ops
for B, T in ((8, 4096),):
    for impl in ("rwkvops", "fla"):
        x = bench_ops.make_inputs("wkv7", B, T, "bfloat16")
        for t in x.values():
            t.requires_grad_(True)
        fwd = bench_ops._ours("wkv7", x, None, True) if impl == "rwkvops" else bench_ops._peer("wkv7", "fla")(x, None, True)
        y, s = fwd()
        gy, gs = torch.randn_like(y), torch.randn_like(s)
        def fb():
            yy, ss = fwd()
            torch.autograd.backward([yy, ss], [gy, gs])
        print(f"FLA impl={impl} B={B} T={T} peak_mem_mb={harness.peak_mem_mb(fb):.0f}", flush=True)
        print(f"FLA impl={impl} B={B} T={T} ms={harness.cuda_time(fb, reps=5):.3f}", flush=True)
        del x, y, s
        torch.cuda.empty_cache()
PY
echo "rc $?" >> $OUT/fla.log
