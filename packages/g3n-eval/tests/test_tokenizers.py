"""g3n-eval tokenizers: Table 5 in kind, for an MAE-CNN and an AutoencoderKL tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from g3n_eval.cli import main


@pytest.fixture(scope="module")
def cohort(work):
    """24 subjects (the probe protocol needs 20), sex visible as brightness."""
    import g3n_shards as gs
    from g3n_shards.testing import brain_like, make_meta

    rng = np.random.default_rng(1)
    out = work / "cohort24"
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-eval-tests"),
                        geometry=gs.Geometry(shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8)),
                        extra={"intensity": "scanner"}) as w:
        for i in range(24):
            m = make_meta(i)
            w.write(gs.sample_key(m), m, {"volume": brain_like(rng, (32, 32, 32)) * (1.3 if m.sex == "F" else 1.0)})
    return out


@pytest.fixture(scope="module")
def akl_ckpt(work):
    """An untrained AutoencoderKL (test preset) saved by g3n-tokenizer's own writer."""
    from g3n_tokenizer.build import new_tokenizer
    from g3n_tokenizer.config import preset

    tok, _ = new_tokenizer("autoencoderkl", preset("test"), {}, img_size=(32, 32, 32))
    path = work / "akl" / "tokenizer.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return path


def test_tokenizers_side_by_side(work, cohort, volumes_set, tokenizer_ckpt, akl_ckpt, capsys):
    out = work / "runs" / "tokenizers"
    assert main(["tokenizers", "--arm", "MAE-CNN c=8", "mae-cnn", str(tokenizer_ckpt), "--arm", "AutoencoderKL",
                 "autoencoderkl", str(akl_ckpt), "--volumes", str(cohort), "--heldout", str(volumes_set),
                 "--limit", "6", "--tasks", "sex,idh1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "MAE-CNN c=8: 512 values/volume" in printed and "AutoencoderKL: 2,048 values/volume" in printed
    doc = json.loads((out / "tokenizers.json").read_text())
    assert doc["measurement"] == "tokenizers"
    mae, akl = doc["results"]["rows"]
    # each row is the tokenizer's own held-out reconstruction (its recon.json) and probe on its latents
    for row, folder, dim in ((mae, "mae-cnn-c-8", 8), (akl, "autoencoderkl", 4)):
        rec = json.loads((out / folder / "recon.json").read_text())
        assert row["recon"] == f"{folder}/recon.json" and row["n_heldout"] == rec["results"]["n"] == 6
        assert row["ssim"] == rec["results"]["summary"]["ssim"]["mean"] and row["feature_dim"] == dim
        assert 0.0 <= row["auc"]["sex"] <= 1.0
        assert row["auc"]["idh1"] is None and "idh1" in row["probe_notes"]  # unlabelled: said, not scored
    assert doc["settings"]["probe"]["volumes"] == 24
    # the features are the mean over tokens of the tokenizer's own latents
    from g3n_eval.models import TokenizerHandle, zscore_brain
    from g3n_eval.tokenizers import latent_features

    h = TokenizerHandle("autoencoderkl", akl_ckpt)
    X, keys, _ = latent_features(cohort, h, progress=False)
    import g3n_shards as gs

    v = zscore_brain(gs.ShardSet.open(cohort).get(keys[0]).arrays["volume"])
    with torch.no_grad():
        z = h.tok.encode(torch.as_tensor(v[None, None]))
    np.testing.assert_allclose(X[0], z.mean(1)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_tokenizers_report_section(work):
    from g3n_eval.report import build_report

    out = work / "runs" / "tokenizers"
    if not (out / "tokenizers.json").is_file():
        pytest.skip("needs test_tokenizers_side_by_side")
    page = build_report([out], work / "runs" / "tok-report").read_text()
    assert "<h2>Tokenizers</h2>" in page and "AutoencoderKL" in page and "2,048" in page
