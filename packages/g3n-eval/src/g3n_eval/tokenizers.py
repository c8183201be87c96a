"""Tokenizers side by side, as the method's Table 5 compares them (docs/method.md §3).

For each tokenizer: the values a volume is reduced to, its reconstruction of the held-out volumes
(MSE, PSNR, SSIM: :func:`g3n_eval.recon.run_recon`, one ``recon.json`` per tokenizer), and how much
clinical content its latents keep: g3n-probe's subject-grouped cross-validated AUC (IDH1 and tumour
grade by default) on the mean over tokens of the latents of every volume of the cohort.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from g3n_shards.intensity import ZScoreError, to_zspace

from .data import InputError, iter_set, open_set, volume_space
from .models import TokenizerHandle
from .recon import run_recon
from .records import input_ref, write_metrics

#: Table 5's probe columns
TASKS = ("idh1", "tumour_grade")


def latent_features(volumes: str | Path, tok: TokenizerHandle, progress: bool = True
                    ) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """(mean-over-token latent features, keys, metadata) of every volume of a set, streamed."""
    feats, keys, metas, batch = [], [], [], []

    def flush() -> None:
        if batch:
            feats.append(tok.latent_means([v for *_, v in batch]))
            batch.clear()

    ss = open_set(volumes, kind="volumes")
    space = volume_space(ss.manifest, volumes)  # what the set records, as g3n-eval recon reads it
    for k, m, v in tqdm(iter_set(volumes, "volumes"), total=len(ss), desc="latent features", unit="vol",
                        disable=not progress):
        try:
            z = to_zspace(v, space, k)
        except ZScoreError as e:
            raise InputError(f"{volumes}: {e}") from None
        keys.append(k)
        metas.append(m)
        batch.append((k, z))
        if len(batch) == 4:
            flush()
    flush()
    return np.concatenate(feats), keys, metas


def _folder(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-").lower() or "tokenizer"


def run_tokenizers(volumes: str | Path, heldout: str | Path, tokenizers: Sequence[tuple[str, TokenizerHandle]],
                   out: str | Path, tasks: Sequence[str] = TASKS, probe_slice: str = "all", protocol: str = "paper",
                   limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score each (label, tokenizer) on ``heldout`` (reconstruction) and ``volumes`` (latent probes);
    write ``tokenizers.json`` and each tokenizer's ``<label>/recon.json``."""
    from g3n_tokenizer.sweep import latent_probe_aucs

    if not tokenizers:
        raise InputError("give at least one tokenizer (--arm LABEL NAME CHECKPOINT)")
    out = Path(out)
    held = set(open_set(heldout, kind="volumes").keys())
    rows = []
    for label, tok in tokenizers:
        rec = run_recon(heldout, out / _folder(label), tok, limit=limit, progress=progress)
        X, keys, metas = latent_features(volumes, tok, progress)
        aucs, notes = latent_probe_aucs(X, keys, metas, list(tasks), probe_slice, protocol, label)
        summary = rec["results"]["summary"]
        rows.append({"tokenizer": label, "ref": tok.ref, "values_per_volume": tok.values_per_volume,
                     "feature_dim": int(X.shape[1]), "n_heldout": rec["results"]["n"],
                     **{f: summary[f]["mean"] for f in ("mse", "psnr", "ssim")},
                     **{f"{f}_std": summary[f]["std"] for f in ("mse", "psnr", "ssim")},
                     "auc": {t: (None if np.isnan(a) else a) for t, a in aucs.items()}, "probe_notes": notes,
                     "recon": f"{_folder(label)}/recon.json"})
    n_probe = len(keys)
    settings = {"heldout_space": "brain z-score (g3n-eval recon)", "probe": {
        "tasks": list(tasks), "slice": probe_slice, "protocol": protocol,
        "features": "mean over tokens of each volume's latents", "volumes": n_probe,
        "heldout_in_probe_set": len(held & set(keys))}, "limit": limit}
    inputs = [input_ref(heldout, "held-out volumes"), input_ref(volumes, "probe volumes")]
    return write_metrics(out / "tokenizers.json", "tokenizers", settings, inputs, {"rows": rows})
