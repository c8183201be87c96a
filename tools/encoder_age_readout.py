"""Where does a g3n-mae encoder keep brain age? One forward pass per T1 volume, then a
subject-grouped 5-fold ridge on several read-outs of the same encoder:

- the token mean after each block (the probes use the last one, after the final norm);
- the final tokens pooled other ways: mean and SD, means over 8 octants of the grid;
- the whole token grid, reduced to the encoder's width by PCA fitted in each fold.

If the whole grid predicts age much better than the token mean, the encoder has the information
and the mean over tokens loses it. Three read-outs of the voxels themselves frame the figures: the
4x downsampled volume reduced by PCA (with position: the probe panel's raw-voxel baseline), and two
that keep no position at all, as any mean over patches of features that do not depend on where
the patch is: the mean 8^3 patch, and the histogram of brain intensities. Prints one line per
read-out: the mean absolute error (years) at the best alpha of a small grid (optimistic by the
same amount for every read-out, so comparable).

    uv run python tools/encoder_age_readout.py WEIGHTS RUN/volumes
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from g3n_mae.checkpoint import load_model
from g3n_mae.data import zscore_brain_torch
from g3n_shards import ShardSet
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def grouped_mae(X: np.ndarray, y: np.ndarray, groups: np.ndarray, pca: int | None = None) -> tuple[float, float]:
    """(best MAE over ALPHAS, its alpha) of standardise [-> PCA] -> ridge, GroupKFold(5)."""
    best = (np.inf, 0.0)
    for a in ALPHAS:
        pred = np.zeros_like(y)
        for tr, te in GroupKFold(5).split(X, y, groups):
            steps = [StandardScaler()] + ([PCA(pca, random_state=0)] if pca else []) + [Ridge(alpha=a)]
            pred[te] = make_pipeline(*steps).fit(X[tr], y[tr]).predict(X[te])
        best = min(best, (float(np.abs(pred - y).mean()), a))
    return best


def _voxel_reads(v: np.ndarray, patch: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Read-outs of the z-scored volume itself: with position (4x block means) and without (the
    mean patch; the brain's intensity histogram, 24 bins over -3..3 SD)."""
    (a, b, c), (p, q, r) = v.shape, patch
    blocks = v.reshape(a // 4, 4, b // 4, 4, c // 4, 4).mean((1, 3, 5)).reshape(-1)
    mean_patch = v.reshape(a // p, p, b // q, q, c // r, r).mean((0, 2, 4)).reshape(-1)
    brain = v[v != 0]
    hist = np.histogram(brain, bins=np.linspace(-3, 3, 25))[0] / max(brain.size, 1)
    return {"voxels, 4x block means (PCA to width)": blocks, "voxels, mean patch (no position)": mean_patch,
            "voxels, brain intensity histogram (no position)": hist}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="g3n-mae weights file, export or run folder")
    p.add_argument("volumes", help="a 'volumes' shard set with age and subject in its metadata")
    p.add_argument("--modality", default="T1")
    a = p.parse_args(argv)

    model, cfg, _ = load_model(a.weights)
    grid = [i // q for i, q in zip(cfg.img_size, cfg.patch_size)]
    reads: dict[str, list[np.ndarray]] = {}
    ages, subjects = [], []
    with torch.no_grad():
        for s in ShardSet.open(a.volumes):
            m = s.meta
            if m.modality != a.modality or m.age is None:
                continue
            v = np.asarray(s.arrays[next(iter(s.arrays))], dtype=np.float32)
            x = zscore_brain_torch(torch.from_numpy(v)[None, None])
            h = model.patch_embed(x) + model.pos_embed
            out = {"patch embedding, mean": h.mean(1)}
            for i, blk in enumerate(model.blocks, start=1):
                h = blk(h)
                out[f"block {i}, mean"] = h.mean(1)
            tok = model.norm(h)[0]
            out["final norm, mean (the probes' features)"] = tok.mean(0)
            out["final norm, mean and SD"] = torch.cat([tok.mean(0), tok.std(0)])
            octants = tok.reshape(2, grid[0] // 2, 2, grid[1] // 2, 2, grid[2] // 2, -1).mean((1, 3, 5))
            out["final norm, 8 octant means"] = octants.reshape(-1)
            out["final norm, whole grid (PCA to width)"] = tok.reshape(-1)
            for k, t in out.items():
                reads.setdefault(k, []).append(t.reshape(-1).numpy())
            for k, t in _voxel_reads(x[0, 0].numpy(), cfg.patch_size).items():
                reads.setdefault(k, []).append(t)
            ages.append(float(m.age))
            subjects.append(str(m.subject))
    y, g = np.asarray(ages), np.asarray(subjects)
    print(f"{len(y)} {a.modality} volumes of {len(set(subjects))} subjects; predicting the mean age: "
          f"MAE {np.abs(y - y.mean()).mean():.2f} y")
    for k, rows in reads.items():
        pca = cfg.embed_dim if "PCA to width" in k else None
        err, alpha = grouped_mae(np.stack(rows), y, g, pca)
        print(f"{k:48s} MAE {err:5.2f} y (alpha {alpha:g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
