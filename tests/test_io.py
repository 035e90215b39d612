"""Readers: X-ray images and CT volumes in every supported format, canonical orientation, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from x2ct_framework.errors import DataError
from x2ct_framework.io import read_volume, read_xray


def write_dicom_slice(path, pixels: np.ndarray, *, position=(0.0, 0.0, 0.0), spacing=(1.0, 1.0), thickness=1.0,
                      photometric="MONOCHROME2", slope=1.0, intercept=0.0, series_uid=None, instance=1):
    """A minimal CT image slice that pydicom and GDCM read (16-bit signed, explicit little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid or "1.2.3.4.5"
    ds.FrameOfReferenceUID = "1.2.3.4.6"
    ds.Modality = "CT"
    ds.PatientID = "test"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
    ds.SliceThickness = float(thickness)
    ds.ImagePositionPatient = [float(p) for p in position]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_dicom_series(folder, vol_zyx: np.ndarray, spacing=(2.0, 2.0, 3.0)):
    """Slices of ``vol_zyx`` (index z toward the head, y posterior, x patient left: DICOM LPS)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(vol_zyx):
        write_dicom_slice(folder / f"slice{k:03d}.dcm", plane + 1024, position=(0.0, 0.0, k * spacing[2]),
                          spacing=spacing[:2], thickness=spacing[2], intercept=-1024.0, instance=k + 1)


# ---- X-ray images ----------------------------------------------------------------------------------
def test_png_8_and_16_bit_and_rgb(tmp_path):
    from PIL import Image

    a8 = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(a8).save(tmp_path / "a.png")
    x = read_xray(tmp_path / "a.png")
    assert x.shape == (1, 6, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(a8 / 255.0).float())
    a16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    Image.fromarray(a16).save(tmp_path / "b.png")
    assert torch.allclose(read_xray(tmp_path / "b.png")[0], torch.from_numpy(a16 / 65535.0).float(), atol=1e-6)
    rgb = np.stack([a8] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert torch.allclose(read_xray(tmp_path / "c.png"), x, atol=1 / 255)


def test_dicom_rescale_and_monochrome1(tmp_path):
    pixels = np.arange(20, dtype=np.int16).reshape(4, 5) * 10
    write_dicom_slice(tmp_path / "m2.dcm", pixels, slope=2.0, intercept=-5.0)
    write_dicom_slice(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    m2 = read_xray(tmp_path / "m2.dcm")
    assert m2.shape == (1, 4, 5)
    assert torch.allclose(m2[0], torch.from_numpy(pixels / pixels.max()).float(), atol=1e-6)  # min-max after rescale
    m1 = read_xray(tmp_path / "m1.dcm")
    assert torch.allclose(m1, 1.0 - m2, atol=1e-6)  # MONOCHROME1: bright = low values, inverted


def test_nifti_and_npy_images(tmp_path):
    import nibabel as nib

    a = np.random.default_rng(0).random((7, 5)).astype(np.float32)  # [x, y]
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "x.nii.gz")
    x = read_xray(tmp_path / "x.nii.gz")
    assert x.shape == (1, 5, 7)  # rows follow y, columns follow x
    assert torch.allclose(x[0], torch.from_numpy((a.T - a.min()) / (a.max() - a.min())))
    np.save(tmp_path / "y.npy", a.T[None])
    assert torch.allclose(read_xray(tmp_path / "y.npy"), x)


@pytest.mark.parametrize("make, words", [
    (lambda p: None, ["not found"]),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n broken"), ["could not read the X-ray image"]),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((3, 4, 5))),
     ["expected a 2D grey-level X-ray image", "(3, 4, 5)"]),
])
def test_bad_xray_files(tmp_path, make, words):
    path = tmp_path / "img.png"
    make(path)
    if not path.exists() and path.with_suffix(".npy").exists():
        path = path.with_suffix(".npy")
    with pytest.raises(DataError) as exc:
        read_xray(path)
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


# ---- volumes ----------------------------------------------------------------------------------------
def _marked(shape=(10, 12, 14)) -> np.ndarray:
    a = np.zeros(shape, np.float32)
    a[8, 1, 1] = 1.0  # near +x (toward the patient's right in RAS), low y, low z
    a[1, 10, 2] = 2.0  # high y (anterior in RAS)
    a[1, 1, 12] = 3.0  # high z (superior in RAS)
    return a


def test_nifti_volume_in_canonical_orientation(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(_marked(), np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "v.nii.gz")
    vol, spacing, affine = read_volume(tmp_path / "v.nii.gz")
    assert vol.shape == (14, 12, 10) and vol.dtype == torch.float32
    assert spacing.tolist() == [1.0, 2.0, 3.0]
    # canonical: W toward the patient's left, H toward posterior, D toward the feet
    assert (vol == 1).nonzero().tolist() == [[12, 10, 1]]  # right -> low W
    assert (vol == 2).nonzero().tolist() == [[11, 1, 8]]  # anterior -> low H
    assert (vol == 3).nonzero().tolist() == [[1, 10, 8]]  # superior -> low D
    back = nib.Nifti1Image(vol.permute(2, 1, 0).numpy(), affine.numpy())
    assert np.allclose(nib.as_closest_canonical(back).get_fdata(), _marked())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_match_nifti(tmp_path, suffix):
    import nibabel as nib
    import SimpleITK as sitk

    nib.save(nib.Nifti1Image(_marked(), np.diag([1.0, 2.0, 3.0, 1.0])), tmp_path / "v.nii.gz")
    img = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / f"v{suffix}"))
    ref, sp_ref, _ = read_volume(tmp_path / "v.nii.gz")
    vol, sp, _ = read_volume(tmp_path / f"v{suffix}")
    assert torch.equal(vol, ref) and torch.allclose(sp, sp_ref)


def test_dicom_series(tmp_path):
    rng = np.random.default_rng(1)
    vol_zyx = rng.integers(-1000, 1500, size=(6, 8, 10)).astype(np.int16)
    write_dicom_series(tmp_path / "series", vol_zyx)
    vol, spacing, _ = read_volume(tmp_path / "series")
    assert spacing.tolist() == [2.0, 2.0, 3.0]
    # DICOM LPS: x toward the left (= W), y posterior (= H), z toward the head (flipped to D)
    assert torch.equal(vol, torch.from_numpy(vol_zyx[::-1].copy()).float())


def test_bad_volumes(tmp_path):
    import nibabel as nib

    with pytest.raises(DataError, match="volume not found"):
        read_volume(tmp_path / "nope.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(DataError, match="expected a single-channel 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), tmp_path / "cut.nii")
    data = (tmp_path / "cut.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read_volume(tmp_path / "cut.nii")
    assert "cut.nii" in str(exc.value) and "could not read the CT volume" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        read_volume(tmp_path / "empty")


def test_label_maps_read_as_integers(tmp_path):
    import nibabel as nib

    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 3
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "l.nii.gz")
    vol, _, _ = read_volume(tmp_path / "l.nii.gz", label=True)
    assert vol.dtype == torch.long and int((vol == 3).sum()) == 8
