"""``landmark``: anatomical landmark constraints, the distance in mm between differentiable centroids.

The user's plan's future-work "anatomical landmark constraints": a reconstruction can score well on
intensity metrics while a vertebra or the heart sits a few millimetres off. This term locates
landmarks in the prediction and in the target the same way and penalises how far apart they are.

Landmarks:
- **from the label map** (when the batch has ``labels``): every structure id in
  ``landmark_labels`` (default ``[5]``, the heart in the framework's label convention; list a
  dataset's own ids for each labelled vertebra, the aortic arch, the carina...). For
  structure ``l``: the neighbourhood ``R`` is its label region dilated by ``margin`` voxels, and
  its tissue density ``mu_l`` the target's mean HU inside the label. A volume's landmark is the
  centroid of ``R * exp(-(HU - mu_l)^2 / (2 tolerance_hu^2))``: where, near the labelled
  structure, the volume has that structure's density;
- **otherwise** (no labels, or none of the ids present): the bone-density centroid of each of
  ``slabs`` axial slabs (along D), weighted by a linear ramp from 0 at ``threshold_hu - softness_hu``
  to 1 at ``threshold_hu + softness_hu`` (exactly 0 for soft tissue, so a large body does not pull
  the centroid); slabs whose target holds less than ``min_mass`` voxels of bone are skipped.

Centroids are weighted means of voxel coordinates (differentiable in the prediction); distances are
in millimetres using the batch's ``spacing`` ([B, 3] mm per voxel, order x, y, z; 1 mm when absent).
The loss is the mean distance over landmarks and cases, ``sqrt(d^2 + eps) - sqrt(eps)`` so it is 0
at ``pred == target`` and smooth there.

Recipe::

    losses = { landmark = { weight = 0.01, slabs = 8 } }
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.conventions import DEFAULT_HU_WINDOW, HEART, unit_to_hu
from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl

# 0 background, 1 soft tissue, 2 lung, 3 bone, 4 vessel, 5 heart, 6 fat, 7 air, 8 table: of these only
# the heart is a compact structure with a well-defined centre (fat, air and the table are tissue classes).
DEFAULT_LANDMARK_LABELS = (HEART,)


def centroids_mm(weights: torch.Tensor, spacing: torch.Tensor, z0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted centroid (x, y, z in mm) and mass of ``weights`` [B, D, H, W]; spacing [B, 3] (x, y, z).

    ``z0`` is the index of the first slice when ``weights`` is a slab of a larger volume.
    """
    b, d, h, w = weights.shape
    mass = weights.sum((1, 2, 3))
    dev, dt = weights.device, weights.dtype
    cz = (weights.sum((2, 3)) * torch.arange(z0, z0 + d, device=dev, dtype=dt)).sum(1)
    cy = (weights.sum((1, 3)) * torch.arange(h, device=dev, dtype=dt)).sum(1)
    cx = (weights.sum((1, 2)) * torch.arange(w, device=dev, dtype=dt)).sum(1)
    centre = torch.stack([cx, cy, cz], dim=1) / mass.clamp_min(1e-12)[:, None]
    return centre * spacing, mass


class LandmarkLoss(nn.Module):
    """Mean landmark distance in mm between prediction and target (see the module docstring).

    Options: ``landmark_labels`` structure ids (default [5], the heart); ``margin`` voxels of
    neighbourhood around a structure; ``tolerance_hu`` width of the density match; ``slabs``,
    ``threshold_hu``, ``softness_hu``, ``min_mass`` of the bone-slab fallback; ``use_labels`` false
    always uses the fallback; ``eps`` (mm^2) of the smooth distance; ``hu_window`` from the recipe.
    """

    def __init__(self, landmark_labels: list[int] = DEFAULT_LANDMARK_LABELS, margin: int = 3,
                 tolerance_hu: float = 150.0, slabs: int = 8, threshold_hu: float = 250.0, softness_hu: float = 50.0,
                 min_mass: float = 1.0, use_labels: bool = True, eps: float = 1e-4,
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        labels = list(landmark_labels)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in labels):
            raise ValueError(f"landmark_labels must be label ids (integers >= 0), got {labels}")
        for key, value, low in (("margin", margin, 0), ("slabs", slabs, 1)):
            check_int(key, value, low)
        for key, value in (("tolerance_hu", tolerance_hu), ("softness_hu", softness_hu), ("eps", eps)):
            if not value > 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        if min_mass < 0:
            raise ValueError(f"min_mass must be >= 0, got {min_mass!r}")
        if len(hu_window) != 2 or not float(hu_window[1]) > float(hu_window[0]):
            raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
        self.landmark_labels, self.margin, self.tolerance_hu = labels, margin, float(tolerance_hu)
        self.slabs, self.threshold_hu, self.softness_hu = slabs, float(threshold_hu), float(softness_hu)
        self.min_mass, self.use_labels, self.eps = float(min_mass), use_labels, float(eps)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))

    def _hu(self, ct01: torch.Tensor) -> torch.Tensor:
        return unit_to_hu(ct01, self.hu_window)

    def bone_weight(self, hu: torch.Tensor) -> torch.Tensor:
        """Ramp from 0 at ``threshold - softness`` to 1 at ``threshold + softness`` HU."""
        return ((hu - self.threshold_hu) / (2 * self.softness_hu) + 0.5).clamp(0, 1)

    def _structure_ids(self, labels: torch.Tensor) -> list[int]:
        present = set(torch.unique(labels).tolist())
        return [i for i in self.landmark_labels if i in present]

    def landmark_pairs(self, pred: torch.Tensor, target: torch.Tensor, batch: dict):
        """Predicted and target landmarks [B, L, 3] (mm) and which ones are valid [B, L]."""
        b = pred.shape[0]
        spacing = batch.get("spacing")
        spacing = (torch.ones(b, 3) if spacing is None else spacing.reshape(b, 3)).to(pred)
        hp, ht = self._hu(pred[:, 0]), self._hu(target[:, 0])
        labels = batch.get("labels") if self.use_labels else None
        ids = self._structure_ids(labels) if labels is not None else []
        cp, ct, valid = [], [], []
        if ids:
            lab = labels.reshape(b, *pred.shape[2:])
            for i in ids:
                inside = (lab == i).to(pred.dtype)
                count = inside.sum((1, 2, 3))
                mu = (ht.detach() * inside).sum((1, 2, 3)) / count.clamp_min(1)
                region = inside
                if self.margin:
                    k = 2 * self.margin + 1
                    region = F.max_pool3d(inside[:, None], k, stride=1, padding=self.margin)[:, 0]
                mu = mu.reshape(b, 1, 1, 1)
                tol2 = 2 * self.tolerance_hu**2
                # a faint uniform prior keeps the centroid inside R when the volume lacks the density
                wp = region * (torch.exp(-((hp - mu) ** 2) / tol2) + 1e-3)
                wt = region * (torch.exp(-((ht - mu) ** 2) / tol2) + 1e-3)
                p, _ = centroids_mm(wp, spacing)
                t, _ = centroids_mm(wt, spacing)
                cp.append(p), ct.append(t), valid.append(count > 0)
        else:
            d = pred.shape[2]
            bounds = [round(k * d / self.slabs) for k in range(self.slabs + 1)]
            wp_all = self.bone_weight(hp)
            wt_all = self.bone_weight(ht)
            for z0, z1 in zip(bounds[:-1], bounds[1:]):
                if z1 <= z0:
                    continue
                p, _ = centroids_mm(wp_all[:, z0:z1], spacing, z0)
                t, mass = centroids_mm(wt_all[:, z0:z1], spacing, z0)
                cp.append(p), ct.append(t), valid.append(mass >= max(self.min_mass, 1e-6))
        return torch.stack(cp, 1), torch.stack(ct, 1), torch.stack(valid, 1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.dim() != 5 or pred.shape != target.shape or pred.shape[1] != 1:
            raise ValueError(f"landmark loss expects pred and target [B, 1, D, H, W] of the same shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        cp, ct, valid = self.landmark_pairs(pred, target.detach(), batch)
        d2 = ((cp - ct) ** 2).sum(-1)
        dist = torch.sqrt(d2 + self.eps) - math.sqrt(self.eps)
        v = valid.to(dist.dtype)
        return (dist * v).sum() / v.sum().clamp_min(1.0)


@hookimpl
def register_losses(register):
    register("landmark", LandmarkLoss)
