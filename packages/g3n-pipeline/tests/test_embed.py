"""g3n-embed: loose NIfTI in, the training preprocessing, a tiny encoder, an embeddings table out.

The end-to-end test uses one real 2 mm IXI T1 volume of the built-in cohort (cohort/ixi10), a
`tiny` g3n-mae encoder (80x96x80, 8^3 patches = 1200 tokens, the demo preprocessing grid)
trained for two steps, atlas skull stripping and a coarser registration schedule, so the whole
chain (ingest, preprocess, encode, table, probe) runs in well under two minutes on CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import g3n_shards as gs
from g3n_pipeline import embed

IXI = Path(embed.__file__).resolve().parent / "cohort" / "ixi10"  # the built-in real cohort (see its PROVENANCE.md)
FAST_PREPROCESS = """\
registration:
  shrink_factors: [6, 4, 2]
  smoothing_sigmas: [3.0, 2.0, 1.0]
  iterations: 100
"""


def _save_untrained(tmp: Path, preset: str) -> Path:
    """Weights of an untrained g3n-mae model: enough for the geometry checks (nothing is encoded)."""
    from g3n_mae.checkpoint import save_weights
    from g3n_mae.config import preset as mae_preset
    from g3n_mae.model import MAE3D

    cfg = mae_preset(preset).model
    path = tmp / f"{preset}.safetensors"
    save_weights(path, MAE3D(cfg).state_dict(), cfg)
    return path


# ---- units ----------------------------------------------------------------------------------
def test_subject_from_filename():
    assert embed.subject_from_filename("/x/sub-07_ses-2_T1w.nii.gz") == ("sub-07", "ses-2", "T1")
    assert embed.subject_from_filename("sub-07_FLAIR.nii") == ("sub-07", None, "FLAIR")
    assert embed.subject_from_filename("IXI012-HH-1211-T1_ds.nii.gz") == ("IXI012-HH-1211-T1_ds", None, None)
    assert embed.subject_from_filename("patient 3 (t1).nii.gz")[0] == "patient-3-t1"
    meta = gs.SampleMeta(subject=embed.subject_from_filename("patient 3 (t1).nii.gz")[0], modality="T1")
    assert meta.subject == "patient-3-t1"


def test_nifti_manifest(tmp_path):
    files = [tmp_path / "a_T2w.nii.gz", tmp_path / "b.nii"]
    for f in files:
        f.write_bytes(b"x")
    p = embed.write_nifti_manifest([str(f) for f in files], tmp_path / "m.csv", "T1")
    rows = list(csv.DictReader(p.open()))
    assert [(r["subject"], r["modality"]) for r in rows] == [("a_T2w", "T2"), ("b", "T1")]
    assert all(Path(r["path"]).is_absolute() for r in rows)


def test_refuses_a_grid_the_encoder_was_not_trained_on(tmp_path, capsys):
    tiny = _save_untrained(tmp_path, "tiny")  # 80x96x80: the demo grid, not the paper grid
    info = embed.encoder_info(tiny)
    assert info.img_size == (80, 96, 80) and info.patch_size == (8, 8, 8) and info.embed_dim == 96
    # default: the g3n-data preset whose grid equals the encoder's
    cfg = embed.preprocess_config(info, None, None, None, "atlas", False, False)
    assert cfg["preset"] == "demo" and tuple(cfg["geometry"]["shape"]) == (80, 96, 80)
    assert cfg["skullstrip"]["method"] == "atlas"
    with pytest.raises(embed.EmbedError, match=r"\(160, 192, 160\).*expects.*\(80, 96, 80\)"):
        embed.preprocess_config(info, "paper", None, None, None, False, False)
    # a grid no preset makes: refused with both grids named, before any stage runs
    test32 = _save_untrained(tmp_path, "test")
    nii = tmp_path / "x.nii.gz"
    nii.write_bytes(b"not read")
    rc = embed.main(["--encoder", str(test32), str(nii), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "(32, 32, 32)" in err and "no g3n-data preset" in err
    assert not (tmp_path / "out" / "work" / "ingest").exists()  # refused before any stage ran


def test_refuses_bad_inputs(tmp_path, capsys):
    tiny = _save_untrained(tmp_path, "tiny")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert embed.main(["--encoder", str(tiny), str(txt), "--out", str(tmp_path / "o")]) == 2
    assert "not NIfTI" in capsys.readouterr().err
    assert embed.main(["--encoder", str(tmp_path / "missing"), str(txt), "--out", str(tmp_path / "o")]) == 2
    assert "--encoder" in capsys.readouterr().err


def test_preprocess_overrides_file(tmp_path):
    info = embed.encoder_info(_save_untrained(tmp_path, "tiny"))
    over = tmp_path / "fast.yaml"
    over.write_text(FAST_PREPROCESS)
    cfg = embed.preprocess_config(info, "demo", None, str(over), None, True, False)
    assert cfg["registration"]["iterations"] == 100 and cfg["n4"]["enabled"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("registration: {no_such_field: 1}\n")
    with pytest.raises(embed.EmbedError, match="invalid preprocessing config"):
        embed.preprocess_config(info, "demo", None, str(bad), None, False, False)


def test_the_steps_are_runner_stages_that_own_only_their_folders(tmp_path):
    """ingest, preprocess and encode run on g3n-pipeline's runner: a start-over removes the step's own
    folder, never the markers, the logs or the preprocessing cache; the inputs' stamp is a setting."""
    from g3n_pipeline import runner

    nii = tmp_path / "sub-01_T1w.nii.gz"
    nii.write_bytes(b"x")
    out = (tmp_path / "out").resolve()
    args = embed.build_parser().parse_args([str(nii), "--out", str(out), "--batch-size", "3"])
    ingest_args, stamp = embed.ingest_source(args, out / "work")
    assert ingest_args[:2] == ["csv", str(out / "work" / "inputs.csv")] and stamp[-1] == "T1"
    weights = tmp_path / "w.safetensors"
    stages = embed.embed_stages(args, out, ingest_args, weights)
    assert [st.name for st in stages] == ["ingest", "preprocess", "encode"]
    keep = [out / "work" / ".stages", out / "work" / "logs"]
    owned = [runner.owned_paths(out, st, keep) for st in stages]
    assert owned == [[out / "work" / "ingest"], [out / "work" / "volumes"], [out / "tokens"]]
    (argv,) = stages[1].commands(out)
    assert argv[argv.index("--cache") + 1] == str(out / "work" / "preprocess-cache")  # outside what is removed
    assert stages[0].inputs == ["work/ingest-source.json"] and list(stages[2].external) == [weights]
    (argv,) = stages[2].commands(out)
    assert argv[argv.index("--batch-size") + 1] == "3"


# ---- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A `tiny` g3n-mae (80x96x80, 8^3 patches) trained for two steps on one synthetic volume."""
    import torch
    from g3n_mae.config import preset
    from g3n_mae.data import InMemoryVolumes, brain_like_volumes
    from g3n_mae.train import train

    torch.set_num_threads(1)
    cfg = preset("tiny", train={"total_steps": 2, "warmup_steps": 1, "batch_size": 1, "engine": "torch",
                                "tensorboard": False, "ckpt_every": 2, "log_every": 1})
    run = tmp_path_factory.mktemp("mae") / "run"
    train(cfg, InMemoryVolumes(brain_like_volumes(1, (80, 96, 80), seed=0)), run, log=lambda s: None)
    return run


def test_embed_nifti_end_to_end(tmp_path, tiny_encoder, capsys):
    good = IXI / "IXI012-HH-1211-T1_ds.nii.gz"
    broken = tmp_path / "broken_T1w.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    fast = tmp_path / "fast.yaml"
    fast.write_text(FAST_PREPROCESS)
    out = tmp_path / "emb"
    argv = ["--encoder", str(tiny_encoder), str(good), str(broken), "--out", str(out), "--skullstrip", "atlas",
            "--preprocess-config", str(fast), "--device", "cpu", "--cohort", "IXI", "--quiet"]
    assert embed.main(argv) == 0
    text = capsys.readouterr().out
    assert "1 volumes embedded (96-vectors)" in text

    # the tokens set: made by this encoder from volumes of the encoder's grid
    tokens = gs.ShardSet.open(out / "tokens", kind="tokens")
    assert len(tokens) == 1
    assert tokens.manifest.geometry.shape == (80, 96, 80) and tokens.manifest.geometry.token_grid == (10, 12, 10)
    assert tokens.manifest.encoder is not None and tokens.manifest.encoder.checkpoint_digest
    sample = next(iter(tokens))
    assert set(sample.arrays) == {"mean"}
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["encoder_sha256"] == tokens.manifest.encoder.checkpoint_digest
    assert (out / "work" / "preprocess.yaml").is_file()

    # embeddings.csv: one row per volume, metadata then e0..e95, equal to the stored mean
    rows = list(csv.DictReader((out / "embeddings.csv").open()))
    assert len(rows) == 1
    r = rows[0]
    assert (r["key"], r["subject"], r["modality"], r["cohort"], r["session"]) == (
        sample.key, "IXI012-HH-1211-T1_ds", "T1", "IXI", "")
    header = list(rows[0])
    assert header[: len(embed.TABLE_COLUMNS)] == list(embed.TABLE_COLUMNS)
    assert header[len(embed.TABLE_COLUMNS):] == [f"e{i}" for i in range(96)]
    vec = np.array([float(r[f"e{i}"]) for i in range(96)], dtype=np.float32)
    np.testing.assert_array_equal(vec, sample.arrays["mean"])
    assert np.abs(vec).sum() > 0

    # the feature table is g3n-probe's layout: load_features and `g3n-probe run` read it
    from g3n_probe import load_features
    from g3n_probe.cli import main as probe_main

    fs = load_features(out)
    assert fs.keys == [sample.key] and fs.X.shape == (1, 96) and fs.X.dtype == np.float32
    np.testing.assert_array_equal(fs.X[0], sample.arrays["mean"])
    assert fs.records[0]["subject"] == "IXI012-HH-1211-T1_ds"
    # features.json says what made the table, so `g3n-probe apply` checks it like a tokens set
    assert fs.source["type"] == "table" and fs.source["kind"] == "tokens"
    assert fs.source["encoder"]["checkpoint_digest"] == tokens.manifest.encoder.checkpoint_digest
    assert probe_main(["run", str(out), "--out", str(tmp_path / "probe"), "--preset", "tiny", "-q"]) == 0
    assert (tmp_path / "probe" / "results.md").is_file()

    # the broken file is a reject with its stage and reason, not a crash
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["path"].endswith("broken_T1w.nii.gz")
    assert rejects[0]["step"] and rejects[0]["reason"]

    # re-running the same command skips every finished step and gives the same table
    before = (out / "embeddings.csv").read_bytes()
    assert embed.main(argv) == 0
    assert "skipped): ingest, preprocess, encode" in capsys.readouterr().out
    assert (out / "embeddings.csv").read_bytes() == before

    # the exact preprocessing of a training set: --train-volumes reads it from that set's manifest
    info = embed.encoder_info(tiny_encoder)
    notes: list[str] = []
    cfg = embed.preprocess_config(info, None, str(out / "work" / "volumes"), None, None, False, False, log=notes.append)
    assert cfg["registration"]["iterations"] == 100 and cfg["skullstrip"]["method"] == "atlas"
    assert notes and "records no training shard sets" in notes[0]  # it was trained on in-memory volumes

    # a BIDS folder of an already preprocessed scan (atlas space, skull-stripped, bias-corrected):
    # participants.tsv metadata reaches the table, and the embedding is the same as from the raw scan
    import nibabel as nib

    vols = gs.ShardSet.open(out / "work" / "volumes", kind="volumes")
    anat = tmp_path / "bids" / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    vol = next(iter(vols)).arrays["volume"]
    nib.save(nib.Nifti1Image(vol, np.asarray(vols.manifest.geometry.affine)), str(anat / "sub-01_ses-1_T1w.nii.gz"))
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t38.8\tM\n")
    out2 = tmp_path / "emb-bids"
    assert embed.main(["--encoder", str(tiny_encoder), str(tmp_path / "bids"), "--out", str(out2), "--no-n4",
                       "--no-register", "--skullstrip", "none", "--device", "cpu", "--quiet"]) == 0
    (row,) = list(csv.DictReader((out2 / "embeddings.csv").open()))
    assert (row["subject"], row["session"], row["modality"], row["age"], row["sex"]) == ("sub-01", "ses-1", "T1", "38.8", "M")
    vec2 = np.array([float(row[f"e{i}"]) for i in range(96)])
    cos = vec2 @ vec / (np.linalg.norm(vec2) * np.linalg.norm(vec))
    assert cos > 0.99, cos


def test_without_encoder_the_shipped_one_is_used_and_announced(tmp_path, monkeypatch, capsys):
    """No --encoder: the zoo's MAE (here a made-up zoo holding an untrained tiny MAE), named with its
    intended use; no zoo at all: a clear error."""
    import json

    import g3n_zoo
    from g3n_zoo.zoo import FORMAT, VERSION, Manifest, ModelEntry, file_entries

    folder = tmp_path / "zoo" / "mae"
    folder.mkdir(parents=True)
    _save_untrained(tmp_path, "tiny").rename(folder / "model.safetensors")
    (folder / "card.json").write_text(json.dumps({"title": "an untrained tiny MAE", "intended_use": g3n_zoo.INTENDED_USE}))
    man = Manifest(format=FORMAT, version=VERSION, models={"mae": ModelEntry(
        stage="g3n-mae", kind="mae", load="model.safetensors", files=file_entries(folder))})
    (tmp_path / "zoo" / "manifest.json").write_text(man.model_dump_json())
    monkeypatch.setenv("G3N_ZOO_DIR", str(tmp_path / "zoo"))
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    assert embed.main([str(txt), "--out", str(tmp_path / "o")]) == 2  # the input is refused after the encoder is chosen
    err = capsys.readouterr().err
    assert f"using the shipped encoder {folder / 'model.safetensors'} (an untrained tiny MAE)" in err
    assert g3n_zoo.INTENDED_USE in err
    monkeypatch.setenv("G3N_ZOO_DIR", str(tmp_path / "nothing"))
    assert embed.main([str(txt), "--out", str(tmp_path / "o2")]) == 2
    assert "no --encoder given and no shipped encoder" in capsys.readouterr().err
