"""Benchmark: preprocessing seconds per volume per core at the paper geometry (1 mm, 160x192x160).

Runs the default g3n-data pipeline step by step on real T1 volumes (the 2 mm IXI T1s the demo
ships in g3n-pipeline), one SimpleITK thread (= one core, as a worker process of `g3n-data preprocess` runs),
and reports the seconds of each step: load + checks, N4 (shrink 4), skull strip (ROBEX by
default), affine registration to SRI24 (the notes.md settings), resampling into the output grid +
masking + QC. Cores scale linearly with `--workers` because subjects are independent.

    uv run python tools/bench/preprocess.py [-n 2] [--skullstrip robex|atlas|none] [--preset paper] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from g3n_data.atlas import load_atlas  # noqa: E402
from g3n_data.config import make_config  # noqa: E402
from g3n_data.images import load_volume, to_array  # noqa: E402
from g3n_data.n4 import n4_correct  # noqa: E402
from g3n_data.qc import atlas_correlation  # noqa: E402
from g3n_data.register import affine_to_atlas  # noqa: E402
from g3n_data.skullstrip import mask_volume_ml, native_mask  # noqa: E402

#: the ten IXI T1 volumes the demo ships (the repository's copy, never ../shared)
IXI = Path(__file__).resolve().parents[2] / "packages" / "g3n-pipeline" / "src" / "g3n_pipeline" / "cohort" / "ixi10"


def cpu() -> float:
    """CPU seconds of this process and its finished children (ROBEX runs as a child process).
    CPU time, unlike wall time, does not grow when other jobs share the cores."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2, help="volumes (IXI T1, 2 mm)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--skullstrip", default="robex", choices=["robex", "atlas", "none"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = sorted(IXI.glob("*.nii.gz"))[: args.n]
    if not paths:
        print(f"no input volumes under {IXI}", file=sys.stderr)
        return 1
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    cfg = make_config(args.preset, {"skullstrip": {"method": args.skullstrip}})
    t = time.perf_counter()
    atlas = load_atlas(cfg.atlas, cfg.geometry)
    atlas_s = time.perf_counter() - t
    rows = []
    for p in paths:
        r: dict = {"volume": p.name}
        t0, c0 = time.perf_counter(), cpu()
        t, c = t0, c0

        def lap(name: str) -> None:
            nonlocal t, c
            r[f"{name}_s"], r[f"{name}_cpu_s"] = time.perf_counter() - t, cpu() - c
            t, c = time.perf_counter(), cpu()

        img, _ = load_volume(p)
        lap("load")
        img = n4_correct(img, cfg.n4)
        lap("n4")
        mask = native_mask(img, cfg.skullstrip)
        lap("skullstrip")
        moving, fixed = (sitk.Mask(img, mask), atlas.brain_reg) if mask is not None else (img, atlas.head)
        reg = affine_to_atlas(moving, fixed, cfg.registration, seed=cfg.seed)
        lap("register")
        vol = to_array(sitk.Resample(img, atlas.grid, reg.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        if mask is not None:
            m = to_array(sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), atlas.grid, reg.transform)) >= 0.5
            vol = np.maximum(vol * m, 0)
        r["atlas_correlation"] = round(atlas_correlation(vol, atlas.brain_on_grid, atlas.mask_on_grid), 3)
        lap("resample_qc")
        r["total_s"], r["total_cpu_s"] = time.perf_counter() - t0, cpu() - c0
        if mask is not None:
            r["brain_ml"] = round(mask_volume_ml(mask), 1)
        rows.append(r)
        if not args.json:
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    out = {
        "benchmark": "preprocess",
        "preset": args.preset,
        "shape": list(cfg.geometry.shape),
        "skullstrip": args.skullstrip,
        "volumes": len(rows),
        "threads": 1,
        "atlas_load_s": round(atlas_s, 2),
        "cpu_seconds_per_volume": round(mean["total_cpu_s"], 2),
        "wall_seconds_per_volume": round(mean["total_s"], 2),
        **{f"mean_{k}": round(v, 2) for k, v in mean.items() if not k.startswith("total")},
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
