# Session 10, device call B: call A again for the per-SASS source pages only (call A's came back short: at most 8
# files return from a call), all in one tarball.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks RWKVOPS_LINEINFO=1
mkdir -p /tmp/src
run_ncu() {  # name op B T mode kernel-regex skip
  timeout 100 ncu --set full --import-source no -k regex:$6 -s ${7:-0} -c 1 -o /tmp/src/$1 \
    python3 benchmarks/ncu_one.py $2 $3 $4 $5 > /tmp/src/ncu_$1.log 2>&1
  echo "[ncu $1] rc=$? ${SECONDS}s"
  ncu -i /tmp/src/$1.ncu-rep --page source --csv --print-source sass > /tmp/src/source_$1.csv 2>&1
  rm -f /tmp/src/$1.ncu-rep
}
run_ncu w7bwd wkv7 8 4096 fwdbwd wkv7_tc_bwd
run_ncu w7fwd wkv7 8 4096 fwd wkv7_tc_chunk
run_ncu w6rkw wkv6 8 4096 fwdbwd wkv6_tc_bwd_rkw
tar czf $OUT/src.tgz -C /tmp/src .
ls -la /tmp/src $OUT
