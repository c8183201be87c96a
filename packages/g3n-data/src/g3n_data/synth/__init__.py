"""A labelled synthetic cohort built from a real brain template (``g3n-data synth``).

Each volume is the MNI152 2009a template (registered to SRI24) deformed and painted so that
its labels are really in the image: age (ventricles, cortical thinning, several visits years
apart), sex (head/brain size), HC/MCI/AD (hippocampal and temporal atrophy beyond age), PD
(nigral/putaminal signal drop), glioma with IDH1/grade (lesion, enhancing rim, oedema, location),
the four modality contrasts and site effects. SYNTH.md documents the generative model.

Python API::

    from g3n_data.synth import make_config, plan_cohort, render_subject, iter_cohort, write_cohort
    cfg = make_config("demo", subjects=50, seed=1)
    for v in iter_cohort(cfg, workers=2):   # v.key, v.meta (SampleMeta), v.volume, v.truth
        ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import GEOMETRIES, PRESETS, SynthConfig, SynthGeometry, make_config
from .design import SubjectPlan, VisitPlan, plan_cohort
from .render import SynthVolume, render_subject, tissue_maps
from .run import GROUND_TRUTH, count_volumes, iter_cohort, read_ground_truth, write_cohort

__all__ = [
    "GEOMETRIES", "GROUND_TRUTH", "PRESETS", "SubjectPlan", "SynthConfig", "SynthGeometry", "SynthVolume",
    "VisitPlan", "add_command", "count_volumes", "iter_cohort", "load_config", "make_config", "plan_cohort",
    "read_ground_truth", "render_subject", "tissue_maps", "write_cohort",
]  # fmt: skip


def load_config(path: str | Path | None, preset: str | None = None, **overrides: Any) -> SynthConfig:
    """Config from a YAML/JSON file (may name a ``preset``), then explicit overrides (None = keep)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"{p}: cannot read config ({e.strerror})") from None
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as e:  # noqa: BLE001 - parser errors differ by format
            raise ValueError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: config must be a mapping, got {type(data).__name__}")
    name = preset or data.get("preset") or "demo"
    if name not in PRESETS:
        raise ValueError(f"unknown synth geometry/preset {name!r}; choose one of {sorted(PRESETS)}")
    merged = {**PRESETS[name], **{k: v for k, v in data.items() if not (preset and k in ("preset", "geometry"))}}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return SynthConfig.model_validate(merged)


def _handler(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, preset=args.geometry, subjects=args.subjects, seed=args.seed,
                          subject_prefix=args.subject_prefix)
    except ValueError as e:
        print(f"g3n-data synth: {e}", file=sys.stderr)
        return 2
    plans = plan_cohort(cfg)
    n = count_volumes(plans)
    print(f"synth: {cfg.subjects} subjects, {n} volumes, geometry {cfg.geometry.name} {cfg.geometry.shape} "
          f"at {cfg.geometry.spacing} mm, seed {cfg.seed}, {args.workers} worker(s) -> {args.out}")  # fmt: skip
    t0 = time.perf_counter()
    try:
        manifest = write_cohort(cfg, args.out, workers=args.workers, progress=not args.no_progress,
                                overwrite=args.overwrite)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - report any failure as one clear line
        from g3n_shards import ShardError

        if isinstance(e, ShardError):
            print(f"g3n-data synth: {e}", file=sys.stderr)
            return 1
        raise
    dt = time.perf_counter() - t0
    print(f"wrote {manifest.num_samples} volumes in {len(manifest.shards)} shard(s), {dt:.1f} s; "
          f"ground truth in {Path(args.out) / GROUND_TRUTH}")  # fmt: skip
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``g3n-data synth``."""
    p = subparsers.add_parser(
        "synth",
        help="make a labelled synthetic cohort (volumes shard set + ground truth)",
        description="Render a labelled synthetic cohort from the packaged MNI152->SRI24 template and write it "
        "as a volumes shard set with ground_truth.jsonl. Deterministic in (config, seed) for any --workers. "
        "See packages/g3n-data/SYNTH.md for the generative model.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (a volumes shard set)")
    p.add_argument("--subjects", type=int, default=None, help="number of subjects (default 100)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 2025)")
    p.add_argument("--subject-prefix", default=None, metavar="PREFIX",
                   help="subject IDs are PREFIX00000, PREFIX00001, ... (default syn); give a second cohort of another "
                        "seed its own, so the two can be merged")
    p.add_argument("--geometry", choices=sorted(PRESETS), default=None,
                   help="demo: 80x96x80 at 2 mm; paper: 160x192x160 at 1 mm; tiny: 40x48x40 at 4 mm (default demo)")
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON SynthConfig (flags override it)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_handler)
