# Session 6, device call A: every GPU test (shards in parallel) with memcheck and racecheck beside them, then
# accuracy (fla side by side) and an ncu look at the forward kernels short of their targets.  Logs under $OUT.
export PYTHONUNBUFFERED=1
(STAGE_TIMEOUT=330 bash benchmarks/gpu_session.sh test > $OUT/stage_test.txt 2>&1) &
(sleep 10; mkdir -p $OUT/m; OUT=$OUT/m STAGE_TIMEOUT=240 bash benchmarks/gpu_session.sh memquick > $OUT/stage_mem.txt 2>&1
 mkdir -p $OUT/r; OUT=$OUT/r STAGE_TIMEOUT=120 bash benchmarks/gpu_session.sh racecheck > $OUT/stage_race.txt 2>&1) &
wait
PYTHONPATH=.:benchmarks:/tmp/site timeout 150 python3 benchmarks/accuracy.py --out $OUT > $OUT/accuracy.log 2>&1
echo "[accuracy] rc=$? $(tail -n 1 $OUT/accuracy.log)"
NCU="ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats"
for c in "wkv6 8 4096" "wkv6 1 16384" "wkv7 8 4096" "wkv7 1 16384" "wkv4 1 16384"; do
  set -- $c
  PYTHONPATH=.:benchmarks:/tmp/site timeout 60 $NCU -k regex:$1 -c 4 python3 benchmarks/ncu_one.py $1 $2 $3 fwd \
    > $OUT/ncu_$1_B$2_T$3.log 2>&1; echo "[ncu $c] rc=$?"
done
cat $OUT/stage_*.txt | grep -v "passed in\|2.11.0"
grep -h "passed\|failed" $OUT/test-gpu-*.log | grep -v " passed in\| passed, [0-9]* skipped in" | head -20
grep -h "^FAILED\|^ERROR" $OUT/test-gpu-*.log | head -20
cat $OUT/m/stage_mem.txt $OUT/r/stage_race.txt 2>/dev/null | tail -4
tail -n 8 $OUT/accuracy.log | cut -c1-200
grep -h "wkv.*_\|Duration\|Achieved Occupancy\|Registers Per\|Compute (SM) Throughput\|Memory Throughput\|Issued Warp\|No Eligible" $OUT/ncu_*.log | grep -v "^==" | cut -c1-120 | head -80
