"""``reprojection``: the prediction's DRRs must agree with the input X-rays (L1).

A reconstruction is only supported by what the views show; this term renders digitally
reconstructed radiographs of the prediction with the batch's own ``geometry`` through
``x2ct_framework.physics.drr`` and compares them with ``batch["xrays"]``. Gradients flow through the
differentiable projector into the prediction.

The loss is only meaningful when its DRRs are rendered exactly like the dataset's views: the same
``hu_window`` (taken from the recipe's data section) and the same DRR options. A dataset that
renders its views with non-default ``drr`` options (for example Beer-Lambert intensities) must be
matched with ``drr_options`` here; with real radiographs the term compares against the measured
images, so the DRR model should be calibrated to them. The loss renders at the views' own size
(``det_shape`` = the X-rays' height and width).

Recipe::

    losses = { reprojection = 0.1 }
    losses = { reprojection = { weight = 0.1, drr_options = { beer_lambert = true } } }
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import drr

DISTANCES = ("l1", "l2")


def check_drr_loss_options(distance: str, drr_options: dict, hu_window) -> tuple[str, dict, tuple[float, float]]:
    """The options every DRR-rendering loss shares, checked: ``(distance, drr_options, hu_window)``."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")
    if not isinstance(drr_options, dict):
        raise ValueError(f"drr_options must be a table of physics.drr keyword arguments, got {drr_options!r}")
    reserved = {"ct01", "geometry", "hu_window", "det_shape"} & set(drr_options)
    if reserved:
        raise ValueError(f"drr_options may not set {sorted(reserved)}: they come from the batch and the recipe")
    if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
        raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
    return distance, dict(drr_options), (float(hu_window[0]), float(hu_window[1]))


def image_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean L1 or L2 distance of two image stacks."""
    err = a - b
    return err.abs().mean() if distance == "l1" else (err**2).mean()


class ReprojectionLoss(nn.Module):
    """Mean distance between DRRs of ``pred`` and the batch's X-rays (both in [0, 1]).

    Options: ``distance`` "l1" or "l2"; ``drr_options`` extra keyword arguments of
    ``physics.drr`` (must equal the dataset's); ``hu_window`` comes from the recipe's data section.
    """

    def __init__(self, distance: str = "l1", drr_options: dict = {},  # noqa: B006 (never mutated)
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        self.distance, self.drr_options, self.hu_window = check_drr_loss_options(distance, drr_options, hu_window)

    def render(self, volume: torch.Tensor, batch: dict) -> torch.Tensor:
        """DRRs of ``volume`` [B, 1, D, H, W] with the batch's geometry, at the X-rays' size."""
        missing = [k for k in ("xrays", "geometry") if k not in batch]
        if missing:
            raise KeyError(f"reprojection loss needs {missing} in the batch (batch keys: {', '.join(sorted(batch))})")
        det_shape = tuple(batch["xrays"].shape[-2:])
        return drr(volume, batch["geometry"], self.hu_window, det_shape=det_shape, **self.drr_options)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        views = self.render(pred, batch)
        xrays = batch["xrays"].to(views)
        if views.shape != xrays.shape:
            raise ValueError(f"reprojection loss: rendered views {tuple(views.shape)} do not match the batch's "
                             f"xrays {tuple(xrays.shape)}")
        return image_distance(views, xrays, self.distance)


@hookimpl
def register_losses(register):
    register("reprojection", ReprojectionLoss)
