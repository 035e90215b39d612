"""``l1`` and ``mse``: voxel-wise intensity terms, optionally weighted by a mask in the batch."""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.hookspecs import hookimpl


class L1Loss(nn.Module):
    """Mean absolute error; ``mask_key`` names a batch entry that weights each voxel."""

    def __init__(self, mask_key: str = ""):
        super().__init__()
        self.mask_key = mask_key

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        err = (pred - target).abs()
        if self.mask_key:
            w = batch[self.mask_key].to(err)
            return (err * w).sum() / w.sum().clamp_min(1e-8)
        return err.mean()


class MSELoss(L1Loss):
    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        err = (pred - target) ** 2
        if self.mask_key:
            w = batch[self.mask_key].to(err)
            return (err * w).sum() / w.sum().clamp_min(1e-8)
        return err.mean()


@hookimpl
def register_losses(register):
    register("l1", L1Loss)
    register("mse", MSELoss)
