"""Features for the encoder's baselines: raw voxels, downsampled, as a g3n-probe feature table.

An encoder earns its place only if its embedding beats what a linear probe gets from the voxels
themselves. The voxels are brought to brain z-space exactly as the encoder's loader does it (brain
voxels > 0, from the intensity space the set records; a z-space set is used as it is),
averaged over ``factor``^3 blocks (4 at the demo grid: 20 x 24 x 20 = 9,600 values), and written
as ``features.npz`` + ``metadata.jsonl``; ``g3n-probe run TABLE --pca K`` then reduces them to the
encoder's width inside each training fold, so the comparison is at equal width and nothing of a
test fold leaks into the reduction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

import g3n_shards as gs
from g3n_probe.features import write_feature_table

from g3n_shards.intensity import to_zspace

from .data import InputError, volume_space
from .rejects import Rejects


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``^3 blocks (each axis cropped to a multiple of ``factor``)."""
    if factor < 1:
        raise InputError(f"factor must be >= 1, got {factor}")
    shape = [s - s % factor for s in volume.shape]
    if min(shape) == 0:
        raise ValueError(f"volume of shape {volume.shape} is smaller than one {factor}^3 block")
    v = volume[: shape[0], : shape[1], : shape[2]]
    return v.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor).mean(axis=(1, 3, 5))


def raw_voxel_features(volumes: str | Path, out: str | Path, factor: int = 4, progress: bool = True) -> Path:
    """Write the feature table of every volume of ``volumes``; volumes that cannot be z-scored
    (no brain voxel, non-finite values) go to ``out/rejects.jsonl`` with the reason."""
    try:
        ss = gs.ShardSet.open(volumes, kind="volumes")
    except gs.ShardError as e:
        raise InputError(str(e)) from None
    space = volume_space(ss.manifest, volumes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rejects = Rejects(out)
    keys, rows, records = [], [], []
    for sample in tqdm(ss, total=ss.manifest.num_samples, desc="raw voxel features", unit="vol", disable=not progress):
        vol = np.asarray(sample.arrays["volume"], dtype=np.float32)
        try:
            feats = block_mean(to_zspace(vol, space, sample.key), factor).ravel()
        except ValueError as e:  # ZScoreError (no brain voxel, NaN/Inf), or smaller than one block
            rejects.add(sample.key, f"{ss.location}: {e}")
            continue
        keys.append(sample.key)
        rows.append(feats)
        records.append(sample.meta)
    if not keys:
        raise InputError(f"{ss.location}: no volume could be turned into features (see {rejects.path})")
    return write_feature_table(out, np.stack(rows).astype(np.float32), keys, records,
                               source={"kind": "raw-voxels", "type": "volumes", "path": str(ss.location),
                                       "digest": ss.digest, "encoder": {"name": f"voxels, {factor}^3 block means"}})
