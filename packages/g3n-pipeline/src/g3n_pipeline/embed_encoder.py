"""g3n-embed's encoder and the preprocessing it expects (see ``embed.py``).

The encoder only ever saw volumes of one geometry (shape, spacing, atlas box). Its weights record
the volume shape and patch size (not the spacing), so the preprocessing config is the g3n-data
preset whose grid equals the encoder's, or the exact config of the ``volumes`` set it was trained
on; any other grid is refused with both shapes named.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import g3n_shards as gs


class EmbedError(RuntimeError):
    """The embedding run cannot go on; the message names the input or stage and the reason."""


# ---- the encoder --------------------------------------------------------------------------
@dataclass
class EncoderInfo:
    """What the encoder's weights say about the volumes it expects."""

    weights: Path
    img_size: tuple[int, int, int]
    patch_size: tuple[int, int, int]
    embed_dim: int
    data_manifests: list[str] = field(default_factory=list)


def encoder_info(path: str | Path) -> EncoderInfo:
    """Read the encoder's geometry from its safetensors metadata (no tensor is loaded, nothing pickled).

    Accepts what ``g3n-mae encode`` accepts: a weights file, an export folder, a checkpoint step
    folder or a run folder. The training data digests come from the weights metadata (exports)
    or the checkpoint's ``state.json`` (run folders).
    """
    from g3n_mae.checkpoint import CheckpointError, resolve_weights
    from safetensors import safe_open

    try:
        w = resolve_weights(path)
    except CheckpointError as e:
        raise EmbedError(f"--encoder: {e}") from None
    try:
        with safe_open(str(w), framework="np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise EmbedError(f"--encoder {w}: not a readable safetensors file: {e}") from None
    if meta.get("format") != "g3n-mae-weights" or "model_config" not in meta:
        raise EmbedError(f"--encoder {w}: not a g3n-mae weights file (metadata format={meta.get('format')!r})")
    mc = json.loads(meta["model_config"])
    manifests: list[str] = []
    try:
        manifests = list(json.loads(meta.get("data_manifests", "[]")))
    except ValueError:
        pass
    state = w.parent / "state.json"
    if not manifests and state.is_file():
        try:
            manifests = list(json.loads(state.read_text()).get("data_manifests") or [])
        except (OSError, ValueError):
            pass
    return EncoderInfo(weights=w, img_size=tuple(mc["img_size"]), patch_size=tuple(mc["patch_size"]),
                       embed_dim=int(mc["embed_dim"]), data_manifests=manifests)


def shipped_encoder(quiet: bool = False) -> Path:
    """The shipped demonstration encoder (g3n-zoo ``mae``), announced with its intended use."""
    import g3n_zoo

    try:
        model = g3n_zoo.get("mae")
    except g3n_zoo.ZooError as e:
        raise EmbedError(f"no --encoder given and no shipped encoder: {e}") from None
    if not quiet:
        print(f"g3n-embed: no --encoder: using the shipped encoder {model.path} ({model.card.get('title', 'g3n-zoo mae')})."
              f"\n  {model.intended_use}", file=sys.stderr)
    return model.path


# ---- the preprocessing config ---------------------------------------------------------------
def preprocess_config(enc: EncoderInfo, preset: str | None, train_volumes: str | None,
                      overrides_file: str | None, skullstrip: str | None, no_n4: bool, no_register: bool,
                      log=print) -> dict[str, Any]:
    """The g3n-data PreprocessConfig (as a dict) the encoder expects, with the site's overrides.

    Source, most exact first: the ``volumes`` set the encoder was trained on (its manifest records
    the producer's full config), else ``--preset``, else the g3n-data preset whose grid equals the
    encoder's. Refuses a grid other than the encoder's.
    """
    from g3n_data.config import PRESETS, PreprocessConfig, make_config

    if train_volumes:
        ss = gs.ShardSet.open(train_volumes, kind="volumes")
        prod = ss.manifest.producer
        if prod.package != "g3n-data" or not prod.config:
            raise EmbedError(f"--train-volumes {train_volumes}: made by {prod.package!r}, records no g3n-data config")
        if not enc.data_manifests:
            log(f"g3n-embed: warning: the encoder records no training shard sets, so {train_volumes} cannot be "
                f"confirmed as its training data; using its preprocessing config")
        elif ss.digest not in enc.data_manifests:
            log(f"g3n-embed: warning: {train_volumes} ({ss.digest[:19]}...) is not among the sets the encoder "
                f"records as its training data; using its preprocessing config anyway")
        base = PreprocessConfig.model_validate(prod.config)
        if preset and base.preset != preset:
            raise EmbedError(f"--preset {preset} contradicts the training set's preset {base.preset!r}")
    else:
        if preset is None:
            matching = [n for n in sorted(PRESETS) if tuple(make_config(n).geometry.shape) == enc.img_size]
            if not matching:
                raise EmbedError(f"--encoder {enc.weights}: expects volumes of {enc.img_size}; no g3n-data preset "
                                 f"makes that grid ({ {n: make_config(n).geometry.shape for n in PRESETS} }); "
                                 f"give --preprocess-config or --train-volumes")
            preset = matching[0]
        base = make_config(preset)
    data = base.model_dump(mode="json")
    if overrides_file:
        try:
            over = yaml.safe_load(Path(overrides_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise EmbedError(f"--preprocess-config {overrides_file}: cannot read: {e}") from None
        if not isinstance(over, dict):
            raise EmbedError(f"--preprocess-config {overrides_file}: must be a mapping")
        over.pop("preset", None)
        data = _deep_update(data, over)
    if skullstrip:
        data["skullstrip"]["method"] = skullstrip
    if no_n4:
        data["n4"]["enabled"] = False
    if no_register:
        data["registration"]["enabled"] = False
    try:
        cfg = PreprocessConfig.model_validate(data)
    except Exception as e:  # noqa: BLE001 - pydantic error, re-raised with the source named
        raise EmbedError(f"invalid preprocessing config: {e}") from None
    check_geometry(tuple(cfg.geometry.shape), tuple(cfg.geometry.patch_size), enc, "the preprocessing config")
    return cfg.model_dump(mode="json")


def check_geometry(shape: tuple[int, ...], patch: tuple[int, ...] | None, enc: EncoderInfo, what: str) -> None:
    """Refuse volumes the encoder was not trained on (grid or patch size differ)."""
    if tuple(shape) != tuple(enc.img_size):
        raise EmbedError(f"{what} gives volumes of {tuple(shape)}, but the encoder {enc.weights} expects "
                         f"{tuple(enc.img_size)}: preprocess with the encoder's preset (or --train-volumes)")
    if patch is not None and tuple(patch) != tuple(enc.patch_size):
        raise EmbedError(f"{what} tiles volumes in {tuple(patch)} patches, the encoder uses {tuple(enc.patch_size)}")


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
