# Session 9, device call B: bench_ops at this commit (ldmatrix fragment loads; wkv7_tc_chunk keeps scalar loads).
#  1. wkv6/wkv7 target cases (fwd and fwd+bwd at B=8 T=4096 and B=1 T=16384, bf16) with fla 0.6.0 in the same process;
#  2. wkv4 (with fla's fused_recurrent_rwkv4) and every other rwkvops case (ours only) in what time is left.
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
bench bench2 $((${LIMIT:-585} - SECONDS - 5)) "wkv4 or ((wkv6 or wkv7) and rwkvops and not (fwd-B8-T4096 or fwdbwd-B8-T4096 or B1-T16384))"
echo "[done] ${SECONDS}s"
