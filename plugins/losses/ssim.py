"""``ssim``: structural dissimilarity, ``1 - SSIM``, in 3D or 2D slice-wise.

The user's plan's stage-2 term ``0.5 * SSIM`` ("better organ shapes"). The value is computed by
``x2ct_framework.ssim`` (the same code as the ``ssim`` metric) and agrees with
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)``, including scikit-image's cropped border.

Recipe::

    losses = { ssim = 0.5 }                                   # 3D, Gaussian window 11 / sigma 1.5
    losses = { ssim = { weight = 0.5, mode = "2d" } }         # slice-wise, averaged over 3 axes
    losses = { ssim = { weight = 0.5, windows = [[-160, 240]] } }   # + SSIM in a soft-tissue window

``windows`` (HU): SSIM is also computed on the volumes re-windowed to each ``[low, high]`` (clipped,
scaled to [0, 1]) and the loss averages over the data's own window and these. In the seed's
[-1000, 3000] window soft tissue spans a few percent of the range: smoothing all of it away still
scores SSIM 0.916; in [-160, 240] the same smoothing is plain to SSIM.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.ssim import MODES, check_window, ssim


class SSIMLoss(nn.Module):
    """``1 - SSIM(pred, target)`` averaged over the batch.

    Options: ``mode`` "3d" (one 3D SSIM) or "2d" (every slice along each axis); ``win_size`` and
    ``sigma`` of the Gaussian window; ``data_range`` of the intensities (1.0 for volumes in [0, 1]);
    ``k1``, ``k2`` the SSIM stabilising constants; ``windows`` extra HU display windows (module docstring);
    ``hu_window`` from the data.
    """

    def __init__(self, mode: str = "3d", win_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
                 k1: float = 0.01, k2: float = 0.03, windows: list[list[float]] = (),
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        windows = [list(w) for w in windows]
        for w in windows:
            if len(w) != 2 or not float(w[1]) > float(w[0]):
                raise ValueError(f"windows must be a list of [low, high] HU pairs with high > low, got {windows}")
        if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
            raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
        self.windows = [(float(a), float(b)) for a, b in windows]
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        check_window(win_size, sigma, "gaussian")
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range!r}")
        if not (k1 > 0 and k2 > 0):
            raise ValueError(f"k1 and k2 must be > 0, got {k1!r} and {k2!r}")
        self.mode, self.win_size, self.sigma = mode, win_size, float(sigma)
        self.data_range, self.k1, self.k2 = float(data_range), float(k1), float(k2)

    def _ssim(self, pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
        return ssim(pred, target, data_range=data_range, mode=self.mode, win_size=self.win_size,
                    sigma=self.sigma, k1=self.k1, k2=self.k2).mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        values = [self._ssim(pred, target, self.data_range)]
        lo, hi = self.hu_window
        for dlo, dhi in self.windows:
            def win(x):
                return ((x * (hi - lo) + lo - dlo) / (dhi - dlo)).clamp(0.0, 1.0)
            values.append(self._ssim(win(pred), win(target), 1.0))
        return 1.0 - sum(values) / len(values)


@hookimpl
def register_losses(register):
    register("ssim", SSIMLoss)
