"""Metrics files: one JSON document per measurement, atomic, with its protocol and settings.

Every figure g3n-eval writes is only comparable with another if both were measured the same
way, so every metrics file carries ``protocol_version`` (bumped whenever a definition changes,
e.g. the SSIM window or the FID slice choice) and a ``settings`` dict with every knob that
changes the number (sampler, steps, guidance, precision, seeds, slices, feature-extractor
digest) plus ``inputs``: each input's path and manifest digest, the provenance the report lists.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from g3n_shards import atomic_write_bytes as shards_atomic_write_bytes
from g3n_shards import file_sha256  # noqa: F401 - re-exported for the measurements

#: Version of the measurement definitions in this package. Bump the minor for additions,
#: the major when an existing figure would change value for the same inputs.
#: 1.1: controllability's paired columns. 2.0: controllability probes fitted on the real samples of
#: the requested contrast (``real_slice``), not on every real sample.
PROTOCOL_VERSION = "2.0"
FORMAT = "g3n-eval/metrics"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """The contract's atomic writer (temp sibling, fsync, rename), returning the path."""
    shards_atomic_write_bytes(path, data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to Python; NaN/Inf to None (JSON has no NaN; None = 'not defined')."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    return obj


def input_ref(path: str | os.PathLike[str], role: str) -> dict[str, Any]:
    """Provenance of one input: a shard set (its manifest digest), a probe or a plain file (SHA-256)."""
    p = Path(path)
    ref: dict[str, Any] = {"role": role, "path": str(p)}
    if (p / "manifest.json").is_file():
        import g3n_shards as gs

        ss = gs.ShardSet.open(p)
        ref.update(kind=ss.kind, digest=ss.digest, samples=len(ss), producer=ss.manifest.producer.package)
    elif (p / "probe.json").is_file():
        ref.update(kind="probe", digest="sha256:" + file_sha256(p / "probe.json"))
    elif p.is_file():
        ref.update(kind="file", digest="sha256:" + file_sha256(p))
    elif (p / "features.npz").is_file():
        ref.update(kind="feature-table", digest="sha256:" + file_sha256(p / "features.npz"))
    else:
        ref.update(kind="missing", digest=None)
    return ref




def metrics_document(measurement: str, settings: Mapping[str, Any], inputs: list[dict[str, Any]],
                     results: Mapping[str, Any]) -> dict[str, Any]:
    """The common envelope of every metrics file."""
    from . import __version__

    return to_jsonable({
        "format": FORMAT,
        "measurement": measurement,
        "protocol_version": PROTOCOL_VERSION,
        "package": {"name": "g3n-eval", "version": __version__},
        "settings": dict(settings),
        "inputs": inputs,
        "results": dict(results),
    })


def write_metrics(path: str | os.PathLike[str], measurement: str, settings: Mapping[str, Any],
                  inputs: list[dict[str, Any]], results: Mapping[str, Any]) -> dict[str, Any]:
    """Build and atomically write a metrics JSON file; returns the document."""
    doc = metrics_document(measurement, settings, inputs, results)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return doc


class MetricsFileError(ValueError):
    """A metrics file is missing, not JSON or not a g3n-eval metrics document."""


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise MetricsFileError(f"{p}: cannot read metrics file: {e}") from None
    except json.JSONDecodeError as e:
        raise MetricsFileError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MetricsFileError(f"{p}: not a {FORMAT} document (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    return doc
