"""``ct_folder``: a folder of CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series) with DRRs rendered on the fly.

Each case is read with torchio, reoriented to the canonical orientation (``x2ct_framework.io``),
resampled to isotropic voxels of ``volume_mm / resolution`` (anti-aliased), centre-cropped or padded
with air to the stage resolution, optionally augmented (torchio, on the CT and its labels together,
before rendering, so views and target stay consistent), windowed to ``hu_window`` and projected.
Resampled volumes and un-augmented DRRs are cached on disk when ``cache_dir`` is set, keyed by the
file (path, size, time), the resolution, the field of view and the geometry.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from x2ct_framework.errors import DataError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.io import VOLUME_SUFFIXES, is_dicom, read_torchio, torchio_to_canonical
from x2ct_framework.physics import MU_WATER
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (CaseListDataset, DiskCache, bad_case, case_geometry, check_common,
                                           check_split, crop_or_pad, drr_key, empty_split_error, hu_to_unit,
                                           read_list_file, read_split_file, render_views, seeded_split)

log = logging.getLogger("x2ct_plugins.datasets.ct_folder")

CACHE_VERSION = 1
AUGMENTS = {
    "affine": "torchio.RandomAffine: degrees, scales, translation (mm), p",
    "elastic": "torchio.RandomElasticDeformation: num_control_points, max_displacement (mm), p",
    "noise": "torchio.RandomNoise on the CT: std (HU), p",
    "blur": "torchio.RandomBlur on the CT: std (mm), p",
    "flip": "torchio.RandomFlip: axes (e.g. ['LR']), flip_probability",
}


def case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return (path.is_file() and not name.startswith(".") and any(name.endswith(s) for s in VOLUME_SUFFIXES)
            and not name.endswith(".dcm"))


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.is_file() and is_dicom(p) for p in path.iterdir())


def build_augment(augment: dict):
    """A torchio Compose from ``{affine = {...}, elastic = {...}, noise = {...}, blur = {...}, flip = {...}}``."""
    import torchio as tio

    unknown = [k for k in augment if k not in AUGMENTS]
    if unknown:
        raise ValueError(f"augment: unknown transform(s) {unknown}; accepted: "
                         + "; ".join(f"{k} ({v})" for k, v in AUGMENTS.items()))
    parts = []
    for name, opts in augment.items():
        if not isinstance(opts, dict):
            raise ValueError(f"augment -> {name}: expected a table of options, got {opts!r}")
        opts = dict(opts)
        try:
            if name == "affine":
                parts.append(tio.RandomAffine(default_pad_value="minimum", **opts))
            elif name == "elastic":
                parts.append(tio.RandomElasticDeformation(**opts))
            elif name == "noise":
                std = opts.pop("std", 10.0)
                parts.append(tio.RandomNoise(std=(0.0, float(std)), **opts))
            elif name == "blur":
                parts.append(tio.RandomBlur(**opts))
            elif name == "flip":
                parts.append(tio.RandomFlip(**opts))
        except TypeError as exc:
            raise ValueError(f"augment -> {name}: {exc} ({AUGMENTS[name]})") from exc
    return tio.Compose(parts) if parts else None


class CTFolderDataset(CaseListDataset):
    """CT volumes from ``root`` and their DRRs at ``views``.

    Splits: ``splits`` names a JSON/TOML file ``{train = [...], val = [...], test = [...]}``; else
    ``train.txt``/``val.txt``/``test.txt`` in ``root`` are used when present; else the cases are split
    by ``split_fractions`` with ``seed``. Label maps are matched by case name, in ``labels_dir`` or
    beside the CTs as ``<name><label_suffix>.<ext>``. ``on_bad_case = "skip"`` skips an unreadable or
    malformed case with a warning instead of stopping.
    """

    def __init__(self, *, split: str, stage: Stage, root: str, views: list[float] = (0.0, 90.0),
                 geometry: str | dict = "x2ctgan", hu_window: list[float] = (-1000.0, 3000.0), image_size: int = 0,
                 volume_mm: float = 320.0, labels_dir: str = "", label_suffix: str = "", splits: str = "",
                 split_fractions: list[float] = (0.8, 0.1, 0.1), seed: int = 0, augment: dict | None = None,
                 augment_splits: list[str] = ("train",), cache_dir: str = "", on_bad_case: str = "error",
                 pad_hu: float = -1024.0, mu_water: float = MU_WATER, beer_lambert: bool = False):
        check_split(split)
        check_common(views, hu_window, geometry, on_bad_case)
        if volume_mm <= 0:
            raise ValueError(f"volume_mm must be positive, got {volume_mm}")
        self.split, self.stage = split, stage
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: CT folder not found (data.root of ct_folder)")
        self.views = [float(v) for v in views]
        self.geometry_option = geometry
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.image_size = image_size or stage.resolution
        self.volume_mm = float(volume_mm)
        self.on_bad_case = on_bad_case
        self.pad_hu = float(pad_hu)
        self.mu_water, self.beer_lambert = float(mu_water), beer_lambert
        self.cache = DiskCache(Path(cache_dir).expanduser() if cache_dir else None)
        transform = build_augment(augment or {})  # validated for every split
        self.augment = transform if split in augment_splits else None
        self.labels_dir = Path(labels_dir).expanduser() if labels_dir else None
        if self.labels_dir is not None and not self.labels_dir.is_dir():
            raise DataError(f"{self.labels_dir}: label folder not found (data.labels_dir of ct_folder)")
        self.label_suffix = label_suffix
        self.with_labels = self.labels_dir is not None or bool(label_suffix)
        case_geometry(self.views, geometry, self.volume_mm)  # fail early on a bad geometry

        found = self._discover()
        names, source = self._split_names(found, splits, split_fractions, seed)
        missing = [n for n in names if n not in found]
        if missing:
            raise DataError(f"{source}: {len(missing)} case(s) of the {split} split are not in {self.root}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.cases: list[tuple[str, Path, Path | None]] = []
        for name in names:
            entry = self._check_case(name, found[name])
            if entry is not None:
                self.cases.append(entry)
        if not self.cases:
            raise empty_split_error(split, source)
        self.bad: set[int] = set()

    # ---- discovery --------------------------------------------------------------------------
    def _discover(self) -> dict[str, Path]:
        skip = {p.resolve() for p in (self.labels_dir, self.cache.folder) if p is not None}
        found: dict[str, Path] = {}
        for path in sorted(self.root.iterdir()):
            if path.resolve() in skip or path.name.startswith("."):
                continue
            if _is_volume_file(path):
                name = case_name(path)
                if self.label_suffix and name.endswith(self.label_suffix):
                    continue
            elif _is_dicom_folder(path):
                name = path.name
            else:
                continue
            if name in found:
                raise DataError(f"{self.root}: two volumes for case {name!r}: {found[name].name} and {path.name}")
            found[name] = path
        if not found:
            raise DataError(f"{self.root}: no CT volumes found (expected NIfTI, NRRD, MHA/MHD files or DICOM "
                            f"series folders)")
        return found

    def _split_names(self, found: dict[str, Path], splits: str, fractions, seed: int) -> tuple[list[str], str]:
        if splits:
            path = Path(splits).expanduser()
            table = read_split_file(path)
            return table.get(self.split, []), str(path)
        lists = {s: self.root / f"{s}.txt" for s in ("train", "val", "test")}
        if any(p.is_file() for p in lists.values()):
            path = lists[self.split]
            return (read_list_file(path) if path.is_file() else []), str(path)
        return seeded_split(list(found), fractions, seed)[self.split], f"{self.root} (seeded split {list(fractions)})"

    def _label_path(self, name: str) -> Path | None:
        folder = self.labels_dir or self.root
        stem = name + self.label_suffix
        for suffix in VOLUME_SUFFIXES:
            cand = folder / f"{stem}{suffix}"
            if cand.is_file():
                return cand
        if self.labels_dir is not None and (folder / stem).is_dir():
            return folder / stem
        return None

    def _check_case(self, name: str, path: Path) -> tuple[str, Path, Path | None] | None:
        """Header-level check (cheap): readable, 3D, label map present. None when skipped."""
        label = None
        try:
            _check_header(path)
            if self.with_labels:
                label = self._label_path(name)
                if label is None:
                    where = self.labels_dir or self.root
                    raise DataError(f"{path}: no label map for case {name!r} in {where} "
                                    f"(expected {name}{self.label_suffix} with a volume suffix)")
                _check_header(label)
        except DataError as exc:
            bad_case(self.on_bad_case, str(exc))
            return None
        return name, path, label

    # ---- items (served by CaseListDataset.__getitem__, which skips bad cases) ----------------
    def _volume(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """HU ``[R, R, R]`` (and labels) at the stage resolution over ``volume_mm``, from the cache when there."""
        name, path, label_path = self.cases[j]
        r = self.stage.resolution
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (path, label_path) if p is not None
                 and p.is_file()]
        key = DiskCache.key("volume", CACHE_VERSION, str(path.resolve()), stats, r, self.volume_mm, self.pad_hu)
        cached = self.cache.get("volume", key)
        if cached is not None:
            return cached["hu"].float(), cached.get("labels")
        hu, labels = prepare_ct(path, label_path, r, self.volume_mm, self.pad_hu)
        value = {"hu": hu.to(torch.int16)}
        if labels is not None:
            value["labels"] = labels
        self.cache.put("volume", key, value)
        return hu, labels

    def _augment(self, hu: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        import torchio as tio

        spacing = self.volume_mm / self.stage.resolution
        affine = torch.diag(torch.tensor([-spacing, -spacing, -spacing, 1.0], dtype=torch.float64)).numpy()
        images = {"ct": tio.ScalarImage(tensor=hu.permute(2, 1, 0)[None].contiguous(), affine=affine)}
        if labels is not None:
            images["labels"] = tio.LabelMap(tensor=labels.permute(2, 1, 0)[None].contiguous(), affine=affine)
        out = self.augment(tio.Subject(**images))
        hu = torchio_to_canonical(out["ct"]).float()
        labels = torchio_to_canonical(out["labels"]).to(torch.uint8) if labels is not None else None
        return hu, labels

    def _item(self, j: int) -> dict:
        name, path, _ = self.cases[j]
        hu, labels = self._volume(j)
        if self.augment is not None:
            hu, labels = self._augment(hu, labels)
        ct = hu_to_unit(hu, self.hu_window)[None]
        geometry = case_geometry(self.views, self.geometry_option, self.volume_mm)
        xrays = None
        if self.augment is None:
            key = drr_key(str(path.resolve()), geometry, self.stage.resolution, self.image_size, self.hu_window,
                          self.mu_water, self.beer_lambert)
            cached = self.cache.get("drr", key)
            xrays = cached["xrays"] if cached is not None else None
        if xrays is None:
            xrays = render_views(ct, geometry, self.hu_window, self.image_size, self.mu_water, self.beer_lambert)
            if self.augment is None:
                self.cache.put("drr", key, {"xrays": xrays})
        item = {"xrays": xrays, "geometry": geometry, "ct": ct,
                "spacing": torch.full((3,), self.volume_mm / self.stage.resolution), "case_id": name}
        if labels is not None:
            item["labels"] = labels[None]
        return item


def _check_header(path: Path) -> None:
    """Read only the header: the file must open and hold a single-channel 3D image."""
    import SimpleITK as sitk

    if not path.exists():
        raise DataError(f"{path}: not found")
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise DataError(f"{path}: no DICOM series in this folder")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
            if len(files) < 2:
                raise DataError(f"{path}: the DICOM series has {len(files)} slice(s); expected a 3D series")
            return
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: could not read the volume header ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                        f"expected a NIfTI, NRRD, MHA/MHD file or a DICOM series folder") from exc
    size = [s for s in reader.GetSize() if s > 1]
    if len(size) != 3 or reader.GetNumberOfComponents() != 1:
        raise DataError(f"{path}: expected a single-channel 3D volume, got size {reader.GetSize()} with "
                        f"{reader.GetNumberOfComponents()} component(s)")


def prepare_ct(path: Path, label_path: Path | None, resolution: int, volume_mm: float,
               pad_hu: float = -1024.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a CT (and its label map), resample to ``volume_mm / resolution`` mm voxels (anti-aliased)
    and centre crop/pad to ``resolution^3``: ``(HU rounded to integers, labels uint8 or None)``."""
    import torchio as tio

    ct = read_torchio(path)
    images = {"ct": ct}
    if label_path is not None:
        lab = read_torchio(label_path, label=True)
        if tuple(lab.spatial_shape) != tuple(ct.spatial_shape) or not torch.allclose(
                torch.as_tensor(lab.affine), torch.as_tensor(ct.affine), atol=1e-2):
            raise DataError(f"{label_path}: the label map is on another grid than its CT {path} (shape "
                            f"{tuple(lab.spatial_shape)} vs {tuple(ct.spatial_shape)}, spacing "
                            f"{tuple(round(s, 3) for s in lab.spacing)} vs {tuple(round(s, 3) for s in ct.spacing)}); "
                            f"expected the same voxel grid")
        images["labels"] = lab
    r = resolution
    subject = tio.Resample(volume_mm / r, antialias=True)(tio.Subject(**images))
    hu = crop_or_pad(torchio_to_canonical(subject["ct"]).float(), (r, r, r), pad_hu).round()
    if not torch.isfinite(hu).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values")
    labels = None
    if label_path is not None:
        labels = crop_or_pad(torchio_to_canonical(subject["labels"]), (r, r, r), 0).to(torch.uint8)
    return hu, labels


@hookimpl
def register_datasets(register):
    register("ct_folder", CTFolderDataset)
