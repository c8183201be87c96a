"""Inference stages that write synthetic ``latents`` sets: sample, forecast, counterfactual.

Every written sample carries ``meta.synthetic = True`` and ``meta.request``: the conditions asked
for, the sampler, steps, guidance scales, precision, seed (or source sample) and the digest of
the checkpoint weights -- enough to regenerate it bit for bit on the same hardware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import g3n_shards as gs
import torch
from tqdm import tqdm

from .bridge import forecast
from .conditions import Condition, ConditionError, encode
from .config import SampleConfig
from .counterfactual import apply_changes, counterfactual
from .data import load_latents, meta_value, synthetic_meta, synthetic_writer
from .flow import initial_noise, resolve_scales, sample
from .train import load_model


@dataclass
class GenerationRequest:
    """``n`` samples with the same conditions (condition name -> value; absent = null)."""

    conditions: dict[str, Any]
    n: int = 1


def _fields(conds: Sequence[Condition], request: Mapping[str, Any]) -> dict[str, Any]:
    """Condition values -> metadata fields (a condition's ``field``; fields SampleMeta lacks are skipped)."""
    return {
        c.spec.field: meta_value(c.spec.field, request.get(c.name))
        for c in conds
        if request.get(c.name) is not None and c.spec.field in gs.SampleMeta.model_fields
    }


def _checkpoint_info(ck, weights: str) -> dict[str, Any]:
    return {"digest": ck.digest(weights), "step": ck.step, "weights": weights, "path": str(ck.path)}


def _generator_ref(ck, weights: str) -> gs.ModelRef:
    return gs.ModelRef(
        name="g3n-dit", checkpoint_digest=ck.digest(weights), checkpoint_path=str(ck.path),
        config={"task": ck.run_config.task, "step": ck.step, "weights": weights},
    )  # fmt: skip


def _parents(ck) -> list[gs.ParentRef]:
    d = ck.state.get("data", {})
    return [gs.ParentRef(kind="latents", digest=d["digest"], path=d.get("location"))] if d.get("digest") else []


def sample_latents(
    checkpoint: str | Path,
    requests: Sequence[GenerationRequest],
    out_dir: str | Path,
    cfg: SampleConfig = SampleConfig(),
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> gs.Manifest:
    """Generate latents for every request; sample i of the run uses seed ``cfg.seed + i``, or with
    ``cfg.paired`` sample j of each request uses ``cfg.seed + j`` (the same noise for every request)."""
    model, conds, (mean, std), ck = load_model(checkpoint, cfg.weights, device)
    if ck.run_config.task != "generation":
        raise ConditionError(f"{ck.path}: a {ck.run_config.task} checkpoint cannot sample from noise; use forecast")
    scales = resolve_scales(conds, cfg.guidance, cfg.guidance_per_condition)
    flat: list[dict[str, Any]] = []
    seeds: list[int] = []
    for r in requests:
        encode(conds, [r.conditions])  # validate before any work
        if "modality" in {c.spec.field for c in conds} and not _fields(conds, r.conditions).get("modality"):
            raise ConditionError("every generated latent needs a modality (metadata requires it): request one, e.g. modality=T1")
        seeds += [cfg.seed + j + (0 if cfg.paired else len(flat)) for j in range(r.n)]
        flat += [dict(r.conditions)] * r.n
    shape = (ck.run_config.model.num_tokens, ck.run_config.model.channels)
    data_state = ck.state.get("data", {})
    w = synthetic_writer(
        out_dir, geometry=data_state.get("geometry") or {}, tokenizer=data_state.get("tokenizer"),
        generator=_generator_ref(ck, cfg.weights), producer_config={"stage": "sample", **cfg.model_dump(mode="json")},
        parents=_parents(ck), overwrite=overwrite,
    )  # fmt: skip
    ck_info = _checkpoint_info(ck, cfg.weights)
    with w:
        bar = tqdm(total=len(flat), desc="sample", unit="latent", disable=not progress)
        for start in range(0, len(flat), cfg.batch_size):
            reqs, sds = flat[start : start + cfg.batch_size], seeds[start : start + cfg.batch_size]
            x = sample(model, conds, encode(conds, reqs), initial_noise(sds, shape), scales,
                       cfg.steps, cfg.method, cfg.precision)  # fmt: skip
            x = (x * std + mean).cpu().numpy()
            for j, (req, seed) in enumerate(zip(reqs, sds)):
                i = start + j
                request = {
                    "stage": "sample", "conditions": req, "sampler": cfg.method, "steps": cfg.steps,
                    "guidance": {c.name: scales[c.name] for c in conds if not c.spec.always_on},
                    "precision": cfg.precision, "seed": seed, "paired": cfg.paired, "checkpoint": ck_info,
                }  # fmt: skip
                fields = _fields(conds, req)
                # paired runs reuse seeds across requests: the sample's index keeps subjects distinct
                fields.update(subject=f"syn-{ck.digest(cfg.weights)[7:15]}-{f'{i}-' if cfg.paired else ''}{seed}",
                              cohort="synthetic")
                meta = synthetic_meta(fields, request, source=f"sample seed {seed}")
                w.write(gs.sample_key(meta), meta, {"latent": x[j]})
            bar.update(len(reqs))
        bar.close()
    assert w.manifest is not None
    return w.manifest


def _check_change_names(conds: Sequence[Condition], changes: Mapping[str, Any]) -> None:
    """Unknown condition names or labels in a requested change are the user's error, not the data's."""
    by_name = {c.name: c for c in conds}
    unknown = set(changes) - set(by_name)
    if unknown:
        raise ConditionError(f"unknown condition(s) {sorted(unknown)}; known: {sorted(by_name)}")
    for name, value in changes.items():
        c = by_name[name]
        if c.categorical and value is not None and str(value).lower() not in ("null", "none"):
            c.index(value)


def _rejects(out_dir: str | Path, overwrite: bool) -> gs.RejectLog:
    path = Path(out_dir) / gs.REJECTS_NAME
    if overwrite and path.exists():
        path.unlink()
    return gs.RejectLog(path)


def _derived_writer(out_dir: str | Path, src: Any, ck: Any, weights: str, producer_config: dict[str, Any],
                    overwrite: bool) -> gs.ShardWriter:
    """The writer of a synthetic set made from real source latents (forecasts, counterfactuals):
    the source's geometry and tokenizer (else the checkpoint's data), its digest among the parents."""
    data = ck.state["data"]
    return synthetic_writer(
        out_dir, geometry=src.geometry or data.get("geometry") or {}, tokenizer=src.tokenizer or data.get("tokenizer"),
        generator=_generator_ref(ck, weights), producer_config=producer_config,
        parents=([gs.ParentRef(kind="latents", digest=src.digest, path=src.location)] if src.digest else []) + _parents(ck),
        overwrite=overwrite,
    )  # fmt: skip


def _ode_settings(conds: Sequence[Condition], scales: Mapping[str, float], method: str, steps: int, precision: str,
                  ck_info: dict[str, Any]) -> dict[str, Any]:
    """What every deterministic (source-driven) sample records about how it was integrated."""
    return {"sampler": method, "steps": steps, "guidance": {c.name: scales[c.name] for c in conds if not c.spec.always_on},
            "precision": precision, "seed": None, "checkpoint": ck_info}


def _source_fields(base: Mapping[str, Any]) -> dict[str, Any]:
    """A source sample's metadata, less what describes the source itself rather than the subject."""
    return {k: v for k, v in base.items() if k not in ("extra", "request", "synthetic", "source_sha256")}


def _source_requests(conds: Sequence[Condition], metas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{c.name: m.get(c.spec.field) for c in conds} for m in metas]


def forecast_latents(
    checkpoint: str | Path,
    baselines: str | Path,
    intervals: Sequence[float],
    out_dir: str | Path,
    keys: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    steps: int = 100,
    method: str = "euler",
    guidance: float = 1.0,
    guidance_per_condition: Mapping[str, float] | None = None,
    weights: str = "ema",
    precision: str = "fp32",
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    segment_years: float | None | Literal["checkpoint"] = "checkpoint",
) -> gs.Manifest:
    """Forecast each baseline latent at each interval (years) with the longitudinal bridge.

    ``segment_years``: chain segments no longer than this (see :func:`bridge.forecast`); by
    default the checkpoint's ``bridge.segment_years``, None: one jump."""
    model, conds, (mean, std), ck = load_model(checkpoint, weights, device)
    rc = ck.run_config
    if rc.task != "longitudinal" or rc.bridge is None:
        raise ConditionError(f"{ck.path}: not a longitudinal checkpoint (task {rc.task!r})")
    bridge = rc.bridge if segment_years == "checkpoint" else rc.bridge.model_copy(update={"segment_years": segment_years})
    by_field = {c.spec.field: c for c in conds}
    if "interval" not in by_field:
        raise ConditionError(f"{ck.path}: the model has no 'interval' condition")
    _check_change_names(conds, overrides or {})
    rejects = _rejects(out_dir, overwrite)
    src = load_latents(baselines, keys=keys, rejects=rejects, progress=progress)
    src.check_model(rc.model)
    scales = resolve_scales(conds, guidance, guidance_per_condition)
    jobs = []  # (source index, interval, request)
    for i, m in enumerate(src.metas):
        rec = dict(m)
        rec["baseline_age"] = m.get("age")
        for dt in intervals:
            rec_i = {**rec, "interval": float(dt)}
            try:
                req = apply_changes(conds, {c.name: rec_i.get(c.spec.field) for c in conds}, overrides or {})
                encode(conds, [req])
            except ConditionError as e:  # e.g. a baseline diagnosis the model does not know
                rejects.add(src.location, m.get("subject"), "forecast", str(e), key=src.keys[i], interval=float(dt))
                continue
            jobs.append((i, float(dt), req))
    if not jobs:
        raise ConditionError(f"{baselines}: no baseline could be forecast (see {rejects.path})")
    ode_settings = _ode_settings(conds, scales, method, steps, precision, _checkpoint_info(ck, weights))
    ode_settings["segment_years"] = bridge.segment_years
    w = _derived_writer(out_dir, src, ck, weights, {"stage": "forecast", "steps": steps, "method": method, "guidance": scales,
                                                    "segment_years": bridge.segment_years}, overwrite)
    with w:
        bar = tqdm(total=len(jobs), desc="forecast", unit="latent", disable=not progress)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            xb = torch.stack([src.latents[i] for i, _, _ in chunk])
            xb = (xb.to(mean.device) - mean) / std
            x = forecast(model, conds, xb, encode(conds, [r for _, _, r in chunk]), scales, bridge, steps, method, precision)
            x = (x * std + mean).cpu().numpy()
            for j, (i, dt, req) in enumerate(chunk):
                base = src.metas[i]
                request = {"stage": "forecast", "source": {"key": src.keys[i], "set": src.digest}, "interval": dt,
                           "conditions": req, **ode_settings}
                fields = _source_fields(base)
                fields.update(_fields(conds, req))
                fields["age"] = base["age"] + dt if base.get("age") is not None else None
                fields["session"] = f"{base.get('session') or 'ses'}-fc{dt:g}y"
                meta = synthetic_meta(fields, request, source=f"forecast of {src.keys[i]}")
                w.write(gs.sample_key(meta), meta, {"latent": x[j]})
            bar.update(len(chunk))
        bar.close()
    assert w.manifest is not None
    return w.manifest


def counterfactual_latents(
    checkpoint: str | Path,
    source: str | Path,
    changes: Mapping[str, Any],
    out_dir: str | Path,
    keys: Sequence[str] | None = None,
    steps: int = 50,
    method: str = "heun",
    guidance: float = 1.0,
    guidance_per_condition: Mapping[str, float] | None = None,
    weights: str = "ema",
    precision: str = "fp32",
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> gs.Manifest:
    """Invert each source latent under its own conditions, regenerate under the changed ones."""
    model, conds, (mean, std), ck = load_model(checkpoint, weights, device)
    if ck.run_config.task != "generation":
        raise ConditionError(f"{ck.path}: counterfactuals need a generation checkpoint")
    if not changes:
        raise ConditionError("no change requested (e.g. disease=AD, age=+10)")
    _check_change_names(conds, changes)
    rejects = _rejects(out_dir, overwrite)
    src = load_latents(source, keys=keys, rejects=rejects, progress=progress)
    src.check_model(ck.run_config.model)
    scales = resolve_scales(conds, guidance, guidance_per_condition)
    todo, origs, news = [], {}, {}
    for i, req in enumerate(_source_requests(conds, src.metas)):
        try:
            new = apply_changes(conds, req, changes)
            encode(conds, [req, new])
        except ConditionError as e:  # e.g. age +10 for a subject whose age is unknown
            rejects.add(src.location, src.metas[i].get("subject"), "counterfactual", str(e), key=src.keys[i])
            continue
        todo.append(i)
        origs[i], news[i] = req, new
    if not todo:
        raise ConditionError(f"{source}: no source latent could be changed (see {rejects.path})")
    ode_settings = _ode_settings(conds, scales, method, steps, precision, _checkpoint_info(ck, weights))
    w = _derived_writer(out_dir, src, ck, weights,
                        {"stage": "counterfactual", "changes": dict(changes), "steps": steps, "method": method}, overwrite)
    with w:
        bar = tqdm(total=len(todo), desc="counterfactual", unit="latent", disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            x1 = (src.latents[chunk].to(mean.device) - mean) / std
            x, _ = counterfactual(model, conds, x1, encode(conds, [origs[i] for i in chunk]),
                                  encode(conds, [news[i] for i in chunk]), scales, steps, method, precision)  # fmt: skip
            x = (x * std + mean).cpu().numpy()
            for j, i in enumerate(chunk):
                base = src.metas[i]
                request = {
                    "stage": "counterfactual", "source": {"key": src.keys[i], "set": src.digest},
                    "original": origs[i], "changes": {k: (None if v is None else str(v)) for k, v in changes.items()},
                    "conditions": news[i], **ode_settings,
                }  # fmt: skip
                fields = _source_fields(base)
                for c in conds:
                    if c.name in changes and c.spec.field in gs.SampleMeta.model_fields:
                        fields[c.spec.field] = meta_value(c.spec.field, news[i][c.name])
                fields["session"] = f"{base.get('session') or 'ses'}-cf"
                meta = synthetic_meta(fields, request, source=f"counterfactual of {src.keys[i]}")
                w.write(gs.sample_key(meta), meta, {"latent": x[j]})
            bar.update(x.shape[0])
        bar.close()
    assert w.manifest is not None
    return w.manifest
