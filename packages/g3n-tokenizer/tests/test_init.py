"""``g3n-tokenizer train --init``: warm start of the trainable module from a tokenizer checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from g3n_tokenizer.autoencoderkl import AutoencoderKLTokenizer
from g3n_tokenizer.checkpoint import file_sha256
from g3n_tokenizer.cli import main
from g3n_tokenizer.config import preset
from g3n_tokenizer.mae_cnn import MaeCnnTokenizer


@pytest.fixture()
def other_mae(tmp_path):
    """Another g3n-mae model of the same architecture (stands for a briefly fine-tuned encoder)."""
    from g3n_mae.checkpoint import save_weights
    from g3n_mae.model import MAE3D
    from g3n_mae.config import preset as mae_preset

    torch.manual_seed(5)
    cfg = mae_preset("test").model
    path = tmp_path / "mae-other" / "model.safetensors"
    save_weights(path, MAE3D(cfg).state_dict(), cfg)
    return path


def _spy_engine(monkeypatch) -> list[dict]:
    """Record the trainable module's weights and the train config when the engine is built (step 0)."""
    import g3n_tokenizer.train as T

    seen: list[dict] = []
    real = T.build_engine

    def spy(module, cfg, device):
        seen.append({"weights": {k: v.detach().clone() for k, v in module.state_dict().items()}, "cfg": cfg})
        return real(module, cfg, device)

    monkeypatch.setattr(T, "build_engine", spy)
    return seen


def _train(tmp_path, volumes_set, *extra: str) -> int:
    return main(["train", "--volumes", str(volumes_set), "--out", str(tmp_path / "run"), "--preset", "test", "--epochs", "1",
                 "--steps-per-epoch", "1", "--device", "cpu", "--quiet", *extra])


def test_mae_cnn_init_loads_head_keeps_given_encoder_and_resume_wins(tmp_path, mae_checkpoint, other_mae, volumes_set,
                                                                      monkeypatch, capsys):
    torch.manual_seed(11)  # an init head unlike the one a fresh run draws from --seed
    init_tok = MaeCnnTokenizer.from_mae(other_mae, preset("test").mae_cnn)
    init = tmp_path / "zoo" / "tokenizer.safetensors"
    init_tok.save(init)
    seen = _spy_engine(monkeypatch)
    assert _train(tmp_path, volumes_set, "--mae-checkpoint", str(mae_checkpoint), "--init", str(init),
                  "--precision", "bf16") == 0
    head = init_tok.head.state_dict()
    assert seen[0]["weights"].keys() == head.keys()
    assert all(torch.equal(seen[0]["weights"][k], head[k]) for k in head)  # step 0 = the init's projection + decoder
    assert seen[0]["cfg"].precision == "bf16"
    run = tmp_path / "run"
    best = MaeCnnTokenizer.from_checkpoint(run / "tokenizer.safetensors")
    from g3n_mae.checkpoint import read_safetensors

    given, _ = read_safetensors(mae_checkpoint)  # the frozen encoder is --mae-checkpoint's, not the init's
    assert all(torch.equal(v, given[k]) for k, v in best.encoder.encoder_state().items())
    record = {"path": str(init.resolve()), "sha256": file_sha256(init)}
    assert json.loads((run / "train_state.json").read_text())["init"] == record
    with safe_open(str(run / "tokenizer.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["init"]) == record

    capsys.readouterr()
    seen.clear()
    assert _train(tmp_path, volumes_set, "--mae-checkpoint", str(mae_checkpoint), "--init", str(init), "--resume",
                  "--epochs", "2") == 0
    assert "not applied" in capsys.readouterr().out  # one log line says the init was ignored
    assert not torch.equal(seen[0]["weights"]["proj.weight"], head["proj.weight"])  # the init was not loaded
    state = json.loads((run / "train_state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 2 and state["init"] == record


def test_autoencoderkl_init_loads_the_whole_autoencoder(tmp_path, volumes_set, monkeypatch):
    torch.manual_seed(11)
    init_tok = AutoencoderKLTokenizer(preset("test").autoencoderkl)
    init = tmp_path / "aekl.safetensors"
    init_tok.save(init)
    seen = _spy_engine(monkeypatch)
    assert _train(tmp_path, volumes_set, "--tokenizer", "autoencoderkl", "--init", str(init)) == 0
    ae = {f"ae.{k}": v for k, v in init_tok.ae.state_dict().items()}
    assert seen[0]["weights"].keys() == ae.keys() and all(torch.equal(seen[0]["weights"][k], ae[k]) for k in ae)


def test_init_refuses_another_config_or_kind(tmp_path, mae_checkpoint, volumes_set, capsys):
    narrow = tmp_path / "c4.safetensors"
    MaeCnnTokenizer.from_mae(mae_checkpoint, preset("test", mae_cnn={"c": 4}).mae_cnn).save(narrow)
    aekl = tmp_path / "aekl.safetensors"
    AutoencoderKLTokenizer(preset("test").autoencoderkl).save(aekl)
    args = ("--mae-checkpoint", str(mae_checkpoint), "--init")
    assert _train(tmp_path, volumes_set, *args, str(narrow)) == 2
    err = capsys.readouterr().err
    assert str(narrow) in err and "tokenizer.c: 4 in the init, 8 in this run" in err
    assert _train(tmp_path, volumes_set, *args, str(aekl)) == 2
    assert "checkpoint of tokenizer 'autoencoderkl', not 'mae-cnn'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizer.safetensors").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--init TOKENIZER.safetensors" in out and "--precision {auto,fp32,bf16,bf16-native}" in out
