"""A Charbonnier (smooth L1) reconstruction loss that weights an HU range of interest more.

Contrast-filled vessels in CTPA occupy few voxels; an unweighted voxel loss barely notices them.
This loss multiplies the error of every voxel whose *target* lies inside ``focus_hu`` by
``focus_weight``. The target is in [0, 1] after the recipe's HU window, so the loss asks the
framework for ``hu_window`` to convert it back to HU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW


class WindowedCharbonnier(nn.Module):
    """``mean_w(sqrt((pred - target)^2 + eps^2) - eps)`` with weight ``focus_weight`` inside ``focus_hu``.

    Args:
        eps: smoothing of the absolute error near zero (> 0); the loss is 0 at ``pred == target``
            and its gradient stays finite there.
        focus_hu: ``[low, high]`` HU range whose voxels are weighted up (default: contrast-filled
            vessels and cortical bone start).
        focus_weight: weight of voxels inside ``focus_hu`` (>= 0); other voxels weigh 1.
        hu_window: the recipe's HU window, filled in by the framework (``[data] hu_window``).
    """

    def __init__(self, eps: float = 1e-3, focus_hu: list[float] = (150.0, 600.0), focus_weight: float = 4.0,
                 *, hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if len(focus_hu) != 2 or not focus_hu[0] < focus_hu[1]:
            raise ValueError(f"focus_hu must be [low, high] with low < high, got {list(focus_hu)}")
        if not focus_weight >= 0:
            raise ValueError(f"focus_weight must be >= 0, got {focus_weight}")
        if len(hu_window) != 2 or not hu_window[0] < hu_window[1]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {list(hu_window)}")
        self.eps, self.focus_weight = float(eps), float(focus_weight)
        lo, hi = float(hu_window[0]), float(hu_window[1])
        # the focus range expressed in the [0, 1] units of the windowed target
        self.focus = ((float(focus_hu[0]) - lo) / (hi - lo), (float(focus_hu[1]) - lo) / (hi - lo))

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        # float32 on purpose: under fp16 autocast, eps^2 = 1e-6 is close to fp16's smallest normal number.
        pred, target = pred.float(), target.float()
        inside = (target >= self.focus[0]) & (target <= self.focus[1])
        weight = torch.where(inside, self.focus_weight, 1.0)
        err = torch.sqrt((pred - target) ** 2 + self.eps**2) - self.eps
        return (weight * err).sum() / weight.sum().clamp_min(1e-8)
