"""``synthetic_phantom``: seeded chest-like phantoms with DRR views rendered by the projector."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.physics import drr, make_geometry
from x2ct_framework.stage import Stage

SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}


def _ellipsoid(z, y, x, c, r):
    return (((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2) <= 1.0


def phantom_hu(resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small chest phantom in HU [D, H, W] and its label map (0 air, 1 soft, 2 lung, 3 bone, 4 vessel)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=g))  # noqa: E731
    ax = torch.linspace(-1, 1, resolution)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    hu = torch.full((resolution,) * 3, -1000.0)
    labels = torch.zeros((resolution,) * 3, dtype=torch.uint8)
    body = _ellipsoid(z, y, x, (0, r(-0.05, 0.05), 0), (1.3, r(0.6, 0.7), r(0.8, 0.9)))
    hu[body], labels[body] = 40.0, 1
    for side in (-1, 1):
        lung = _ellipsoid(z, y, x, (r(-0.1, 0.1), 0.0, side * r(0.35, 0.45)), (0.8, r(0.4, 0.5), r(0.25, 0.32)))
        hu[lung], labels[lung] = -850.0, 2
    spine = ((y - 0.45) ** 2 + x**2 <= r(0.08, 0.11) ** 2) & body
    hu[spine], labels[spine] = 700.0, 3
    aorta = ((y - 0.2) ** 2 + (x + 0.08) ** 2 <= r(0.04, 0.06) ** 2) & body
    hu[aorta], labels[aorta] = 350.0, 4
    return hu, labels


class SyntheticPhantomDataset(Dataset):
    """Phantom CTs and their DRRs at ``views``; case ``i`` of a split is the same on every call."""

    def __init__(self, *, split: str, stage: Stage, views: list[float] = (0.0, 90.0), geometry: str = "parallel",
                 hu_window: list[float] = (-1000.0, 3000.0), num_train: int = 16, num_val: int = 4,
                 num_test: int = 4, seed: int = 0, image_size: int = 0, volume_mm: float = 320.0):
        if split not in SPLIT_OFFSET:
            raise ValueError(f"split must be one of {list(SPLIT_OFFSET)}, got {split!r}")
        if len(views) < 1:
            raise ValueError("views: expected at least one view angle")
        self.split, self.stage = split, stage
        self.views = [float(v) for v in views]
        self.geometry_preset = geometry
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.size = {"train": num_train, "val": num_val, "test": num_test}[split]
        if self.size < 1:
            raise ValueError(f"num_{split} must be at least 1 for the {split} split")
        self.seed = seed
        self.image_size = image_size or stage.resolution
        self.volume_mm = volume_mm
        make_geometry(self.views, geometry, volume_mm)  # fail early on a bad preset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        case_seed = self.seed * 7919 + SPLIT_OFFSET[self.split] + i
        hu, labels = phantom_hu(self.stage.resolution, case_seed)
        lo, hi = self.hu_window
        ct = ((hu.clamp(lo, hi) - lo) / (hi - lo))[None]
        geometry = make_geometry(self.views, self.geometry_preset, self.volume_mm)
        batched = {k: v[None] for k, v in geometry.items()}
        xrays = drr(ct[None], batched, self.hu_window, det_shape=(self.image_size, self.image_size))[0]
        spacing = torch.full((3,), self.volume_mm / self.stage.resolution)
        return {"xrays": xrays, "geometry": geometry, "ct": ct, "labels": labels[None], "spacing": spacing,
                "case_id": f"phantom-{self.split}-{i:04d}"}


@hookimpl
def register_datasets(register):
    register("synthetic_phantom", SyntheticPhantomDataset)
