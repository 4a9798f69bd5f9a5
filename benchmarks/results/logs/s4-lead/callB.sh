# Session 4 lead, device call B: racecheck of the wkv7 WY kernel (BAR_FULL now barrier 0) with the wkv7 chunked GPU
# tests beside it, then bench_ops' key cases of wkv7 and wkv4 (fla 0.6.0 in the same process).  Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
S=benchmarks/results/logs/s4-lead
(timeout 150 python3 -m pytest -q -x -m gpu tests/test_wkv7.py -k "chunked and not fla" -p no:cacheprovider > $OUT/wkv7_gpu_tests.log 2>&1; echo "[wkv7 tests] rc=$? $(tail -n 1 $OUT/wkv7_gpu_tests.log)") &
timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/racecheck_wkv7_wy.log 2>&1
rc1=$?; echo "[racecheck wkv7 sweep] rc=$rc1 $(tail -n 1 $OUT/racecheck_wkv7_wy.log)"
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv7 > $OUT/racecheck_wkv7.log 2>&1
rc2=$?; echo "[racecheck sanitize wkv7] rc=$rc2 $(tail -n 1 $OUT/racecheck_wkv7.log)"
wait
if [ $rc1 -ne 0 ] || [ $rc2 -ne 0 ]; then
  sed -i 's/^TC_WY = True/TC_WY = False/' rwkvops/ops/wkv7.py; echo "TC_WY set False for the bench (racecheck hazards)"
fi
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout ${BENCH_S:-380} python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "(wkv7 or wkv4) and not B16 and not T1024 and not B64 and not torch_step and not float32 and not fwd-B1-T4096" \
  benchmarks/bench_ops.py > $OUT/bench.log 2>&1; echo "[bench] rc=$?"
grep "^BENCH" $OUT/bench.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[6:]); print(r['op'], r['mode'], r['B'], r['T'], r['impl'], r['ms'] and round(r['ms'], 4), 'host', r.get('host_ms') and round(r['host_ms'], 4), 'mem', r.get('peak_mem_mb') and round(r['peak_mem_mb']))"
