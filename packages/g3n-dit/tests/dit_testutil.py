"""Tiny configs and toy data used by several tests."""

from __future__ import annotations

import torch

from g3n_dit.conditions import Condition, resolve_conditions
from g3n_dit.config import ConditionSpec, DiTConfig, MODEL_PRESETS, preset_run_config
from g3n_dit.data import in_memory


def tiny_model_config(**kw) -> DiTConfig:
    d = dict(MODEL_PRESETS["tiny"])
    d.update(kw)
    return DiTConfig(**d)


def toy_conditions() -> list[Condition]:
    specs = [
        ConditionSpec(name="disease", field="diagnosis", kind="categorical", vocab=["HC", "MCI", "AD"]),
        ConditionSpec(name="sex", field="sex", kind="categorical", vocab=["F", "M"]),
        ConditionSpec(name="modality", field="modality", kind="categorical", vocab=["T1", "T2"], drop_prob=0.0),
        ConditionSpec(name="age", field="age", kind="continuous", center=50, scale=25),
    ]
    return resolve_conditions(specs)


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give the zero-initialised layers non-zero weights so the velocity depends on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


GRID = (4, 4, 4)


def toy_set(n: int = 48, shift: float = 2.0, seed: int = 0):
    """sex=M shifts channel 0 by +shift; everything else is N(0, 0.5^2) plus a fixed pattern."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(64, 4, generator=g) * 0.5
    lat, metas = [], []
    for i in range(n):
        sex = "M" if i % 2 else "F"
        x = pattern + 0.5 * torch.randn(64, 4, generator=g)
        if sex == "M":
            x[:, 0] += shift
        lat.append(x)
        metas.append(dict(subject=f"s{i:03d}", session="ses-1", cohort="TOY", site=f"site{i % 3}", modality="T1",
                          age=30.0 + i, sex=sex, diagnosis=["HC", "AD"][i % 4 // 2]))
    return in_memory(torch.stack(lat), metas, grid=GRID)


def tiny_cfg(**train):
    t = dict(batch_size=8, max_steps=6, warmup_steps=2, log_every=2, ckpt_every=100, ema_decay=0.9, seed=3)
    t.update(train)
    return preset_run_config("tiny", overrides={"train": t})


def _flat(sd):
    return torch.cat([v.flatten().float() for _, v in sorted(sd.items())])
