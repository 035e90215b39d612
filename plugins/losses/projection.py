"""``projection``: X2CT-GAN's projection loss, L1 between mean projections of the volume along its three axes.

X2CT-GAN (``map_projection_loss = 'l1'``, ``map_projection_lambda = 10``, ``multi_view = [1, 2, 3]``)
compares the mean of ``|volume|`` along each axis of the prediction and of the target (three 2D
maps: axial, coronal, sagittal) by their mean absolute difference, and averages the three. Unlike the
``reprojection`` term it needs no geometry: the "projections" are axis-aligned parallel means.

Recipe::

    [stages.losses]
    projection = 10.0
    [stages.losses.projection_ap]    # one axis only
    name = "projection"
    weight = 10.0
    axes = ["y"]
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.hookspecs import hookimpl

AXES = {"z": 2, "y": 3, "x": 4}


class ProjectionLoss(nn.Module):
    """Mean over ``axes`` ("z", "y", "x": volume axes D, H, W) of ``mean |mean_a |pred| - mean_a |target||``."""

    def __init__(self, axes: list[str] = ("z", "y", "x")):
        super().__init__()
        axes = list(axes)
        bad = [a for a in axes if a not in AXES]
        if not axes or bad or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct names among {list(AXES)}, got {axes!r}")
        self.dims = [AXES[a] for a in axes]

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 5:
            raise ValueError(f"projection: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                             f"[B, C, D, H, W]")
        terms = [(pred.abs().mean(d) - target.abs().mean(d)).abs().mean() for d in self.dims]
        return torch.stack(terms).mean()


@hookimpl
def register_losses(register):
    register("projection", ProjectionLoss)
