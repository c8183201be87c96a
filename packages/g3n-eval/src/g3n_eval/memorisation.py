"""Memorisation audit (docs/method.md §7): are synthetic latents copies of training latents?

For every synthetic sample, the L2 distance to its nearest training latent (flattened, e.g.
1200 x 32 = 38,400-d) is compared with the same distance for *held-out real* samples, which no
model saw: a generator that memorises puts synthetic samples much closer to the training set
than real unseen data ever gets.

Reported: both distance distributions, the ratio of their means (synthetic / held-out; > 1 in
the paper), and the fraction of synthetic samples closer to the training set than the
``percentile``-th percentile (1st by default) of the held-out-to-train distances.

The gate. By chance a sample from the data distribution falls below that line with probability
p = max(percentile / 100, 1 / (n_heldout + 1)) (with few held-out samples the percentile is
about their minimum). The excess counts as memorisation only when it is both large
(fraction > ``max_fraction_below``, default 5 %) and significant (one-sided binomial test,
p-value < ``alpha``, default 0.001), so sampling noise on small sets does not block sharing.
The ratio of means must reach ``min_ratio`` (default 0.9; ``min_ratio=1.0`` is the paper's
strict reading). Exact copies (distance at most ``copy_tol`` times the median held-out
distance) always fail the gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .data import InputError


class MemorisationConfig(BaseModel):
    """Thresholds of the audit and its gate (all recorded in the metrics file)."""

    model_config = ConfigDict(extra="forbid")
    percentile: float = Field(default=1.0, gt=0, lt=100, description="low percentile of held-out-to-train distances")
    max_fraction_below: float = Field(default=0.05, ge=0, le=1)
    min_ratio: float = Field(default=0.9, gt=0)
    alpha: float = Field(default=1e-3, gt=0, lt=1, description="significance of the excess below the threshold")
    copy_tol: float = Field(default=1e-6, ge=0, description="relative to the median held-out distance")
    chunk: int = Field(default=1024, ge=1, description="rows per distance block (memory only)")


@dataclass
class MemorisationResult:
    n_synthetic: int
    n_train: int
    n_heldout: int
    dim: int
    syn_to_train: dict[str, float]
    heldout_to_train: dict[str, float]
    ratio_of_means: float
    threshold: float
    fraction_below: float
    n_below: int
    expected_fraction: float
    p_value: float
    n_copies: int
    memorisation: bool
    reasons: list[str] = field(default_factory=list)
    nearest_train_index: list[int] = field(default_factory=list)
    syn_distances: list[float] = field(default_factory=list)
    heldout_distances: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def flatten(latents: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(latents)
    if a.ndim < 2 or a.shape[0] == 0:
        raise InputError(f"{name}: expected (n, ...) with n >= 1, got shape {a.shape}")
    a = a.reshape(a.shape[0], -1).astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise InputError(f"{name}: latents contain NaN or Inf")
    return a


def nearest_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """L2 distance from each query row to its nearest reference row, and that row's index."""
    q, r = np.asarray(queries, np.float64), np.asarray(reference, np.float64)
    if q.shape[1] != r.shape[1]:
        raise InputError(f"dimension mismatch: {q.shape[1]} vs {r.shape[1]}")
    r2 = (r * r).sum(1)
    dist = np.empty(q.shape[0])
    idx = np.empty(q.shape[0], dtype=np.int64)
    for s in range(0, q.shape[0], chunk):
        block = q[s : s + chunk]
        d2 = (block * block).sum(1)[:, None] + r2[None, :] - 2.0 * block @ r.T
        j = np.argmin(d2, axis=1)
        # recompute the winners exactly: the expansion above loses precision for near-copies
        best = block - r[j]
        dist[s : s + chunk] = np.sqrt((best * best).sum(1))
        idx[s : s + chunk] = j
    return dist, idx


def _stats(d: np.ndarray) -> dict[str, float]:
    return {"mean": float(d.mean()), "std": float(d.std()), "min": float(d.min()),
            "p01": float(np.percentile(d, 1)), "median": float(np.median(d)), "max": float(d.max())}


def audit(synthetic: np.ndarray, train: np.ndarray, heldout: np.ndarray,
          config: MemorisationConfig | None = None) -> MemorisationResult:
    """Run the audit on three arrays of latents, (n, ...) each; flattened per sample."""
    cfg = config or MemorisationConfig()
    S, T, H = flatten(synthetic, "synthetic"), flatten(train, "train"), flatten(heldout, "heldout")
    if not (S.shape[1] == T.shape[1] == H.shape[1]):
        raise InputError(f"latent sizes differ: synthetic {S.shape[1]}, train {T.shape[1]}, heldout {H.shape[1]}")
    if H.shape[0] < 2:
        raise InputError("heldout: need at least 2 held-out real samples for a reference distribution")
    ds, js = nearest_distances(S, T, cfg.chunk)
    dh, _ = nearest_distances(H, T, cfg.chunk)
    threshold = float(np.percentile(dh, cfg.percentile))
    mean_h = float(dh.mean())
    ratio = float(ds.mean() / mean_h) if mean_h > 0 else float("inf")
    below = int((ds < threshold).sum())
    frac = below / len(ds)
    copies = int((ds <= cfg.copy_tol * max(float(np.median(dh)), 1e-30)).sum())
    reasons = []
    if copies:
        reasons.append(f"{copies} synthetic sample(s) are copies of training latents")
    from scipy.stats import binom

    p_chance = max(cfg.percentile / 100.0, 1.0 / (len(H) + 1))
    p_value = float(binom.sf(below - 1, len(ds), p_chance)) if below else 1.0
    if frac > cfg.max_fraction_below and p_value < cfg.alpha:
        reasons.append(f"{frac:.3f} of synthetic samples are closer to the training set than the "
                       f"percentile {cfg.percentile:g} of held-out distances (chance {p_chance:.3f}, "
                       f"allowed {cfg.max_fraction_below:g}, binomial p = {p_value:.2g})")
    if ratio < cfg.min_ratio:
        reasons.append(f"ratio of mean distances {ratio:.3f} < {cfg.min_ratio:g}")
    return MemorisationResult(
        n_synthetic=len(S), n_train=len(T), n_heldout=len(H), dim=int(S.shape[1]),
        syn_to_train=_stats(ds), heldout_to_train=_stats(dh), ratio_of_means=ratio, threshold=threshold,
        fraction_below=frac, n_below=below, expected_fraction=p_chance, p_value=p_value, n_copies=copies, memorisation=bool(reasons), reasons=reasons,
        nearest_train_index=js.tolist(), syn_distances=ds.tolist(), heldout_distances=dh.tolist(),
    )


def histogram_png(syn: np.ndarray, held: np.ndarray, threshold: float, path, bins: int = 30) -> None:
    """Overlaid histograms of the two distance distributions (red: synthetic, blue: held-out),
    with the threshold as a black line. Pillow only."""
    import io

    from PIL import Image, ImageDraw

    from .records import atomic_write_bytes

    syn, held = np.asarray(syn, float), np.asarray(held, float)
    lo, hi = float(min(syn.min(), held.min())), float(max(syn.max(), held.max()))
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    hs, _ = np.histogram(syn, edges)
    hh, _ = np.histogram(held, edges)
    hs, hh = hs / max(len(syn), 1), hh / max(len(held), 1)
    W, H, pad = 480, 220, 24
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    top = max(hs.max(), hh.max()) or 1.0
    bw = (W - 2 * pad) / bins
    for k in range(bins):
        x0 = pad + k * bw
        for h, colour, off in ((hh, (60, 90, 200), 0.0), (hs, (210, 60, 50), bw / 2)):
            y = H - pad - (H - 2 * pad) * h[k] / top
            d.rectangle([x0 + off, y, x0 + off + bw / 2 - 1, H - pad], fill=colour)
    xt = pad + (W - 2 * pad) * (threshold - lo) / (hi - lo)
    d.line([xt, pad, xt, H - pad], fill="black", width=2)
    d.line([pad, H - pad, W - pad, H - pad], fill="black")
    d.text((pad, 4), "NN distance to train: synthetic (red) vs held-out real (blue)", fill="black")
    d.text((pad, H - pad + 4), f"{lo:.3g}", fill="black")
    d.text((W - pad - 40, H - pad + 4), f"{hi:.3g}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def run_memorisation(synthetic, train, heldout, out, config: MemorisationConfig | None = None) -> dict:
    """Audit three latent sources (shard sets or .npy) and write ``memorisation.json``."""
    from pathlib import Path

    from .data import load_matrix
    from .records import input_ref, write_metrics

    cfg = config or MemorisationConfig()
    out = Path(out)
    S, skeys, _ = load_matrix(synthetic, "synthetic")
    T, tkeys, _ = load_matrix(train, "train")
    H, hkeys, _ = load_matrix(heldout, "heldout")
    overlap = sorted(set(tkeys) & set(hkeys)) if Path(train).is_dir() and Path(heldout).is_dir() else []
    if overlap:
        raise InputError(f"{heldout}: {len(overlap)} held-out sample(s) are also in the training set, e.g. {overlap[:3]}")
    r = audit(S, T, H, cfg)
    histogram_png(np.asarray(r.syn_distances), np.asarray(r.heldout_distances), r.threshold, out / "memorisation_hist.png")
    res = r.as_dict()
    res["nearest"] = [{"synthetic": s, "train": tkeys[j], "distance": d}
                      for s, j, d in zip(skeys, res.pop("nearest_train_index"), res.pop("syn_distances"))]
    res["figures"] = {"memorisation_hist": "memorisation_hist.png"}
    settings = {**cfg.model_dump(), "distance": "L2 on flattened latents (float64)",
                "reference": "held-out real to train nearest-neighbour distances"}
    inputs = [input_ref(synthetic, "synthetic"), input_ref(train, "train"), input_ref(heldout, "held-out real")]
    return write_metrics(out / "memorisation.json", "memorisation", settings, inputs, res)
