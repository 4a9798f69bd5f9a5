# Session 9, device call B: bench_ops at this commit (ldmatrix fragment loads; wkv7_tc_chunk keeps scalar loads).
#  1. wkv6/wkv7 target cases (fwd and fwd+bwd at B=8 T=4096 and B=1 T=16384, bf16) with fla 0.6.0 in the same process;
#  2. wkv4 (with fla's fused_recurrent_rwkv4) and every other rwkvops case (ours only);
#  3. racecheck of race_named_barriers.py (wkv7_tc_wy's hand-off protocol in a minimal kernel) and of wkv7 with
#     TC_WY = True (sanitize.py --quick), in what time is left.
# Each part writes its own JSON (merged afterwards); BENCH lines in the logs keep what a cut run measured.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site RWKVOPS_COMMIT=${RWKVOPS_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
bench() {   # bench NAME SECONDS -k-expression
  RWKVOPS_BENCH_OUT=$OUT/$1.json timeout $2 python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
    -k "$3" benchmarks/bench_ops.py > $OUT/$1.log 2>&1; echo "[$1] rc=$? ${SECONDS}s"
  grep "^BENCH" $OUT/$1.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[6:]); print(r['op'], r['mode'], r['B'], r['T'], r['dtype'], r['impl'], r['ms'] and round(r['ms'], 4), 'dev', r.get('ms_device') and round(r['ms_device'], 4), 'mem', r.get('peak_mem_mb'), r.get('error', '')[:80])"
}
bench bench1 ${B1_S:-330} "(wkv6 or wkv7) and (B8-T4096 or B1-T16384) and not decode"
bench bench2 $((${LIMIT:-585} - SECONDS - 100)) "wkv4 or ((wkv6 or wkv7) and rwkvops and not (fwd-B8-T4096 or fwdbwd-B8-T4096 or B1-T16384))"
timeout 40 compute-sanitizer --tool racecheck python3 benchmarks/results/logs/s9/race_named_barriers.py > $OUT/race_mini.log 2>&1
echo "[race_mini] rc=$? ${SECONDS}s"; grep -v "^=========     " $OUT/race_mini.log | head -20
timeout $((${LIMIT:-585} - SECONDS - 5)) compute-sanitizer --tool racecheck python3 -c "
import sys; sys.argv = ['sanitize', '--quick', '--ops=wkv7']
import rwkvops.ops.wkv7 as W; W.TC_WY = True
import sanitize; sanitize.main(quick=True, ops=['wkv7'])" > $OUT/race_wy.log 2>&1
echo "[race_wy] rc=$? ${SECONDS}s"; grep -c "Race reported" $OUT/race_wy.log; grep "RACECHECK SUMMARY" $OUT/race_wy.log
echo "[done] ${SECONDS}s"
