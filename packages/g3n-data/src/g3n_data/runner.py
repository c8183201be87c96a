"""Batch preprocessing: parallel, partitioned for job arrays, resumable, deterministic.

Design: each subject (all its sessions) is one unit of work. A finished subject is written to a
per-subject cache folder atomically (staged, then renamed), so a killed run resumes by skipping
subjects whose cache entry exists and matches the inputs and the config. Every input is hashed
again before its subject is taken from the cache or processed: a file that changed since ingest
is rejected ("source changed since ingest", both hashes in the record), the batch goes on, and
the check is repeated on the bytes the worker actually reads. The final ``volumes``
shard set is written from the cache in sorted key order by the contract's deterministic writer,
so a resumed run gives byte-identical shards to an uninterrupted one, and ``--part i/N`` parts
merge (``merge_parts``) into the same samples as a single run.

SimpleITK runs one thread per process by default (``threads`` in config, recorded in the
manifest): multi-threaded registration is not reproducible bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from g3n_shards import Geometry, Producer, ShardSet, ShardWriter, file_sha256, merge_shard_sets, sanitize_key
from tqdm import tqdm

from .atlas import Atlas, load_atlas
from .config import PreprocessConfig
from .pipeline import SubjectOut, process_subject
from .worklist import WorkItem, atomic_write_text, dumps_jsonl, read_worklist, reject_line, sort_rejects

LOG_NAME = "preprocess_log.jsonl"
RESULT_NAME = "result.json"
PACKAGE = "g3n-data"


@dataclass
class RunSummary:
    out_dir: Path
    samples: int = 0
    rejects_by_step: Counter = field(default_factory=Counter)
    rejects_by_reason: Counter = field(default_factory=Counter)
    processed: int = 0  # subjects computed in this run
    reused: int = 0  # subjects taken from the cache

    def text(self) -> str:
        lines = [f"{self.out_dir}: {self.samples} samples, {sum(self.rejects_by_step.values())} rejects "
                 f"(subjects processed {self.processed}, reused from cache {self.reused})"]
        for step, n in sorted(self.rejects_by_step.items()):
            lines.append(f"  rejects at {step}: {n}")
        for reason, n in sorted(self.rejects_by_reason.items()):
            lines.append(f"    {n} x {reason}")
        return "\n".join(lines)


def parse_part(text: str | None) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8); parts are numbered from 1 like a job array index."""
    if not text:
        return (1, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like i/N (e.g. 2/8), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"--part {text!r}: need 1 <= i <= N")
    return (i, n)


def group_items(items: list[WorkItem]) -> list[tuple[tuple[str, str], list[WorkItem]]]:
    groups: dict[tuple[str, str], list[WorkItem]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    return [(g, sorted(groups[g], key=lambda i: i.key)) for g in sorted(groups)]


def _slug(group: tuple[str, str]) -> str:
    h = hashlib.sha1("\0".join(group).encode()).hexdigest()[:8]
    return f"{sanitize_key('-'.join(p for p in group if p))[:80]}-{h}"


def changed_sources(items: list[WorkItem]) -> dict[str, str]:
    """Inputs whose file no longer has the SHA-256 the work list recorded at ingest: path -> what
    is there now (its SHA-256, or why it cannot be read). Items without a recorded hash are skipped."""
    out = {}
    for it in items:
        want = it.meta.get("source_sha256")
        if not want:
            continue
        try:
            have = file_sha256(it.path)
        except OSError as e:
            have = f"unreadable ({e.strerror or e})"
        if have != want:
            out[it.path] = have
    return out


def _digest(items: list[WorkItem], cfg_digest: str, changed: dict[str, str] | None = None) -> str:
    """Cache key of one subject: the config, its work items (with the recorded source hashes) and,
    where a source changed since ingest, what is there now: a result made while a file differed
    (its reject) is never served once the file is back, nor a result of the old file while it differs."""
    parts: list = [cfg_digest] + [i.model_dump(mode="json") for i in items]
    if changed:
        parts.append({"changed_sources": changed})
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cached(cache: Path, group: tuple[str, str], digest: str) -> bool:
    res = cache / _slug(group) / RESULT_NAME
    if not res.is_file():
        return False
    try:
        return json.loads(res.read_text())["digest"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _store(cache: Path, group: tuple[str, str], digest: str, result: SubjectOut) -> None:
    """Write one subject's results atomically: stage a folder, then rename it into place."""
    final = cache / _slug(group)
    stage = cache / f".stage-{_slug(group)}-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    samples = []
    for s in result.samples:
        np.save(stage / f"{s.key}.npy", s.volume.astype(np.float32), allow_pickle=False)
        samples.append({"key": s.key, "meta": s.meta, "figures": s.figures})
    (stage / RESULT_NAME).write_text(json.dumps({"digest": digest, "samples": samples, "rejects": result.rejects},
                                                sort_keys=True, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)


def _load_cached(cache: Path, group: tuple[str, str]) -> tuple[list[dict], list[dict]]:
    d = cache / _slug(group)
    rec = json.loads((d / RESULT_NAME).read_text())
    return rec["samples"], rec["rejects"]


# ---- worker side ---------------------------------------------------------------------------
_ATLAS: Atlas | None = None
_CFG: PreprocessConfig | None = None


def _init_worker(cfg_json: str) -> None:
    global _ATLAS, _CFG
    _CFG = PreprocessConfig.model_validate_json(cfg_json)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_CFG.threads)
    _ATLAS = load_atlas(_CFG.atlas, _CFG.geometry)


def _work(group: tuple[str, str], items_json: list[dict], cache: str, digest: str, qc_dir: str | None) -> tuple[str, str]:
    assert _CFG is not None and _ATLAS is not None
    items = [WorkItem.model_validate(i) for i in items_json]
    result = process_subject(items, _CFG, _ATLAS, Path(qc_dir) if qc_dir else None)
    _store(Path(cache), group, digest, result)
    return group


# ---- driver --------------------------------------------------------------------------------
def run_preprocess(
    worklist: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: PreprocessConfig,
    workers: int = 1,
    part: tuple[int, int] = (1, 1),
    cache_dir: str | os.PathLike[str] | None = None,
    qc_montage: bool | None = None,
    progress: bool = True,
) -> RunSummary:
    """Preprocess the work list (or its part ``i/N``) into a ``volumes`` shard set at ``out_dir``.

    Returns the summary; ``out_dir`` gets manifest.json + shards + index.jsonl, ``rejects.jsonl``
    (ingest rejects, in part 1 only, plus this run's) and ``preprocess_log.jsonl`` (per-sample figures).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / ".g3n-cache"
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(".stage-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    qc_on = cfg.qc.montage if qc_montage is None else qc_montage
    qc_dir = out / "qc" if qc_on else None

    items, ingest_rejects = read_worklist(worklist)
    i, n = part
    groups = group_items(items)[i - 1 :: n]
    cfg_digest = cfg.digest()
    digests = {g: _digest(its, cfg_digest, changed_sources(its)) for g, its in groups}  # re-hashes every input
    todo = [(g, its) for g, its in groups if not _cached(cache, g, digests[g])]
    summary = RunSummary(out, processed=len(todo), reused=len(groups) - len(todo))
    crashed: dict[tuple[str, str], str] = {}

    if todo:
        cfg_json = cfg.model_dump_json()
        bar = tqdm(total=len(todo), desc="preprocess", unit="subject", disable=not progress, file=sys.stderr)
        if workers <= 1:
            _init_worker(cfg_json)
            for g, its in todo:
                _work(g, [x.model_dump(mode="json") for x in its], str(cache), digests[g], str(qc_dir) if qc_dir else None)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(cfg_json,)) as pool:
                futs = {pool.submit(_work, g, [x.model_dump(mode="json") for x in its], str(cache), digests[g],
                                    str(qc_dir) if qc_dir else None): g for g, its in todo}
                for f in as_completed(futs):
                    try:
                        f.result()
                    except Exception as e:  # a crashed worker: report, do not cache, a re-run retries
                        crashed[futs[f]] = f"{type(e).__name__}: {e}"
                    bar.update(1)
        bar.close()

    samples: list[dict] = []
    rejects: list[dict] = list(ingest_rejects) if i == 1 else []
    for g, its in groups:
        if g in crashed:
            rejects += [reject_line(x.path, x.subject, "preprocess", f"worker crashed: {crashed[g]}", key=x.key)
                        for x in its]
            continue
        s, r = _load_cached(cache, g)
        samples += [dict(x, _dir=str(cache / _slug(g))) for x in s]
        rejects += r
    samples.sort(key=lambda s: s["key"])
    _write_set(out, samples, cfg)
    rejects = sort_rejects(rejects)
    atomic_write_text(out / "rejects.jsonl", dumps_jsonl(rejects))
    atomic_write_text(out / LOG_NAME, dumps_jsonl({"key": s["key"], **s["figures"]} for s in samples))
    summary.samples = len(samples)
    summary.rejects_by_step = Counter(r["step"] for r in rejects)
    summary.rejects_by_reason = Counter(r["reason"].split(" (")[0][:80] for r in rejects)
    return summary


def producer_for(cfg: PreprocessConfig) -> Producer:
    conf = cfg.model_dump(mode="json")
    return Producer(package=PACKAGE, config=conf, config_digest=cfg.digest())


def geometry_for(cfg: PreprocessConfig) -> Geometry:
    from .atlas import output_grid, resolve_atlas_path
    from .images import grid_affine, load_volume

    brain, _ = load_volume(resolve_atlas_path(cfg.atlas.brain))
    aff = grid_affine(output_grid(brain, cfg.geometry))
    s = float(cfg.geometry.spacing)
    return Geometry(shape=cfg.geometry.shape, spacing=(s, s, s), patch_size=cfg.geometry.patch_size,
                    affine=[[round(float(v), 6) for v in row] for row in aff], space=cfg.atlas.name)


def _write_set(out: Path, samples: list[dict], cfg: PreprocessConfig) -> None:
    extra = {"preprocess": {"threads_per_process": cfg.threads, "seed": cfg.seed,
                            "engine": f"SimpleITK {sitk.Version.VersionString()}",
                            "skullstrip": cfg.skullstrip.method}}
    # the part number is deliberately not recorded: merged parts then equal a single run, byte for byte
    with ShardWriter(out, kind="volumes", producer=producer_for(cfg), geometry=geometry_for(cfg),
                     extra=extra, overwrite=True) as w:
        for s in samples:
            vol = np.load(Path(s["_dir"]) / f"{s['key']}.npy", allow_pickle=False)
            w.write(s["key"], s["meta"], {"volume": vol})


def merge_parts(parts: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> RunSummary:
    """Merge the shard sets of ``--part i/N`` runs into one set (samples sorted by key; rejects and
    per-sample logs concatenated in part order)."""
    sets = [ShardSet.open(p, kind="volumes") for p in parts]
    prod = sets[0].manifest.producer
    manifest = merge_shard_sets(sets, out_dir, producer=prod, overwrite=True)
    logs = "".join((Path(p) / LOG_NAME).read_text() for p in parts if (Path(p) / LOG_NAME).is_file())
    atomic_write_text(Path(out_dir) / LOG_NAME, logs)
    rej = [json.loads(line) for p in parts if (Path(p) / "rejects.jsonl").is_file()
           for line in (Path(p) / "rejects.jsonl").read_text().splitlines() if line.strip()]
    rej = sort_rejects(rej)
    atomic_write_text(Path(out_dir) / "rejects.jsonl", dumps_jsonl(rej))
    s = RunSummary(Path(out_dir), samples=manifest.num_samples)
    s.rejects_by_step = Counter(r["step"] for r in rej)
    s.rejects_by_reason = Counter(r["reason"].split(" (")[0][:80] for r in rej)
    return s


__all__ = ["RunSummary", "merge_parts", "parse_part", "run_preprocess"]
