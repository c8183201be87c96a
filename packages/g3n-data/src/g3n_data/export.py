"""`g3n-data export-nifti`: the volumes of any `volumes` shard set as NIfTI files.

Preprocessed, reconstructed, generated, edited: every stage's volumes are a `volumes` set, and
this writes one ``<key>.nii.gz`` per sample (float32, the set's atlas affine from its manifest)
plus ``index.csv`` (one row per file: key, file, subject, session, modality, diagnosis, age,
sex, synthetic, and the generation request of a synthetic sample as JSON) and ``export.json``
(the set's location, kind and manifest digest, the affine). Open the files in ITK-SNAP,
FSLeyes, 3D Slicer or MRIcroGL, or read them with nibabel.

The affine is ``geometry.affine`` of the set's manifest, voxel (x, y, z) to world in RAS+ mm,
the convention nibabel and the NIfTI sform use: it is written unchanged, as sform and qform
(code 1, units mm), exactly as ``g3n-tokenizer decode --format nifti`` writes it, so both give
identical headers for the same geometry. A set whose manifest records no affine is refused.

Every file is written atomically (a temporary file beside it, then a rename). An output folder
that already holds any file this export would write (a ``<key>.nii.gz``, ``index.csv`` or
``export.json``) is refused before anything is written, unless ``--overwrite`` is given; then
those files are replaced and ``index.csv`` lists the files of this export only (other files in
the folder are left alone).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.csv"
INFO_NAME = "export.json"
INDEX_COLUMNS = ("key", "file", "subject", "session", "modality", "diagnosis", "age", "sex", "synthetic", "request")
#: gzip level of the .nii.gz files: nibabel's own default, so files are like the ones it saves
GZIP_LEVEL = 1


class ExportError(ValueError):
    """The set cannot be exported as asked (no affine, unknown key or field, files in the way)."""


def set_affine(ss: Any) -> np.ndarray:
    """The 4x4 voxel-to-world (RAS) affine a set's manifest records; refuses a set without one."""
    aff = ss.manifest.geometry.affine
    if aff is None:
        raise ExportError(f"{ss.location}: its manifest records no affine (geometry.affine), so its volumes cannot be "
                          f"placed in world space; export a set written by a stage that records the atlas geometry "
                          f"(g3n-data preprocess/synth, or a set made from one)")
    a = np.asarray(aff, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ExportError(f"{ss.location}: the manifest's affine is not a usable 4x4 voxel-to-world matrix: {aff}")
    return a


def nifti_image(volume: np.ndarray, affine: np.ndarray) -> Any:
    """The NIfTI image of one volume: float32, the affine as sform and qform (code 1), units mm
    (the header g3n-tokenizer's ``write_nifti`` writes)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def nifti_gz_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    """A ``.nii.gz`` file's bytes; deterministic (no time stamp in the gzip header)."""
    return gzip.compress(nifti_image(volume, affine).to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def _matches(meta: Any, field: str, want: str) -> bool:
    have = getattr(meta, field)
    if have is None:
        return want.lower() in ("", "none", "null")
    if isinstance(have, bool):
        return want.lower() in (("true", "yes", "1") if have else ("false", "no", "0"))
    if isinstance(have, (int, float)):
        try:
            return float(want) == float(have)
        except ValueError:
            return False
    return str(have) == want


def parse_where(conds: Sequence[str]) -> dict[str, str]:
    """``["diagnosis=AD", "modality=T1"]`` -> {field: value}; fields are SampleMeta's."""
    from g3n_shards import SampleMeta

    out: dict[str, str] = {}
    for c in conds:
        field, eq, value = c.partition("=")
        field = field.strip()
        if not eq or not field:
            raise ExportError(f"--where expects FIELD=VALUE, got {c!r}")
        if field not in SampleMeta.model_fields or field in ("extra", "request"):
            known = ", ".join(f for f in SampleMeta.model_fields if f not in ("extra", "request"))
            raise ExportError(f"--where {c!r}: unknown metadata field {field!r} (known: {known})")
        out[field] = value.strip()
    return out


def select_keys(ss: Any, keys: Sequence[str] | None = None, where: dict[str, str] | None = None,
                limit: int | None = None) -> list[str]:
    """The keys to export, in key order: the given keys (all must exist) or every key, those whose
    metadata match every ``where`` condition, the first ``limit`` of them."""
    metas = ss.metadata()
    if keys:
        missing = [k for k in keys if k not in metas]
        if missing:
            raise ExportError(f"{ss.location}: no sample with key(s) {', '.join(map(repr, missing[:5]))}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        chosen = sorted(set(keys))
    else:
        chosen = sorted(metas)
    if where:
        chosen = [k for k in chosen if all(_matches(metas[k], f, v) for f, v in where.items())]
    if limit is not None:
        if limit < 0:
            raise ExportError(f"--limit must be >= 0, got {limit}")
        chosen = chosen[:limit]
    return chosen


def index_row(key: str, file: str, meta: Any) -> dict[str, str]:
    """One ``index.csv`` row: empty cells for unknown values; the request as sorted JSON."""
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:.10g}"
        return str(v)

    request = json.dumps(meta.request, sort_keys=True, separators=(",", ":")) if meta.synthetic and meta.request else ""
    return {"key": key, "file": file, "subject": meta.subject, "session": cell(meta.session),
            "modality": cell(meta.modality), "diagnosis": cell(meta.diagnosis), "age": cell(meta.age),
            "sex": cell(meta.sex), "synthetic": cell(meta.synthetic), "request": request}


@dataclass
class ExportSummary:
    out: Path
    files: list[str]
    skipped: int  # samples of the set not selected

    def text(self) -> str:
        return (f"wrote {len(self.files)} NIfTI file(s) and {INDEX_NAME} to {self.out}"
                + (f" ({self.skipped} sample(s) of the set not selected)" if self.skipped else ""))


def export_nifti(shards: str | Path, out: str | Path, keys: Sequence[str] | None = None,
                 where: dict[str, str] | Sequence[str] | None = None, limit: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> ExportSummary:
    """Write ``out/<key>.nii.gz`` for the selected samples of a ``volumes`` set, ``out/index.csv``
    and ``out/export.json``. Refuses (:class:`ExportError`, nothing written) a set without an
    affine, unknown keys or fields, and files in the way without ``overwrite``."""
    import g3n_shards as gs
    from tqdm import tqdm

    try:
        ss = gs.ShardSet.open(shards, kind="volumes")
    except gs.ShardFormatError as e:
        raise ExportError(f"{e}: export-nifti writes the volumes of a volumes set (latents: g3n-tokenizer decode "
                          f"--format nifti)") from None
    affine = set_affine(ss)
    if where is not None and not isinstance(where, dict):
        where = parse_where(where)
    chosen = select_keys(ss, keys, where, limit)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    files = {k: f"{k}.nii.gz" for k in chosen}
    if not overwrite:
        in_the_way = [n for n in (*files.values(), INDEX_NAME, INFO_NAME) if (out / n).exists()]
        if in_the_way:
            raise ExportError(f"{out}: already holds {len(in_the_way)} of the files this export writes "
                              f"({', '.join(in_the_way[:3])}{', ...' if len(in_the_way) > 3 else ''}); "
                              f"pass --overwrite to replace them, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    metas = ss.metadata()
    wanted = set(chosen)
    written: list[str] = []
    bar = tqdm(total=len(chosen), desc="export-nifti", unit="volume", disable=not progress, file=sys.stderr)
    try:
        # stream the set in its own order (one shard in memory); stop once every chosen sample is out
        for s in ss.iter_split(shuffle=False) if wanted else ():
            if s.key not in wanted:
                continue
            gs.atomic_write_bytes(out / files[s.key], nifti_gz_bytes(s.arrays["volume"], affine))
            written.append(s.key)
            bar.update(1)
            if len(written) == len(wanted):
                break
    finally:
        bar.close()
    if len(written) != len(wanted):  # the index named a sample its shards do not hold
        raise gs.ShardError(f"{ss.location}: samples {sorted(wanted - set(written))[:5]} are in the index but not in the shards")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    w.writeheader()
    for k in chosen:
        w.writerow(index_row(k, files[k], metas[k]))
    info = {"format": "g3n-data/nifti-export", "set": str(ss.location), "kind": ss.kind, "digest": ss.digest,
            "space": ss.manifest.geometry.space, "spacing": ss.manifest.geometry.spacing,
            "affine": affine.tolist(), "files": len(chosen), "selection": {
                "keys": list(keys) if keys else None, "where": where or None, "limit": limit}}
    gs.atomic_write_text(out / INDEX_NAME, buf.getvalue())
    gs.atomic_write_text(out / INFO_NAME, json.dumps(info, indent=1) + "\n")
    return ExportSummary(out, [files[k] for k in chosen], len(ss) - len(chosen))


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``g3n-data export-nifti``."""
    p = subparsers.add_parser(
        "export-nifti",
        help="write the volumes of any volumes shard set as .nii.gz files (open them in ITK-SNAP or FSLeyes)",
        description=(
            "Write each sample of a `volumes` shard set (preprocessed, reconstructed, generated or edited "
            "volumes) as OUT/<key>.nii.gz, float32, with the atlas affine of the set's manifest (RAS, as sform "
            "and qform; the same header as `g3n-tokenizer decode --format nifti`), plus OUT/index.csv (key, "
            "file, subject, session, modality, diagnosis, age, sex, synthetic, and the generation request of "
            "a synthetic sample) and OUT/export.json (the set's digest and the affine). Open the files in "
            "ITK-SNAP (itksnap -g FILE), FSLeyes (fsleyes FILE), 3D Slicer or MRIcroGL. A set whose manifest "
            "records no affine is refused. Files are written atomically; an OUT that already holds a file this "
            "export writes is refused before anything is written, unless --overwrite (which replaces those "
            "files; index.csv then lists this export's files only)."
        ),
        epilog="example: g3n-data export-nifti runs/demo/samples-decoded --out nifti/generated "
               "--where diagnosis=AD --limit 4",
    )
    p.add_argument("shards", metavar="SET", help="a volumes shard set folder")
    p.add_argument("--out", required=True, help="output folder for the .nii.gz files, index.csv and export.json")
    p.add_argument("--keys", nargs="+", metavar="K", help="export only these sample keys (`g3n-shards ls SET --samples` lists them)")
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                   help="only samples whose metadata FIELD equals VALUE (repeatable, all must hold), e.g. "
                        "diagnosis=AD, modality=T1, synthetic=true, age=70")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="the first N selected samples (key order)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier export in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import g3n_shards as gs

    try:
        s = export_nifti(args.shards, args.out, keys=args.keys, where=args.where, limit=args.limit,
                         overwrite=args.overwrite, progress=not args.no_progress)
    except (ExportError, gs.ShardError, OSError) as e:
        print(f"g3n-data export-nifti: {e}", file=sys.stderr)
        return 2
    print(s.text())
    return 0
