# Session 9, device call D (little device time left): the clamp of wkv6's recurrent backward limited to fp32 I/O
# and chunk ends by a counter (600694c): time_rec.py on this tree (fp32 strong-decay dw error; bf16 fwd+bwd times, to set beside call
# C's old/new on another H100 of the same kind), and the wkv6 GPU tests outside the chunked/fla ones, sharded.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
timeout 90 python3 benchmarks/results/logs/s9/time_rec.py fp32clamp > $OUT/rec_fp32clamp.log 2>&1
echo "[time_rec] rc=$? ${SECONDS}s"; grep "^CHECK\|^TIME\|Error" $OUT/rec_fp32clamp.log | cut -c1-300
left=$((${LIMIT:-200} - SECONDS))
mkdir -p /tmp/sh; rm -f /tmp/sh/*
python3 -m pytest --co -q -m gpu -p no:cacheprovider tests/test_wkv6.py -k "not chunked and not fla" 2>/dev/null | grep "::" | split -n r/8 - /tmp/sh/s.
for sh in /tmp/sh/*; do
  (timeout $left python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short $(cat $sh) > $OUT/tests_$(basename $sh).log 2>&1
   echo "[tests $(basename $sh)] rc=$? $(tail -n 1 $OUT/tests_$(basename $sh).log)") &
done
wait
echo "[done] ${SECONDS}s"
grep -h "^FAILED\|^ERROR" $OUT/tests_*.log | head -20
cd $OUT && tar czf tests_logs.tgz tests_*.log && rm tests_*.log
