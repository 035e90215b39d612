"""The built-in metrics, registered through the ``register_metrics`` hook (entry point ``metrics``).

The metric library is :mod:`x2ct_framework.evaluation.metrics`; X2CT-GAN's metrics come from
:mod:`x2ct_framework.evaluation.protocols`. Keeping the registration here means neither of those
modules imports the other's registration.
"""

from __future__ import annotations

from collections.abc import Sequence

from x2ct_framework.conventions import DEFAULT_HU_WINDOW, PLANES
from x2ct_framework.evaluation.anatomy_metrics import CONTRAST_STRUCTURES, ContrastRetention, HeldOutView
from x2ct_framework.evaluation.metrics import (LABELS, LPIPS, MAE, PSNR, RMSE, SSIM, WINDOWS, Cosine,
                                               LandmarkDistance, StructureMetric)
from x2ct_framework.evaluation.sharpness_metrics import (LPIPS3, EdgeSharpness, HighFrequencyEnergy, SetDistance,
                                                         UncertaintyCalibration)
from x2ct_framework.evaluation.protocols import X2CTGAN_METRICS
from x2ct_framework.hookspecs import hookimpl


# ---- registration -----------------------------------------------------------------------------
def _structure_factory(structure: str, kind: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, thresholds: list[float] | None = None):
        return StructureMetric(hu_window, structure=structure, kind=kind, thresholds=thresholds)

    factory.__name__ = f"{structure}_{kind}"
    factory.__doc__ = f"{kind} inside the {structure} region (see StructureMetric)."
    return factory


def _ssim2d(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, window: list[float] | None = None,
            win_size: int = 11, sigma: float = 1.5, window_kind: str = "gaussian",
            sample_covariance: bool = False, axes: list[str] = PLANES) -> SSIM:
    """SSIM of 2D slices averaged over the three axes."""
    return SSIM(hu_window, mode="2d", window=window, win_size=win_size, sigma=sigma, window_kind=window_kind,
                sample_covariance=sample_covariance, axes=axes)


def _psnr_slices(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, window: list[float] | None = None,
                 peak: float | None = None) -> PSNR:
    """PSNR of 2D slices averaged over the three axes."""
    return PSNR(hu_window, window=window, peak=peak, slices=True)


def _windowed(kind: str, window: str):
    """``psnr_<window>`` / ``ssim_<window>``: PSNR or 3D SSIM in a named display window (``WINDOWS``)."""
    if kind == "psnr":
        def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, peak: float | None = None,
                    slices: bool = False) -> PSNR:
            return PSNR(hu_window, window=window, peak=peak, slices=slices)
    else:
        def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, mode: str = "3d", win_size: int = 11,
                    sigma: float = 1.5, window_kind: str = "gaussian", sample_covariance: bool = False,
                    axes: list[str] = PLANES) -> SSIM:
            return SSIM(hu_window, mode=mode, window=window, win_size=win_size, sigma=sigma,
                        window_kind=window_kind, sample_covariance=sample_covariance, axes=axes)
    lo, hi = WINDOWS[window]
    factory.__name__ = f"{kind}_{window}"
    factory.__doc__ = f"{kind.upper()} with both volumes clipped to the {window} window [{lo:g}, {hi:g}] HU."
    return factory


def _contrast_factory(structure: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, shell: int = 2, min_contrast: float = 20.0,
                chamber_hu: float = 100.0) -> ContrastRetention:
        return ContrastRetention(hu_window, structure=structure, shell=shell, min_contrast=min_contrast,
                                 chamber_hu=chamber_hu)

    factory.__name__ = f"contrast_{structure}"
    factory.__doc__ = f"Contrast retention of {structure} against its surrounding shell (prediction / target)."
    return factory


def _heldout(kind: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, angles: list[float] = (45.0, 135.0),
                det_size: int = 0, drr_options: dict | None = None, tolerance: float = 0.5) -> HeldOutView:
        return HeldOutView(hu_window, angles=angles, kind=kind, det_size=det_size, drr_options=drr_options,
                           tolerance=tolerance)

    factory.__name__ = f"heldout_view_{kind}"
    factory.__doc__ = f"{kind.upper()} of DRRs of the prediction and the target from angles the model never saw."
    return factory


def _set_distance(kind: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, extractor: str = "random3d",
                weights: str | None = None, extractor_seed: int = 0, kid_subset_size: int = 1000,
                kid_subsets: int = 100) -> SetDistance:
        return SetDistance(hu_window, kind=kind, extractor=extractor, weights=weights, seed=extractor_seed,
                           kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)

    factory.__name__ = f"{kind}3d"
    factory.__doc__ = f"{kind.upper()} between 3D features of the predicted and the target volumes of the set."
    return factory


def _uncertainty(kind: str):
    def factory(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, std_key: str = "pred_std", region: str = "body",
                k: float = 2.0) -> UncertaintyCalibration:
        return UncertaintyCalibration(hu_window, kind=kind, std_key=std_key, region=region, k=k)

    factory.__name__ = f"uncertainty_{kind}"
    factory.__doc__ = f"Uncertainty calibration ({kind}) of batch['pred_std'] against the absolute error."
    return factory


def _lpips3(hu_window: Sequence[float] = DEFAULT_HU_WINDOW, net: str = "alex", slices: int = 8, min_size: int = 64,
            backbone_path: str | None = None, backbone: str = "auto", backbone_seed: int = 0) -> LPIPS3:
    """LPIPS over slices of the three axes; a seeded random backbone when the ImageNet weights are absent."""
    return LPIPS3(hu_window, net=net, slices=slices, min_size=min_size, backbone_path=backbone_path,
                  backbone=backbone, seed=backbone_seed)


BUILTIN = {
    "psnr": PSNR,
    "psnr_slices": _psnr_slices,
    "ssim": SSIM,
    "ssim2d": _ssim2d,
    "mae_hu": MAE,
    "rmse_hu": RMSE,
    "cosine": Cosine,
    "lpips": LPIPS,
    "landmark_mm": LandmarkDistance,
    **{f"{s}_{k}": _structure_factory(s, k) for s in LABELS for k in ("psnr", "mae", "dice")},
    **{f"{k}_{w}": _windowed(k, w) for w in WINDOWS for k in ("psnr", "ssim")},
    "contrast_retention": _contrast_factory("mean"),
    **{f"contrast_{s}": _contrast_factory(s) for s in CONTRAST_STRUCTURES},
    "heldout_view_psnr": _heldout("psnr"),
    "heldout_view_ncc": _heldout("ncc"),
    "hf_energy_ratio": HighFrequencyEnergy,
    "edge_sharpness": EdgeSharpness,
    "lpips3": _lpips3,
    "fid3d": _set_distance("fid"),
    "kid3d": _set_distance("kid"),
    "uncertainty_spearman": _uncertainty("spearman"),
    "uncertainty_coverage": _uncertainty("coverage"),
}


@hookimpl
def register_metrics(register):
    for name, factory in BUILTIN.items():
        register(name, factory)
    for name, factory in X2CTGAN_METRICS.items():
        register(name, factory)
