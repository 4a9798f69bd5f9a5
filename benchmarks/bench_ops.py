"""Benchmarks of every built-in op against its peers (flash-linear-attention when installed, plain PyTorch for
decode), bf16 inputs, fp32 state, CUDA-event medians.  Run on a GPU: ``make bench``.

Each case records {op, mode, B, T, H, N, dtype, impl, ms, peak_mem_mb, floor_ms}; peers that are missing or fail
are recorded with ms = null and the error.

Decode cases (``decode``, ``decode_pool``, eager and CUDA-graph, ours and peers alike): ``ms`` is the time per call
of calls back to back (``harness.loop_time``: 100 calls between two events, one sync, median of rounds), as a
decode loop runs them; ``host_ms`` the median CPU time of one call (``harness.host_time``, no sync);
``ms_isolated`` the old figure, one event pair around one call with a sync after each (it adds the idle device's
wait for the call's host code and the events' overhead: about twice ``ms`` at B = 1).

Training-size cases: ``ms`` is one call between two events (the device also waits for the call's host code before
its first kernel); ``ms_device`` the same with that wait hidden (``harness.device_time``: the GPU time of the call).
"""
import importlib

import pytest

import harness

H, N, C = 32, 64, 2048
TRAIN = [(1, 1024), (1, 4096), (1, 16384), (8, 4096), (16, 4096)]
DECODE = [1, 64, 256]
FP32_FMA_TFLOPS = 51.0  # H100 fp32 FMA rate named in DESIGN.md (floor for the recurrent form)


def _torch():
    import torch
    return torch


def make_inputs(op_name, B, T, dtype, seed=0):
    """Random inputs in the op's realistic range (harness.random_inputs), drawn in fp32 on the GPU, cast to dtype."""
    torch = _torch()
    x = harness.random_inputs(op_name, dict(B=B, T=T, H=H, N=N, C=C), device="cuda", seed=seed, dtype=torch.float32)
    return {k: v.to(getattr(torch, dtype)).contiguous() for k, v in x.items()}


def state_shape(op_name, B):
    return (B, 3, C) if op_name == "wkv4" else (B, H, N, N)


def floor_ms(op_name, mode, B, T, dtype, with_state):
    """max(bytes / measured copy bandwidth, flops / fp32 FMA peak): no implementation can be much faster."""
    esize = 4 if dtype == "float32" else 2
    if op_name == "wkv4":
        n_tok_arrays, elems, flops_tok = (2, B * T * C, 20 * B * T * C)
    else:
        n_tok_arrays = 6 if op_name == "wkv7" else 4
        elems = B * T * H * N
        flops_tok = (8 if op_name == "wkv7" else 4) * B * T * H * N * N
    st = 4 * B * (3 * C if op_name == "wkv4" else H * N * N)
    nbytes = (n_tok_arrays + 1) * elems * esize + (2 * st if with_state else st)
    flops = flops_tok
    if mode == "fwdbwd":
        nbytes += (n_tok_arrays + 1) * elems * esize + n_tok_arrays * elems * esize
        flops *= 3
    bw = harness.ENV.get("copy_gbs", 2900.0) * 1e9
    return max(nbytes / bw, flops / (FP32_FMA_TFLOPS * 1e12)) * 1e3


def _ours(op_name, x, state, requires_grad):
    import rwkvops
    op = rwkvops.get_op(op_name)
    return lambda: op(*x.values(), state=state)


def _peer(op_name, impl):
    if impl == "torch_step":
        return getattr(importlib.import_module("peers.torch_naive"), f"{op_name}_torch_step", None)
    try:
        return getattr(importlib.import_module(f"peers.{op_name}"), impl)
    except Exception:
        return None


def _leaves(*outputs):
    """The leaf tensors the autograd graph of ``outputs`` ends in (every impl makes its own converted leaves)."""
    seen, stack, leaves = set(), [o.grad_fn for o in outputs], []
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if hasattr(f, "variable"):          # AccumulateGrad: the node of a leaf
            leaves.append(f.variable)
        stack.extend(nxt for nxt, _ in f.next_functions)
    return leaves


def _graphed(fn):
    """Capture ``fn`` in a CUDA graph (after warm-up on a side stream) and return its replay: how a serving loop
    removes per-call host overhead from one-token decode."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _pool_step(op_name, S, dtype):
    """A serving decode step (issue #6): S sequences packed along T (device int32 cu_seqlens 0..S, every length 1),
    each on its own slot of a pool of 2S fp32 states (device int32 state_indices, a random permutation, so the
    slots are scattered as in a live pool).  Returns the call; it updates the pool in place."""
    torch = _torch()
    x = make_inputs(op_name, 1, S, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    pool = torch.randn(*state_shape(op_name, 2 * S), device="cuda", generator=g) * 0.1
    idx = torch.randperm(2 * S, device="cuda", generator=g)[:S].to(torch.int32)
    cu = torch.arange(S + 1, device="cuda", dtype=torch.int32)
    import rwkvops
    op = rwkvops.get_op(op_name)
    args = tuple(x.values())
    return lambda: op(*args, state=pool, cu_seqlens=cu, state_indices=idx)


def _run_case(benchmark, op_name, mode, B, T, dtype, impl):
    torch = _torch()
    if mode == "decode_pool":
        _run_pool_case(benchmark, op_name, B, dtype, impl)
        return
    x = make_inputs(op_name, B, T, dtype)
    decode = mode == "decode"
    state = torch.randn(*state_shape(op_name, B), device="cuda") * 0.1 if decode else None
    if op_name == "wkv4" and state is not None:
        state[:, 1].abs_()
    req = mode == "fwdbwd"
    rec = dict(op=op_name, mode=mode, B=B, T=T, H=None if op_name == "wkv4" else H,
               N=None if op_name == "wkv4" else N, C=C if op_name == "wkv4" else H * N, dtype=dtype, impl=impl,
               floor_ms=floor_ms(op_name, mode, B, T, dtype, decode))
    graph = impl.endswith("_graph")
    base = impl[: -len("_graph")] if graph else impl
    try:
        if base == "rwkvops":
            if req:
                for v in x.values():
                    v.requires_grad_(True)
            fwd = _ours(op_name, x, state, req)
        else:
            factory = _peer(op_name, base)
            if factory is None:
                pytest.skip(f"peer {base} for {op_name} not available")
            fwd = factory(x, state, req)
        if req:
            y, s = fwd()
            gy, gs = torch.randn_like(y), torch.randn_like(s)
            leaves = _leaves(y, s)

            def fn():
                # gradients returned, not accumulated into .grad: in a model these inputs are activations, and an
                # accumulation kernel per leaf (one read-modify-write of every input) is the harness's, not the op's
                y, s = fwd()
                torch.autograd.grad([y, s], leaves, [gy, gs])
        else:
            fn = _graphed(fwd) if graph else fwd
        with torch.no_grad() if not req else torch.enable_grad():
            if decode:
                rec["ms"] = harness.loop_time(fn)
                rec["ms_isolated"] = harness.cuda_time(fn)
                rec["host_ms"] = harness.host_time(fn)
            else:
                rec["ms"] = harness.cuda_time(fn)
                rec["ms_device"] = harness.device_time(fn)
            rec["peak_mem_mb"] = harness.peak_mem_mb(fn)
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1)
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # a failing peer is recorded, not fatal
        rec["ms"] = None
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    benchmark.extra_info.update(rec)
    harness.record(**rec)
    torch.cuda.empty_cache()


def _run_pool_case(benchmark, op_name, S, dtype, impl):
    """Decode over a pool (see _pool_step): ours only (fla has no in-place pool with per-sequence slots);
    ``rwkvops_graph`` replays it as a CUDA graph.  B in the record is the number of sequences."""
    torch = _torch()
    rec = dict(op=op_name, mode="decode_pool", B=S, T=1, H=H, N=N, C=H * N, dtype=dtype, impl=impl,
               floor_ms=floor_ms(op_name, "decode", S, 1, dtype, True))
    try:
        fwd = _pool_step(op_name, S, dtype)
        fn = _graphed(fwd) if impl.endswith("_graph") else fwd
        with torch.no_grad():
            rec["ms"] = harness.loop_time(fn)
            rec["ms_isolated"] = harness.cuda_time(fn)
            rec["host_ms"] = harness.host_time(fn)
            rec["peak_mem_mb"] = harness.peak_mem_mb(fn)
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1)
    except Exception as exc:
        rec["ms"] = None
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    benchmark.extra_info.update(rec)
    harness.record(**rec)
    torch.cuda.empty_cache()


CASES = []
for op_name, peers in (("wkv7", ("rwkvops", "fla")), ("wkv6", ("rwkvops", "fla"))):
    for mode in ("fwd", "fwdbwd"):
        for B, T in TRAIN:
            for impl in peers:
                CASES.append((op_name, mode, B, T, "bfloat16", impl))
    for B in DECODE:
        for impl in ("rwkvops", "fla_recurrent", "torch_step", "rwkvops_graph", "fla_recurrent_graph"):
            CASES.append((op_name, "decode", B, 1, "bfloat16", impl))
        for impl in ("rwkvops", "rwkvops_graph"):
            CASES.append((op_name, "decode_pool", B, 1, "bfloat16", impl))
for dtype in ("bfloat16", "float32"):
    for mode in ("fwd", "fwdbwd"):
        for B, T in ((1, 4096), (1, 16384), (8, 4096)):
            for impl in ("rwkvops", "fla"):
                CASES.append(("wkv4", mode, B, T, dtype, impl))


@pytest.mark.parametrize("op_name,mode,B,T,dtype,impl", CASES,
                         ids=[f"{o}-{m}-B{b}-T{t}-{d}-{i}" for o, m, b, t, d, i in CASES])
def test_bench(benchmark, op_name, mode, B, T, dtype, impl):
    _run_case(benchmark, op_name, mode, B, T, dtype, impl)
