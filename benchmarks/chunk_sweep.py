"""Chunk-length sweep of the RWKV-6 chunk-parallel backward (seed 000's question: which chunk length L is fastest?).

The chunked forward runs on tensor cores with its chunk length fixed at 64 (TC_L in wkv6.cu; the committed
``wkv6_chunk_sweep_h100`` results at 6704d18 swept the earlier recurrent chunked forward).  This times fwd+bwd with
the chunk-parallel backward forced, for backward chunk lengths L in {16, 32, 64} (64: the tensor-core backward,
reusing the forward's chunk states; shorter: the recurrent per-chunk passes), at B=1, H=32, N=64, bf16,
T in {4096, 16384} (CUDA-event medians, benchmarks/harness.cuda_time), and the chunked forward once per T.
Writes the results to the JSON file given by --out and a PNG plot next to it (same name, .png).

    python3 benchmarks/chunk_sweep.py --out results/chunk_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

B, H, N = 1, 32, 64
TS = (4096, 16384)
LS = (16, 32, 64)


def inputs(T, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (B, T, H, N)

    def rn(*s, scale=1.0):
        return torch.randn(*s, device="cuda", generator=g) * scale

    x = {"r": rn(*shape, scale=0.5), "k": rn(*shape, scale=0.5), "v": rn(*shape),
         "w": -torch.rand(*shape, device="cuda", generator=g) * 5.0 - 0.5, "u": rn(H, N, scale=0.5)}
    return {n: a.to(torch.bfloat16).contiguous() for n, a in x.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file (the plot goes next to it as .png)")
    ap.add_argument("--no-bwd", action="store_true", help="time the forward only")
    args = ap.parse_args(argv)
    import torch
    from rwkvops.ops import wkv6 as W

    saved = (W.FORWARD_PATH, W.CHUNK_L, W.BACKWARD_PATH, W.BWD_CHUNK_L)
    rows = []
    try:
        for T in TS:
            x = inputs(T)
            xg = {n: a.detach().clone().requires_grad_(True) for n, a in x.items()}
            dy = torch.randn(B, T, H, N, device="cuda").to(torch.bfloat16)
            for L in LS:
                W.FORWARD_PATH = "chunked"
                W.BACKWARD_PATH, W.BWD_CHUNK_L = "chunked", L
                rec = {"op": "wkv6", "B": B, "T": T, "H": H, "N": N, "dtype": "bfloat16", "L": L}
                try:
                    with torch.no_grad():
                        rec["fwd_ms"] = harness.cuda_time(lambda: W.wkv6(*(x[n] for n in ("r", "k", "v", "w", "u"))))
                except Exception as e:  # noqa: BLE001  (record, keep sweeping)
                    rec["fwd_ms"], rec["fwd_error"] = None, f"{type(e).__name__}: {e}"
                if not args.no_bwd:
                    def step():
                        y, _ = W.wkv6(*(xg[n] for n in ("r", "k", "v", "w", "u")))
                        y.backward(dy)
                    try:
                        rec["fwd_bwd_ms"] = harness.cuda_time(step)
                    except Exception as e:  # noqa: BLE001
                        rec["fwd_bwd_ms"], rec["fwd_bwd_error"] = None, f"{type(e).__name__}: {e}"
                rows.append(rec)
                print("SWEEP", json.dumps(rec), flush=True)
            del x, xg, dy
            torch.cuda.empty_cache()
    finally:
        W.FORWARD_PATH, W.CHUNK_L, W.BACKWARD_PATH, W.BWD_CHUNK_L = saved
    try:
        env = harness.environment()
    except Exception:  # noqa: BLE001
        env = {}
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)
    plot(rows, os.path.splitext(out)[0] + ".png")
    print("wrote", out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("fwd_ms", "fwd_bwd_ms") if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for T in sorted({r["T"] for r in rows}):
            pts = [(r["L"], r[key]) for r in rows if r["T"] == T and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"T={T}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(LS, [str(L) for L in LS])
        ax.set_xlabel("chunk length L (tokens)")
        ax.set_ylabel("ms (CUDA-event median)")
        ax.set_title(f"wkv6 {key[:-3].replace('_', '+')}, B={B} H={H} N={N} bf16")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
