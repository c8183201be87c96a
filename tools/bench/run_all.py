"""Run every benchmark in tools/bench/ and write one table (Markdown + JSON).

Each benchmark script prints, with ``--json``, one JSON object per line of figures (the last
JSON line of its output is taken). Scripts run one after another in fresh processes so that
peak-memory figures are per benchmark.

    uv run python tools/bench/run_all.py [--out bench-results] [--only shards,probe] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: benchmark -> extra arguments for a quick run (what CI-sized machines finish in minutes)
QUICK_ARGS: dict[str, list[str]] = {"shards": ["-n", "12"], "malloc_env": ["--volumes", "2", "--steps", "1", "--reps", "1"]}


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run_all", "__init__") and not p.stem.startswith("_"))


def json_objects(text: str) -> list[dict]:
    """Every JSON object in a script's output that starts a line, one-line or pretty-printed."""
    dec, rows, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) != -1:
        if start and text[start - 1] != "\n":
            pos = start + 1
            continue
        try:
            obj, end = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        pos = end
    return rows


def run_one(name: str, quick: bool) -> dict:
    script = HERE / f"{name}.py"
    # scripts with a --json switch print compact figures with it; the others print JSON anyway
    flags = ["--json"] if '"--json"' in script.read_text() else []
    cmd = [sys.executable, str(script), *flags, *(QUICK_ARGS.get(name, []) if quick else [])]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        # wait4 gives this child's own resource usage: its peak resident memory, whatever it prints
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak_mib = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    rows = json_objects(stdout)
    return {"benchmark": name, "ok": proc.returncode == 0 and bool(rows), "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak_mib, 1), "figures": rows,
            "error": None if proc.returncode == 0 else stderr.strip().splitlines()[-5:]}


def flatten(obj: object, prefix: str = "") -> list[tuple[str, object]]:
    """Nested figures as dotted keys (lists of records by index), for one table row each."""
    if isinstance(obj, dict):
        out: list[tuple[str, object]] = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = []
        for i, v in enumerate(obj):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, obj)]


def to_markdown(results: list[dict]) -> str:
    lines = ["| benchmark | figure | value |", "|---|---|---|"]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['benchmark']} | FAILED | {' / '.join(r['error'] or ['no figures printed'])} |")
            continue
        for i, fig in enumerate(r["figures"]):
            label = r["benchmark"] if len(r["figures"]) == 1 else f"{r['benchmark']} [{fig.get('name', i)}]"
            for k, v in flatten(fig):
                lines.append(f"| {label} | {k} | {v} |")
        lines.append(f"| {r['benchmark']} | wall time (s) | {r['wall_s']} |")
        lines.append(f"| {r['benchmark']} | peak memory of the process (MiB, RSS) | {r['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results", help="folder for results.md and results.json")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes where a benchmark offers them")
    args = ap.parse_args()
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in wanted]
    results = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        results.append(run_one(name, args.quick))
        print(f"[bench] {name}: {'ok' if results[-1]['ok'] else 'FAILED'} in {results[-1]['wall_s']} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
