"""The kit's inputs: a seeded chest-like case with DRR views, batched as the data loader batches items."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from x2ct_framework.conventions import DEFAULT_HU_WINDOW, hu_to_unit


def make_case(index: int = 0, *, views: Sequence[float] = (0.0, 90.0), resolution: int = 16,
              image_size: int | None = None, hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
              geometry: str = "parallel", seed: int = 0) -> dict:
    """One dataset item: a seeded chest-like volume (body, lungs, spine, vessel) and its DRR views."""
    from x2ct_framework.phantom import kit_chest
    from x2ct_framework.physics import drr, make_geometry

    hu, labels = kit_chest(resolution, seed * 7919 + index)
    lo, hi = float(hu_window[0]), float(hu_window[1])
    ct = hu_to_unit(hu, (lo, hi))[None]
    geom = make_geometry([float(v) for v in views], geometry)
    size = image_size or resolution
    xrays = drr(ct[None], {k: v[None] for k, v in geom.items()}, (lo, hi), det_shape=(size, size))[0]
    return {"xrays": xrays.float(), "geometry": geom, "ct": ct, "labels": labels[None],
            "spacing": torch.full((3,), 320.0 / resolution), "case_id": f"testing-{seed}-{index:03d}"}


def make_batch(batch_size: int = 2, *, views: Sequence[float] = (0.0, 90.0), resolution: int = 16,
               image_size: int | None = None, hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
               geometry: str = "parallel", seed: int = 0) -> dict:
    """A batch as the trainer sees it: :func:`make_case` items collated by the default data loader."""
    return default_collate([make_case(i, views=views, resolution=resolution, image_size=image_size,
                                      hu_window=hu_window, geometry=geometry, seed=seed)
                            for i in range(batch_size)])


def _noisy(target: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (target + scale * torch.randn(target.shape, generator=g)).clamp(0, 1)


def _slice(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    if isinstance(batch, dict):
        return {k: _slice(v, i) for k, v in batch.items()}
    if isinstance(batch, list):
        return batch[i:i + 1]
    return batch


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return copy.deepcopy(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
