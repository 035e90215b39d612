"""``l1`` and ``mse``: voxel-wise intensity terms, optionally weighted by a map from the batch.

Recipe (inside a ``[[stages]]`` entry)::

    [stages.losses]
    l1 = 1.0
    [stages.losses.l1_lung]            # a second, masked L1 term
    name = "l1"
    weight = 0.5
    mask_key = "lung_mask"             # a float [B, 1, D, H, W] entry of the batch

This file is the smallest complete loss plugin: a module with validated keyword options and
``forward(pred, target, batch) -> scalar``, registered through ``register_losses``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from x2ct_framework.hookspecs import hookimpl


class _VoxelLoss(nn.Module):
    def __init__(self, mask_key: str = ""):
        super().__init__()
        if not isinstance(mask_key, str):
            raise ValueError(f"mask_key must be the name of a batch entry (a string), got {mask_key!r}")
        self.mask_key = mask_key

    def error(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor, batch: dict) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        err = self.error(pred, target)
        if not self.mask_key:
            return err.mean()
        if self.mask_key not in batch:
            raise KeyError(f"{type(self).__name__}: mask_key {self.mask_key!r} is not in the batch "
                           f"(batch keys: {', '.join(sorted(batch))})")
        w = batch[self.mask_key].to(err).expand_as(err)
        return (err * w).sum() / w.sum().clamp_min(1e-8)


class L1Loss(_VoxelLoss):
    """Mean absolute error; ``mask_key`` names a batch entry that weights each voxel."""

    def error(self, pred, target):
        return (pred - target).abs()


class MSELoss(_VoxelLoss):
    """Mean squared error; ``mask_key`` names a batch entry that weights each voxel."""

    def error(self, pred, target):
        return (pred - target) ** 2


@hookimpl
def register_losses(register):
    register("l1", L1Loss)
    register("mse", MSELoss)
