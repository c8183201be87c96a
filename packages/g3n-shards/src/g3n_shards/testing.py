"""Small, deterministic fixtures for tests and demos of every stage: brain-like volumes and sets.

Not a synthetic cohort (that is g3n-data's labelled generator): just enough realistic structure
(a textured ellipsoid on a zero background) to exercise readers, writers and loaders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .manifest import Geometry, Manifest, Producer
from .meta import SampleMeta, sample_key
from .writer import ShardWriter


def brain_like(rng: np.random.Generator, shape: Sequence[int] = (16, 20, 16), scale: float = 800.0) -> np.ndarray:
    """A brain-shaped object: a textured ellipsoid with noise inside, exact zeros outside."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    inside = r < 0.8
    vol = np.where(inside, scale * (1 + 0.3 * np.sin(6 * grid[0]) * np.cos(5 * grid[1])), 0.0)
    return (vol + rng.normal(0, scale / 160, tuple(shape)) * inside).clip(0).astype(np.float32)


def make_meta(i: int, **overrides: object) -> SampleMeta:
    """Metadata of test subject ``i``: cycling sites, sexes and diagnoses, age 20 + i."""
    base: dict[str, object] = dict(subject=f"sub-{i:03d}", session="ses-1", cohort="SYN", site=f"site{i % 3}",
                                   modality="T1", age=20.0 + i, sex="F" if i % 2 else "M",
                                   diagnosis=["HC", "AD", "MCI"][i % 3])
    base.update(overrides)
    return SampleMeta(**base)


def write_volume_set(out: str | os.PathLike[str], n: int = 10, shape: Sequence[int] = (16, 20, 16),
                     patch_size: Sequence[int] = (4, 4, 4), seed: int = 0, max_shard_samples: int | None = 3,
                     **writer_kwargs: object) -> Manifest:
    """Write ``n`` brain-like volumes with :func:`make_meta` metadata as a ``volumes`` set."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out, kind="volumes", producer=Producer(package="g3n-shards", config={"testing": seed}),
                     geometry=Geometry(shape=tuple(shape), spacing=(2.0, 2.0, 2.0), patch_size=tuple(patch_size)),
                     max_shard_samples=max_shard_samples, **writer_kwargs) as w:  # type: ignore[arg-type]
        for i in range(n):
            m = make_meta(i)
            w.write(sample_key(m), m, {"volume": brain_like(rng, shape)})
    assert w.manifest is not None
    return w.manifest
