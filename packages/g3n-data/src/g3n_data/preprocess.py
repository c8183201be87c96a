"""`g3n-data preprocess`: work list -> `volumes` shard set (N4, skull strip, atlas registration, crop/pad).

The Python API is :func:`g3n_data.runner.run_preprocess` (batch) and
:func:`g3n_data.pipeline.process_subject` (one subject); this module is the command line over them.
"""

from __future__ import annotations

import argparse
import sys

from .config import PRESETS, load_config
from .runner import merge_parts, parse_part, run_preprocess


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="N4, skull strip, register to the atlas, crop/pad -> volumes shard set",
        description=(
            "Preprocess an ingest work list into a `volumes` shard set (docs/method.md §1): N4 bias-field "
            "correction, skull stripping, affine registration of T1 to the atlas (T2/FLAIR/T1c rigidly "
            "to their session's T1 and carried through T1's transform), clipping of negative voxels and "
            "crop/pad to the configured grid. Resumable (re-run the same command after a kill), parallel "
            "(--workers) and partitioned for job arrays (--part i/N, then --merge)."
        ),
    )
    p.add_argument("worklist", nargs="?", help="worklist.jsonl from `g3n-data ingest` (or its folder)")
    p.add_argument("--out", required=True, help="output shard set folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: 1 mm 160x192x160; demo: 2 mm 80x96x80 (default: the config's, else paper)")
    p.add_argument("--config", help="YAML/JSON preprocessing config (any field of PreprocessConfig)")
    p.add_argument("--skullstrip", choices=["robex", "hdbet", "atlas", "none"],
                   help="override the stripper (none: inputs already skull-stripped)")
    p.add_argument("--no-n4", action="store_true", help="skip N4 (inputs already bias-corrected)")
    p.add_argument("--no-register", action="store_true", help="skip registration (inputs already in atlas space)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--part", help="process part i of N (by subject), e.g. 3/10 for a job array")
    p.add_argument("--cache", help="per-subject cache folder (default OUT/.g3n-cache); shared by resumed runs")
    p.add_argument("--qc-montage", action="store_true", help="write a QC montage PNG per volume into OUT/qc/")
    p.add_argument("--merge", nargs="+", metavar="PART_DIR", help="merge part shard sets into --out and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.merge:
        s = merge_parts(args.merge, args.out)
        print(s.text())
        return 0
    if not args.worklist:
        print("g3n-data preprocess: a WORKLIST is required (or --merge PART_DIR ...)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.preset)
        upd = {}
        if args.skullstrip:
            upd["skullstrip"] = cfg.skullstrip.model_copy(update={"method": args.skullstrip})
        if args.no_n4:
            upd["n4"] = cfg.n4.model_copy(update={"enabled": False})
        if args.no_register:
            upd["registration"] = cfg.registration.model_copy(update={"enabled": False})
        cfg = cfg.model_copy(update=upd)
        part = parse_part(args.part)
    except ValueError as e:
        print(f"g3n-data preprocess: {e}", file=sys.stderr)
        return 2
    s = run_preprocess(args.worklist, args.out, cfg, workers=args.workers, part=part, cache_dir=args.cache,
                       qc_montage=args.qc_montage or None, progress=not args.no_progress)
    print(s.text())
    return 0
