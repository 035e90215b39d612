"""Label maps from other tools, remapped to the framework's codes (``x2ct_framework.conventions``).

A recipe names the source of its label maps with ``[data] labels``:

- ``"framework"`` (the default): the maps already use the framework's codes (0 background, 1 soft
  tissue, 2 lung, 3 bone, 4 vessel, 5 heart, 6 fat, 7 air in the body, 8 table);
- ``"totalsegmentator"``: TotalSegmentator v2 maps of its ``total`` task (117 classes, ids as in
  ``totalsegmentator/map_to_binary.py``, ``class_map["total"]``), grouped into lung, bone, vessel,
  heart, air (trachea) and soft tissue (every other class);
- a table: ``labels = { map = { "10-14" = "lung", "25-50" = "bone", "52" = "vessel" }, other =
  "soft_tissue", fill_body = true }``, optionally ``preset = "totalsegmentator"`` to change a few
  ids of a preset. Keys are source ids or ranges ``"a-b"``; values framework code names or numbers.

Ids not in the table go to ``other`` (default ``soft_tissue``; ``"background"`` drops them).
``fill_body`` (default on for TotalSegmentator, which labels organs but not fat, skin or unlisted
muscle) gives unlabelled voxels inside the body outline (HU above -500) the code fat (-190 to -30
HU) or soft tissue, so the body mask of the metrics covers the patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from x2ct_framework.conventions import BONE, FAT, HEART, LABEL_NAMES, LUNG, SOFT, VESSEL, AIR
from x2ct_framework.errors import RecipeError

BODY_HU = -500.0
FAT_HU = (-190.0, -30.0)
# Below this share of the body outline carrying a source label, the maps are reported as too sparse.
MIN_COVERAGE = 0.5

# TotalSegmentator v2, task "total": class ids grouped by the framework's codes.
TOTALSEGMENTATOR_GROUPS: dict[int, list[tuple[int, int]]] = {
    LUNG: [(10, 14)],                       # lung lobes
    AIR: [(16, 16)],                        # trachea
    BONE: [(25, 50), (69, 78), (91, 91), (92, 115), (116, 116)],  # sacrum, vertebrae S1-C1, limb girdles, skull,
                                            # ribs, sternum
    VESSEL: [(52, 60), (62, 68)],           # aorta, pulmonary vein, arch branches, brachiocephalic veins, venae
                                            # cavae, portal/splenic vein, iliac arteries and veins
    HEART: [(51, 51), (61, 61)],            # heart, left atrial appendage
}
TOTALSEGMENTATOR_CLASSES = 117
CODE_BY_NAME = {name: code for code, name in LABEL_NAMES.items()}


@dataclass
class LabelMapping:
    """Source id -> framework code, as a look-up table."""

    name: str
    table: dict[int, int] = field(default_factory=dict)
    other: int = SOFT
    fill_body: bool = False
    identity: bool = False
    description: str = ""

    def lut(self, max_id: int) -> np.ndarray:
        size = max(max_id, max(self.table, default=0)) + 1
        lut = np.full(size, self.other, dtype=np.uint8)
        lut[0] = 0
        for src, code in self.table.items():
            lut[src] = code
        return lut

    def apply(self, labels: torch.Tensor, hu: torch.Tensor | None = None) -> torch.Tensor:
        """Framework codes (uint8) for a source label map (and its CT in HU for ``fill_body``)."""
        src = labels.long()
        if int(src.min()) < 0:
            raise ValueError(f"negative label ids in the label map ({int(src.min())})")
        if self.identity:
            bad = int(src.max()) > max(LABEL_NAMES)
            if bad:
                raise ValueError(f"label id {int(src.max())} is not a framework code (0-{max(LABEL_NAMES)}); set "
                                 f"data.labels to the tool that made the maps (e.g. \"totalsegmentator\") or a table")
            out = src.to(torch.uint8)
        else:
            lut = torch.from_numpy(self.lut(int(src.max())))
            out = lut[src]
        if self.fill_body and hu is not None:
            inside = (src == 0) & (hu > BODY_HU)
            fat = inside & (hu >= FAT_HU[0]) & (hu <= FAT_HU[1])
            out = torch.where(inside, torch.full_like(out, SOFT), out)
            out = torch.where(fat, torch.full_like(out, FAT), out)
        return out

    def summary(self) -> dict[str, Any]:
        groups: dict[str, list[int]] = {}
        for src, code in sorted(self.table.items()):
            groups.setdefault(LABEL_NAMES[code], []).append(src)
        return {"name": self.name, "description": self.description,
                "groups": {k: _ranges(v) for k, v in groups.items()}, "other": LABEL_NAMES[self.other],
                "fill_body": self.fill_body, "identity": self.identity}


def _ranges(ids: list[int]) -> str:
    out, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def _code(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise RecipeError(f"{where}: expected a framework label name or code, got {value!r}")
    if isinstance(value, int) and value in LABEL_NAMES:
        return value
    if isinstance(value, str) and value in CODE_BY_NAME:
        return CODE_BY_NAME[value]
    raise RecipeError(f"{where}: expected one of {', '.join(CODE_BY_NAME)} (or 0-{max(LABEL_NAMES)}), got {value!r}")


def _ids(key: str, where: str) -> range:
    try:
        if "-" in key.strip("-"):
            a, b = key.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(key)
    except ValueError:
        raise RecipeError(f"{where}: expected a source id or a range \"a-b\", got {key!r}") from None
    if lo < 1 or hi < lo:
        raise RecipeError(f"{where}: expected positive ids with a <= b, got {key!r}")
    return range(lo, hi + 1)


def totalsegmentator() -> LabelMapping:
    table = {}
    for code, spans in TOTALSEGMENTATOR_GROUPS.items():
        for lo, hi in spans:
            table.update({i: code for i in range(lo, hi + 1)})
    for i in range(1, TOTALSEGMENTATOR_CLASSES + 1):
        table.setdefault(i, SOFT)
    return LabelMapping("totalsegmentator", table, SOFT, fill_body=True,
                        description="TotalSegmentator v2 'total' task (117 classes): lung lobes 10-14 -> lung, "
                                    "trachea 16 -> air, vertebrae/sacrum/ribs/sternum/skull/limb girdles -> bone, "
                                    "great vessels 52-60 and 62-68 -> vessel, heart 51 and atrial appendage 61 -> "
                                    "heart, other classes -> soft tissue")


PRESETS = {"framework": None, "totalsegmentator": totalsegmentator}


def label_mapping(option: Any = "", where: str = "data.labels") -> LabelMapping:
    """The mapping a recipe's ``labels`` option names (see the module docstring)."""
    if option in ("", None, "framework"):
        return LabelMapping("framework", identity=True, other=SOFT,
                            description="the framework's own codes (x2ct_framework.conventions.LABEL_NAMES)")
    if isinstance(option, str):
        if option not in PRESETS:
            raise RecipeError(f"{where}: unknown label preset {option!r} (available: {', '.join(PRESETS)}, or a table "
                              f"map = {{ \"id\" = \"lung\", ... }})")
        return PRESETS[option]()
    if not isinstance(option, dict):
        raise RecipeError(f"{where}: expected a preset name or a table, got {option!r}")
    unknown = [k for k in option if k not in ("preset", "map", "other", "fill_body")]
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)} (accepted: preset, map, other, fill_body)")
    base = option.get("preset", "")
    mapping = label_mapping(base, f"{where}.preset") if base else LabelMapping("custom")
    if mapping.identity:
        mapping = LabelMapping("custom", table={c: c for c in LABEL_NAMES if c}, other=SOFT)
    table = dict(mapping.table)
    entries = option.get("map", {})
    if not isinstance(entries, dict):
        raise RecipeError(f"{where}.map: expected a table of source id -> framework label, got {entries!r}")
    for key, value in entries.items():
        code = _code(value, f"{where}.map.{key}")
        table.update({i: code for i in _ids(str(key), f"{where}.map.{key}")})
    other = _code(option.get("other", LABEL_NAMES[mapping.other]), f"{where}.other")
    fill = option.get("fill_body", mapping.fill_body)
    if not isinstance(fill, bool):
        raise RecipeError(f"{where}.fill_body: expected true or false, got {fill!r}")
    name = f"{base} (changed)" if base else "custom"
    desc = (mapping.description + "; changed by the recipe" if base else "a table in the recipe")
    return LabelMapping(name, table, other, fill_body=fill, description=desc)


def coverage(source_labels: torch.Tensor, hu: torch.Tensor) -> float:
    """Share of the body outline (HU above -500) that carries a non-zero source label."""
    body = hu > BODY_HU
    n = int(body.sum())
    return float(((source_labels > 0) & body).sum()) / n if n else 1.0
