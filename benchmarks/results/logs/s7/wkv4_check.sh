# The device calls C, E and F of session 7 (wkv4 forward changes): every wkv4 GPU test and compute-sanitizer
# (memcheck, racecheck) on the wkv4 kernels side by side, then benchmarks/wkv4_paths.py with $SWEEP (the variants
# compared in one process), then bench_ops' wkv4 cases against fla, then (NCU=1) ncu of the staged forward at B=1
# T=16384.  Logs under $OUT; LIMIT: seconds the call may take.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
mkdir -p $OUT/logs
(timeout 200 compute-sanitizer --tool memcheck python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/logs/memcheck.log 2>&1
 echo "[memcheck] rc=$? $(grep -h 'ERROR SUMMARY' $OUT/logs/memcheck.log | tail -1) ${SECONDS}s"
 timeout 200 compute-sanitizer --tool racecheck python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/logs/racecheck.log 2>&1
 echo "[racecheck] rc=$? $(grep -h 'RACECHECK SUMMARY' $OUT/logs/racecheck.log | tail -1) ${SECONDS}s") &
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wkv4.py > $OUT/logs/wkv4_tests.log 2>&1
echo "[wkv4 tests] rc=$? $(tail -n 1 $OUT/logs/wkv4_tests.log) ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/logs/wkv4_tests.log | head
wait
timeout 240 python3 benchmarks/wkv4_paths.py --quick --graph --no-fla --dtype bfloat16,float32 --shapes 1x16384,8x4096,1x4096 \
  $SWEEP --out $OUT/wkv4_paths.json > $OUT/logs/wkv4_paths.log 2>&1
echo "[wkv4 paths] rc=$? ${SECONDS}s"
grep "^WKV4" $OUT/logs/wkv4_paths.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[5:]); print(r['B'], r['T'], r['dtype'], r['variant'], round(r['fwd_ms'], 4), r.get('fwd_graph_ms') and round(r['fwd_graph_ms'], 4), r.get('fwdbwd_ms') and round(r['fwdbwd_ms'], 4))"
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout $((${LIMIT:-585} - SECONDS - 20)) python3 -m pytest -q -s -p no:cacheprovider \
  --benchmark-disable-gc -k "wkv4" benchmarks/bench_ops.py > $OUT/logs/bench.log 2>&1; echo "[bench] rc=$? ${SECONDS}s"
python3 -c "
import json; d = json.load(open('$OUT/bench.json'))
for r in d['records']: print(r['op'], r['mode'], r['B'], r['T'], r['dtype'][:4], r['impl'], r['ms'] and round(r['ms'], 4), 'dev', r.get('ms_device') and round(r['ms_device'], 4), 'floor', r.get('floor_ms') and round(r['floor_ms'], 4))"
if [ "${NCU:-0}" = 1 ]; then
  timeout 60 ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy -k regex:wkv4_fwd_lbs -c 1 \
    python3 benchmarks/ncu_one.py wkv4 1 16384 fwd > $OUT/logs/ncu_lbs_B1_T16384.log 2>&1; echo "[ncu] rc=$?"
  grep -h "Duration\|DRAM Throughput\|Issued Warp\|No Eligible\|Stall Barrier\|Stall Long\|Stall Not Sel\|Achieved Occ" $OUT/logs/ncu_lbs_B1_T16384.log | head -12
fi
