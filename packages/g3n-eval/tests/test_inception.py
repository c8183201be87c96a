import numpy as np
import pytest
import torch
from g3n_eval.inception import InceptionV3Features, WeightsError, central_slices, load_inception, slice_features, to_batch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised FID-variant network saved the way a user would save real weights."""
    torch.manual_seed(0)
    m = InceptionV3Features("fid", num_classes=1008)
    path = tmp_path_factory.mktemp("inc") / "inception.safetensors"
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    state["AuxLogits.fc.weight"] = torch.zeros(2, 2)  # a full torchvision-style file may carry the aux head
    save_file(state, str(path))
    return path


def test_missing_weights_named(tmp_path):
    with pytest.raises(WeightsError, match="nothing is downloaded"):
        load_inception(None)
    p = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match=str(p)):
        load_inception(p)


def test_wrong_weights_refused(tmp_path, weights):
    bad = tmp_path / "bad.safetensors"
    save_file({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, str(bad))
    with pytest.raises(WeightsError, match="missing"):
        load_inception(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        load_inception(junk)


def test_load_and_features(weights):
    torch.set_num_threads(1)
    model, digest = load_inception(weights)
    assert digest.startswith("sha256:") and len(digest) == 71
    ref = InceptionV3Features("fid", num_classes=1008)
    torch.manual_seed(0)
    ref = InceptionV3Features("fid", num_classes=1008).eval()
    x = torch.rand(2, 3, 75, 75)
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert a.shape == (2, 2048)
    assert torch.allclose(a, b)  # loaded weights are the saved ones
    rng = np.random.default_rng(0)
    vols = [rng.random((12, 14, 10)).astype(np.float32) for _ in range(2)]
    feats = slice_features(model, vols, image_size=75, offsets=(0, 1))
    assert set(feats) == {"sagittal", "coronal", "axial"}
    assert all(f.shape == (4, 2048) and np.isfinite(f).all() for f in feats.values())


def test_slices_and_batch():
    v = np.zeros((10, 12, 14), np.float32)
    v[5, :, :] = 7.0  # a sagittal plane at the centre x
    s = central_slices(v)
    assert s["sagittal"][0].shape == (12, 14) and s["sagittal"][0].max() == 1.0
    assert s["coronal"][0].shape == (10, 14) and s["axial"][0].shape == (10, 12)
    t = to_batch(s["axial"], image_size=80)
    assert t.shape == (1, 3, 80, 80) and float(t.min()) >= 0 and float(t.max()) <= 1
    with pytest.raises(ValueError, match="outside"):
        central_slices(v, offsets=(20,))
