"""``g3n-probe``: the torch-free clinical probe panel.

    g3n-probe tasks                          list the panel
    g3n-probe run FEATURES --out DIR         cross-validate every task, save results and probes
    g3n-probe apply --probes DIR --features FEATURES --out DIR
    g3n-probe compare A=PATH B=PATH --out DIR   same panel, identical splits, Table-1 layout
    g3n-probe synth --out DIR                write a synthetic feature table (demo / benchmark)

FEATURES is a g3n-shards ``tokens``/``latents`` set or a feature-table folder
(``features.npz`` + ``metadata.jsonl``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--panel", help="panel YAML (default: the 23-task panel shipped with the package)")
    p.add_argument("--tasks", help="comma-separated task names to run (default: all)")
    p.add_argument("--protocol", help="protocol YAML; its fields override the preset")
    p.add_argument("--preset", default="paper", help="protocol preset: paper (default) or tiny")
    p.add_argument("--threads", type=int, help="BLAS threads (default from the protocol: 2)")
    p.add_argument("--array", default="auto", choices=["auto", "mean", "tokens"], help="tokens sets: which array")
    p.add_argument("--latent-reduce", default="flatten", choices=["flatten", "mean"], help="latents sets: flatten or mean over tokens")
    p.add_argument("--save-fold-probes", action="store_true", help="also save each fold's probe")
    p.add_argument("--no-probes", action="store_true", help="do not fit/save final probes")
    p.add_argument("--permutations", type=int, metavar="N",
                   help="permutation test: cross-validate the --permute slices N more times on labels shuffled between "
                        "subjects, for a p-value beside each score (default from the protocol: 0, no test; 99 gives p >= 0.01)")
    p.add_argument("--permute", metavar="WHICH",
                   help="comma-separated slices for the permutation test: 'headline' (the panel's headline rows; default) "
                        "and/or TASK/SLICE patterns with * and ?, e.g. 'disease/all,idh1/T1c' or '*/*' for every slice")
    p.add_argument("--pca", type=int, metavar="K",
                   help="fit each probe on the top K principal components of the standardised features, the PCA fitted on "
                        "each training part only (a baseline for wide features such as raw voxels)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _protocol(a: argparse.Namespace):
    from .config import load_protocol

    over = {}
    if a.threads:
        over["threads"] = a.threads
    if a.save_fold_probes:
        over["save_fold_probes"] = True
    if a.no_probes:
        over["save_probes"] = False
    if a.permutations is not None:
        over["permutations"] = a.permutations
    if a.pca:
        over["pca"] = a.pca
    if a.permute:
        over["permute"] = [w.strip() for w in a.permute.split(",") if w.strip()]
    return load_protocol(a.protocol, preset=a.preset, **over)


def _panel(a: argparse.Namespace):
    from .config import load_panel

    panel = load_panel(a.panel)
    return panel.subset([t for t in a.tasks.split(",") if t]) if getattr(a, "tasks", None) else panel


def cmd_tasks(a: argparse.Namespace) -> int:
    panel = _panel(a)
    print(f"panel {panel.name} v{panel.version}: {len(panel.tasks)} tasks")
    for t in panel.tasks:
        extra = ""
        if t.classes:
            extra = " classes=" + ",".join(sorted(set(t.classes.values())))
        if t.max_classes:
            extra += f" max_classes={t.max_classes}"
        if t.qualify:
            extra += " qualify=" + ";".join(f"{q.field}" for q in t.qualify)
        print(f"  {t.name:16s} {t.kind:14s} target={t.target:15s} slices={','.join(t.slices)}{extra}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .features import load_features
    from .panel import run_panel
    from .report import write_run

    panel, cfg = _panel(a), _protocol(a)
    fs = load_features(a.features, name=a.name, array=a.array, latent_reduce=a.latent_reduce)
    res = run_panel(fs, panel, cfg, progress=not a.quiet)
    out = write_run(res, a.out)
    print(f"{len(res.results)} task/slice pairs scored, {len(res.skipped)} skipped, {res.seconds:.1f} s -> {out}/results.md")
    return 0


def cmd_apply(a: argparse.Namespace) -> int:
    from .apply import apply_probes, find_probes, recorded_latent_reduce
    from .features import load_features
    from .linear import LinearProbe
    from .rejects import Reject

    dirs = find_probes(a.probes, include_folds=a.include_folds)
    probes = [LinearProbe.load(d) for d in dirs]
    dims = {p.n_features for p in probes}
    reduce = a.latent_reduce or recorded_latent_reduce(probes) or "flatten"
    rejects: list[Reject] = []
    fs = load_features(a.features, array=a.array, latent_reduce=reduce, rejects=rejects,
                       expected_dim=next(iter(dims)) if len(dims) == 1 else None)
    res = apply_probes(dirs, fs, a.out, rejects=rejects, allow_mismatch=a.allow_feature_mismatch, probes=probes)
    # one warning per distinct problem, not per probe: a 23-probe panel would bury it otherwise
    mismatched: dict[str, list[str]] = {}
    notes: dict[str, None] = {}
    for r in res:
        if r.mismatch:
            mismatched.setdefault(r.mismatch, []).append(r.name)
        notes.update(dict.fromkeys(r.notes))
    for what, names in mismatched.items():
        print(f"g3n-probe: warning: {what}; scored anyway (--allow-feature-mismatch) by {len(names)} probe(s): "
              f"{', '.join(names)}", file=sys.stderr)
    for n in notes:
        print(f"g3n-probe: note: {n}", file=sys.stderr)
    for r in res:
        m = ", ".join(f"{k}={v:.3f}" for k, v in r.metrics.items())
        rej = f", {len(r.rejects)} sample(s) rejected by its slice" if r.rejects else ""
        print(f"{r.name}: {len(r.rows)} unit(s) scored{rej}" + (f"; {m} on {r.labelled} labelled" if m else ""))
    by_probe = sum(len(r.rejects) for r in res)
    rejected_samples = len(({x.key for x in rejects} | {x.key for r in res for x in r.rejects}) - {None})
    print(f"scored: {sum(len(r.rows) for r in res)} unit(s) by {len(res)} probe(s) from {len(fs)} usable sample(s); "
          f"rejected: {len(rejects)} bad row(s), {by_probe} slice refusal(s), {rejected_samples} distinct sample(s)"
          f" -> {Path(a.out) / 'rejects.jsonl'}")
    print(f"-> {a.out}/summary.csv")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import run_compare
    from .features import load_features, parse_named
    from .report import write_compare, write_run

    panel, cfg = _panel(a), _protocol(a)
    sets = []
    for spec in a.features:
        name, path = parse_named(spec)
        sets.append(load_features(path, name=name, array=a.array, latent_reduce=a.latent_reduce))
    results = run_compare(sets, panel, cfg, progress=not a.quiet)
    for r in results:
        write_run(r, Path(a.out) / r.feature_name)
    write_compare(results, a.out)
    print(f"compared {', '.join(r.feature_name for r in results)} -> {a.out}/compare.md")
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from .features import write_feature_table
    from .synthetic import SYNTH_PRESETS, SynthConfig, synth_features

    over = {k: v for k, v in {"volumes": a.volumes, "dim": a.dim, "seed": a.seed, "signal": a.signal}.items() if v is not None}
    cfg = SynthConfig(**{**SYNTH_PRESETS[a.preset], **over})
    X, recs = synth_features(cfg)
    keys = [r.pop("key") for r in recs]
    write_feature_table(a.out, X, keys, recs)
    print(f"{X.shape[0]} x {X.shape[1]} synthetic features -> {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="g3n-probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"g3n-probe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log dropped classes and skipped tasks")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("tasks", help="list the tasks of a panel")
    s.add_argument("--panel", help="panel YAML (default: the shipped 23-task panel)")
    s.set_defaults(func=cmd_tasks, tasks=None)

    s = sub.add_parser("run", help="cross-validate the panel on one feature set; save results and probes")
    s.add_argument("features", help="tokens/latents shard set or feature-table folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--name", help="name of the feature set in tables (default: folder name)")
    _common(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "apply", help="score new embeddings with saved probes",
        description="Score new embeddings with saved probes. Rows that cannot be scored (NaN/Inf, wrong width, "
                    "invalid metadata, metadata the probe's slice needs but lacks) are written to OUT/rejects.jsonl "
                    "with their reason; the rest are scored. Features of another kind, latent reduction or "
                    "encoder/tokenizer checkpoint than a probe was trained on (as recorded in its probe.json) are "
                    "refused unless --allow-feature-mismatch is given.")
    s.add_argument("--probes", nargs="+", required=True, help="probe folder(s) or a run folder")
    s.add_argument("--features", required=True, help="tokens/latents shard set or feature-table folder")
    s.add_argument("--out", required=True,
                   help="output folder for per-probe predictions, summary.csv and rejects.jsonl")
    s.add_argument("--include-folds", action="store_true", help="also apply saved fold probes")
    s.add_argument("--array", default="auto", choices=["auto", "mean", "tokens"],
                   help="tokens sets: which array gives the token mean (default auto: mean if stored)")
    s.add_argument("--latent-reduce", default=None, choices=["flatten", "mean"],
                   help="latents sets: flatten or mean over tokens (default: what the probes were trained on, "
                        "else flatten)")
    s.add_argument("--allow-feature-mismatch", action="store_true",
                   help="score even when the features' kind, reduction or encoder checkpoint differs from the "
                        "probe's training features; prints a warning instead of refusing (the width must still match)")
    s.set_defaults(func=cmd_apply)

    s = sub.add_parser("compare", help="run the panel on several feature sets with identical splits")
    s.add_argument("features", nargs="+", help="NAME=PATH (or PATH) per feature set")
    s.add_argument("--out", required=True, help="output folder (compare.md/.csv and one run folder per set)")
    _common(s)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("synth", help="write a synthetic feature table with realistic label coverage")
    s.add_argument("--out", required=True)
    s.add_argument("--preset", default="small", choices=["small", "paper"])
    s.add_argument("--volumes", type=int)
    s.add_argument("--dim", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--signal", type=float)
    s.set_defaults(func=cmd_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import PanelError
    from .features import FeatureSourceError
    from .linear import ProbeFileError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (PanelError, FeatureSourceError, ProbeFileError, KeyError, ValueError) as e:
        print(f"g3n-probe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
