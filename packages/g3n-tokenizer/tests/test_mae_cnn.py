import pytest
import torch

from g3n_tokenizer.checkpoint import read_tokenizer, save_tokenizer
from g3n_tokenizer.config import preset
from g3n_tokenizer.errors import CheckpointError, LatentError
from g3n_tokenizer.interface import Tokenizer
from g3n_tokenizer.mae_cnn import MaeCnnTokenizer


@pytest.mark.parametrize("c", [1, 8, 32, None])
def test_shapes_for_every_c(mae_checkpoint, c):
    cfg = preset("test").mae_cnn.model_copy(update={"c": c})
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg)
    assert isinstance(tok, Tokenizer)
    hidden = tok.mae_cfg.embed_dim
    want_c = c if c is not None else hidden
    assert tok.latent_shape == (64, want_c)
    assert tok.geometry.token_grid == (4, 4, 4) and tok.geometry.channels == want_c
    x = torch.randn(2, 1, 32, 32, 32)
    z = tok.encode(x)
    assert tuple(z.shape) == (2, 64, want_c) and z.dtype == torch.float32
    y = tok.decode(z)
    assert tuple(y.shape) == (2, 1, 32, 32, 32)
    if c is None:  # no projection: the latent is the encoder's token grid itself
        assert torch.allclose(z, tok.encoder(x), atol=1e-5)


def test_encoder_loaded_strictly_and_frozen(mae_checkpoint):
    from g3n_mae.checkpoint import load_model

    mae, _, _ = load_model(mae_checkpoint)
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, preset("test").mae_cnn)
    for k, v in tok.encoder.encoder_state().items():
        assert torch.equal(v, mae.state_dict()[k])
    assert not any(p.requires_grad for p in tok.encoder.parameters())
    assert all(p.requires_grad for p in tok.train_module.parameters())
    tok.train()
    assert not tok.encoder.training  # always eval


def test_frozen_encoder_unchanged_by_training(trained):
    tok = trained["tokenizer"]
    before = trained["encoder_before"]
    after = tok.encoder.encoder_state()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    best = MaeCnnTokenizer.from_checkpoint(trained["result"].checkpoint)
    assert all(torch.equal(before[k], v) for k, v in best.encoder.encoder_state().items())


def test_checkpoint_roundtrip_and_refusals(tmp_path, mae_checkpoint):
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, preset("test").mae_cnn)
    digest = tok.save(tmp_path / "t.safetensors")
    ref = tok.model_ref()
    assert ref.name == "mae-cnn" and ref.checkpoint_digest == digest and ref.config["tokenizer"]["c"] == 8
    back = MaeCnnTokenizer.from_checkpoint(tmp_path / "t.safetensors")
    x = torch.randn(1, 1, 32, 32, 32)
    assert torch.allclose(back.decode(back.encode(x)), tok.decode(tok.encode(x)), atol=1e-5)
    # a missing weight is an error, never a silent partial load
    tensors, header = read_tokenizer(tmp_path / "t.safetensors")
    tensors.pop("head.proj.weight")
    save_tokenizer(tmp_path / "bad.safetensors", tensors, "mae-cnn", header["config"])
    with pytest.raises(CheckpointError, match="missing"):
        MaeCnnTokenizer.from_checkpoint(tmp_path / "bad.safetensors")
    # a truncated file names itself
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        MaeCnnTokenizer.from_checkpoint(tmp_path / "trunc.safetensors")


def test_corrupt_latents_refused(mae_checkpoint):
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, preset("test").mae_cnn)
    good = torch.zeros(1, 64, 8)
    bad = good.clone()
    bad[0, 3, 2] = float("nan")
    with pytest.raises(LatentError, match="NaN/Inf"):
        tok.decode(bad)
    with pytest.raises(LatentError, match=r"latent shape \(B, 64, 8\)"):
        tok.decode(torch.zeros(1, 64, 9))
    with pytest.raises(LatentError, match="shape"):
        tok.decode(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="expected"):
        tok.encode(torch.zeros(1, 1, 16, 32, 32))
