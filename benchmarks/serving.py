"""Continuous batching over a pool of states versus padded static batching, on the random RWKV-7 model.

A scripted, seeded stream of requests (prompt lengths 16..4096, generation lengths 1..512, arrival times) is
served twice with the same model and the same kernels:

* continuous: a pool of ``--max-active`` state slots; every step packs the decode tokens of all decoding
  sequences and prefill chunks (at most ``--chunk`` tokens per sequence, ``--step-tokens`` per step) of the
  others into ONE :meth:`RWKV7Model.forward_packed` call (one ``wkv7`` call per layer over ``cu_seqlens`` and
  ``state_indices``); a finished sequence frees its slot at once and the next waiting request takes it;
* padded: requests that have arrived are taken ``--max-active`` at a time, left-padded to the longest prompt
  of the batch, prefilled with one :meth:`RWKV7Model.forward` and decoded with :meth:`RWKV7Model.step` until the
  longest generation of the batch is done; the next batch starts when the whole batch is done.

Greedy decoding.  Throughput is tokens processed (prompt + generated, padding not counted) per second of wall
time from the first arrival to the last completion.  Afterwards every request is checked against running it
alone: one GPT-mode forward over its prompt and served tokens (teacher forcing) must give, at every generated
position, the served token as its argmax (or a near tie) and the same logit for it.

    python benchmarks/serving.py --device cpu                       # small, < 1 minute on a CPU (CI smoke test)
    python benchmarks/serving.py --device gpu --full --out benchmarks/results/serving_<gpu>.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]   # rwkvops from this checkout; harness beside this file

from rwkvops.model import RWKV7Model  # noqa: E402

import harness  # noqa: E402

SMALL = dict(n_layer=2, n_embd=128, head_size=32, vocab=256, requests=8, prompt_min=16, prompt_max=128,
             gen_min=1, gen_max=24, rate=200.0, max_active=8, chunk=48, step_tokens=128)
FULL = dict(n_layer=12, n_embd=1024, head_size=64, vocab=16384, requests=64, prompt_min=16, prompt_max=4096,
            gen_min=1, gen_max=512, rate=16.0, max_active=32, chunk=512, step_tokens=4096)


@dataclasses.dataclass
class Request:
    rid: int
    arrival: float            # seconds after the start of the run
    prompt: np.ndarray        # int64 [prompt_len]
    gen_len: int


@dataclasses.dataclass
class Served:
    tokens: list = dataclasses.field(default_factory=list)   # generated tokens
    chosen: list = dataclasses.field(default_factory=list)   # the logit of each generated token
    first_token_at: float = 0.0
    done_at: float = 0.0


def make_requests(n, seed, vocab, prompt_min, prompt_max, gen_min, gen_max, rate) -> list:
    """Seeded stream: prompt and generation lengths log-uniform in their ranges, Poisson arrivals at ``rate``
    requests/s (rate 0: all at t = 0)."""
    rng = np.random.default_rng(seed)
    pl = np.exp(rng.uniform(np.log(prompt_min), np.log(prompt_max + 1), n)).astype(int).clip(prompt_min, prompt_max)
    gl = np.exp(rng.uniform(np.log(gen_min), np.log(gen_max + 1), n)).astype(int).clip(gen_min, gen_max)
    gaps = rng.exponential(1.0 / rate, n) if rate > 0 else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [Request(i, float(arrivals[i]), rng.integers(0, vocab, int(pl[i])), int(gl[i])) for i in range(n)]


def _pick(be, logits):
    """Greedy choice on the device; (token ids, their logits) as NumPy arrays (one small host transfer)."""
    idx = logits.argmax(-1)
    mx = logits.amax(-1) if be.kind == "torch" else logits.max(-1)
    return be.to_numpy(idx).astype(np.int64), be.to_numpy(mx).astype(np.float64)


# ----------------------------------------------------------------------------- continuous batching

def serve_continuous(model, requests, max_active, chunk, step_tokens):
    be = model.be
    pool = model.new_pool(max_active)
    free = list(range(max_active))[::-1]
    waiting = sorted(requests, key=lambda r: r.arrival)
    out = {r.rid: Served() for r in requests}
    active = []          # dicts: req, slot, pos (prompt tokens consumed), next (token to feed when decoding)
    steps = packed_tokens = 0
    t0 = time.perf_counter()
    while waiting or active:
        now = time.perf_counter() - t0
        while waiting and free and waiting[0].arrival <= now:
            r = waiting.pop(0)
            slot = free.pop()
            pool.reset(be, [slot])
            active.append({"req": r, "slot": slot, "pos": 0, "next": None})
        if not active:
            time.sleep(max(0.0, waiting[0].arrival - (time.perf_counter() - t0)))
            continue
        pieces, budget = [], step_tokens
        for a in active:                          # decode tokens first (one each), then prefill chunks
            if a["next"] is not None and budget > 0:
                pieces.append((a, np.array([a["next"]]), True))
                budget -= 1
        for a in active:
            if a["next"] is None and budget > 0:
                n = min(chunk, len(a["req"].prompt) - a["pos"], budget)
                pieces.append((a, a["req"].prompt[a["pos"]:a["pos"] + n], False))
                budget -= n
        cu = np.concatenate([[0], np.cumsum([len(p) for _, p, _ in pieces])])
        toks = np.concatenate([p for _, p, _ in pieces])
        slots = np.array([a["slot"] for a, _, _ in pieces])
        logits = model.forward_packed(toks, cu, pool, slots, last_only=True)
        ids, vals = _pick(be, logits)
        steps += 1
        packed_tokens += len(toks)
        now = time.perf_counter() - t0
        for i, (a, p, decoding) in enumerate(pieces):
            if not decoding:
                a["pos"] += len(p)
                if a["pos"] < len(a["req"].prompt):
                    continue                       # more prompt to prefill: these logits are not used
            s = out[a["req"].rid]
            if not s.tokens:
                s.first_token_at = now
            s.tokens.append(int(ids[i]))
            s.chosen.append(float(vals[i]))
            a["next"] = int(ids[i])
            if len(s.tokens) == a["req"].gen_len:
                s.done_at = now
                free.append(a["slot"])
                a["done"] = True
        active = [a for a in active if not a.get("done")]
    wall = time.perf_counter() - t0
    return out, {"wall_s": wall, "steps": steps, "packed_tokens": packed_tokens}


# ----------------------------------------------------------------------------- padded static batches

def serve_padded(model, requests, max_batch):
    be = model.be
    waiting = sorted(requests, key=lambda r: r.arrival)
    out = {r.rid: Served() for r in requests}
    steps = padded_tokens = 0
    t0 = time.perf_counter()
    while waiting:
        now = time.perf_counter() - t0
        if waiting[0].arrival > now:
            time.sleep(waiting[0].arrival - now)
            now = time.perf_counter() - t0
        batch = [r for r in waiting if r.arrival <= now][:max_batch]
        waiting = [r for r in waiting if r not in batch]
        B, T = len(batch), max(len(r.prompt) for r in batch)
        G = max(r.gen_len for r in batch)
        tokens = np.zeros((B, T), np.int64)
        mask = np.zeros((B, T))
        for i, r in enumerate(batch):
            tokens[i, T - len(r.prompt):] = r.prompt
            mask[i, T - len(r.prompt):] = 1
        logits, state = model.forward(tokens, mask=mask, last_only=True)
        padded_tokens += B * T
        for g in range(G):
            ids, vals = _pick(be, logits)
            now = time.perf_counter() - t0
            for i, r in enumerate(batch):
                s = out[r.rid]
                if len(s.tokens) < r.gen_len:
                    if not s.tokens:
                        s.first_token_at = now
                    s.tokens.append(int(ids[i]))
                    s.chosen.append(float(vals[i]))
                    if len(s.tokens) == r.gen_len:
                        s.done_at = now
            if g + 1 < G:
                logits, state = model.step(ids, state)
                steps += 1
                padded_tokens += B
    wall = time.perf_counter() - t0
    return out, {"wall_s": wall, "steps": steps, "padded_tokens": padded_tokens}


# ----------------------------------------------------------------------------- checks and report

def check_against_alone(model, requests, served: dict, tol: float):
    """Teacher-forced GPT-mode run of each request alone: served tokens must be the argmax (or within ``tol`` *
    rms(logits) of it: a near tie) and their logits must match to ``tol`` * rms(logits)."""
    be = model.be
    worst, mismatches, ties = 0.0, [], 0
    for r in requests:
        s = served[r.rid]
        if len(s.tokens) != r.gen_len:
            mismatches.append((r.rid, -1, "wrong number of tokens"))
            continue
        seq = np.concatenate([r.prompt, np.array(s.tokens[:-1], np.int64)])
        logits, _ = model.forward(seq[None])
        ref = be.to_numpy(logits[0, len(r.prompt) - 1:]).astype(np.float64)       # [gen_len, V]
        scale = float(np.sqrt(np.mean(ref ** 2))) or 1.0
        toks = np.array(s.tokens)
        got = ref[np.arange(len(toks)), toks]
        best = ref.max(-1)
        err = np.abs(np.array(s.chosen) - got) / scale
        worst = max(worst, float(err.max()))
        gap = (best - got) / scale
        for j in np.nonzero(gap > 0)[0]:
            if gap[j] <= tol:
                ties += 1
            else:
                mismatches.append((r.rid, int(j), f"token {toks[j]} is {gap[j]:.3g} rms below the argmax"))
        for j in np.nonzero(err > tol)[0]:
            mismatches.append((r.rid, int(j), f"logit differs by {err[j]:.3g} rms"))
    return {"requests": len(requests), "max_logit_err_rel": worst, "near_ties": ties,
            "mismatches": mismatches[:20], "n_mismatches": len(mismatches), "passed": not mismatches}


def summarize(requests, served, stats):
    n_prompt = sum(len(r.prompt) for r in requests)
    n_gen = sum(r.gen_len for r in requests)
    wall = stats["wall_s"]
    ttft = [served[r.rid].first_token_at - r.arrival for r in requests]
    lat = [served[r.rid].done_at - r.arrival for r in requests]
    return {**stats, "prompt_tokens": n_prompt, "generated_tokens": n_gen,
            "tokens_per_s": (n_prompt + n_gen) / wall, "generated_tokens_per_s": n_gen / wall,
            "mean_ttft_s": float(np.mean(ttft)), "mean_latency_s": float(np.mean(lat)),
            "p90_latency_s": float(np.percentile(lat, 90))}


def _versions(backend):
    v = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("cupy", "torch"):
        m = sys.modules.get(mod)
        if m is not None:
            v[mod] = m.__version__
    v["commit"] = harness.commit()
    return v


def _gpu_name(be):
    if not be.gpu:
        return "cpu"
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--backend", choices=("numpy", "cupy", "torch"), default=None,
                    help="array library (default: numpy on cpu, cupy on gpu)")
    ap.add_argument("--full", action="store_true", help="the full-size GPU configuration")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--seed", type=int, default=0)
    for k in ("n_layer", "n_embd", "head_size", "vocab", "prompt_min", "prompt_max", "gen_min", "gen_max",
              "max_active", "chunk", "step_tokens"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, dest=k)
    ap.add_argument("--rate", type=float, help="request arrivals per second (0: all at once)")
    ap.add_argument("--dtype", default=None, help="float32 (default; the GPU path) or float64 (CPU only)")
    ap.add_argument("--tol", type=float, default=None, help="check tolerance, relative to rms(logits)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serving_<gpu>.json)")
    args = ap.parse_args(argv)

    cfg = dict(FULL if args.full else SMALL)
    for k in cfg:
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    backend = args.backend or ("cupy" if args.device == "gpu" else "numpy")
    if args.device == "cpu" and backend == "cupy":
        ap.error("--backend cupy needs --device gpu")
    device = ("cuda" if args.device == "gpu" else "cpu") if backend == "torch" else None
    if args.device == "gpu" and backend == "numpy":
        ap.error("--device gpu needs --backend cupy or torch")
    dtype = args.dtype or "float32"
    tol = args.tol if args.tol is not None else (1e-3 if dtype == "float32" else 1e-9)

    model = RWKV7Model.random(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], head_size=cfg["head_size"],
                              vocab=cfg["vocab"], seed=args.seed, xp=backend, dtype=dtype, device=device)
    be = model.be
    requests = make_requests(cfg["requests"], args.seed + 1, cfg["vocab"], cfg["prompt_min"], cfg["prompt_max"],
                             cfg["gen_min"], cfg["gen_max"], cfg["rate"])
    gpu = _gpu_name(be)
    print(f"[serving] {be} {dtype} on {gpu}: model L={cfg['n_layer']} C={cfg['n_embd']} N={cfg['head_size']} "
          f"V={cfg['vocab']}; {len(requests)} requests, prompts {min(len(r.prompt) for r in requests)}.."
          f"{max(len(r.prompt) for r in requests)}, generations {min(r.gen_len for r in requests)}.."
          f"{max(r.gen_len for r in requests)}, arrivals over {requests[-1].arrival:.2f} s", flush=True)

    # warm-up: compile the kernels and fill the allocator outside the timed runs
    warm = make_requests(2, args.seed + 99, cfg["vocab"], 16, 40, 2, 3, 0.0)
    serve_continuous(model, warm, 2, cfg["chunk"], cfg["step_tokens"])
    serve_padded(model, warm, 2)
    be.sync()

    results = {}
    runs = {}
    for name, fn in (("continuous", lambda: serve_continuous(model, requests, cfg["max_active"], cfg["chunk"],
                                                             cfg["step_tokens"])),
                     ("padded", lambda: serve_padded(model, requests, cfg["max_active"]))):
        served, stats = fn()
        be.sync()
        runs[name] = served
        results[name] = summarize(requests, served, stats)
        r = results[name]
        print(f"[serving] {name:>10}: {r['wall_s']:.3f} s, {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['generated_tokens_per_s']:,.0f} generated/s), {r['steps']} steps, "
              f"mean TTFT {r['mean_ttft_s']:.3f} s, mean latency {r['mean_latency_s']:.3f} s", flush=True)
    results["speedup_continuous_over_padded"] = (results["continuous"]["tokens_per_s"]
                                                 / results["padded"]["tokens_per_s"])
    print(f"[serving] continuous / padded throughput: {results['speedup_continuous_over_padded']:.2f}x")

    ok = True
    if not args.no_check:
        t = time.perf_counter()
        results["check"] = {name: check_against_alone(model, requests, runs[name], tol) for name in runs}
        same = sum(runs["continuous"][r.rid].tokens == runs["padded"][r.rid].tokens for r in requests)
        results["check"]["requests_with_identical_tokens_in_both"] = same
        for name in runs:
            c = results["check"][name]
            ok &= c["passed"]
            print(f"[serving] check {name:>10} vs each request alone: {'PASS' if c['passed'] else 'FAIL'} "
                  f"(max logit err {c['max_logit_err_rel']:.2e} rms, {c['near_ties']} near ties, "
                  f"{c['n_mismatches']} mismatches) [{time.perf_counter() - t:.1f} s]")
            for m in c["mismatches"][:5]:
                print(f"           request {m[0]} token {m[1]}: {m[2]}")
        print(f"[serving] {same}/{len(requests)} requests generated identical tokens in both runs")

    report = {"benchmark": "serving", "device": gpu, "backend": repr(be), "dtype": dtype, "config": cfg,
              "seed": args.seed, "tol": tol, "versions": _versions(be), "results": results,
              "requests": [{"id": r.rid, "arrival_s": r.arrival, "prompt_len": len(r.prompt), "gen_len": r.gen_len}
                           for r in requests]}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"serving_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_').lower()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"[serving] wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
