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
mismatch before and after preprocessing with a message naming both shapes. (g3n-mae's encoder
would otherwise silently interpolate its position embeddings to another grid.)

Every refused input of every stage ends in ``OUT/rejects.jsonl`` with the stage and reason, and
is summarised at the end. Re-running the same command skips finished steps (each step records
a digest of its inputs in ``steps.json`` in OUT's ``work`` folder; the stages are resumable themselves).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import g3n_shards as gs

NIFTI_RE = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
#: BIDS-like suffixes recognised in loose file names (the rest take ``--modality``)
SUFFIX_MODALITY = {"t1w": "T1", "t2w": "T2", "flair": "FLAIR", "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c"}
#: metadata columns of embeddings.csv, in this order, before the embedding columns
TABLE_COLUMNS = ("key", "subject", "session", "modality", "cohort", "site", "age", "sex", "diagnosis",
                 "field_strength", "vendor", "handedness")
STEPS_NAME = "steps.json"


class EmbedError(RuntimeError):
    """The embedding run cannot go on; the message names the input or stage and the reason."""


# ---- the encoder --------------------------------------------------------------------------
@dataclass
class EncoderInfo:
    """What the encoder's weights say about the volumes it expects."""

    weights: Path
    img_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    embed_dim: int
    data_manifests: list[str] = field(default_factory=list)


def encoder_info(path: str | Path) -> EncoderInfo:
    """Read the encoder's geometry from its safetensors metadata (no tensor is loaded, nothing pickled).

    Accepts what ``g3n-mae encode`` accepts: a weights file, an export folder, a checkpoint step
    folder or a run folder. The training data digests come from the weights metadata (exports)
    or the checkpoint's ``state.json`` (run folders).
    """
    from g3n_mae.checkpoint import CheckpointError, resolve_weights
    from safetensors import safe_open

    try:
        w = resolve_weights(path)
    except CheckpointError as e:
        raise EmbedError(f"--encoder: {e}") from None
    try:
        with safe_open(str(w), framework="np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise EmbedError(f"--encoder {w}: not a readable safetensors file: {e}") from None
    if meta.get("format") != "g3n-mae-weights" or "model_config" not in meta:
        raise EmbedError(f"--encoder {w}: not a g3n-mae weights file (metadata format={meta.get('format')!r})")
    mc = json.loads(meta["model_config"])
    manifests: list[str] = []
    try:
        manifests = list(json.loads(meta.get("data_manifests", "[]")))
    except ValueError:
        pass
    state = w.parent / "state.json"
    if not manifests and state.is_file():
        try:
            manifests = list(json.loads(state.read_text()).get("data_manifests") or [])
        except (OSError, ValueError):
            pass
    return EncoderInfo(weights=w, img_size=tuple(mc["img_size"]), patch_size=tuple(mc["patch_size"]),
                       embed_dim=int(mc["embed_dim"]), data_manifests=manifests)


def shipped_encoder(quiet: bool = False) -> Path:
    """The shipped demonstration encoder (g3n-zoo ``mae``), announced with its intended use."""
    import g3n_zoo

    try:
        model = g3n_zoo.get("mae")
    except g3n_zoo.ZooError as e:
        raise EmbedError(f"no --encoder given and no shipped encoder: {e}") from None
    if not quiet:
        print(f"g3n-embed: no --encoder: using the shipped encoder {model.path} ({model.card.get('title', 'g3n-zoo mae')})."
              f"\n  {model.intended_use}", file=sys.stderr)
    return model.path


# ---- the preprocessing config ---------------------------------------------------------------
def preprocess_config(enc: EncoderInfo, preset: str | None, train_volumes: str | None,
                      overrides_file: str | None, skullstrip: str | None, no_n4: bool, no_register: bool,
                      log=print) -> dict[str, Any]:
    """The g3n-data PreprocessConfig (as a dict) the encoder expects, with the site's overrides.

    Source, most exact first: the ``volumes`` set the encoder was trained on (its manifest records
    the producer's full config), else ``--preset``, else the g3n-data preset whose grid equals the
    encoder's. Refuses a grid other than the encoder's.
    """
    from g3n_data.config import PRESETS, PreprocessConfig, make_config

    if train_volumes:
        ss = gs.ShardSet.open(train_volumes, kind="volumes")
        prod = ss.manifest.producer
        if prod.package != "g3n-data" or not prod.config:
            raise EmbedError(f"--train-volumes {train_volumes}: made by {prod.package!r}, records no g3n-data config")
        if not enc.data_manifests:
            log(f"g3n-embed: warning: the encoder records no training shard sets, so {train_volumes} cannot be "
                f"confirmed as its training data; using its preprocessing config")
        elif ss.digest not in enc.data_manifests:
            log(f"g3n-embed: warning: {train_volumes} ({ss.digest[:19]}...) is not among the sets the encoder "
                f"records as its training data; using its preprocessing config anyway")
        base = PreprocessConfig.model_validate(prod.config)
        if preset and base.preset != preset:
            raise EmbedError(f"--preset {preset} contradicts the training set's preset {base.preset!r}")
    else:
        if preset is None:
            matching = [n for n in sorted(PRESETS) if tuple(make_config(n).geometry.shape) == enc.img_size]
            if not matching:
                raise EmbedError(f"--encoder {enc.weights}: expects volumes of {enc.img_size}; no g3n-data preset "
                                 f"makes that grid ({ {n: make_config(n).geometry.shape for n in PRESETS} }); "
                                 f"give --preprocess-config or --train-volumes")
            preset = matching[0]
        base = make_config(preset)
    data = base.model_dump(mode="json")
    if overrides_file:
        try:
            over = yaml.safe_load(Path(overrides_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise EmbedError(f"--preprocess-config {overrides_file}: cannot read: {e}") from None
        if not isinstance(over, dict):
            raise EmbedError(f"--preprocess-config {overrides_file}: must be a mapping")
        over.pop("preset", None)
        data = _deep_update(data, over)
    if skullstrip:
        data["skullstrip"]["method"] = skullstrip
    if no_n4:
        data["n4"]["enabled"] = False
    if no_register:
        data["registration"]["enabled"] = False
    try:
        cfg = PreprocessConfig.model_validate(data)
    except Exception as e:  # noqa: BLE001 - pydantic error, re-raised with the source named
        raise EmbedError(f"invalid preprocessing config: {e}") from None
    check_geometry(tuple(cfg.geometry.shape), tuple(cfg.geometry.patch_size), enc, "the preprocessing config")
    return cfg.model_dump(mode="json")


def check_geometry(shape: tuple[int, ...], patch: tuple[int, ...] | None, enc: EncoderInfo, what: str) -> None:
    """Refuse volumes the encoder was not trained on (grid or patch size differ)."""
    if tuple(shape) != tuple(enc.img_size):
        raise EmbedError(f"{what} gives volumes of {tuple(shape)}, but the encoder {enc.weights} expects "
                         f"{tuple(enc.img_size)}: preprocess with the encoder's preset (or --train-volumes)")
    if patch is not None and tuple(patch) != tuple(enc.patch_size):
        raise EmbedError(f"{what} tiles volumes in {tuple(patch)} patches, the encoder uses {tuple(enc.patch_size)}")


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_stamp(path: str | Path) -> list[Any]:
    p = Path(path)
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _tree_stamp(root: Path) -> list[Any]:
    """Cheap fingerprint of a folder (names, sizes, mtimes) so a changed BIDS folder is re-ingested."""
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()]


class Steps:
    """``steps.json`` in OUT's ``work`` folder: each finished step and the digest of its inputs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def finished(self, name: str, digest: str) -> bool:
        return self.done.get(name) == digest

    def mark(self, name: str, digest: str) -> None:
        self.done[name] = digest
        gs.atomic_write_bytes(self.path, (json.dumps(self.done, indent=1, sort_keys=True) + "\n").encode())


def run_stage(name: str, module: str, args: list[str], logs: Path, env: dict[str, str] | None = None,
              quiet: bool = False) -> None:
    """Run ``python -m module args`` in a fresh interpreter; its output goes to ``logs/name.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    cmd = [sys.executable, "-m", module, *args]
    if not quiet:
        print(f"g3n-embed: {name}: {' '.join(cmd[2:])}", file=sys.stderr)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise EmbedError(f"stage {name} failed (exit {rc}); log {log}:\n{tail}")
    if not quiet:
        print(f"g3n-embed: {name}: done in {time.time() - t0:.1f} s", file=sys.stderr)


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
    work = out / "work"
    logs = work / "logs"
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work / STEPS_NAME)
    skipped: list[str] = []
    enc = encoder_info(args.encoder or shipped_encoder(quiet=args.quiet))
    # refuse a preprocessing the encoder was not trained on before any stage runs
    cfg = preprocess_config(enc, args.preset, args.train_volumes, args.preprocess_config, args.skullstrip,
                            args.no_n4, args.no_register)

    # 1. ingest --------------------------------------------------------------------------------
    inputs = list(args.inputs or [])
    if args.csv and inputs:
        raise EmbedError("give either --csv MANIFEST or a BIDS folder / NIfTI files, not both")
    ingest_dir = work / "ingest"
    passthrough = [a for pair in (("--cohort", args.cohort), ("--site", args.site), ("--mapping", args.mapping))
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
    d_ingest = _sha([kind, source, stamp, passthrough])
    if steps.finished("ingest", d_ingest) and (ingest_dir / "worklist.jsonl").is_file():
        skipped.append("ingest")
    else:
        run_stage("ingest", "g3n_data.cli", ["ingest", kind, source, "--out", str(ingest_dir), *passthrough],
                  logs, quiet=args.quiet)
        steps.mark("ingest", d_ingest)

    # 2. preprocess ----------------------------------------------------------------------------
    cfg_path = work / "preprocess.yaml"
    gs.atomic_write_bytes(cfg_path, yaml.safe_dump(cfg, sort_keys=True).encode())
    volumes = work / "volumes"
    worklist = ingest_dir / "worklist.jsonl"
    d_pre = _sha([hashlib.sha256(worklist.read_bytes()).hexdigest(), cfg])
    if steps.finished("preprocess", d_pre) and (volumes / gs.MANIFEST_NAME).is_file():
        skipped.append("preprocess")
    else:
        run_stage("preprocess", "g3n_data.cli",
                  ["preprocess", str(worklist), "--out", str(volumes), "--config", str(cfg_path),
                   "--workers", str(args.workers), "--no-progress"], logs, quiet=args.quiet)
        steps.mark("preprocess", d_pre)
    vs = gs.ShardSet.open(volumes, kind="volumes")
    geo = vs.manifest.geometry
    check_geometry(tuple(geo.shape or ()), tuple(geo.patch_size) if geo.patch_size else None, enc,
                   f"the preprocessed set {volumes}")

    # 3. encode --------------------------------------------------------------------------------
    tokens = out / "tokens"
    enc_sha = gs.file_sha256(enc.weights)
    d_enc = _sha([vs.digest, enc_sha, args.store])
    if len(vs) == 0:
        raise_after = "no volume survived ingest and preprocessing"
    else:
        raise_after = None
        if steps.finished("encode", d_enc) and (tokens / gs.MANIFEST_NAME).is_file():
            skipped.append("encode")
        else:
            enc_args = ["encode", str(enc.weights), "--volumes", str(volumes), "--out", str(tokens),
                        "--store", args.store, "--batch-size", str(args.batch_size), "--quiet", "--overwrite"]
            if args.device:
                enc_args += ["--device", args.device]
            run_stage("encode", "g3n_mae.cli", enc_args, logs, quiet=args.quiet)
            steps.mark("encode", d_enc)

    # 4. table and rejects ---------------------------------------------------------------------
    rejects = collect_rejects([("ingest", ingest_dir / gs.REJECTS_NAME), ("preprocess", volumes / gs.REJECTS_NAME),
                               ("encode", tokens / gs.REJECTS_NAME)], out / gs.REJECTS_NAME)
    if raise_after:
        raise EmbedError(f"{raise_after}; see {out / gs.REJECTS_NAME} ({sum(rejects.values())} lines)")
    rows, dim = write_tables(tokens, out)
    if dim != enc.embed_dim:
        raise EmbedError(f"{tokens}: features of width {dim}, the encoder's hidden width is {enc.embed_dim}")
    summary = {"rows": rows, "dim": dim, "encoder": str(enc.weights), "encoder_sha256": enc_sha,
               "volumes_digest": vs.digest, "tokens_digest": gs.ShardSet.open(tokens).digest,
               "preprocess_config": str(cfg_path), "rejects": dict(rejects)}
    gs.atomic_write_bytes(out / "embed_summary.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
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
