# Session 8, device call B: the fragment-addressing rewrite of rwkv::tc::mma_strip_scaled (cuda_src/tc.cuh) against
# the previous tc.cuh, each variant in its own copy of the tree, timed one after another on the same device by
# time_ops.py, now benchmarks/ab_time.py (wkv6/wkv7 bf16 cases; only bf16 N=64 instantiations compiled).  Variants (tmp_variants/tc_*.cuh):
# orig = the previous tc.cuh; u1 = the rewrite, k-loop not unrolled, cvt.rna; u1rn / u2rn = with cvt.rn, k-loop unrolled
# 1 / 2 times; fullrn = cvt.rn, unrolling left to the compiler (kept).  tmp_variants/ is not committed: see callB/tc_variants.diff.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee $OUT/env.txt
for v in ${VARIANTS:-orig u1 u1rn u2rn fullrn}; do
  d=/tmp/t_$v; rm -rf $d; mkdir -p $d
  cp -r rwkvops cuda_src benchmarks $d/; cp tmp_variants/tc_$v.cuh $d/cuda_src/tc.cuh
  (cd $d && PYTHONPATH=.:benchmarks timeout 200 python3 benchmarks/ab_time.py $v) > $OUT/time_$v.log 2>&1
  echo "[$v] rc=$? ${SECONDS}s"
  grep "^TIME" $OUT/time_$v.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[5:]); print(r['label'], r['op'], r['mode'], r['B'], r['T'], round(r['ms'], 4), round(r['ms_device'], 4))"
done
