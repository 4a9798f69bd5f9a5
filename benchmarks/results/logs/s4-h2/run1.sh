# GPU call 1 of helper H2 (wkv4 staged look-back forward): timings first (their compiles warm the cache), then the
# look-back GPU tests, then memcheck/racecheck over the quick sanitizer run.  Logs under $OUT.
export PYTHONPATH=. RWKVOPS_COMMIT=${RWKVOPS_COMMIT:-unknown}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
V=auto,lb8x16x2_fast,lbs4x32x6_fast,lbs4x16x6_fast,lbs8x16x3_fast,chunked_v3
timeout 110 python3 benchmarks/wkv4_paths.py --quick --graph --no-fla --dtype bfloat16,float32 \
  --shapes 1x16384,8x4096,1x4096 --variants $V --out $OUT/paths1.json > $OUT/paths1.log 2>&1; echo "paths rc=$?"
python3 - <<'P'
import json, os
try:
    for r in json.load(open(os.environ["OUT"] + "/paths1.json"))["records"]:
        print(r["dtype"][:4], r["B"], r["T"], f'{r["variant"]:18s}', "fwd %.4f graph %.4f" % (r["fwd_ms"], r.get("fwd_graph_ms", 0)),
              "fb %.3f" % r["fwdbwd_ms"] if "fwdbwd_ms" in r else "")
except Exception as e:
    print("no paths json", e); os.system("tail -20 $OUT/paths1.log")
P
timeout 120 python3 -m pytest -q -x -m gpu tests/test_wkv4.py -p no:cacheprovider \
  -k "lookback or extreme or long_sequence or varlen or pool or cupy or fused_forward" > $OUT/gputests1.log 2>&1
echo "gpu tests rc=$?"; tail -4 $OUT/gputests1.log
timeout 40 compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/memcheck1.log 2>&1
echo "memcheck rc=$?"; tail -2 $OUT/memcheck1.log
timeout 40 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/racecheck1.log 2>&1
echo "racecheck rc=$?"; tail -2 $OUT/racecheck1.log
