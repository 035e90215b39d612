"""``ct_folder``: a folder of CT volumes (NIfTI, NRRD, MHA/MHD, DICOM series at any depth) and their DRRs.

Each case is a volume file or a folder (a TCIA ``patient/study/series/*.dcm`` tree: its CT series is
found and checked by ``x2ct_framework.dicom``). It is read, reoriented to the canonical orientation
(``x2ct_framework.io``), resampled to isotropic voxels of ``volume_mm / resolution`` (anti-aliased),
cropped or padded with air to the stage resolution around the scan centre, the body or the lungs
(``crop``), optionally augmented (torchio, on the CT and its labels together, before rendering, so
views and target stay consistent), windowed to ``hu_window`` and projected. Image-space
augmentations (``noise``, ``intensity``: ``XRAY_AUGMENTS``) act on the cached X-rays and re-render
nothing; ``view_jitter`` re-renders the views from the cached volume at jittered angles (no re-read).

What discovery found is kept in a manifest, and resampled volumes and un-augmented DRRs in a
content-addressed cache (``x2ct_plugins.datasets._common.ArrayCache``), both under ``cache_dir``
(default ``~/.cache/x2ct``, see ``default_cache_dir``; ``cache = false`` turns it off). ``x2ct
prepare`` fills both ahead of training.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from x2ct_framework.conventions import DEFAULT_HU_WINDOW
from x2ct_framework.errors import DataError
from x2ct_framework.hookspecs import hookimpl
from x2ct_framework.io import CROPS, VOLUME_SUFFIXES, load_grid_ct, torchio_to_canonical
from x2ct_framework.labels import MIN_COVERAGE, coverage, label_mapping
from x2ct_framework.physics import MU_WATER
from x2ct_framework.stage import Stage
from x2ct_plugins.datasets._common import (STUDY_REDUCE, XRAY_AUGMENTS, ArrayCache, CaseListDataset, DiskCache,
                                           XrayAugment, XrayStyle,
                                           augment_seed, bad_case, case_geometry, check_common, check_split,
                                           check_split_overlap, empty_split_error, file_identity, hu_storage,
                                           hu_to_unit, read_list_file, read_split_file, render_views,
                                           rendered_key, resolve_cache_dir, seeded_split, series_identity, split_reuse,
                                           write_json_atomic)

log = logging.getLogger("x2ct_plugins.datasets.ct_folder")

CACHE_VERSION = 2
MANIFEST_VERSION = 2
# File names that mark a label map, not a CT (matched on the case name's words).
LABEL_WORDS = ("seg", "label", "labels", "mask", "segmentation", "labelmap")
AUGMENTS = {
    "affine": "torchio.RandomAffine: degrees, scales, translation (mm), p",
    "elastic": "torchio.RandomElasticDeformation: num_control_points, max_displacement (mm), p",
    "ct_noise": "torchio.RandomNoise on the CT (and so on its views and target): std (HU), p",
    "blur": "torchio.RandomBlur on the CT: std (mm), p",
    "flip": "torchio.RandomFlip: axes (e.g. ['LR']), flip_probability",
}
VIEW_JITTER = "gantry angles jittered by up to degrees (re-renders from the cached volume), p"
STYLE = ("X-ray style randomisation: ranges of kvp, mas, spr, scatter_sigma_mm, grid, focal_spot_mm, "
         "detector_blur_mm, electronic_noise, gamma, unsharp_amount, unsharp_sigma_mm, equalize, heel, filter_cu_mm "
         "drawn per item and applied to the cached material line integrals (no re-render)")


def case_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_volume_name(name: str) -> bool:
    name = name.lower()
    return not name.startswith(".") and any(name.endswith(s) for s in VOLUME_SUFFIXES) and not name.endswith(".dcm")


def _below(path: Path, folder: Path) -> bool:
    """``path`` names something below ``folder`` (by name: links the user put in data.root are followed)."""
    p, root = Path(os.path.normpath(os.path.abspath(path))), Path(os.path.normpath(os.path.abspath(folder)))
    return p == root or root in p.parents


def _is_volume_file(path: Path) -> bool:
    return _is_volume_name(path.name) and path.is_file()


def _walk(folder: Path, skip: set[str]):
    """``(directory, file names)`` of ``folder`` and every directory below it, in path order; hidden
    directories and those in ``skip`` (resolved paths: labels_dir, the cache) are not entered."""
    for sub, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and str(Path(sub, d).resolve()) not in skip)
        yield sub, sorted(files)


def _volume_files(folder: Path, skip: set[str]) -> list[Path]:
    """Volume files (NIfTI, NRRD, MHA/MHD) at any depth below ``folder``, in path order (see :func:`_walk`)."""
    return [Path(sub) / f for sub, files in _walk(folder, skip) for f in files if _is_volume_name(f)]


def looks_like_label_name(name: str) -> bool:
    words = [w for w in name.lower().replace("-", "_").replace(".", "_").split("_") if w]
    return any(w in LABEL_WORDS for w in words) or any(name.lower().endswith(w) for w in ("seg", "mask", "label"))


@dataclass
class CaseSource:
    """Where a case's CT (and label map) lives: a file, or a DICOM series' files in slice order."""

    name: str
    path: Path
    label: Path | None = None
    files: list[Path] | None = None
    series_uid: str = ""

    def identity(self) -> list[str]:
        ct = series_identity(self.files) if self.files else file_identity(self.path)
        return [ct] + ([file_identity(self.label)] if self.label is not None and self.label.is_file() else [])


def build_augment(augment: dict):
    """A torchio Compose from ``{affine = {...}, elastic = {...}, ct_noise = {...}, blur = {...}, flip = {...}}``
    (the volume transforms of an ``augment`` table; None when there are none)."""
    import torchio as tio

    accepted = {**AUGMENTS, **XRAY_AUGMENTS, "view_jitter": VIEW_JITTER, "style": STYLE}
    unknown = [k for k in augment if k not in accepted]
    if unknown:
        raise ValueError(f"augment: unknown transform(s) {unknown}; accepted: "
                         + "; ".join(f"{k} ({v})" for k, v in accepted.items()))
    augment = {k: v for k, v in augment.items() if k in AUGMENTS}
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
            elif name == "ct_noise":
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

    Splits: ``splits`` names a JSON/TOML file ``{train = [...], val = [...], test = [...]}`` (a case in
    two splits is an error); else ``train.txt``/``val.txt``/``test.txt`` in ``root`` are used when
    present; else the cases are split by ``split_fractions`` with ``seed`` (small sets by the rule of
    ``seeded_split``). Label maps are matched by case name, in ``labels_dir`` or beside the CTs as
    ``<name><label_suffix>.<ext>``, and remapped to the framework's codes by ``labels`` (a preset
    such as ``"totalsegmentator"`` or a table, see ``x2ct_framework.labels``). Files that look like
    label maps (names with seg/label/mask, 8-bit integer data) are not taken as CTs. ``series``
    chooses among several CT series of a DICOM case (``"largest"`` or a SeriesInstanceUID).
    ``hu_offset`` is added to every voxel (``-1024`` for CTs stored as unsigned HU + 1024);
    ``check_hu`` refuses CTs whose air is not near -1000 HU. ``on_bad_case = "skip"`` skips an
    unreadable or malformed case with a warning instead of stopping. ``xray`` names an X-ray preset of
    ``physics.spectral`` (``ideal``: today's DRRs; ``chest_pa``, ``portable_ap``, ``fluoro``, ``x2ctgan``)
    or a table ``{ preset = "chest_pa", kvp = 110 }``; a spectral preset and ``augment.style`` cache
    the material line integrals and make the X-rays from them at every access. ``study_labels`` names a CSV of
    per-case study labels (RSPECT-style: the case-id column ``study_id_column``, label columns ``study_columns``,
    default all others; several rows of a case combined by ``study_reduce``: error, max, mean, first); every
    item then carries ``study`` = ``{column: value}`` for evaluators such as ``pe_detectability``.
    """

    def __init__(self, *, split: str, stage: Stage, root: str, views: list[float] = (0.0, 90.0),
                 geometry: str | dict = "x2ctgan", hu_window: list[float] = DEFAULT_HU_WINDOW, image_size: int = 0,
                 volume_mm: float = 320.0, labels_dir: str = "", label_suffix: str = "", labels: str | dict = "",
                 splits: str = "", split_fractions: list[float] = (0.8, 0.1, 0.1), seed: int = 0,
                 augment: dict | None = None, augment_splits: list[str] = ("train",), cache_dir: str = "",
                 cache: bool = True, series: str = "", crop: str = "centre", hu_offset: float = 0.0,
                 check_hu: bool = True, on_bad_case: str = "error", pad_hu: float = -1024.0,
                 mu_water: float = MU_WATER, beer_lambert: bool = False, xray: str | dict = "ideal",
                 study_labels: str = "", study_id_column: str = "case_id", study_columns: list[str] = (),
                 study_reduce: str = "error"):
        check_split(split)
        check_common(views, hu_window, geometry, on_bad_case)
        if volume_mm <= 0:
            raise ValueError(f"volume_mm must be positive, got {volume_mm}")
        from x2ct_framework.io import VOXEL_MM_RANGE

        voxel = volume_mm / stage.resolution
        if not VOXEL_MM_RANGE[0] <= voxel <= VOXEL_MM_RANGE[1]:
            raise ValueError(f"volume_mm = {volume_mm:g} at resolution {stage.resolution} gives {voxel:g} mm voxels, "
                             f"outside the plausible {VOXEL_MM_RANGE[0]:g} to {VOXEL_MM_RANGE[1]:g} mm of a CT; "
                             f"volume_mm is the field of view in millimetres (320 for a chest)")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
        if study_reduce not in STUDY_REDUCE:
            raise ValueError(f"study_reduce must be one of {', '.join(STUDY_REDUCE)}, got {study_reduce!r}")
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
        self.series, self.crop = str(series), crop
        self.hu_offset, self.check_hu = float(hu_offset), bool(check_hu)
        self.cache = ArrayCache(resolve_cache_dir(cache_dir, cache))
        self.mapping = label_mapping(labels)
        augment = dict(augment or {})
        transform = build_augment(augment)  # validated for every split
        xray_augment = XrayAugment({k: v for k, v in augment.items() if k in XRAY_AUGMENTS}, "augment")
        self.jitter_deg, self.jitter_p = _view_jitter(augment.get("view_jitter"))
        chosen = split in augment_splits
        self.xray = XrayStyle({"mu_water": mu_water, "beer_lambert": beer_lambert, "preset": "ideal"}
                              if xray == "ideal" else xray, augment.get("style") if chosen else None)
        self.augment = transform if chosen else None
        self.xray_augment = xray_augment if chosen and xray_augment else None
        if not chosen:
            self.jitter_deg = 0.0
        self.seed = int(seed)
        if self.jitter_deg or self.xray_augment is not None or self.xray.style is not None:
            self.track_epoch()
        self.labels_dir = Path(labels_dir).expanduser() if labels_dir else None
        if self.labels_dir is not None and not self.labels_dir.is_dir():
            raise DataError(f"{self.labels_dir}: label folder not found (data.labels_dir of ct_folder)")
        self.label_suffix = label_suffix
        self.with_labels = self.labels_dir is not None or bool(label_suffix)
        case_geometry(self.views, geometry, self.volume_mm)  # fail early on a bad geometry

        manifest = self.manifest()
        found = manifest["cases"]
        for name, why in manifest["skipped"].items():
            log.warning("%s: not taken as a CT case: %s", name, why)
        names, source = self._split_names(list(found) + list(manifest["bad"]), splits, split_fractions, seed)
        missing = [n for n in names if n not in found and n not in manifest["bad"]]
        if missing:
            raise DataError(f"{source}: {len(missing)} case(s) of the {split} split are not in {self.root}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.cases: list[CaseSource] = []
        for name in names:
            if name in manifest["bad"]:
                bad_case(self.on_bad_case, manifest["bad"][name])
                continue
            self.cases.append(self._source(name, found[name]))
        if not self.cases:
            raise empty_split_error(split, source)
        if study_labels:
            self.attach_study_labels(study_labels, study_id_column, study_columns, study_reduce)
        self.bad: set[int] = set()
        self._warned: set[str] = set()

    # ---- discovery and its manifest ----------------------------------------------------------
    def _skipped_dirs(self) -> set[str]:
        """Folders below root that hold no cases: labels_dir and the cache (resolved paths)."""
        return {str(p.resolve()) for p in (self.labels_dir, self.cache.folder) if p is not None}

    def _watch(self) -> dict:
        """What the manifest's freshness rests on: the modification time of every directory below
        ``root`` (any depth; a file added, removed or renamed in a directory changes its time) and of
        ``labels_dir``, and of every volume file. One ``stat`` per directory and per volume file, no
        header read; DICOM slices are covered by their directories."""
        skip = self._skipped_dirs()
        dirs: dict[str, int] = {}
        files: dict[str, int] = {}
        for dirpath, filenames in _walk(self.root.resolve(), skip):
            dirs[dirpath] = os.stat(dirpath).st_mtime_ns
            for name in filenames:
                if _is_volume_name(name):  # the name first: no stat of every DICOM slice
                    path = os.path.join(dirpath, name)
                    files[path] = os.stat(path).st_mtime_ns
        if self.labels_dir is not None:
            dirs[str(self.labels_dir)] = os.stat(self.labels_dir).st_mtime_ns
            with os.scandir(self.labels_dir) as it:
                for e in it:
                    if e.is_file():
                        files[e.path] = e.stat().st_mtime_ns
        return {"dirs": dirs, "files": files}

    @staticmethod
    def _fresh(watch: dict) -> bool:
        """True while every directory and file recorded by :meth:`_watch` keeps its time (stats only)."""
        try:
            for group in ("dirs", "files"):
                for path, mtime in watch[group].items():
                    if os.stat(path).st_mtime_ns != mtime:
                        return False
        except (OSError, KeyError, TypeError, AttributeError):
            return False
        return True

    def manifest_path(self) -> Path | None:
        if self.cache.folder is None:
            return None
        key = DiskCache.key("manifest", MANIFEST_VERSION, str(self.root.resolve()), self.series, self.label_suffix,
                            str(self.labels_dir.resolve()) if self.labels_dir else "")
        return self.cache.folder / "manifests" / f"{key}.json"

    def manifest(self, rescan: bool = False) -> dict:
        """What discovery found (cases, their files, skipped and bad ones), from the cache when fresh."""
        path = self.manifest_path()
        if path is not None and path.is_file() and not rescan:
            try:
                data = json.loads(path.read_text())
                if data.get("version") == MANIFEST_VERSION and self._fresh(data.get("watch")):
                    return data
            except (OSError, json.JSONDecodeError):
                pass
        watch = self._watch()  # before discovery: a change during it makes the manifest stale, never lost
        data = {"version": MANIFEST_VERSION, "root": str(self.root.resolve()), "watch": watch, **self._discover()}
        if path is not None:
            write_json_atomic(path, data)
        return data

    def _source(self, name: str, entry: dict) -> CaseSource:
        files = [self._confined(name, f) for f in entry["files"]] if entry.get("files") else None
        label = Path(entry["label"]) if entry.get("label") else None
        if label is not None:
            folders = [self.root] + ([self.labels_dir] if self.labels_dir is not None else [])
            if not any(_below(label, f) for f in folders):
                raise DataError(f"{self.manifest_path()}: case {name!r}: its label map {label} lies outside data.root "
                                f"{self.root}{' and labels_dir' if self.labels_dir else ''}; the manifest was edited "
                                f"or is from another folder: run `x2ct prepare --rescan` (or delete it)")
        return CaseSource(name, self._confined(name, entry["path"]), label, files, entry.get("series_uid", ""))

    def _confined(self, name: str, rel: str) -> Path:
        """A manifest's path of case ``name``: relative, below data.root (no '..', not absolute)."""
        path = self.root / str(rel)
        if Path(str(rel)).is_absolute() or ".." in Path(str(rel)).parts or not _below(path, self.root):
            raise DataError(f"{self.manifest_path()}: case {name!r}: the file {rel!r} lies outside data.root "
                            f"{self.root}; the manifest was edited or is from another folder: run `x2ct prepare "
                            f"--rescan` (or delete it)")
        return path

    def _discover(self) -> dict:
        from x2ct_framework.dicom import find_ct_series, has_dicom

        skip = self._skipped_dirs()
        found: dict[str, dict] = {}
        skipped: dict[str, str] = {}
        bad: dict[str, str] = {}
        for path in sorted(self.root.iterdir()):
            if str(path.resolve()) in skip or path.name.startswith(".") or path.suffix == ".txt":
                continue
            entry: dict = {"path": path.name}
            if _is_volume_file(path):
                name = case_name(path)
                if self.label_suffix and name.endswith(self.label_suffix):
                    continue
                if looks_like_label_name(name):
                    skipped[name] = (f"{path} looks like a label map (its name); put label maps in labels_dir or "
                                     f"name them <case>{self.label_suffix or '_seg'} with label_suffix set")
                    continue
            elif path.is_dir() and has_dicom(path):
                name = path.name
                try:
                    chosen = find_ct_series(path, name, self.series)
                except DataError as exc:
                    bad[name] = f"{path}: {exc}"
                    continue
                entry.update(files=[str(f.relative_to(self.root)) for f in chosen.files], series_uid=chosen.uid)
            elif path.is_dir():
                # a case folder holding its CT as a volume file at any depth (case/ct.nii.gz, case/study/ct.nrrd):
                # the case is the folder; label-like files beside the CT are not candidates
                volumes = [v for v in _volume_files(path, skip) if not looks_like_label_name(case_name(v))
                           and not (self.label_suffix and case_name(v).endswith(self.label_suffix))]
                name = path.name
                if not volumes or looks_like_label_name(name) or name.lower() in ("segmentations", "masks"):
                    continue  # not a case folder (a folder of label maps, notes, ...)
                if len(volumes) > 1:  # a folder of several CTs is not one case: said, then left out
                    listed = ", ".join(str(v.relative_to(self.root)) for v in volumes[:6])
                    skipped[name] = (f"{path}: folder {name!r} holds {len(volumes)} volume files ({listed}), so it is "
                                     f"not read as one case; keep one CT per case folder (move the others out, give "
                                     f"label maps a label name such as <case>_seg, or point data.root at the folder)")
                    continue
                entry["path"] = str(volumes[0].relative_to(self.root))
                path = volumes[0]
            else:
                continue
            if name in found or name in bad:
                first = found[name]["path"] if name in found else bad[name].split(":")[0]
                raise DataError(f"{self.root}: two volumes for case {name!r}: {first} and {entry['path']}; "
                                f"rename one (case names are file names without their suffix, or folder names)")
            try:
                if "files" not in entry:
                    why = _check_header(path)
                    if why:
                        skipped[name] = why
                        continue
                if self.with_labels:
                    label = self._label_path(name)
                    if label is None:
                        where = self.labels_dir or self.root
                        raise DataError(f"{path}: no label map for case {name!r} in {where} "
                                        f"(expected {name}{self.label_suffix} with a volume suffix)")
                    _check_header(label, label=True)
                    entry["label"] = str(label)
            except DataError as exc:
                bad[name] = str(exc)
                continue
            found[name] = entry
        if not found and not bad:
            raise DataError(f"{self.root}: no CT volumes found (expected NIfTI, NRRD, MHA/MHD files, case folders "
                            f"holding one such file at any depth (case/ct.nii.gz), or folders holding a DICOM CT "
                            f"series at any depth, such as TCIA's patient/study/series)"
                            + (f"; skipped: {'; '.join(skipped.values())}" if skipped else ""))
        return {"cases": found, "skipped": skipped, "bad": bad}

    def _split_names(self, found: list[str], splits: str, fractions, seed: int) -> tuple[list[str], str]:
        if splits:
            path = Path(splits).expanduser()
            table = read_split_file(path)
            return table.get(self.split, []), str(path)
        lists = {s: self.root / f"{s}.txt" for s in ("train", "val", "test")}
        if any(p.is_file() for p in lists.values()):
            table = {s: read_list_file(p) for s, p in lists.items() if p.is_file()}
            check_split_overlap(table, f"{self.root}/{{train,val,test}}.txt")
            return table.get(self.split, []), str(lists[self.split])
        table = seeded_split(sorted(found), fractions, seed)
        for note in split_reuse(table):
            log.warning("%s: %s", self.root, note)
        return table[self.split], f"{self.root} (seeded split {list(fractions)})"

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

    # ---- the label source, for evaluation and reports -------------------------------------------
    @property
    def label_source(self) -> dict | None:
        """Where the label maps come from and how they are mapped (None without label maps)."""
        if not self.with_labels:
            return None
        where = str(self.labels_dir) if self.labels_dir else f"<case>{self.label_suffix} beside the CTs in {self.root}"
        return {"maps": where, **self.mapping.summary()}

    # ---- items (served by CaseListDataset.__getitem__, which skips bad cases) ----------------
    def _volume_key(self, case: CaseSource) -> str:
        return DiskCache.key("volume", CACHE_VERSION, case.identity(), self.stage.resolution, self.volume_mm,
                             self.pad_hu, self.crop, self.hu_offset, self.check_hu, self.series,
                             self.mapping.summary() if case.label is not None else None)

    def _warn_once(self, case: str, message: str) -> None:
        if (case, message) not in self._warned:
            self._warned.add((case, message))
            log.warning(message)

    def _volume(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, str]:
        """HU ``[R, R, R]``, labels (framework codes), the grid's affine and the entry key, cached."""
        case = self.cases[j]
        key = self._volume_key(case)
        hit = self.cache.get("volume", key)
        if hit is not None:
            arrays, meta = hit
            hu = torch.from_numpy(np.array(arrays["hu"])).float()  # one copy out of the memory map
            labels = torch.from_numpy(np.array(arrays["labels"])) if "labels" in arrays else None
            for note in meta.get("warnings", []):
                self._warn_once(case.name, note)
            return hu, labels, np.asarray(meta["affine"]), key
        grid = load_grid_ct(case.path, case.label, self.stage.resolution, self.volume_mm, self.pad_hu, self.crop,
                            self.hu_offset, self.check_hu, case.files, self.series)
        warnings = list(grid.notes)
        if grid.body_cut > 0.02:
            warnings.append(f"{case.path}: the {self.crop} crop to {self.volume_mm:g} mm leaves "
                            f"{100 * grid.body_cut:.0f} % of the body out (the scan is larger than the field of "
                            f"view); crop = \"lung\" centres on the lungs, a larger volume_mm keeps more")
        labels = None
        cover = None
        if grid.labels is not None:
            cover = coverage(grid.labels, grid.hu)
            if cover < MIN_COVERAGE:
                warnings.append(f"{case.label}: the label map covers {100 * cover:.0f} % of the body (HU > -500); "
                                f"per-structure scores rest on few labelled voxels")
            try:
                labels = self.mapping.apply(grid.labels, grid.hu)
            except ValueError as exc:
                raise DataError(f"{case.label}: {exc}") from exc
        for note in warnings:
            self._warn_once(case.name, note)
        arrays = {"hu": hu_storage(grid.hu)}
        if labels is not None:
            arrays["labels"] = labels.numpy().astype(np.uint8)
        self.cache.put("volume", key, arrays, {"case": case.name, "source": str(case.path), "affine":
                                               grid.affine.tolist(), "warnings": warnings, "label_coverage": cover,
                                               "body_cut": grid.body_cut, "obliquity_deg": grid.obliquity,
                                               "series_uid": case.series_uid})
        return grid.hu, labels, grid.affine, key

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

    def _drr_key(self, volume_key: str, geometry) -> str:
        namespace = (CACHE_VERSION, *self.xray.key()) if self.xray.uses_lines else (CACHE_VERSION,)
        return rendered_key(namespace, volume_key, geometry, self.image_size, self.hu_window, self.mu_water,
                            self.beer_lambert)

    def prepare_case(self, j: int) -> list[str] | None:
        """Fill the cache for case ``j`` (volume and un-augmented DRRs): its warnings (crop, obliquity,
        label coverage), or None when both were cached already."""
        case = self.cases[j]
        volume_key = self._volume_key(case)
        geometry = case_geometry(self.views, self.geometry_option, self.volume_mm)
        if self.cache.has("volume", volume_key) and self.cache.has("drr", self._drr_key(volume_key, geometry)):
            return None
        hu, labels, _, key = self._volume(j)
        self._xrays(hu_to_unit(hu, self.hu_window)[None], geometry, key, labels)
        hit = self.cache.get("volume", key)
        return list(hit[1].get("warnings", [])) if hit is not None else []

    def _xrays(self, ct: torch.Tensor, geometry, volume_key: str, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The un-augmented DRRs (today's), or with an ``xray`` preset or a style the material line integrals."""
        key = self._drr_key(volume_key, geometry)
        hit = self.cache.get("drr", key)
        name = "lines" if self.xray.uses_lines else "xrays"
        if hit is not None and name in hit[0]:
            return torch.from_numpy(np.array(hit[0][name]))
        if self.xray.uses_lines:
            lines = self.xray.lines(ct, geometry, self.hu_window, self.image_size, labels)
            self.cache.put("drr", key, {"lines": lines.numpy()}, {"views": self.views})
            return lines
        xrays = render_views(ct, geometry, self.hu_window, self.image_size, self.mu_water, self.beer_lambert)
        self.cache.put("drr", key, {"xrays": xrays.numpy()}, {"views": self.views})
        return xrays

    #: Set by the trainer on its training set: items of a spectral preset or a style then carry the cached
    #: material line integrals (``xray_lines``) and the item's draw (``xray_draw``: seed, epoch, index) instead of
    #: ``xrays``, and :meth:`finish_batch` makes the X-rays of the whole batch on the batch's device. A dataset read
    #: directly (``x2ct validate``, ``check-data``, the contract kit, your own loop) makes them per item, the same
    #: images.
    render_on_batch = False

    def _images(self, lines: torch.Tensor, geometry, seed: int, epoch: int, j: int) -> torch.Tensor:
        """The X-rays of item ``j``: from material line integrals (a preset, or a style drawn from (seed, epoch,
        j)) or as given, then the image-space augmentations."""
        xrays = self.xray.images(lines, geometry, seed, epoch, j) if self.xray.uses_lines else lines
        if self.xray_augment is not None:
            xrays = self.xray_augment(xrays, seed, epoch, j)
        return xrays

    def finish_batch(self, batch: dict) -> dict:
        """``batch`` with its ``xrays`` made from ``xray_lines`` where the items deferred them
        (:attr:`render_on_batch`), on the batch's device; other batches unchanged. Each item's X-rays are
        exactly those :meth:`__getitem__` gives without deferral (the same draws, in the same order)."""
        if "xray_lines" not in batch:
            return batch
        lines, draw = batch.pop("xray_lines"), batch.pop("xray_draw").tolist()
        geometry = batch["geometry"]
        batch["xrays"] = torch.stack([
            self._images(lines[b], {k: v[b] for k, v in geometry.items()}, *(int(x) for x in draw[b]))
            for b in range(lines.shape[0])])
        return batch

    def _geometry(self, j: int):
        if not self.jitter_deg:
            return case_geometry(self.views, self.geometry_option, self.volume_mm), False
        import random

        rng = random.Random(augment_seed(self.seed, self.epoch, j, "view_jitter"))
        if rng.random() >= self.jitter_p:
            return case_geometry(self.views, self.geometry_option, self.volume_mm), False
        return case_geometry(self.views, self.geometry_option, self.volume_mm, self.jitter_deg, rng), True

    def _item(self, j: int) -> dict:
        case = self.cases[j]
        hu, labels, affine, volume_key = self._volume(j)
        if self.augment is not None:
            hu, labels = self._augment(hu, labels)
        lo, hi = self.hu_window
        ct = hu.clamp_(lo, hi).sub_(lo).div_(hi - lo)[None]  # hu_to_unit in place: no 4-byte copies per voxel
        geometry, jittered = self._geometry(j)
        if self.augment is None and not jittered:
            xrays = self._xrays(ct, geometry, volume_key, labels)
        elif self.xray.uses_lines:
            xrays = self.xray.lines(ct, geometry, self.hu_window, self.image_size, labels)
        else:
            xrays = render_views(ct, geometry, self.hu_window, self.image_size, self.mu_water, self.beer_lambert)
        item = {"geometry": geometry, "ct": ct,
                "spacing": torch.full((3,), self.volume_mm / self.stage.resolution), "case_id": case.name,
                "affine": torch.as_tensor(affine, dtype=torch.float64)}
        if self.xray.uses_lines and self.render_on_batch:  # the trainer makes the X-rays on the device
            item["xray_lines"] = xrays
            item["xray_draw"] = torch.tensor([self.seed, self.epoch, j], dtype=torch.int64)
        else:
            item["xrays"] = self._images(xrays, geometry, self.seed, self.epoch, j)
        if labels is not None:
            item["labels"] = labels[None]
        return item


def _view_jitter(options) -> tuple[float, float]:
    """(degrees, p) of an ``augment.view_jitter`` table (0 degrees: off)."""
    if options is None:
        return 0.0, 0.0
    if not isinstance(options, dict):
        raise ValueError(f"augment -> view_jitter: expected a table {{ degrees = 2, p = 1 }}, got {options!r}")
    opts = dict(options)
    degrees, p = float(opts.pop("degrees", 2.0)), float(opts.pop("p", 1.0))
    if opts or degrees < 0 or not 0 <= p <= 1:
        raise ValueError(f"augment -> view_jitter: expected degrees >= 0 and p in [0, 1] ({VIEW_JITTER}), "
                         f"got {options!r}")
    return degrees, p


def _check_header(path: Path, label: bool = False) -> str:
    """Read only the header: the file must open and hold a single-channel 3D image. Returns why a CT
    candidate looks like a label map (8-bit integer data), else ""."""
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
            return ""
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
    pixel = reader.GetPixelID()
    if not label and pixel in (sitk.sitkUInt8, sitk.sitkInt8):
        return (f"{path} looks like a label map (8-bit integer data, "
                f"{sitk.GetPixelIDValueAsString(pixel)}); CTs need 16-bit or wider values")
    return ""


@hookimpl
def register_datasets(register):
    register("ct_folder", CTFolderDataset)
