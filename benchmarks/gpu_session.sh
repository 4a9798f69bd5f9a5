#!/usr/bin/env bash
# All the GPU work in one call on a CUDA machine, logs and results under $OUT:
#   bash benchmarks/gpu_session.sh [compile] [test] [memcheck|memquick] [racecheck] [bench|bench-key] [serving] [demo]
# (default: all but memquick); STAGE_TIMEOUT (s) bounds each stage.
# Wheels for packages the machine lacks (fla-core) travel in .whl/.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
# RWKVOPS_COMMIT: pass the commit id literally from the checkout that sent the tree (a device copy's .git can be stale)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" RWKVOPS_COMMIT="${RWKVOPS_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"
stages=${*:-compile test memcheck racecheck bench serving demo}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site examples/rwkvops_ema \
  > "$OUT/install-ema.log" 2>&1 || echo "example plugin install failed (see install-ema.log)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, cupy; print(torch.__version__, cupy.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/env.txt"
run() { local name=$1; shift; local t0=$SECONDS; timeout "${STAGE_TIMEOUT:-400}" "$@" > "$OUT/$name.log" 2>&1; local rc=$?;
        echo "[$name] rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"; }
for s in $stages; do case $s in
  compile)  run compile python3 -m rwkvops compile ;;
  test)     # shards of <= 25 tests, in parallel: most of the time is the float64 references on the CPU
            files=${TEST_FILES:-$(ls tests/test_*.py examples/rwkvops_ema/tests/test_*.py)}
            t0=$SECONDS; mkdir -p /tmp/shards; rm -f /tmp/shards/*
            for f in $files; do    # tests against fla in shards of 2: its first-call Triton autotuning is slow
              python3 -m pytest --co -q -m gpu -p no:cacheprovider --rootdir="$PWD" "$f" 2>/dev/null | grep "::" \
                > /tmp/shards.list
              grep -v fla /tmp/shards.list | split -l 25 - "/tmp/shards/$(basename "$f" .py)."
              grep fla /tmp/shards.list | split -l 2 - "/tmp/shards/$(basename "$f" .py).fla."
            done
            for sh in /tmp/shards/*; do
              ( timeout "${STAGE_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider --rootdir="$PWD" -rfE --tb=short \
                  $(cat "$sh") > "$OUT/test-gpu-$(basename "$sh").log" 2>&1
                echo "[test $(basename "$sh")] rc=$? $(tail -n 1 "$OUT/test-gpu-$(basename "$sh").log")" ) &
            done
            wait; echo "[test-gpu] $((SECONDS - t0))s" ;;
  memcheck) run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py ${SANITIZE_OPS:+--ops=$SANITIZE_OPS} ;;
  memquick) run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick ${SANITIZE_OPS:+--ops=$SANITIZE_OPS} ;;
  racecheck) run racecheck compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/sanitize.py --quick ${SANITIZE_OPS:+--ops=$SANITIZE_OPS} ;;
  bench)    RWKVOPS_BENCH_OUT="$OUT/bench.json" run bench python3 -m pytest -q -s -p no:cacheprovider \
              --benchmark-disable-gc --benchmark-json="$OUT/pytest-benchmark.json" ${BENCH_K:+-k "$BENCH_K"} benchmarks/bench_ops.py ;;
  bench-key) # the targets' cases only (fla's first-call Triton autotuning makes the whole suite outlast one device call)
            RWKVOPS_BENCH_OUT="$OUT/bench.json" run bench python3 -m pytest -q -s -p no:cacheprovider \
              --benchmark-disable-gc -k "not B16 and not T1024 and not B64 and not torch_step and not float32 and not fwd-B1-T4096" \
              benchmarks/bench_ops.py ;;
  serving)  run serving python3 benchmarks/serving.py --device gpu --full --out "$OUT/serving.json" ;;
  demo)     run demo python3 -m rwkvops demo ;;
  host)     run host python3 benchmarks/host_overhead.py --profile --json "$OUT/host.json" ;;
  wkv4paths) run wkv4paths python3 benchmarks/wkv4_paths.py --out "$OUT/wkv4_paths.json" ;;
  accuracy)  run accuracy python3 benchmarks/accuracy.py --out "$OUT" ;;
  sweep)    run sweep python3 benchmarks/chunk_sweep.py --out "$OUT/chunk_sweep.json" ;;
esac; done
grep -h "^BENCH" "$OUT/bench.log" 2>/dev/null | tail -n 40
grep -h "^HOST" "$OUT/host.log" 2>/dev/null
grep -h "^WKV4" "$OUT/wkv4paths.log" 2>/dev/null | cut -c1-200
# the device tool returns a limited number of files: everything also travels in one archive
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz ./*.log 2>/dev/null)
