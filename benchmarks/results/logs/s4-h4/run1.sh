#!/bin/bash
# Device call 1 (H4, wkv7_tc_wy): timings old vs new in one process, chunked GPU tests, racecheck, memcheck.
export PYTHONPATH=$PWD
S=$SECONDS
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader > $OUT/env.txt 2>&1
timeout 110 python3 benchmarks/wkv7_tc_sweep.py --wy --out $OUT/wy_sweep.json > $OUT/wy_sweep.log 2>&1; echo "rc $?" >> $OUT/wy_sweep.log
echo "== sweep $((SECONDS - S)) s"; grep -v "kind=kernel" $OUT/wy_sweep.log | cut -c1-230
grep "kind=kernel" $OUT/wy_sweep.log | sed 's/TC kind=kernel //' | cut -c1-120
timeout 60 python3 -m pytest -q -m gpu tests/test_wkv7.py -x -k "chunked and not fla" > $OUT/pytest_gpu.log 2>&1; echo "rc $?" >> $OUT/pytest_gpu.log
echo "== pytest $((SECONDS - S)) s"; tail -4 $OUT/pytest_gpu.log
timeout 45 compute-sanitizer --tool racecheck python3 benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/racecheck.log 2>&1; echo "rc $?" >> $OUT/racecheck.log
echo "== racecheck $((SECONDS - S)) s"; grep -E "RACECHECK SUMMARY|sanitize N|rc |rror" $OUT/racecheck.log | head -12
timeout $((262 - SECONDS)) compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv7 > $OUT/memcheck.log 2>&1; echo "rc $?" >> $OUT/memcheck.log
echo "== memcheck $((SECONDS - S)) s"; grep -E "ERROR SUMMARY|rc " $OUT/memcheck.log | tail -3
