"""Is a run's train split the one the shipped models were trained on, on any CPU?

The shipped models may only start a demo run on the cohort they were trained on: on another one
(other subjects, seed or scans) their training subjects could sit in the run's test split. The set
digest cannot decide that across machines. ``g3n-data synth`` renders the same cohort with numpy's
SIMD kernels and the BLAS the CPU offers, so a CPU with other vector units (AVX-512 against AVX2)
flips a few voxels in a million by one rounding step, and the digest differs.

So the zoo also ships a fingerprint of its train split: every key, a hash of its labels (the
sample metadata without the ``extra`` fields, which hold the renderer's float ground truth) and
five numbers per volume (mean, SD and intensity centroid). A run's split matches when its keys
and labels are the same and every volume's numbers agree to well under what any change of cohort,
renderer or preprocessing moves them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from g3n_shards import ShardSet, atomic_write_bytes

FORMAT = "g3n-zoo/train-split"
VERSION = 1
#: the fingerprint's file, in the shipped MAE's folder (every shipped model was trained on the same split)
FILE_NAME = "train-split.json"
#: mean and SD may differ by this fraction of the volume's SD, the centroid by this many voxels.
#: Another CPU path (numpy without AVX2, another OpenBLAS kernel) moved them by at most 0.4 % of
#: these tolerances on the demo cohort; a change of one voxel in a thousand by a tenth of the SD
#: moves the mean by 1e-4 of the SD, ten times the tolerance.
STAT_RTOL = 1e-5
CENTROID_ATOL = 1e-3


def labels_hash(meta: Any) -> str:
    """SHA-256 (16 hex digits) of a sample's labels: its metadata without ``extra``."""
    d = meta.model_dump(mode="json", exclude={"extra"})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def volume_stats(v: np.ndarray) -> list[float]:
    """Mean, SD and the intensity centroid (voxels, per axis) of one volume, in float64."""
    x = np.asarray(v, dtype=np.float64)
    total = x.sum()
    cent = [float((x.sum(axis=tuple(j for j in range(3) if j != i)) * np.arange(x.shape[i])).sum() / total)
            if total else 0.0 for i in range(3)]
    return [float(x.mean()), float(x.std()), *cent]


def fingerprint(ss: ShardSet, machine: str | None = None) -> dict[str, Any]:
    """The fingerprint of a volumes set: its digest, the machine that rendered it (if given), and
    every sample's labels hash and stats."""
    vols = {}
    for s in ss:
        vols[s.key] = {"labels": labels_hash(s.meta),
                       "stats": [float(f"{x:.9g}") for x in volume_stats(s.arrays["volume"])]}
    return {"format": FORMAT, "version": VERSION, "digest": ss.digest, "machine": machine,
            "volumes": dict(sorted(vols.items()))}


def write(ss: ShardSet, path: Path, machine: str | None = None) -> Path:
    """Write the fingerprint as JSON, one line per volume."""
    doc = fingerprint(ss, machine)
    vols = doc.pop("volumes")
    head = json.dumps(doc, indent=1)[:-2]
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in vols.items()]
    atomic_write_bytes(path, (head + ',\n "volumes": {\n  ' + ",\n  ".join(lines) + "\n }\n}\n").encode())
    return path


def read(path: Path) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file")
    return doc


def compare(want: dict[str, Any], ss: ShardSet) -> tuple[list[str], float]:
    """(problems, largest stat difference in units of its tolerance) of ``ss`` against the
    fingerprint ``want``. No problems: the same samples with the same labels, and the same volumes
    up to rounding."""
    have_keys, want_keys = set(ss.keys()), set(want["volumes"])
    problems = []
    if have_keys != want_keys:
        missing, extra = sorted(want_keys - have_keys), sorted(have_keys - want_keys)
        problems.append(f"{len(missing)} of its samples missing (e.g. {', '.join(missing[:3]) or '-'}) and "
                        f"{len(extra)} others (e.g. {', '.join(extra[:3]) or '-'})")
        return problems, float("inf")
    worst = 0.0
    for s in ss:
        w = want["volumes"][s.key]
        if labels_hash(s.meta) != w["labels"]:
            problems.append(f"{s.key}: labels differ")
            continue
        got = volume_stats(s.arrays["volume"])
        ref = w["stats"]
        sd = max(abs(ref[1]), 1e-12)
        d = max(max(abs(a - b) for a, b in zip(got[:2], ref[:2])) / (STAT_RTOL * sd),
                max(abs(a - b) for a, b in zip(got[2:], ref[2:])) / CENTROID_ATOL)
        if d > 1:
            problems.append(f"{s.key}: volume differs (mean {got[0]:.6g} against {ref[0]:.6g}, "
                            f"SD {got[1]:.6g} against {ref[1]:.6g})")
        worst = max(worst, d)
    return problems, worst
