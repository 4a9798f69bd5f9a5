# Session 8, device call C: the GPU tests of the ops whose kernels use tc.cuh (wkv6, wkv7) and the GPU property tests
# of every op (test_ops_check), in parallel shards; memcheck and racecheck (sanitize.py --quick) on wkv6 and wkv7
# beside them; then accuracy.py (no fla) at B=8 T=4096.  Logs under $OUT.
export PYTHONUNBUFFERED=1
(TEST_FILES="tests/test_wkv6.py tests/test_wkv7.py tests/test_ops_check.py" STAGE_TIMEOUT=330 \
  bash benchmarks/gpu_session.sh test > $OUT/stage_test.txt 2>&1) &
(sleep 20; mkdir -p $OUT/san; OUT=$OUT/san SANITIZE_OPS=wkv6,wkv7 STAGE_TIMEOUT=200 \
  bash benchmarks/gpu_session.sh memquick racecheck > $OUT/stage_san.txt 2>&1) &
wait
echo "[tests+sanitizer] ${SECONDS}s"
PYTHONPATH=.:benchmarks timeout $((585 - SECONDS)) python3 benchmarks/accuracy.py --no-fla --out $OUT > $OUT/accuracy.log 2>&1
echo "[accuracy] rc=$? $(grep -c PASS $OUT/accuracy.log) PASS lines, $(grep -c FAIL $OUT/accuracy.log) FAIL lines ${SECONDS}s"
cat $OUT/stage_test.txt $OUT/stage_san.txt | grep -v "^HOST\|2.11.0"
grep -h "^FAILED\|^ERROR" $OUT/test-gpu-*.log | head -20
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" $OUT/san/*.log
rm -f $OUT/logs.tgz $OUT/san/logs.tgz; (cd $OUT && tar czf all.tgz --exclude=all.tgz . 2>/dev/null)
