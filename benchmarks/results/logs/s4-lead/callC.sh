# Session 4 lead, device call C (TC_WY off): racecheck of every op (sanitize.py --quick), host overhead, then
# bench_ops' key cases of wkv6 and the wkv7 decode cases at B=1 again (fla 0.6.0 in the same process).
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick > $OUT/racecheck.log 2>&1
echo "[racecheck all ops] rc=$? $(tail -n 1 $OUT/racecheck.log)"
timeout 40 python3 benchmarks/host_overhead.py --profile --json $OUT/host.json > $OUT/host.log 2>&1; echo "[host] rc=$?"
grep "^HOST" $OUT/host.log | grep "B=  1\|B=256"
RWKVOPS_BENCH_OUT=$OUT/bench.json timeout ${BENCH_S:-420} python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "(wkv6 and not B16 and not T1024 and not B64 and not torch_step and not float32 and not fwd-B1-T4096) or wkv7-decode-B1- or wkv7-decode_pool-B1-" \
  benchmarks/bench_ops.py > $OUT/bench.log 2>&1; echo "[bench] rc=$?"
python3 -c "
import json, os
d = json.load(open(os.environ['OUT'] + '/bench.json'))
for r in d['records']:
    print(r['op'], r['mode'], r['B'], r['T'], r['impl'], r['ms'] and round(r['ms'], 4), 'host', r.get('host_ms') and round(r['host_ms'], 4), 'mem', r.get('peak_mem_mb') and round(r['peak_mem_mb']))"
