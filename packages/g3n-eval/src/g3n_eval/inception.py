"""Inception-V3 pool3 (2048-d) features for FID on 2D slices, with weights only from a file.

The architecture is written out here (parameter names follow torchvision's ``Inception3``, so a
torchvision or pytorch-fid state dict saved with ``safetensors.torch.save_file`` loads as is).
Nothing is downloaded: :func:`load_inception` takes a user-given ``.safetensors`` file, loads it
strictly and raises :class:`WeightsError` naming the path when it is absent or does not match.
The file's SHA-256 is recorded in every FID result so two FIDs are comparable only when made
with the same weights.

Two variants, because the two usual weight files differ in a few layers:

* ``"fid"``: the TensorFlow FID network (pytorch-fid's ``pt_inception-2015-12-05``; 1008-way fc):
  input scaled to [-1, 1]; average pools exclude padding; the last block's pool branch is a max
  pool. This is the one whose numbers compare with published FIDs.
* ``"torchvision"``: torchvision's ImageNet weights (1000-way fc), input normalised like
  torchvision's ``transform_input``.

Slices (:func:`central_slices`): the central sagittal, coronal and axial planes of an (x, y, z)
volume (optionally more at fixed offsets), each volume scaled to [0, 1] between the 0.5th and
99.5th percentile of its non-zero voxels (one scale per volume, so the three views agree),
resized to ``image_size`` (299) bilinearly and replicated to 3 channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import InputError

VIEWS = ("sagittal", "coronal", "axial")  # planes normal to x, y, z of an (x, y, z) volume
FEATURE_DIM = 2048


class WeightsError(FileNotFoundError):
    """The Inception weights file is missing or does not fit the network."""


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg(x: torch.Tensor, fid: bool) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg(x, self.fid))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, fid: bool) -> None:
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, fid_pool: str | None) -> None:
        super().__init__()
        self.fid_pool = fid_pool  # None (torchvision), "avg" (FID block 7b) or "max" (FID block 7c)
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.fid_pool == "max":
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            p = _avg(x, self.fid_pool == "avg")
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class InceptionV3Features(nn.Module):
    """Inception-V3 up to the global average pool (pool3): images (N, 3, H, W) in [0, 1] -> (N, 2048)."""

    def __init__(self, variant: str = "fid", num_classes: int | None = None) -> None:
        super().__init__()
        if variant not in ("fid", "torchvision"):
            raise ValueError(f"unknown Inception variant {variant!r} (use 'fid' or 'torchvision')")
        fid = variant == "fid"
        self.variant = variant
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg" if fid else None)
        self.Mixed_7c = InceptionE(2048, "max" if fid else None)
        # The classifier is not used for pool3 features; it exists so a whole weights file loads strictly.
        self.fc = nn.Linear(FEATURE_DIM, num_classes) if num_classes else None

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> what the weights were trained on."""
        if self.variant == "fid":
            return 2.0 * x - 1.0
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        # torchvision's transform_input maps ImageNet-normalised input to the [-1, 1]-style range
        # its ported weights expect; from [0, 1] that is the composition below.
        z = (x - mean) / std
        return z * (std / 0.5) + (mean - 0.5) / 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalise_input(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


#: Keys a full weights file may carry that pool3 features never use and the network omits.
IGNORED_PREFIXES = ("AuxLogits.",)
IGNORED_SUFFIXES = (".num_batches_tracked",)


def load_inception(path: str | Path | None, variant: str = "fid", device: str | torch.device = "cpu") -> tuple[InceptionV3Features, str]:
    """Build the network and load the user's safetensors weights strictly; returns (model, sha256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .records import file_sha256

    if path is None:
        raise WeightsError(
            "FID needs Inception-V3 weights and nothing is downloaded: pass --inception-weights FILE.safetensors "
            "(e.g. pytorch-fid's pt_inception-2015-12-05 state dict saved with safetensors.torch.save_file)"
        )
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: Inception-V3 weights file not found (FID needs it; nothing is downloaded)")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{p}: not a readable safetensors file ({e})") from None
    tensors = {k: v for k, v in tensors.items()
               if not k.startswith(IGNORED_PREFIXES) and not k.endswith(IGNORED_SUFFIXES)}
    fc = tensors.get("fc.weight")
    model = InceptionV3Features(variant, num_classes=int(fc.shape[0]) if fc is not None else None)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise WeightsError(f"{p}: weights do not match Inception-V3 ({variant}): missing {missing[:6]}"
                           f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise WeightsError(f"{p}: tensor {k} has shape {tuple(v.shape)}, Inception-V3 expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False)  # strictness checked above, minus num_batches_tracked
    model.eval().to(device)
    return model, "sha256:" + file_sha256(p)


def robust_unit_scale(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale a volume to [0, 1] between percentiles of its non-zero voxels (clipped)."""
    v = np.asarray(volume, dtype=np.float32)
    nz = v[v != 0]
    ref = nz if nz.size else v.ravel()
    lo, hi = np.percentile(ref, [low, high])
    if hi <= lo:  # constant brain: fall back to the full range of the volume
        lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def central_slices(volume: np.ndarray, views: Sequence[str] = VIEWS, offsets: Sequence[int] = (0,)) -> dict[str, list[np.ndarray]]:
    """The central plane of each view (plus planes at ``offsets`` voxels from it), scaled to [0, 1]."""
    v = robust_unit_scale(volume)
    if v.ndim != 3:
        raise InputError(f"expected a 3D volume, got shape {v.shape}")
    out: dict[str, list[np.ndarray]] = {}
    for view in views:
        axis = VIEWS.index(view)
        n = v.shape[axis]
        planes = []
        for off in offsets:
            i = n // 2 + int(off)
            if not 0 <= i < n:
                raise InputError(f"slice offset {off} is outside the {view} axis of length {n}")
            planes.append(np.take(v, i, axis=axis))
        out[view] = planes
    return out


def to_batch(slices: Sequence[np.ndarray], image_size: int = 299) -> torch.Tensor:
    """2D [0, 1] slices -> (N, 3, S, S) float32, bilinear resize, grey replicated to 3 channels."""
    t = torch.stack([torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)) for s in slices])[:, None]
    t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return t.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def slice_features(model: InceptionV3Features, volumes: Sequence[np.ndarray], views: Sequence[str] = VIEWS,
                   offsets: Sequence[int] = (0,), image_size: int = 299, batch_size: int = 16,
                   device: str | torch.device = "cpu", progress: bool = False) -> dict[str, np.ndarray]:
    """pool3 features per view: {view: (n_volumes * len(offsets), 2048)}."""
    from tqdm import tqdm

    per_view: dict[str, list[np.ndarray]] = {v: [] for v in views}
    for vol in volumes:
        for view, planes in central_slices(vol, views, offsets).items():
            per_view[view].extend(planes)
    out = {}
    for view, planes in per_view.items():
        feats = []
        for s in tqdm(range(0, len(planes), batch_size), desc=f"inception {view}", disable=not progress):
            x = to_batch(planes[s : s + batch_size], image_size).to(device)
            feats.append(model(x).float().cpu().numpy())
        out[view] = np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)
    return out
