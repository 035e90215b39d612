"""Readers for X-ray images and CT volumes, shared by the dataset plugins and the evaluation tools.

Every volume is returned in the framework's canonical orientation (see ``x2ct_framework.physics``):
a tensor ``[D, H, W]`` whose index axes run superior -> inferior (D), anterior -> posterior (H) and
patient right -> patient left (W), so ``volume[d]`` is an axial slice in the radiological display
(anterior up, patient right on the left) and ``volume[:, h]`` a coronal slice with the head up.
Spacing is ``(x, y, z)`` = along (W, H, D) in mm. Bad input raises ``DataError`` naming the file and
what was expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from x2ct_framework.dicom import DICOM_SUFFIXES, is_dicom  # noqa: F401  (io's names for DICOM files)
from x2ct_framework.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# Orientation code of the canonical [W, H, D] array (the tensor read as x, y, z): toward patient
# Left, Posterior, Inferior. ``torchio.ToOrientation`` takes this code.
CANONICAL_ORIENTATION = "LPI"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _normalise(a: np.ndarray, normalize: str, path: Path) -> np.ndarray:
    """Scale an image to [0, 1]: ``dtype`` divides by the integer type's maximum, ``minmax`` by its range."""
    if normalize == "auto":
        normalize = "dtype" if a.dtype in (np.uint8, np.uint16) else "minmax"
    if normalize == "dtype":
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{path}: normalize='dtype' needs an integer image, got {a.dtype}")
        return a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    if normalize == "minmax":
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if normalize == "none":
        return a.astype(np.float32)
    raise ValueError(f"normalize must be 'auto', 'dtype', 'minmax' or 'none', got {normalize!r}")


def read_xray(path: str | Path, normalize: str = "auto") -> torch.Tensor:
    """An X-ray image (PNG/JPEG/TIFF, DICOM, NIfTI, NumPy .npy) as a float tensor ``[1, H, W]`` in [0, 1].

    Attenuating structures are bright, as in the framework's DRRs. A DICOM radiograph is read through
    its grey-scale pipeline and turned to the framework's detector frame for its view
    (``x2ct_framework.radiograph``: modality LUT, VOI LUT by window or sequence, MONOCHROME1 and
    Presentation LUT Shape, blank collimated borders, ViewPosition and PatientOrientation). 8/16-bit
    images are divided by their type's maximum, other data scaled by min-max (``normalize`` = ``auto``,
    ``dtype``, ``minmax`` or ``none``; for DICOM ``auto`` applies the VOI LUT when there is one,
    ``minmax`` scales the modality values by their range). A NIfTI image ``[x, y]`` is shown with x
    along the columns.
    """
    return read_radiograph(path, normalize)[0]


def read_radiograph(path: str | Path, normalize: str = "auto"):
    """(:func:`read_xray`'s image, the DICOM tags' ``radiograph.RadiographInfo`` or None for other files)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: X-ray image not found (expected a PNG, JPEG, TIFF, DICOM, NIfTI or .npy file)")
    suffix = _suffix(path)
    try:
        if is_dicom(path):
            from x2ct_framework.radiograph import read_dicom_radiograph

            if normalize not in ("auto", "dtype", "minmax", "none"):
                raise ValueError(f"normalize must be 'auto', 'dtype', 'minmax' or 'none', got {normalize!r}")
            a, info = read_dicom_radiograph(path, "minmax" if normalize == "dtype" else normalize)
            if not np.all(np.isfinite(a)):
                raise DataError(f"{path}: the image holds NaN or infinite values")
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None], info
        elif suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            a = np.asarray(nib.load(str(path)).dataobj)
            a = np.squeeze(a)
            if a.ndim == 2:
                a = a.T
        elif suffix == ".npy":
            a = np.squeeze(np.load(path))
        elif suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
                    im = im.convert("L")
                a = np.array(im)
            if a.dtype == np.int32 and a.max() <= 65535 and a.min() >= 0:  # 16-bit PNGs open as int32
                a = a.astype(np.uint16)
        else:
            raise DataError(f"{path}: unknown X-ray image type {suffix!r} (expected one of "
                            f"{', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES + ('.npy',))})")
    except DataError:
        raise
    except Exception as exc:  # readers raise many kinds for damaged files
        raise DataError(f"{path}: could not read the X-ray image ({type(exc).__name__}: {exc})") from exc
    if a.ndim != 2:
        raise DataError(f"{path}: expected a 2D grey-level X-ray image, got an array of shape {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{path}: the image holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(_normalise(a, normalize, path)))[None], None


def _nifti_reader(path) -> tuple[torch.Tensor, np.ndarray]:
    """NIfTI through nibabel, which refuses truncated files (SimpleITK fills the missing part with zeros)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    return torch.from_numpy(np.ascontiguousarray(data)), img.affine


def read_torchio(path: str | Path, label: bool = False, canonical: bool = True, files: list[Path] | None = None,
                 series: str = ""):
    """A CT (or label map with ``label=True``) as a loaded ``torchio`` image, reoriented to the canonical code.

    A folder is a DICOM case at any depth: its CT series is found and checked by
    ``x2ct_framework.dicom`` (``series`` chooses among several); ``files`` gives the series' files
    (in slice order) when they are known already.
    """
    import torchio as tio

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: volume not found (expected a NIfTI, NRRD, MHA file or a DICOM series folder)")
    if path.is_dir() and files is None:
        if not any(path.iterdir()):
            raise DataError(f"{path}: empty folder (expected a DICOM series)")
        from x2ct_framework.dicom import find_ct_series

        files = find_ct_series(path, path.name, series).files
    cls = tio.LabelMap if label else tio.ScalarImage
    try:
        if files is not None:
            from x2ct_framework.dicom import read_series

            data, affine = tio.io.sitk_to_nib(read_series(list(files), str(path)))
            image = cls(tensor=torch.as_tensor(np.ascontiguousarray(data)), affine=affine)
        else:
            image = cls(path, reader=_nifti_reader) if _suffix(path) in NIFTI_SUFFIXES else cls(path)
        image.load()
    except DataError:
        raise
    except Exception as exc:
        kind = "label map" if label else "CT volume"
        raise DataError(f"{path}: could not read the {kind} ({type(exc).__name__}: {exc}); expected a readable "
                        f"NIfTI/NRRD/MHA file or a DICOM series folder") from exc
    shape = tuple(image.data.shape)
    spatial = [s for s in shape[1:] if s > 1]
    if shape[0] != 1 or len(spatial) != 3:
        raise DataError(f"{path}: expected a single-channel 3D volume, got an image of shape {shape} "
                        f"(channels, x, y, z)")
    if canonical:
        image = tio.ToOrientation(CANONICAL_ORIENTATION)(image)
    return image


def obliquity_deg(affine) -> float:
    """The largest angle (degrees) between a voxel axis of ``affine`` and the world axis nearest to it."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    cols = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    return float(np.degrees(np.arccos(np.clip(np.abs(cols).max(axis=0), -1.0, 1.0))).max())


def check_hu_storage(hu, where: str) -> None:
    """Refuse a CT that is not in Hounsfield units (air near -1000), with the fix in the message.

    A CT stored as unsigned ``HU + 1024`` has its air near +24; one stored in attenuation or
    normalised units has almost no spread. The check looks at the 1st percentile (air around and
    inside the patient) of a strided sample of voxels.
    """
    t = torch.as_tensor(hu)
    sample = t.reshape(-1)[:: max(1, t.numel() // 200_000)].float()
    sample = sample[sample > -1500.0]  # below air: the scanner's padding outside the reconstructed circle
    if sample.numel() == 0:
        raise DataError(f"{where}: every voxel is below -1500 HU; expected a CT in Hounsfield units")
    low = float(torch.quantile(sample, 0.01))
    high = float(torch.quantile(sample, 0.99))
    if -1300.0 <= low <= -700.0:
        return
    if -100.0 <= low <= 300.0 and high > 900.0:
        raise DataError(f"{where}: the CT does not look like Hounsfield units: its darkest voxels are near "
                        f"{low:.0f} where air should be -1000; it seems stored as unsigned HU + 1024. Set "
                        f"data.hu_offset = -1024 (added to every voxel), or rewrite the file with "
                        f"RescaleIntercept -1024 / scl_inter = -1024")
    raise DataError(f"{where}: the CT does not look like Hounsfield units: 1st percentile {low:.4g}, 99th "
                    f"{high:.4g}, where air should be near -1000. Convert it to HU (set data.hu_offset if it "
                    f"is shifted), or set data.check_hu = false if the values are right")


def torchio_to_canonical(image) -> torch.Tensor:
    """The ``[D, H, W]`` tensor of a canonically oriented torchio image (its data is ``[1, W, H, D]``)."""
    return image.data[0].permute(2, 1, 0).contiguous()


def read_volume(path: str | Path, label: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CT in HU (or a label map) as ``(volume [D, H, W], spacing [3] (x, y, z) mm, affine [4, 4])``.

    ``affine`` maps the index ``(w, h, d, 1)`` to RAS+ world millimetres, so
    ``nibabel.Nifti1Image(volume.permute(2, 1, 0).numpy(), affine)`` writes it back.
    """
    image = read_torchio(path, label=label)
    vol = torchio_to_canonical(image)
    vol = vol.long() if label else vol.float()
    spacing = torch.tensor(image.spacing, dtype=torch.float32)
    affine = torch.as_tensor(np.asarray(image.affine), dtype=torch.float64)
    if not label and not torch.isfinite(vol).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values")
    return vol, spacing, affine


# ---- a CT on the framework's grid ---------------------------------------------------------------
CROPS = ("centre", "body", "lung")


class GridCT:
    """A CT resampled to the stage grid: HU ``[R, R, R]``, source labels (or None), the grid's affine
    (index ``(w, h, d, 1)`` -> RAS+ mm, so the grid overlays the source CT), and notes."""

    def __init__(self, hu, labels, affine, notes, body_cut: float, obliquity: float):
        self.hu, self.labels, self.affine, self.notes = hu, labels, affine, notes
        self.body_cut, self.obliquity = body_cut, obliquity


def _window_start(n: int, target: int, centre: float | None) -> int:
    """First index of a ``target``-long window over ``n`` voxels (negative or past the end means padding)."""
    if centre is None:
        return (n - target) // 2 if n > target else -((target - n) // 2)
    start = int(round(centre - (target - 1) / 2))
    if n >= target:
        return min(max(start, 0), n - target)  # keep the window inside the scan when the scan is large enough
    return start


def _crop_centre(hu: torch.Tensor, labels: torch.Tensor | None, crop: str) -> tuple[float, ...] | None:
    """The (d, h, w) index the crop window centres on, for ``crop`` = body or lung."""
    if crop == "centre":
        return None
    body = hu > -500.0
    if crop == "lung":
        import scipy.ndimage as ndi

        filled = torch.from_numpy(ndi.binary_fill_holes(body.numpy()))
        for d in range(body.shape[0]):  # lungs open to the airway: fill each axial slice as well
            filled[d] |= torch.from_numpy(ndi.binary_fill_holes(body[d].numpy()))
        mask = filled & (hu < -400.0)
        if not mask.any():
            return _crop_centre(hu, labels, "body")
    else:
        mask = body
    if not mask.any():
        return None
    idx = mask.nonzero()
    return tuple(float((idx[:, a].min() + idx[:, a].max()) / 2) for a in range(3))


# Plausible CT voxel sizes (mm, each axis): from micro-CT (0.01 mm) to the thickest slabs a scanner or a
# coarse phantom writes (50 mm). A header outside is a unit mistake (metres, micrometres) or damage: a
# 100000 mm voxel or a 0.0001 mm one would make an empty or all-air grid, so it is refused, naming the file.
VOXEL_MM_RANGE = (0.01, 50.0)


def check_voxel_size(spacing, where: str) -> None:
    """Refuse voxel sizes outside :data:`VOXEL_MM_RANGE` (a header in the wrong unit, or damaged)."""
    lo, hi = VOXEL_MM_RANGE
    values = [float(s) for s in spacing]
    if not all(np.isfinite(v) and lo <= v <= hi for v in values):
        raise DataError(f"{where}: voxel size {tuple(round(v, 6) for v in values)} mm is outside the plausible range "
                        f"{lo:g} to {hi:g} mm of a CT; the header's spacing is probably in another unit (metres, "
                        f"micrometres) or damaged: fix the file's voxel size (NIfTI pixdim, DICOM PixelSpacing and "
                        f"slice positions), or remove the case")


def load_grid_ct(path: str | Path, label_path: str | Path | None, resolution: int, volume_mm: float,
                 pad_hu: float = -1024.0, crop: str = "centre", hu_offset: float = 0.0, check_hu: bool = True,
                 files: list[Path] | None = None, series: str = "") -> GridCT:
    """Read a CT (and its label map), resample to isotropic ``volume_mm / resolution`` mm voxels
    (anti-aliased), and crop/pad to ``resolution^3`` around the scan centre, the body or the lungs.

    HU are rounded to integers after ``hu_offset`` is added; ``check_hu`` refuses a CT whose air is
    not near -1000 HU. ``body_cut`` is the share of the body (HU above -500) the crop leaves out.
    """
    import torchio as tio

    if crop not in CROPS:
        raise ValueError(f"crop must be one of {list(CROPS)}, got {crop!r}")
    path = Path(path)
    ct = read_torchio(path, files=files, series=series)
    check_voxel_size(ct.spacing, str(path))
    notes = []
    if hu_offset:
        ct.set_data(ct.data.float() + float(hu_offset))
    if check_hu:
        check_hu_storage(ct.data, str(path))
    oblique = obliquity_deg(ct.affine)
    if oblique > 1.0:
        notes.append(f"{path}: oblique voxel axes ({oblique:.1f} degrees from the patient axes); resampled onto "
                     f"the nearest patient axes")
    images = {"ct": ct}
    if label_path is not None:
        lab = read_torchio(label_path, label=True)
        if tuple(lab.spatial_shape) != tuple(ct.spatial_shape) or not np.allclose(
                np.asarray(lab.affine), np.asarray(ct.affine), atol=1e-2):
            raise DataError(f"{label_path}: the label map is on another grid than its CT {path} (shape "
                            f"{tuple(lab.spatial_shape)} vs {tuple(ct.spatial_shape)}, spacing "
                            f"{tuple(round(s, 3) for s in lab.spacing)} vs {tuple(round(s, 3) for s in ct.spacing)}); "
                            f"expected the same voxel grid")
        images["labels"] = lab
    r = int(resolution)
    subject = tio.Resample(volume_mm / r, antialias=True)(tio.Subject(**images))
    full = torchio_to_canonical(subject["ct"]).float()
    full_labels = torchio_to_canonical(subject["labels"]) if label_path is not None else None
    centre = _crop_centre(full, full_labels, crop)
    starts = [_window_start(n, r, None if centre is None else centre[a]) for a, n in enumerate(full.shape)]
    hu = _take(full, starts, r, pad_hu).round()
    if not torch.isfinite(hu).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values")
    labels = _take(full_labels, starts, r, 0) if full_labels is not None else None
    body = full > -500.0
    n_body = int(body.sum())
    kept = int(_take(body.to(torch.uint8), starts, r, 0).sum()) if n_body else 0
    body_cut = 1.0 - kept / n_body if n_body else 0.0
    shift = np.eye(4)
    shift[:3, 3] = [starts[2], starts[1], starts[0]]  # (w, h, d)
    affine = np.asarray(subject["ct"].affine, dtype=np.float64) @ shift
    return GridCT(hu, labels, affine, notes, body_cut, oblique)


def _take(vol: torch.Tensor, starts: list[int], size: int, value: float) -> torch.Tensor:
    """``vol[s:s+size]`` along each of the three axes, padded with ``value`` where the window leaves it."""
    import torch.nn.functional as F

    out = vol
    for axis, s in enumerate(starts):
        n = out.shape[axis]
        lo, hi = max(s, 0), min(s + size, n)
        out = out.narrow(axis, lo, max(hi - lo, 0))
        before, after = max(-s, 0), max(s + size - n, 0)
        if before or after:
            pads = [0, 0] * 3
            k = 2 - axis
            pads[2 * k], pads[2 * k + 1] = before, after
            out = F.pad(out.float(), pads, value=value).to(vol.dtype)
    return out


def grid_frame(affine) -> dict:
    """The world frame of a canonical grid, as a sidecar records it (ITK's origin/direction, LPS mm)."""
    a = np.asarray(affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    direction = lps @ (a[:3, :3] / spacing)
    return {"affine_ras": a.tolist(), "origin_lps": (lps @ a[:3, 3]).tolist(), "direction_lps": direction.tolist(),
            "spacing_mm": spacing.tolist()}
