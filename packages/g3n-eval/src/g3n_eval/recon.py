"""Reconstruction quality of a tokenizer (docs/method.md §3, Table 5): MSE, PSNR, 3D SSIM.

Two ways in: a registered tokenizer run over a ``volumes`` set (encode, decode, compare in
brain z-space: the space tokenizers work in, where the paper's MSE 0.119 / PSNR 32.5 live), or
a second ``volumes`` set of reconstructions paired with the real one by sample key. Per volume
and summarised (mean, std, median...), inside the brain mask (the real volume's non-zero
voxels) and over the whole volume.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from g3n_shards.intensity import NEEDS_ZSCORE, ZSCORED_BRAIN, ZScoreError, to_zspace

from . import metrics as M
from .data import InputError, iter_set, open_set, volume_space
from .figures import volume_montage
from .models import TokenizerHandle
from .records import atomic_write_text, input_ref, write_metrics
from .rejects import Rejects

FIELDS = ("mse", "psnr", "ssim", "mse_brain", "psnr_brain", "ssim_brain")


def run_recon(volumes: str | Path, out: str | Path, tokenizer: TokenizerHandle | None = None,
              recon: str | Path | None = None, limit: int | None = None, data_range: float | None = None,
              save_recon: bool = False, montage_n: int = 4, progress: bool = True) -> dict[str, Any]:
    if (tokenizer is None) == (recon is None):
        raise InputError("give exactly one of a tokenizer (--tokenizer/--checkpoint) or a reconstruction set (--recon)")
    out = Path(out)
    rejects = Rejects(out)
    real_set = open_set(volumes, kind="volumes")
    real_space = volume_space(real_set.manifest, volumes)
    rec_space = None
    if recon is not None:
        rec_space = volume_space(open_set(recon, kind="volumes").manifest, recon)
        if rec_space in NEEDS_ZSCORE and real_space not in NEEDS_ZSCORE:
            raise InputError(f"{recon}: reconstructions in {rec_space} units are mapped with the real volumes' brain "
                             f"statistics, but {volumes} is already {real_space}: give reconstructions in z-space")

    def brain_of(v: np.ndarray) -> np.ndarray:  # background is 0; scanner units have no negative brain voxel
        return v > 0 if real_space in NEEDS_ZSCORE else v != 0
    writer = None
    if save_recon:
        import g3n_shards as gs

        from . import __version__

        writer = gs.ShardWriter(out / "recon-volumes", kind="volumes",
                                producer=gs.Producer(package="g3n-eval", version=__version__,
                                                     config={"stage": "recon", "tokenizer": tokenizer.ref if tokenizer else None}),
                                geometry=real_set.manifest.geometry, parents=[real_set], overwrite=True,
                                extra={"intensity": ZSCORED_BRAIN})
    rows: list[dict[str, Any]] = []
    montage: list[tuple[str, np.ndarray, np.ndarray]] = []
    batch: list[tuple[str, dict, np.ndarray, np.ndarray | None]] = []

    def flush() -> None:
        if not batch:
            return
        ok, zs = [], []
        for item in batch:
            try:
                zs.append(to_zspace(item[2], real_space, item[0]))
                ok.append(item)
            except ZScoreError as e:
                rejects.add(item[0], f"{type(e).__name__}: {e}")
        outs = tokenizer.reconstruct(zs) if tokenizer is not None else [r for *_, r in ok]
        for j, (k, m, v, _) in enumerate(ok):
            try:
                r = outs[j]
                brain = brain_of(v)
                # reconstructions in scanner units are mapped with the *real* volume's statistics
                ref, test = M.zscore_pair(v, r, brain) if rec_space in NEEDS_ZSCORE else (zs[j], r)
                s = M.score_volume(ref, test, mask=brain, data_range=data_range)
            except ValueError as e:
                rejects.add(k, f"{type(e).__name__}: {e}")
                continue
            rows.append({"key": k, "subject": m.get("subject"), "modality": m.get("modality"), **s.as_dict()})
            if len(montage) < montage_n:
                montage.append((k, ref, test))
            if writer is not None:
                writer.write(k, m, {"volume": np.asarray(test, np.float32)})
        batch.clear()

    # streamed: a shard of each set and one batch in memory; reconstructions given as a set are
    # paired by key while both are read in their shard order (sets written in key order align)
    rec_iter = iter_set(recon, "volumes") if recon is not None else None
    pending: dict[str, np.ndarray] = {}
    total = min(len(real_set), limit) if limit else len(real_set)
    try:
        for k, m, v in tqdm(iter_set(volumes, "volumes", limit), total=total, desc="recon", unit="vol", disable=not progress):
            r = None
            if rec_iter is not None:
                while k not in pending:
                    nxt = next(rec_iter, None)
                    if nxt is None:
                        break
                    pending[nxt[0]] = nxt[2]
                r = pending.pop(k, None)
                if r is None:
                    rejects.add(k, f"no reconstruction with this key in {recon}")
                    continue
            if not brain_of(v).any():
                rejects.add(k, "empty volume: no brain voxel")
                continue
            batch.append((k, m, v, r))
            if len(batch) >= 4:
                flush()
        flush()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if not rows:
        raise InputError(f"{volumes}: no volume could be scored (see {rejects.path})")

    summary = {f: M.summarise([r[f] for r in rows]) for f in FIELDS}
    by_modality: dict[str, Any] = {}
    for mod in sorted({str(r["modality"]) for r in rows}):
        sel = [r for r in rows if str(r["modality"]) == mod]
        by_modality[mod] = {f: M.summarise([r[f] for r in sel]) for f in FIELDS}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "recon_per_volume.csv", buf.getvalue())
    figures = {}
    if montage:
        pairs, labels = [], []
        for k, ref, test in montage:
            pairs += [ref, test]
            labels += [f"real {k[:12]}", f"recon {k[:11]}"]
        volume_montage(pairs, labels, out / "recon_montage.png")
        figures["recon_montage"] = "recon_montage.png"
    inputs = [input_ref(volumes, "real volumes")]
    if recon is not None:
        inputs.append(input_ref(recon, "reconstructions"))
    settings = {
        "space": "brain z-score of the real volume (voxels > 0); background 0",
        "intensity": {"real": real_space, "recon": rec_space},
        "mask": "real volume > 0" if real_space in NEEDS_ZSCORE else "real volume != 0",
        "data_range": data_range if data_range is not None else "per volume: max - min of the real z-scored volume",
        "ssim": {"window": "gaussian", "sigma": M.SSIM_SIGMA, "taps": M.SSIM_TAPS, "k1": M.K1, "k2": M.K2,
                 "region": "valid (no padding)"},
        "limit": limit,
        "tokenizer": tokenizer.ref if tokenizer is not None else None,
        "precision": tokenizer.precision if tokenizer is not None else "fp32 (metrics in float64)",
    }
    results = {"n": len(rows), "rejected": rejects.count, "summary": summary, "by_modality": by_modality,
               "per_volume_file": "recon_per_volume.csv", "figures": figures}
    return write_metrics(out / "recon.json", "reconstruction", settings, inputs, results)
