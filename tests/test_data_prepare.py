"""Real data at scale (issue 17): TCIA-like DICOM trees, cache identity, label presets, frames, messy folders."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from x2ct_framework.errors import DataError
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage


def create(name: str, split: str = "train", resolution: int = 16, **options):
    reg = get_plugin_manager().registry("dataset")
    return reg.create(name, options, split=split, stage=Stage("s", 1, resolution, {}))


def write_series(folder, vol_zyx: np.ndarray, uid: str, *, spacing=(20.0, 20.0, 20.0), modality="CT", skip=(),
                 origin=(0.0, 0.0, 0.0)):
    """A DICOM series written slice by slice (z toward the head), leaving out the slice indices in ``skip``."""
    import pydicom
    from test_io import write_dicom_slice

    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in enumerate(vol_zyx):
        if k in skip:
            continue
        path = folder / f"{k:03d}.dcm"
        write_dicom_slice(path, plane + 1024, position=(origin[0], origin[1], origin[2] + k * spacing[2]),
                          spacing=spacing[:2], thickness=spacing[2], intercept=-1024.0, instance=k + 1,
                          series_uid=uid)
        if modality != "CT":
            ds = pydicom.dcmread(str(path))
            ds.Modality = modality
            ds.save_as(str(path))


@pytest.fixture(scope="module")
def phantom8():
    """An 8-slice 16x16 CT (a phantom's middle, HU) as DICOM z-order."""
    hu, _ = chest_phantom(16, seed=3)
    return hu[4:12].flip(0).numpy().astype(np.int16)


# ---- DICOM discovery --------------------------------------------------------------------------
def test_tcia_nested_layout_picks_the_ct_series(tmp_path, phantom8):
    from x2ct_framework.dicom import find_ct_series

    root = tmp_path / "LIDC-IDRI"
    for p in ("LIDC-0001", "LIDC-0002"):
        write_series(root / p / "01-01-2000-NA-CT CHEST-1" / "3000566.000000-NA-03192", phantom8, f"1.2.{p[-1]}.1")
    # a non-CT series (segmentation) beside the CT of the first patient, and an XML annotation file
    write_series(root / "LIDC-0001" / "01-01-2000-NA-CT CHEST-1" / "300.000000-SEG-1", phantom8[:2], "1.2.1.9",
                 modality="SEG")
    (root / "LIDC-0001" / "01-01-2000-NA-CT CHEST-1" / "3000566.000000-NA-03192" / "069.xml").write_text("<x/>")
    series = find_ct_series(root / "LIDC-0001")
    assert series.uid == "1.2.1.1" and series.slices == 8 and series.slice_step == pytest.approx(20.0)
    ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False)
    assert sorted(c.name for c in ds.cases) == ["LIDC-0001", "LIDC-0002"]
    item = ds[0]
    assert item["ct"].shape == (1, 16, 16, 16)
    # the 8 slices (160 mm) sit in the middle of the 320 mm field of view, padded with air above and below
    hu = item["ct"][0] * 4000 - 1000
    assert torch.allclose(hu[4:12], torch.from_numpy(phantom8.astype(np.float32)).flip(0), atol=1.0)
    assert (hu[:4] < -990).all()


def test_missing_slice_and_two_series_are_errors_naming_case_and_series(tmp_path, phantom8, caplog):
    root = tmp_path / "cts"
    write_series(root / "gap" / "study" / "s1", phantom8, "9.9.1", skip=(3,))
    write_series(root / "two" / "study" / "s1", phantom8, "9.9.2")
    write_series(root / "two" / "study" / "s2", phantom8[:6], "9.9.3")
    write_series(root / "onlyseg" / "s", phantom8, "9.9.4", modality="SEG")
    with pytest.raises(DataError) as exc:
        create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False)
    msg = str(exc.value)
    assert "'gap'" in msg and "9.9.1" in msg and "missing slice" in msg and "40.00 mm" in msg
    write_series(root / "fine" / "s", phantom8, "9.9.5")
    with caplog.at_level(logging.WARNING):
        ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, on_bad_case="skip")
    assert [c.name for c in ds.cases] == ["fine"]
    text = caplog.text
    assert "'two'" in text and "9.9.2" in text and "9.9.3" in text and 'series = "largest"' in text
    assert "'onlyseg'" in text and "no CT series" in text and "SEG" in text


def test_series_choice_largest_or_uid(tmp_path, phantom8):
    root = tmp_path / "cts"
    write_series(root / "two" / "a", phantom8, "9.9.2")
    write_series(root / "two" / "b", phantom8[:6], "9.9.3")
    largest = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, series="largest")
    assert largest.cases[0].series_uid == "9.9.2" and len(largest.cases[0].files) == 8
    by_uid = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, series="9.9.3")
    assert len(by_uid.cases[0].files) == 6
    with pytest.raises(DataError, match="no series with SeriesInstanceUID 1.2.3"):
        create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, series="1.2.3")


def test_the_manifest_notices_changes_at_any_depth_and_reads_no_header_when_nothing_changed(tmp_path, phantom8,
                                                                                              monkeypatch):
    import pydicom

    import x2ct_plugins.datasets.ct_folder as mod

    root, cache = tmp_path / "cts", tmp_path / "cache"
    write_series(root / "p1" / "study" / "a", phantom8, "7.7.1", skip=(3,))  # a missing slice: a bad case
    write_series(root / "p2" / "study" / "a", phantom8, "7.7.2")
    save(root / "v.nii.gz", torch.from_numpy(phantom8.astype(np.float32)).flip(0).repeat(2, 1, 1))
    reads = []
    real_dcmread, real_header = pydicom.dcmread, mod._check_header
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append("dicom") or real_dcmread(*a, **k))
    monkeypatch.setattr(mod, "_check_header", lambda *a, **k: reads.append("volume") or real_header(*a, **k))
    opts = dict(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(cache), on_bad_case="skip", series="largest")
    first = create("ct_folder", **opts)
    assert sorted(c.name for c in first.cases) == ["p2", "v"] and reads.count("volume") == 1
    assert reads.count("dicom") >= 15
    reads.clear()
    again = create("ct_folder", **opts)  # nothing changed: the manifest, no header read
    assert reads == [] and sorted(c.name for c in again.cases) == ["p2", "v"]
    # the missing slice arrives two levels below the case folder: only p1/study/a's time changes
    top = (root / "p1").stat().st_mtime_ns, (root / "p1" / "study").stat().st_mtime_ns
    write_series(tmp_path / "full", phantom8, "7.7.1")
    (tmp_path / "full" / "003.dcm").rename(root / "p1" / "study" / "a" / "003.dcm")
    assert ((root / "p1").stat().st_mtime_ns, (root / "p1" / "study").stat().st_mtime_ns) == top
    found = create("ct_folder", **opts)
    assert sorted(c.name for c in found.cases) == ["p1", "p2", "v"] and reads.count("dicom") >= 16
    # a larger series added deeper in a case (series = "largest" takes it), its last slice removed, a volume
    # file replaced: each is noticed
    for change in ("series", "removed", "volume"):
        if change == "series":
            write_series(root / "p2" / "study" / "b", np.concatenate([phantom8, phantom8[:2]]), "7.7.3")
        elif change == "removed":
            (root / "p2" / "study" / "b" / "009.dcm").unlink()
        else:
            save(root / "v.nii.gz", torch.from_numpy(phantom8.astype(np.float32)).flip(0).repeat(3, 1, 1))
        reads.clear()
        ds = create("ct_folder", **opts)
        assert reads, f"a change ({change}) was not noticed"
        p2 = next(c for c in ds.cases if c.name == "p2")
        assert (p2.series_uid, len(p2.files)) == ("7.7.3", {"series": 10, "removed": 9, "volume": 9}[change])
    reads.clear()
    create("ct_folder", **opts)
    assert reads == []
    create("ct_folder", **opts).manifest(rescan=True)  # x2ct prepare --rescan: discovery whatever the times say
    assert reads.count("dicom") >= 16


# ---- the cache ----------------------------------------------------------------------------------
def save(path, vol: torch.Tensor, spacing: float = 20.0, dtype=np.int16, origin=None):
    """A canonical [D, H, W] volume as NIfTI ([W, H, D] toward Left, Posterior, Inferior), voxel 0 at ``origin``."""
    import nibabel as nib

    affine = np.diag([-spacing, -spacing, -spacing, 1.0])
    if origin is not None:
        affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(vol.permute(2, 1, 0).numpy().astype(dtype), affine), str(path))


def test_replaced_ct_behind_a_warm_cache_is_read_again(tmp_path):
    root, cache = tmp_path / "cts", tmp_path / "cache"
    root.mkdir()
    first, _ = chest_phantom(16, seed=1)
    second, _ = chest_phantom(16, seed=2)
    save(root / "a.nii.gz", first)
    opts = dict(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(cache), geometry="parallel")
    old = create("ct_folder", **opts)[0]
    assert torch.allclose(old["ct"][0] * 4000 - 1000, first, atol=0.5)
    save(root / "a.nii.gz", second)  # the same path, another CT
    new = create("ct_folder", **opts)[0]
    assert torch.allclose(new["ct"][0] * 4000 - 1000, second, atol=0.5)
    from x2ct_framework.physics import drr, make_geometry

    ref = drr(new["ct"][None], {k: v[None] for k, v in make_geometry([0, 90], "parallel").items()},
              (-1000.0, 3000.0), det_shape=(16, 16))[0]
    assert torch.allclose(new["xrays"], ref, atol=1e-5)  # the X-rays are the new CT's, not the cached old ones
    assert not torch.allclose(new["xrays"], old["xrays"], atol=1e-3)
    assert len(list((cache / "volume").glob("*/*/meta.json"))) == 2


def test_values_beyond_int16_survive_the_cache(tmp_path):
    root, cache = tmp_path / "cts", tmp_path / "cache"
    root.mkdir()
    hu, _ = chest_phantom(16, seed=1)
    hu[8, 8, 6:9] = 40000.0  # metal
    save(root / "metal.nii.gz", hu, dtype=np.int32)
    opts = dict(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(cache), hu_window=[-1000, 41000])
    cold = create("ct_folder", **opts)[0]
    warm = create("ct_folder", **opts)[0]
    for item in (cold, warm):
        assert float(item["ct"][0, 8, 8, 7]) * 42000 - 1000 == pytest.approx(40000.0, abs=1.0)
    assert torch.equal(cold["ct"], warm["ct"])
    stored = np.load(next((cache / "volume").glob("*/*/hu.npy")), mmap_mode="r")
    assert stored.dtype == np.int32 and int(stored.max()) == 40000


# ---- x2ct prepare -------------------------------------------------------------------------------
PREPARE_RECIPE = """
name = "prep"
seed = 0
output_dir = "{out}"

[data]
name = "ct_folder"
root = "{root}"
cache_dir = "{cache}"
views = [0, 90]
geometry = "parallel"

[model]
name = "vit_cascade"
tokens = 4
dim = 16
depth = 1
heads = 2
channels = 4
encoder = "test_resnet"

[[stages]]
name = "stage1"
resolution = 8
epochs = 1
losses = {{ l1 = 1.0 }}

[[stages]]
name = "stage2"
resolution = 16
epochs = 1
losses = {{ l1 = 1.0 }}
"""


def test_prepare_fills_the_cache_resumes_and_datasets_read_the_manifest(tmp_path, monkeypatch, capsys):
    import x2ct_plugins.datasets.ct_folder as mod
    from x2ct_framework.cli import main

    root, cache = tmp_path / "cts", tmp_path / "cache"
    root.mkdir()
    for i in range(3):
        save(root / f"case{i}.nii.gz", chest_phantom(16, seed=20 + i)[0])
    recipe = tmp_path / "prep.toml"
    recipe.write_text(PREPARE_RECIPE.format(out=tmp_path / "runs", root=root, cache=cache))
    assert main(["prepare", str(recipe), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 6, already cached 0, failed 0" in out and "cases/min per worker" in out  # 3 cases x 2 stages
    assert len(list((cache / "volume").glob("*/*/meta.json"))) == 6
    assert len(list((cache / "drr").glob("*/*/xrays.npy"))) == 6
    assert len(list((cache / "manifests").glob("*.json"))) == 1
    assert main(["prepare", str(recipe), "--workers", "0", "--no-progress"]) == 0
    assert "prepared 0, already cached 6" in capsys.readouterr().out  # resumable: nothing done twice
    # datasets read the manifest (no discovery) and the prepared entries (no reading, no rendering)
    monkeypatch.setattr(mod.CTFolderDataset, "_discover", lambda self: pytest.fail("discovered again"))
    monkeypatch.setattr(mod, "load_grid_ct", lambda *a, **k: pytest.fail("resampled again"))
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: pytest.fail("rendered again"))
    for resolution in (8, 16):
        ds = create("ct_folder", root=str(root), cache_dir=str(cache), views=[0, 90], geometry="parallel",
                    resolution=resolution)
        item = ds[0]
        assert item["ct"].shape == (1,) + (resolution,) * 3 and item["xrays"].shape == (2, 1, resolution, resolution)
    # a bad case is reported with its name and the exit status 2
    (root / "case0.nii.gz").write_bytes(b"not a volume")
    monkeypatch.undo()
    assert main(["prepare", str(recipe), "--workers", "0", "--no-progress"]) == 2
    assert "case0" in capsys.readouterr().err


# ---- label maps ---------------------------------------------------------------------------------
def test_totalsegmentator_label_map_is_remapped_to_the_framework_codes(tmp_path, caplog):
    from x2ct_framework.conventions import BONE, FAT, HEART, LUNG, SOFT, VESSEL
    from x2ct_framework.evaluation.evaluate import structures_from

    hu, codes = chest_phantom(16, seed=5)
    # the same anatomy coded as TotalSegmentator v2 ("total") would: lobes, ribs, aorta, heart; fat and skin unlabelled
    ts = torch.zeros_like(codes, dtype=torch.int16)
    ts[codes == LUNG] = 12          # lung_upper_lobe_right
    ts[codes == BONE] = 95          # rib_left_4
    ts[codes == VESSEL] = 52        # aorta
    ts[codes == HEART] = 51         # heart
    ts[codes == SOFT] = 5           # liver
    ts[0, 0, 0] = 2                 # kidney_right: soft tissue, not lung (as label 2 would read unmapped)
    root = tmp_path / "cts"
    (root / "seg").mkdir(parents=True)
    save(root / "p1.nii.gz", hu)
    save(root / "seg" / "p1.nii.gz", ts, dtype=np.uint8)
    opts = dict(root=str(root), labels_dir=str(root / "seg"), split_fractions=[1, 0, 0], cache=False)
    with pytest.raises(DataError, match="not a framework code"):  # read unmapped, refused rather than misread
        create("ct_folder", **opts)[0]
    ds = create("ct_folder", labels="totalsegmentator", **opts)
    got = ds[0]["labels"][0]
    for code in (LUNG, BONE, VESSEL, HEART):
        assert torch.equal(got == code, codes == code)
    assert got[0, 0, 0] != LUNG
    fat = (codes == FAT) & (hu >= -190) & (hu <= -30)
    assert (got[fat] == FAT).all()  # unlabelled body voxels filled by HU (TotalSegmentator labels no fat)
    source = ds.label_source
    assert source["name"] == "totalsegmentator" and source["groups"]["lung"] == "10-14"
    text = structures_from(source, True)
    assert "totalsegmentator" in text and "lung <- 10-14" in text and "heart <- 51, 61" in text
    assert "HU thresholds" in structures_from(None, False)
    # a custom table, and a map that covers too little of the body
    sparse = torch.zeros_like(ts)
    sparse[codes == BONE] = 7
    save(root / "seg" / "p1.nii.gz", sparse, dtype=np.uint8)
    with caplog.at_level(logging.WARNING):
        item = create("ct_folder", labels={"map": {"7": "bone"}, "other": "background"}, **opts)[0]
    assert torch.equal(item["labels"][0] == BONE, codes == BONE)
    assert "covers" in caplog.text and "% of the body" in caplog.text


# ---- messy folders ------------------------------------------------------------------------------
def test_messy_folders_label_files_hu_storage_split_overlap_and_small_sets(tmp_path, caplog):
    root = tmp_path / "cts"
    root.mkdir()
    hu, labels = chest_phantom(16, seed=8)
    for name in ("a", "b", "c"):
        save(root / f"{name}.nii.gz", hu)
    save(root / "a_mask.nii.gz", labels.to(torch.int16))  # a label map by its name
    save(root / "organs.nii.gz", labels, dtype=np.uint8)   # a label map by its 8-bit data
    opts = dict(root=str(root), cache=False)
    with caplog.at_level(logging.WARNING):
        splits = {s: [c.name for c in create("ct_folder", split=s, **opts).cases] for s in ("train", "val", "test")}
    assert sorted(sum(splits.values(), [])) == ["a", "b", "c"] and all(len(v) == 1 for v in splits.values())
    assert "a_mask" in caplog.text and "organs" in caplog.text and "looks like a label map" in caplog.text
    # one or two cases still give three splits; the reuse is announced
    two = tmp_path / "two"
    two.mkdir()
    save(two / "x.nii.gz", hu)
    save(two / "y.nii.gz", hu)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = {s: [c.name for c in create("ct_folder", root=str(two), cache=False, split=s).cases]
               for s in ("train", "val", "test")}
    assert len(got["train"]) == 1 and len(got["val"]) == 1 and got["test"] == got["val"]
    assert "not held-out" in caplog.text
    # a split file with a case in two splits
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["b"]}))
    with pytest.raises(DataError, match="in both the train and test splits: b"):
        create("ct_folder", splits=str(split_file), **opts)
    # unsigned HU + 1024: refused with the fix, read right with hu_offset
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    save(shifted / "u.nii.gz", hu + 1024, dtype=np.uint16)
    with pytest.raises(DataError, match="hu_offset = -1024"):
        create("ct_folder", root=str(shifted), cache=False, split_fractions=[1, 0, 0])[0]
    fixed = create("ct_folder", root=str(shifted), cache=False, split_fractions=[1, 0, 0], hu_offset=-1024)[0]
    assert torch.allclose(fixed["ct"][0] * 4000 - 1000, hu.clamp(-1000, 3000), atol=0.5)


def test_body_and_lung_crops_warn_when_the_body_is_cut_and_keep_the_frame(tmp_path, caplog):
    from x2ct_framework.io import load_grid_ct, obliquity_deg

    hu, _ = chest_phantom(16, seed=2)
    tall = torch.full((40, 16, 16), -1000.0)
    tall[:16] = hu  # the chest at the top of a long scan, then abdomen and pelvis (soft tissue, no lung)
    tall[16:] = torch.where(hu[8] > -950, 40.0, -1000.0).expand(24, -1, -1)
    root = tmp_path / "cts"
    root.mkdir()
    save(root / "cap.nii.gz", tall, origin=(150.0, 150.0, 400.0))  # slice 0 (the top) at z = 400 mm
    centre = load_grid_ct(root / "cap.nii.gz", None, 16, 320.0)
    lung = load_grid_ct(root / "cap.nii.gz", None, 16, 320.0, crop="lung")
    assert centre.body_cut > 0.3  # the centre crop of 40 slices leaves out the top of the chest and the pelvis
    starts = {}
    for name, grid in (("centre", centre), ("lung", lung)):
        start = (400.0 - grid.affine[2, 3]) / 20.0  # the source slice at the grid's first slice, from its affine
        assert start == int(start) and 0 <= start <= 24
        starts[name] = int(start)
        assert torch.equal(grid.hu, tall[int(start):int(start) + 16])  # the affine tells where the voxels came from
        assert grid.affine[0, 3] == 150.0 and grid.affine[1, 3] == 150.0
    assert starts["centre"] == 12 and starts["lung"] < 6  # the lung crop keeps the chest
    ds = create("ct_folder", root=str(root), cache=False, split_fractions=[1, 0, 0])
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert "of the body out" in caplog.text and 'crop = "lung"' in caplog.text
    assert torch.allclose(item["affine"], torch.as_tensor(centre.affine))
    oblique = np.diag([-20.0, -20.0, -20.0, 1.0])
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    oblique[:3, :3] = oblique[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    assert obliquity_deg(oblique) == pytest.approx(10.0, abs=1e-6) and obliquity_deg(np.eye(4)) == 0.0


def test_a_dicom_series_has_the_same_cache_identity_in_every_process(tmp_path, phantom8):
    import subprocess
    import sys

    from x2ct_plugins.datasets._common import series_identity

    write_series(tmp_path / "s", phantom8, "7.7.7")
    files = sorted((tmp_path / "s").glob("*.dcm"))
    code = ("import sys; from pathlib import Path; from x2ct_plugins.datasets._common import series_identity; "
            "print(series_identity([Path(p) for p in sys.argv[1:]]))")
    other = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True).stdout.strip()
    assert other == series_identity(files)
