"""Typed configuration of the tokenizers and their training, with presets.

Every size is a config value (docs/method.md: "keep every one of them a config value"): the paper
model, the CPU demo (``tiny``) and the unit-test model (``test``) are the same code with different
numbers. Models are pydantic v2 with ``extra="forbid"`` so a typo in a YAML file is an error.

The MAE-CNN tokenizer's *encoder* architecture is not configured here: it comes from the g3n-mae
checkpoint it is built from (nanoGPT's rule: the checkpoint, not the command line, defines the
architecture); this file only configures what phase 2 adds (projection width ``c``, the CNN
decoder, the loss) and the baseline AutoencoderKL.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Triple = tuple[int, int, int]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the source and the reason."""


class DecoderConfig(BaseModel):
    """3D CNN decoder: token grid -> volume by ``len(channels) - 1`` nearest x2 upsamplings.

    ``channels`` runs from the coarsest level (the token grid) to the finest (the volume), so a
    16^3 patch needs 5 entries (4 upsamplings) and an 8^3 patch 4 entries.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[int, ...] = (512, 256, 128, 64, 32)
    num_res_blocks: int = Field(2, ge=1, description="ResBlocks per level (after the mid block)")
    attention_heads: int = Field(8, ge=1, description="heads of the self-attention at the coarsest level")
    mid_res_blocks: int = Field(2, ge=0, description="ResBlocks around the mid attention at the coarsest level")
    norm_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "DecoderConfig":
        if len(self.channels) < 1:
            raise ValueError("channels must have at least one entry")
        for ch in self.channels:
            if ch % self.norm_groups:
                raise ValueError(f"decoder channel {ch} is not divisible by norm_groups {self.norm_groups}")
        if self.channels[0] % self.attention_heads:
            raise ValueError(f"coarsest channels {self.channels[0]} not divisible by attention_heads {self.attention_heads}")
        return self

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class MaeCnnConfig(BaseModel):
    """Phase-2 tokenizer: frozen g3n-mae encoder -> Linear(hidden, c) per token -> 3D CNN decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    c: int | None = Field(32, ge=1, description="projected channels per token; None = no projection (hidden width)")
    decoder: DecoderConfig = DecoderConfig()
    loss: Literal["mse", "l1"] = "mse"


class AutoencoderKLConfig(BaseModel):
    """The MONAI AutoencoderKL baseline (downsampling 2^(len(channels)-1) per axis)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    img_size: Triple = (160, 192, 160)
    channels: tuple[int, ...] = (64, 128, 128)
    latent_channels: int = Field(8, ge=1)
    num_res_blocks: int = Field(2, ge=1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = Field(32, ge=1)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    loss: Literal["mse", "l1"] = "l1"
    kl_weight: float = Field(1e-6, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderKLConfig":
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries, channels {len(self.channels)}")
        for ch in self.channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"channel {ch} is not divisible by norm_num_groups {self.norm_num_groups}")
        f = self.downsample_factor
        for i, s in enumerate(self.img_size):
            if s % f:
                raise ValueError(f"img_size[{i}]={s} is not divisible by the downsampling factor {f}")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_grid(self) -> Triple:
        f = self.downsample_factor
        return tuple(s // f for s in self.img_size)  # type: ignore[return-value]


class TrainConfig(BaseModel):
    """Optimisation, early stopping, splits and engine options (shared by both tokenizers)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(2, ge=1, description="volumes per rank per step")
    max_epochs: int = Field(80, ge=1)
    patience: int = Field(40, ge=1, description="epochs without validation improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="improvement smaller than this does not reset patience")
    steps_per_epoch: int | None = Field(None, ge=1, description="cap per epoch; None = one pass over the train split")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of subjects held out for early stopping")
    seed: int = 0
    engine: Literal["torch", "deepspeed"] = "torch"
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "bf16-native"] = Field("auto", description=(
        "auto: bf16 autocast on CUDA, fp32 on CPU; bf16-native: bf16 also on CPUs that multiply bf16 in "
        "hardware (AMX, AVX512-BF16), where it halves the step time, and fp32 on others, where bf16 is "
        "emulated and tens of times slower"))
    log_every: int = Field(10, ge=1)
    freeze: tuple[str, ...] = Field((), description=(
        "parts of the trainable module kept as they are (parameter-name prefixes). MAE-CNN's ['proj']: "
        "the decoder learns, the projection and so the latents do not, so a generator trained on "
        "the tokenizer's latents stays valid when its decoder is improved"))
    flip_axes: tuple[int, ...] = Field((), description=(
        "augmentation: each training volume is mirrored along each of these axes (0, 1, 2) with "
        "probability 1/2; 0 is left-right in atlas space (the brain's near-symmetry makes the "
        "mirrored volume another plausible brain). Validation volumes are never flipped"))

    @model_validator(mode="after")
    def _check_train(self) -> "TrainConfig":
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ValueError(f"flip_axes {list(self.flip_axes)}: distinct spatial axes among 0, 1, 2")
        return self


class TokenizerConfig(BaseModel):
    """One run: which tokenizer, its model config, and training."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    tokenizer: Literal["mae-cnn", "autoencoderkl"] = "mae-cnn"
    mae_cnn: MaeCnnConfig = MaeCnnConfig()
    autoencoderkl: AutoencoderKLConfig = AutoencoderKLConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Presets. ``paper``: docs/method.md §3 (16^3 patches, c = 32, ~43.7 M decoder parameters, 80 epochs,
# patience 40; AutoencoderKL latent 8 x 40 x 48 x 40). ``tiny``: 8^3 patches at 80x96x80 for a CPU
# demo. ``test``: 8^3 patches at 32^3 with narrow widths for unit tests.
# ---------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "mae_cnn": dict(c=32, decoder=dict(channels=(512, 256, 128, 64, 32), num_res_blocks=2, mid_res_blocks=2,
                                           attention_heads=8, norm_groups=32), loss="mse"),
        "autoencoderkl": dict(img_size=(160, 192, 160), channels=(64, 128, 128), latent_channels=8, num_res_blocks=2,
                              attention_levels=(False, False, False), norm_num_groups=32),
        "train": dict(batch_size=2, max_epochs=80, patience=40, lr=1e-4, weight_decay=0.01, zero_stage=1),
    },
    "tiny": {
        "mae_cnn": dict(c=32, decoder=dict(channels=(64, 48, 32, 16), num_res_blocks=1, mid_res_blocks=1,
                                           attention_heads=4, norm_groups=8), loss="mse"),
        "autoencoderkl": dict(img_size=(80, 96, 80), channels=(16, 32, 32), latent_channels=8, num_res_blocks=1,
                              attention_levels=(False, False, False), norm_num_groups=8),
        "train": dict(batch_size=2, max_epochs=20, patience=5, lr=5e-4, weight_decay=0.0),
    },
    "test": {
        "mae_cnn": dict(c=8, decoder=dict(channels=(32, 16, 16, 8), num_res_blocks=1, mid_res_blocks=1,
                                          attention_heads=4, norm_groups=4), loss="mse"),
        "autoencoderkl": dict(img_size=(32, 32, 32), channels=(8, 8, 8), latent_channels=4, num_res_blocks=1,
                              attention_levels=(False, False, False), norm_num_groups=4, loss="mse"),
        "train": dict(batch_size=2, max_epochs=8, patience=3, lr=5e-4, weight_decay=0.0, val_fraction=0.25,
                      log_every=5),
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(name: str, **overrides: Any) -> TokenizerConfig:
    """A preset config; ``overrides`` are nested partial dicts, e.g. ``mae_cnn={"c": 128}``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    data = _merge({"preset": name, **PRESETS[name]}, overrides)
    try:
        return TokenizerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"preset {name!r} with overrides {overrides}: {e}") from None


def load_config(path: str | Path) -> TokenizerConfig:
    """YAML/JSON config; ``preset: name`` fills unspecified fields from that preset."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping, got {type(raw).__name__}")
    try:
        if raw.get("preset"):
            rest = {k: v for k, v in raw.items() if k != "preset"}
            return preset(raw["preset"], **rest)
        return TokenizerConfig.model_validate(raw)
    except (ValidationError, ConfigError) as e:
        raise ConfigError(f"{path}: invalid config: {e}") from None


def check_patch_factor(decoder: DecoderConfig, patch_size: Triple, where: str = "") -> None:
    """The decoder must upsample the token grid exactly back to the volume on every axis."""
    f = decoder.upsample_factor
    if any(p != f for p in patch_size):
        n = int(math.log2(max(patch_size))) + 1 if all(p > 0 and (p & (p - 1)) == 0 for p in patch_size) else None
        hint = f" (a patch of {patch_size[0]} needs {n} decoder channel entries)" if n and len(set(patch_size)) == 1 else ""
        raise ConfigError(
            f"{where}decoder upsamples by {f} ({len(decoder.channels)} channel entries) but the encoder's patch size is "
            f"{tuple(patch_size)}{hint}"
        )
