"""``gradient``: difference of 3D finite-difference gradients, the user's plan's "penalise blurry edges" term.

A blurred prediction has smaller intensity steps across bone and vessel walls than the target;
comparing the gradients (not only the intensities) penalises that directly.

Recipe::

    losses = { gradient = 0.15 }
    losses = { gradient = { weight = 0.15, mode = "both", distance = "l1" } }

Modes: ``"components"`` compares the forward differences along D, H and W separately (the
default); ``"magnitude"`` compares the gradient magnitude ``sqrt(gx^2 + gy^2 + gz^2)``, which is
blind to the sign and direction of an edge; ``"both"`` averages the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from x2ct_framework.hookspecs import hookimpl

MODES = ("components", "magnitude", "both")
DISTANCES = ("l1", "l2")


def finite_differences(x: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of ``x`` [B, C, D, H, W] along D, H and W, each cropped to a common grid."""
    dz = x[:, :, 1:, :-1, :-1] - x[:, :, :-1, :-1, :-1]
    dy = x[:, :, :-1, 1:, :-1] - x[:, :, :-1, :-1, :-1]
    dx = x[:, :, :-1, :-1, 1:] - x[:, :, :-1, :-1, :-1]
    return [dz, dy, dx]


class GradientLoss(nn.Module):
    """Distance between the finite-difference gradients of ``pred`` and ``target``.

    Options: ``mode`` (see the module docstring), ``distance`` "l1" or "l2", ``eps`` added under the
    square root of the magnitude so its gradient stays finite in flat regions.
    """

    def __init__(self, mode: str = "components", distance: str = "l1", eps: float = 1e-6):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.mode, self.distance, self.eps = mode, distance, float(eps)

    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(a, b) if self.distance == "l1" else F.mse_loss(a, b)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.dim() != 5 or pred.shape != target.shape:
            raise ValueError(f"gradient loss expects pred and target [B, C, D, H, W] of the same shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        gp, gt = finite_differences(pred), finite_differences(target)
        terms = []
        if self.mode in ("components", "both"):
            terms.append(torch.stack([self._dist(a, b) for a, b in zip(gp, gt)]).mean())
        if self.mode in ("magnitude", "both"):
            mp = torch.sqrt(sum(g * g for g in gp) + self.eps)
            mt = torch.sqrt(sum(g * g for g in gt) + self.eps)
            terms.append(self._dist(mp, mt))
        return torch.stack(terms).mean()


@hookimpl
def register_losses(register):
    register("gradient", GradientLoss)
