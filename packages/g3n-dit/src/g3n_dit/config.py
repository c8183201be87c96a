"""Typed configuration for the DiT, its conditions, training, sampling and the longitudinal bridge.

Every size is a config value with named presets (``paper`` and ``tiny``), never a constant in
code. A run's full config is saved in its checkpoint; on resume, sampling, forecasting and
counterfactuals the architecture and the condition vocabularies come from the checkpoint, not
from the command line (as in nanoGPT), so a checkpoint is self-describing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and the field."""


class DiTConfig(BaseModel):
    """The network: a DiT over a ``grid`` of tokens with ``channels`` features each."""

    model_config = ConfigDict(extra="forbid")
    grid: tuple[int, int, int] = Field(description="token grid; tokens are in C order (x slowest, z fastest)")
    channels: int = Field(gt=0, description="latent channels per token (c)")
    context_channels: int = Field(
        default=0, ge=0, description="extra per-token input channels concatenated to x_t (the baseline in a bridge)"
    )
    hidden: int = Field(gt=0)
    depth: int = Field(gt=0)
    heads: int = Field(gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    patch: int = Field(default=1, gt=0, description="latent tokens per side merged into one transformer token "
                       "(DiT's p: DiT-XL/2 uses 2); 1 keeps one transformer token per latent token "
                       "as in docs/method.md")
    freq_dim: int = Field(default=256, gt=0, description="sinusoidal features of the timestep")
    time_scale: float = Field(default=1000.0, gt=0, description="t in [0,1] is multiplied by this before the sinusoid")

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if any(g <= 0 for g in self.grid):
            raise ValueError(f"grid {self.grid} must be positive")
        if any(g % self.patch for g in self.grid):
            raise ValueError(f"grid {self.grid} is not divisible by patch {self.patch}")
        return self

    @property
    def num_tokens(self) -> int:
        a, b, c = self.grid
        return a * b * c

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """The transformer's token grid: ``grid`` divided by ``patch``."""
        a, b, c = self.grid
        return (a // self.patch, b // self.patch, c // self.patch)


#: Model presets. ``paper``: 12 blocks, hidden 1024, 16 heads (DiT-L width, docs/method.md §5) over the
#: 10x12x10 grid of c=32 latents. ``tiny``: CPU tests and the demo.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(grid=(10, 12, 10), channels=32, hidden=1024, depth=12, heads=16, mlp_ratio=4.0),
    "tiny": dict(grid=(4, 4, 4), channels=4, hidden=64, depth=2, heads=4, mlp_ratio=4.0, freq_dim=64),
    # the CPU demo: 2x2x2 latent tokens per transformer token (150 for the 10x12x10 grid), so a
    # wider, deeper net trains faster than tiny on 1200 tokens. On the demo's latents (236, c=32)
    # it beat tiny (1000 vs 800 steps, 224 vs 293 s) on 5 of 8 latent-space controllability rows
    # and put twice the share of its samples' variation in the real latents' principal subspace
    "small": dict(grid=(10, 12, 10), channels=32, hidden=256, depth=4, heads=8, mlp_ratio=4.0, freq_dim=64, patch=2),
}


class ConditionSpec(BaseModel):
    """One condition of the generator.

    ``field`` is the metadata field it reads (``SampleMeta`` field, or for longitudinal pairs one
    of the pair fields ``interval`` / ``baseline_age``). Categorical vocabularies come from this
    config when given, else from the training set's manifest ``vocab[field]``, else from the
    labels present in the training metadata; the resolved vocabulary is saved in the checkpoint.
    A missing label (None) always maps to the condition's own null embedding: missing is not a class.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    field: str
    kind: Literal["categorical", "continuous"]
    vocab: list[str] | None = None
    drop_prob: float = Field(default=0.1, ge=0.0, le=1.0, description="training probability of the null embedding")
    center: float = Field(default=0.0, description="continuous: value is normalised as (v - center) / scale")
    scale: float = Field(default=1.0, gt=0)

    @property
    def always_on(self) -> bool:
        """A condition never dropped in training is never guided: it is part of every guidance term."""
        return self.drop_prob == 0.0


def default_generation_conditions() -> list[ConditionSpec]:
    """The six conditions of docs/method.md §5 (modality never dropped)."""
    return [
        ConditionSpec(name="disease", field="diagnosis", kind="categorical"),
        ConditionSpec(name="sex", field="sex", kind="categorical"),
        ConditionSpec(name="modality", field="modality", kind="categorical", drop_prob=0.0),
        ConditionSpec(name="site", field="site", kind="categorical"),
        ConditionSpec(name="age", field="age", kind="continuous", center=50.0, scale=25.0),
        ConditionSpec(name="idh1", field="idh1", kind="categorical"),
    ]


def default_longitudinal_conditions() -> list[ConditionSpec]:
    """The conditions of docs/method.md §6 (interval and diagnosis never dropped)."""
    return [
        ConditionSpec(name="diagnosis", field="diagnosis", kind="categorical", drop_prob=0.0),
        ConditionSpec(name="sex", field="sex", kind="categorical"),
        ConditionSpec(name="age", field="baseline_age", kind="continuous", center=70.0, scale=10.0),
        ConditionSpec(name="cdr", field="cdr", kind="categorical"),
        ConditionSpec(name="interval", field="interval", kind="continuous", drop_prob=0.0, center=0.0, scale=2.0),
    ]


class TrainConfig(BaseModel):
    """Optimisation and bookkeeping; the loop is nanoGPT-like (lr is a pure function of the step)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(default=32, gt=0, description="global batch (split across ranks)")
    max_steps: int = Field(default=400_000, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(default=1000, ge=0)
    weight_decay: float = Field(default=0.0, ge=0, description="applied to matrices only (dim >= 2)")
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    normalise: Literal["channel", "element"] = Field(
        default="channel",
        description="latent statistics the flow's data are standardised with. channel: per-channel mean and std "
        "over every token (docs/method.md). element: per token and channel, so the flow models each latent's "
        "deviation from the mean training latent in units of that element's spread, and an error of an "
        "undertrained net is scaled down where the data hardly vary (the background)",
    )
    time_sampling: Literal["uniform", "logit_normal"] = Field(
        default="uniform", description="training times: uniform on (0, 1), or sigmoid of a normal (SD3's logit-normal)")
    time_mean: float = Field(default=0.0, description="logit_normal only: mean of the normal")
    time_std: float = Field(default=1.0, gt=0, description="logit_normal only: std of the normal")
    ema_decay: float = Field(default=0.9999, ge=0, lt=1)
    seed: int = 0
    log_every: int = Field(default=50, gt=0)
    ckpt_every: int = Field(default=1000, gt=0)
    keep_last: int = Field(default=3, gt=0)
    precision: Literal["fp32", "bf16", "auto"] = Field(
        default="fp32", description="bf16 autocast (fp32 master weights); auto: bf16 on CUDA and on CPUs with AMX")
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2] = Field(default=0, description="DeepSpeed ZeRO stage (engine=deepspeed only)")
    num_threads: int | None = Field(default=None, description="torch CPU threads; None = torch default")


class BridgeConfig(BaseModel):
    """Longitudinal bridge x_t = (1-t) x_base + t x_follow + gamma(t) z, gamma(t) = sigma sqrt(t(1-t))."""

    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(default=0.5, ge=0, description="scale of the Brownian envelope (in normalised latent units)")
    target: Literal["mean", "drift"] = Field(
        default="mean",
        description="mean: regress x_follow - x_base; drift: add gamma'(t) z (t kept in [t_min, 1-t_min])",
    )
    t_min: float = Field(default=0.01, ge=0, lt=0.5, description="drift target only: keeps gamma'(t) finite")
    baseline_context: bool = Field(default=True, description="feed x_base to the network beside x_t")
    pairing: Literal["baseline", "all"] = Field(
        default="all", description="baseline: first session -> each later one; all: every earlier -> later pair"
    )
    min_interval: float = Field(default=0.1, ge=0, description="years; closer sessions are not paired")
    max_interval: float | None = Field(default=None, description="years; None = no limit")
    reverse_pairs: bool = Field(
        default=False,
        description="also train every pair backwards (follow-up -> baseline, negative interval, the follow-up's "
                    "conditions): twice the pairs, and a change that does not follow the interval's sign is "
                    "penalised both ways")
    per_year: bool = Field(
        default=False,
        description="the network predicts the change per year and the velocity is that times the interval "
                    "(years): a forecast's change is proportional to the interval, nothing at 0, reversed "
                    "when negative")
    segment_years: float | None = Field(
        default=None, gt=0,
        description="forecast a longer interval as a chain of equal segments no longer than this (years), each "
                    "from the previous forecast with the baseline age moved on; None: one jump")


class SampleConfig(BaseModel):
    """Sampler settings; also recorded in every synthetic sample's request."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=50, gt=0)
    method: Literal["euler", "heun"] = "euler"
    guidance: float = Field(default=1.5, description="default per-condition guidance scale w")
    guidance_per_condition: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    paired: bool = Field(default=False, description=(
        "sample j of every request starts from the same noise (seed + j), so requests differ only in their "
        "conditions and a probe's change between them is the conditions' effect (paired comparisons); "
        "off: sample i of the whole run uses seed + i"))
    batch_size: int = Field(default=16, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    weights: Literal["ema", "raw"] = "ema"


class RunConfig(BaseModel):
    """Everything a training run needs; saved verbatim in each checkpoint."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["generation", "longitudinal"] = "generation"
    model: DiTConfig
    conditions: list[ConditionSpec]
    train: TrainConfig = Field(default_factory=TrainConfig)
    bridge: BridgeConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate condition names: {names}")
        if self.task == "longitudinal" and self.bridge is None:
            self.bridge = BridgeConfig()
        if self.task == "longitudinal" and self.bridge is not None and self.bridge.baseline_context:
            if self.model.context_channels not in (0, self.model.channels):
                raise ValueError("bridge.baseline_context needs model.context_channels == model.channels")
            self.model.context_channels = self.model.channels
        return self


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(batch_size=64, max_steps=400_000, lr=1e-4, warmup_steps=1000, precision="bf16"),
    "tiny": dict(batch_size=8, max_steps=200, lr=1e-3, warmup_steps=10, ema_decay=0.99, log_every=10, ckpt_every=100),
    # element statistics: on the demo's latents (800 steps, two tokenizers/seeds) the samples' mean distance
    # to their nearest training latent fell from 250-270 to 144-145 (held-out real latents: 106-107), and
    # their share of variance in the real latents' top-10 principal components rose from 0.13-0.16 to
    # 0.35-0.37 (held-out real: 0.77)
    "small": dict(batch_size=8, max_steps=1000, lr=1e-3, warmup_steps=10, ema_decay=0.99, log_every=10, ckpt_every=100,
                  normalise="element"),
}


def preset_run_config(preset: str, task: str = "generation", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from a preset name plus a nested override dict (e.g. from YAML)."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(MODEL_PRESETS)})")
    conds = default_longitudinal_conditions() if task == "longitudinal" else default_generation_conditions()
    base: dict[str, Any] = {
        "task": task,
        "model": dict(MODEL_PRESETS[preset]),
        "conditions": [c.model_dump() for c in conds],
        "train": dict(TRAIN_PRESETS[preset]),
    }
    if task == "longitudinal":
        base["bridge"] = {}
    merged = _deep_merge(base, overrides or {})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(f"invalid config (preset {preset!r}): {e}") from None


def load_run_config(path: str | Path | None, preset: str, task: str) -> RunConfig:
    """Preset, then the YAML/JSON file's values on top (validated; errors name the file)."""
    overrides: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            overrides = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{p}: cannot read config ({e})") from None
        if not isinstance(overrides, dict):
            raise ConfigError(f"{p}: config must be a mapping, got {type(overrides).__name__}")
        preset = overrides.pop("preset", preset)
        task = overrides.get("task", task)
    try:
        return preset_run_config(preset, task, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
