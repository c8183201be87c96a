import json
import os

import pytest
import torch

import g3n_shards as gs
from g3n_tokenizer.autoencoderkl import AutoencoderKLTokenizer, kl_divergence
from g3n_tokenizer.config import preset
from g3n_tokenizer.mae_cnn import MaeCnnTokenizer
from g3n_tokenizer.train import train_tokenizer, validation_loss


def test_training_clearly_lowers_reconstruction_error(trained, volumes_set):
    res = trained["result"]
    ss = gs.ShardSet.open(volumes_set)
    best = MaeCnnTokenizer.from_checkpoint(res.checkpoint)
    after = validation_loss(best, ss, trained["splits"]["val"], 2, "mse")
    assert after == pytest.approx(res.best_val, rel=1e-5)
    assert after < 0.5 * trained["untrained_val"], (after, trained["untrained_val"])
    # ... and clearly beats the trivial reconstruction (all zeros = the brain mean in z-scored space)
    from g3n_tokenizer.data import iter_batches

    zero = sum(float((b.volumes**2).mean()) for b in iter_batches(ss, trained["splits"]["val"], 1, (32, 32, 32)))
    zero /= len(trained["splits"]["val"])
    assert after < 0.6 * zero, (after, zero)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    lines = (res.checkpoint.parent / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == res.epochs_run
    state = json.loads((res.checkpoint.parent / "train_state.json").read_text())
    assert state["best_epoch"] == res.best_epoch and state["data_manifest"] == ss.manifest.digest


def test_early_stopping_with_patience(tmp_path, mae_checkpoint, volumes_set):
    cfg = preset("test", train={"max_epochs": 10, "patience": 2, "min_delta": 1e9, "steps_per_epoch": 1})
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn)
    res = train_tokenizer(tok, gs.ShardSet.open(volumes_set), cfg.train, tmp_path / "run", progress=False)
    # epoch 0 improves on +inf; nothing can improve by 1e9 afterwards: stop after 2 more epochs
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 0


def test_resume_continues(tmp_path, mae_checkpoint, volumes_set):
    ss = gs.ShardSet.open(volumes_set)
    cfg = preset("test", train={"max_epochs": 1, "steps_per_epoch": 2})
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn)
    train_tokenizer(tok, ss, cfg.train, tmp_path / "run", progress=False)
    cfg2 = preset("test", train={"max_epochs": 2, "steps_per_epoch": 2})
    tok2 = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg2.mae_cnn)
    res = train_tokenizer(tok2, ss, cfg2.train, tmp_path / "run", resume=True, progress=False)
    assert res.epochs_run == 2 and [h["epoch"] for h in res.history] == [0, 1] and res.history[-1]["step"] == 4


def test_autoencoderkl_trains_and_shapes(tmp_path, volumes_set):
    torch.manual_seed(0)
    cfg = preset("test", train={"max_epochs": 3})
    tok = AutoencoderKLTokenizer(cfg.autoencoderkl)
    assert tok.latent_shape == (512, 4) and tok.geometry.token_grid == (8, 8, 8)
    ss = gs.ShardSet.open(volumes_set)
    from g3n_tokenizer.data import split_subjects

    splits = split_subjects(ss.metadata(), {"val": 0.25}, seed=0)
    before = validation_loss(tok, ss, splits["val"], 2, "mse")
    res = train_tokenizer(tok, ss, cfg.train, tmp_path / "aekl", splits=splits, loss_kind="mse", progress=False)
    assert res.best_val < 0.7 * before
    best = AutoencoderKLTokenizer.from_checkpoint(res.checkpoint)
    x = torch.randn(2, 1, 32, 32, 32)
    z = best.encode(x)
    assert tuple(z.shape) == (2, 512, 4)
    assert torch.equal(z, best.encode(x))  # deterministic encode (posterior mean)
    assert tuple(best.decode(z).shape) == (2, 1, 32, 32, 32)


def test_kl_zero_at_prior():
    assert float(kl_divergence(torch.zeros(2, 4, 3, 3, 3), torch.ones(2, 4, 3, 3, 3))) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(torch.ones(2, 4, 3, 3, 3), torch.ones(2, 4, 3, 3, 3))) == pytest.approx(0.5 * 108, rel=1e-5)


@pytest.mark.skipif(os.environ.get("G3N_TEST_DEEPSPEED") != "1",
                    reason="DeepSpeed JIT-compiles a CPU op on first use (minutes on 2 cores); set G3N_TEST_DEEPSPEED=1")
def test_deepspeed_engine_matches_torch(tmp_path, mae_checkpoint, volumes_set):
    ss = gs.ShardSet.open(volumes_set)
    out = {}
    for engine in ("torch", "deepspeed"):
        torch.manual_seed(0)
        cfg = preset("test", train={"max_epochs": 2, "steps_per_epoch": 2, "engine": engine})
        tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn)
        out[engine] = train_tokenizer(tok, ss, cfg.train, tmp_path / engine, progress=False)
    a = [h["val_loss"] for h in out["torch"].history]
    b = [h["val_loss"] for h in out["deepspeed"].history]
    assert a == pytest.approx(b, rel=1e-4)
