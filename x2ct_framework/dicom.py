"""DICOM discovery: find every series under a folder of any depth and pick each case's CT series.

TCIA downloads nest ``patient/study/series/*.dcm``; a case folder may hold several studies and
series (localizers, segmentations, reformats, a second reconstruction). :func:`scan_series` reads
only the headers, groups the files by ``SeriesInstanceUID`` and checks each series (one
orientation, one pixel grid, slice positions evenly spaced along the slice normal);
:func:`pick_ct_series` picks the CT series of a case: modality ``CT``, not a localizer, consistent,
and the only candidate unless ``series`` says which (``"largest"``: the one with most slices, or a
``SeriesInstanceUID``). Missing slices and ambiguous choices are errors that name the case and the
series.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from x2ct_framework.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def is_dicom(path: Path) -> bool:
    """A DICOM file: by its suffix, else by the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


HEADER_TAGS = ["SeriesInstanceUID", "Modality", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
               "Rows", "Columns", "SeriesDescription", "ImageType", "SeriesNumber", "StudyInstanceUID",
               "RescaleIntercept", "RescaleSlope", "GantryDetectorTilt"]
# A gap above this multiple of the median slice step is a missing slice; steps that differ by more
# than STEP_TOLERANCE (relative) from the median are irregular spacing.
GAP_FACTOR = 1.5
STEP_TOLERANCE = 0.05
# Slices whose positions advance more than this many degrees off their own normal come from a tilted
# gantry: the true volume is sheared, which a reader that assumes a rectangular grid places rotated.
TILT_TOLERANCE_DEG = 0.5


@dataclass
class DicomSeries:
    """One series: its files sorted along the slice normal, and what the header check found."""

    uid: str
    modality: str
    folder: Path
    files: list[Path]
    description: str = ""
    localizer: bool = False
    slice_step: float = 0.0
    pixel_spacing: tuple[float, float] = (0.0, 0.0)
    orientation: tuple[float, ...] = ()
    problems: list[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return len(self.files)

    def describe(self, root: Path | None = None) -> str:
        where = self.folder
        if root is not None:
            try:
                where = self.folder.relative_to(root)
            except ValueError:
                pass
        desc = f" {self.description!r}" if self.description else ""
        return f"series {self.uid}{desc} ({self.modality}, {self.slices} slice(s), in {where})"


def _looks_dicom(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith("."):
        return False
    if "." in name and not name.endswith(DICOM_SUFFIXES) and not name.replace(".", "").isdigit():
        return False  # other known types (xml, json, nii, png); numbered names like 1.2.840... are read
    return is_dicom(path)


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file below ``folder`` at any depth, in sorted order (hidden folders skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _looks_dicom(p):
                out.append(p)
    return out


def has_dicom(folder: Path) -> bool:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_looks_dicom(Path(dirpath) / n) for n in filenames):
            return True
    return False


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def scan_series(folder: str | Path) -> list[DicomSeries]:
    """Read the headers of every DICOM file below ``folder`` and return its series, checked."""
    import pydicom

    folder = Path(folder)
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except Exception:  # not DICOM after all, or damaged: not part of a series
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or f"(no SeriesInstanceUID) {path.parent}")
        groups.setdefault(uid, []).append((path, ds))
    return [_check(uid, members) for uid, members in groups.items()]


def _check(uid: str, members: list[tuple[Path, object]]) -> DicomSeries:
    first = members[0][1]
    modality = str(getattr(first, "Modality", "") or "?")
    image_type = [str(t).upper() for t in (getattr(first, "ImageType", None) or [])]
    folders = sorted({p.parent for p, _ in members})
    folder = folders[0] if len(folders) == 1 else Path(os.path.commonpath([str(f) for f in folders]))
    series = DicomSeries(uid=uid, modality=modality, folder=folder, files=[p for p, _ in members],
                         description=str(getattr(first, "SeriesDescription", "") or ""),
                         localizer="LOCALIZER" in image_type)
    iops = [_floats(getattr(ds, "ImageOrientationPatient", None), 6) for _, ds in members]
    ipps = [_floats(getattr(ds, "ImagePositionPatient", None), 3) for _, ds in members]
    spacings = [_floats(getattr(ds, "PixelSpacing", None), 2) for _, ds in members]
    grids = {(int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)) for _, ds in members}
    if any(v is None for v in iops) or any(v is None for v in ipps) or any(v is None for v in spacings):
        series.problems.append("some slices lack ImageOrientationPatient, ImagePositionPatient or PixelSpacing")
        return series
    iop = np.array(iops)
    if np.abs(iop - iop[0]).max() > 1e-3:
        series.problems.append("the slices have different orientations (ImageOrientationPatient)")
    sp = np.array(spacings)
    if np.abs(sp - sp[0]).max() > 1e-3:
        series.problems.append(f"the slices have different pixel spacings ({sorted({tuple(s) for s in spacings})})")
    if len(grids) > 1:
        series.problems.append(f"the slices have different sizes (rows, columns {sorted(grids)})")
    series.orientation = tuple(float(v) for v in iop[0])
    series.pixel_spacing = (float(sp[0][0]), float(sp[0][1]))
    normal = np.cross(iop[0][:3], iop[0][3:])
    z = np.array(ipps) @ normal
    order = np.argsort(z, kind="stable")
    series.files = [members[i][0] for i in order]
    z = z[order]
    if len(z) < 2:
        series.problems.append(f"{len(z)} slice: not a 3D series")
        return series
    positions = np.array(ipps)[order]
    travel = positions[-1] - positions[0]
    length = float(np.linalg.norm(travel))
    if length > 1e-6:
        tilt = float(np.degrees(np.arccos(min(1.0, abs(float(travel @ normal)) / length))))
        if tilt > TILT_TOLERANCE_DEG:
            tag = getattr(first, "GantryDetectorTilt", None)
            series.problems.append(
                f"gantry tilt: the slice positions (ImagePositionPatient) advance {tilt:.1f} degrees off the slice "
                f"normal of ImageOrientationPatient" + (f" (GantryDetectorTilt {float(tag):g})" if tag is not None
                                                        else "")
                + f"; read as a rectangular grid the volume would be rotated instead of sheared, up to "
                  f"{length * np.sin(np.radians(tilt)):.0f} mm off. Correct the tilt first (dcm2niix writes a "
                  f"de-tilted volume, or resample the slices onto an axial grid) and put that file in the case's place")
            return series
    steps = np.diff(z)
    if (steps < 1e-3).any():
        dup = int((steps < 1e-3).sum())
        series.problems.append(f"{dup} slice position(s) repeated (several acquisitions in one series?)")
        return series
    step = float(np.median(steps))
    series.slice_step = step
    gaps = np.nonzero(steps > GAP_FACTOR * step)[0]
    if len(gaps):
        where = ", ".join(f"{z[i]:.1f} -> {z[i + 1]:.1f} mm" for i in gaps[:3])
        missing = int(sum(round(steps[i] / step) - 1 for i in gaps))
        sizes = ", ".join(f"{steps[i]:.2f}" for i in gaps[:3])
        series.problems.append(f"about {missing} missing slice(s): gaps of {sizes} mm between slice positions "
                               f"{where} where the step is {step:.2f} mm")
    elif np.abs(steps - step).max() > STEP_TOLERANCE * step:
        series.problems.append(f"irregular slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)")
    return series


def pick_ct_series(case: str, series: list[DicomSeries], choice: str = "", root: Path | None = None) -> DicomSeries:
    """The CT series of ``case``: the only CT series, or ``choice`` (``"largest"`` or a SeriesInstanceUID)."""
    hint = ('set data.series = "largest" (the CT series with most slices) or data.series = "<SeriesInstanceUID>", '
            'or move the other series out of the case folder')
    if choice and choice != "largest":
        match = [s for s in series if s.uid == choice]
        if not match:
            raise DataError(f"case {case!r}: no series with SeriesInstanceUID {choice} (data.series); found "
                            + "; ".join(s.describe(root) for s in series))
        chosen = match[0]
    else:
        cts = [s for s in series if s.modality.upper() == "CT" and not s.localizer and s.slices > 1]
        if not cts:
            found = "; ".join(s.describe(root) for s in series) or "no readable DICOM file"
            raise DataError(f"case {case!r}: no CT series (found {found})")
        if len(cts) > 1 and choice != "largest":
            listed = "; ".join(s.describe(root) + (f" [{'; '.join(s.problems)}]" if s.problems else "") for s in cts)
            raise DataError(f"case {case!r}: {len(cts)} CT series, which one to use is ambiguous: {listed}; {hint}")
        good = [s for s in cts if not s.problems] or cts
        chosen = max(good, key=lambda s: s.slices)
    if chosen.problems:
        raise DataError(f"case {case!r}: {chosen.describe(root)}: {'; '.join(chosen.problems)}; fix or re-download "
                        f"the series" + (f", or choose another ({hint})" if len(series) > 1 else ""))
    return chosen


def find_ct_series(folder: str | Path, case: str = "", choice: str = "") -> DicomSeries:
    """Scan ``folder`` (any depth) and pick its CT series (see :func:`pick_ct_series`)."""
    folder = Path(folder)
    return pick_ct_series(case or folder.name, scan_series(folder), choice, folder)


def read_series(files: list[Path], where: str = ""):
    """A checked series (files in slice order) as a SimpleITK image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{where or files[0].parent}: could not read the DICOM series "
                        f"({str(exc).strip()[:200]})") from exc
