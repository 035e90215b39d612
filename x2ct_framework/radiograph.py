"""DICOM radiographs (CR, DX, and any single-frame grey-level image) read as they are displayed, and the
view geometry their tags describe.

Pixels (:func:`read_dicom_radiograph`), in the order of the DICOM grey-scale pipeline (PS3.4 N.2):
stored values (``BitsStored`` of ``BitsAllocated``) -> Modality LUT (rescale slope/intercept, or a
Modality LUT Sequence, through pydicom) -> VOI LUT (the first window centre/width with its VOI LUT
Function: LINEAR, LINEAR_EXACT or SIGMOID; or the first VOI LUT Sequence entry, which takes precedence)
-> Presentation LUT (``MONOCHROME1`` or ``PresentationLUTShape = INVERSE`` inverts; the DX standard pairs
MONOCHROME1 with INVERSE, one inversion) -> [0, 1] with attenuating structures bright, as a radiograph is
shown and as the framework's DRRs are. Without a VOI LUT the modality values are scaled by their range.
Blank collimated borders (edge rows/columns of one saturated white value: shutters, no exposure)
are set to 0, the value of no attenuation, so the model does not read them as dense tissue.

Orientation: ``ViewPosition`` gives the gantry angle (PA 0, LL 90, AP 180, RL 270 degrees) and
``PatientOrientation`` (row and column directions, e.g. ``L\\F``) the flips/transposition that bring the
stored image to the framework's detector frame for that angle (rows toward the feet; columns toward
the patient's left for PA, posterior for LL, right for AP, anterior for RL: see ``physics``). Without
``PatientOrientation`` the radiological display is assumed (PA and AP with the patient's right on the
image's left, a lateral with anterior on the left for LL and on the right for RL).

Geometry (:func:`geometry_from_tags`): ``DistanceSourceToDetector`` (sdd), ``DistanceSourceToPatient``
(sid), the detector size from ``ImagerPixelSpacing`` (at the detector) or ``PixelSpacing`` (at the
patient: times sdd / sid) times the pixel counts. What a tag does not say is a named assumption
(``ASSUMPTIONS``), reported with what was inferred; tags that contradict each other raise
:class:`~x2ct_framework.errors.DataError` naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from x2ct_framework.errors import DataError

VIEW_ANGLES = {"PA": 0.0, "LL": 90.0, "AP": 180.0, "RL": 270.0}
# the detector frame's row direction (columns' increasing index) at each angle; columns run to the feet
_ROW_DIRECTION = {0.0: "L", 90.0: "P", 180.0: "R", 270.0: "A"}
_DISPLAY = {"PA": ("L", "F"), "AP": ("L", "F"), "LL": ("P", "F"), "RL": ("A", "F")}  # radiological display
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
ASSUMPTIONS = {
    "view": "no ViewPosition: a PA view (0 degrees) is assumed",
    "orientation": "no PatientOrientation: the radiological display of the view is assumed",
    "sdd": "no DistanceSourceToDetector: 1800 mm is assumed (a PA chest in a Bucky)",
    "sid": "no DistanceSourceToPatient: the detector is assumed 200 mm behind the isocentre (sid = sdd - 200)",
    "spacing": "no non-zero ImagerPixelSpacing or PixelSpacing: the detector is assumed 430 mm across its "
               "longer side (a 43 cm detector)",
}
ASSUMED_SDD_MM = 1800.0
ASSUMED_DETECTOR_BEHIND_MM = 200.0
ASSUMED_DETECTOR_MM = 430.0


@dataclass
class RadiographInfo:
    """What the tags of one radiograph say, and where each value came from."""

    path: str
    angle: float = 0.0
    orientation: str = "identity"  # stored -> detector frame (physics.geometry.ORIENTATIONS, from_stored)
    sdd: float | None = None
    sid: float | None = None
    spacing_mm: tuple[float, float] | None = None  # (row, column) pitch at the detector, in the detector frame
    shape: tuple[int, int] = (0, 0)  # rows, columns in the detector frame
    sources: dict[str, str] = field(default_factory=dict)  # value -> "from TAG" or the assumption
    notes: list[str] = field(default_factory=list)


def _number(ds, keyword: str, index: int | None = None) -> float | None:
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return None
    try:
        if index is not None:
            value = value[index] if not isinstance(value, (int, float, str)) else value
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _first(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise DataError(f"window width {width} < 1 (LINEAR VOI LUT Function needs >= 1)")
    return np.clip((x - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut(x: np.ndarray, item) -> np.ndarray:
    """A LUT Sequence item (LUTDescriptor: entries, first mapped value, bits) applied, to [0, 1]."""
    desc = [int(v) for v in item.LUTDescriptor]
    n = desc[0] or 65536
    first = desc[1]
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):  # OW: 16-bit words
        data = np.frombuffer(raw, dtype="<u2").astype(np.float64)[:n]
    else:
        data = np.asarray(raw if not isinstance(raw, (int, float)) else [raw], dtype=np.float64).reshape(-1)[:n]
    idx = np.clip(np.round(x).astype(np.int64) - first, 0, len(data) - 1)
    out = data[idx]
    lo, hi = float(data.min()), float(data.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


def blank_borders(a: np.ndarray, tol: float = 1e-3) -> tuple[int, int, int, int]:
    """Numbers of edge rows (top, bottom) and columns (left, right) of ``a`` (display values in [0, 1]) that
    hold one saturated white value each: collimator shutters (no exposure, shown as the most
    attenuating). Dark or grey uniform edges (air) are left as they are."""
    h, w = a.shape
    bright = 0.98

    def count(lines) -> int:
        n = 0
        for line in lines:
            if float(line.max() - line.min()) > tol or float(line.min()) < bright:
                break
            n += 1
        return n

    top = count(a[i] for i in range(h))
    if top == h:
        return 0, 0, 0, 0  # a flat image: nothing to tell
    bottom = count(a[h - 1 - i] for i in range(h))
    left = count(a[:, j] for j in range(w))
    right = count(a[:, w - 1 - j] for j in range(w))
    return top, bottom, left, right


def _orientation(view: str | None, tags: tuple[str, str] | None, angle: float, path: str) -> str:
    """The ORIENTATIONS code that brings the stored image to the detector frame at ``angle``."""
    from x2ct_framework.physics.geometry import ORIENTATIONS

    row, col = tags if tags is not None else _DISPLAY.get(view or "PA", ("L", "F"))
    want = (_ROW_DIRECTION[angle], "F")
    for code, (transpose, rows, cols) in ORIENTATIONS.items():  # from_stored: flips first, then transpose
        r, c = row, col
        if rows:
            c = _OPPOSITE[c]
        if cols:
            r = _OPPOSITE[r]
        if transpose:
            r, c = c, r
        if (r, c) == want:
            return code
    raise DataError(f"{path}: PatientOrientation {row}\\{col} contradicts ViewPosition {view} (a {view} view's "
                    f"image rows and columns run along {' and '.join(sorted({want[0], _OPPOSITE[want[0]]}))} and "
                    f"head-feet); fix one of the two tags")


def _patient_orientation(ds, path: str) -> tuple[str, str] | None:
    value = getattr(ds, "PatientOrientation", None)
    if value is None or len(value) == 0:
        return None
    parts = [str(v).strip().upper() for v in value]
    if len(parts) != 2 or any(not p for p in parts):
        raise DataError(f"{path}: PatientOrientation {value!r}: expected two values (row and column direction)")
    # oblique codes (e.g. "LF") keep their first, main direction
    row, col = parts[0][0], parts[1][0]
    if row not in _OPPOSITE or col not in _OPPOSITE:
        raise DataError(f"{path}: PatientOrientation {value!r}: expected letters among L, R, A, P, H, F")
    return row, col


def read_dicom_radiograph(path: str | Path, normalize: str = "auto") -> tuple[np.ndarray, RadiographInfo]:
    """(image [H, W] float32 in the detector frame, attenuating structures bright, in [0, 1] unless
    ``normalize = "none"``; the tags' :class:`RadiographInfo`) of a DICOM radiograph."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from x2ct_framework.physics.geometry import from_stored

    path = Path(path)
    ds = pydicom.dcmread(str(path))
    info = RadiographInfo(str(path))
    a = ds.pixel_array
    if a.ndim != 2:
        raise DataError(f"{path}: expected a single-frame grey-level radiograph, got pixel data of shape {a.shape}")
    bits_stored = int(getattr(ds, "BitsStored", 0) or 0)
    if np.issubdtype(a.dtype, np.unsignedinteger) and 0 < bits_stored < a.dtype.itemsize * 8:
        a = a & ((1 << bits_stored) - 1)  # bits above BitsStored may hold overlays
    x = np.asarray(apply_modality_lut(a, ds), dtype=np.float64)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    shape = str(getattr(ds, "PresentationLUTShape", "")).upper()
    invert = photometric == "MONOCHROME1" or shape == "INVERSE"
    if photometric == "MONOCHROME1" and shape == "IDENTITY":
        info.notes.append(f"{path.name}: MONOCHROME1 with PresentationLUTShape IDENTITY; inverted as MONOCHROME1")
    if normalize == "none":
        out = (x.max() - x) if invert else x
    else:
        voi = getattr(ds, "VOILUTSequence", None)
        centre, width = _number(ds, "WindowCenter", 0), _number(ds, "WindowWidth", 0)
        if normalize == "auto" and voi:
            out = _lut(x, voi[0])
            info.sources["contrast"] = "VOILUTSequence"
        elif normalize == "auto" and centre is not None and width:
            function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
            out = _window(x, centre, width, function)
            info.sources["contrast"] = f"WindowCenter {centre:g} / WindowWidth {width:g} ({function})"
        else:
            lo, hi = float(x.min()), float(x.max())
            out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
            info.sources["contrast"] = "the modality values' range (no VOI LUT)"
        if invert:
            out = 1.0 - out
        info.sources["polarity"] = ("inverted: " + ("MONOCHROME1" if photometric == "MONOCHROME1"
                                                    else "PresentationLUTShape INVERSE")) if invert else photometric
        top, bottom, left, right = blank_borders(out)
        if top or bottom or left or right:
            h, w = out.shape
            out = out.copy()
            out[:top] = 0.0
            out[h - bottom:] = 0.0
            out[:, :left] = 0.0
            out[:, w - right:] = 0.0
            info.notes.append(f"{path.name}: blank collimated borders set to 0 (no attenuation): {top} top, "
                              f"{bottom} bottom, {left} left, {right} right row(s)/column(s)")
    # view and orientation
    view = str(getattr(ds, "ViewPosition", "") or "").strip().upper() or None
    if view is not None and view not in VIEW_ANGLES:
        info.notes.append(f"{path.name}: ViewPosition {view!r} is none of {', '.join(VIEW_ANGLES)}; a PA view assumed")
        view = None
    info.angle = VIEW_ANGLES[view] if view else 0.0
    info.sources["angle"] = f"ViewPosition {view}" if view else ASSUMPTIONS["view"]
    tags = _patient_orientation(ds, str(path))
    info.orientation = _orientation(view, tags, info.angle, str(path))
    info.sources["orientation"] = (f"PatientOrientation {tags[0]}\\{tags[1]}" if tags else ASSUMPTIONS["orientation"])
    import torch

    img = from_stored(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), info.orientation).numpy()
    info.shape = (int(img.shape[0]), int(img.shape[1]))
    # distances and pixel pitch
    info.sdd = _number(ds, "DistanceSourceToDetector")
    info.sid = _number(ds, "DistanceSourceToPatient")
    imager = [_number(ds, "ImagerPixelSpacing", i) for i in (0, 1)]
    patient = [_number(ds, "PixelSpacing", i) for i in (0, 1)]
    transpose = info.orientation in ("transpose", "rot90", "rot270", "antitranspose")
    if all(v for v in imager):
        sp, info.sources["spacing"] = (imager[0], imager[1]), "ImagerPixelSpacing (at the detector)"
        if all(v for v in patient) and patient[0] > imager[0] * 1.001:
            raise DataError(f"{path}: PixelSpacing {patient[0]:g} mm (at the patient) exceeds ImagerPixelSpacing "
                            f"{imager[0]:g} mm (at the detector): a magnification below 1; fix one of the two tags")
    elif all(v for v in patient):
        sp, info.sources["spacing"] = (patient[0], patient[1]), "PixelSpacing (at the patient, times sdd / sid)"
        info.notes.append(f"{path.name}: PixelSpacing taken at the isocentre plane and scaled by sdd / sid")
    else:
        sp = None
        why = "zero" if any(v == 0 for v in imager + patient if v is not None) else "absent"
        info.sources["spacing"] = f"pixel spacing {why}: " + ASSUMPTIONS["spacing"]
    if sp is not None:
        info.spacing_mm = (sp[1], sp[0]) if transpose else (sp[0], sp[1])
    if info.sdd is not None and info.sid is not None and not 0 < info.sid < info.sdd:
        raise DataError(f"{path}: DistanceSourceToPatient {info.sid:g} mm is not below DistanceSourceToDetector "
                        f"{info.sdd:g} mm (the patient must lie between source and detector); fix one of the two tags")
    return img, info


def geometry_from_tags(infos: list[RadiographInfo]) -> tuple[dict, list[str]]:
    """A ``make_geometry`` spec (views, beam, sid, sdd, detector_mm, detector_px) for the radiographs of one
    case, and a line per inferred value saying from which tag (or which assumption)."""
    if not infos:
        raise DataError("no radiographs to build a geometry from")
    lines = []
    views = [i.angle for i in infos]
    for i in infos:
        lines.append(f"{Path(i.path).name}: angle {i.angle:g} degrees from {i.sources['angle']}; orientation "
                     f"{i.orientation} from {i.sources['orientation']}")
    sdds = {i.sdd for i in infos if i.sdd is not None}
    sids = {i.sid for i in infos if i.sid is not None}
    for name, values in (("DistanceSourceToDetector", sdds), ("DistanceSourceToPatient", sids)):
        if len(values) > 1 and (max(values) - min(values)) > 0.01 * max(values):
            raise DataError(f"the views' {name} differ ({', '.join(f'{v:g}' for v in sorted(values))} mm); this "
                            f"framework's geometry has one value for all views: give a geometry file instead")
    sdd = max(sdds) if sdds else None
    sid = max(sids) if sids else None
    if sdd is None:
        sdd = ASSUMED_SDD_MM
        lines.append(f"sdd {sdd:g} mm: {ASSUMPTIONS['sdd']}")
    else:
        lines.append(f"sdd {sdd:g} mm from DistanceSourceToDetector")
    if sid is None:
        sid = sdd - ASSUMED_DETECTOR_BEHIND_MM
        lines.append(f"sid {sid:g} mm: {ASSUMPTIONS['sid']}")
    else:
        lines.append(f"sid {sid:g} mm from DistanceSourceToPatient")
    if not 0 < sid < sdd:
        raise DataError(f"DistanceSourceToPatient {sid:g} mm is not below DistanceSourceToDetector {sdd:g} mm")
    first = infos[0]
    rows, cols = first.shape
    if any(i.shape != first.shape for i in infos):
        raise DataError(f"the radiographs have different sizes {sorted({i.shape for i in infos})}; give images of "
                        f"one size")
    if first.spacing_mm is not None:
        pitch = first.spacing_mm
        if "PixelSpacing (at the patient" in first.sources["spacing"]:
            pitch = (pitch[0] * sdd / sid, pitch[1] * sdd / sid)
        det = (cols * pitch[1], rows * pitch[0])
        lines.append(f"detector {det[0]:.1f} x {det[1]:.1f} mm from {first.sources['spacing']}")
    else:
        scale = ASSUMED_DETECTOR_MM / max(rows, cols)
        det = (cols * scale, rows * scale)
        lines.append(f"detector {det[0]:.1f} x {det[1]:.1f} mm: {first.sources['spacing']}")
    spec = {"views": views, "preset": {"beam": "cone", "sid": sid, "sdd": sdd, "detector_mm": list(det)},
            "detector_px": [rows, cols]}
    return spec, lines
