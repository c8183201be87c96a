"""The DeepSpeed engine on CPU (one rank, gloo): same losses as the torch engine, safetensors
checkpoints, exact resume. Its first run ever JIT-compiles DeepSpeed's CPU comm op (~90 s, then
cached), so this and the 2-rank ZeRO test (test_zero.py) are the package's only DeepSpeed tests. Marked slow (run with --runslow): on the
shared 2-core machine it took 12 s with a warm extension cache and 148-506 s while other jobs held
or rebuilt DeepSpeed's torch-extension cache."""

from __future__ import annotations

import pytest
import torch

from g3n_dit.checkpoint import load_checkpoint
from g3n_dit.train import train
from dit_testutil import _flat, tiny_cfg, toy_set


@pytest.mark.slow
def test_deepspeed_engine_matches_torch_and_resumes(tmp_path):
    data = toy_set(16)
    ref = train(tiny_cfg(max_steps=4), data, tmp_path / "torch", progress=False)
    first = train(tiny_cfg(engine="deepspeed", max_steps=4), data, tmp_path / "ds", progress=False, stop_after=2)
    second = train(tiny_cfg(engine="deepspeed", max_steps=4), data, tmp_path / "ds", progress=False)
    assert first.losses + second.losses == ref.losses
    a, b = load_checkpoint(tmp_path / "torch"), load_checkpoint(tmp_path / "ds")
    assert torch.equal(_flat(a.model), _flat(b.model)) and torch.equal(_flat(a.ema), _flat(b.ema))
