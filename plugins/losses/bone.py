"""``bone``: bone-aware term, L1 inside bone plus a soft Dice of the bone masks.

The user's plan's future-work "bone segmentation loss": bone occupies a few percent of a chest CT, so the
global L1 barely notices a blurred vertebra. This term looks at bone only:

- **where bone is**: the batch's label map (``labels == label``, 3 = bone in the project's label
  convention) when the batch has ``labels``; otherwise a soft threshold of the target,
  ``sigmoid((HU - threshold_hu) / softness_hu)``, with HU recovered from [0, 1] through the recipe's
  ``hu_window``;
- **L1 inside bone**: ``sum(m * |pred - target|) / sum(m)`` with that bone weight ``m``;
- **soft Dice**: between the soft-threshold bone masks of prediction and target (both computed the
  same way, so the minimum is exactly at ``pred == target``), ``1 - 2 sum(p t) / (sum(p^2) + sum(t^2))``.

``loss = l1_weight * L1_bone + dice_weight * (1 - Dice)``.

Recipe::

    losses = { bone = { weight = 0.2, threshold_hu = 250, softness_hu = 50 } }

A label map separates bone from contrast-filled vessels that also exceed +250 HU in CTPA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.conventions import BONE, DEFAULT_HU_WINDOW, unit_to_hu
from x2ct_framework.errors import check_int
from x2ct_framework.hookspecs import hookimpl


def check_hu_window(hu_window) -> tuple[float, float]:
    lo, hi = (float(v) for v in hu_window) if len(hu_window) == 2 else (None, None)
    if lo is None or not hi > lo:
        raise ValueError(f"hu_window must be [low, high] with high > low, got {list(hu_window)}")
    return lo, hi


def soft_mask(ct01: torch.Tensor, hu_window: tuple[float, float], threshold_hu: float,
              softness_hu: float) -> torch.Tensor:
    """Soft membership ``sigmoid((HU - threshold) / softness)`` of a [0, 1] volume."""
    return torch.sigmoid((unit_to_hu(ct01, hu_window) - threshold_hu) / softness_hu)


def soft_dice(p: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-case soft Dice with squared denominators (1 exactly when p == t)."""
    dims = tuple(range(1, p.dim()))
    return (2 * (p * t).sum(dims) + eps) / ((p * p).sum(dims) + (t * t).sum(dims) + eps)


class BoneLoss(nn.Module):
    """L1 inside bone plus soft Dice of bone masks (see the module docstring).

    Options: ``threshold_hu`` and ``softness_hu`` of the soft threshold; ``label`` the bone class in
    ``labels``; ``use_labels`` false ignores a label map; ``l1_weight``, ``dice_weight`` the mix;
    ``hu_window`` comes from the recipe's data section.
    """

    def __init__(self, threshold_hu: float = 250.0, softness_hu: float = 50.0, label: int = BONE,
                 use_labels: bool = True, l1_weight: float = 1.0, dice_weight: float = 1.0,
                 hu_window: list[float] = DEFAULT_HU_WINDOW):
        super().__init__()
        if not softness_hu > 0:
            raise ValueError(f"softness_hu must be > 0, got {softness_hu!r}")
        if l1_weight < 0 or dice_weight < 0 or l1_weight + dice_weight == 0:
            raise ValueError(f"l1_weight and dice_weight must be >= 0 and not both 0, "
                             f"got {l1_weight!r} and {dice_weight!r}")
        check_int("label", label, 0)
        self.hu_window = check_hu_window(hu_window)
        lo, hi = self.hu_window
        if not lo < threshold_hu < hi:
            raise ValueError(f"threshold_hu {threshold_hu} lies outside hu_window [{lo}, {hi}]")
        self.threshold_hu, self.softness_hu = float(threshold_hu), float(softness_hu)
        self.label, self.use_labels = label, use_labels
        self.l1_weight, self.dice_weight = float(l1_weight), float(dice_weight)

    def masks(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> tuple[torch.Tensor, ...]:
        """(bone weight for the L1, predicted soft mask, target soft mask)."""
        mp = soft_mask(pred, self.hu_window, self.threshold_hu, self.softness_hu)
        mt = soft_mask(target, self.hu_window, self.threshold_hu, self.softness_hu)
        if self.use_labels and batch.get("labels") is not None:
            region = (batch["labels"] == self.label).to(pred.dtype)
        else:
            region = mt
        return region, mp, mt

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"bone loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        region, mp, mt = self.masks(pred, target, batch)
        region = region.detach().expand_as(pred)
        l1 = (region * (pred - target).abs()).sum() / region.sum().clamp_min(1e-6)
        dice = soft_dice(mp, mt.detach()).mean()
        return self.l1_weight * l1 + self.dice_weight * (1.0 - dice)


@hookimpl
def register_losses(register):
    register("bone", BoneLoss)
