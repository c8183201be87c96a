"""Training tests on the plain-torch path (CPU): learning, exact resume after a kill, checkpoints,
non-finite loss, data-parallel equivalence (2 gloo processes vs one with the doubled batch), N->M resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import g3n_shards as gs
from g3n_mae.checkpoint import (
    CheckpointError, export_model, find_latest, list_checkpoints, load_checkpoint, load_model, read_safetensors,
)
from g3n_mae.config import preset
from g3n_mae.data import DataError, InMemoryVolumes, VolumeBatchStream, zscore_brain, zscore_brain_torch
from g3n_mae.launch import SourceSpec, run_local
from g3n_mae.train import NonFiniteLossError, lr_at, train

QUIET = lambda s: None  # noqa: E731


def _cfg(**train):
    base = {"engine": "torch", "log_every": 1000, "deterministic": True}
    return preset("test", train={**base, **train})


def test_zscore_over_brain_voxels():
    v = np.zeros((8, 8, 8), np.float32)
    v[2:6, 2:6, 2:6] = np.random.default_rng(0).uniform(50, 150, (4, 4, 4))
    z = zscore_brain(v)
    brain = v > 0
    assert abs(z[brain].mean()) < 1e-5 and abs(z[brain].std() - 1) < 1e-4
    assert (z[~brain] == 0).all()
    with pytest.raises(DataError, match="no brain voxel"):
        zscore_brain(np.zeros((4, 4, 4)), key="empty-one")
    # the batched device version used by the loop and encode matches the numpy reference
    v2 = v * 3.0 + (v > 0) * 7.0
    got = zscore_brain_torch(torch.from_numpy(np.stack([v, v2]))[:, None]).numpy()[:, 0]
    np.testing.assert_allclose(got, np.stack([z, zscore_brain(v2)]), atol=1e-5)
    assert got.dtype == np.float32


def test_lr_schedule_warmup_then_cosine():
    cfg = _cfg(total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] > 1e-5 and lr_at(100, cfg) == pytest.approx(1e-5)


def test_shard_stream_covers_epoch_and_rejects_bad_shape(volume_set):
    ss = gs.ShardSet.open(volume_set, kind="volumes")
    s = VolumeBatchStream(ss, 4, (32, 32, 32), 64)
    it = iter(s)
    keys = [k for _ in range(4) for k in next(it)["keys"]]
    assert sorted(keys) == sorted(ss.keys())  # one epoch = every sample once
    bad = VolumeBatchStream(ss, 2, (32, 32, 16), 64)
    with pytest.raises(DataError, match="volume shape"):
        next(iter(bad))


def test_few_hundred_steps_lower_the_loss(tmp_path, volume_set):
    cfg = _cfg(total_steps=300, warmup_steps=20, ckpt_every=300, batch_size=4, lr=2e-3)
    res = train(cfg, gs.ShardSet.open(volume_set, kind="volumes"), tmp_path / "run", log=QUIET,
                data_manifests=["sha256:test"])
    losses = np.array([v for _, v in res.losses])
    assert len(losses) == 300 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-30:].mean()
    assert last < 0.7 * first, (first, last)
    # logs: metrics.jsonl; checkpoint with manifest digest; export with model card
    card_dir = export_model(tmp_path / "run", tmp_path / "export", encoder_only=True).parent
    card = (card_dir / "MODEL_CARD.md").read_text()
    assert "sha256:test" in card and "encoder: 2 layers" in card
    model, mcfg, _ = load_model(card_dir, encoder_only=True)
    assert mcfg == cfg.model


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from g3n_mae.config import preset
    from g3n_mae.data import InMemoryVolumes, brain_like_volumes
    from g3n_mae.train import train
    cfg = preset("test", train=dict(engine="torch", total_steps=40, ckpt_every=15, keep_last=2, log_every=1000,
                                    deterministic=True, batch_size=3))
    src = InMemoryVolumes(brain_like_volumes(10, (32, 32, 32), seed=5))
    def kill(step, loss):
        if step == 37:
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, src, sys.argv[1], on_step=kill, log=lambda s: None)
    """
)


def test_exact_resume_after_kill(tmp_path):
    from g3n_mae.data import brain_like_volumes

    cfg = _cfg(total_steps=40, ckpt_every=15, keep_last=2, batch_size=3)
    src = InMemoryVolumes(brain_like_volumes(10, (32, 32, 32), seed=5))  # 10 % 3 != 0: epochs straddle batches
    ref = train(cfg, src, tmp_path / "ref", log=QUIET)

    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert find_latest(run / "checkpoints").name == "step_00000030"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000015", "step_00000030"]

    resumed = train(cfg, src, run, resume=True, log=QUIET)
    ref_tail = [v for s, v in ref.losses if s > 30]
    got = [v for _, v in resumed.losses]
    assert [s for s, _ in resumed.losses] == list(range(31, 41))
    assert got == ref_tail  # bit-identical
    a, _ = read_safetensors(tmp_path / "ref/checkpoints/step_00000040/model.safetensors")
    b, _ = read_safetensors(run / "checkpoints/step_00000040/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    assert all(r["step"] <= 40 for r in lines)


def test_exact_resume_with_shards_and_workers(tmp_path, volume_set):
    """Shard cursors + two loader workers: stop at 7, resume, same losses as one run to 12."""
    cfg = _cfg(total_steps=12, ckpt_every=100, batch_size=3, num_workers=2)
    ss = gs.ShardSet.open(volume_set, kind="volumes")
    ref = train(cfg, ss, tmp_path / "ref", log=QUIET)
    first = train(cfg, ss, tmp_path / "split", stop_at=7, log=QUIET)
    assert first.steps == 7 and find_latest(tmp_path / "split/checkpoints").name == "step_00000007"
    second = train(cfg, ss, tmp_path / "split", resume=True, log=QUIET)
    assert [v for _, v in first.losses + second.losses] == [v for _, v in ref.losses]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    from g3n_mae.data import brain_like_volumes
    from g3n_mae.model import MAE3D

    original = MAE3D.forward_loss
    calls = {"n": 0}

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(MAE3D, "forward_loss", poisoned)
    cfg = _cfg(total_steps=20, ckpt_every=5)
    with pytest.raises(NonFiniteLossError, match=r"step 8: loss is nan.*step_00000005"):
        train(cfg, InMemoryVolumes(brain_like_volumes(8, (32, 32, 32))), tmp_path / "run", log=QUIET)
    latest = find_latest(tmp_path / "run/checkpoints")
    assert latest.name == "step_00000005"
    model_sd, _, state = load_checkpoint(latest)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in model_sd.values())


def test_checkpoint_tamper_and_missing_are_clear_errors(tmp_path):
    from g3n_mae.data import brain_like_volumes

    train(_cfg(total_steps=2, ckpt_every=2), InMemoryVolumes(brain_like_volumes(4, (32, 32, 32))), tmp_path / "r", log=QUIET)
    ck = find_latest(tmp_path / "r/checkpoints")
    with open(ck / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "nothing-here")


def test_resume_with_nothing_to_continue_starts_and_a_finished_run_returns(tmp_path):
    from g3n_mae.data import brain_like_volumes

    lines: list[str] = []
    vols = InMemoryVolumes(brain_like_volumes(4, (32, 32, 32)))
    res = train(_cfg(total_steps=2, ckpt_every=2), vols, tmp_path / "r", resume=True, log=lines.append)
    assert res.steps == 2 and any("no checkpoint under" in ln and "starting from scratch" in ln for ln in lines)
    before, _ = read_safetensors(tmp_path / "r" / "export" / "model.safetensors")
    (tmp_path / "r" / "export" / "model.safetensors").unlink()  # killed before the export was written
    lines.clear()
    again = train(_cfg(total_steps=2, ckpt_every=2), vols, tmp_path / "r", resume=True, log=lines.append)
    assert again.steps == 2 and again.losses == [] and any("finished already" in ln for ln in lines)
    after, _ = read_safetensors(tmp_path / "r" / "export" / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_pos_embed_interpolates_for_other_geometry(tmp_path):
    from g3n_mae.data import brain_like_volumes

    train(_cfg(total_steps=2, ckpt_every=2), InMemoryVolumes(brain_like_volumes(4, (32, 32, 32))), tmp_path / "r", log=QUIET)
    same, cfg, digest = load_model(tmp_path / "r")
    other, cfg2, digest2 = load_model(tmp_path / "r", img_size=(40, 32, 48))
    assert digest == digest2 and cfg2.grid_size == (5, 4, 6)
    with torch.no_grad():
        assert other.encode(torch.randn(1, 1, 40, 32, 48)).shape == (1, 120, cfg.embed_dim)
    assert torch.equal(same.blocks[0].fc1.weight, other.blocks[0].fc1.weight)


def test_data_parallel_matches_doubled_batch_and_resumes_on_one_process(tmp_path):
    """2 gloo processes x batch 2 == 1 process x batch 4 (allclose), then N=2 -> M=1 resume."""
    c2 = _cfg(total_steps=4, ckpt_every=4, batch_size=2, deterministic=False)
    c1 = _cfg(total_steps=4, ckpt_every=4, batch_size=4, deterministic=False)
    spec = SourceSpec(synthetic=16, synthetic_seed=1)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # import torch._dynamo once, before forking
    run_local(2, c2, spec, tmp_path / "ddp2", start_method="fork")
    single = train(c1, spec.open(c1.model.img_size), tmp_path / "one", log=QUIET)
    a, _ = read_safetensors(tmp_path / "ddp2/checkpoints/step_00000004/model.safetensors")
    b, _ = read_safetensors(tmp_path / "one/checkpoints/step_00000004/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-4, rtol=1e-3), k
    _, _, state2 = load_checkpoint(tmp_path / "ddp2/checkpoints/step_00000004")
    assert state2["world_size"] == 2 and len(state2["rng"]) == 2
    assert state2["samples_seen"] == single.steps * 4

    # a checkpoint saved by 2 processes resumes on 1: weights + optimizer carried over, step continues
    # the run's own warm-up (preset() would shorten the preset's 5 to the first run's 4 steps only
    # there): a resume may lengthen the run, not change its schedule
    c1_more = _cfg(total_steps=6, warmup_steps=c1.train.warmup_steps, ckpt_every=6, batch_size=4, deterministic=False)
    res = train(c1_more, spec.open(c1.model.img_size), tmp_path / "ddp2", resume=True, log=QUIET)
    assert [s for s, _ in res.losses] == [5, 6]
    _, optim, state = load_checkpoint(tmp_path / "ddp2/checkpoints/step_00000006")
    assert state["world_size"] == 1 and float(optim["step/blocks.0.fc1.weight"]) == 6.0


def test_infinite_gradient_is_not_applied(tmp_path, monkeypatch):
    from g3n_mae.data import brain_like_volumes
    from g3n_mae.train import TorchEngine

    real = TorchEngine.backward
    calls = {"n": 0}

    def exploding(self, loss):
        real(self, loss)
        calls["n"] += 1
        if calls["n"] == 3:
            self.module.blocks[0].fc1.weight.grad[0, 0] = float("inf")

    monkeypatch.setattr(TorchEngine, "backward", exploding)
    with pytest.raises(NonFiniteLossError, match=r"step 3: gradient norm is inf.*step_00000002"):
        train(_cfg(total_steps=6, ckpt_every=2), InMemoryVolumes(brain_like_volumes(4, (32, 32, 32))), tmp_path / "r",
              log=QUIET)
    model_sd, _, _ = load_checkpoint(find_latest(tmp_path / "r/checkpoints"))
    assert all(torch.isfinite(v).all() for v in model_sd.values())


def test_init_warm_start_loads_full_mae_and_resume_wins(tmp_path, monkeypatch, capsys):
    """``train --init``: the step-0 model is exactly the init weights (encoder, decoder, mask token),
    the optimizer and step start fresh, the init's path and SHA-256 are recorded, and a checkpoint
    found by ``--resume`` wins over the init."""
    import g3n_mae.train as T
    from g3n_mae.checkpoint import atomic_save_safetensors, file_sha256, weights_metadata
    from g3n_mae.cli import main
    from g3n_mae.model import MAE3D

    mcfg = preset("test").model
    torch.manual_seed(123)  # not the run's seed: the init has to replace the fresh weights
    init = tmp_path / "zoo" / "model.safetensors"  # fp16, as a model zoo ships it
    atomic_save_safetensors({k: v.half() for k, v in MAE3D(mcfg).state_dict().items()}, init, weights_metadata(mcfg))
    init_sd = {k: v.float() for k, v in read_safetensors(init)[0].items()}
    start: dict[str, torch.Tensor] = {}
    real_build = T.build_engine

    def spy(kind, model, cfg, d):
        start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_build(kind, model, cfg, d)

    monkeypatch.setattr(T, "build_engine", spy)
    run = tmp_path / "run"
    args = ["train", "--preset", "test", "--synthetic", "4", "--batch-size", "2", "--engine", "torch",
            "--run-dir", str(run), "--init", str(init.parent)]
    assert main([*args, "--steps", "1", "--norm-pix-loss"]) == 0  # the objective may change, not the architecture
    assert start.keys() == init_sd.keys() and "mask_token" in start
    assert all(torch.equal(start[k], init_sd[k]) for k in init_sd)
    model_sd, optim, state = load_checkpoint(find_latest(run / "checkpoints"))
    assert state["step"] == 1 and float(optim["step/blocks.0.fc1.weight"]) == 1.0  # fresh AdamW, one update
    assert state["init"]["sha256"] == file_sha256(init) and state["init"]["path"] == str(init.resolve())
    assert state["init"]["objective_changed"] == {"norm_pix_loss": [False, True]}
    assert not torch.equal(model_sd["blocks.0.fc1.weight"], init_sd["blocks.0.fc1.weight"])
    assert f"`{init.resolve()}`" in (run / "export" / "MODEL_CARD.md").read_text()

    capsys.readouterr()
    start.clear()
    assert main([*args, "--steps", "2", "--resume"]) == 0
    assert "not applied" in capsys.readouterr().out  # one log line says the init was ignored
    assert not torch.equal(start["blocks.0.fc1.weight"], init_sd["blocks.0.fc1.weight"])  # the init was not loaded
    _, optim, state = load_checkpoint(find_latest(run / "checkpoints"))
    assert state["step"] == 2 and float(optim["step/blocks.0.fc1.weight"]) == 2.0  # continued, not restarted
    assert state["init"]["sha256"] == file_sha256(init)


def test_init_refuses_another_architecture_and_encoder_only(tmp_path, capsys):
    from g3n_mae.checkpoint import save_weights
    from g3n_mae.cli import main
    from g3n_mae.model import MAE3D

    other = preset("test").model.model_copy(update={"depth": 1, "decoder_embed_dim": 16})
    bad = tmp_path / "other.safetensors"
    save_weights(bad, MAE3D(other).state_dict(), other)
    args = ["train", "--preset", "test", "--synthetic", "4", "--engine", "torch", "--steps", "1", "--run-dir",
            str(tmp_path / "run")]
    assert main([*args, "--init", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "depth: 1 in the init weights, 2 in this run" in err and "decoder_embed_dim" in err
    assert "embed_dim: " not in err.replace("decoder_embed_dim", "")  # only the differing fields
    mcfg = preset("test").model
    enc = tmp_path / "encoder.safetensors"
    save_weights(enc, {k: v for k, v in MAE3D(mcfg).state_dict().items() if not k.startswith(("decoder_", "mask_token"))}, mcfg)
    assert main([*args, "--init", str(enc)]) == 2
    assert "encoder-only" in capsys.readouterr().err
    assert not find_latest(tmp_path / "run" / "checkpoints")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--init WEIGHTS" in capsys.readouterr().out
