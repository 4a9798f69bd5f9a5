# GPU call 2 of helper H2: timings of the staged look-back forward's shapes (graph replays = device time; events as
# bench_ops takes them, with and without launch plans), bench_ops' wkv4 target cases with fla in the same process,
# the GPU tests of the look-back forward and the kernels whose step changed, memcheck/racecheck.  Logs under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site RWKVOPS_COMMIT=${RWKVOPS_COMMIT:-unknown}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
V=auto,lbs4x32x6h1_fast,lbs8x16x3h2_fast,lb8x16x2_fast,chunked_v3
timeout 75 python3 benchmarks/wkv4_paths.py --quick --graph --no-fla --dtype bfloat16,float32 \
  --shapes 1x16384,8x4096,1x4096 --variants $V --out $OUT/paths2.json > $OUT/paths2.log 2>&1; echo "paths rc=$?"
timeout 20 python3 benchmarks/wkv4_paths.py --quick --plans --no-fla --dtype bfloat16,float32 \
  --shapes 1x16384,8x4096 --variants auto > $OUT/paths2_plans.log 2>&1; echo "paths plans rc=$?"
python3 - <<'P'
import json, os
try:
    for r in json.load(open(os.environ["OUT"] + "/paths2.json"))["records"]:
        print(r["dtype"][:4], r["B"], r["T"], f'{r["variant"]:18s}', "fwd %.4f graph %.4f" % (r["fwd_ms"], r.get("fwd_graph_ms", 0)),
              "fb %.3f" % r["fwdbwd_ms"] if "fwdbwd_ms" in r else "")
except Exception as e:
    print("no paths json", e); os.system("tail -5 $OUT/paths2.log")
P
grep WKV4 $OUT/paths2_plans.log | sed 's/"C": 2048, //' | cut -c1-140
RWKVOPS_BENCH_OUT=$OUT/bench2.json timeout 55 python3 -m pytest -q -s -p no:cacheprovider --benchmark-disable-gc \
  -k "wkv4 and (fwd-B1-T16384 or fwd-B8-T4096 or fwdbwd-B8-T4096)" benchmarks/bench_ops.py > $OUT/bench2.log 2>&1
echo "bench rc=$?"; grep "^BENCH" $OUT/bench2.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l[6:]); print(r['mode'], r['B'], r['T'], r['dtype'][:4], r['impl'], r['ms'], 'floor %.4f' % r['floor_ms'])"
timeout 80 python3 -m pytest -q -x -m gpu tests/test_wkv4.py -p no:cacheprovider \
  -k "lookback or extreme or long_sequence or varlen or pool or cupy or torch_fwd_bwd" > $OUT/gputests2.log 2>&1
echo "gpu tests rc=$?"; tail -3 $OUT/gputests2.log
timeout 20 compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/memcheck2.log 2>&1
echo "memcheck rc=$?"; tail -1 $OUT/memcheck2.log
timeout 20 compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick --ops=wkv4 > $OUT/racecheck2.log 2>&1
echo "racecheck rc=$?"; tail -1 $OUT/racecheck2.log
