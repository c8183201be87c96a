"""tools/bench/run_all.py reads every benchmark's figures, whatever JSON layout it prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "tools" / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_json_objects_in_mixed_output_and_flat_table():
    ra = _run_all()
    out = ('g3n-mae bench: preset=tiny {not json}\n{"a": 1, "b": {"c": 2.5}}\nsome text\n'
           '{\n  "results": [\n    {"batch": 1, "vol_s": 3.0}\n  ]\n}\n  {"indented": "not at a line start"}\n')
    rows = ra.json_objects(out)
    assert rows == [{"a": 1, "b": {"c": 2.5}}, {"results": [{"batch": 1, "vol_s": 3.0}]}]
    assert ra.flatten(rows[0]) == [("a", 1), ("b.c", 2.5)]
    assert ra.flatten(rows[1]) == [("results[0].batch", 1), ("results[0].vol_s", 3.0)]
    md = ra.to_markdown([{"benchmark": "x", "ok": True, "wall_s": 1.0, "peak_rss_mib": 12.5, "figures": rows, "error": None}])
    assert "| x [0] | b.c | 2.5 |" in md and "| x [1] | results[0].vol_s | 3.0 |" in md
    assert "| x | peak memory of the process (MiB, RSS) | 12.5 |" in md


def test_run_one_reports_figures_and_the_childs_own_peak_memory(tmp_path, monkeypatch):
    ra = _run_all()
    script = tmp_path / "fake.py"
    script.write_text("import json, sys\nblock = bytearray(200 * 1024 * 1024)\nprint(json.dumps({'n': len(sys.argv)}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    r = ra.run_one("fake", quick=False)
    assert r["ok"] and r["figures"] == [{"n": 1}] and r["peak_rss_mib"] >= 200


def test_every_benchmark_is_discovered():
    assert {"shards", "preprocess", "mae", "dit", "probe", "tokenizer", "eval"} <= set(_run_all().discover())
