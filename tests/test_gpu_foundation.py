"""Foundation on a CUDA GPU: zero-copy DLPack bridge, torch streams, the on-disk compile cache."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rwkvops
from rwkvops import _arrays, testing

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dlpack_round_trip_is_zero_copy(dtype):
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 5, 7, device="cuda").to(getattr(torch, dtype))
    bridge = _arrays.make_bridge("torch", ("cuda", t.device.index))
    with bridge.stream():
        c = bridge.to_compute(t)
        assert c.data.ptr == t.data_ptr() and c.shape == t.shape
        back = bridge.from_compute(c, dtype)
        out = bridge.empty((4, 2), dtype)
    assert back.data_ptr() == t.data_ptr() and back.dtype == t.dtype
    assert torch.equal(back, t)
    o = bridge.from_compute(out, dtype)
    assert o.dtype == getattr(torch, dtype) and o.is_cuda and tuple(o.shape) == (4, 2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cuda_op_returns_torch_in_input_dtype(dtype):
    torch = pytest.importorskip("torch")
    op = rwkvops.get_op("wkv7")
    dims = testing.default_dims(op, B=2, T=17, H=2, N=32)
    rng = np.random.default_rng(0)
    x64 = {k: testing.round_to(v, dtype) for k, v in testing.sample_inputs(op, dims, rng).items()}
    x = {k: torch.tensor(v, device="cuda", dtype=getattr(torch, dtype)) for k, v in x64.items()}
    y, s = op(*x.values())
    assert isinstance(y, torch.Tensor) and y.dtype == getattr(torch, dtype) and s.dtype == torch.float32
    ry, rs = op.reference_forward(x64, np.zeros(s.shape))
    tol = testing.TOLERANCES[dtype][0]
    assert testing.rel_rms(y, ry) < tol and testing.rel_rms(s, rs) < tol


def test_runs_on_torch_current_stream():
    """Inputs written late on a side stream: the op must run on that stream (after the write), not elsewhere."""
    torch = pytest.importorskip("torch")
    op = rwkvops.get_op("wkv7")
    dims = testing.default_dims(op, B=4, T=64, H=4, N=64)
    rng = np.random.default_rng(1)
    x64 = testing.sample_inputs(op, dims, rng)
    src = {k: torch.tensor(v, device="cuda", dtype=torch.float32) for k, v in x64.items()}
    dst = {k: torch.full_like(v, float("nan")) for k, v in src.items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keep the side stream busy so a wrong-stream launch would read NaNs
        for k in dst:
            dst[k].copy_(src[k])
        y, s = op(*dst.values())
        y2 = y * 1.0  # consumed on the same stream
    side.synchronize()
    ry, rs = op.reference_forward(x64, np.zeros(tuple(s.shape)))
    assert testing.rel_rms(y2, ry) < 1e-5 and testing.rel_rms(s, rs) < 1e-5


def test_disk_cache_reused_by_second_process(tmp_path):
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "rwkvops", "compile"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    files = {p: os.path.getmtime(p) for p in map(str, tmp_path.rglob("*")) if os.path.isfile(p)}
    assert files, "first process wrote nothing to the CuPy cache"
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    files2 = {p: os.path.getmtime(p) for p in map(str, tmp_path.rglob("*")) if os.path.isfile(p)}
    assert files2 == files, "second process recompiled instead of reusing the on-disk cache"
    print(first.stdout.strip().splitlines()[-1], "|", second.stdout.strip().splitlines()[-1])


def test_mixed_devices_rejected():
    torch = pytest.importorskip("torch")
    op = rwkvops.get_op("wkv7")
    x = [torch.randn(1, 3, 1, 32, device="cuda") for _ in range(6)]
    x[2] = x[2].cpu()
    with pytest.raises(ValueError, match="one device"):
        op(*x)


def test_non_contiguous_rejected_on_gpu():
    torch = pytest.importorskip("torch")
    op = rwkvops.get_op("wkv7")
    x = [torch.randn(1, 3, 2, 32, device="cuda") for _ in range(6)]
    x[1] = torch.randn(1, 2, 3, 32, device="cuda").transpose(1, 2)  # [1, 3, 2, 32], strided
    assert not x[1].is_contiguous()
    with pytest.raises(ValueError, match="'w' must be C-contiguous"):
        op(*x)
    with pytest.raises(ValueError, match="head size N=8"):
        op(*[torch.randn(1, 3, 1, 8, device="cuda") for _ in range(6)])


@pytest.mark.parametrize("name", ["wkv7", "wkv6"])
def test_decode_step_captures_in_a_cuda_graph(name):
    """A one-token decode call is graph-capturable (no host syncs or allocations outside torch's allocator):
    replaying the graph on new inputs copied into the captured tensors gives the reference answer."""
    torch = pytest.importorskip("torch")
    op = rwkvops.get_op(name)
    dims = testing.default_dims(op, B=4, T=1, H=2, N=64)
    rng = np.random.default_rng(5)
    x = {k: torch.tensor(v, device="cuda", dtype=torch.float32)
         for k, v in testing.sample_inputs(op, dims, rng).items()}
    st = torch.tensor(testing.sample_state(op, dims, 4, rng), device="cuda", dtype=torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            op(*x.values(), state=st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, s = op(*x.values(), state=st)
    x2 = testing.sample_inputs(op, dims, rng)
    s2 = testing.sample_state(op, dims, 4, rng)
    for k, v in x2.items():
        x[k].copy_(torch.tensor(v, dtype=torch.float32))
    st.copy_(torch.tensor(s2, dtype=torch.float32))
    graph.replay()
    torch.cuda.synchronize()
    ry, rs = op.reference_forward(x2, s2)
    assert testing.rel_rms(y, ry) < 1e-5 and testing.rel_rms(s, rs) < 1e-5
