export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
S=benchmarks/results/logs/s4-lead
timeout 200 compute-sanitizer --tool racecheck --print-limit 400 python3 $S/racecheck_lineinfo.py benchmarks/wkv7_tc_sweep.py --sanitize > $OUT/race_li.log 2>&1
echo "rc=$?"; tail -n 1 $OUT/race_li.log
grep -A3 "Race reported" $OUT/race_li.log | grep -o "wkv7.cu:[0-9]*" | sort | uniq -c | sort -rn | head -40
