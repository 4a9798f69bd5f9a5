# Session 7, device call D: ncu of wkv4_fwd_lbs (cb2f822) at B=1 T=16384 and T=4096, bf16: warp-state statistics and
# per-SASS-instruction stall samples (source page as CSV), to see what bounds the staged look-back forward.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee $OUT/env.txt
for T in 16384 4096; do
  timeout 150 ncu --set full --import-source no -k regex:wkv4_fwd_lbs -c 1 -o $OUT/lbs_T$T python3 benchmarks/ncu_one.py wkv4 1 $T fwd > $OUT/ncu_T$T.log 2>&1
  echo "[ncu T=$T] rc=$? ${SECONDS}s"
  ncu -i $OUT/lbs_T$T.ncu-rep --page details --section WarpStateStats --section SchedulerStats --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --print-details all > $OUT/details_T$T.txt 2>&1
  ncu -i $OUT/lbs_T$T.ncu-rep --page source --csv --print-source sass > $OUT/source_T$T.csv 2>&1
  grep -i "duration\|stall\|eligible\|issued\|throughput" $OUT/details_T$T.txt | head -40
  wc -c $OUT/source_T$T.csv
done
rm -f $OUT/*.ncu-rep
