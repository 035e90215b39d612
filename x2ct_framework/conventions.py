"""The project's conventions, in one place: intensity window, label codes, slicing planes.

Every module and plugin that needs one of these imports it from here, so a convention changes in one
line. All are part of the plugin API (``from x2ct_framework.conventions import ...``).

- **Intensity.** A CT in Hounsfield units is clipped to a window ``[lo, hi]`` and scaled linearly to
  [0, 1] (:func:`hu_to_unit`); :func:`unit_to_hu` is the inverse. The default window is the user's
  plan's range, [-1000, 3000] HU.
- **Label codes.** The structure label map that the synthetic phantom writes, and that datasets pass
  as ``batch["labels"]``: 0 background, 1 soft tissue, 2 lung, 3 bone, 4 vessel, 5 heart, 6 fat,
  7 air inside the body, 8 scanner table. Label maps from other tools are remapped to these codes.
- **Planes.** A volume ``[D, H, W]`` is sliced along D (axial), H (coronal) and W (sagittal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_HU_WINDOW: tuple[float, float] = (-1000.0, 3000.0)

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "soft_tissue",
    2: "lung",
    3: "bone",
    4: "vessel",
    5: "heart",
    6: "fat",
    7: "air",  # air inside the body: trachea, bronchi, stomach gas
    8: "table",
}
BACKGROUND, SOFT, LUNG, BONE, VESSEL, HEART, FAT, AIR, TABLE = range(9)
# The structures that per-structure metrics score, by label code.
STRUCTURE_LABELS: dict[str, int] = {"lung": LUNG, "bone": BONE, "vessel": VESSEL}
# Label values outside the patient (the body mask leaves them out).
NOT_BODY_LABELS: tuple[int, ...] = (TABLE,)

PLANES: tuple[str, str, str] = ("axial", "coronal", "sagittal")  # slicing along D, H, W


def hu_to_unit(hu: Any, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> Any:
    """HU -> [0, 1]: clip to the window, then scale linearly (torch tensors and NumPy arrays)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return (hu.clip(lo, hi) - lo) / (hi - lo)


def unit_to_hu(x01: Any, hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> Any:
    """[0, 1] -> HU, the inverse of :func:`hu_to_unit` inside the window."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return x01 * (hi - lo) + lo
