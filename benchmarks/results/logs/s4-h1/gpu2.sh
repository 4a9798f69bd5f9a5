#!/usr/bin/env bash
# H1's second device call: decode timings (kernel variants, host overhead, bench decode cases of ours), then the
# GPU tests of the host path, pools and wkv6 decode, and compute-sanitizer memcheck, in parallel.  Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
t0=$SECONDS
python3 -c "import torch, cupy, sys; print(sys.version.split()[0], torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))"
timeout 70 python3 benchmarks/wkv6_decode_sweep.py --only 1,2,3,4,5 --json $OUT/sweep.json > $OUT/sweep.log 2>&1
echo "[sweep] rc=$? $((SECONDS-t0))s"; grep SWEEP $OUT/sweep.log | sed 's/SWEEP //' | cut -c1-100
PYTHONPATH=build/h1_base timeout 50 python3 benchmarks/host_overhead.py --ops wkv7,wkv6 --sizes 1,256 > $OUT/host_base.log 2>&1
echo "[host base: HEAD as committed] rc=$? $((SECONDS-t0))s"; grep "^HOST" $OUT/host_base.log
timeout 60 python3 benchmarks/host_overhead.py --profile --json $OUT/host.json > $OUT/host.log 2>&1
echo "[host] rc=$? $((SECONDS-t0))s"; grep "^HOST" $OUT/host.log
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout 45 python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "decode and rwkvops and (B1 or (wkv6 and B256))" benchmarks/bench_ops.py > $OUT/bench.log 2>&1; echo "[bench] rc=$? $((SECONDS-t0))s"
grep -h "BENCH {" $OUT/bench.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[l.index('{'):])
    print(r['op'], r['mode'], r['B'], r['impl'], 'ms=%s iso=%s host=%s' % tuple(None if r.get(k) is None else round(r[k], 4) for k in ('ms', 'ms_isolated', 'host_ms')))"
left=$((262 - (SECONDS - t0)))
T="timeout $left"
P="python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu"
$T $P -x tests/test_host_path.py > $OUT/t_host_path.log 2>&1 &
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_pool.py 2>/dev/null | grep "::" > /tmp/pool.list
split -n l/3 /tmp/pool.list /tmp/pool.
for f in /tmp/pool.a?; do $T $P $(cat $f) > $OUT/t_pool_$(basename $f).log 2>&1 & done
$T $P tests/test_wkv6.py -k "varlen_zero_length or pool_with_empty_slots or decode_chain" > $OUT/t_wkv6_decode.log 2>&1 &
$T compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv6 > $OUT/memcheck_wkv6_quick.log 2>&1 &
$T compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/results/logs/s4-h1/stream_memcheck.py > $OUT/memcheck_stream.log 2>&1 &
wait
for f in $OUT/t_*.log $OUT/memcheck_*.log; do echo "[$(basename $f)] $(grep -E 'passed|failed|error|ERROR SUMMARY|done' $f | tail -n 2 | tr '\n' ' ')"; done
grep -h -E "^(FAILED|ERROR)" $OUT/t_*.log | head -20
echo "total $((SECONDS-t0))s"
