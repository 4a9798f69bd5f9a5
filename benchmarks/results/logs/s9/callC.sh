# Session 9, device call C: wkv6's recurrent backward with D_t clamped to its Cauchy-Schwarz bound (commit 4a5d11e)
#  1. old (beb0ae8's wkv6.cu / wkv6.py) and new, one after the other: the strong-decay fp32 dw error and the time of
#     fwd+bwd where the recurrent backward runs (time_rec.py);
#  2. every wkv6 GPU test (dw tolerance now 1e-4) and the GPU hypothesis properties of wkv6, sharded; memcheck and
#     racecheck of every wkv6 kernel (sanitize.py --ops=wkv6, all head sizes and dtypes) beside them.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
for v in old new; do
  d=/tmp/t_$v; rm -rf $d; mkdir -p $d; cp -r rwkvops cuda_src benchmarks $d/
  [ $v = old ] && cp tmp_variants/head/wkv6.cu $d/cuda_src/ && cp tmp_variants/head/wkv6.py $d/rwkvops/ops/
  (cd $d && PYTHONPATH=.:benchmarks timeout ${AB_S:-110} python3 benchmarks/results/logs/s9/time_rec.py $v) > $OUT/rec_$v.log 2>&1
  echo "[$v] rc=$? ${SECONDS}s"; grep "^CHECK\|^TIME\|Error" $OUT/rec_$v.log | cut -c1-300
done
left=$((${LIMIT:-560} - SECONDS - 10))
mkdir -p /tmp/sh; rm -f /tmp/sh/*
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_wkv6.py 2>/dev/null | grep "::" | split -n r/10 - /tmp/sh/s.
echo "tests/test_ops_check.py::test_gpu_properties[wkv6]" > /tmp/sh/p.props
for sh in /tmp/sh/*; do
  (timeout $left python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short $(cat $sh) > $OUT/tests_$(basename $sh).log 2>&1
   echo "[tests $(basename $sh)] rc=$? $(tail -n 1 $OUT/tests_$(basename $sh).log)") &
done
(timeout $left compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --ops=wkv6 > $OUT/memcheck.log 2>&1
 echo "[memcheck] rc=$? $(grep -h 'ERROR SUMMARY' $OUT/memcheck.log | tail -1)") &
(timeout $left compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --ops=wkv6 > $OUT/racecheck.log 2>&1
 echo "[racecheck] rc=$? $(grep -h 'RACECHECK SUMMARY\|ERROR SUMMARY' $OUT/racecheck.log | tail -1)") &
wait
echo "[done] ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/tests_*.log | head -20
cd $OUT && tar czf tests_logs.tgz tests_*.log && rm tests_*.log
