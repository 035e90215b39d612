"""Pieces shared by the dataset plugins: splits, HU windows, cropping, DRR rendering and a disk cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from x2ct_framework.conventions import hu_to_unit  # noqa: F401 (the dataset plugins import it from here)
from x2ct_framework.errors import DataError
from x2ct_framework.physics import drr, geometry_fingerprint, make_geometry, resolve_preset

log = logging.getLogger("x2ct_plugins.datasets")

SPLITS = ("train", "val", "test")
BAD_CASE_POLICIES = ("error", "skip")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def check_common(views: Sequence[float], hu_window: Sequence[float], geometry, on_bad_case: str | None = None) -> None:
    """Validate the options every DRR-rendering dataset shares (raises ValueError/RecipeError)."""
    if len(views) < 1:
        raise ValueError("views: expected at least one gantry angle")
    if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
        raise ValueError(f"hu_window: expected [low, high] with low < high, got {list(hu_window)}")
    resolve_preset(geometry)
    if on_bad_case is not None and on_bad_case not in BAD_CASE_POLICIES:
        raise ValueError(f"on_bad_case must be one of {list(BAD_CASE_POLICIES)}, got {on_bad_case!r}")


def crop_or_pad(vol: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """Centre crop or pad the last three axes of ``vol`` to ``shape``."""
    out = vol
    for axis, target in zip(range(-3, 0), shape):
        n = out.shape[axis]
        if n > target:
            start = (n - target) // 2
            out = out.narrow(axis, start, target)
        elif n < target:
            lo = (target - n) // 2
            pads = [0, 0] * 3
            pads[2 * (-axis - 1)] = lo
            pads[2 * (-axis - 1) + 1] = target - n - lo
            out = F.pad(out, pads, value=value)
    return out


def resize_volume(vol: torch.Tensor, size: int | Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resize a ``[D, H, W]`` volume: area averaging when shrinking by whole factors, else trilinear; labels nearest."""
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    if tuple(vol.shape[-3:]) == size:
        return vol
    x = vol[None, None].float()
    if labels:
        return F.interpolate(x, size=size, mode="nearest")[0, 0].to(vol.dtype)
    if all(n % s == 0 for n, s in zip(vol.shape[-3:], size)):
        return F.adaptive_avg_pool3d(x, size)[0, 0]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)[0, 0]


def case_geometry(views: Sequence[float], geometry, volume_mm: float, jitter_deg: float = 0.0,
                  rng: random.Random | None = None) -> dict[str, torch.Tensor]:
    """The per-case geometry dict, with the gantry angles jittered by up to ``jitter_deg`` when asked."""
    angles = [float(v) for v in views]
    if jitter_deg and rng is not None:
        angles = [a + rng.uniform(-jitter_deg, jitter_deg) for a in angles]
    return make_geometry(angles, geometry, volume_mm=volume_mm)


def render_views(ct01: torch.Tensor, geometry: Mapping[str, torch.Tensor], hu_window: Sequence[float],
                 image_size: int, mu_water: float, beer_lambert: bool) -> torch.Tensor:
    """DRRs ``[V, 1, h, w]`` of one CT ``[1, D, H, W]`` in [0, 1]."""
    batched = {k: v[None] for k, v in geometry.items()}
    with torch.no_grad():
        out = drr(ct01[None].float(), batched, (float(hu_window[0]), float(hu_window[1])),
                  det_shape=(image_size, image_size), mu_water=mu_water, beer_lambert=beer_lambert)
    return out[0]


class DiskCache:
    """Tensors saved under a hashed key (atomic writes); a damaged entry is rebuilt, never fatal."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.pt"

    def get(self, kind: str, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:
            log.warning("damaged cache entry %s (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.folder is None:
            return
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        tmp.replace(path)


def drr_key(case: str, geometry: Mapping[str, torch.Tensor], resolution: int, image_size: int,
            hu_window: Sequence[float], mu_water: float, beer_lambert: bool) -> str:
    return DiskCache.key("drr", case, geometry_fingerprint(geometry), resolution, image_size,
                         [float(h) for h in hu_window], mu_water, beer_lambert)


def seeded_split(names: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``names`` with ``seed`` and cut them by ``fractions`` (train, val, test)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions: expected three non-negative numbers (train, val, test), "
                         f"got {list(fractions)}")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    total = float(sum(fractions))
    n = len(order)
    n_train = int(round(n * fractions[0] / total))
    n_val = int(round(n * fractions[1] / total))
    if fractions[1] > 0 and n_val == 0 and n - n_train > 1:
        n_val = 1
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def read_split_file(path: Path) -> dict[str, list[str]]:
    """A JSON or TOML table ``{train = [...], val = [...], test = [...]}`` of case names."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid split file ({exc}); expected a table train/val/test of case names")
    if not isinstance(data, dict) or not set(data) <= set(SPLITS) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()):
        raise DataError(f"{path}: expected a table with keys among {', '.join(SPLITS)}, each a list of case names")
    return {k: list(v) for k, v in data.items()}


def read_list_file(path: Path) -> list[str]:
    """Case names, one a line (blank lines and # comments ignored)."""
    if not path.is_file():
        raise DataError(f"{path}: case list not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def empty_split_error(split: str, source: str) -> DataError:
    return DataError(f"{source}: the {split} split is empty; add cases to it or change the split settings")


def bad_case(policy: str, message: str) -> None:
    """Raise a DataError, or warn and let the caller skip the case."""
    if policy == "error":
        raise DataError(message + ' (set on_bad_case = "skip" to skip such cases with a warning)')
    log.warning("skipping a bad case: %s", message)


class CaseListDataset(Dataset):
    """A dataset over ``self.cases`` read by ``self._item(j)``; an unreadable case is skipped (with a
    warning, when ``on_bad_case = "skip"``) and the next readable one served in its place."""

    cases: list
    bad: set
    on_bad_case: str
    split: str
    root: Path

    def _item(self, j: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.cases):
            raise IndexError(f"case {i} of a {len(self.cases)}-case {self.split} split")
        for step in range(len(self.cases)):
            j = (i + step) % len(self.cases)
            if j in self.bad:
                continue
            try:
                return self._item(j)
            except DataError as exc:
                bad_case(self.on_bad_case, str(exc))
                self.bad.add(j)
        raise DataError(f"{self.root}: every case of the {self.split} split is unreadable")
