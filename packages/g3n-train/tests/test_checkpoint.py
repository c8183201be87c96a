"""Step folders: atomic save, latest pointer, rotation, digests, file modes; the optimizer key format."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from g3n_train import CheckpointError, CheckpointStore, read_files, read_state, read_tensors, save_tensors
from g3n_train.optim_state import is_numbered, named_from_numbered, names_in_group_order


def _save(store, step, keep=2):
    files = {"model.safetensors": ({"w": torch.full((2, 2), float(step))}, {"format": "x"}),
             "optimizer.safetensors": ({"exp_avg/w": torch.zeros(2, 2)}, None)}
    return store.save(step, files, {"hello": step}, keep_last=keep, fmt="test-ckpt", version=2)


def test_save_latest_rotate_and_load(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", prefix="step-")
    for s in (1, 2, 3):
        _save(store, s)
    assert [p.name for p in store.list()] == ["step-00000002", "step-00000003"]
    assert store.latest().name == "step-00000003"
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["dir"] == "step-00000003"
    state = read_state(store.latest())
    assert state["format"] == "test-ckpt" and state["format_version"] == 2 and state["step"] == 3 and state["hello"] == 3
    files = read_files(store.latest(), state["files"])
    assert torch.equal(files["model.safetensors"]["w"], torch.full((2, 2), 3.0))
    assert read_tensors(store.latest() / "model.safetensors")[1] == {"format": "x"}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    # re-saving a step replaces it whole; a dangling latest.json falls back to the highest step
    _save(store, 3)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"dir": "step-00000099"}')
    assert store.latest().name == "step-00000003"


def test_a_modified_file_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    path = _save(store, 5)
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 does not match"):
        read_files(path, read_state(path)["files"])
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors: missing"):
        read_files(path, read_state(path)["files"], ["optimizer.safetensors"])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_tensors({"a": torch.ones(1)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask


def test_numbered_optimizer_state_reads_into_names():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    names = names_in_group_order(model)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    opt = torch.optim.AdamW([{"params": [model[0].weight]}, {"params": [model[0].bias, model[1].weight, model[1].bias]}])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    old = {f"optim.{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
           for pid, st in opt.state_dict()["state"].items() for k, v in st.items()}
    assert is_numbered(old)
    named = named_from_numbered(old, names)
    assert torch.equal(named["exp_avg/0.bias"], opt.state[model[0].bias]["exp_avg"])
    assert float(named["step/1.weight"]) == 1.0 and len(named) == 12
    with pytest.raises(ValueError, match="parameter [23]; the model has 2"):
        named_from_numbered(old, names[:2])
