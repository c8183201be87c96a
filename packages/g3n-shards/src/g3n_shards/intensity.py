"""What the voxel values of a ``volumes`` set mean, and the brain z-score between the spaces.

This is part of the contract because every stage that feeds volumes to the encoder or a
tokenizer must bring them into the space the encoder was trained in, exactly once:

* ``"scanner"``: preprocessed scanner units; brain voxels > 0, background 0 (docs/method.md §1: no
  intensity normalisation on disk). Voxels <= 0 count as background for the z-score, so a set
  made with ``clip_negative: false`` (negative interpolation undershoot kept) z-scores exactly
  like its clipped twin.
* ``"original"``: decoded volumes mapped back to scanner-like units with each source volume's
  brain mean/std (``g3n-tokenizer decode --intensity original``); z-scored like ``"scanner"``.
* ``"zscored-brain"``: already in brain z-space (brain voxels z-scored, background 0), what the
  tokenizers' ``encode``/``decode`` take and give; used as it is.

A producer records the space in ``manifest.extra["intensity"]``. Sets from before that field
are read from what their producer recorded: g3n-data's preprocessing (its config, with
``clip_negative``) and its synthetic cohort write scanner units. Anything else is refused by
:func:`intensity_of`, never guessed from the values.

:func:`zscore_brain` is the one numpy implementation of the brain z-score (g3n-mae's loader,
the tokenizers' shard encode and g3n-eval all use it; g3n-mae's batched torch version is tested
against it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ShardError

SCANNER = "scanner"
ORIGINAL = "original"
ZSCORED_BRAIN = "zscored-brain"
#: every intensity space a volumes set may record
SPACES = (SCANNER, ORIGINAL, ZSCORED_BRAIN)
#: the spaces :func:`to_zspace` z-scores (the others are z-space already)
NEEDS_ZSCORE = (SCANNER, ORIGINAL)
#: the manifest ``extra`` key that records the space
EXTRA_KEY = "intensity"


class IntensityError(ShardError):
    """A volumes set does not record an intensity space an encoder can take; names the set."""


class ZScoreError(ValueError):
    """A volume cannot be brain z-scored (NaN/Inf, or no brain voxel > 0); names the sample."""


def zscore_brain(volume: np.ndarray, key: str = "?") -> tuple[np.ndarray, float, float]:
    """Z-score over brain voxels (> 0), background (<= 0) set to 0; returns (z float32, mean, std).

    Statistics in float64; a constant brain (std 0) is divided by 1. Raises :class:`ZScoreError`
    naming ``key`` for non-finite voxels or a volume without a brain voxel.
    """
    v = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(v).all():
        raise ZScoreError(f"sample {key}: volume contains NaN or Inf")
    brain = v > 0
    if not brain.any():
        raise ZScoreError(f"sample {key}: no brain voxel (> 0) to z-score")
    vals = v[brain].astype(np.float64)
    mean, std = float(vals.mean()), float(vals.std())
    std = std if std > 0 else 1.0
    out = np.zeros_like(v)
    out[brain] = (v[brain] - mean) / std
    return out, mean, std


def _where(manifest: Any, location: str | None) -> str:
    return str(location) if location is not None else f"{manifest.kind} set {manifest.digest or '?'}"


def intensity_of(manifest: Any, location: str | None = None) -> str:
    """The intensity space of a ``volumes`` set (one of :data:`SPACES`), as its manifest records it.

    ``manifest.extra["intensity"]`` when present; for sets written before that field, what the
    producer recorded (g3n-data preprocessing or synthetic cohort: scanner units). Raises
    :class:`IntensityError` naming the set when nothing is recorded or the value is not one of
    :data:`SPACES`.
    """
    where = _where(manifest, location)
    extra = getattr(manifest, "extra", None) or {}
    if EXTRA_KEY in extra:
        value = extra[EXTRA_KEY]
        if value not in SPACES:
            raise IntensityError(f"{where}: records intensity space {value!r}, which no encoder here takes "
                                 f"(known: {', '.join(SPACES)})")
        return str(value)
    producer = getattr(manifest, "producer", None)
    config = (getattr(producer, "config", None) or {}) if producer is not None else {}
    if getattr(producer, "package", None) == "g3n-data":
        if isinstance(config.get("clip_negative"), bool) or isinstance(config.get("synth"), dict):
            return SCANNER
    raise IntensityError(
        f"{where}: the manifest does not record what its voxel values mean (manifest.extra[{EXTRA_KEY!r}] "
        f"is absent and producer {getattr(producer, 'package', '?')!r} is not one whose output space is known); "
        f"write the set with extra={{{EXTRA_KEY!r}: one of {list(SPACES)}}}"
    )


def to_zspace(volume: np.ndarray, space: str, key: str = "?") -> np.ndarray:
    """A volume of the recorded ``space`` in brain z-space (float32): z-scored once, or as it is."""
    if space in NEEDS_ZSCORE:
        return zscore_brain(volume, key)[0]
    if space == ZSCORED_BRAIN:
        return np.asarray(volume, dtype=np.float32)
    raise IntensityError(f"sample {key}: unknown intensity space {space!r} (known: {', '.join(SPACES)})")
