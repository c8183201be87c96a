"""A resumed DiT run never silently ignores a changed config (issue 22.3), and checkpoints written
before g3n-train (format 1: numbered optimizer state, torch RNG in train.safetensors) still resume."""

from __future__ import annotations

import base64
import json

import pytest
import torch
import yaml
from g3n_shards import file_sha256
from safetensors.torch import load_file, save_file

from g3n_dit.checkpoint import load_checkpoint
from g3n_dit.cli import main
from g3n_dit.model import DiT
from g3n_dit.train import train
from g3n_train import ResumeConfigError
from g3n_train.optim_state import names_in_group_order

from dit_testutil import tiny_cfg, toy_set
from test_cli import TRAIN_YAML, write_latents


def test_changed_settings_are_refused_naming_each_field_or_kept_with_the_flag(tmp_path, capsys):
    data = toy_set(16)
    train(tiny_cfg(max_steps=2), data, tmp_path, progress=False)
    with pytest.raises(ResumeConfigError) as e:
        train(tiny_cfg(seed=4, lr=5e-4, batch_size=4), data, tmp_path, max_steps=3, progress=False)
    msg = str(e.value)
    for field, old, new in (("train.seed", 3, 4), ("train.lr", 0.001, 0.0005), ("train.batch_size", 8, 4)):
        assert f"{field}: {old!r} in the checkpoint, {new!r} requested" in msg
    assert "max_steps" not in msg and "--accept-checkpoint-config" in msg
    capsys.readouterr()
    res = train(tiny_cfg(seed=4, log_every=1), data, tmp_path, max_steps=3, progress=False, accept_checkpoint_config=True)
    out = capsys.readouterr().out
    assert res.step == 3 and "keeping the checkpoint's train.seed = 3 (requested 4" in out
    assert "train.max_steps changes from 2 to 3" in out and "train.log_every changes from 2 to 1" in out
    rc = load_checkpoint(tmp_path).run_config
    assert rc.train.seed == 3 and rc.train.max_steps == 3 and rc.train.log_every == 1
    # without max_steps the checkpoint's schedule length is kept, as before
    assert train(tiny_cfg(), data, tmp_path, progress=False).step == 3


def test_cli_refuses_a_changed_batch_size_with_one_line(tmp_path, capsys):
    write_latents(tmp_path / "lat")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TRAIN_YAML))
    args = ["train", "--latents", str(tmp_path / "lat"), "--out", str(tmp_path / "run"), "--config",
            str(tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--batch-size", "4", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 8 in the checkpoint, 4 requested" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--batch-size", "4", "--max-steps", "6", "--accept-checkpoint-config"]) == 0
    assert load_checkpoint(tmp_path / "run").step == 6


def _as_format_1(ckpt_dir, model: torch.nn.Module) -> None:
    """Rewrite a checkpoint the way g3n-dit wrote it before g3n-train: optimizer state numbered
    through the param groups (``optim.<i>.<key>``) with the groups' hyper-parameters in state.json,
    rank 0's torch RNG state in train.safetensors, ``"version": 1``."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    named = load_file(str(ckpt_dir / "train.safetensors"))
    names = names_in_group_order(model)
    old = {f"optim.{i}.{k}": named[f"{k}/{n}"] for i, n in enumerate(names) for k in ("step", "exp_avg", "exp_avg_sq")}
    old["rng.torch_cpu"] = torch.frombuffer(bytearray(base64.b64decode(state["rng"][0]["torch"])), dtype=torch.uint8)
    save_file(old, str(ckpt_dir / "train.safetensors"), metadata={"format": "g3n-dit-checkpoint"})
    n_decay = sum(1 for p in model.parameters() if p.dim() >= 2)
    state["optimizer_param_groups"] = [{"params": list(range(n_decay)), "lr": 0.0},
                                       {"params": list(range(n_decay, len(names))), "lr": 0.0}]
    for k in ("format_version", "rng", "saved_at"):
        state.pop(k)
    state["version"] = 1
    state["files"]["train.safetensors"] = file_sha256(ckpt_dir / "train.safetensors")
    (ckpt_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def test_a_format_1_checkpoint_resumes_exactly(tmp_path):
    data = toy_set(20)
    full = train(tiny_cfg(), data, tmp_path / "full", progress=False)
    part = train(tiny_cfg(), data, tmp_path / "old", progress=False, stop_after=3)
    ck = load_checkpoint(tmp_path / "old")
    _as_format_1(ck.path, DiT(ck.run_config.model, ck.conditions()))
    old = load_checkpoint(tmp_path / "old")
    assert old.version == 1 and any(k.startswith("optim.") for k in old.train)
    rest = train(tiny_cfg(), data, tmp_path / "old", progress=False)
    assert part.losses + rest.losses == full.losses  # bit-identical
    assert torch.equal(load_checkpoint(tmp_path / "old").train["exp_avg/x_embed.weight"],
                       load_checkpoint(tmp_path / "full").train["exp_avg/x_embed.weight"])
