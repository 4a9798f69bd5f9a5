"""benchmarks/report.py: the tables it writes from a results file (ratios to the peer in the same run, the device-time
table, the host lines), on a synthetic results dict: no GPU needed."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import report  # noqa: E402


def _rec(impl, ms, ms_device=None, **kw):
    r = dict(op="wkv7", mode="fwd", B=8, T=4096, dtype="bfloat16", impl=impl, ms=ms, floor_ms=0.5)
    if ms_device is not None:
        r["ms_device"] = ms_device
    r.update(kw)
    return r


def _rows(md, first):
    return [line for line in md.splitlines() if line.startswith(first)]


def test_speedups_and_device_table():
    md = report.table({"gpu": "G", "records": [_rec("rwkvops", 2.0, 1.6), _rec("fla", 4.0, 4.0)]})
    main, dev = _rows(md, "| wkv7 | fwd |")
    assert main.split(" | ")[5:8] == ["2.000", "4.000", "2.00x"]
    assert dev.split(" | ")[5:9] == ["1.600", "4.000", "2.50x", "3.2x |"]     # 4.0 / 1.6; 1.6 / 0.5 floor


def test_no_device_table_without_device_times():
    md = report.table({"gpu": "G", "records": [_rec("rwkvops", 2.0), _rec("fla", 4.0)]})
    assert "Device time of one call" not in md
    assert len(_rows(md, "| wkv7 | fwd |")) == 1


def test_graph_decode_is_its_own_mode_and_host_lines():
    recs = [_rec("rwkvops", 0.03, mode="decode", B=1, T=1, host_ms=0.02),
            _rec("rwkvops_graph", 0.005, mode="decode", B=1, T=1, host_ms=0.003)]
    md = report.table({"gpu": "G", "records": recs})
    assert _rows(md, "| wkv7 | decode | 1 |") and _rows(md, "| wkv7 | decode+graph | 1 |")
    assert "- wkv7 decode B=1: 0.0200 ms host, 0.0300 ms per call (events)" in md
