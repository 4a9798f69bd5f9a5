"""Turn benchmarks/results/<gpu>.json into <gpu>.md (table with ratios to peers and to the floor) and <gpu>.png.

    python benchmarks/report.py [results/<gpu>.json ...]     (default: every results/*.json with records)
    python benchmarks/report.py --merge OUT.json IN.json ...   (one table from several runs of one commit on one
                                                               GPU, e.g. a benchmark split over device calls)
"""
import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def _fmt(v, nd=3):
    return "–" if v is None else f"{v:.{nd}f}"


def _normalize(recs):
    """Graph-replayed decode runs become their own mode, so ours-with-graph is compared with peers-with-graph."""
    out = []
    for r in recs:
        r = dict(r)
        if r["impl"].endswith("_graph"):
            r["impl"] = r["impl"][: -len("_graph")]
            r["mode"] = r["mode"] + "+graph"
        out.append(r)
    return out


def table(data):
    recs = _normalize(data["records"])
    groups = defaultdict(dict)
    for r in recs:
        key = (r["op"], r["mode"], r["B"], r["T"], r["dtype"])
        groups[key][r["impl"]] = r
    peers = sorted({r["impl"] for r in recs if r["impl"] != "rwkvops"})
    head = ["op", "mode", "B", "T", "dtype", "rwkvops ms"] + [f"{p} ms" for p in peers] + \
        [f"speedup vs {p}" for p in peers] + ["floor ms", "rwkvops / floor", "peak MB (ours)"] + \
        [f"peak MB ({p})" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda k: (k[0], k[1], k[4], k[2], k[3]))   # op, mode, dtype, B, T
    for key in order:
        g = groups[key]
        ours = g.get("rwkvops", {})
        ms = ours.get("ms")
        floor = next((r.get("floor_ms") for r in g.values() if r.get("floor_ms")), None)
        row = list(map(str, key[:4])) + [key[4], _fmt(ms)]
        row += [_fmt(g.get(p, {}).get("ms")) for p in peers]
        row += [(_fmt(g[p]["ms"] / ms, 2) + "x") if ms and g.get(p, {}).get("ms") else "–" for p in peers]
        row += [_fmt(floor), _fmt(ms / floor, 1) + "x" if ms and floor else "–", _fmt(ours.get("peak_mem_mb"), 0)]
        row += [_fmt(g.get(p, {}).get("peak_mem_mb"), 0) for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    errs = [r for r in recs if r.get("error")]
    host = [r for r in recs if r.get("host_ms") is not None and r["impl"] == "rwkvops"]
    host.sort(key=lambda r: (r["op"], r["mode"], r["B"]))
    out = [f"# Benchmarks on {data.get('gpu')}", "",
           f"commit `{data.get('commit')}`; torch {data.get('torch')} (CUDA {data.get('cuda_runtime')}), "
           f"cupy {data.get('cupy')}, triton {data.get('triton')}, fla {data.get('fla')}, "
           f"measured copy bandwidth {_fmt(data.get('copy_gbs'), 0)} GB/s.", "",
           "CUDA-event medians after warm-up, peers in the same process. speedup = peer ms / rwkvops ms. "
           "floor = max(bytes moved / measured copy bandwidth, FLOPs of the recurrent form / 51 TFLOP/s fp32).", ""]
    out += lines
    dev = [k for k in order if groups[k].get("rwkvops", {}).get("ms_device")]
    if dev:
        out += ["", "Device time of one call with the host's issue time hidden (`harness.device_time`: a spin kernel "
                "queued ahead of the start event): the GPU time of the call, without the wait for its Python code:", "",
                "| op | mode | B | T | dtype | rwkvops ms | " + " | ".join(f"{p} ms | speedup vs {p}" for p in peers)
                + " | rwkvops / floor |", "|" + "---|" * (7 + 2 * len(peers))]
        for key in dev:
            g = groups[key]
            ms = g["rwkvops"]["ms_device"]
            floor = g["rwkvops"].get("floor_ms")
            row = list(map(str, key[:4])) + [key[4], _fmt(ms)]
            for p in peers:
                pm = g.get(p, {}).get("ms_device")
                row += [_fmt(pm), _fmt(pm / ms, 2) + "x" if pm else "–"]
            row.append(_fmt(ms / floor, 1) + "x" if floor else "–")
            out.append("| " + " | ".join(row) + " |")
    if host:
        out += ["", "Host overhead per decode call (median CPU time of the Python call, not synced):", ""]
        out += [f"- {r['op']} {r['mode']} B={r['B']}: {r['host_ms']:.4f} ms host, {r['ms']:.4f} ms per call (events)"
                for r in host]
    if errs:
        out += ["", "Failures:", ""] + [f"- {r['op']} {r['mode']} B={r['B']} T={r['T']} {r['impl']}: {r['error']}"
                                        for r in errs]
    return "\n".join(out) + "\n"


def plot(data, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [r for r in _normalize(data["records"]) if r.get("ms")]
    panels = sorted({(r["op"], r["mode"], r["dtype"]) for r in recs})
    if not panels:
        return False
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (op, mode, dtype) in zip(axes.flat, panels):
        sel = [r for r in recs if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        xkey = "B" if mode.startswith("decode") else "T"
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r[xkey], r["ms"]) for r in sel
                         if r["impl"] == impl and (mode.startswith("decode") or r["B"] == 1))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op} {mode} {dtype}" + ("" if mode.startswith("decode") else " (B=1)"))
        ax.set_xlabel(xkey)
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def merge(out, paths):
    """Concatenate the records of runs that share GPU and commit; a later run's record of the same case wins."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    for key in ("gpu", "commit"):
        seen = {r.get(key) for r in runs}
        if len(seen) > 1:
            raise SystemExit(f"--merge: runs differ in {key}: {sorted(map(str, seen))}")
    cases = {}
    for r in runs:
        for rec in r["records"]:
            cases[tuple(rec.get(k) for k in ("op", "mode", "B", "T", "dtype", "impl"))] = rec
    with open(out, "w") as f:
        json.dump({**runs[-1], "records": list(cases.values())}, f, indent=1)
    return out


def main(paths):
    paths = paths or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "records" not in data:
            continue
        base = os.path.splitext(p)[0]
        with open(base + ".md", "w") as f:
            f.write(table(data))
        plot(data, base + ".png")
        print(f"wrote {base}.md" + (" and .png" if os.path.exists(base + ".png") else ""))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--merge"]:
        if len(args) < 3:
            raise SystemExit("usage: report.py --merge OUT.json IN.json [IN.json ...]")
        main([merge(args[1], args[2:])])
    else:
        main(args)
