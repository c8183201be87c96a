"""Generation fidelity (docs/method.md §7): FID on 2D central slices and a Frechet distance in our
own encoder's feature space, each for generated-vs-real, generated-vs-reconstructed and
reconstructed-vs-real (the tokenizer's floor).

All volumes enter in brain z-space (real volumes z-scored like the loaders; latents decoded by
their tokenizer), so the three sets differ only by what the models did to them.

* **FID**: Inception-V3 pool3 features (weights from the user's file, digest recorded) of the
  central sagittal, coronal and axial planes; one FID per view and one over the three views'
  features pooled (the paper's figure pools views).
* **Encoder FD**: the Frechet distance between MAE-encoder mean-token features (no extra
  weights: it is the encoder the probes use).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import InputError
from .figures import volume_montage
from .frechet import frechet_between
from .inception import VIEWS, load_inception, slice_features
from .models import MAEFeatures
from .records import input_ref, write_metrics
from .sources import TokenizerCache, request_settings, volume_batches

PAIRS = (("generated", "real"), ("generated", "recon"), ("recon", "real"))


def run_fidelity(real: str | Path, out: str | Path, generated: str | Path | None = None, recon: str | Path | None = None,
                 tokenizers: TokenizerCache | None = None, inception_weights: str | Path | None = None,
                 inception_variant: str = "fid", skip_fid: bool = False, encoder: MAEFeatures | None = None,
                 image_size: int = 299, offsets: Sequence[int] = (0,), limit: int | None = None,
                 batch_size: int = 16, device: str = "cpu", progress: bool = True, montage_n: int = 4,
                 arm_field: str | None = None) -> dict[str, Any]:
    """Write ``fidelity.json``. ``arm_field`` (e.g. ``diagnosis``) adds per-arm distances: generated
    samples requested with one value against the real (and reconstructed) samples with that value,
    and their mean over arms (the paper pools FIDs over its generation arms)."""
    out = Path(out)
    model = digest = None
    if not skip_fid:  # fail before any expensive decoding when the weights are absent
        model, digest = load_inception(inception_weights, inception_variant, device)
    if skip_fid and encoder is None:
        raise InputError("nothing to measure: FID skipped and no --encoder given for the encoder Frechet distance")
    if generated is None and recon is None:
        raise InputError("give --generated and/or --recon to compare with --real")
    auto_tok = None
    if recon is not None and str(recon) == "auto":
        # the paper's protocol: the same real volumes through the tokenizer that made the generated latents
        from .data import open_set

        if tokenizers is None or generated is None:
            raise InputError("--recon auto needs --generated (a latents set naming its tokenizer) and a tokenizer checkpoint")
        gen_set = open_set(generated)
        if gen_set.kind != "latents" and not tokenizers.name:
            raise InputError("--recon auto: --generated is not a latents set; name the tokenizer with --tokenizer")
        auto_tok = tokenizers.for_set(gen_set)
    accs: dict[str, _Acc] = {name: _Acc() for name in ("real", "generated", "recon")
                             if name == "real" or (name == "generated" and generated is not None) or
                             (name == "recon" and recon is not None)}

    def feed(name: str, vols: list[np.ndarray], metas: list[dict]) -> None:
        acc = accs[name]
        acc.metas.extend(metas)
        acc.montage.extend(vols[: max(0, montage_n - len(acc.montage))])
        if model is not None:
            f = slice_features(model, vols, VIEWS, offsets, image_size, batch_size, device, False)
            for view in VIEWS:
                acc.slices[view].append(f[view])
        if encoder is not None:
            acc.enc.append(encoder(vols))

    # streamed: one batch of volumes in memory at a time, only features are kept
    for _, metas, vols in volume_batches(real, tokenizers, limit, 4, progress):
        feed("real", vols, metas)
        if auto_tok is not None:
            feed("recon", auto_tok.reconstruct(vols), metas)
    for name, path in (("generated", generated), ("recon", recon)):
        if path is not None and str(path) != "auto":
            for _, metas, vols in volume_batches(path, tokenizers, limit, 4, progress):
                feed(name, vols, metas)
    pairs = [p for p in PAIRS if p[0] in accs and p[1] in accs]
    results: dict[str, Any] = {"n": {k: len(v.metas) for k, v in accs.items()}, "fid": {}, "encoder_fd": {}, "figures": {}}
    feats = {name: acc.slice_arrays() for name, acc in accs.items()} if model is not None else None
    efeats = {name: np.concatenate(acc.enc) for name, acc in accs.items()} if encoder is not None else None
    if feats is not None:
        for a, b in pairs:
            row = {view: frechet_between(feats[a][view], feats[b][view]) for view in VIEWS}
            row["pooled"] = frechet_between(np.concatenate([feats[a][v] for v in VIEWS]),
                                            np.concatenate([feats[b][v] for v in VIEWS]))
            results["fid"][f"{a}_vs_{b}"] = row
    if efeats is not None:
        for a, b in pairs:
            results["encoder_fd"][f"{a}_vs_{b}"] = frechet_between(efeats[a], efeats[b])
    if arm_field:
        results["arms"], results["arms_mean"], results["arms_skipped"] = _arms(
            arm_field, {k: v.metas for k, v in accs.items()}, pairs, feats, efeats, len(offsets))
    rows, labels = [], []
    for name, acc in accs.items():
        for i, v in enumerate(acc.montage):
            rows.append(v)
            labels.append(f"{name} {i}")
    volume_montage(rows, labels, out / "fidelity_montage.png")
    results["figures"]["fidelity_montage"] = "fidelity_montage.png"
    inputs = [input_ref(p, role) for p, role in ((real, "real"), (generated, "generated"), (recon, "recon"))
              if p is not None and str(p) != "auto"]
    settings = {
        "space": "brain z-score (real: z-scored from scanner units; latents: decoded by their tokenizer)",
        "fid": None if model is None else {
            "feature_extractor": "inception-v3 pool3 (2048-d)", "variant": inception_variant,
            "weights": str(inception_weights), "weights_digest": digest, "image_size": image_size,
            "views": list(VIEWS), "slice": "central plane per view", "slice_offsets": list(offsets),
            "intensity": "per volume: [p0.5, p99.5] of non-zero voxels -> [0, 1], grey replicated to RGB",
            "resize": "bilinear",
        },
        "encoder_fd": None if encoder is None else {"encoder": encoder.weights, "encoder_digest": encoder.digest,
                                                    "features": "mean over tokens"},
        "recon": "real volumes reconstructed here by the generated set's tokenizer" if str(recon) == "auto" else recon,
        "arm_field": arm_field,
        "limit": limit,
        "tokenizers": tokenizers.provenance() if tokenizers is not None else [],
        "generation": request_settings(accs["generated"].metas) if "generated" in accs else None,
        "precision": "fp32 features; decoding precision per tokenizer (see tokenizers)",
        "device": device,
    }
    return write_metrics(out / "fidelity.json", "fidelity", settings, inputs, results)


class _Acc:
    """What is kept of one set while streaming: metadata, a few volumes for the montage, features."""

    def __init__(self) -> None:
        self.metas: list[dict[str, Any]] = []
        self.montage: list[np.ndarray] = []
        self.slices: dict[str, list[np.ndarray]] = {v: [] for v in VIEWS}
        self.enc: list[np.ndarray] = []

    def slice_arrays(self) -> dict[str, np.ndarray]:
        return {v: np.concatenate(f) for v, f in self.slices.items()}


def _arms(field: str, sets: dict[str, list[dict[str, Any]]], pairs: list[tuple[str, str]], feats: dict[str, Any] | None,
          efeats: dict[str, np.ndarray] | None, n_offsets: int) -> tuple[dict, dict, dict]:
    """Distances per value of ``field`` (the generation arm) and their mean over arms."""
    from .data import label_of

    labels = {name: [label_of(m.get(field)) for m in metas] for name, metas in sets.items()}
    values = sorted({v for v in labels.get("generated", labels["real"]) if v is not None})
    arms: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for val in values:
        idx = {name: [i for i, lab in enumerate(labels[name]) if lab == val] for name in sets}
        small = {name: len(ix) for name, ix in idx.items() if len(ix) < 2}
        if small:
            skipped[val] = f"fewer than 2 samples in {small}"
            continue
        arm: dict[str, Any] = {"n": {name: len(ix) for name, ix in idx.items()}, "fid_pooled": {}, "encoder_fd": {}}
        for a, b in pairs:
            if feats is not None:
                ra = [i * n_offsets + k for i in idx[a] for k in range(n_offsets)]
                rb = [i * n_offsets + k for i in idx[b] for k in range(n_offsets)]
                arm["fid_pooled"][f"{a}_vs_{b}"] = frechet_between(np.concatenate([feats[a][v][ra] for v in VIEWS]),
                                                                   np.concatenate([feats[b][v][rb] for v in VIEWS]))
            if efeats is not None:
                arm["encoder_fd"][f"{a}_vs_{b}"] = frechet_between(efeats[a][idx[a]], efeats[b][idx[b]])
        arms[val] = arm
    mean: dict[str, Any] = {"fid_pooled": {}, "encoder_fd": {}}
    for kind in mean:
        for a, b in pairs:
            vals = [arm[kind][f"{a}_vs_{b}"] for arm in arms.values() if f"{a}_vs_{b}" in arm[kind]]
            if vals:
                mean[kind][f"{a}_vs_{b}"] = float(np.mean(vals))
    return arms, mean, skipped
