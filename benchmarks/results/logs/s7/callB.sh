# Session 6, device call B: wkv4 (GPU tests of the new staged tile, the tile sweep, bench_ops' wkv4 cases in bf16
# and fp32 against fla), the host-path GPU tests, the decode cases of wkv7/wkv6 against fla_recurrent (after the host-path work), host
# overhead, then accuracy (no fla) if time is left.  Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
fits() { [ $((${LIMIT:-585} - SECONDS)) -ge $1 ]; }
(timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_host_path.py tests/test_pool.py \
   "tests/test_gpu_foundation.py::test_decode_step_captures_in_a_cuda_graph" > $OUT/host_tests.log 2>&1
 echo "[host-path tests] rc=$? $(tail -n 1 $OUT/host_tests.log) ${SECONDS}s") &
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wkv4.py -k "4x16x8 or lbs-4x32x6" > $OUT/wkv4_tests.log 2>&1
echo "[wkv4 tests] rc=$? $(tail -n 1 $OUT/wkv4_tests.log) ${SECONDS}s"
wait
grep -h "^FAILED\|^ERROR" $OUT/host_tests.log $OUT/wkv4_tests.log | head
timeout 90 python3 benchmarks/wkv4_paths.py --quick --graph --no-fla --dtype bfloat16,float32 --shapes 1x16384,8x4096,1x4096 \
  --variants auto,lbs4x32x6_fast,lbs4x16x6_fast,lbs4x16x8_fast --out $OUT/wkv4_paths.json > $OUT/wkv4_paths.log 2>&1
echo "[wkv4 paths] rc=$? ${SECONDS}s"
grep "^WKV4" $OUT/wkv4_paths.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[5:]); print(r['B'], r['T'], r['dtype'], r['variant'], round(r['fwd_ms'], 4), r.get('fwd_graph_ms') and round(r['fwd_graph_ms'], 4))"
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout $((${LIMIT:-585} - SECONDS - 70)) python3 -m pytest -q -s -p no:cacheprovider \
  --benchmark-disable-gc -k "(wkv4 and not fwdbwd-B1) or (decode and not B64 and not torch_step)" benchmarks/bench_ops.py \
  > $OUT/bench.log 2>&1; echo "[bench] rc=$? ${SECONDS}s"
grep "^BENCH" $OUT/bench.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[6:]); print(r['op'], r['mode'], r['B'], r['T'], r['dtype'][:4], r['impl'], r['ms'] and round(r['ms'], 4), 'dev', r.get('ms_device') and round(r['ms_device'], 4), 'host', r.get('host_ms') and round(r['host_ms'], 4))"
fits 40 && { timeout 40 python3 benchmarks/host_overhead.py --json $OUT/host.json > $OUT/host.log 2>&1; echo "[host] rc=$? ${SECONDS}s"; grep "^HOST" $OUT/host.log | grep "B=  1\|B=256"; }
fits 60 && { timeout $((${LIMIT:-585} - SECONDS)) python3 benchmarks/accuracy.py --no-fla --out $OUT > $OUT/accuracy.log 2>&1
             echo "[accuracy] rc=$? $(tail -n 1 $OUT/accuracy.log) ${SECONDS}s"; }
(cd $OUT && tar czf all.tgz --exclude=all.tgz . 2>/dev/null)
