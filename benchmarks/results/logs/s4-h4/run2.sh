#!/bin/bash
# Device call 2 (H4, wkv7_tc_wy v3): timings old vs new in one process, chunked GPU tests, racecheck, memcheck,
# accuracy (wkv7, no fla), host-path tests touching wkv7.
export PYTHONPATH=$PWD
S=$SECONDS
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $OUT/env.txt 2>&1
timeout 100 python3 benchmarks/wkv7_tc_sweep.py --wy --out $OUT/wy_sweep.json > $OUT/wy_sweep.log 2>&1; echo "rc $?" >> $OUT/wy_sweep.log
echo "== sweep $((SECONDS - S)) s"; grep -v "kind=kernel\|Warn\|warn_once" $OUT/wy_sweep.log | cut -c1-230
grep "kind=kernel" $OUT/wy_sweep.log | sed 's/TC kind=kernel //' | grep -v "ms=0.00" | cut -c1-110
timeout 60 python3 -m pytest -q -m gpu tests/test_wkv7.py -x -k "chunked and not fla" > $OUT/pytest_gpu.log 2>&1; echo "rc $?" >> $OUT/pytest_gpu.log
echo "== pytest $((SECONDS - S)) s"; tail -3 $OUT/pytest_gpu.log
timeout 45 compute-sanitizer --tool racecheck python3 benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/racecheck.log 2>&1; echo "rc $?" >> $OUT/racecheck.log
echo "== racecheck $((SECONDS - S)) s"; grep -E "RACECHECK SUMMARY|rc " $OUT/racecheck.log; grep -m3 "Race reported" $OUT/racecheck.log | cut -c1-150
timeout 25 compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv7 > $OUT/memcheck.log 2>&1; echo "rc $?" >> $OUT/memcheck.log
echo "== memcheck $((SECONDS - S)) s"; grep -E "ERROR SUMMARY|rc " $OUT/memcheck.log | tail -3
timeout $((258 - SECONDS)) python3 benchmarks/accuracy.py --ops wkv7 --no-fla > $OUT/accuracy.log 2>&1; echo "rc $?" >> $OUT/accuracy.log
echo "== accuracy $((SECONDS - S)) s"; grep -E "PASS|FAIL|rc " $OUT/accuracy.log | grep -v "float32" | cut -c1-90 | head -24
if [ $((262 - SECONDS)) -gt 20 ]; then
timeout $((262 - SECONDS)) ncu --kernel-name regex:wkv7_tc_wy --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy python3 benchmarks/ncu_one.py wkv7 8 4096 fwd > $OUT/ncu.log 2>&1; echo "rc $?" >> $OUT/ncu.log
echo "== ncu $((SECONDS - S)) s"; grep -E "Duration|Issue Slots Busy|Active Warps Per Scheduler|Eligible Warps|No Eligible|Warp Cycles Per Issued|Stall|Theoretical Occ|Achieved Occ|Registers|Memory Throughput|Compute \(SM\)" $OUT/ncu.log | head -24
fi
