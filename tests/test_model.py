"""The random-weight RWKV-7 model on top of wkv7: GPT mode == RNN mode, pool serving == running alone.

CPU tests use NumPy (float64: tight, float32: loose) and torch CPU tensors; GPU variants (marked ``gpu``) run the
same checks on CuPy and torch CUDA in fp32 against the NumPy float64 model with the same weights.
"""
from __future__ import annotations

import numpy as np
import pytest

from rwkvops.model import RWKV7Model, State, demo_model, demo_results
from rwkvops.testing import has_gpu, rel_rms, to_numpy

V = 61
DIMS = dict(n_layer=3, n_embd=32, head_size=8, vocab=V)   # 4 heads; 3 layers so the value residual is exercised
TOL = {"float64": 1e-10, "float32": 2e-5}


def model(dtype="float64", xp=np, device=None, seed=0, **kw):
    return RWKV7Model.random(**{**DIMS, **kw}, seed=seed, xp=xp, dtype=dtype, device=device)


def toks(seed, *shape):
    return np.random.default_rng(seed).integers(0, V, shape)


def states_close(a: State, b: State, tol, label=""):
    for name in ("att_x", "wkv", "ffn_x"):
        for l, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            e = rel_rms(x, y)
            assert e <= tol, f"{label} state.{name}[{l}]: rel RMS {e:.3g} > {tol:g}"


def close(a, b, tol, label=""):
    e = rel_rms(a, b)
    assert e <= tol, f"{label}: rel RMS {e:.3g} > {tol:g}"


def random_pool(m, P, seed):
    """A pool whose slots hold the states of random prefixes (realistic non-zero states)."""
    pool = m.new_pool(P)
    _, st = m.forward(toks(seed, P, 6))
    pool.scatter(m.be, np.arange(P), st)
    return pool


# ----------------------------------------------------------------------------- GPT mode == RNN mode

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("T", [1, 2, 13])
def test_gpt_mode_equals_rnn_mode(dtype, T):
    m = model(dtype)
    x = toks(1, 3, T)
    logits, st = m.forward(x)
    assert logits.shape == (3, T, V) and logits.dtype == np.dtype(dtype)
    s = m.zero_state(3)
    steps = []
    for t in range(T):
        lg, s = m.step(x[:, t], s)
        steps.append(lg)
    close(np.stack(steps, 1), logits, TOL[dtype], "logits")
    states_close(s, st, TOL[dtype])
    assert st.wkv[0].dtype == np.dtype(dtype)


def test_gpt_mode_from_a_state_and_continuation():
    m = model()
    x = toks(2, 2, 17)
    full, s_full = m.forward(x)
    for t in (1, 8, 16):
        a, s1 = m.forward(x[:, :t])
        b, s2 = m.forward(x[:, t:], s1)
        close(np.concatenate([a, b], 1), full, 1e-10, f"split {t}")
        states_close(s2, s_full, 1e-10, f"split {t}")
    # the input state is not modified
    s1c = s1.copy()
    m.forward(x[:, :3], s1)
    states_close(s1, s1c, 0.0)


def test_generate_modes_agree():
    m = model()
    prompt = toks(3, 2, 7)
    outs = {mode: m.generate(prompt, 6, mode=mode, return_logits=True) for mode in ("gpt", "rnn", "fast")}
    for mode in ("rnn", "fast"):
        np.testing.assert_array_equal(outs[mode][0], outs["gpt"][0])
        close(outs[mode][1], outs["gpt"][1], 1e-10, mode)
    # greedy: each token is the argmax of the logits that chose it
    np.testing.assert_array_equal(outs["gpt"][0], outs["gpt"][1].argmax(-1))


def test_left_padding_mask_equals_running_alone():
    m = model()
    lens = [9, 4, 1]
    T = max(lens)
    seqs = [toks(10 + i, n) for i, n in enumerate(lens)]
    batch = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T))
    for i, s in enumerate(seqs):
        batch[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    logits, st = m.forward(batch, mask=mask, last_only=True)
    for i, s in enumerate(seqs):
        ref, rs = m.forward(s[None], last_only=True)
        close(logits[i], ref[0], 1e-10, f"seq {i}")
        states_close(st.gather(m.be, [i]), rs, 1e-10, f"seq {i}")


# ----------------------------------------------------------------------------- pool serving

@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_prefill_into_slot_then_decode_equals_full_run(chunk):
    m = model()
    P, slot = 4, 2
    prompt, gen = toks(4, 19), toks(5, 6)
    seq = np.concatenate([prompt, gen])
    ref_logits, ref_state = m.forward(seq[None])
    pool = random_pool(m, P, 6)
    before = pool.copy()
    pool.reset(m.be, [slot])
    got = []
    for s in range(0, len(prompt), chunk):          # chunked prefill
        piece = prompt[s:s + chunk]
        got.append(m.forward_packed(piece, [0, len(piece)], pool, [slot]))
    for t in gen:                                   # one-token decode
        got.append(m.forward_packed(np.array([t]), [0, 1], pool, [slot]))
    close(np.concatenate(got, 0), ref_logits[0], 1e-10, "logits")
    states_close(pool.gather(m.be, [slot]), ref_state, 1e-10, "slot")
    others = [i for i in range(P) if i != slot]
    states_close(pool.gather(m.be, others), before.gather(m.be, others), 0.0, "untouched slots")


def _mixed_batch_check(m, tol, seed=7):
    """Prefill chunks, decode tokens, a -1 slot and a zero-length piece in one forward_packed call, against each
    sequence run alone from its slot's state with forward()."""
    be = m.be
    P = 7
    pool = random_pool(m, P, seed)
    before = pool.copy()
    # (slot, length): prefill chunk, decode token, fresh sequence not kept, zero-length piece, decode, chunk
    plan = [(0, 7), (3, 1), (-1, 5), (2, 0), (5, 1), (6, 12)]
    pieces = [toks(seed + 10 + i, n) for i, (_, n) in enumerate(plan)]
    slots = np.array([s for s, _ in plan])
    cu = np.concatenate([[0], np.cumsum([n for _, n in plan])])
    packed = np.concatenate(pieces)
    logits = m.forward_packed(packed, cu, pool, slots)
    assert tuple(logits.shape) == (len(packed), m.vocab)
    pool_after_all = pool.copy()
    # again with last_only, from the same starting pool
    pool2 = before.copy()
    last = m.forward_packed(packed, cu, pool2, slots, last_only=True)
    assert tuple(last.shape) == (len(plan), m.vocab)
    states_close(pool2, pool_after_all, 0.0, "last_only pool")
    for i, ((slot, n), piece) in enumerate(zip(plan, pieces)):
        if n == 0:
            assert float(np.abs(to_numpy(last[i])).max()) == 0.0
            continue
        start = before.gather(be, [slot])     # slot -1 gathers zeros
        ref, rs = m.forward(piece[None], start)
        close(logits[cu[i]:cu[i + 1]], ref[0], tol, f"seq {i} logits")
        close(last[i], ref[0, -1], tol, f"seq {i} last logits")
        if slot >= 0:
            states_close(pool.gather(be, [slot]), rs, tol, f"seq {i} slot {slot}")
    untouched = [s for s in range(P) if s not in {0, 3, 5, 6}]      # incl. slot 2 (zero-length piece)
    states_close(pool.gather(be, untouched), before.gather(be, untouched), 0.0, "untouched slots")
    return pool


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_packed_batch_equals_each_alone(dtype):
    _mixed_batch_check(model(dtype), TOL[dtype])


def test_pool_reset_gather_scatter():
    m = model()
    pool = random_pool(m, 5, 3)
    g = pool.gather(m.be, [4, -1, 1])
    states_close(g.gather(m.be, [0, 2]), pool.gather(m.be, [4, 1]), 0.0)
    assert all(float(np.abs(a[1]).max()) == 0.0 for a in (*g.att_x, *g.wkv, *g.ffn_x))
    pool.reset(m.be, [4, -1])
    assert all(float(np.abs(a[4]).max()) == 0.0 for a in (*pool.att_x, *pool.wkv, *pool.ffn_x))
    assert all(float(np.abs(a[1]).max()) > 0.0 for a in (*pool.wkv,))


def test_forward_packed_bad_arguments():
    m = model()
    pool = m.new_pool(3)
    x = toks(1, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m.forward_packed(x, [0, 3], pool, [0])
    with pytest.raises(ValueError, match="cu_seqlens"):
        m.forward_packed(x, [0, 3, 2, 4], pool, [0, 1, 2])
    with pytest.raises(ValueError, match="slots"):
        m.forward_packed(x, [0, 2, 4], pool, [0])
    with pytest.raises(ValueError, match="slots"):
        m.forward_packed(x, [0, 2, 4], pool, [0, 3])
    with pytest.raises(ValueError, match="slots"):
        m.forward_packed(x, [0, 2, 4], pool, [1, 1])
    with pytest.raises(ValueError, match="tokens"):
        m.forward(x)


# ----------------------------------------------------------------------------- torch CPU

def test_torch_cpu_matches_numpy():
    torch = pytest.importorskip("torch")
    mn, mt = model("float64"), model("float64", xp=torch)
    x = toks(8, 2, 9)
    ln, sn = mn.forward(x)
    lt, st = mt.forward(torch.as_tensor(x))
    assert isinstance(lt, torch.Tensor) and isinstance(st.wkv[0], torch.Tensor)
    close(lt, ln, 1e-10, "forward")
    states_close(st, sn, 1e-10)
    # RNN mode on tensors
    s = mt.zero_state(2)
    for t in range(9):
        lg, s = mt.step(torch.as_tensor(x[:, t]), s)
    close(lg, ln[:, -1], 1e-10, "step")
    # pool serving on tensors (the op updates the tensor pool in place)
    _mixed_batch_check(mt, 1e-10)
    np.testing.assert_array_equal(mt.generate(x, 4, mode="fast"), mn.generate(x, 4, mode="gpt"))


def test_demo_model_runs(capsys):
    res = demo_results(np, n_layer=2, n_embd=32, head_size=8, vocab=50, batch=2, prompt_len=5, n_new=4)
    assert res["ok"] and res["rnn_token_agreement"] == 1.0 and res["fast_token_agreement"] == 1.0
    assert res["rnn_max_logit_err"] < 1e-4
    assert "tokens/s" in capsys.readouterr().out
    # the entry point of `python -m rwkvops demo`: demo_model(gpu=...) -> 0 when the modes agree
    assert demo_model(gpu=False, n_layer=1, n_embd=16, head_size=8, vocab=20, batch=1, prompt_len=3, n_new=2) == 0


def test_serving_benchmark_smoke(tmp_path):
    """benchmarks/serving.py end to end on a tiny stream: both servers agree with each request run alone."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "serving.py")
    spec = importlib.util.spec_from_file_location("serving_bench", path)
    mod = importlib.util.module_from_spec(spec)
    import sys
    sys.modules[spec.name] = mod          # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    out = tmp_path / "serving.json"
    rc = mod.main(["--device", "cpu", "--requests", "4", "--prompt-max", "40", "--gen-max", "6", "--chunk", "16",
                   "--step-tokens", "24", "--max-active", "3", "--rate", "0", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rc == 0
    res = rep["results"]
    assert res["check"]["continuous"]["passed"] and res["check"]["padded"]["passed"]
    assert res["continuous"]["tokens_per_s"] > 0 and res["padded"]["tokens_per_s"] > 0
    assert res["continuous"]["generated_tokens"] == sum(r["gen_len"] for r in rep["requests"])


# ----------------------------------------------------------------------------- GPU (CuPy, torch CUDA), fp32

GPU_DIMS = dict(n_layer=3, n_embd=128, head_size=64, vocab=V)
GPU_TOL = 2e-4      # fp32 model (matmuls, norms, WKV) against the float64 NumPy model, relative RMS


def _gpu_backend(name):
    if not has_gpu():
        pytest.skip("no CUDA GPU")
    if name == "cupy":
        import cupy
        return cupy, None
    torch = pytest.importorskip("torch")
    return torch, "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "torch-cuda"])
@pytest.mark.parametrize("head_size", [32, 64, 128])
def test_gpu_gpt_rnn_and_reference(backend, head_size):
    xp, dev = _gpu_backend(backend)
    dims = {**GPU_DIMS, "head_size": head_size, "n_embd": 2 * head_size}
    ref = model("float64", **dims)
    m = model("float32", xp=xp, device=dev, **dims)
    assert m.be.gpu
    x = toks(1, 3, 37)
    lr, sr = ref.forward(x)
    lg, sg = m.forward(x)
    close(lg, lr, GPU_TOL, "gpt logits vs float64 reference")
    states_close(sg, sr, GPU_TOL, "gpt")
    s = m.zero_state(3)
    steps = []
    for t in range(x.shape[1]):
        l1, s = m.step(x[:, t], s)
        steps.append(to_numpy(l1))
    close(np.stack(steps, 1), lr, GPU_TOL, "rnn logits vs float64 reference")
    states_close(s, sr, GPU_TOL, "rnn")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "torch-cuda"])
def test_gpu_mixed_packed_batch(backend):
    xp, dev = _gpu_backend(backend)
    m = model("float32", xp=xp, device=dev, **GPU_DIMS)
    _mixed_batch_check(m, 1e-5)      # GPU packed call vs GPU per-sequence calls (same kernels, fp32)
    # and against the float64 NumPy model on the same weights
    ref = model("float64", **GPU_DIMS)
    pool_g, pool_r = random_pool(m, 3, 2), random_pool(ref, 3, 2)
    x = toks(3, 11)
    lg = m.forward_packed(x, [0, 4, 5, 11], pool_g, [2, -1, 0])
    lr = ref.forward_packed(x, [0, 4, 5, 11], pool_r, [2, -1, 0])
    close(lg, lr, GPU_TOL, "packed vs float64 reference")
    states_close(pool_g, pool_r, GPU_TOL, "pool vs float64 reference")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "torch-cuda"])
def test_gpu_prefill_then_decode(backend):
    xp, dev = _gpu_backend(backend)
    m = model("float32", xp=xp, device=dev, **GPU_DIMS)
    seq = toks(4, 40)
    ref_logits, ref_state = m.forward(seq[None])
    pool = random_pool(m, 3, 1)
    pool.reset(m.be, [1])
    got = [m.forward_packed(seq[:16], [0, 16], pool, [1]), m.forward_packed(seq[16:33], [0, 17], pool, [1])]
    for t in seq[33:]:
        got.append(m.forward_packed(np.array([t]), [0, 1], pool, [1]))
    close(xp.concatenate(got, 0) if backend == "cupy" else xp.cat(got, 0), ref_logits[0], 1e-5, "logits")
    states_close(pool.gather(m.be, [1]), ref_state, 1e-5, "slot")


@pytest.mark.gpu
def test_gpu_demo_model():
    import cupy
    if not has_gpu():
        pytest.skip("no CUDA GPU")
    res = demo_results(cupy, n_layer=2, n_embd=128, head_size=64, vocab=256, batch=4, prompt_len=16, n_new=8)
    assert res["ok"] and res["rnn_max_logit_err"] < 1e-3
    assert demo_model(gpu=True) == 0      # what `python -m rwkvops demo` runs
