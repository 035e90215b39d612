"""DICOM radiographs read as they are: grey-scale pipeline (MONOCHROME1/2, VOI LUT by window and by sequence,
Presentation LUT Shape, rescale, 10-16 bits stored), orientation from ViewPosition / PatientOrientation,
blank borders, geometry from the tags (assumptions named), contradictory tags refused; x2ct predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from x2ct_framework.errors import DataError
from x2ct_framework.io import read_radiograph, read_xray
from x2ct_framework.physics.geometry import to_stored
from x2ct_framework.radiograph import ASSUMED_DETECTOR_MM, geometry_from_tags


def attenuation(h: int = 24, w: int = 20) -> np.ndarray:
    """A detector-frame 'radiograph' in [0, 1]: a body, a bright bone block at the head end on the image's
    left (rows 2-5, columns 2-5), the rest darker; attenuating = high."""
    a = np.full((h, w), 0.1)
    a[1:-1, 1:-1] = 0.4
    a[2:6, 2:6] = 0.95
    a[h - 6:h - 2, w - 7:w - 3] = 0.2
    return a


def write_dx(path, display: np.ndarray, *, bits: int = 12, photometric: str = "MONOCHROME2", view: str | None = "PA",
             orientation: tuple[str, str] | None = ("L", "F"), window: tuple[float, float] | None = None,
             voi_lut: np.ndarray | None = None, shape: str | None = None, imager=(0.5, 0.5), spacing=None,
             sdd: float | None = 1800.0, sid: float | None = 1600.0, slope: float = 1.0, intercept: float = 0.0,
             stored: np.ndarray | None = None):
    """A DX image whose stored values show ``display`` (in [0, 1], bright = attenuating) through its tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    top = 2 ** bits - 1
    if stored is None:
        values = display if photometric == "MONOCHROME2" else 1.0 - display
        stored = np.round(values * top).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if view is not None:
        ds.ViewPosition = view
    if orientation is not None:
        ds.PatientOrientation = list(orientation)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        item.add_new(0x00283006, "US", [int(v) for v in voi_lut])  # LUTData
        ds.VOILUTSequence = Sequence([item])
    if shape is not None:
        ds.PresentationLUTShape = shape
    if imager is not None:
        ds.ImagerPixelSpacing = list(imager)
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if sdd is not None:
        ds.DistanceSourceToDetector = sdd
    if sid is not None:
        ds.DistanceSourceToPatient = sid
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_polarity_and_bit_depths(tmp_path, bits, photometric):
    att = attenuation()
    img = read_xray(write_dx(tmp_path / "x.dcm", att, bits=bits, photometric=photometric))[0].numpy()
    expected = (att - att.min()) / (att.max() - att.min())  # no VOI LUT: the values' range
    np.testing.assert_allclose(img, expected, atol=2.0 / (2 ** bits - 1) / (att.max() - att.min()))
    assert img[2:6, 2:6].mean() > img[8:14, 8:14].mean()  # the bone is bright


def test_bits_above_bits_stored_are_ignored(tmp_path):
    att = attenuation()
    stored = np.round(att * 1023).astype(np.uint16) | (1 << 13)  # an overlay bit above 10 bits stored
    img = read_xray(write_dx(tmp_path / "x.dcm", att, bits=10, stored=stored))[0].numpy()
    np.testing.assert_allclose(img, (att - att.min()) / (att.max() - att.min()), atol=2e-3)


@pytest.mark.parametrize("photometric,shape", [("MONOCHROME2", None), ("MONOCHROME1", None),
                                               ("MONOCHROME1", "INVERSE"), ("MONOCHROME2", "INVERSE")])
def test_voi_window_and_presentation_shape(tmp_path, photometric, shape):
    att = attenuation() + 0.002 * np.arange(20)  # no uniform edge: nothing taken for a collimator shutter
    stored = np.round((att if photometric == "MONOCHROME2" else 1 - att) * 4095).astype(np.uint16)
    c, w = 2100.0, 4400.0  # the whole stored range inside the window: no saturated edge
    img = read_xray(write_dx(tmp_path / "x.dcm", att, photometric=photometric, window=(c, w), shape=shape,
                             stored=stored))[0].numpy()
    x = stored.astype(np.float64)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1, LINEAR
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        expected = 1 - expected
    np.testing.assert_allclose(img, expected, atol=1e-6)
    # the displayed polarity is followed: MONOCHROME2 + INVERSE (non-standard) is shown, and read, inverted
    bright = shape != "INVERSE" or photometric == "MONOCHROME1"
    assert (img[2:6, 2:6].mean() > img[8:14, 8:14].mean()) == bright


def test_voi_lut_sequence_and_rescale(tmp_path):
    att = attenuation()
    stored = np.round(att * 4095).astype(np.uint16)
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)
    img = read_xray(write_dx(tmp_path / "x.dcm", att, voi_lut=lut, window=(10.0, 20.0), slope=1.0,
                             stored=stored))[0].numpy()
    np.testing.assert_allclose(img, lut[stored] / 65535.0, atol=1e-6)  # the sequence wins over the window
    rescaled = read_xray(write_dx(tmp_path / "r.dcm", att, slope=2.0, intercept=-100.0, window=(3995.0, 8000.0),
                                  stored=stored))[0].numpy()
    x = stored * 2.0 - 100.0  # the window applies to the rescaled (modality) values
    np.testing.assert_allclose(rescaled, np.clip((x - 3994.5) / 7999 + 0.5, 0, 1), atol=1e-6)


@pytest.mark.parametrize("view,orientation,stored_as", [
    ("PA", ("L", "F"), "identity"), ("PA", ("R", "H"), "rot180"), ("PA", ("F", "L"), "transpose"),
    ("AP", ("L", "F"), "fliplr"), ("AP", None, "fliplr"), ("AP", ("R", "F"), "identity"),
    ("LL", ("P", "F"), "identity"), ("LL", ("A", "F"), "fliplr"), ("RL", ("A", "F"), "identity"),
    ("RL", None, "identity"), (None, None, "identity")])
def test_orientation_to_the_detector_frame(tmp_path, view, orientation, stored_as):
    att = attenuation(20, 20)  # square, so a transposed image keeps its shape
    stored = to_stored(torch.from_numpy(att), stored_as).numpy()
    img, info = read_radiograph(write_dx(tmp_path / "x.dcm", stored, view=view, orientation=orientation))
    expected = (att - att.min()) / (att.max() - att.min())
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-3)
    assert info.angle == {"PA": 0.0, "AP": 180.0, "LL": 90.0, "RL": 270.0, None: 0.0}[view]
    assert info.sources["angle"].startswith("ViewPosition") == (view is not None)


def test_contradictory_orientation_names_the_tags(tmp_path):
    path = write_dx(tmp_path / "x.dcm", attenuation(), view="PA", orientation=("P", "F"))
    with pytest.raises(DataError, match="PatientOrientation P.F contradicts ViewPosition PA"):
        read_xray(path)


def test_blank_collimated_borders_become_no_attenuation(tmp_path):
    att = attenuation()
    att[:3] = 1.0  # a shutter: unexposed, shown white
    att[:, -2:] = 1.0
    img = read_radiograph(write_dx(tmp_path / "x.dcm", att))
    assert float(img[0][0, :3].abs().max()) == 0.0 and float(img[0][0, :, -2:].abs().max()) == 0.0
    assert img[0][0, 3:, :-2].max() > 0.5 and any("blank collimated borders" in n for n in img[1].notes)


def test_geometry_from_tags_and_named_assumptions(tmp_path):
    att = attenuation()
    pa = read_radiograph(write_dx(tmp_path / "pa.dcm", att, view="PA"))[1]
    lat = read_radiograph(write_dx(tmp_path / "lat.dcm", att, view="LL", orientation=("P", "F")))[1]
    spec, lines = geometry_from_tags([pa, lat])
    assert spec["views"] == [0.0, 90.0]
    assert spec["preset"]["sdd"] == 1800.0 and spec["preset"]["sid"] == 1600.0
    assert spec["preset"]["detector_mm"] == pytest.approx([20 * 0.5, 24 * 0.5])  # ImagerPixelSpacing x pixels
    assert any("DistanceSourceToDetector" in line for line in lines)
    # PixelSpacing only: at the patient, scaled by sdd / sid
    p = read_radiograph(write_dx(tmp_path / "p.dcm", att, imager=None, spacing=(0.4, 0.4)))[1]
    assert geometry_from_tags([p])[0]["preset"]["detector_mm"] == pytest.approx([20 * 0.4 * 1800 / 1600,
                                                                                24 * 0.4 * 1800 / 1600])
    # missing and zero spacing, missing distances: named assumptions
    for kwargs in ({"imager": None}, {"imager": (0.0, 0.0)}):
        q = read_radiograph(write_dx(tmp_path / "q.dcm", att, sdd=None, sid=None, **kwargs))[1]
        spec, lines = geometry_from_tags([q])
        assert max(spec["preset"]["detector_mm"]) == pytest.approx(ASSUMED_DETECTOR_MM)
        text = "\n".join(lines)
        assert "assumed 430 mm" in text and "1800 mm is assumed" in text and "sid = sdd - 200" in text
        assert ("zero" if kwargs["imager"] else "absent") in text


def test_contradictory_distances_and_spacing_name_the_tags(tmp_path):
    att = attenuation()
    with pytest.raises(DataError, match="DistanceSourceToPatient 2000 mm is not below DistanceSourceToDetector"):
        read_radiograph(write_dx(tmp_path / "a.dcm", att, sdd=1800.0, sid=2000.0))
    with pytest.raises(DataError, match="PixelSpacing .* exceeds ImagerPixelSpacing"):
        read_radiograph(write_dx(tmp_path / "b.dcm", att, imager=(0.2, 0.2), spacing=(0.3, 0.3)))


def test_predict_infers_the_geometry_from_the_tags(tmp_path, capsys):
    from test_predict import ECHO_MODEL, ECHO_PLUGIN  # noqa: F401
    from test_evaluate import make_run

    from x2ct_framework.cli import main as x2ct_main

    (tmp_path / "echo_plugin.py").write_text(ECHO_PLUGIN)
    plugin = (tmp_path / "echo_plugin.py").as_posix()
    run = make_run(tmp_path, name="echo", model=ECHO_MODEL, **{'seed = 0': f'seed = 0\nplugins = ["{plugin}"]'})
    case = tmp_path / "case"
    case.mkdir()
    write_dx(case / "a_pa.dcm", attenuation(16, 16), view="PA")
    write_dx(case / "b_lat.dcm", attenuation(16, 16), view="LL", orientation=("P", "F"))
    out = tmp_path / "pred"
    code = x2ct_main(["predict", str(run), str(case), "--out", str(out), "--device", "cpu", "--no-progress",
                      "--allow-geometry-mismatch"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "angle 0 degrees from ViewPosition PA" in printed and "angle 90 degrees from ViewPosition LL" in printed
    assert "sdd 1800 mm from DistanceSourceToDetector" in printed
    meta = json.loads((out / "case.json").read_text())
    assert meta["geometry_from"] == "the DICOM tags" and meta["geometry"]["sdd"][0] == 1800.0
    assert any("DistanceSourceToPatient" in n for n in meta["notes"])
    write_dx(case / "b_lat.dcm", attenuation(16, 16), view="LL", orientation=("P", "F"), sdd=1800.0, sid=1900.0)
    assert x2ct_main(["predict", str(run), str(case), "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "DistanceSourceToPatient 1900 mm is not below DistanceSourceToDetector" in err and "Traceback" not in err


def test_match_histogram_against_scikit_image():
    exposure = pytest.importorskip("skimage.exposure")
    from x2ct_framework.evaluation.predict import match_histogram

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 32, 32, generator=g) ** 3
    reference = torch.rand(1, 32, 32, generator=g) ** 0.5
    ours = match_histogram(image, reference)
    ref = exposure.match_histograms(image.numpy(), reference.numpy())
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-3)
    assert torch.equal(ours.flatten().sort().values, reference.flatten().sort().values)  # its exact histogram


def test_predict_match_histogram_feeds_training_grey_levels(tmp_path):
    from test_predict import ECHO_MODEL, ECHO_PLUGIN, _echo  # noqa: F401
    from test_evaluate import make_run

    from x2ct_framework.evaluation.predict import predict, training_inputs
    from x2ct_framework.runs import resolve_target

    (tmp_path / "echo_plugin.py").write_text(ECHO_PLUGIN)
    plugin = (tmp_path / "echo_plugin.py").as_posix()
    run = make_run(tmp_path, name="echo", model=ECHO_MODEL, **{'seed = 0': f'seed = 0\nplugins = ["{plugin}"]'})
    target = resolve_target(run)
    training = training_inputs(target)
    size = training.image_shape
    case = tmp_path / "case"
    case.mkdir()
    for i in range(training.views):
        np.save(case / f"v{i}.npy", np.random.default_rng(i).random(size).astype(np.float32) ** 4)
    predict(target, [case / f"v{i}.npy" for i in range(training.views)], tmp_path / "out", geometry="recipe",
            progress=False, match_histogram=True)
    seen = _echo().CALLS[-1]["xrays"][0]
    for i in range(training.views):
        assert torch.allclose(seen[i].flatten().sort().values, training.xrays[i].flatten().sort().values, atol=1e-6)
