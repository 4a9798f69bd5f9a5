# Session 8, device call D (the session's device time was short: one call for everything left):
#  1. bench_ops' target cases of wkv7 and wkv6 (fwd B=8 T=4096, fwd+bwd B=8 T=4096, fwd B=1 T=16384) and wkv4 fwd+bwd
#     B=8 T=4096 (bf16) against fla 0.6.0 in the same process; fwd+bwd now takes gradients with autograd.grad (no
#     .grad accumulation kernels); ms_device beside the call time;
#  2. the chunked-path GPU tests of wkv6 and wkv7 (the kernels tc.cuh serves) in parallel shards, and memcheck of
#     wkv6/wkv7 (sanitize.py --quick) beside them, in what time is left.  Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site RWKVOPS_COMMIT=${RWKVOPS_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout ${BENCH_S:-330} python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "((wkv6 or wkv7) and (fwd-B8-T4096 or fwdbwd-B8-T4096 or fwd-B1-T16384) and bfloat16) or wkv4-fwdbwd-B8-T4096-bfloat16" \
  benchmarks/bench_ops.py > $OUT/bench.log 2>&1; echo "[bench] rc=$? ${SECONDS}s"
python3 -c "
import json; d = json.load(open('$OUT/bench.json'))
for r in d['records']: print(r['op'], r['mode'], r['B'], r['T'], r['impl'], r['ms'] and round(r['ms'], 4), 'dev', r.get('ms_device') and round(r['ms_device'], 4), 'mem', r.get('peak_mem_mb'), r.get('error', ''))"
left=$((${LIMIT:-588} - SECONDS - 15))
mkdir -p /tmp/sh; rm -f /tmp/sh/*
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_wkv6.py tests/test_wkv7.py -k "chunked or fla" 2>/dev/null | grep "::" | split -l 6 - /tmp/sh/s.
for sh in /tmp/sh/*; do
  (timeout $left python3 -m pytest -q -p no:cacheprovider -rfE --tb=short $(cat $sh) > $OUT/tests_$(basename $sh).log 2>&1
   echo "[tests $(basename $sh)] rc=$? $(tail -n 1 $OUT/tests_$(basename $sh).log)") &
done
(timeout $left compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv6,wkv7 > $OUT/memcheck.log 2>&1
 echo "[memcheck] rc=$? $(grep -h 'ERROR SUMMARY' $OUT/memcheck.log | tail -1)") &
wait
echo "[done] ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/tests_*.log | head -20
