"""Benchmark: the full 23-task probe panel at paper scale on 2 CPU cores (not a timed test).

Generates 35,000 x 1152 synthetic features with realistic label coverage (g3n_probe.synthetic:
18-cohort mix, sparse tumour/cognitive labels), runs the default panel with the paper
protocol (5-fold grouped CV, seed 2025, logistic max_iter 1000, ridge with inner CV), writes
every output, and reports wall time and peak memory. Target: <= 5 minutes on 2 cores. On a shared
machine wall time is inflated by other load, so CPU time and the load average are reported too
(CPU seconds / cores = the wall time 2 idle cores would need at perfect parallel efficiency).

    uv run python tools/bench/probe.py --out runs/probe-bench            # 2 cores, full scale
    uv run python tools/bench/probe.py --volumes 5000 --dim 256          # quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, not inflated by other load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=35_000)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--cores", type=int, default=2, help="pin the process to this many cores (Linux) and use them")
    p.add_argument("--tasks", help="comma-separated subset of the panel (default: all 23)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "g3n-probe-bench"),
                   help="where the run's outputs go (default: g3n-probe-bench in the temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--ridge-inner-cv", default="folds",
                   help="how the ridge penalty is chosen: folds (default), gcv, or an int k (grouped inner k-fold)")
    a = p.parse_args(argv)

    pinned = None
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[: a.cores]
        os.sched_setaffinity(0, cpus)
        pinned = cpus
    # BLAS threads are capped per fit by the protocol; keep library defaults from spawning more.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(a.cores))

    from g3n_probe import load_panel, protocol_preset, run_panel, write_run
    from g3n_probe.features import from_arrays
    from g3n_probe.synthetic import SynthConfig, synth_features

    t0 = time.perf_counter()
    X, records = synth_features(SynthConfig(volumes=a.volumes, dim=a.dim, seed=a.seed))
    t_gen = time.perf_counter() - t0
    fs = from_arrays(X, records, name="synthetic")
    panel = load_panel().subset([t for t in (a.tasks or "").split(",") if t])
    inner = int(a.ridge_inner_cv) if a.ridge_inner_cv.isdigit() else a.ridge_inner_cv
    cfg = protocol_preset("paper", threads=1, n_jobs=a.cores, dtype=a.dtype, ridge_inner_cv=inner)
    rss_before = peak_rss_mib()
    load_before = os.getloadavg()
    cpu0 = cpu_seconds()
    t1 = time.perf_counter()
    res = run_panel(fs, panel, cfg, progress=True)
    t_panel = time.perf_counter() - t1
    t2 = time.perf_counter()
    write_run(res, a.out)
    t_write = time.perf_counter() - t2
    cpu_run = cpu_seconds() - cpu0
    slowest = sorted(((r.seconds, f"{r.task}/{r.slice}") for r in res.results), reverse=True)[:8]
    report = {
        "volumes": int(X.shape[0]),
        "dim": int(X.shape[1]),
        "subjects": len({(r["cohort"], r["subject"]) for r in records}),
        "tasks": len(panel.tasks),
        "scored_task_slices": len(res.results),
        "skipped_task_slices": len(res.skipped),
        "cores": a.cores,
        "pinned_cpus": pinned,
        "protocol": cfg.model_dump(mode="json"),
        "generate_s": round(t_gen, 1),
        "panel_s": round(t_panel, 1),
        "write_s": round(t_write, 1),
        "panel_and_write_cpu_s": round(cpu_run, 1),
        "idle_2core_estimate_s": round(cpu_run / a.cores, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "target_s": 300,
        "within_target": t_panel + t_write <= 300,
        "peak_rss_mib_after_generation": round(rss_before, 0),
        "peak_rss_mib": round(peak_rss_mib(), 0),
        "slowest": [{"task_slice": n, "s": round(s, 1)} for s, n in slowest],
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    headline = {(r.task, r.slice): r for r in res.results}
    for h in panel.headline:
        r = headline.get((h.task, h.slice))
        if r is not None:
            m, sd, n = r.summary(h.metric)
            print(f"{h.task:14s} {h.slice:6s} {h.metric:4s} {m:.3f} ± {sd:.3f} ({n} folds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
