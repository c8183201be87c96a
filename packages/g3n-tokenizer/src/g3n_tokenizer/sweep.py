"""The bottleneck sweep of docs/method.md §3 (Table 5): MAE-CNN at several c, and AutoencoderKL.

On one cohort (a ``volumes`` set), subjects are split once into test (``test_fraction``),
validation (early stopping) and training. Every arm is trained on the same training subjects,
scored on the same test subjects (MSE, PSNR, SSIM in z-scored space; see :mod:`.metrics`), and its
latents (mean over tokens: the projected features) are probed with g3n-probe's subject-grouped
cross-validation over all volumes of the cohort (IDH1 and tumour grade by default). The table is
written as ``table5.csv`` and ``table5.md`` with the per-arm details in ``sweep.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

import g3n_shards as gs

from .base import TorchTokenizer, volume_geometry_from
from .build import new_tokenizer
from .checkpoint import atomic_write_text
from .config import TokenizerConfig, preset
from .data import iter_batches, split_subjects
from .interface import values_per_volume
from .metrics import reconstruction_metrics, summarize
from .train import train_tokenizer


class SweepConfig(BaseModel):
    """What the sweep trains and how it scores. ``c`` entries of ``None`` mean no projection."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "paper"
    c_values: list[int | None] = Field(default_factory=lambda: [32, 128, 512, None])
    autoencoderkl: bool = True
    test_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    probe_tasks: list[str] = Field(default_factory=lambda: ["idh1", "tumour_grade"])
    probe_slice: str = "all"
    probe_protocol: str = "paper"
    probe_features: Literal["mean"] = "mean"
    batch_size: int = Field(2, ge=1, description="inference batch size")
    overrides: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the tokenizer preset")


def arm_label(name: str, c: int | None, hidden: int | None = None) -> str:
    if name == "autoencoderkl":
        return "AutoencoderKL"
    return f"MAE c={c}" if c is not None else f"MAE no projection ({hidden})" if hidden else "MAE no projection"


@torch.no_grad()
def evaluate(tok: TorchTokenizer, ss: gs.ShardSet, test_keys: list[str], all_keys: list[str], batch_size: int
             ) -> tuple[dict[str, float], np.ndarray, list[str], list[gs.SampleMeta]]:
    """Test-split reconstruction metrics, and mean-over-token latent features of ``all_keys``."""
    shape = tuple(tok.geometry.shape or ())
    per: dict[str, list[float]] = {"mse": [], "psnr": [], "ssim": []}
    feats, keys, metas = [], [], []
    test = set(test_keys)
    for b in iter_batches(ss, all_keys, batch_size, shape):
        x = b.volumes.to(tok.device)
        z = tok.encode(x)
        feats.append(z.mean(1).cpu().numpy())
        keys += b.keys
        metas += b.metas
        sel = [i for i, k in enumerate(b.keys) if k in test]
        if sel:
            recon = tok.decode(z[sel])
            for k, v in reconstruction_metrics(recon.cpu(), x[sel].cpu()).items():
                per[k] += v
    return {k: summarize(v) for k, v in per.items()}, np.concatenate(feats), keys, metas


def probe_aucs(X: np.ndarray, keys: list[str], metas: list[gs.SampleMeta], cfg: SweepConfig, name: str
               ) -> tuple[dict[str, float], dict[str, str]]:
    """AUC per probe task (g3n-probe, grouped CV); NaN with a reason where a task cannot be scored."""
    return latent_probe_aucs(X, keys, [m.model_dump(mode="json") for m in metas], cfg.probe_tasks, cfg.probe_slice,
                             cfg.probe_protocol, name)


def latent_probe_aucs(X: np.ndarray, keys: list[str], records: list[dict[str, Any]], tasks: list[str],
                      probe_slice: str, protocol: str, name: str) -> tuple[dict[str, float], dict[str, str]]:
    """Table 5's probe columns: the AUC of each task on one slice by g3n-probe's subject-grouped
    cross-validation of latent features (``X``, one row per key); NaN with the reason where a task
    cannot be scored (too few labelled subjects, one class)."""
    try:
        import g3n_probe as gp
    except ImportError:
        raise RuntimeError("the sweep's probe columns need g3n-probe: install g3n-tokenizer[sweep]") from None

    panel = gp.load_panel().subset(tasks)
    panel = panel.model_copy(update={"tasks": [t.model_copy(update={"slices": [probe_slice]}) for t in panel.tasks]})
    records = [{**r, "key": k} for k, r in zip(keys, records, strict=True)]
    fs = gp.from_arrays(X.astype(np.float64), records, name=name, keys=keys)
    res = gp.run_panel(fs, panel, gp.protocol_preset(protocol, save_probes=False), progress=False)
    aucs, notes = {}, {}
    for t in tasks:
        r = res.get(t, probe_slice)
        aucs[t] = r.summary("auc")[0] if r is not None else math.nan
        if r is None:
            notes[t] = "; ".join(s.reason for s in res.skipped if s.task == t) or "not scored"
    return aucs, notes


def _table(rows: list[dict[str, Any]], tasks: list[str]) -> tuple[str, str]:
    cols = ["tokenizer", "values_per_volume", "mse", "psnr", "ssim"] + [f"{t}_auc" for t in tasks]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6g}" for c in cols])

    def fmt(v: Any, c: str) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            return f"{v:.2f}" if c == "psnr" else f"{v:.3f}"
        if c == "values_per_volume":
            return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}K" if v >= 1e3 else str(v)
        return str(v)

    head = ["tokenizer", "values/volume", "MSE", "PSNR", "SSIM"] + [f"{t} AUC" for t in tasks]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(fmt(r[c], c) for c in cols) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def _nan_to_none(obj: Any) -> Any:
    """Strict JSON: NaN/Inf (an unscored task) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def run_sweep(volumes: str | Path | gs.ShardSet, mae_checkpoint: str | Path, out_dir: str | Path,
              cfg: SweepConfig | None = None, device: str | torch.device = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Train and score every arm (see module doc); returns the table rows."""
    cfg = cfg or SweepConfig()
    ss = volumes if isinstance(volumes, gs.ShardSet) else gs.ShardSet.open(volumes, kind="volumes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base: TokenizerConfig = preset(cfg.preset, **cfg.overrides)
    meta = ss.metadata()
    splits = split_subjects(meta, {"test": cfg.test_fraction, "val": base.train.val_fraction}, seed=cfg.seed)
    train_splits = {"train": splits["train"], "val": splits["val"]}
    all_keys = sorted(meta)
    shape = ss.manifest.geometry.shape
    arms: list[tuple[str, int | None]] = [("mae-cnn", c) for c in cfg.c_values]
    if cfg.autoencoderkl:
        arms.append(("autoencoderkl", None))
    rows, details = [], []
    for name, c in tqdm(arms, desc="sweep", unit="arm", disable=not progress):
        arm_cfg = base.model_copy(update={"mae_cnn": base.mae_cnn.model_copy(update={"c": c})}) if name == "mae-cnn" else base
        tok, loss_kind = new_tokenizer(name, arm_cfg, volume_geometry_from(ss.manifest.geometry), mae_checkpoint,
                                       shape, device)
        if name == "mae-cnn":
            run, label = f"mae-c{c if c is not None else 'none'}", arm_label(name, c, tok.mae_cfg.embed_dim)
        else:
            run, label = "autoencoderkl", arm_label(name, None)
        result = train_tokenizer(tok, ss, base.train, out / run, splits=train_splits, loss_kind=loss_kind, progress=progress)
        best = type(tok).from_checkpoint(result.checkpoint, map_location=device)
        recon, X, keys, metas = evaluate(best, ss, splits["test"], all_keys, cfg.batch_size)
        aucs, notes = probe_aucs(X, keys, metas, cfg, label)
        row = {"tokenizer": label, "values_per_volume": values_per_volume(best), **recon,
               **{f"{t}_auc": aucs[t] for t in cfg.probe_tasks}}
        rows.append(row)
        details.append({**row, "run": run, "checkpoint": str(result.checkpoint), "checkpoint_digest": result.digest,
                        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "best_val": result.best_val,
                        "stopped_early": result.stopped_early, "probe_notes": notes})
    csv_text, md = _table(rows, cfg.probe_tasks)
    atomic_write_text(out / "table5.csv", csv_text)
    header = (f"# Bottleneck sweep (docs/method.md Table 5)\n\nvolumes set `{ss.manifest.digest}` ({len(ss)} volumes, "
              f"{len(set(m.subject for m in meta.values()))} subjects); test split {len(splits['test'])} volumes, "
              f"validation {len(splits['val'])}, training {len(splits['train'])}. MSE/PSNR/SSIM on the test split in "
              f"z-scored space; AUCs: g3n-probe grouped CV ({cfg.probe_protocol} protocol) on the mean over tokens of the "
              f"latents of all volumes, slice `{cfg.probe_slice}`.\n\n")
    atomic_write_text(out / "table5.md", header + md)
    doc = {"config": cfg.model_dump(mode="json"), "splits": {k: len(v) for k, v in splits.items()},
           "volumes": ss.manifest.digest, "arms": details}
    atomic_write_text(out / "sweep.json", json.dumps(_nan_to_none(doc), indent=1, default=str, allow_nan=False))
    return rows
