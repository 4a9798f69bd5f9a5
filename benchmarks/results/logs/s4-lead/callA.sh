# Session 4 lead, device call A: every GPU test, memcheck (all ops, in parallel with the tests), racecheck (all ops +
# the wkv7 WY kernel sweep), host overhead, the wkv4 fwd+bwd probe, accuracy (--no-fla).  Logs under $OUT.
export PYTHONUNBUFFERED=1
S=benchmarks/results/logs/s4-lead
(STAGE_TIMEOUT=300 bash benchmarks/gpu_session.sh test > $OUT/stage_test.txt 2>&1) &
(sleep 10; mkdir -p $OUT/m; OUT=$OUT/m STAGE_TIMEOUT=200 bash benchmarks/gpu_session.sh memquick > $OUT/stage_mem.txt 2>&1) &
wait
mkdir -p $OUT/r; OUT=$OUT/r STAGE_TIMEOUT=60 bash benchmarks/gpu_session.sh racecheck host > $OUT/stage_race.txt 2>&1
PYTHONPATH=.:benchmarks timeout 60 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/racecheck_wkv7_wy.log 2>&1
echo "[racecheck wkv7 sweep] rc=$? $(tail -n 1 $OUT/racecheck_wkv7_wy.log)"
PYTHONPATH=.:benchmarks timeout 60 python3 $S/wkv4_bwd_probe.py > $OUT/wkv4_probe.log 2>&1; echo "[probe] rc=$?"
PYTHONPATH=.:benchmarks timeout 120 python3 benchmarks/accuracy.py --no-fla --out $OUT > $OUT/accuracy.log 2>&1
echo "[accuracy] rc=$? $(grep -c PASS $OUT/accuracy.log) PASS lines, $(grep -c FAIL $OUT/accuracy.log) FAIL lines"
cat $OUT/stage_*.txt $OUT/r/stage_race.txt 2>/dev/null | grep -v "passed in\|^HOST\|2.11.0"
grep -h "passed\|failed" $OUT/test-gpu-*.log | grep -v " passed in\| passed, [0-9]* skipped in" | head -20
grep -h "^FAILED\|^ERROR" $OUT/test-gpu-*.log | head -20
grep -h "^HOST" $OUT/r/host.log | grep "B=  1\|B=256"
grep "^PROBE" $OUT/wkv4_probe.log
grep -A14 "^PROFILE" $OUT/wkv4_probe.log | cut -c1-150 | head -64
tail -n 40 $OUT/accuracy.log | cut -c1-160
(cd $OUT && tar czf all.tgz --exclude=all.tgz . 2>/dev/null)
