#!/usr/bin/env bash
# H1's first device call: decode-kernel variant sweep, host overhead, bench decode cases (ours and fla, back to
# back), the host-path GPU tests.  Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site"
t0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy, sys; print(sys.version.split()[0], torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))"
timeout 85 python3 benchmarks/wkv6_decode_sweep.py --json $OUT/sweep.json > $OUT/sweep.log 2>&1; echo "[sweep] rc=$? $((SECONDS-t0))s"
grep SWEEP $OUT/sweep.log | sed 's/SWEEP //' | cut -c1-110
timeout 45 python3 benchmarks/host_overhead.py --profile --ops wkv7,wkv6 --json $OUT/host.json > $OUT/host.log 2>&1; echo "[host] rc=$? $((SECONDS-t0))s"
grep "^HOST" $OUT/host.log
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout $((190 - (SECONDS - t0))) python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "decode and (B1 or B256) and not torch_step" benchmarks/bench_ops.py > $OUT/bench.log 2>&1; echo "[bench] rc=$? $((SECONDS-t0))s"
grep -h "^.\?BENCH" $OUT/bench.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[l.index('{'):])
    print(r['op'], r['mode'], r['B'], r['impl'], 'ms=%s iso=%s host=%s' % tuple(None if r.get(k) is None else round(r[k], 4) for k in ('ms', 'ms_isolated', 'host_ms')), r.get('error', '')[:80])"
