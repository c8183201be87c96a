"""`g3n-data check`: verify a `volumes` shard set and account for every input.

Checks: the set opens as kind ``volumes`` (kind and schema version known); every shard and sample
as a reader checks them (SHA-256, keys and metadata against the index, members, declared arrays,
payloads: each problem named with its shard and sample, never a traceback); volume shape =
geometry, finite and non-negative voxels. A set with 0 samples (every input rejected) is reported
as such, with its rejects. With ``--worklist``: every input of the work list (and every ingest
reject) ends as a sample or as a line of the set's ``rejects.jsonl`` — nothing lost silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from g3n_shards import Sample, ShardError, ShardSet

from .worklist import read_jsonl, read_worklist


def check_set(path: str | Path, worklist: str | Path | None = None, read_volumes: bool = True) -> dict[str, Any]:
    """Return a report dict with ``ok`` and a list of ``problems`` (each naming the sample or file)."""
    path = Path(path)
    try:
        ss = ShardSet.open(path, kind="volumes")
        metas = ss.metadata()
    except (ShardError, FileNotFoundError) as e:
        return {"ok": False, "problems": [str(e)], "samples": 0}
    geom = ss.manifest.geometry

    def volume_problems(s: Sample) -> None:
        v = s.arrays["volume"]
        if geom.shape is not None and tuple(v.shape) != tuple(geom.shape):
            problems.append(f"{s.key}: shape {v.shape} != geometry {geom.shape}")
        if not np.all(np.isfinite(v)):
            problems.append(f"{s.key}: non-finite voxels")
        if float(v.min()) < 0:
            problems.append(f"{s.key}: negative voxels (min {float(v.min())})")
        if not np.any(v > 0):
            problems.append(f"{s.key}: empty volume")

    problems: list[str] = []
    # every shard and sample as a normal read checks them (SHA-256, index, JSON, members, payloads),
    # each problem reported with its shard and key rather than stopping at the first
    problems += ss.scan(arrays=read_volumes, on_sample=volume_problems if read_volumes else None)
    rejects = read_jsonl(path / "rejects.jsonl")
    for n, r in enumerate(rejects, 1):
        missing = [k for k in ("path", "subject", "step", "reason") if k not in r]
        if missing:
            problems.append(f"rejects.jsonl:{n}: missing fields {missing}")
    report: dict[str, Any] = {
        "samples": len(metas),
        "rejects": len(rejects),
        "rejects_by_step": dict(Counter(r.get("step") for r in rejects)),
        "modalities": dict(Counter(m.modality for m in metas.values())),
        "subjects": len({(m.cohort, m.subject) for m in metas.values()}),
        "geometry": {"shape": geom.shape, "spacing": geom.spacing, "space": geom.space},
        "digest": ss.manifest.digest,
    }
    if worklist is not None:
        items, ingest_rejects = read_worklist(worklist)
        rejected_paths = {r.get("path") for r in rejects}
        rejected_keys = {r.get("key") for r in rejects if r.get("key")}
        lost = [i.key for i in items if i.key not in metas and i.key not in rejected_keys and i.path not in rejected_paths]
        problems += [f"input {k} is neither a sample nor a reject" for k in lost]
        lost_rej = [r.get("path") for r in ingest_rejects if r.get("path") not in rejected_paths]
        problems += [f"ingest reject {p} is missing from rejects.jsonl" for p in lost_rej]
        extra = sorted(set(metas) - {i.key for i in items})
        problems += [f"sample {k} is not in the work list" for k in extra]
        report["inputs"] = len(items) + len(ingest_rejects)
    report["problems"] = problems
    report["ok"] = not problems
    if not metas:
        report["note"] = ("the set holds no samples" + (f": all {len(rejects)} inputs were rejected (rejects.jsonl)"
                                                        if rejects else ""))
    return report


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="verify a volumes shard set (checksums, volumes, accounting)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("shards", help="shard set folder")
    p.add_argument("--worklist", help="the ingest work list: check every input is a sample or a reject")
    p.add_argument("--no-volumes", action="store_true", help="skip reading volumes (checksums and metadata only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    rep = check_set(args.shards, args.worklist, read_volumes=not args.no_volumes)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print(f"{args.shards}: {'OK' if rep['ok'] else 'FAILED'}: {rep.get('samples', 0)} samples, "
              f"{rep.get('rejects', 0)} rejects {rep.get('rejects_by_step', {})}")
        if rep.get("note"):
            print(f"  note: {rep['note']}")
        for pr in rep["problems"]:
            print(f"  problem: {pr}", file=sys.stderr)
    return 0 if rep["ok"] else 1
