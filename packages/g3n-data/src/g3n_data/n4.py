"""N4 bias-field correction (SimpleITK).

The field is fitted on a shrunken copy (shrink 4 agrees with full resolution, r ~ 0.99, at about
1/50 of the time; notes.md) and applied at full resolution. Thick-slice scans are not shrunk along
their slice axis (4x4x1 is closer to full resolution than 4x4x4). N4 refuses integer input: the
image is float32 by the time it arrives here (see images.load_volume). The output scale is arbitrary,
which is fine: intensities are normalised per volume in the training loader, never on disk.
"""

from __future__ import annotations

import SimpleITK as sitk

from .config import N4Config


def n4_correct(image: sitk.Image, cfg: N4Config, mask: sitk.Image | None = None) -> sitk.Image:
    """Bias-corrected float32 image on the input grid.

    ``mask`` (optional, UInt8 on the same grid) restricts the fit; by default an Otsu head mask
    keeps the background out of the fit.
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.OtsuThreshold(image, 0, 1, 200)
    shrink = [1 if sp > cfg.thick_slice_mm else cfg.shrink for sp in image.GetSpacing()]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in cfg.iterations[: cfg.fitting_levels]]
                                    + [int(cfg.iterations[-1])] * max(0, cfg.fitting_levels - len(cfg.iterations)))
    n4.SetConvergenceThreshold(cfg.convergence)
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)
