"""The built-in metrics, registered through the ``register_metrics`` hook (entry point ``metrics``).

The metric library is :mod:`x2ct_framework.evaluation.metrics`; X2CT-GAN's metrics come from
:mod:`x2ct_framework.evaluation.protocols`. Keeping the registration here means neither of those
modules imports the other's registration.
"""

from __future__ import annotations

from collections.abc import Sequence

from x2ct_framework.conventions import DEFAULT_HU_WINDOW, PLANES
from x2ct_framework.evaluation.metrics import (LABELS, LPIPS, MAE, PSNR, RMSE, SSIM, Cosine, LandmarkDistance,
                                               StructureMetric)
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
}


@hookimpl
def register_metrics(register):
    for name, factory in BUILTIN.items():
        register(name, factory)
    for name, factory in X2CTGAN_METRICS.items():
        register(name, factory)
