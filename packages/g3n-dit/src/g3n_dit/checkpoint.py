"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX/`` (written, rotated and found by
``g3n_train.CheckpointStore``: atomic, the newest ``keep_last`` kept) holding

- ``model.safetensors``: the raw weights, plus ``norm.mean`` / ``norm.std`` (latent statistics);
- ``ema.safetensors``: the EMA weights, plus the same statistics (sampling needs only this file);
- ``train.safetensors``: the AdamW state in g3n-train's one key format (``exp_avg/<param>``,
  ``exp_avg_sq/<param>``, ``step/<param>``; consolidated when ZeRO partitioned it across ranks);
- ``state.json``: run config, resolved conditions (vocabularies), step, data cursor, every rank's
  RNG state, the training set's provenance and each tensor file's SHA-256.

Format version 1 (written before g3n-train) numbered the optimizer state the way torch's
``state_dict`` does (``optim.<i>.<key>``) and kept the torch RNG state in ``train.safetensors``;
such checkpoints still load and resume (:meth:`Checkpoint.optimizer_state`, :meth:`Checkpoint.restore_rng`).
Loading is strict: a missing or unexpected weight is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from g3n_train import CheckpointError, CheckpointStore, read_files, read_state, set_rng_state
from g3n_train.optim_state import is_numbered, named_from_numbered, names_in_group_order

from .conditions import Condition
from .config import ConditionSpec, RunConfig

__all__ = ["Checkpoint", "CheckpointError", "list_checkpoints", "load_checkpoint", "resolve_checkpoint", "save_checkpoint"]

FORMAT = "g3n-dit-checkpoint"
VERSION = 2  # 2: named optimizer state, RNG states in state.json; 1: numbered optimizer state
PREFIX = "step-"
NORM_KEYS = ("norm.mean", "norm.std")


def _store(run_dir: str | Path) -> CheckpointStore:
    return CheckpointStore(Path(run_dir) / "checkpoints", prefix=PREFIX)


@dataclass
class Checkpoint:
    """A loaded checkpoint (weights stay on the CPU until the caller moves them)."""

    path: Path
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    train: dict[str, torch.Tensor] | None
    norm_mean: torch.Tensor
    norm_std: torch.Tensor

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def version(self) -> int:
        return int(self.state.get("format_version", self.state.get("version", -1)))

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.state["run_config"])

    def conditions(self) -> list[Condition]:
        return [Condition(ConditionSpec.model_validate(c["spec"]), tuple(c["vocab"])) for c in self.state["conditions"]]

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        if which not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', not {which!r}")
        return self.ema if which == "ema" else self.model

    def digest(self, which: str = "ema") -> str:
        return "sha256:" + self.state["files"]["ema.safetensors" if which == "ema" else "model.safetensors"]

    def optimizer_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The AdamW state by parameter name (a version-1 checkpoint's numbering is converted with
        ``model``'s parameter order in the optimizer's groups)."""
        assert self.train is not None, "loaded without the training state"
        if is_numbered(self.train):
            try:
                return named_from_numbered(self.train, names_in_group_order(model))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: {e}") from None
        return {k: v for k, v in self.train.items() if not k.startswith("rng.")}

    def restore_rng(self, rank: int, world_size: int) -> None:
        """This rank's saved random streams (version 1: the torch CPU/CUDA states every rank shared)."""
        rngs = self.state.get("rng")
        if isinstance(rngs, list):
            if len(rngs) == world_size:
                set_rng_state(rngs[rank])
            return
        assert self.train is not None
        torch.set_rng_state(self.train["rng.torch_cpu"])
        cuda = [self.train[k] for k in sorted(k for k in self.train if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_sd: dict[str, torch.Tensor],
    ema_sd: dict[str, torch.Tensor],
    optim: dict[str, torch.Tensor],
    norm: tuple[torch.Tensor, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write one checkpoint atomically and prune old ones. ``optim``: AdamW state by parameter
    name (an engine's ``state()``, consolidated under ZeRO); ``state`` must be JSON-able and holds
    the RNG states (``rng``, one per rank)."""
    normd = {"norm.mean": norm[0].detach().cpu().float(), "norm.std": norm[1].detach().cpu().float()}
    meta = {"format": FORMAT, "step": str(step)}
    files = {
        "model.safetensors": ({**{k: v.detach().cpu() for k, v in model_sd.items()}, **normd}, meta),
        "ema.safetensors": ({**{k: v.detach().cpu() for k, v in ema_sd.items()}, **normd}, meta),
        "train.safetensors": ({k: v.detach().cpu() for k, v in optim.items()}, meta),
    }
    return _store(run_dir).save(step, files, state, keep_last, FORMAT, VERSION)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return _store(run_dir).list()


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the latest complete checkpoint of a run folder."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = _store(p).latest()
    if found is None:
        raise CheckpointError(f"{p}: no checkpoint here (expected a step folder with state.json or a run folder with checkpoints/)")
    return found


def load_checkpoint(path: str | Path, with_train_state: bool = True, verify: bool = True) -> Checkpoint:
    p = resolve_checkpoint(path)
    state = read_state(p)
    version = int(state.get("format_version", state.get("version", -1)))
    if state.get("format") != FORMAT or version not in (1, VERSION):
        raise CheckpointError(f"{p}: not a {FORMAT} v1/v{VERSION} checkpoint (format={state.get('format')}, "
                              f"version={version})")
    names = ["model.safetensors", "ema.safetensors"] + (["train.safetensors"] if with_train_state else [])
    loaded = read_files(p, state["files"], names, verify=verify)
    norm = {k: loaded["ema.safetensors"].pop(k) for k in NORM_KEYS}
    for k in NORM_KEYS:
        loaded["model.safetensors"].pop(k, None)
    return Checkpoint(
        path=p,
        state=state,
        model=loaded["model.safetensors"],
        ema=loaded["ema.safetensors"],
        train=loaded.get("train.safetensors"),
        norm_mean=norm["norm.mean"],
        norm_std=norm["norm.std"],
    )
