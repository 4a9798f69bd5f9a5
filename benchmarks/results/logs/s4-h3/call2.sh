#!/bin/bash
# Device call 2 (H3, issue #4): timings of the chunked-forward variants, per-kernel profile, then (in parallel)
# the wkv6 GPU tests of the changed paths, compute-sanitizer memcheck and racecheck.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
D=benchmarks/results/logs/s4-h3
t0=$SECONDS
timeout 100 python3 $D/timing.py > $OUT/timing.log 2>&1; echo "[timing] rc=$? $((SECONDS-t0))s"
timeout 50 python3 benchmarks/profile_kernels.py op=wkv6 B=8 T=4096 mode=fwd op=wkv6 B=1 T=16384 mode=fwd \
  op=wkv6 B=8 T=4096 mode=fwdbwd > $OUT/profile.log 2>&1; echo "[profile] rc=$? $((SECONDS-t0))s"
L=$((262 - SECONDS))
( timeout $L python3 -m pytest -q -m gpu -p no:cacheprovider -n 4 tests/test_wkv6.py -x -k "chunked or varlen or strong" > $OUT/pytest_gpu.log 2>&1; echo "rc=$?" >> $OUT/pytest_gpu.log ) &
( timeout $L compute-sanitizer --tool memcheck --error-exitcode 3 python3 $D/sanitize_h3.py > $OUT/memcheck.log 2>&1; echo "rc=$?" >> $OUT/memcheck.log ) &
( timeout $L compute-sanitizer --tool racecheck --error-exitcode 3 python3 $D/sanitize_h3.py > $OUT/racecheck.log 2>&1; echo "rc=$?" >> $OUT/racecheck.log ) &
wait
echo "[checks] $((SECONDS-t0))s"
grep TIME $OUT/timing.log; tail -n 3 $OUT/timing.log | grep -v TIME
grep -E "^==|wkv6_" $OUT/profile.log | cut -c1-60,160-250
tail -n 4 $OUT/pytest_gpu.log
tail -n 3 $OUT/memcheck.log; tail -n 3 $OUT/racecheck.log
