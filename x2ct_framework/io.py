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

from x2ct_framework.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# Orientation code of the canonical [W, H, D] array (the tensor read as x, y, z): toward patient
# Left, Posterior, Inferior. ``torchio.ToOrientation`` takes this code.
CANONICAL_ORIENTATION = "LPI"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom(path: Path) -> bool:
    if _suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


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

    Attenuating structures are bright, as in the framework's DRRs: DICOM ``MONOCHROME1`` images are
    inverted. 8/16-bit images are divided by their type's maximum, other data scaled by min-max
    (``normalize`` = ``auto``, ``dtype``, ``minmax`` or ``none``). A NIfTI image ``[x, y]`` is shown with
    x along the columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: X-ray image not found (expected a PNG, JPEG, TIFF, DICOM, NIfTI or .npy file)")
    suffix = _suffix(path)
    try:
        if is_dicom(path):
            import pydicom

            ds = pydicom.dcmread(str(path))
            a = ds.pixel_array
            slope, intercept = float(getattr(ds, "RescaleSlope", 1.0)), float(getattr(ds, "RescaleIntercept", 0.0))
            if slope != 1.0 or intercept != 0.0:
                a = a.astype(np.float32) * slope + intercept
            if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
                a = a.max() - a if np.issubdtype(a.dtype, np.floating) else np.iinfo(a.dtype).max - a
                if normalize == "auto":
                    normalize = "minmax"
            if normalize == "auto":
                normalize = "minmax"  # detectors rarely use the full bit depth
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
    return torch.from_numpy(np.ascontiguousarray(_normalise(a, normalize, path)))[None]


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


def read_torchio(path: str | Path, label: bool = False, canonical: bool = True):
    """A CT (or label map with ``label=True``) as a loaded ``torchio`` image, reoriented to the canonical code."""
    import torchio as tio

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: volume not found (expected a NIfTI, NRRD, MHA file or a DICOM series folder)")
    if path.is_dir() and not any(p.is_file() for p in path.iterdir()):
        raise DataError(f"{path}: empty folder (expected a DICOM series)")
    cls = tio.LabelMap if label else tio.ScalarImage
    try:
        image = cls(path, reader=_nifti_reader) if _suffix(path) in NIFTI_SUFFIXES else cls(path)
        image.load()
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
