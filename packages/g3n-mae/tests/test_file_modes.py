"""Weights and checkpoints get the mode the user's umask gives (issue 22.2): a team sharing a cluster
filesystem must be able to read another team's exported encoder. mkstemp/mkdtemp gave 0600/0700."""

from __future__ import annotations

import os

import pytest
import torch

from g3n_mae.checkpoint import atomic_save_safetensors, save_checkpoint, save_weights
from g3n_mae.config import preset


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_weights_and_checkpoints_follow_the_umask(tmp_path, umask):
    cfg = preset("tiny").model
    old = os.umask(umask)
    try:
        save_weights(tmp_path / "export" / "model.safetensors", {"w": torch.ones(3)}, cfg)
        atomic_save_safetensors({"m": torch.zeros(2)}, tmp_path / "optimizer.safetensors")
        step = save_checkpoint(tmp_path / "ckpt", 5, cfg, {"w": torch.ones(3)}, {"m": torch.zeros(2)}, {}, keep_last=2)
    finally:
        os.umask(old)
    files = [tmp_path / "export" / "model.safetensors", tmp_path / "optimizer.safetensors", *sorted(step.iterdir())]
    modes = {str(f.relative_to(tmp_path)): f.stat().st_mode & 0o777 for f in files}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
    assert step.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left
