"""Typed configuration for the 3D MAE: model geometry/widths and training schedule.

Every size lives here (never as a constant in model or loop code) so the paper model, the
CPU demo and the unit-test model are the same code with different numbers. Configs are
pydantic v2 models with ``extra="forbid"`` so a typo in a YAML file is an error, not a silently
ignored key. The checkpoint embeds the model config; on resume/encode the architecture comes
from the checkpoint, not from the command line (nanoGPT's rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Triple = tuple[int, int, int]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the source and the reason."""


class ModelConfig(BaseModel):
    """Architecture of the 3D MAE (encoder + decoder) and its token geometry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    img_size: Triple = (160, 192, 160)
    patch_size: Triple = (16, 16, 16)
    in_chans: int = Field(1, ge=1)
    # encoder
    embed_dim: int = Field(1152, ge=1)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(16, ge=1)
    mlp_dim: int = Field(4608, ge=1)
    # decoder
    decoder_embed_dim: int = Field(512, ge=1)
    decoder_depth: int = Field(8, ge=1)
    decoder_num_heads: int = Field(16, ge=1)
    decoder_mlp_dim: int = Field(2048, ge=1)
    # objective
    mask_ratio: float = Field(0.70, ge=0.0, lt=1.0)
    norm_pix_loss: bool = False
    layer_norm_eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for i, (s, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p <= 0 or s <= 0 or s % p:
                raise ValueError(f"img_size[{i}]={s} is not a positive multiple of patch_size[{i}]={p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} not divisible by decoder_num_heads "
                f"{self.decoder_num_heads}"
            )
        if self.num_visible < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} leaves no visible token of {self.num_patches}")
        return self

    @property
    def grid_size(self) -> Triple:
        """Token grid (patches per axis)."""
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        g = self.grid_size
        return g[0] * g[1] * g[2]

    @property
    def patch_dim(self) -> int:
        """Values per patch (the decoder's prediction width)."""
        p = self.patch_size
        return p[0] * p[1] * p[2] * self.in_chans

    @property
    def num_visible(self) -> int:
        """Visible tokens per sample; same rounding as MAE: int(L * (1 - ratio))."""
        return int(round(self.num_patches * (1.0 - self.mask_ratio), 6) // 1)

    def with_geometry(self, img_size: Triple, patch_size: Triple | None = None) -> "ModelConfig":
        """Same architecture for another volume geometry (pos-embed gets interpolated on load)."""
        return self.model_copy(update={"img_size": tuple(img_size), "patch_size": tuple(patch_size or self.patch_size)})


class TrainConfig(BaseModel):
    """Optimisation, schedule, data loading, checkpointing and engine options."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="volumes per rank per step (micro batch)")
    total_steps: int = Field(1000, ge=1)
    warmup_steps: int = Field(50, ge=0)
    lr: float = Field(1.5e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    seed: int = 0
    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    zero_stage: int = Field(1, ge=0, le=3)
    zero_bucket_size: int = Field(
        500_000_000, ge=1, description="ZeRO reduce/all-gather bucket (elements); DeepSpeed allocates it every step, "
        "so small models on CPU want a small one",
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)
    tensorboard: bool = True
    deterministic: bool = False
    compile: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} > total_steps {self.total_steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} > lr {self.lr}")
        return self


class MAEConfig(BaseModel):
    """Full run configuration: model + training."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Presets. `paper`: docs/method.md §2. `tiny`: paper token count (1200) at 80x96x80 with 8^3 patches
# and small widths, for a CPU demo. `test`: 32^3 / 8^3 = 64 tokens, width 48, for unit tests.
# ---------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    "paper": {
        "model": dict(
            img_size=(160, 192, 160), patch_size=(16, 16, 16), embed_dim=1152, depth=12, num_heads=16,
            mlp_dim=4608, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_dim=2048,
            mask_ratio=0.70,
        ),
        "train": dict(batch_size=8, total_steps=100_000, warmup_steps=4000, lr=1.5e-4, zero_stage=1),
    },
    "tiny": {
        "model": dict(
            img_size=(80, 96, 80), patch_size=(8, 8, 8), embed_dim=96, depth=4, num_heads=4, mlp_dim=384,
            decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4, decoder_mlp_dim=192, mask_ratio=0.70,
        ),
        "train": dict(batch_size=4, total_steps=300, warmup_steps=20, lr=1e-3, weight_decay=0.05, zero_stage=0,
                      ckpt_every=100, zero_bucket_size=10_000_000),
    },
    "test": {
        "model": dict(
            img_size=(32, 32, 32), patch_size=(8, 8, 8), embed_dim=48, depth=2, num_heads=4, mlp_dim=96,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=4, decoder_mlp_dim=48, mask_ratio=0.75,
        ),
        "train": dict(batch_size=4, total_steps=50, warmup_steps=5, lr=2e-3, weight_decay=0.0, zero_stage=0,
                      log_every=10, ckpt_every=25, tensorboard=False, zero_bucket_size=1_000_000),
    },
}


def preset(name: str, **overrides) -> MAEConfig:
    """Build a preset config; ``overrides`` are {"model": {...}, "train": {...}} partial dicts."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    base = PRESETS[name]
    data = {
        "preset": name,
        "model": {**base["model"], **overrides.get("model", {})},
        "train": {**base["train"], **overrides.get("train", {})},
    }
    t = data["train"]
    if "total_steps" in overrides.get("train", {}) and "warmup_steps" not in overrides.get("train", {}):
        t["warmup_steps"] = min(t.get("warmup_steps", 0), t["total_steps"])  # a shorter run keeps a valid warm-up
    try:
        return MAEConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"preset {name!r} with overrides {overrides}: {e}") from e


def load_config(path: str | Path) -> MAEConfig:
    """Load a YAML/JSON config; ``preset: name`` fills unspecified fields from that preset."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping, got {type(raw).__name__}")
    try:
        if raw.get("preset"):
            unknown = set(raw) - {"preset", "model", "train"}
            if unknown:
                raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}")
            return preset(raw["preset"], model=raw.get("model") or {}, train=raw.get("train") or {})
        return MAEConfig.model_validate(raw)
    except (ValidationError, ConfigError) as e:
        raise ConfigError(f"{path}: invalid config: {e}") from e


def config_to_json(cfg: BaseModel) -> str:
    """Canonical JSON (sorted keys) so digests of equal configs are equal."""
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def model_config_from_json(text: str, source: str = "<json>") -> ModelConfig:
    try:
        return ModelConfig.model_validate_json(text)
    except ValidationError as e:
        raise ConfigError(f"{source}: embedded model config invalid: {e}") from e
