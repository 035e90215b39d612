"""Input checks and small helpers shared by the model plugins: what a model receives, 3D resizing, checkpointing.

Parameter shapes do not depend on the output resolution or the number of views, so that a checkpoint of
one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from x2ct_framework.errors import DataError


class ModelInputError(DataError, ValueError):
    """The X-ray views or their geometry do not have the shapes the model needs."""


def check_two_views(name: str, what: str, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None,
                    others: str) -> None:
    """``check_inputs`` for a published two-view model (PA and lateral, no previous stage): ``what`` names the
    model in the message, ``others`` the models to use instead for another view count."""
    _, v = check_inputs(name, xrays, geometry, prev)
    if v != 2:
        raise ModelInputError(f"{name}: {what} takes exactly two views (PA and lateral), got {v}; set "
                              f"data.views = [0, 270] or use {others} for {v} views")
    if prev is not None:
        raise ModelInputError(f"{name}: {what} does not take a previous stage's prediction; remove "
                              f"stages.N.cascade for this model")


def check_inputs(name: str, xrays: torch.Tensor, geometry: dict, prev: torch.Tensor | None = None,
                 views: int | None = None) -> tuple[int, int]:
    """Validate ``xrays [B, V, 1, H, W]`` against ``geometry["angles"] [B, V]``; return ``(B, V)``."""
    if not isinstance(xrays, torch.Tensor) or xrays.ndim != 5 or xrays.shape[2] != 1:
        shape = tuple(xrays.shape) if isinstance(xrays, torch.Tensor) else type(xrays).__name__
        raise ModelInputError(f"{name}: xrays must be [B, V, 1, H, W] (batch, views, one channel, height, width), "
                              f"got {shape}")
    b, v = xrays.shape[:2]
    if v < 1:
        raise ModelInputError(f"{name}: xrays hold no views (shape {tuple(xrays.shape)}); at least one is needed")
    if views is not None and v != views:
        raise ModelInputError(f"{name}: built for {views} views (one encoder per view), got {v} views; "
                              f"rebuild it with the recipe's data.views, or set share_encoder = true")
    if not isinstance(geometry, Mapping) or "angles" not in geometry:
        keys = sorted(geometry) if isinstance(geometry, Mapping) else type(geometry).__name__
        raise ModelInputError(f"{name}: geometry must be a dict with 'angles' [B, V] in degrees, got {keys}")
    angles = geometry["angles"]
    if not isinstance(angles, torch.Tensor) or tuple(angles.shape) != (b, v):
        shape = tuple(angles.shape) if isinstance(angles, torch.Tensor) else type(angles).__name__
        raise ModelInputError(f"{name}: geometry['angles'] has shape {shape} but xrays {tuple(xrays.shape)} hold "
                              f"{v} views of {b} cases; expected [B, V] = [{b}, {v}], one angle per view")
    if prev is not None and (prev.ndim != 5 or prev.shape[:2] != (b, 1)):
        raise ModelInputError(f"{name}: prev (the previous stage's prediction) must be [B, 1, D, H, W] with "
                              f"B = {b}, got {tuple(prev.shape)}")
    return b, v


def resize3d(x: torch.Tensor, size: int) -> torch.Tensor:
    """Trilinear resize of ``[B, C, D, H, W]`` to ``size^3`` (a no-op when it already has that size)."""
    if tuple(x.shape[-3:]) == (size,) * 3:
        return x
    return F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)


def maybe_checkpoint(enabled: bool, fn: Callable, *args):
    """Run ``fn(*args)``, recomputing its activations in the backward pass when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ---- 2D encoder --------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1
