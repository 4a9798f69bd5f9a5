# Session 9, device call A: (1) ldmatrix fragment loads in rwkv::tc::mma_strip_scaled (cuda_src/tc.cuh) against the
# session-8 helpers ("orig" = tc.cuh of e37e5ab), each in its own copy of the tree, timed one after another on the
# same device by time_ops.py, now benchmarks/ab_time.py (accuracy CHECK lines first; per-kernel device times of the kept variant); (2) the
# chunked-path GPU tests of wkv6/wkv7 and their GPU hypothesis properties in parallel shards, memcheck and racecheck
# of wkv6/wkv7 (sanitize.py --quick) beside them.  Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee $OUT/env.txt
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee -a $OUT/env.txt
for v in orig new; do
  d=/tmp/t_$v; rm -rf $d; mkdir -p $d
  cp -r rwkvops cuda_src benchmarks $d/
  [ $v = orig ] && cp tmp_variants/orig/tc.cuh $d/cuda_src/tc.cuh
  (cd $d && PYTHONPATH=.:benchmarks timeout ${AB_S:-130} python3 benchmarks/ab_time.py $v $([ $v = new ] && echo --profile)) > $OUT/time_$v.log 2>&1
  echo "[$v] rc=$? ${SECONDS}s"
  grep "^CHECK" $OUT/time_$v.log
  grep "^TIME" $OUT/time_$v.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[5:]); print(r['label'], r['op'], r['mode'], r['B'], r['T'], round(r['ms'], 4), round(r['ms_device'], 4))"
done
grep "^KERNELS" $OUT/time_new.log | cut -c1-600
left=$((${LIMIT:-585} - SECONDS - 10))
mkdir -p /tmp/sh; rm -f /tmp/sh/*
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_wkv6.py tests/test_wkv7.py -k "chunked or fla" 2>/dev/null | grep "::" | split -l 7 - /tmp/sh/s.
echo "tests/test_ops_check.py::test_gpu_properties[wkv6] tests/test_ops_check.py::test_gpu_properties[wkv7]" > /tmp/sh/p.props
for sh in /tmp/sh/*; do
  (timeout $left python3 -m pytest -q -p no:cacheprovider -rfE --tb=short $(cat $sh) > $OUT/tests_$(basename $sh).log 2>&1
   echo "[tests $(basename $sh)] rc=$? $(tail -n 1 $OUT/tests_$(basename $sh).log)") &
done
(timeout $left compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv6,wkv7 > $OUT/memcheck.log 2>&1
 echo "[memcheck] rc=$? $(grep -h 'ERROR SUMMARY' $OUT/memcheck.log | tail -1)") &
(timeout $left compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv6,wkv7 > $OUT/racecheck.log 2>&1
 echo "[racecheck] rc=$? $(grep -h 'RACECHECK SUMMARY\|ERROR SUMMARY' $OUT/racecheck.log | tail -1)") &
wait
echo "[done] ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/tests_*.log | head -20
cd $OUT && tar czf tests_logs.tgz tests_*.log && rm tests_*.log
