# Session 10, device call A: where the time of the chunked wkv7/wkv6 kernels goes (session 8's call A, which never
# ran).  ncu (full set) of one launch of each hot kernel, with per-SASS stall samples (source page as CSV, gzipped),
# compiled with line tables (RWKVOPS_LINEINFO=1).  bf16, H=32, N=64.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks RWKVOPS_LINEINFO=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee $OUT/env.txt
git rev-parse HEAD >> $OUT/env.txt 2>/dev/null
run_ncu() {  # name op B T mode kernel-regex skip
  timeout 120 ncu --set full --import-source no -k regex:$6 -s ${7:-0} -c 1 -o $OUT/$1 \
    python3 benchmarks/ncu_one.py $2 $3 $4 $5 > $OUT/ncu_$1.log 2>&1
  echo "[ncu $1] rc=$? ${SECONDS}s"
  ncu -i $OUT/$1.ncu-rep --page details --print-details all > $OUT/details_$1.txt 2>&1
  ncu -i $OUT/$1.ncu-rep --page source --csv --print-source sass > $OUT/source_$1.csv 2>&1
  gzip -f $OUT/source_$1.csv
  grep -i "duration\|issued warp\|registers per\|achieved occ" $OUT/details_$1.txt | head -8
  rm -f $OUT/$1.ncu-rep
}
run_ncu w7bwd wkv7 8 4096 fwdbwd wkv7_tc_bwd
run_ncu w7fwd wkv7 8 4096 fwd wkv7_tc_chunk
run_ncu w7adj wkv7 8 4096 fwdbwd wkv7_tc_chunk 1
run_ncu w6rkw wkv6 8 4096 fwdbwd wkv6_tc_bwd_rkw
run_ncu w6fused wkv6 8 4096 fwd wkv6_tc_fused
run_ncu w7b1seg wkv7 1 16384 fwd wkv7_tc_chunk
