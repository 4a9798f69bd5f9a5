# Session 9, device call D (little device time left, on whatever single GPU came): the clamp of wkv6's recurrent
# backward limited to fp32 I/O and chunk ends by a counter (600694c): time_rec.py on this tree and on beb0ae8's
# wkv6.cu / wkv6.py (old), one after the other on the same device (fp32 strong-decay dw error; bf16 fwd+bwd times).
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
for v in new old; do
  if [ $v = old ]; then d=$(bash benchmarks/variant_tree.sh old tmp_variants/head/wkv6.cu:cuda_src/wkv6.cu \
                              tmp_variants/head/wkv6.py:rwkvops/ops/wkv6.py)
  else d=$(bash benchmarks/variant_tree.sh new); fi
  (cd $d && PYTHONPATH=.:benchmarks timeout ${AB_S:-60} python3 benchmarks/results/logs/s9/time_rec.py $v) > $OUT/rec_$v.log 2>&1
  echo "[$v] rc=$? ${SECONDS}s"; grep "^CHECK\|^TIME\|Error" $OUT/rec_$v.log | cut -c1-300
done
