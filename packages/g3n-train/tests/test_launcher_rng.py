"""Launcher arguments and RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from g3n_train import rng_state, seed_everything, set_rng_state, strip_launcher_args


def test_launcher_args_are_stripped_into_the_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "train", "--out", "x"]) == ["train", "--out", "x"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local-rank", "2", "train"]) == ["train"] and os.environ["LOCAL_RANK"] == "2"


def test_rng_state_is_json_and_restores_every_generator():
    seed_everything(5)
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_everything(6)
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
