"""A resume compares the requested config with the checkpoint's (issue 22.3), and checkpoints
written before g3n-train (state.json format version 1) still resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from g3n_mae.checkpoint import file_sha256, find_latest, load_checkpoint
from g3n_mae.cli import main
from g3n_mae.config import preset
from g3n_mae.data import InMemoryVolumes, brain_like_volumes
from g3n_mae.train import train
from g3n_train import ResumeConfigError

QUIET = lambda s: None  # noqa: E731


def _cfg(**train):
    return preset("test", train={"engine": "torch", "log_every": 1000, "deterministic": True, "warmup_steps": 2, **train})


def test_changed_settings_are_refused_or_applied_never_ignored(tmp_path):
    vols = InMemoryVolumes(brain_like_volumes(4, (32, 32, 32)))
    train(_cfg(total_steps=2, ckpt_every=2), vols, tmp_path / "r", log=QUIET)
    with pytest.raises(ResumeConfigError) as e:
        train(_cfg(total_steps=4, seed=7, lr=1e-3), vols, tmp_path / "r", resume=True, log=QUIET)
    msg = str(e.value)
    assert "train.seed: 0 in the checkpoint, 7 requested" in msg and "train.lr: 0.002 in the checkpoint, 0.001" in msg
    assert "total_steps" not in msg and "--accept-checkpoint-config" in msg
    lines: list[str] = []
    res = train(_cfg(total_steps=3, seed=7, log_every=5), vols, tmp_path / "r", resume=True, log=lines.append,
                accept_checkpoint_config=True)
    assert res.steps == 3
    assert any("keeping the checkpoint's train.seed = 0 (requested 7" in ln for ln in lines)
    assert any("train.total_steps changes from 2 to 3" in ln for ln in lines)
    _, _, state = load_checkpoint(find_latest(tmp_path / "r" / "checkpoints"))
    assert state["config"]["train"]["seed"] == 0 and state["config"]["train"]["total_steps"] == 3


def test_cli_refuses_a_changed_seed_with_one_line(tmp_path, capsys):
    args = ["train", "--preset", "test", "--synthetic", "4", "--engine", "torch", "--run-dir", str(tmp_path / "r"),
            "--steps", "1", "--no-tensorboard"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--seed", "5", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.seed: 0 in the checkpoint, 5 requested" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--resume", "--seed", "5", "--steps", "2", "--accept-checkpoint-config"]) == 0
    assert "keeping the checkpoint's train.seed" in capsys.readouterr().out


def _as_format_1(ckpt_dir):
    """Rewrite a checkpoint's state.json the way g3n-mae wrote it before g3n-train (format
    version 1: the weights' digest as ``weights_sha256``, no ``files`` map)."""
    path = ckpt_dir / "state.json"
    state = json.loads(path.read_text())
    del state["files"]
    state.update(format_version=1, weights_sha256=file_sha256(ckpt_dir / "model.safetensors"))
    path.write_text(json.dumps(state, indent=1, sort_keys=True))


def test_a_format_1_checkpoint_resumes_exactly(tmp_path):
    vols = InMemoryVolumes(brain_like_volumes(6, (32, 32, 32), seed=2))
    cfg = _cfg(total_steps=6, ckpt_every=3, batch_size=2)
    ref = train(cfg, vols, tmp_path / "ref", log=QUIET)
    train(cfg, vols, tmp_path / "old", stop_at=3, log=QUIET)
    ck = find_latest(tmp_path / "old" / "checkpoints")
    _as_format_1(ck)
    model_sd, optim, state = load_checkpoint(ck)
    assert state["format_version"] == 1 and "exp_avg/blocks.0.fc1.weight" in optim
    rest = train(cfg, vols, tmp_path / "old", resume=True, log=QUIET)
    assert [v for s, v in ref.losses if s > 3] == [v for _, v in rest.losses]
    # the format-1 digest is still checked
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (ck / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(Exception, match="SHA-256"):
        load_checkpoint(ck)
    assert torch.isfinite(model_sd["blocks.0.fc1.weight"]).all()
