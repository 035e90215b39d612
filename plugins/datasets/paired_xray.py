"""``paired_xray``: real X-ray images with a per-case geometry file, with or without a CT.

Layout: ``root/<case>/`` holds the X-ray images (PNG/JPEG/TIFF, DICOM, NIfTI, .npy; read by
``x2ct_framework.io.read_xray``) and ``geometry.toml`` or ``geometry.json`` in the format of
``x2ct predict``: ``views`` (gantry angles, one per image), optionally ``files`` (the images in view
order; else the images sorted by name), ``preset`` and any ``make_geometry`` option (``sid``, ``sdd``,
``detector_mm``, ...), plus ``ct`` (a CT file or DICOM folder in the case folder) when the case has
one. A ``geometry.toml`` in ``root`` itself applies to every case that has none.

Images are resized to ``image_size`` (the detector's physical size stays ``detector_mm``, so the
projector and the model see the same rays). With CTs the items carry ``ct`` for training and
evaluation (and ``affine``, the world frame of the CT's grid: ``x2ct predict`` writes such a case
in it); without, they are inputs for inference only. ``crop``, ``hu_offset`` and ``check_hu`` as in
``ct_folder``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import DataError, RecipeError, X2CTError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, NIFTI_SUFFIXES, read_xray
from x2ct_framework.physics import from_stored, make_geometry
from x2ct_framework.physics.geometry import check_orientation
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (SPLITS, bad_case, check_split, empty_split_error, hu_to_unit,
                                           read_list_file, read_split_file, seeded_split)
from x2ct_framework.io import CROPS, load_grid_ct

GEOMETRY_FILES = ("geometry.toml", "geometry.json")
IMAGE_TYPES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + (".npy",)
GEOMETRY_KEYS = ("views", "angles", "files", "ct", "preset", "volume_mm", "detector_mm", "detector_px", "sid", "sdd",
                 "detector_offset_mm")


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text()) if path.suffix.lower() == ".json" else tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid geometry file ({exc})") from exc
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a table of geometry keys (views, preset, files, ct, ...)")
    unknown = [k for k in spec if k not in GEOMETRY_KEYS]
    if unknown:
        raise DataError(f"{path}: unknown geometry key(s) {', '.join(map(repr, unknown))} "
                        f"(accepted: {', '.join(GEOMETRY_KEYS)})")
    return spec


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and (name.endswith(".nii.gz")
                                                             or path.suffix.lower() in IMAGE_TYPES)


class PairedXrayDataset(Dataset):
    """Per-case X-ray images and geometry from ``root``, optionally with the case's CT as the target.

    ``views`` (when given) must match each case's angles (within ``angle_tolerance`` degrees);
    ``geometry`` is the preset used when a geometry file names none. Splits as in ``ct_folder``.
    ``orientation`` (one code per view, see ``physics.ORIENTATIONS``) says how each stored image is
    flipped or turned relative to the detector frame; it is undone when the image is read. With a CT
    for every case, training first checks the images against the CT's DRRs (``check_geometry``:
    "warn" by default for real radiographs, "error", "off"; ``x2ct check-data`` shows the table).
    """

    def __init__(self, *, split: str, stage: Stage, root: str, views: list[float] = (),
                 geometry: str | dict = "parallel",
                 hu_window: list[float] = DEFAULT_HU_WINDOW, image_size: int = 0, volume_mm: float = 320.0,
                 normalize: str = "auto", require_ct: bool = False, splits: str = "",
                 split_fractions: list[float] = (0.8, 0.1, 0.1), seed: int = 0, angle_tolerance: float = 1.0,
                 on_bad_case: str = "error", pad_hu: float = -1024.0, orientation: list[str] = (),
                 check_geometry: str = "warn", crop: str = "centre", hu_offset: float = 0.0, check_hu: bool = True):
        check_split(split)
        self.orientation = [check_orientation(o, f"data.orientation[{i}]") for i, o in enumerate(orientation)]
        if check_geometry not in ("error", "warn", "off"):
            raise ValueError(f"check_geometry must be 'error', 'warn' or 'off', got {check_geometry!r}")
        if on_bad_case not in ("error", "skip"):
            raise ValueError(f"on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
        if len(hu_window) != 2 or not float(hu_window[0]) < float(hu_window[1]):
            raise ValueError(f"hu_window: expected [low, high] with low < high, got {list(hu_window)}")
        self.split, self.stage = split, stage
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: X-ray folder not found (data.root of paired_xray)")
        self.views = [float(v) for v in views]
        self.geometry_option = geometry
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.image_size = image_size or stage.resolution
        self.volume_mm = float(volume_mm)
        self.normalize = normalize
        self.on_bad_case = on_bad_case
        self.pad_hu = float(pad_hu)
        self.tolerance = float(angle_tolerance)
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
        self.crop, self.hu_offset, self.check_hu = crop, float(hu_offset), bool(check_hu)
        shared = next((self.root / n for n in GEOMETRY_FILES if (self.root / n).is_file()), None)
        self.shared_spec = _read_spec(shared) if shared is not None else None
        self.shared_source = str(shared) if shared is not None else ""

        folders = {p.name: p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        if not folders:
            raise DataError(f"{self.root}: no case folders (expected one folder per case with its X-ray images and "
                            f"a geometry.toml)")
        if splits:
            names, source = read_split_file(Path(splits).expanduser()).get(split, []), splits
        elif any((self.root / f"{s}.txt").is_file() for s in SPLITS):
            path = self.root / f"{split}.txt"
            names, source = (read_list_file(path) if path.is_file() else []), str(path)
        else:
            names, source = seeded_split(list(folders), split_fractions, seed)[split], f"{self.root} (seeded split)"
        missing = [n for n in names if n not in folders]
        if missing:
            raise DataError(f"{source}: case(s) not found in {self.root}: {', '.join(missing[:5])}")
        self.cases = []
        for name in names:
            try:
                self.cases.append(self._case(name, folders[name]))
            except DataError as exc:
                bad_case(on_bad_case, str(exc))
        if not self.cases:
            raise empty_split_error(split, source)
        with_ct = [c for c in self.cases if c["ct"] is not None]
        if require_ct or (with_ct and len(with_ct) < len(self.cases)):
            for c in [c for c in self.cases if c["ct"] is None]:
                bad_case(on_bad_case, f"{c['folder']}: no CT for case {c['name']!r} (set ct = \"file\" in its geometry "
                                      f"file); every case of a split needs one when any has one or require_ct is set")
            self.cases = [c for c in self.cases if c["ct"] is not None]
            if not self.cases:
                raise empty_split_error(split, source)
        counts = {len(c["files"]) for c in self.cases}
        if len(counts) > 1:
            raise DataError(f"{self.root}: cases have different numbers of views ({sorted(counts)}); a batch needs "
                            f"the same number")
        if self.orientation and len(self.orientation) != next(iter(counts)):
            raise RecipeError([f"data.orientation: {len(self.orientation)} orientation(s) for {next(iter(counts))} "
                               f"views; give one per view (identity, fliplr, flipud, rot180, ...)"])
        # stored X-rays beside a CT: training checks them against the CT's DRRs first (x2ct_framework.datacheck)
        self.stores_xrays = True
        self.geometry_check = check_geometry if all(c["ct"] is not None for c in self.cases) else "off"

    def _case(self, name: str, folder: Path) -> dict:
        spec_path = next((folder / n for n in GEOMETRY_FILES if (folder / n).is_file()), None)
        if spec_path is not None:
            spec, where = _read_spec(spec_path), str(spec_path)
        elif self.shared_spec is not None:
            spec, where = dict(self.shared_spec), self.shared_source
        else:
            raise DataError(f"{folder}: no geometry.toml or geometry.json (views, preset, ...) for case {name!r}")
        spec = dict(spec)
        angles = spec.pop("views", spec.pop("angles", None))
        if not isinstance(angles, list) or not angles:
            raise DataError(f"{where}: expected views = [angle, ...], one gantry angle per image")
        angles = [float(a) for a in angles]
        if self.views and (len(angles) != len(self.views) or any(abs(a - b) > self.tolerance
                                                                 for a, b in zip(angles, self.views))):
            raise DataError(f"{where}: views {angles} differ from the recipe's views {self.views}")
        files = spec.pop("files", None)
        ct = spec.pop("ct", None)
        preset = spec.pop("preset", self.geometry_option)
        spec.setdefault("volume_mm", self.volume_mm)
        try:
            geometry = make_geometry(angles, preset, **spec)
        except X2CTError as exc:
            raise DataError(f"{where}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: the geometry was rejected: {exc}") from exc
        if files:
            paths = [folder / f for f in files]
        else:
            paths = sorted(p for p in folder.iterdir() if _is_image(p) and p.name != ct)
        lost = [str(p) for p in paths if not p.exists()]
        if lost:
            raise DataError(f"{where}: image file(s) not found: {', '.join(lost)}")
        if len(paths) != len(angles):
            raise DataError(f"{where}: {len(paths)} image(s) for {len(angles)} view angle(s); expected one per view")
        ct_path = folder / ct if ct else None
        if ct_path is not None and not ct_path.exists():
            raise DataError(f"{where}: ct = {ct!r} not found in {folder}")
        return {"name": name, "folder": folder, "files": paths, "ct": ct_path, "geometry": geometry}

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.cases):
            raise IndexError(f"case {i} of a {len(self.cases)}-case {self.split} split")
        case = self.cases[i]
        images = []
        for v, path in enumerate(case["files"]):
            img = read_xray(path, normalize=self.normalize)[None]
            if self.orientation:  # the stored image's orientation undone: the detector frame
                img = from_stored(img, self.orientation[v])
            mode = "area" if min(img.shape[-2:]) >= self.image_size else "bilinear"
            images.append(F.interpolate(img, size=(self.image_size, self.image_size), mode=mode)[0].clamp(0, 1))
        r = self.stage.resolution
        volume_mm = float(case["geometry"]["volume_mm"][0, 0])
        item = {"xrays": torch.stack(images), "geometry": case["geometry"],
                "spacing": torch.full((3,), volume_mm / r), "case_id": case["name"]}
        if case["ct"] is not None:
            grid = load_grid_ct(case["ct"], None, r, volume_mm, self.pad_hu, self.crop, self.hu_offset, self.check_hu)
            item["ct"] = hu_to_unit(grid.hu, self.hu_window)[None]
            item["affine"] = torch.as_tensor(grid.affine, dtype=torch.float64)  # the CT's world frame
        return item


@hookimpl
def register_datasets(register):
    register("paired_xray", PairedXrayDataset)
