"""Learning-rate schedule and the resume-config policy."""

from __future__ import annotations

import math

import pytest

from g3n_train import LRSchedule, ResumeConfigError, resolve_resume_config


def test_warmup_then_cosine_in_both_stage_forms():
    mae = LRSchedule(lr=1e-3, warmup_steps=10, total_steps=110, min_lr=1e-5)
    assert mae(0) == pytest.approx(1e-3 / 11) and mae(9) == pytest.approx(1e-3 * 10 / 11)
    assert mae(10) == pytest.approx(1e-3) and mae(110) == pytest.approx(1e-5) and mae(500) == pytest.approx(1e-5)
    assert mae(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    dit = LRSchedule(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, warmup_shift=0)
    assert dit(9) == pytest.approx(1e-3) and dit(110) == pytest.approx(1e-4)
    # the ratio form is the DiT's own expression, bit for bit
    p = 37 / 100
    assert dit(47) == 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    const = LRSchedule(lr=2e-4, warmup_steps=0, total_steps=10, constant=True)
    assert const(0) == const(9) == 2e-4


SAVED = {"model": {"depth": 2, "width": 8}, "train": {"seed": 0, "lr": 1e-3, "max_steps": 10, "log_every": 5}}


def _req(**train):
    return {"model": dict(SAVED["model"]), "train": {**SAVED["train"], **train}}


def test_same_config_resumes_silently():
    lines: list[str] = []
    assert resolve_resume_config(_req(), SAVED, ["train.max_steps"], log=lines.append) == SAVED and not lines


def test_allowed_fields_apply_with_a_log_line():
    lines: list[str] = []
    out = resolve_resume_config(_req(max_steps=20, log_every=1), SAVED, ["train.max_steps", "train.log_every"],
                                log=lines.append)
    assert out["train"]["max_steps"] == 20 and out["train"]["log_every"] == 1 and out["train"]["seed"] == 0
    assert any("train.max_steps changes from 10 to 20" in ln for ln in lines) and len(lines) == 2


def test_other_differences_are_refused_naming_each_field():
    with pytest.raises(ResumeConfigError) as e:
        resolve_resume_config({**_req(seed=7, lr=5e-4, max_steps=20), "model": {"depth": 3, "width": 8}}, SAVED,
                              ["train.max_steps"], log=lambda s: None)
    msg = str(e.value)
    for field, old, new in (("train.seed", "0", "7"), ("train.lr", "0.001", "0.0005"), ("model.depth", "2", "3")):
        assert f"{field}: {old} in the checkpoint, {new} requested" in msg
    assert "max_steps" not in msg and "--accept-checkpoint-config" in msg


def test_accepting_the_checkpoint_keeps_its_values_and_says_so():
    lines: list[str] = []
    out = resolve_resume_config(_req(seed=7, max_steps=20), SAVED, ["train.max_steps"], accept_checkpoint=True,
                                log=lines.append)
    assert out["train"]["seed"] == 0 and out["train"]["max_steps"] == 20
    assert any("keeping the checkpoint's train.seed = 0 (requested 7" in ln for ln in lines)


def test_ignored_fields_are_not_compared():
    out = resolve_resume_config({**_req(), "preset": "tiny"}, {**SAVED, "preset": None}, [], ignore=["preset"],
                                log=lambda s: None)
    assert out["preset"] is None
