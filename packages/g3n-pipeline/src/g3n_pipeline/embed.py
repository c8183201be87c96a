"""``g3n-embed``: one call from a site's MRI to an embeddings table (issue #9, part 3).

    g3n-embed --encoder ENCODER (BIDS_DIR | NIFTI ... | --csv MANIFEST) --out OUT
              [--preset paper|demo] [--skullstrip robex|atlas|none|hdbet] [--no-n4] [--no-register]
              [--workers N] [--device cpu|cuda]

The chain is the stages' own command lines, each in a fresh interpreter (exactly what a team
runs by hand; a crash names the stage and its log):

1. ``g3n-data ingest``   BIDS folder, CSV manifest, or loose NIfTI files (through a generated
   CSV manifest: subject from the file name, modality from ``--modality``) -> work list;
2. ``g3n-data preprocess`` with the preprocessing config the encoder expects -> ``volumes`` set;
3. ``g3n-mae encode --store mean`` -> ``tokens`` set (kept in ``OUT/tokens``);
4. the table: ``OUT/embeddings.csv`` (one row per volume: key, subject, session, modality,
   metadata, then ``e0 .. e{D-1}``) and the g3n-probe feature table ``OUT/features.npz`` (keys,
   float32 features) + ``OUT/metadata.jsonl``, so ``g3n-probe run OUT`` works on it.

Why the preprocessing must match: the encoder only ever saw volumes of one geometry (shape,
spacing, atlas box). Its weights record the volume shape and patch size (not the spacing), so
``g3n-embed`` picks the g3n-data preset whose grid equals the encoder's, or takes the exact
config from the ``volumes`` set the encoder was trained on (``--train-volumes``), and refuses a
mismatch before and after preprocessing with a message naming both shapes (``embed_encoder.py``).
(g3n-mae's encoder would otherwise silently interpolate its position embeddings to another grid.)

Every refused input of every stage ends in ``OUT/rejects.jsonl`` with the stage and reason, and
is summarised at the end. The steps run on g3n-pipeline's stage runner (``runner.py``, the
demo's): re-running the same command skips a finished step while its commands, its inputs (the
input files' names, sizes and modification times; the preprocessing config; the encoder's
weights), the installed package versions and its outputs hold, and a step run again starts over,
with every step after it. Markers are in ``OUT/work/.stages``, logs in ``OUT/work/logs``; the
preprocessing cache (``OUT/work/preprocess-cache``, keyed on each input and the config)
survives a start-over, so only new or changed inputs are preprocessed again.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import g3n_shards as gs

from .embed_encoder import EmbedError, EncoderInfo, check_geometry, encoder_info, preprocess_config, shipped_encoder
from .runner import Stage, StageFailed, run_stage, run_stages

__all__ = ["TABLE_COLUMNS", "EmbedError", "EmbedResult", "EncoderInfo", "build_parser", "check_geometry",
           "collect_rejects", "embed_stages", "encoder_info", "ingest_source", "main", "preprocess_config",
           "run_embed", "shipped_encoder", "subject_from_filename", "write_nifti_manifest", "write_tables"]

NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
#: BIDS-like suffixes recognised in loose file names (the rest take ``--modality``)
SUFFIX_MODALITY = {"t1w": "T1", "t2w": "T2", "flair": "FLAIR", "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c"}
#: metadata columns of embeddings.csv, in this order, before the embedding columns
TABLE_COLUMNS = ("key", "subject", "session", "modality", "cohort", "site", "age", "sex", "diagnosis",
                 "field_strength", "vendor", "handedness")


# ---- inputs ---------------------------------------------------------------------------------
def subject_from_filename(path: str | Path) -> tuple[str, str | None, str | None]:
    """(subject, session, modality or None) from a NIfTI file name.

    BIDS-like names (``sub-01_ses-2_T1w.nii.gz``) give their entities; other names give their
    stem with characters SampleMeta refuses replaced by ``-`` (``IXI012-HH-1211-T1_ds``).
    """
    stem = NIFTI_RE.sub("", Path(path).name)
    parts = stem.split("_")
    ents = dict(p.split("-", 1) for p in parts if "-" in p and p.split("-", 1)[0] in ("sub", "ses"))
    modality = SUFFIX_MODALITY.get(parts[-1].lower())
    if "sub" in ents:
        return f"sub-{ents['sub']}", (f"ses-{ents['ses']}" if "ses" in ents else None), modality
    subject = re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-_.+") or "subject"
    return subject, None, modality


def write_nifti_manifest(files: list[str], out: Path, modality: str) -> Path:
    """A CSV manifest for loose NIfTI files (path, subject, session, modality), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "subject", "session", "modality"])
    for f in files:
        sub, ses, mod = subject_from_filename(f)
        w.writerow([str(Path(f).resolve()), sub, ses or "", mod or modality])
    gs.atomic_write_bytes(out, buf.getvalue().encode())
    return out


# ---- steps ----------------------------------------------------------------------------------
def _file_stamp(path: str | Path) -> list[Any]:
    p = Path(path)
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _tree_stamp(root: Path) -> list[Any]:
    """Cheap fingerprint of a folder (names, sizes, mtimes) so a changed BIDS folder is re-ingested."""
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()]


def ingest_source(args: argparse.Namespace, work: Path) -> tuple[list[str], Any]:
    """The ``g3n-data ingest`` arguments for the inputs, and a stamp of them (what a re-run compares).

    Loose NIfTI files go through a generated CSV manifest (``work/inputs.csv``). Paths are made
    absolute: the stages run in the output folder."""
    inputs = list(args.inputs or [])
    if args.csv and inputs:
        raise EmbedError("give either --csv MANIFEST or a BIDS folder / NIfTI files, not both")
    passthrough = [a for pair in (("--cohort", args.cohort), ("--site", args.site),
                                  ("--mapping", args.mapping and str(Path(args.mapping).resolve())))
                   if pair[1] for a in pair]
    if args.csv:
        kind, source, stamp = "csv", str(Path(args.csv).resolve()), _file_stamp(args.csv)
    elif len(inputs) == 1 and Path(inputs[0]).is_dir():
        kind, source, stamp = "bids", str(Path(inputs[0]).resolve()), _tree_stamp(Path(inputs[0]))
    elif inputs:
        missing = [f for f in inputs if not Path(f).is_file()]
        if missing:
            raise EmbedError(f"no such file(s): {missing[:5]}")
        bad = [f for f in inputs if not NIFTI_RE.search(f)]
        if bad:
            raise EmbedError(f"not NIfTI files (.nii / .nii.gz): {bad[:5]}; pass a BIDS folder, NIfTI files or --csv")
        kind, source = "csv", str(work / "inputs.csv")
        stamp = [_file_stamp(f) for f in inputs] + [args.modality]
        write_nifti_manifest(inputs, Path(source), args.modality)
        if not args.cohort:
            passthrough += ["--cohort", "nifti"]
    else:
        raise EmbedError("no input: give a BIDS folder, NIfTI files, or --csv MANIFEST")
    return [kind, source, *passthrough], stamp


def embed_stages(args: argparse.Namespace, run: Path, ingest_args: list[str], weights: Path) -> list[Stage]:
    """ingest, preprocess, encode in the output folder ``run``: each owns its output folder (the runner
    removes it to start over). Their setting files (``work/ingest-source.json``, ``work/preprocess.yaml``)
    are written before."""
    work, tokens = run / "work", run / "tokens"
    ingest, volumes = work / "ingest", work / "volumes"

    def rel(p: Path) -> str:  # the runner's paths are relative to the run folder
        return p.relative_to(run).as_posix()

    enc_args = ["--store", args.store, "--batch-size", str(args.batch_size), "--quiet", "--overwrite",
                *(["--device", args.device] if args.device else [])]
    return [
        Stage("ingest", "ingest (g3n-data ingest)", [rel(ingest)], owns=[rel(ingest)],
              inputs=[rel(work / "ingest-source.json")], commands=lambda r: [
                  ["g3n_data.cli", "ingest", *ingest_args[:2], "--out", str(ingest), *ingest_args[2:]]]),
        Stage("preprocess", "the encoder's preprocessing (g3n-data preprocess)", [rel(volumes)], owns=[rel(volumes)],
              inputs=[rel(work / "preprocess.yaml")], commands=lambda r: [
                  ["g3n_data.cli", "preprocess", str(ingest / "worklist.jsonl"), "--out", str(volumes), "--config",
                   str(work / "preprocess.yaml"), "--workers", str(args.workers), "--no-progress",
                   "--cache", str(work / "preprocess-cache")]]),
        Stage("encode", "encode every volume (g3n-mae encode)", [rel(tokens)], owns=[rel(tokens)], external=[weights],
              commands=lambda r: [
                  ["g3n_mae.cli", "encode", str(weights), "--volumes", str(volumes), "--out", str(tokens), *enc_args]]),
    ]


# ---- the table ------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def write_tables(tokens: Path, out: Path) -> tuple[int, int]:
    """embeddings.csv + the g3n-probe feature table (features.npz, metadata.jsonl) from a tokens set.

    Returns (rows, dimension). Rows are in key order, like g3n-probe's feature sets.
    """
    from g3n_probe import load_features, write_feature_table

    # read through g3n-probe: the token mean exactly as `g3n-probe run TOKENS` sees it, and the
    # feature source (kind, encoder checkpoint) that lets `g3n-probe apply` check this table
    ss = gs.ShardSet.open(tokens, kind="tokens")
    if len(ss) == 0:  # every input rejected: empty tables, still readable
        dim = int(ss.manifest.geometry.channels or 0)
        keys, records, X, source = [], [], np.zeros((0, dim), np.float32), None
    else:
        fs = load_features(tokens)
        keys, records, X, source = list(fs.keys), [dict(r) for r in fs.records], np.asarray(fs.X, np.float32), fs.source
        dim = int(X.shape[1])
    write_feature_table(out, X, keys, records, source=source)
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow([*TABLE_COLUMNS, *(f"e{i}" for i in range(dim))])
    for rec, v in zip(records, X):
        w.writerow([_fmt(rec.get(c)) for c in TABLE_COLUMNS] + [repr(float(x)) for x in v])
    gs.atomic_write_bytes(out / "embeddings.csv", text.getvalue().encode())
    return len(keys), dim


def collect_rejects(sources: list[tuple[str, Path]], out: Path) -> Counter:
    """Merge the stages' rejects.jsonl files into ``out`` (each line once, tagged with its stage)."""
    seen, lines = set(), []
    for stage, path in sources:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            ident = json.dumps(rec, sort_keys=True, default=str)
            if ident in seen:  # preprocess copies the ingest rejects into its own file
                continue
            seen.add(ident)
            rec.setdefault("stage", stage)
            lines.append(rec)
    gs.atomic_write_bytes(out, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in lines).encode())
    return Counter(f"{r.get('step', r['stage'])}: {str(r.get('reason', ''))[:90]}" for r in lines)


# ---- driver ---------------------------------------------------------------------------------
@dataclass
class EmbedResult:
    out: Path
    rows: int
    dim: int
    rejects: Counter
    skipped: list[str]

    def text(self) -> str:
        lines = [f"g3n-embed: {self.rows} volumes embedded ({self.dim}-vectors) -> {self.out / 'embeddings.csv'}",
                 f"  feature table for g3n-probe: {self.out} (features.npz + metadata.jsonl); tokens set: {self.out / 'tokens'}",
                 f"  rejects: {sum(self.rejects.values())} -> {self.out / 'rejects.jsonl'}"]
        lines += [f"    {n} x {k}" for k, n in sorted(self.rejects.items())]
        if self.skipped:
            lines.append(f"  steps already done (skipped): {', '.join(self.skipped)}")
        return "\n".join(lines)


def run_embed(args: argparse.Namespace) -> EmbedResult:
    """The whole chain; see the module docstring. Raises EmbedError with a clear message."""
    out = Path(args.out)
    run = out.resolve()
    work = run / "work"
    work.mkdir(parents=True, exist_ok=True)
    enc = encoder_info(args.encoder or shipped_encoder(quiet=args.quiet))
    # refuse a preprocessing the encoder was not trained on before any stage runs
    cfg = preprocess_config(enc, args.preset, args.train_volumes, args.preprocess_config, args.skullstrip,
                            args.no_n4, args.no_register)
    ingest_args, stamp = ingest_source(args, work)
    gs.atomic_write_bytes(work / "ingest-source.json", (json.dumps(stamp, indent=1) + "\n").encode())
    cfg_path = work / "preprocess.yaml"
    gs.atomic_write_bytes(cfg_path, yaml.safe_dump(cfg, sort_keys=True).encode())
    tokens, volumes = run / "tokens", work / "volumes"
    stages = embed_stages(args, run, ingest_args, enc.weights.resolve())
    say = None if args.quiet else (lambda s: print(f"g3n-embed: {s}", file=sys.stderr, flush=True))
    opts = dict(say=say, tee=False, state_dir=work / ".stages", log_dir=work / "logs")
    try:
        ran = run_stages(run, stages[:2], **opts)  # ingest, preprocess
        vs = gs.ShardSet.open(volumes, kind="volumes")
        geo = vs.manifest.geometry
        check_geometry(tuple(geo.shape or ()), tuple(geo.patch_size) if geo.patch_size else None, enc,
                       f"the preprocessed set {volumes}")
        if len(vs):
            if run_stage(run, stages[2], 3, 3, force=bool(ran), **opts) > 0:
                ran.append("encode")
    except StageFailed as e:
        raise EmbedError(str(e)) from None
    skipped = [st.name for st in stages[: 3 if len(vs) else 2] if st.name not in ran]

    # the table and rejects
    rejects = collect_rejects([("ingest", work / "ingest" / gs.REJECTS_NAME), ("preprocess", volumes / gs.REJECTS_NAME),
                               ("encode", tokens / gs.REJECTS_NAME)], run / gs.REJECTS_NAME)
    if not len(vs):
        raise EmbedError(f"no volume survived ingest and preprocessing; see {out / gs.REJECTS_NAME} "
                         f"({sum(rejects.values())} lines)")
    rows, dim = write_tables(tokens, run)
    if dim != enc.embed_dim:
        raise EmbedError(f"{tokens}: features of width {dim}, the encoder's hidden width is {enc.embed_dim}")
    summary = {"rows": rows, "dim": dim, "encoder": str(enc.weights), "encoder_sha256": gs.file_sha256(enc.weights),
               "volumes_digest": vs.digest, "tokens_digest": gs.ShardSet.open(tokens).digest,
               "preprocess_config": str(cfg_path), "rejects": dict(rejects)}
    gs.atomic_write_bytes(run / "embed_summary.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    return EmbedResult(out, rows, dim, rejects, skipped)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="g3n-embed",
        description="MRI in (a BIDS folder, NIfTI files or a CSV manifest), the training preprocessing, a g3n-mae "
                    "encoder, and an embeddings table out: OUT/embeddings.csv (one row per volume: subject, session, "
                    "modality, metadata, e0..e{D-1}), OUT/features.npz + OUT/metadata.jsonl (run `g3n-probe run OUT`), "
                    "the tokens set OUT/tokens and OUT/rejects.jsonl. Re-run the same command to resume.")
    p.add_argument("inputs", nargs="*", metavar="BIDS_DIR | NIFTI", help="a BIDS folder, or NIfTI files")
    p.add_argument("--csv", help="CSV/TSV manifest: a path column plus metadata columns (see g3n-data ingest)")
    p.add_argument("--encoder", help="g3n-mae weights file, export folder, checkpoint or run folder (default: the "
                   "shipped demonstration encoder, g3n-zoo's mae: 80x96x80 at 2 mm, not for clinical use)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", choices=["paper", "demo"],
                   help="g3n-data preprocessing preset (default: the one whose grid matches the encoder)")
    p.add_argument("--train-volumes", help="the volumes set the encoder was trained on: use its exact preprocessing config")
    p.add_argument("--preprocess-config", help="YAML with PreprocessConfig fields over the preset (e.g. faster settings)")
    p.add_argument("--skullstrip", choices=["robex", "atlas", "none", "hdbet"],
                   help="override the skull stripper (none: inputs already skull-stripped)")
    p.add_argument("--no-n4", action="store_true", help="skip N4 (inputs already bias-corrected)")
    p.add_argument("--no-register", action="store_true", help="skip registration (inputs already in atlas space)")
    p.add_argument("--modality", default="T1", choices=sorted(gs.MODALITIES),
                   help="modality of loose NIfTI files whose name does not say (default T1)")
    p.add_argument("--cohort", help="cohort name recorded in the metadata")
    p.add_argument("--site", help="site recorded for every image without a site column")
    p.add_argument("--mapping", help="g3n-data column mapping YAML for the metadata tables")
    p.add_argument("--workers", type=int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="encoder device (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=2, help="volumes per encoder forward pass")
    p.add_argument("--store", choices=["mean", "both"], default="mean",
                   help="what the tokens set keeps: the mean vector, or also the token grid")
    p.add_argument("--quiet", action="store_true", help="only the final summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run_embed(args)
    except (EmbedError, gs.ShardError, FileNotFoundError, ValueError) as e:
        print(f"g3n-embed: {e}", file=sys.stderr)
        return 2
    print(res.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
