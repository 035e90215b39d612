"""``drr_projection``: DRRs of the prediction must agree with DRRs of the target, in the batch's geometry.

X2CT-GAN's projection loss and PSCT-Net's: the prediction and the target CT are both rendered
through ``x2ct_framework.physics.drr`` with the batch's own ``geometry`` (the views the model sees,
or ``angles`` of its own choosing) and compared. Unlike ``reprojection`` (which compares with the
input X-rays) it never depends on how the stored X-rays were made, so it is safe for real or
differently rendered radiographs; it needs the target CT, so it is a training term only.

Options: ``distance`` ("l1" or "l2"); ``det_size`` (detector pixels per side; 0: the X-rays' size,
else the DRRs are rendered at that size, cheaper at 256^3); ``angles`` (extra gantry angles in
degrees, rendered with the first view's geometry, e.g. ``[45, 135]`` for views the model does not
see; default none); ``drr_options`` (keyword arguments of ``physics.drr``); ``hu_window`` from the
recipe's data section. The target's DRRs are rendered without gradient.

Recipe::

    losses = { drr_projection = 0.5 }
    losses = { drr_projection = { weight = 0.5, det_size = 64, angles = [45, 135] } }
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import batched, drr
from x2ct_plugins.losses.reprojection import check_drr_loss_options, image_distance


class DRRProjectionLoss(nn.Module):
    """Mean L1 (or L2) distance between DRRs of ``pred`` and of ``target`` (both CT in [0, 1])."""

    def __init__(self, distance: str = "l1", det_size: int = 0, angles: list[float] = (),
                 drr_options: dict = {},  # noqa: B006 (never mutated)
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        self.distance, self.drr_options, self.hu_window = check_drr_loss_options(distance, drr_options, hu_window)
        check_int("det_size", det_size, 0, hint=" (0: the X-rays' size)")
        if not isinstance(angles, (list, tuple)) or not all(isinstance(a, (int, float)) for a in angles):
            raise ValueError(f"angles must be a list of gantry angles in degrees, got {angles!r}")
        self.det_size = det_size
        self.angles = [float(a) for a in angles]

    def geometry(self, batch: dict, b: int, device) -> dict:
        """The batch's geometry, plus the extra ``angles`` (copies of the first view with other angles)."""
        if "geometry" not in batch:
            raise KeyError(f"drr_projection loss needs 'geometry' in the batch "
                           f"(batch keys: {', '.join(sorted(batch))})")
        g = batched(batch["geometry"], b, device)
        if not self.angles:
            return g
        n = len(self.angles)
        extra = {k: t[:, :1].expand(b, n, *t.shape[2:]).clone() for k, t in g.items()}
        extra["angles"] = torch.tensor(self.angles, device=device).expand(b, n).clone()
        return {k: torch.cat([g[k], extra[k]], 1) for k in g}

    def det_shape(self, batch: dict, pred: torch.Tensor) -> tuple[int, int]:
        if self.det_size:
            return self.det_size, self.det_size
        if "xrays" in batch:
            return tuple(batch["xrays"].shape[-2:])
        return tuple(pred.shape[-2:])

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"drr_projection loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        g = self.geometry(batch, pred.shape[0], pred.device)
        shape = self.det_shape(batch, pred)
        views = drr(pred.float(), g, self.hu_window, det_shape=shape, **self.drr_options)
        with torch.no_grad():
            ref = drr(target.float(), g, self.hu_window, det_shape=shape, **self.drr_options)
        return image_distance(views, ref, self.distance)


@hookimpl
def register_losses(register):
    register("drr_projection", DRRProjectionLoss)
