# Session 10, device call C: wkv7_tc_chunk with the state in registers (mma accumulators, B fragments of S^T taken
# from them; pair loads along the channel; 16-byte y stores).
#  1. old (HEAD's wkv7.cu / tc.cuh / wkv7.py, tmp_variants/head) and new, one after the other on this device:
#     ab_time.py --ops=wkv7 --profile (CHECK accuracy lines, TIME, KERNELS);
#  2. every wkv7 GPU test (sharded) and the tc/foundation GPU tests, with memcheck and racecheck of every wkv7
#     kernel (sanitize.py --ops=wkv7) beside them.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
for v in old new; do
  if [ $v = old ]; then d=$(bash benchmarks/variant_tree.sh old tmp_variants/head/wkv7.cu:cuda_src/wkv7.cu \
        tmp_variants/head/tc.cuh:cuda_src/tc.cuh tmp_variants/head/wkv7.py:rwkvops/ops/wkv7.py)
  else d=$(bash benchmarks/variant_tree.sh new); fi
  (cd $d && PYTHONPATH=.:benchmarks timeout ${AB_S:-150} python3 benchmarks/ab_time.py $v --profile --ops=wkv7) > $OUT/ab_$v.log 2>&1
  echo "[$v] rc=$? ${SECONDS}s"; grep "^CHECK\|^TIME\|Error" $OUT/ab_$v.log | cut -c1-300
done
left=$((${LIMIT:-570} - SECONDS - 10))
mkdir -p /tmp/sh; rm -f /tmp/sh/*
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_wkv7.py 2>/dev/null | grep "::" | split -n r/8 - /tmp/sh/s.
echo "tests/test_ops_check.py::test_gpu_properties[wkv7]" > /tmp/sh/p.props
for sh in /tmp/sh/*; do
  (timeout $left python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short $(cat $sh) > $OUT/tests_$(basename $sh).log 2>&1
   echo "[tests $(basename $sh)] rc=$? $(tail -n 1 $OUT/tests_$(basename $sh).log)") &
done
(timeout $left compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --ops=wkv7 > $OUT/memcheck.log 2>&1
 echo "[memcheck] rc=$? $(grep -h 'ERROR SUMMARY' $OUT/memcheck.log | tail -1)") &
(timeout $left compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --ops=wkv7 > $OUT/racecheck.log 2>&1
 echo "[racecheck] rc=$? $(grep -h 'RACECHECK SUMMARY\|ERROR SUMMARY' $OUT/racecheck.log | tail -1)") &
wait
echo "[done] ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/tests_*.log | head -20
cd $OUT && tar czf tests_logs.tgz tests_*.log && rm tests_*.log
