"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXXXX/`` holding

- ``model.safetensors``: the raw weights, plus ``norm.mean`` / ``norm.std`` (latent statistics);
- ``ema.safetensors``: the EMA weights, plus the same statistics (sampling needs only this file);
- ``train.safetensors``: the optimizer state as tensors (``optim.<param>.<name>``, torch's
  numbering; consolidated when ZeRO partitioned it across ranks) and RNG states;
- ``state.json``: run config, resolved conditions (vocabularies), step, data cursor, optimizer
  hyper-parameters, the training set's provenance and each weight file's SHA-256.

It is written into a temporary folder and renamed into place (atomic); only the last
``keep_last`` are kept. Loading is strict: a missing or unexpected weight is an error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from g3n_shards import atomic_path, file_sha256
from safetensors.torch import load_file, save_file

from .conditions import Condition
from .config import ConditionSpec, RunConfig

FORMAT = "g3n-dit-checkpoint"
VERSION = 1
STEP_RE = re.compile(r"^step-(\d{8})$")
NORM_KEYS = ("norm.mean", "norm.std")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match what is asked of it."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split an optimizer state_dict into tensors and JSON-able param-group hyper-parameters."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, groups


#: AdamW settings that choose how the update is computed, not what it is: the optimizer that
#: resumes keeps its own (a run trained with the fused kernel resumes on a machine without it)
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"optimizer state has {len(groups)} parameter groups; this optimizer has {len(opt.param_groups)}")
    fixed = []
    for g, own in zip(groups, opt.param_groups):
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        g.update({k: own[k] for k in IMPLEMENTATION_KEYS if k in own})
        fixed.append(g)
    opt.load_state_dict({"state": state, "param_groups": fixed})


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


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_sd: dict[str, torch.Tensor],
    ema_sd: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    norm: tuple[torch.Tensor, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 3,
    optimizer_state: tuple[dict[str, torch.Tensor], list[dict[str, Any]]] | None = None,
) -> Path:
    """Write one checkpoint atomically and prune old ones. ``state`` must be JSON-able.

    The optimizer state comes either from a plain torch ``optimizer`` or, already consolidated,
    as ``optimizer_state`` = (tensors, param groups) in :func:`optimizer_to_tensors`'s format:
    under ZeRO the state is partitioned across ranks and only the engine can gather it (a
    collective every rank joins), while only rank 0 writes.
    """
    if optimizer is not None and optimizer_state is not None:
        raise ValueError("save_checkpoint: pass optimizer or optimizer_state, not both")
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{step:08d}"
    tmp = ckdir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        normd = {"norm.mean": norm[0].detach().cpu().float().contiguous(), "norm.std": norm[1].detach().cpu().float().contiguous()}
        files: dict[str, str] = {}
        for name, sd in (("model.safetensors", model_sd), ("ema.safetensors", ema_sd)):
            tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            tensors.update(normd)
            with atomic_path(tmp / name) as t:  # safetensors creates its files 0600: give them the umask's mode
                save_file(tensors, str(t), metadata={"format": FORMAT, "step": str(step)})
        train_tensors: dict[str, torch.Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
        groups: list[dict[str, Any]] = []
        if optimizer is not None:
            optimizer_state = optimizer_to_tensors(optimizer)
        if optimizer_state is not None:
            opt_tensors, groups = optimizer_state
            train_tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                train_tensors[f"rng.cuda.{i}"] = s
        with atomic_path(tmp / "train.safetensors") as t:
            save_file(train_tensors, str(t), metadata={"format": FORMAT, "step": str(step)})
        for name in ("model.safetensors", "ema.safetensors", "train.safetensors"):
            files[name] = file_sha256(tmp / name)
        doc = {"format": FORMAT, "version": VERSION, "step": step, "optimizer_param_groups": groups, "files": files, **state}
        with open(tmp / "state.json", "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    out = [p for p in ckdir.iterdir() if STEP_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the latest complete checkpoint of a run folder."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{p}: no checkpoint here (expected a step folder with state.json or a run folder with checkpoints/)")
    return found[-1]


def load_checkpoint(path: str | Path, with_train_state: bool = True, verify: bool = True) -> Checkpoint:
    p = resolve_checkpoint(path)
    try:
        state = json.loads((p / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}/state.json: unreadable ({e})") from None
    if state.get("format") != FORMAT or int(state.get("version", -1)) != VERSION:
        raise CheckpointError(f"{p}: not a {FORMAT} v{VERSION} checkpoint (format={state.get('format')}, version={state.get('version')})")
    names = ["model.safetensors", "ema.safetensors"] + (["train.safetensors"] if with_train_state else [])
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if verify and file_sha256(f) != state["files"][name]:
            raise CheckpointError(f"{f}: SHA-256 differs from state.json: modified or corrupt")
        loaded[name] = load_file(str(f))
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


def restore_rng(train: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(train["rng.torch_cpu"])
    cuda = [train[k] for k in sorted(k for k in train if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
