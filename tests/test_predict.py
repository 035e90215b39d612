"""x2ct predict: NIfTI orientation and spacing, geometry handling, resizing, batch mode, bad inputs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from test_evaluate import make_run
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import DataError
from x2ct_framework.runs import resolve_target
from x2ct_framework.evaluation.predict import canonical_affine, predict, save_nifti

# A model plugin that ignores its input and returns a fixed, asymmetric "anatomy" in canonical
# orientation [D, H, W] = superior->inferior, anterior->posterior, right->left. It records its inputs.
ECHO_PLUGIN = '''
import torch
import torch.nn as nn
from x2ct_framework.hookspecs import hookimpl

CALLS = []


def anatomy(r):
    """HU volume: air, a body box, a bright 'bone' block superior/anterior/left, a 'lung' posterior/right."""
    v = torch.full((r, r, r), -1000.0)
    v[1:-1, 1:-1, 1:-1] = 40.0
    v[2:5, 3:6, r - 6:r - 2] = 1000.0
    v[r - 7:r - 3, r - 6:r - 2, 2:6] = -800.0
    return v


class Echo(nn.Module):
    def __init__(self, *, resolution: int, hu_window: list = (-1000.0, 3000.0)):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        lo, hi = hu_window
        self.register_buffer("vol", ((anatomy(resolution) - lo) / (hi - lo))[None, None], persistent=False)

    def forward(self, xrays, geometry, prev=None):
        CALLS.append({"xrays": xrays.detach().clone(), "geometry": {k: v.clone() for k, v in geometry.items()}})
        return self.vol.expand(xrays.shape[0], -1, -1, -1, -1) * self.gain


@hookimpl
def register_models(register):
    register("echo_anatomy", Echo)
'''

ECHO_MODEL = 'name = "echo_anatomy"'


@pytest.fixture
def echo_run(tmp_path):
    (tmp_path / "echo_plugin.py").write_text(ECHO_PLUGIN)
    plugin = (tmp_path / "echo_plugin.py").as_posix()
    run = make_run(tmp_path, name="echo", model=ECHO_MODEL, **{'seed = 0': f'seed = 0\nplugins = ["{plugin}"]'})
    return run


def _echo():
    return sys.modules["x2ct_local_plugin_echo_plugin"]


def _write_png(path: Path, h: int = 16, w: int = 16, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(h, w), dtype=np.uint8)).save(path)
    return path


def _case(folder: Path, n: int = 2, h: int = 16, w: int = 16, geometry: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _write_png(folder / f"view{i}.png", h, w, seed=i)
    if geometry is not None:
        (folder / "geometry.toml").write_text(geometry)
    return folder


def test_predicted_nifti_has_the_canonical_orientation_spacing_and_anatomy(echo_run, tmp_path):
    from x2ct_framework.io import read_volume

    case = _case(tmp_path / "case1")
    out = tmp_path / "out" / "ct.nii.gz"
    res = predict(resolve_target(echo_run), [case / "view0.png", case / "view1.png"], out, geometry="recipe",
                  progress=False)
    assert [r.path for r in res] == [out]
    img = nib.load(str(out))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "I")
    spacing = 320.0 / 16  # the phantom's 320 mm field of view over 16 voxels
    assert img.header.get_zooms() == pytest.approx((spacing,) * 3)
    assert img.header.get_xyzt_units()[0] == "mm"
    assert np.allclose(np.linalg.inv(img.affine) @ [0, 0, 0, 1], [7.5, 7.5, 7.5, 1])  # isocentre at the centre
    anatomy = _echo().anatomy(16)
    data = np.asarray(img.dataobj)  # [x, y, z] = [W, H, D]
    np.testing.assert_allclose(data.transpose(2, 1, 0), anatomy.numpy(), atol=0.05)
    # the bone block (superior, anterior, patient left) lies at world x < 0 (L), y > 0 (A), z > 0 (S)
    ijk = np.argwhere(data > 500).mean(0)
    x, y, z, _ = img.affine @ [*ijk, 1]
    assert x < 0 and y > 0 and z > 0
    # reading it back through the framework's reader places the anatomy where it was
    vol, sp, _ = read_volume(out)
    np.testing.assert_allclose(vol.numpy(), anatomy.numpy(), atol=0.05)
    assert sp.tolist() == pytest.approx([spacing] * 3)
    meta = json.loads(out.with_name("ct.json").read_text())
    assert meta["orientation"].startswith("LPI") and meta["spacing_mm_xyz"] == pytest.approx([spacing] * 3)


def test_dicom_and_nifti_views_reach_the_model_in_the_given_order(echo_run, tmp_path):
    from test_io import write_dicom_slice

    from x2ct_framework.io import read_xray

    case = tmp_path / "mixed"
    case.mkdir()
    rng = np.random.default_rng(1)
    write_dicom_slice(case / "pa.dcm", rng.integers(0, 3000, size=(16, 16)))
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), str(case / "lat.nii.gz"))
    files = [case / "pa.dcm", case / "lat.nii.gz"]
    res = predict(resolve_target(echo_run), files, tmp_path / "out", geometry="recipe", progress=False)
    assert res[0].case_id == "mixed" and res[0].path == tmp_path / "out" / "mixed.nii.gz"
    seen = _echo().CALLS[-1]["xrays"][0]
    for i, f in enumerate(files):
        assert torch.allclose(seen[i], read_xray(f))


def test_geometry_file_orders_the_views_by_files(echo_run, tmp_path):
    from x2ct_framework.io import read_xray

    case = _case(tmp_path / "case", geometry='views = [0, 90]\nfiles = ["view1.png", "view0.png"]\n')
    predict(resolve_target(echo_run), [case], tmp_path / "out", progress=False, allow_geometry_mismatch=False)
    seen = _echo().CALLS[-1]["xrays"][0]
    assert torch.allclose(seen[0], read_xray(case / "view1.png"))
    assert torch.allclose(seen[1], read_xray(case / "view0.png"))
    (case / "geometry.toml").write_text('views = [0, 90]\nfiles = ["view1.png", "pa.png"]\n')
    with pytest.raises(DataError, match="files lists image.*pa.png"):
        predict(resolve_target(echo_run), [case], tmp_path / "out2", progress=False)


def test_canonical_affine_and_int16_output(tmp_path):
    a = canonical_affine((0.5, 0.75, 2.0), (4, 6, 8))
    assert nib.aff2axcodes(a) == ("L", "P", "I")
    assert np.allclose(a @ [3.5, 2.5, 1.5, 1], [0, 0, 0, 1])
    vol = torch.linspace(-1000, 2000, 4 * 6 * 8).reshape(4, 6, 8)
    p = save_nifti(tmp_path / "v.nii.gz", vol, (0.5, 0.75, 2.0), dtype="int16")
    img = nib.load(str(p))
    assert img.get_data_dtype() == np.int16 and img.header.get_zooms() == pytest.approx((0.5, 0.75, 2.0))
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 1, 0), vol.numpy(), atol=0.5)


def test_batch_mode_with_per_case_geometry_files_and_a_logged_resize(echo_run, tmp_path, caplog):
    root = tmp_path / "cases"
    _case(root / "a", geometry="views = [0, 90]\npreset = \"parallel\"\n")
    _case(root / "b", h=40, w=32, geometry="views = [0, 90]\n")
    with caplog.at_level(logging.INFO, logger="x2ct_framework.evaluation.predict"):
        res = predict(resolve_target(echo_run), [root], tmp_path / "out", batch_size=2, progress=False)
    assert sorted(r.case_id for r in res) == ["a", "b"]
    assert all(r.path.is_file() and r.path.name.endswith(".nii.gz") for r in res)
    b = next(r for r in res if r.case_id == "b")
    assert any("padded 40x32 to 40x40" in n for n in b.notes) and any("resized 40x40 to 16x16" in n for n in b.notes)
    assert any("resized 40x40 to 16x16" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "out" / "b.json").read_text())["notes"] == b.notes
    seen = _echo().CALLS[-1]
    assert seen["xrays"].shape == (2, 2, 1, 16, 16)
    assert seen["geometry"]["angles"].tolist() == [[0.0, 90.0], [0.0, 90.0]]


def test_preset_with_views_and_a_json_geometry_file(echo_run, tmp_path):
    case = _case(tmp_path / "c")
    res = predict(resolve_target(echo_run), [case], tmp_path / "o1", geometry="parallel", views=[0, 90],
                  progress=False)
    assert res[0].path.is_file()
    gfile = tmp_path / "geo.json"
    gfile.write_text(json.dumps({"angles": [0, 90], "volume_mm": 160.0}))
    res = predict(resolve_target(echo_run), [case], tmp_path / "o2", geometry=str(gfile), progress=False,
                  allow_geometry_mismatch=True)
    assert res[0].spacing == pytest.approx((10.0, 10.0, 10.0))  # 160 mm over 16 voxels


@pytest.mark.parametrize("setup,kwargs,message", [
    ("three_views", {"geometry": "parallel", "views": [0, 45, 90]}, "the model was trained with 2"),
    ("two_views", {}, "no geometry; pass --geometry recipe"),
    ("two_views", {"geometry": "parallel"}, "needs the view angles too"),
    ("two_views", {"geometry": "parallel", "views": [0]}, "2 image(s) but the geometry"),
    ("two_views", {"geometry": "parallel", "views": [0, 60]}, "differ from the training angles"),
    ("two_views", {"geometry": "x2ctgan", "views": [0, 90]}, "pass --allow-geometry-mismatch"),
    ("two_views", {"geometry": "fanbeam", "views": [0, 90]}, "unknown geometry preset 'fanbeam'"),
    ("big_views", {"geometry": "recipe", "resize": "off"}, "image is 32x32 but the model was trained on 16x16"),
    ("broken_image", {"geometry": "recipe"}, "could not read the X-ray image"),
    ("bad_geometry_key", {}, "unknown geometry key(s) 'sidd'"),
    ("bad_geometry_toml", {}, "not a valid TOML geometry file"),
    ("empty_folder", {"geometry": "recipe"}, "no X-ray images found"),
])
def test_bad_inputs_are_clear_errors(echo_run, tmp_path, setup, kwargs, message):
    case = tmp_path / "case"
    if setup == "three_views":
        _case(case, n=3)
    elif setup == "big_views":
        _case(case, h=32, w=32)
    elif setup == "broken_image":
        _case(case)
        (case / "view1.png").write_bytes(b"\x89PNG this is not an image")
    elif setup == "bad_geometry_key":
        _case(case, geometry="views = [0, 90]\nsidd = 500\n")
    elif setup == "bad_geometry_toml":
        _case(case, geometry="views = [0, 90\n")
    elif setup == "empty_folder":
        case.mkdir()
    else:
        _case(case)
    with pytest.raises(DataError) as exc:
        predict(resolve_target(echo_run), [case], tmp_path / "out", progress=False, **kwargs)
    assert message in str(exc.value)
    if setup == "broken_image":
        assert "view1.png" in str(exc.value)
    assert not (tmp_path / "out").exists()  # nothing is written when an input is bad


def test_predict_cli_success_and_exit_status_2(echo_run, tmp_path, capsys):
    case = _case(tmp_path / "case")
    out = tmp_path / "pred"
    assert x2ct_main(["predict", str(echo_run), str(case), "--geometry", "recipe", "--out", str(out),
                      "--device", "cpu", "--no-progress"]) == 0
    assert (out / "case.nii.gz").is_file() and "case.nii.gz" in capsys.readouterr().out
    _write_png(case / "view2.png")
    assert x2ct_main(["predict", str(echo_run), str(case), "--geometry", "recipe", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "3 image(s)" in err and "Traceback" not in err
    assert x2ct_main(["predict", str(echo_run), str(tmp_path / "missing.png"), "--geometry", "recipe"]) == 2
    assert "input not found" in capsys.readouterr().err


def test_round_trip_through_ct_folder_places_anatomy_where_it_was(echo_run, tmp_path):
    """A predicted NIfTI read back as training data by ``ct_folder`` holds the anatomy at the same voxels."""
    from x2ct_framework.plugins import get_plugin_manager
    from x2ct_framework.stage import Stage

    case = _case(tmp_path / "case")
    folder = tmp_path / "cts"
    predict(resolve_target(echo_run), [case], folder / "case.nii.gz", geometry="recipe", progress=False)
    (folder / "case.json").unlink()
    ds = get_plugin_manager().registry("dataset").create(
        "ct_folder", {"root": str(folder), "views": [0, 90], "geometry": "parallel", "volume_mm": 320.0,
                      "split_fractions": [1.0, 0.0, 0.0]}, split="train", stage=Stage("stage1", 1, 16, {}))
    assert len(ds) == 1
    item = ds[0]
    anatomy = _echo().anatomy(16)
    ct_hu = item["ct"][0] * 4000.0 - 1000.0
    assert tuple(ct_hu.shape) == (16, 16, 16)
    assert float((ct_hu - anatomy).abs().max()) < 1.0
    assert item["spacing"].tolist() == pytest.approx([20.0, 20.0, 20.0])


def _centre(img) -> np.ndarray:
    return np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))


def test_predict_like_ct_overlays_the_reference_ct(echo_run, tmp_path):
    """The output opens in the reference CT's frame: SimpleITK puts both centres at the same point."""
    import SimpleITK as sitk

    from x2ct_framework.phantom import chest_phantom

    hu, _ = chest_phantom(32, seed=4)  # 10 mm voxels; 24 slices: a 320 x 320 x 240 mm scan
    affine = np.diag([-10.0, -10.0, -10.0, 1.0])
    centre = np.array([-13.7, -8.0, -175.0])  # RAS mm, as a real chest CT's centre
    affine[:3, 3] = centre - affine[:3, :3] @ np.array([15.5, 15.5, 11.5])
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu[4:28].permute(2, 1, 0).numpy().astype(np.int16), affine), str(ct))
    case = _case(tmp_path / "case1")
    out = tmp_path / "out" / "pred.nii.gz"
    assert x2ct_main(["predict", str(echo_run), str(case), "--geometry", "recipe", "--out", str(out), "--like",
                      str(ct), "--device", "cpu", "--no-progress"]) == 0
    src, pred = sitk.ReadImage(str(ct)), sitk.ReadImage(str(out))
    assert pred.GetSpacing() == pytest.approx((20.0,) * 3)  # the model's 16^3 grid over 320 mm
    assert np.abs(_centre(pred) - _centre(src)).max() < 20.0  # same physical centre within a voxel
    assert np.allclose(np.array(pred.GetDirection()).reshape(3, 3), np.array(src.GetDirection()).reshape(3, 3))
    meta = json.loads(out.with_name("pred.json").read_text())
    assert meta["frame"]["like"] == str(ct)
    assert np.allclose(meta["frame"]["origin_lps"], pred.GetOrigin())
    # without --like the isocentre sits at the origin, and the sidecar says so
    plain = tmp_path / "out" / "plain.nii.gz"
    predict(resolve_target(echo_run), [case], plain, geometry="recipe", progress=False)
    assert np.abs(_centre(sitk.ReadImage(str(plain)))).max() < 1e-6
    assert "origin" in json.loads(plain.with_name("plain.json").read_text())["frame"]["placed"]
    # a case folder naming its CT (the paired_xray layout) is placed in that CT's frame without --like
    paired = _case(tmp_path / "paired", geometry='views = [0, 90]\nct = "ct.nii.gz"\n')
    (paired / "ct.nii.gz").write_bytes(ct.read_bytes())
    res = predict(resolve_target(echo_run), [paired], tmp_path / "out2", progress=False)
    assert np.abs(_centre(sitk.ReadImage(str(res[0].path))) - _centre(src)).max() < 20.0
