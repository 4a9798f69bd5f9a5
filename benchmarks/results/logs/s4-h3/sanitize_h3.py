"""benchmarks/sanitize.py --quick --ops=wkv6, plus N = 64, T = 300 through every chunked-forward variant (pure chain,
look-back, look-back folding to chunk 0, three kernels), fwd+bwd and a pool, for compute-sanitizer."""
import sys

sys.path.insert(0, "benchmarks")
import rwkvops  # noqa: E402
import sanitize  # noqa: E402
from rwkvops import testing  # noqa: E402
from rwkvops.ops import wkv6 as W  # noqa: E402

sanitize.main(quick=True, ops=["wkv6"])
op = rwkvops.get_op("wkv6")
for lb, fused, dtype in ((0, True, "bfloat16"), (1, True, "bfloat16"), (2, True, "float32"), ("auto", False, "bfloat16")):
    W.FUSED_LOOKBACK, W.FORWARD_FUSED = lb, fused
    dims = testing.default_dims(op, B=2, T=300, H=2, N=64, C=64)
    sanitize.run(op, dims, dtype)
    sanitize.run(op, dims, dtype, pool=True)
    print(f"variant lookback={lb} fused={fused} {dtype}: done", flush=True)
print("sanitize-h3: done")
