#!/bin/bash
# Device call 1 (H3, issue #4): baseline per-kernel times, ncu sections of the chunked wkv6 kernels, chain-hop probe.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
D=benchmarks/results/logs/s4-h3
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv > $OUT/smi.txt 2>&1
t0=$SECONDS
timeout 50 python3 $D/chain_probe.py > $OUT/chain.log 2>&1; echo "[chain] rc=$? $((SECONDS-t0))s"
timeout 90 python3 benchmarks/profile_kernels.py op=wkv6 B=8 T=4096 mode=fwd op=wkv6 B=1 T=16384 mode=fwd \
  op=wkv6 B=8 T=4096 mode=fwdbwd > $OUT/profile.log 2>&1; echo "[profile] rc=$? $((SECONDS-t0))s"
NCU="ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats
 --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
timeout 50 $NCU --section SourceCounters -k regex:wkv6_ python3 benchmarks/ncu_one.py wkv6 8 4096 fwd > $OUT/ncu_fwd_b8.txt 2>&1; echo "[ncu b8] rc=$? $((SECONDS-t0))s"
timeout 35 $NCU -k regex:wkv6_ python3 benchmarks/ncu_one.py wkv6 1 16384 fwd > $OUT/ncu_fwd_b1.txt 2>&1; echo "[ncu b1] rc=$? $((SECONDS-t0))s"
timeout $((260 - SECONDS)) $NCU -k regex:wkv6_tc_bwd python3 benchmarks/ncu_one.py wkv6 8 4096 fwdbwd > $OUT/ncu_bwd_b8.txt 2>&1; echo "[ncu bwd] rc=$? $((SECONDS-t0))s"
grep CHAIN $OUT/chain.log
grep -E "^==|wkv6_" $OUT/profile.log | cut -c1-60,160-250
