# Session 7, device call G: the staged look-back forward with 7 resident tiles per SM (4 x 24 bf16, 4 x 12 fp32)
# against the default (4 x 32 / 4 x 16, 6 per SM): its GPU tests, then the path sweep (eager, graph-replayed, fwd+bwd).
export PYTHONUNBUFFERED=1 PYTHONPATH=.:benchmarks:/tmp/site
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee $OUT/env.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_wkv4.py -k "4x24x7 or 4x12x7" > $OUT/tests.log 2>&1
echo "[tests] rc=$? $(tail -n 1 $OUT/tests.log) ${SECONDS}s"; grep -h "^FAILED\|^ERROR" $OUT/tests.log | head -5
timeout 150 python3 benchmarks/wkv4_paths.py --graph --no-fla --dtype bfloat16,float32 --shapes 1x16384,8x4096,1x4096 \
  --variants auto,lbs4x24x7_fast --out $OUT/wkv4_paths.json > $OUT/wkv4_paths.log 2>&1
echo "[wkv4 paths] rc=$? ${SECONDS}s"
grep "^WKV4" $OUT/wkv4_paths.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[5:]); print(r['B'], r['T'], r['dtype'], r['variant'], round(r['fwd_ms'], 4), r.get('fwd_graph_ms') and round(r['fwd_graph_ms'], 4), r.get('fwdbwd_ms') and round(r['fwdbwd_ms'], 4))"
