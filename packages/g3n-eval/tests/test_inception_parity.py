"""Our hand-written Inception-V3 against independent implementations, given the same weights.

* torchvision's ``inception_v3`` (random weights, nothing downloaded): its state dict saved with
  safetensors loads strictly into ``--inception-variant torchvision`` and both give the same pool3
  features on the same images;
* pytorch-fid's FID network: pytorch-fid builds it as torchvision's ``Inception3(num_classes=1008,
  aux_logits=False)`` with Mixed_5b-5d, 6b-6e and 7b-7c replaced by its FIDInceptionA/C/E_1/E_2
  blocks, whose only change to torchvision's blocks is the pool branch: average pools that exclude
  the padding (``count_include_pad=False``) in A, C and E_1, a 3x3 stride-1 max pool in E_2; it
  feeds ``2x - 1`` and takes the final adaptive average pool. The same changes are applied here to
  torchvision's blocks (their pool call, nothing else), so the weights file layout pytorch-fid's
  ``pt_inception-2015-12-05`` has (that model's state dict) is checked, and the outputs too.

Compared in float64, so any difference in the computation shows, not rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import inception as tvi

from g3n_eval.inception import InceptionV3Features, WeightsError, load_inception

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with activations of order 1 through all 94 layers, and batch-norm running
    statistics far from (0, 1), so that eval-mode batch norm is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
        elif isinstance(m, torch.nn.Linear):
            m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
            m.bias.zero_()
    return model.eval()


def _save(model: torch.nn.Module, path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pool3 of a torchvision Inception3: its forward up to the flattened average pool."""
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(7)
    smooth = F.interpolate(torch.rand(2, 3, 40, 40, generator=g, dtype=torch.float64), size=(299, 299),
                           mode="bilinear", align_corners=False)
    return smooth.clamp(0, 1)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape == (2, 2048)
    assert float(ref.std()) > 1e-2 and float((ref > 0).double().mean()) > 0.2  # features carry signal
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10)


def test_torchvision_inception_v3_state_dict_loads_and_gives_the_same_features(tmp_path, images):
    tv = _randomise(tvi.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True), 0)
    path = tmp_path / "torchvision.safetensors"
    _save(tv, path)  # the whole file: AuxLogits, a 1000-way fc and num_batches_tracked included
    ours, digest = load_inception(path, "torchvision")
    assert ours.fc.out_features == 1000 and digest.startswith("sha256:")
    tv = tv.double()
    ref = _features(tv, (images - MEAN) / STD)  # torchvision's weights take ImageNet-normalised input
    with torch.no_grad():
        got = ours.double()(images)  # ours takes [0, 1] images and normalises them itself
    _assert_same(got, ref)


class _FIDPooling:
    """torch.nn.functional as pytorch-fid's FID blocks see it: their pool branch differs."""

    def __init__(self, max_pool: bool) -> None:
        self.max_pool = max_pool

    def __getattr__(self, name: str):
        return getattr(F, name)

    def avg_pool2d(self, x, kernel_size, stride=None, padding=0, **kw):
        assert (kernel_size, stride, padding) == (3, 1, 1) and not kw  # the pool branch, nothing else
        if self.max_pool:  # FIDInceptionE_2 (Mixed_7c)
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_inception(seed: int) -> torch.nn.Module:
    """pytorch-fid's network: torchvision's Inception3 with the FID blocks' pool branches."""
    model = _randomise(tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False), seed)
    blocks = {name: False for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                                       "Mixed_6e", "Mixed_7b")}
    blocks["Mixed_7c"] = True
    for name, max_pool in blocks.items():
        block = getattr(model, name)

        def forward(x, _block=block, _pool=_FIDPooling(max_pool), _original=block.forward):
            tvi.F = _pool  # the module-level name torchvision's blocks call
            try:
                return _original(x)
            finally:
                tvi.F = F

        block.forward = forward
    return model


def test_pytorch_fid_layout_loads_and_gives_the_same_features(tmp_path, images):
    fid = _fid_inception(1)
    path = tmp_path / "pt_inception-layout.safetensors"
    _save(fid, path)
    keys = set(fid.state_dict())
    assert "fc.weight" in keys and not any(k.startswith("AuxLogits.") for k in keys)
    assert fid.state_dict()["fc.weight"].shape == (1008, 2048)
    ours, _ = load_inception(path, "fid")
    ref = _features(fid.double(), 2 * images - 1)  # pytorch-fid's normalize_input
    with torch.no_grad():
        got = ours.double()(images)
    _assert_same(got, ref)
    # the FID pools matter: the same weights in the torchvision variant give other features
    tv_variant, _ = load_inception(path, "torchvision")
    with torch.no_grad():
        other = tv_variant.double()(images)
    assert float((other - ref).abs().max()) > 1e-3


def test_torchvision_weights_do_not_load_as_another_layout(tmp_path):
    tv = tvi.inception_v3(weights=None, aux_logits=False, init_weights=False)
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("Mixed_7c.branch_pool")}
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match="missing .*Mixed_7c.branch_pool"):
        load_inception(path, "fid")
    assert isinstance(InceptionV3Features("fid").Mixed_7c, torch.nn.Module)
