"""The project's conventions, in one place: intensity window, label codes, slicing planes.

Every module and plugin that needs one of these imports it from here, so a convention changes in one
line. All are part of the plugin API (``from x2ct_framework.conventions import ...``).

- **Intensity.** A CT in Hounsfield units is clipped to a window ``[lo, hi]`` and scaled linearly to
  [0, 1] (:func:`hu_to_unit`); :func:`unit_to_hu` is the inverse. The default window is the user's
  plan's range, [-1000, 3000] HU.
- **Label codes.** The structure label map that the synthetic phantom writes, and that datasets pass
  as ``batch["labels"]``: 0 background, 1 soft tissue, 2 lung, 3 bone, 4 vessel, 5 heart, 6 fat,
  7 air inside the body, 8 scanner table, 9 pulmonary embolus (a clot in a contrast-filled artery).
  Label maps from other tools are remapped to these codes. Version 2 of the phantom also writes finer
  parts (``PART_NAMES``), each inside one of these codes (``PART_TO_LABEL``).
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
    9: "embolus",  # a filling defect (clot) in a contrast-filled pulmonary artery
}
BACKGROUND, SOFT, LUNG, BONE, VESSEL, HEART, FAT, AIR, TABLE, EMBOLUS = range(10)
# The structures that per-structure metrics score, by label code.
STRUCTURE_LABELS: dict[str, int] = {"lung": LUNG, "bone": BONE, "vessel": VESSEL}

# Finer parts that version 2 of the phantom also writes (``chest_phantom(..., parts=True)``). Codes 0-8 mean
# what the coarse codes mean; each finer part belongs to one coarse code (PART_TO_LABEL), so a part map
# turns into the coarse label map by a lookup and every coarse group (bone = spine + ribs + ...,
# vessel = every contrast-filled vessel, heart = myocardium + cardiac blood pools) stays whole.
PART_NAMES: dict[int, str] = {
    0: "background", 1: "soft_tissue", 2: "lung", 6: "fat", 7: "air", 8: "table",
    10: "spine", 11: "rib", 12: "sternum", 13: "clavicle", 14: "scapula", 15: "arm_bone",
    16: "costal_cartilage", 17: "airway_wall",
    20: "myocardium", 21: "blood_right_heart", 22: "blood_left_heart",
    30: "aorta", 31: "pulmonary_trunk", 32: "venae_cavae", 33: "lung_artery", 34: "lung_vein",
    40: "liver", 41: "spleen", 42: "stomach", 43: "kidney", 50: "embolus",
}
(P_BACKGROUND, P_SOFT, P_LUNG, P_FAT, P_AIR, P_TABLE) = (0, 1, 2, 6, 7, 8)
P_SPINE, P_RIB, P_STERNUM, P_CLAVICLE, P_SCAPULA, P_ARM_BONE, P_CARTILAGE, P_AIRWAY_WALL = range(10, 18)
P_MYOCARDIUM, P_BLOOD_RIGHT, P_BLOOD_LEFT = 20, 21, 22
P_AORTA, P_PULM_ARTERY, P_CAVA, P_LUNG_ARTERY, P_LUNG_VEIN = 30, 31, 32, 33, 34
P_LIVER, P_SPLEEN, P_STOMACH, P_KIDNEY = 40, 41, 42, 43
P_EMBOLUS = 50
PART_TO_LABEL: dict[int, int] = {
    0: BACKGROUND, 1: SOFT, 2: LUNG, 6: FAT, 7: AIR, 8: TABLE,
    10: BONE, 11: BONE, 12: BONE, 13: BONE, 14: BONE, 15: BONE, 16: SOFT, 17: SOFT,
    20: HEART, 21: HEART, 22: HEART,
    30: VESSEL, 31: VESSEL, 32: VESSEL, 33: VESSEL, 34: VESSEL,
    40: SOFT, 41: SOFT, 42: SOFT, 43: SOFT, 50: EMBOLUS,
}
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
