import json

import nibabel as nib
import numpy as np
import pytest
import torch

import g3n_shards as gs
from g3n_tokenizer.errors import CheckpointError, LatentError, TokenizerError
from g3n_tokenizer.interface import ZSCORE_MEAN, ZSCORE_STD, zscore_brain
from g3n_tokenizer.registry import load_tokenizer
from g3n_tokenizer.shardio import decode_set


def test_encode_writes_latents_manifest(latents_set, volumes_set, trained):
    lat = gs.ShardSet.open(latents_set, kind="latents")
    vol = gs.ShardSet.open(volumes_set)
    m = lat.manifest
    assert len(lat) == len(vol) == 12
    assert m.tokenizer.name == "mae-cnn"
    assert m.tokenizer.checkpoint_digest == trained["result"].digest
    assert m.tokenizer.config["tokenizer"]["c"] == 8
    assert m.parents[0].digest == vol.manifest.digest and m.parents[0].kind == "volumes"
    assert m.geometry.token_grid == (4, 4, 4) and m.geometry.channels == 8
    assert m.geometry.affine == vol.manifest.geometry.affine and m.geometry.space == "SRI24"
    assert m.extra["intensity"] == "zscored-brain"
    s = next(iter(lat))
    assert s.arrays["latent"].shape == (64, 8) and s.arrays["latent"].dtype == np.float32
    _, mean, std = zscore_brain(vol.get(s.key).arrays["volume"])
    assert s.meta.extra[ZSCORE_MEAN] == pytest.approx(mean) and s.meta.extra[ZSCORE_STD] == pytest.approx(std)
    assert s.meta.subject == vol.get(s.key).meta.subject
    # the latents equal the tokenizer's encode of the z-scored volume
    tok = load_tokenizer(m)
    z, _, _ = zscore_brain(vol.get(s.key).arrays["volume"])
    assert np.allclose(tok.encode(torch.from_numpy(z)[None, None])[0].numpy(), s.arrays["latent"], atol=1e-5)


def test_decode_to_volumes_set(latents_set, workdir):
    out = workdir / "decoded-volumes"
    summary = decode_set(latents_set, out, progress=False)
    assert summary == {"written": 12, "rejected": 0, "out": str(out), "format": "volumes"}
    dec = gs.ShardSet.open(out, kind="volumes")
    assert dec.manifest.geometry.shape == (32, 32, 32) and dec.manifest.extra["intensity"] == "zscored-brain"
    assert dec.manifest.parents[0].digest == gs.ShardSet.open(latents_set).manifest.digest
    assert dec.manifest.tokenizer.name == "mae-cnn"
    assert next(iter(dec)).arrays["volume"].shape == (32, 32, 32)


def test_decode_to_nifti_with_atlas_affine(latents_set, workdir, cohort_affine):
    out = workdir / "decoded-nifti"
    summary = decode_set(latents_set, out, fmt="nifti", progress=False)
    assert summary["written"] == 12
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == 12 and not list(out.glob(".*tmp*"))
    img = nib.load(str(files[0]))
    assert img.shape == (32, 32, 32)
    assert np.allclose(img.affine, cohort_affine)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    data = np.asarray(img.dataobj)
    assert np.isfinite(data).all() and data.std() > 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert {r["file"] for r in index} == {f.name for f in files}


def test_decode_refuses_wrong_checkpoint(latents_set, tmp_path, mae_checkpoint):
    from g3n_tokenizer.config import preset
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer

    other = MaeCnnTokenizer.from_mae(mae_checkpoint, preset("test").mae_cnn)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="differs from the recorded"):
        decode_set(latents_set, tmp_path / "out", checkpoint=tmp_path / "other.safetensors", progress=False)


def _write_latents(out, ref, geometry, latents):
    with gs.ShardWriter(out, kind="latents", producer=gs.Producer(package="test"), tokenizer=ref, geometry=geometry) as w:
        for i, lat in enumerate(latents):
            m = gs.SampleMeta(subject=f"s{i}", modality="T1", synthetic=True)
            w.write(f"s{i}", m, {"latent": lat})


def test_corrupt_latents_refused_clearly(latents_set, tmp_path):
    ref = gs.ShardSet.open(latents_set).manifest.tokenizer
    # a whole set of the wrong channel count: refused before anything is decoded
    _write_latents(tmp_path / "wrong", ref, gs.Geometry(token_grid=(4, 4, 4), channels=5), [np.zeros((64, 5), np.float32)])
    with pytest.raises(LatentError, match="5 channels"):
        decode_set(tmp_path / "wrong", tmp_path / "o1", progress=False)
    # one bad sample among good ones: it goes to rejects.jsonl, the rest is decoded
    lats = [np.zeros((64, 8), np.float32), np.zeros((64, 7), np.float32), np.ones((64, 8), np.float32)]
    _write_latents(tmp_path / "mixed", ref, gs.Geometry(), lats)
    summary = decode_set(tmp_path / "mixed", tmp_path / "o2", progress=False)
    assert summary["written"] == 2 and summary["rejected"] == 1
    rej = gs.RejectLog(tmp_path / "o2").records()
    assert rej[0]["subject"] == "s1" and "latent shape (B, 64, 8)" in rej[0]["reason"]
    # a tampered shard is refused by the reader, naming the shard
    shard = next((tmp_path / "mixed").glob("latents-*.tar"))
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(gs.ShardError, match=shard.name):
        decode_set(tmp_path / "mixed", tmp_path / "o3", progress=False)


def test_decode_to_original_intensity_with_mask(latents_set, volumes_set, tmp_path):
    vol = gs.ShardSet.open(volumes_set)
    first = next(iter(vol))
    brain = first.arrays["volume"] > 0
    with pytest.raises(TokenizerError, match="needs a brain mask"):
        decode_set(latents_set, tmp_path / "nomask", intensity="original", progress=False)
    with pytest.raises(TokenizerError, match="mask shape"):
        decode_set(latents_set, tmp_path / "badmask", intensity="original", mask=brain[:16], progress=False)
    out = tmp_path / "orig"
    decode_set(latents_set, out, intensity="original", mask=brain, keys=[first.key], progress=False)
    dec = gs.ShardSet.open(out)
    s = dec.get(first.key)
    assert dec.manifest.extra["intensity"] == "original" and s.meta.extra["intensity"] == "original"
    v = s.arrays["volume"]
    assert (v[~brain] == 0).all() and (v[brain] > 0).all()
    src = first.arrays["volume"][brain]
    # back on the source's scale (mean within 10 %), and z-scoring it again gives the decoded z-scored volume
    assert abs(v[brain].mean() - src.mean()) < 0.1 * src.mean()
    zs = gs.ShardSet.open(latents_set)
    tok = load_tokenizer(zs.manifest)
    z_dec = tok.decode(torch.from_numpy(np.array(zs.get(first.key).arrays["latent"]))[None])[0, 0].numpy()
    rz, _, _ = zscore_brain(v)
    assert np.corrcoef(rz[brain], z_dec[brain])[0, 1] > 0.99
