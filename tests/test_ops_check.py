"""Every built-in op through the generic harness: rwkvops.testing.check_op against the float64 reference
(outputs, final state, continuation, varlen with an empty sequence, all gradients incl. the state's)."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkvops
from rwkvops import testing

OPS = ("wkv4", "wkv6", "wkv7")


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", testing.BACKENDS_CPU)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_paths(name, backend, dtype):
    op = rwkvops.get_op(name)
    testing.check_op(op, backend=backend, dtype=dtype, dims=testing.default_dims(op, B=2, T=17, H=2, N=8, C=8))


def _draw_case(data, op, max_T, head_sizes, channels):
    """One hypothesis case: dims (T always including the chunk edges 1, 15, 16, 17, 63, 64, 65), a decay range, a
    seed and a split point for the continuation check."""
    dims = data.draw(testing.shapes(op, max_T=max_T, head_sizes=head_sizes, channels=channels), label="dims")
    w_range = data.draw(testing.decay_ranges(), label="w_range")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    T = dims.get("T", 1)
    split = data.draw(st.integers(1, T - 1), label="split") if T >= 2 else None
    return dict(dims=dims, w_range=w_range, seed=seed, split=split)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("name", OPS)
def test_cpu_properties(name, data):
    op = rwkvops.get_op(name)
    case = _draw_case(data, op, max_T=70, head_sizes=(4, 8), channels=(8, 16, 32))
    testing.check_op(op, backend="numpy", dtype="float64", **case)


@pytest.mark.gpu
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("name", OPS)
def test_gpu_properties(name, data):
    """The CPU properties on the GPU kernels: every head size and GPU dtype, T up to 300 (the chunked paths start
    at 256), odd and even C, both GPU backends (CuPy has no bf16)."""
    op = rwkvops.get_op(name)
    case = _draw_case(data, op, max_T=300, head_sizes=op.head_sizes, channels=(7, 64, 96))
    dtype = data.draw(testing.dtypes(gpu=True), label="dtype")
    backend = "torch-cuda" if dtype == "bfloat16" else data.draw(st.sampled_from(testing.BACKENDS_GPU), label="backend")
    testing.check_op(op, backend=backend, dtype=dtype, **case)


def _gpu_cases():
    cases = []
    for name in OPS:
        op = rwkvops.get_op(name)
        for N in op.head_sizes or (None,):
            for dtype, backend in (("float32", "cupy"), ("float16", "torch-cuda"), ("bfloat16", "torch-cuda")):
                for T in (1, 16, 65):
                    cases.append(pytest.param(name, N, dtype, backend, T, id=f"{name}-N{N}-{dtype}-T{T}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("name,N,dtype,backend,T", _gpu_cases())
def test_gpu_against_reference(name, N, dtype, backend, T):
    op = rwkvops.get_op(name)
    dims = testing.default_dims(op, B=2, T=T, H=2, N=N, C=96)
    testing.check_op(op, backend=backend, dtype=dtype, dims=dims, seed=T)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("w_range", [(-8.0, -4.0), (0.0, 4.0)])
def test_gpu_decay_extremes_fp32(name, w_range):
    op = rwkvops.get_op(name)
    dims = testing.default_dims(op, B=1, T=100, H=2, N=(op.head_sizes or (None,))[0], C=64)
    testing.check_op(op, backend="torch-cuda", dtype="float32", dims=dims, w_range=w_range)
