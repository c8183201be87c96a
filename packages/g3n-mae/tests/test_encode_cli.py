"""Encode (volumes -> tokens set: deterministic, resumable, rejects) and the command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import g3n_shards as gs
from g3n_mae import encode as enc
from g3n_mae.checkpoint import file_sha256, load_model
from g3n_mae.cli import main
from g3n_mae.config import preset
from g3n_mae.data import InMemoryVolumes, brain_like_volumes, zscore_brain
from g3n_mae.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("mae") / "run"
    cfg = preset("test", train=dict(engine="torch", total_steps=3, ckpt_every=3, log_every=1000))
    train(cfg, InMemoryVolumes(brain_like_volumes(6, (32, 32, 32), seed=9)), run, log=lambda s: None)
    return run


@pytest.fixture(scope="module")
def vols_with_bad(tmp_path_factory):
    """7 brain-like volumes + 1 empty (all-zero) one that encode must reject and skip."""
    out = tmp_path_factory.mktemp("v") / "set"
    vols = brain_like_volumes(7, (32, 32, 32), seed=4)
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-mae-tests"),
                        geometry=gs.Geometry(shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8)),
                        max_shard_samples=3) as w:
        for i in range(8):
            meta = gs.SampleMeta(subject=f"sub-{i}", cohort="SYN", modality="T1", age=40.0 + i)
            v = np.zeros((32, 32, 32), np.float32) if i == 5 else vols[f"synth-{i if i < 5 else i - 1:05d}"]
            w.write(gs.sample_key(meta), meta, {"volume": v})
    return out


def _arrays(path):
    ss = gs.ShardSet.open(path, kind="tokens")
    return {s.key: s.arrays for s in ss}, ss


def test_encode_tokens_set(tmp_path, trained, vols_with_bad):
    manifest = enc.encode_volume_set(trained, vols_with_bad, tmp_path / "tok", store="both", batch_size=3, progress=False)
    arrays, ss = _arrays(tmp_path / "tok")
    model, cfg, digest = load_model(trained, encoder_only=True)
    assert manifest.kind == "tokens" and len(arrays) == 7
    assert ss.manifest.encoder.checkpoint_digest == digest == file_sha256(
        next((trained / "checkpoints").glob("step_*")) / "model.safetensors")
    g = ss.manifest.geometry
    assert tuple(g.shape) == (32, 32, 32) and tuple(g.patch_size) == (8, 8, 8)
    assert tuple(g.token_grid) == (4, 4, 4) and g.channels == cfg.embed_dim
    assert ss.manifest.arrays["tokens"].dtypes == ["float16"]
    rejects = gs.RejectLog(tmp_path / "tok").records()
    assert len(rejects) == 1 and "no brain voxel" in rejects[0]["reason"]
    # tokens equal the unmasked encoder output (float16 on disk), and mean is their mean
    src = gs.ShardSet.open(vols_with_bad, kind="volumes")
    key = sorted(arrays)[0]
    vol = zscore_brain(src.get(key).arrays["volume"])
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(vol)[None, None])[0].numpy()
    a = arrays[key]
    assert a["tokens"].shape == (64, cfg.embed_dim)
    np.testing.assert_allclose(a["tokens"], ref, atol=5e-3 * np.abs(ref).max())
    np.testing.assert_allclose(a["mean"], ref.mean(0), rtol=1e-5, atol=1e-6)


def test_encode_is_deterministic_and_resumable(tmp_path, trained, vols_with_bad, monkeypatch):
    enc.encode_volume_set(trained, vols_with_bad, tmp_path / "a", store="tokens", batch_size=2, progress=False)
    # interrupt the second run in its second part (input shard), then rerun: finished parts are kept
    calls = {"n": 0}
    real = enc.check_volume

    def interrupting(v, key="?"):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(v, key)

    monkeypatch.setattr(enc, "check_volume", interrupting)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_volume_set(trained, vols_with_bad, tmp_path / "b", store="tokens", batch_size=2, progress=False)
    assert not (tmp_path / "b" / gs.MANIFEST_NAME).exists()
    assert (tmp_path / "b" / enc.PARTS_DIR / "part-000000" / gs.MANIFEST_NAME).exists()
    calls["n"] = -100  # no more interruptions
    enc.encode_volume_set(trained, vols_with_bad, tmp_path / "b", store="tokens", batch_size=2, progress=False)
    assert calls["n"] == -100 + 8 - 3  # the first part (3 volumes) was not encoded again
    a, sa = _arrays(tmp_path / "a")
    b, sb = _arrays(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k]["tokens"], b[k]["tokens"]) for k in a)
    assert sa.digest == sb.digest
    assert not (tmp_path / "b" / enc.PARTS_DIR).exists()
    with pytest.raises(FileExistsError):
        enc.encode_volume_set(trained, vols_with_bad, tmp_path / "b", progress=False)


def test_encode_other_geometry_interpolates(tmp_path, trained):
    out = tmp_path / "v40"
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-mae-tests"),
                        geometry=gs.Geometry(shape=(40, 32, 32), patch_size=(8, 8, 8))) as w:
        for i, v in enumerate(brain_like_volumes(2, (40, 32, 32)).values()):
            meta = gs.SampleMeta(subject=f"s{i}", modality="T1")
            w.write(gs.sample_key(meta), meta, {"volume": v})
    m = enc.encode_volume_set(trained, out, tmp_path / "t40", store="mean", progress=False)
    assert tuple(m.geometry.token_grid) == (5, 4, 4) and m.num_samples == 2


def test_cli(tmp_path, vols_with_bad, capsys):
    assert main(["config", "--preset", "paper"]) == 0
    text = capsys.readouterr().out
    assert "embed_dim: 1152" in text and "img_size:" in text
    (tmp_path / "c.yaml").write_text("preset: test\ntrain:\n  total_steps: 4\n  ckpt_every: 2\n  tensorboard: true\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--data", str(vols_with_bad), "--run-dir",
                 str(tmp_path / "shards-run"), "--engine", "torch", "--steps", "3", "--no-tensorboard"]) == 0
    rejects = [json.loads(x) for x in (tmp_path / "shards-run" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "no brain voxel" in rejects[0]["reason"]  # the empty volume is skipped, logged
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--synthetic", "6", "--run-dir", str(run),
                 "--engine", "torch", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 4
    assert list((run / "tb").iterdir())  # TensorBoard event file
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [4]
    # --resume takes the run's own config (test preset, batch 2); only --steps changes
    assert main(["train", "--synthetic", "6", "--run-dir", str(run), "--resume", "--steps", "6", "--engine", "torch"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 2
    assert main(["export", str(run), str(tmp_path / "exp"), "--encoder-only"]) == 0
    assert (tmp_path / "exp" / "MODEL_CARD.md").is_file()
    assert main(["info", str(tmp_path / "exp")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["token_grid"] == [4, 4, 4]
    assert main(["encode", str(tmp_path / "exp"), "--volumes", str(vols_with_bad), "--out", str(tmp_path / "tok"),
                 "--store", "mean", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 7
    assert main(["--local_rank=0", "config", "--preset", "tiny"]) == 0  # deepspeed launcher argument tolerated
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shutil.rmtree(tmp_path / "exp")


def test_untrained_weights_are_seeded_and_load(tmp_path, capsys):
    """`g3n-mae untrained`: the random-initialisation baseline, the same weights for the same seed
    (compared as tensors: safetensors writes its metadata in no fixed order)."""
    from g3n_mae.checkpoint import read_safetensors
    from g3n_mae.cli import main as mae_main

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert mae_main(["untrained", str(tmp_path / f"{name}.safetensors"), "--preset", "test", "--seed", str(seed)]) == 0
    a, b, c = (read_safetensors(tmp_path / f"{n}.safetensors")[0] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    model, cfg, _ = load_model(tmp_path / "a.safetensors")
    assert cfg.img_size == (32, 32, 32)
