"""Each shipped model (g3n-zoo) loads strictly with its own stage's loader, from the file whose
SHA-256 the zoo manifest lists, and is the model its config.json describes."""

from __future__ import annotations

import json

import pytest
import torch

import g3n_zoo


@pytest.fixture(autouse=True)
def shipped_zoo(monkeypatch):
    monkeypatch.delenv("G3N_ZOO_DIR", raising=False)


def config(name: str) -> dict:
    return json.loads((g3n_zoo.get(name).folder / "config.json").read_text())


def test_mae_loads_and_matches_its_config():
    from g3n_mae.checkpoint import load_model
    from g3n_mae.config import MAEConfig

    model, cfg, digest = load_model(g3n_zoo.get("mae").path)
    assert cfg == MAEConfig.model_validate(config("mae")).model
    assert cfg.img_size == (80, 96, 80) and cfg.grid_size == (10, 12, 10)
    assert digest == g3n_zoo.get("mae").entry.files["model.safetensors"].sha256
    with torch.no_grad():
        tokens = model.encode(torch.randn(1, 1, *cfg.img_size))
    assert tuple(tokens.shape) == (1, 1200, cfg.embed_dim) and torch.isfinite(tokens).all()


def test_mae_cnn_tokenizer_loads_and_matches_its_config():
    from g3n_tokenizer.checkpoint import read_header
    from g3n_tokenizer.registry import load_tokenizer

    path = g3n_zoo.get("mae-cnn").path
    cfg = config("mae-cnn")
    assert read_header(path)["config"] == cfg["model"] and cfg["tokenizer"] == "mae-cnn"
    tok = load_tokenizer("mae-cnn", path)
    x = torch.randn(1, 1, 80, 96, 80)
    with torch.no_grad():
        z = tok.encode(x)
        y = tok.decode(z)
    assert tuple(z.shape[-2:]) == (1200, cfg["model"]["tokenizer"]["c"]) and tuple(y.shape) == tuple(x.shape)
    assert torch.isfinite(y).all()


def test_autoencoderkl_baseline_loads_matches_its_config_and_its_table():
    from g3n_tokenizer.checkpoint import read_header
    from g3n_tokenizer.registry import load_tokenizer

    model = g3n_zoo.get("autoencoderkl")
    cfg = config("autoencoderkl")
    assert read_header(model.path)["config"] == cfg["model"] and cfg["tokenizer"] == "autoencoderkl"
    tok = load_tokenizer("autoencoderkl", model.path)
    x = torch.randn(1, 1, 80, 96, 80)
    with torch.no_grad():
        z = tok.encode(x)
        y = tok.decode(z)
    assert tuple(z.shape[-2:]) == (20 * 24 * 20, 8) and tuple(y.shape) == tuple(x.shape) and torch.isfinite(y).all()
    # the shipped Table 5: both tokenizers on the held-out split (scored before the fp16 packing)
    table = json.loads((model.folder / "table5.json").read_text())
    rows = {r["tokenizer"]: r for r in table["results"]["rows"]}
    assert set(rows) == {"MAE-CNN c=32", "AutoencoderKL"}
    assert rows["AutoencoderKL"]["values_per_volume"] == 76_800 and rows["MAE-CNN c=32"]["values_per_volume"] == 38_400
    assert all(0 < r["ssim"] <= 1 and r["n_heldout"] > 0 for r in rows.values())


@pytest.mark.parametrize("name,task", [("dit", "generation"), ("bridge", "longitudinal")])
def test_dit_and_bridge_load_and_match_their_config(name, task):
    from g3n_dit.checkpoint import load_checkpoint
    from g3n_dit.config import RunConfig
    from g3n_dit.model import DiT

    ck = load_checkpoint(g3n_zoo.get(name).path, with_train_state=False)
    rc = ck.run_config
    # validated, so a field added later with its old behaviour as default compares equal
    assert rc == RunConfig.model_validate(config(name)) and rc.task == task
    model = DiT(rc.model, ck.conditions())
    model.load_state_dict(ck.ema, strict=True)
    model.load_state_dict(ck.model, strict=True)
    assert ck.norm_mean.dtype == torch.float32 and torch.isfinite(ck.norm_std).all()
