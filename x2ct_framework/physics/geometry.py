"""View geometry as a dict of tensors (collatable by the default data loader).

Keys, each ``[V]`` per case and ``[B, V]`` in a batch:
- ``angles``: gantry angle in degrees;
- ``volume_mm``: ``[V, 3]`` physical size of the volume along (x, y, z) in mm;
- ``detector_mm``: ``[V, 2]`` physical size of the detector (width u, height v) in mm at the detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RecipeError, did_you_mean

GEOMETRY_PRESETS: dict[str, dict] = {
    "parallel": {"kind": "parallel"},
}


def make_geometry(views: Sequence[float], preset: str | dict = "parallel", volume_mm: float = 320.0,
                  detector_mm: float | None = None) -> dict[str, torch.Tensor]:
    """Geometry dict for one case: one entry per view angle."""
    if isinstance(preset, str) and preset not in GEOMETRY_PRESETS:
        raise RecipeError([f"unknown geometry preset {preset!r}{did_you_mean(preset, GEOMETRY_PRESETS)} "
                           f"(available: {', '.join(GEOMETRY_PRESETS)})"])
    v = len(views)
    det = float(detector_mm if detector_mm is not None else volume_mm)
    return {
        "angles": torch.tensor([float(a) for a in views], dtype=torch.float32),
        "volume_mm": torch.full((v, 3), float(volume_mm)),
        "detector_mm": torch.full((v, 2), det),
    }


def num_views(geometry: dict[str, torch.Tensor]) -> int:
    return int(geometry["angles"].shape[-1])
