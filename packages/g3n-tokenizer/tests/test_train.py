import json

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


def test_resume_refuses_files_from_another_epoch(tmp_path, mae_checkpoint, volumes_set):
    """train_state.json records the digests of last.safetensors and train_state.safetensors: a run
    killed between those writes must not resume from a mix of two epochs."""
    from g3n_tokenizer.errors import CheckpointError

    ss = gs.ShardSet.open(volumes_set)
    cfg = preset("test", train={"max_epochs": 1, "steps_per_epoch": 1})
    train_tokenizer(MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn), ss, cfg.train, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert set(state["resume_files"]) == {"last.safetensors", "train_state.safetensors"}
    from safetensors.torch import load_file, save_file

    optim = load_file(str(tmp_path / "run" / "train_state.safetensors"))
    save_file({k: v + 1 for k, v in optim.items()}, str(tmp_path / "run" / "train_state.safetensors"))
    cfg2 = preset("test", train={"max_epochs": 2, "steps_per_epoch": 1})
    with pytest.raises(CheckpointError, match="train_state.safetensors: does not match"):
        train_tokenizer(MaeCnnTokenizer.from_mae(mae_checkpoint, cfg2.mae_cnn), ss, cfg2.train, tmp_path / "run",
                        resume=True, progress=False)


def test_autoencoderkl_resume_continues_exactly(tmp_path, volumes_set, monkeypatch):
    """AutoencoderKL samples its latent during training: a run stopped after one epoch and resumed
    must continue the same random stream (restored from train_state.json), not re-seed, to give
    exactly the per-step losses of an uninterrupted run."""
    import g3n_tokenizer.train as T

    ss = gs.ShardSet.open(volumes_set)
    steps: list[float] = []
    plain_step = T.train_step

    def recording_step(engine, tok, x, *flips):
        loss = plain_step(engine, tok, x, *flips)
        assert engine.name == "torch"
        steps.append(loss)
        return loss

    monkeypatch.setattr(T, "train_step", recording_step)

    def run(epochs, run_dir, resume=False):
        steps.clear()
        torch.manual_seed(0)
        cfg = preset("test", train={"max_epochs": epochs, "steps_per_epoch": 2, "patience": 10})
        tok = AutoencoderKLTokenizer(cfg.autoencoderkl)  # fresh init: resume must overwrite it all
        res = train_tokenizer(tok, ss, cfg.train, tmp_path / run_dir, resume=resume, progress=False)
        return list(steps), [h["val_loss"] for h in res.history]

    full, full_val = run(3, "full")
    part, _ = run(1, "part")
    state = json.loads((tmp_path / "part" / "train_state.json").read_text())
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])
    rest, rest_val = run(3, "part", resume=True)
    assert len(full) == 6 and len(part) == 2 and len(rest) == 4
    assert part + rest == full  # exactly, not approximately
    assert rest_val == full_val


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


def test_resume_refuses_changed_settings_or_keeps_the_runs(tmp_path, mae_checkpoint, volumes_set, capsys):
    """A resume with another seed or learning rate is refused naming each field (issue 22.3); more
    epochs apply with a log line; --accept-checkpoint-config keeps the run's values, saying so."""
    from g3n_tokenizer.cli import main

    args = ["train", "--volumes", str(volumes_set), "--out", str(tmp_path / "run"), "--preset", "test",
            "--steps-per-epoch", "1", "--device", "cpu", "--mae-checkpoint", str(mae_checkpoint)]
    assert main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--epochs", "2", "--resume", "--seed", "4", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "train.seed: 0 in the checkpoint, 4 requested" in err and "train.lr: 0.0005 in the checkpoint, 0.01" in err
    assert "max_epochs" not in err
    assert main([*args, "--epochs", "2", "--resume", "--seed", "4", "--accept-checkpoint-config"]) == 0
    out = capsys.readouterr().out
    assert "keeping the checkpoint's train.seed = 0 (requested 4" in out and "max_epochs changes from 1 to 2" in out
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["epoch"] == 2 and state["config"]["seed"] == 0 and state["config"]["max_epochs"] == 2
    # the tokenizer itself cannot change on resume: another projection width is refused, without the accept hint
    assert main([*args, "--epochs", "3", "--resume", "--c", "4", "--accept-checkpoint-config"]) == 2
    err = capsys.readouterr().err
    assert "model.tokenizer.c: 8 in the checkpoint, 4 requested" in err and "--accept-checkpoint-config" not in err


def test_random_flips_mirror_whole_volumes_reproducibly():
    from g3n_tokenizer.train import random_flips

    x = torch.arange(64 * 4 * 3 * 2, dtype=torch.float32).reshape(64, 1, 4, 3, 2)
    torch.manual_seed(5)
    y = random_flips(x, (0,))
    same = [torch.equal(y[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(y[i], x[i].flip(1)) for i in range(64)]
    assert all(a != b for a, b in zip(same, mirrored))  # each volume is one or the other, as a whole
    assert 16 < sum(mirrored) < 48
    assert torch.equal(x, torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape))  # input untouched
    torch.manual_seed(5)
    assert torch.equal(random_flips(x, (0,)), y)
    both = random_flips(x, (0, 2))
    assert all(any(torch.equal(both[i], v) for v in (x[i], x[i].flip(1), x[i].flip(3), x[i].flip(1, 3)))
               for i in range(64))
    assert torch.equal(random_flips(x, ()), x)
    with pytest.raises(ValueError, match="flip_axes"):
        preset("test", train={"flip_axes": [3]})


def test_decoder_only_fine_tune_keeps_projection_and_latents(tmp_path, mae_checkpoint, volumes_set, trained, monkeypatch):
    """``freeze: [proj]`` with flips, warm-started from a trained tokenizer: the decoder learns, the
    projection and so every latent stay bit for bit (a generator trained on them stays valid), and
    a run stopped after an epoch and resumed flips and steps exactly as an uninterrupted one."""
    import g3n_tokenizer.train as T

    ss = gs.ShardSet.open(volumes_set)
    init = trained["result"].checkpoint
    steps: list[float] = []
    plain_step = T.train_step
    monkeypatch.setattr(T, "train_step", lambda *a: steps.append(plain_step(*a)) or steps[-1])

    def run(epochs, run_dir, resume=False):
        steps.clear()
        cfg = preset("test", train={"max_epochs": epochs, "steps_per_epoch": 2, "patience": 10, "freeze": ["proj"],
                                    "flip_axes": [0]})
        tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn)
        train_tokenizer(tok, ss, cfg.train, tmp_path / run_dir, resume=resume, progress=False, init=init)
        return list(steps)

    full = run(2, "full")
    part = run(1, "part")
    rest = run(2, "part", resume=True)
    assert len(full) == 4 and part + rest == full
    before = MaeCnnTokenizer.from_checkpoint(init)
    after = MaeCnnTokenizer.from_checkpoint(tmp_path / "full" / "last.safetensors")
    old, new = before.head.state_dict(), after.head.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("proj."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    x = next(iter(T.iter_batches(ss, trained["splits"]["val"], 2, (32, 32, 32)))).volumes
    with torch.no_grad():
        assert torch.equal(before.encode(x), after.encode(x))

    cfg = preset("test", train={"max_epochs": 1, "freeze": ["projection"]})
    with pytest.raises(ValueError, match="freeze 'projection': no such part .*decoder, proj"):
        train_tokenizer(MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn), ss, cfg.train, tmp_path / "bad",
                        progress=False)
