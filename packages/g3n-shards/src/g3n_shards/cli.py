"""`g3n-shards`: inspect, verify and list shard sets from the command line.

Exit status: 0 fine, 1 a verification failed (the message names the shard), 2 the set could
not be opened at all (not a set, unknown kind or version, corrupt manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from .errors import ShardError
from .reader import ShardSet
from .writer import VOCAB_FIELDS

NUMERIC_FIELDS = ("age", "cdr", "mmse", "moca", "education", "gds", "updrs3", "scopa_aut")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary(ss: ShardSet) -> dict:
    """Everything `inspect` prints, as a dict (also the --json output)."""
    m = ss.manifest
    metas = list(ss.metadata().values())
    labels = {}
    for f in VOCAB_FIELDS + ("synthetic",):
        c = Counter(getattr(x, f) for x in metas)
        if set(c) != {None}:
            labels[f] = {("(missing)" if k is None else str(k)): v for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))}
    numeric = {}
    for f in NUMERIC_FIELDS:
        vals = np.array([getattr(x, f) for x in metas if getattr(x, f) is not None], dtype=float)
        if vals.size:
            numeric[f] = {"n": int(vals.size), "missing": len(metas) - int(vals.size), "min": float(vals.min()),
                          "mean": round(float(vals.mean()), 3), "max": float(vals.max())}
    return {
        "location": ss.location, "kind": m.kind, "schema_version": m.schema_version, "digest": m.digest,
        "producer": m.producer.model_dump(exclude={"config"}), "parents": [p.model_dump() for p in m.parents],
        "geometry": m.geometry.model_dump(exclude_none=True), "arrays": {k: v.model_dump() for k, v in m.arrays.items()},
        "models": {r: getattr(m, r).model_dump(exclude={"config"}) for r in ("encoder", "tokenizer", "generator") if getattr(m, r)},
        "samples": m.num_samples, "subjects": len({x.subject for x in metas}), "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards), "labels": labels, "numeric": numeric,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    ss = ShardSet.open(args.path)
    s = summary(ss)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    print(f"{s['location']}: {s['kind']} v{s['schema_version']}  {s['samples']} samples, {s['subjects']} subjects, "
          f"{s['shards']} shards, {_human(s['bytes'])}")
    print(f"  digest    {s['digest']}")
    p = s["producer"]
    print(f"  producer  {p['package']} {p['version']} (config {p['config_digest'][:19]}...)")
    for parent in s["parents"]:
        print(f"  parent    {parent['kind']} {parent['digest']}" + (f" ({parent['path']})" if parent.get("path") else ""))
    for role, ref in s["models"].items():
        print(f"  {role:<9} {ref['name']} {ref.get('checkpoint_digest') or ''}")
    print(f"  geometry  {s['geometry']}")
    for name, a in s["arrays"].items():
        print(f"  array     {name}: {'/'.join(a['dtypes'])} {a['shape']}")
    for f, counts in s["labels"].items():
        print(f"  {f:<14}" + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    for f, st in s["numeric"].items():
        print(f"  {f:<14}n={st['n']} missing={st['missing']} min={st['min']:g} mean={st['mean']:g} max={st['max']:g}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ss = ShardSet.open(args.path)
    try:
        names = ss.verify(progress=not args.quiet)
    except ShardError as e:
        print(f"FAILED {e}", file=sys.stderr)
        return 1
    print(f"OK {ss.location}: {len(names)} shards, {len(ss)} samples: SHA-256, counts, index and every sample "
          f"check out ({ss.digest})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    ss = ShardSet.open(args.path)
    if not args.samples:
        for s in ss.manifest.shards:
            print(f"{s.name}\t{s.samples}\t{s.bytes}\t{s.sha256[:16]}")
        return 0
    filters = {}
    for cond in args.where or []:
        if "=" not in cond:
            raise SystemExit(f"--where expects FIELD=VALUE, got {cond!r}")
        k, v = cond.split("=", 1)
        filters[k] = v
    metas = ss.metadata()
    keys = ss.select(lambda m: all(str(getattr(m, k)) == v for k, v in filters.items()) if filters else True)
    shard_of = {row["key"]: row["shard"] for row in ss._index}
    for k in keys:
        m = metas[k]
        print(f"{k}\t{shard_of[k]}\t{m.subject}\t{m.session or '-'}\t{m.modality}\t{m.diagnosis or '-'}\t"
              f"{'-' if m.age is None else f'{m.age:g}'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_shard_sets

    m = merge_shard_sets(args.inputs, args.out, overwrite=args.overwrite)
    print(f"merged {len(args.inputs)} sets into {args.out}: {m.num_samples} samples, {len(m.shards)} shards ({m.digest})")
    return 0


def cmd_subset(args: argparse.Namespace) -> int:
    from .merge import subset_shard_set

    text = open(args.keys, encoding="utf-8").read()
    keys = json.loads(text) if text.lstrip().startswith("[") else [k.strip() for k in text.splitlines() if k.strip()]
    m = subset_shard_set(args.source, keys, args.out, overwrite=args.overwrite)
    print(f"wrote {m.num_samples} samples of {args.source} to {args.out} ({m.digest})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g3n-shards", description="Inspect, verify and list BrainG3N shard sets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="manifest summary and counts per label",
                       description="Print a set's kind, version, digest, producer, parents, geometry and label counts.")
    p.add_argument("path", help="shard set folder (or URL prefix)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", help="check every shard and sample as a normal read does, reporting every problem",
                       description="Re-hash every shard, cross-check its samples with the index (keys, metadata) and "
                                   "decode every sample with all of a reader's checks; exit 1 listing each problem "
                                   "(shard, sample key, reason).")
    p.add_argument("path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("ls", help="list shards, or samples with --samples",
                       description="List shards (name, samples, bytes, sha256 prefix) or samples (key, shard, subject, ...).")
    p.add_argument("path")
    p.add_argument("--samples", action="store_true", help="list samples instead of shards")
    p.add_argument("--where", action="append", metavar="FIELD=VALUE", help="filter samples (repeatable), e.g. modality=T1")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("merge", help="merge sets of one kind (e.g. job-array parts) into one, sorted by key",
                       description="Write the union of INPUT sets to OUT in key order; kind, geometry and models must agree.")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in OUT")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("subset", help="copy the samples whose keys are listed into a new set",
                       description="Write the samples of SOURCE whose keys are in KEYS (one per line, or a JSON list) to OUT.")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--keys", required=True, help="file with one key per line, or a JSON list of keys")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in OUT")
    p.set_defaults(func=cmd_subset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
