"""Generate a synthetic cohort in parallel and write it as a ``volumes`` shard set.

Subjects are rendered in worker processes and written in subject order, so the set (keys,
metadata and voxels) is the same for any ``workers``. Beside the shards the folder gets
``ground_truth.jsonl``: one line per volume with the subject's full plan (every latent factor),
the visit's effects, measured volumes and acquisition parameters (SYNTH.md explains them).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import g3n_shards as gs
from tqdm import tqdm

from .config import SynthConfig
from .design import SubjectPlan, plan_cohort
from .render import SynthVolume, render_subject
from .template import load_template

GROUND_TRUTH = "ground_truth.jsonl"

_WORKER_CFG: SynthConfig | None = None


def _init_worker(cfg_json: str) -> None:
    global _WORKER_CFG
    _WORKER_CFG = SynthConfig.model_validate_json(cfg_json)
    load_template(_WORKER_CFG.anatomy.vent_sigma_mm, _WORKER_CFG.anatomy.wmh_decay_mm)  # warm the per-process cache


def _render(plan: SubjectPlan) -> list[SynthVolume]:
    assert _WORKER_CFG is not None
    return render_subject(plan, _WORKER_CFG)


def count_volumes(plans: list[SubjectPlan]) -> int:
    return sum(len(v.modalities) for p in plans for v in p.visits)


def iter_cohort(cfg: SynthConfig, workers: int = 1, progress: bool = False,
                plans: list[SubjectPlan] | None = None) -> Iterator[SynthVolume]:
    """Yield every volume of the cohort in (subject, visit, modality) order.

    ``workers`` > 1 renders subjects in that many processes; the order and content of what is
    yielded do not depend on it (each subject's randomness comes from (seed, subject index))."""
    plans = plan_cohort(cfg) if plans is None else plans
    bar = tqdm(total=count_volumes(plans), unit="vol", desc="synth", disable=not progress)
    try:
        if workers <= 1:
            tpl = load_template(cfg.anatomy.vent_sigma_mm, cfg.anatomy.wmh_decay_mm)
            for p in plans:
                for v in render_subject(p, cfg, tpl):
                    bar.update(1)
                    yield v
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(cfg.model_dump_json(),)) as pool:
            for vols in pool.imap(_render, plans, chunksize=1):
                for v in vols:
                    bar.update(1)
                    yield v
    finally:
        bar.close()


def geometry_of(cfg: SynthConfig) -> gs.Geometry:
    g = cfg.geometry
    return gs.Geometry(
        shape=g.shape, spacing=(g.spacing,) * 3, patch_size=g.patch_size,
        affine=[[float(v) for v in row] for row in g.affine], space="SRI24",
    )  # fmt: skip


def write_cohort(cfg: SynthConfig, out_dir: str | os.PathLike[str], workers: int = 1, progress: bool = True,
                 overwrite: bool = False) -> gs.Manifest:
    """Render the cohort into a ``volumes`` shard set at ``out_dir`` plus ``ground_truth.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(cfg)
    producer = gs.Producer(package="g3n-data", config={"synth": cfg.model_dump(mode="json")})
    with gs.atomic_path(out / GROUND_TRUTH) as tmp:  # renamed into place after the set is written
        with open(tmp, "w", encoding="utf-8") as gt, gs.ShardWriter(
            out, kind="volumes", producer=producer, geometry=geometry_of(cfg), overwrite=overwrite,
            extra={"synthetic_cohort": {"generator": "g3n_data.synth", "seed": cfg.seed, "subjects": cfg.subjects,
                                        "ground_truth": GROUND_TRUTH, "config_digest": cfg.digest()}},
        ) as w:  # fmt: skip
            for v in iter_cohort(cfg, workers=workers, progress=progress, plans=plans):
                w.write(v.key, v.meta, {"volume": v.volume})
                gt.write(json.dumps(v.truth, sort_keys=True) + "\n")
    assert w.manifest is not None
    return w.manifest


def read_ground_truth(out_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """key -> ground-truth record, from a set written by ``write_cohort``."""
    path = Path(out_dir) / GROUND_TRUTH
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
                out[rec["key"]] = rec
    return out
