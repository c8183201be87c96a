import json

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file

import g3n_shards as gs
from g3n_tokenizer.cli import main


def test_cli_train_encode_decode(tmp_path, mae_checkpoint, volumes_set, capsys, cohort_affine):
    run = tmp_path / "run"
    rc = main(["train", "--volumes", str(volumes_set), "--out", str(run), "--mae-checkpoint", str(mae_checkpoint),
               "--preset", "test", "--epochs", "1", "--steps-per-epoch", "2", "--c", "4", "--device", "cpu", "--quiet"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["epochs_run"] == 1 and (run / "tokenizer.safetensors").is_file()
    lat = tmp_path / "lat"
    assert main(["encode", "--volumes", str(volumes_set), "--checkpoint", info["checkpoint"], "--out", str(lat),
                 "--device", "cpu", "--quiet"]) == 0
    enc = json.loads(capsys.readouterr().out)
    assert enc["samples"] == 12 and enc["latent_shape"] == [64, 4] and enc["tokenizer"] == "mae-cnn"
    nii = tmp_path / "nii"
    assert main(["decode", "--latents", str(lat), "--out", str(nii), "--format", "nifti", "--device", "cpu", "--quiet"]) == 0
    img = nib.load(str(sorted(nii.glob("*.nii.gz"))[0]))
    assert np.allclose(img.affine, cohort_affine) and img.shape == (32, 32, 32)
    capsys.readouterr()
    # --keys decodes just those samples; a key not in the set is refused, naming it
    keys = sorted(gs.ShardSet.open(lat).keys())[:3]
    assert main(["decode", "--latents", str(lat), "--out", str(tmp_path / "some"), "--keys", *keys, "--quiet"]) == 0
    assert sorted(gs.ShardSet.open(tmp_path / "some").keys()) == keys
    assert main(["decode", "--latents", str(lat), "--out", str(tmp_path / "bad"), "--keys", keys[0], "no-such-key",
                 "--quiet"]) == 2
    assert "no sample with key(s) no-such-key" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "mae-cnn" in capsys.readouterr().out


def test_cli_autoencoderkl_train(tmp_path, volumes_set, capsys):
    rc = main(["train", "--volumes", str(volumes_set), "--out", str(tmp_path / "a"), "--tokenizer", "autoencoderkl",
               "--preset", "test", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "--quiet",
               "--flip-axes", "0"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 1
    assert json.loads((tmp_path / "a" / "train_state.json").read_text())["config"]["flip_axes"] == [0]


def test_cli_errors_are_clear(tmp_path, volumes_set, capsys):
    assert main(["train", "--volumes", str(volumes_set), "--out", str(tmp_path / "r"), "--preset", "test", "--quiet"]) == 2
    assert "--mae-checkpoint is required" in capsys.readouterr().err
    assert main(["train", "--volumes", str(volumes_set), "--out", str(tmp_path / "f"), "--tokenizer", "autoencoderkl",
                 "--preset", "test", "--epochs", "1", "--quiet", "--freeze", "proj"]) == 2
    assert "freeze 'proj': no such part of the trainable module (its parts: " in capsys.readouterr().err
    assert main(["encode", "--volumes", str(volumes_set), "--checkpoint", str(tmp_path / "missing.safetensors"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["decode", "--latents", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert not gs.ShardSet.open(volumes_set).manifest.tokenizer  # inputs untouched


def test_cli_sweep(tmp_path, volumes_set, mae_checkpoint, capsys):
    rc = main(["sweep", "--volumes", str(volumes_set), "--mae-checkpoint", str(mae_checkpoint), "--out", str(tmp_path / "s"),
               "--preset", "test", "--c-values", "4", "--no-autoencoderkl", "--epochs", "1", "--steps-per-epoch", "1",
               "--probe-tasks", "idh1", "--probe-protocol", "tiny", "--test-fraction", "0.25", "--device", "cpu", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| MAE c=4 | 256 |" in out and "idh1 AUC" in out
    assert (tmp_path / "s" / "table5.csv").read_text().startswith("tokenizer,values_per_volume,mse,psnr,ssim,idh1_auc\n")


def test_cli_train_is_repeatable_whatever_the_process_rng_holds(tmp_path, mae_checkpoint, volumes_set, capsys):
    """The tokenizer's new layers are initialised from --seed: two runs give the same weights."""
    weights = []
    for i, state in enumerate((1, 2)):
        torch.manual_seed(state)  # what earlier work in the process left in the global RNG
        run = tmp_path / f"run{i}"
        assert main(["train", "--volumes", str(volumes_set), "--out", str(run), "--mae-checkpoint", str(mae_checkpoint),
                     "--preset", "test", "--epochs", "1", "--steps-per-epoch", "1", "--c", "4", "--seed", "7",
                     "--device", "cpu", "--quiet"]) == 0
        capsys.readouterr()
        weights.append(load_file(str(run / "tokenizer.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
