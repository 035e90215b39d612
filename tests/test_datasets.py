"""Dataset plugins on data the tests write: phantoms, NIfTI and DICOM folders, X2CT-GAN HDF5, real X-ray folders."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.physics import drr
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage

HU = (-1000.0, 3000.0)


def stage(resolution: int = 16) -> Stage:
    return Stage("stage1", 1, resolution)


def create(name: str, split: str = "train", resolution: int = 16, **options):
    return get_plugin_manager().registry("dataset").create(name, options, where="recipe.toml: data", split=split,
                                                           stage=stage(resolution))


def save_canonical(path, hu: torch.Tensor, spacing: float, label: bool = False):
    """Write a canonical [D, H, W] volume as NIfTI (array [W, H, D], axes toward Left, Posterior, Inferior)."""
    import nibabel as nib

    data = hu.permute(2, 1, 0).numpy().astype(np.uint8 if label else np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([-spacing, -spacing, -spacing, 1.0])), path)


def consistent(item, geometry_option="x2ctgan", hu_window=HU):
    """The item's views are the DRRs of its own target."""
    g = {k: v[None] for k, v in item["geometry"].items()}
    size = item["xrays"].shape[-1]
    again = drr(item["ct"][None], g, hu_window, det_shape=(size, size))[0]
    return torch.allclose(again, item["xrays"], atol=1e-4)


# ---- synthetic_phantom ---------------------------------------------------------------------------
@pytest.mark.parametrize("views", [[0, 90], [0, 45, 90, 135], [i * 22.5 for i in range(8)]])
@pytest.mark.parametrize("geometry", ["parallel", "x2ctgan"])
def test_synthetic_phantom_items(views, geometry):
    ds = create("synthetic_phantom", views=views, geometry=geometry, num_train=2, image_size=20)
    item = ds[1]
    v = len(views)
    assert item["xrays"].shape == (v, 1, 20, 20) and item["ct"].shape == (1, 16, 16, 16)
    assert item["labels"].shape == (1, 16, 16, 16) and item["spacing"].tolist() == [20.0] * 3
    assert item["geometry"]["angles"].tolist() == [float(a) for a in views]
    assert 0 <= float(item["xrays"].min()) and float(item["xrays"].max()) <= 1 and float(item["xrays"].std()) > 0.01
    assert consistent(item)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["xrays"].shape == (2, v, 1, 20, 20) and batch["geometry"]["sid"].shape == (2, v)


def test_synthetic_phantom_splits_seeds_and_options():
    a = create("synthetic_phantom", num_train=2, seed=1, hu_window=[-1000, 2000], volume_mm=300.0)
    b = create("synthetic_phantom", num_train=2, seed=1, hu_window=[-1000, 2000], volume_mm=300.0)
    assert torch.equal(a[0]["ct"], b[0]["ct"]) and torch.equal(a[0]["xrays"], b[0]["xrays"])
    assert not torch.equal(a[0]["ct"], a[1]["ct"])
    val = create("synthetic_phantom", split="val", num_val=1, seed=1)
    assert not torch.equal(val[0]["ct"], create("synthetic_phantom", num_train=1, seed=1)[0]["ct"])
    assert len(create("synthetic_phantom", split="test", num_test=3)) == 3
    assert a[0]["spacing"].tolist() == [300.0 / 16] * 3
    fine = create("synthetic_phantom", num_train=1, render_resolution=32)[0]
    coarse = create("synthetic_phantom", num_train=1)[0]
    assert torch.equal(fine["ct"], coarse["ct"]) and not torch.equal(fine["xrays"], coarse["xrays"])
    jit = create("synthetic_phantom", num_train=1, view_jitter=5.0)
    angles = [jit[0]["geometry"]["angles"] for _ in range(3)]
    assert not torch.equal(angles[0], angles[1]) and (angles[0] - torch.tensor([0.0, 90.0])).abs().max() <= 5.0


def test_synthetic_phantom_disk_cache(tmp_path, monkeypatch):
    import x2ct_plugins.datasets.synthetic_phantom as mod

    first = create("synthetic_phantom", num_train=1, cache_dir=str(tmp_path), memory_cache_mb=0)[0]
    assert list((tmp_path / "drr").glob("*.pt")) and list(tmp_path.glob("chest_*.pt"))
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    again = create("synthetic_phantom", num_train=1, cache_dir=str(tmp_path), memory_cache_mb=0)[0]
    assert torch.equal(first["xrays"], again["xrays"]) and torch.equal(first["ct"], again["ct"])


def test_unknown_preset_and_bad_options_are_recipe_errors():
    with pytest.raises(RecipeError) as exc:
        create("synthetic_phantom", geometry="x2ctgn")
    assert "x2ctgn" in str(exc.value) and 'did you mean "x2ctgan"' in str(exc.value) and "parallel" in str(exc.value)
    with pytest.raises(RecipeError, match="num_train must be at least 1"):
        create("synthetic_phantom", num_train=0)
    with pytest.raises(RecipeError, match="hu_window"):
        create("synthetic_phantom", hu_window=[100, -100])
    custom = create("synthetic_phantom", num_train=1, geometry={"preset": "x2ctgan", "sid": 600.0})[0]
    assert custom["geometry"]["sid"].tolist() == [600.0, 600.0]


# ---- ct_folder -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    """Four phantom CTs at 16^3 over 320 mm (20 mm voxels) with label maps beside them (``_seg``); the
    same CTs in ``by_dir/`` with their label maps in ``by_dir/labels/``."""
    root = tmp_path_factory.mktemp("cts")
    (root / "by_dir" / "labels").mkdir(parents=True)
    for i in range(4):
        hu, labels = chest_phantom(16, seed=100 + i)
        save_canonical(root / f"case{i}.nii.gz", hu, 20.0)
        save_canonical(root / f"case{i}_seg.nii.gz", labels, 20.0, label=True)
        save_canonical(root / "by_dir" / f"case{i}.nii.gz", hu, 20.0)
        save_canonical(root / "by_dir" / "labels" / f"case{i}.nii.gz", labels, 20.0, label=True)
    return root


def test_ct_folder_reads_resamples_and_renders(ct_root):
    ds = create("ct_folder", root=str(ct_root), label_suffix="_seg", split_fractions=[1, 0, 0], views=[0, 90],
                geometry="x2ctgan")
    assert len(ds) == 4
    item = ds[0]
    name = item["case_id"]
    hu, labels = chest_phantom(16, seed=100 + int(name[-1]))
    assert torch.allclose(item["ct"][0], (hu.clamp(*HU) - HU[0]) / (HU[1] - HU[0]), atol=1e-6)  # same grid: exact
    assert torch.equal(item["labels"][0], labels)
    assert consistent(item)
    by_dir = create("ct_folder", root=str(ct_root / "by_dir"), labels_dir=str(ct_root / "by_dir" / "labels"),
                    split_fractions=[1, 0, 0])
    assert torch.equal(by_dir[0]["labels"], item["labels"])
    # another resolution: resampled to 10 mm voxels and centre-cropped to 24^3 (240 mm field of view)
    fine = create("ct_folder", root=str(ct_root / "by_dir"), resolution=24, volume_mm=240.0,
                  split_fractions=[1, 0, 0])[0]
    assert fine["ct"].shape == (1, 24, 24, 24) and fine["spacing"].tolist() == [10.0] * 3
    assert "labels" not in fine


@pytest.mark.parametrize("views", [2, 4, 8])
def test_ct_folder_multi_view(ct_root, views):
    angles = [i * 180.0 / views for i in range(views)]
    item = create("ct_folder", root=str(ct_root / "by_dir"), views=angles, image_size=12, split_fractions=[1, 0, 0])[1]
    assert item["xrays"].shape == (views, 1, 12, 12)


def test_ct_folder_dicom_series_matches_nifti(tmp_path):
    from test_io import write_dicom_series

    hu, _ = chest_phantom(16, seed=7)
    write_dicom_series(tmp_path / "dicom_case", hu.flip(0).numpy().astype(np.int16), spacing=(20.0, 20.0, 20.0))
    save_canonical(tmp_path / "nifti_case.nii.gz", hu, 20.0)
    ds = create("ct_folder", root=str(tmp_path), split_fractions=[1, 0, 0])
    items = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
    assert set(items) == {"dicom_case", "nifti_case"}
    assert torch.allclose(items["dicom_case"]["ct"], items["nifti_case"]["ct"], atol=1e-6)


def test_ct_folder_splits(ct_root, tmp_path):
    def names(split, seed):
        ds = create("ct_folder", root=str(ct_root / "by_dir"), split=split, seed=seed,
                    split_fractions=[0.5, 0.25, 0.25])
        return [ds[i]["case_id"] for i in range(len(ds))]

    seeded = {s: names(s, 3) for s in ("train", "val", "test")}
    assert [len(v) for v in seeded.values()] == [2, 1, 1]
    assert sorted(sum(seeded.values(), [])) == [f"case{i}" for i in range(4)]
    assert seeded["train"] == names("train", 3)
    # 4 cases at 80 % / 10 % / 10 %: the small-set rule gives val and test one case each (issue 17; it was an error)
    small = {s: [c.name for c in create("ct_folder", root=str(ct_root / "by_dir"), split=s).cases]
             for s in ("train", "val", "test")}
    assert [len(v) for v in small.values()] == [2, 1, 1]
    assert sorted(sum(small.values(), [])) == [f"case{i}" for i in range(4)]
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": ["case2", "case0"], "val": ["case1"], "test": ["case3"]}))
    ds = create("ct_folder", root=str(ct_root / "by_dir"), splits=str(split_file), split="train")
    assert [ds[i]["case_id"] for i in range(2)] == ["case2", "case0"]
    split_file.write_text(json.dumps({"train": ["case0", "case9"]}))
    with pytest.raises(DataError, match="case9"):
        create("ct_folder", root=str(ct_root / "by_dir"), splits=str(split_file))
    with pytest.raises(DataError, match="the val split is empty"):
        create("ct_folder", root=str(ct_root / "by_dir"), splits=str(split_file), split="val")


def test_ct_folder_augmentation_keeps_views_and_target_consistent(ct_root):
    ds = create("ct_folder", root=str(ct_root), split_fractions=[1, 0, 0], geometry="x2ctgan", label_suffix="_seg",
                augment={"affine": {"degrees": 10, "scales": 0.1, "p": 1.0}, "ct_noise": {"std": 20.0}})
    torch.manual_seed(0)
    a, b = ds[0], ds[0]
    assert not torch.equal(a["ct"], b["ct"])  # a new draw each time
    assert consistent(a) and consistent(b)
    assert a["labels"].dtype == torch.uint8 and set(a["labels"].unique().tolist()) <= set(range(9))
    val = create("ct_folder", root=str(ct_root / "by_dir"), split="val", split_fractions=[0.5, 0.5, 0],
                 augment={"affine": {}})
    assert torch.equal(val[0]["ct"], val[0]["ct"])  # only the train split is augmented
    with pytest.raises(RecipeError, match="unknown transform"):
        create("ct_folder", root=str(ct_root / "by_dir"), augment={"rotate": {}})


def test_ct_folder_disk_cache(ct_root, tmp_path, monkeypatch):
    import x2ct_plugins.datasets.ct_folder as mod

    first = create("ct_folder", root=str(ct_root / "by_dir"), split_fractions=[1, 0, 0], cache_dir=str(tmp_path))[0]
    assert list((tmp_path / "drr").glob("*/*/hu.npy")) == [] and list((tmp_path / "drr").glob("*/*/xrays.npy"))
    assert list((tmp_path / "volume").glob("*/*/hu.npy"))
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    monkeypatch.setattr(mod, "load_grid_ct", lambda *a, **k: pytest.fail("resampled again despite the cache"))
    again = create("ct_folder", root=str(ct_root / "by_dir"), split_fractions=[1, 0, 0], cache_dir=str(tmp_path))[0]
    assert torch.equal(first["xrays"], again["xrays"]) and torch.equal(first["ct"], again["ct"])


def test_ct_folder_bad_input(tmp_path, caplog):
    import nibabel as nib

    with pytest.raises(DataError, match="CT folder not found"):
        create("ct_folder", root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CT volumes found"):
        create("ct_folder", root=str(tmp_path / "empty"))
    root = tmp_path / "mixed"
    root.mkdir()
    hu, labels = chest_phantom(16, seed=1)
    for name in ("good1", "good2"):
        save_canonical(root / f"{name}.nii.gz", hu, 20.0)
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), root / "flat.nii.gz")
    save_canonical(root / "cut.nii", hu, 20.0)
    data = (root / "cut.nii").read_bytes()
    (root / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        create("ct_folder", root=str(root), split_fractions=[1, 0, 0])
    assert "flat.nii.gz" in str(exc.value) and "3D" in str(exc.value) and 'on_bad_case = "skip"' in str(exc.value)
    with caplog.at_level(logging.WARNING):
        ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], on_bad_case="skip")
        names = {ds[i]["case_id"] for i in range(len(ds))}  # the truncated file fails on reading, then is skipped
    assert names == {"good1", "good2"}
    assert "flat.nii.gz" in caplog.text and "cut.nii" in caplog.text
    only_cut = tmp_path / "cut_only"
    only_cut.mkdir()
    (only_cut / "cut.nii").write_bytes(data[: len(data) // 2])
    save_canonical(only_cut / "fine.nii.gz", hu, 20.0)
    ds = create("ct_folder", root=str(only_cut), split_fractions=[1, 0, 0])
    with pytest.raises(DataError, match="cut.nii"):
        [ds[i] for i in range(len(ds))]
    # a label map on another grid
    grid = tmp_path / "grid"
    grid.mkdir()
    save_canonical(grid / "a.nii.gz", hu, 20.0)
    save_canonical(grid / "a_seg.nii.gz", labels[:8], 20.0, label=True)
    with pytest.raises(DataError, match="another grid"):
        create("ct_folder", root=str(grid), label_suffix="_seg", split_fractions=[1, 0, 0])[0]
    save_canonical(grid / "b.nii.gz", hu, 20.0)
    with pytest.raises(DataError, match="no label map for case 'b'"):
        create("ct_folder", root=str(grid), label_suffix="_seg", split_fractions=[1, 0, 0])


# ---- x2ctgan_h5 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def h5_root(tmp_path_factory):
    """Three cases in the X2CT-GAN layout: ct (HU + 1024, stored [z, y, x] with z toward the head), xray1, xray2."""
    import h5py

    root = tmp_path_factory.mktemp("lidc")
    for i, name in enumerate(["LIDC-0001", "LIDC-0002", "LIDC-0003"]):
        hu, _ = chest_phantom(24, seed=200 + i)
        stored = (hu.flip(0) + 1024).clamp(0, 2500).numpy().astype(np.uint16)
        (root / name).mkdir()
        with h5py.File(root / name / "ct_xray_data.h5", "w") as f:
            f["ct"] = stored
            f["xray1"] = np.full((32, 32), 10 * (i + 1), np.uint8)
            f["xray2"] = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
            f["ori_size"] = np.array([320, 320, 320])
            f["spacing"] = np.array([1.0, 1.0, 1.0])
    (root / "train.txt").write_text("LIDC-0001\nLIDC-0002\n")
    (root / "test.txt").write_text("LIDC-0003\n")
    return root


# the stored images as they are (identity orientation), area resizing and the seed's HU window, as
# these tests were written before the X2CT-GAN conventions became the defaults (see test_x2ctgan_data.py)
OLD_H5 = dict(views=[0, 90], orientation=["identity", "identity"], resize="area", hu_window=[-1000, 3000], flip=["z"])


def test_x2ctgan_h5_stored_views(h5_root):
    ds = create("x2ctgan_h5", root=str(h5_root), image_size=16, resolution=12, val_list="test.txt", **OLD_H5)
    assert len(ds) == 2 and len(create("x2ctgan_h5", root=str(h5_root), split="test")) == 1
    assert len(create("x2ctgan_h5", root=str(h5_root), split="val", val_list="test.txt")) == 1  # asked for
    item = ds[1]
    assert item["case_id"] == "LIDC-0002"
    assert item["xrays"].shape == (2, 1, 16, 16)
    assert torch.allclose(item["xrays"][0], torch.full((1, 16, 16), 20 / 255.0))
    assert torch.allclose(item["xrays"][1, 0, 0, :2], torch.tensor([4 / 255.0, 20 / 255.0]), atol=1e-6)
    assert item["geometry"]["sid"].tolist() == [541.0, 541.0] and item["ct"].shape == (1, 12, 12, 12)
    # HU = stored - 1024, z flipped so the head is at slice 0: same as the phantom resized
    hu, _ = chest_phantom(24, seed=201)
    expect = torch.nn.functional.avg_pool3d(((hu.clamp(-1024, 1476) - HU[0]) / 4000)[None, None], 2)[0]
    assert torch.allclose(item["ct"], expect.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("views", [[0, 90], [0, 45, 90, 135], [i * 22.5 for i in range(8)]])
def test_x2ctgan_h5_rendered_views(h5_root, views):
    item = create("x2ctgan_h5", root=str(h5_root), xrays="render", views=views, image_size=10, resolution=12,
                  hu_window=list(HU))[0]
    assert item["xrays"].shape == (len(views), 1, 10, 10)
    assert consistent(item)


def test_x2ctgan_h5_bad_input(h5_root, tmp_path):
    import h5py

    with pytest.raises(RecipeError, match="only PA \\(0\\) and lateral \\(90\\)"):
        create("x2ctgan_h5", root=str(h5_root), views=[0, 45, 90])
    with pytest.raises(DataError, match="case list not found"):
        create("x2ctgan_h5", root=str(h5_root), train_list="nope.txt")
    root = tmp_path / "lidc"
    (root / "A").mkdir(parents=True)
    with h5py.File(root / "A" / "ct_xray_data.h5", "w") as f:
        f["ct"] = np.zeros((8, 8, 8), np.uint16)
        f["xray1"] = np.zeros((8, 8), np.uint8)
    (root / "B").mkdir()
    (root / "B" / "ct_xray_data.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    (root / "train.txt").write_text("A\nB\nC\n")
    with pytest.raises(DataError) as exc:
        create("x2ctgan_h5", root=str(root))
    assert "C" in str(exc.value) and "ct_xray_data.h5" in str(exc.value)
    ds = create("x2ctgan_h5", root=str(root), on_bad_case="skip")
    assert len(ds) == 2
    (root / "a.txt").write_text("A\n")
    with pytest.raises(DataError) as exc:
        create("x2ctgan_h5", root=str(root), train_list="a.txt")[0]
    assert "xray2" in str(exc.value) and "A/ct_xray_data.h5" in str(exc.value)
    (root / "b.txt").write_text("B\n")
    with pytest.raises(DataError, match="could not read the HDF5 file"):
        create("x2ctgan_h5", root=str(root), train_list="b.txt")[0]
    (root / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="the train split is empty"):
        create("x2ctgan_h5", root=str(root), train_list="empty.txt")


# ---- paired_xray ---------------------------------------------------------------------------------
def write_xray_case(folder, angles, *, with_ct=None, size=(24, 20), files=True, preset="x2ctgan"):
    from PIL import Image

    folder.mkdir(parents=True)
    names = []
    for k, a in enumerate(angles):
        img = np.full(size, 40 * (k + 1), np.uint8)
        img[:, : size[1] // 2] = 200
        Image.fromarray(img).save(folder / f"view{k}.png")
        names.append(f"view{k}.png")
    lines = [f"views = {list(map(float, angles))}", f'preset = "{preset}"', "sid = 600.0"]
    if files:
        lines.append("files = [" + ", ".join(f'"{n}"' for n in reversed(names)) + "]")
    if with_ct is not None:
        save_canonical(folder / "ct.nii.gz", with_ct, 20.0)
        lines.append('ct = "ct.nii.gz"')
    (folder / "geometry.toml").write_text("\n".join(lines) + "\n")


def test_paired_xray_with_and_without_ct(tmp_path):
    hu, _ = chest_phantom(16, seed=3)
    for i in range(3):
        write_xray_case(tmp_path / "with_ct" / f"p{i}", [0, 90], with_ct=hu)
        write_xray_case(tmp_path / "no_ct" / f"p{i}", [0, 90])
    ds = create("paired_xray", root=str(tmp_path / "with_ct"), views=[0, 90], split_fractions=[1, 0, 0], image_size=10)
    item = ds[0]
    assert item["xrays"].shape == (2, 1, 10, 10) and item["ct"].shape == (1, 16, 16, 16)
    assert item["geometry"]["sid"].tolist() == [600.0, 600.0] and item["geometry"]["sdd"].tolist() == [949.0, 949.0]
    # files are listed in reverse: the first view is view1.png (grey 80), the second view0.png (grey 40)
    assert torch.allclose(item["xrays"][0, 0, :, -1], torch.full((10,), 80 / 255.0), atol=1e-6)
    assert torch.allclose(item["xrays"][1, 0, :, -1], torch.full((10,), 40 / 255.0), atol=1e-6)
    assert torch.allclose(item["ct"][0], (hu.clamp(*HU) - HU[0]) / (HU[1] - HU[0]), atol=1e-6)
    inference = create("paired_xray", root=str(tmp_path / "no_ct"), split_fractions=[1, 0, 0])
    assert "ct" not in inference[0] and len(inference) == 3
    with pytest.raises(DataError, match="no CT"):
        create("paired_xray", root=str(tmp_path / "no_ct"), split_fractions=[1, 0, 0], require_ct=True)
    batch = next(iter(DataLoader(inference, batch_size=3)))
    assert batch["xrays"].shape[:2] == (3, 2)


def test_paired_xray_bad_input(tmp_path):
    write_xray_case(tmp_path / "a" / "c1", [0, 90])
    with pytest.raises(DataError, match="differ from the recipe's views"):
        create("paired_xray", root=str(tmp_path / "a"), views=[0, 45], split_fractions=[1, 0, 0])
    write_xray_case(tmp_path / "b" / "c1", [0, 90, 180], files=False)
    (tmp_path / "b" / "c1" / "view2.png").unlink()
    with pytest.raises(DataError, match="2 image\\(s\\) for 3 view angle"):
        create("paired_xray", root=str(tmp_path / "b"), split_fractions=[1, 0, 0])
    (tmp_path / "c" / "c1").mkdir(parents=True)
    with pytest.raises(DataError, match="no geometry.toml"):
        create("paired_xray", root=str(tmp_path / "c"), split_fractions=[1, 0, 0])
    (tmp_path / "c" / "geometry.toml").write_text('views = [0.0]\npreset = "x2ctgn"\n')
    with pytest.raises(DataError, match='did you mean "x2ctgan"'):
        create("paired_xray", root=str(tmp_path / "c"), split_fractions=[1, 0, 0])
    with pytest.raises(DataError, match="X-ray folder not found"):
        create("paired_xray", root=str(tmp_path / "zzz"))


# ---- the batch contract (x2ct_framework.testing.check_dataset) ------------------------------------
def test_every_dataset_meets_the_batch_contract(ct_root, h5_root, tmp_path):
    from x2ct_framework.testing import check_dataset

    hu, _ = chest_phantom(16, seed=3)
    for i in range(2):
        write_xray_case(tmp_path / "pairs" / f"p{i}", [0, 90], with_ct=hu)
    datasets = [
        create("synthetic_phantom", num_train=2, views=[0, 45, 90, 135]),
        create("ct_folder", root=str(ct_root), label_suffix="_seg", split_fractions=[1, 0, 0]),
        create("x2ctgan_h5", root=str(h5_root), resolution=12),
        create("paired_xray", root=str(tmp_path / "pairs"), split_fractions=[1, 0, 0]),
    ]
    resolutions = [16, 16, 12, 16]
    for ds, r in zip(datasets, resolutions):
        assert check_dataset(ds, resolution=r)


# ---- image-space augmentation: on the cached X-rays, no re-rendering ------------------------------
def _warm(ct_root, cache, **options):
    """A ct_folder dataset over ct_root's four CTs (32^2 views) with every case prepared in ``cache``."""
    opts = dict(root=str(ct_root), split_fractions=[1, 0, 0], geometry="x2ctgan", image_size=32,
                cache_dir=str(cache))
    plain = create("ct_folder", **opts)
    for j in range(len(plain)):
        plain.prepare_case(j)
    return plain, create("ct_folder", **opts, **options)


def test_noise_augmentation_on_a_warm_cache_renders_nothing_and_has_the_asked_std(ct_root, tmp_path, monkeypatch):
    import x2ct_plugins.datasets.ct_folder as mod

    plain, ds = _warm(ct_root, tmp_path / "cache", augment={"noise": {"std": 0.02}})
    clean = [plain[j]["xrays"] for j in range(len(plain))]
    calls = []
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: calls.append(1) or pytest.fail("rendered"))
    monkeypatch.setattr(mod, "load_grid_ct", lambda *a, **k: pytest.fail("read the CT again"))
    epoch = [ds[j] for j in range(len(ds))]  # one epoch
    assert calls == []
    added = torch.cat([(it["xrays"] - c).flatten() for it, c in zip(epoch, clean)])
    inside = torch.cat([((c > 0.1) & (c < 0.9)).flatten() for c in clean])  # away from the clamp at 0 and 1
    assert inside.sum() > 3000
    assert abs(float(added[inside].std()) - 0.02) < 0.002 and abs(float(added[inside].mean())) < 0.002
    assert all(torch.equal(it["ct"], plain[j]["ct"]) for j, it in enumerate(epoch))  # the target is untouched
    assert all(0 <= float(it["xrays"].min()) and float(it["xrays"].max()) <= 1 for it in epoch)
    # deterministic from (seed, epoch, item): the same draw again, in another instance too; a new one next epoch
    assert torch.equal(ds[1]["xrays"], epoch[1]["xrays"])
    other = create("ct_folder", root=str(ct_root), split_fractions=[1, 0, 0], geometry="x2ctgan", image_size=32,
                   cache_dir=str(tmp_path / "cache"), augment={"noise": {"std": 0.02}})
    assert torch.equal(other[1]["xrays"], epoch[1]["xrays"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["xrays"], epoch[1]["xrays"])
    other.set_epoch(1)
    assert torch.equal(other[1]["xrays"], ds[1]["xrays"])
    seeded = create("ct_folder", root=str(ct_root), split_fractions=[1, 0, 0], geometry="x2ctgan", image_size=32,
                    cache_dir=str(tmp_path / "cache"), augment={"noise": {"std": 0.02}}, seed=5)
    assert not torch.equal(seeded[1]["xrays"], epoch[1]["xrays"])


def test_intensity_augmentation_is_the_asked_mapping_and_workers_follow_the_epoch(ct_root, tmp_path):
    plain, ds = _warm(ct_root, tmp_path / "cache", augment={"intensity": {"scale": [2, 2], "gamma": [0.5, 0.5],
                                                                          "shift": [-0.1, -0.1]}})
    x = plain[0]["xrays"]
    torch.testing.assert_close(ds[0]["xrays"], (2 * x.sqrt() - 0.1).clamp(0, 1))  # an independent reference
    noisy = create("ct_folder", root=str(ct_root), split_fractions=[1, 0, 0], geometry="x2ctgan", image_size=32,
                   cache_dir=str(tmp_path / "cache"), augment={"noise": {"std": 0.05}})
    loader = DataLoader(noisy, batch_size=1, num_workers=1, persistent_workers=True)
    first = [b["xrays"][0] for b in loader]
    noisy.set_epoch(3)  # the workers live on: they see the epoch through shared memory
    third = [b["xrays"][0] for b in loader]
    assert torch.equal(first[2], create("ct_folder", root=str(ct_root), split_fractions=[1, 0, 0],
                                        geometry="x2ctgan", image_size=32, cache_dir=str(tmp_path / "cache"),
                                        augment={"noise": {"std": 0.05}})[2]["xrays"])
    assert torch.equal(third[2], noisy[2]["xrays"]) and not torch.equal(third[2], first[2])
    val = create("ct_folder", root=str(ct_root), split="val", split_fractions=[0.5, 0.5, 0], geometry="x2ctgan",
                 image_size=32, cache_dir=str(tmp_path / "cache"), augment={"noise": {"std": 0.05}})
    assert val.xray_augment is None  # only augment_splits are augmented
    with pytest.raises(RecipeError, match="ct_noise"):  # HU-sized noise is caught and the CT transform named
        create("ct_folder", root=str(ct_root), augment={"noise": {"std": 10}})
    with pytest.raises(RecipeError, match="unknown option"):
        create("ct_folder", root=str(ct_root), augment={"intensity": {"contrast": 2}})


def test_view_jitter_re_renders_from_the_cached_volume(ct_root, tmp_path, monkeypatch):
    import x2ct_plugins.datasets.ct_folder as mod

    _, ds = _warm(ct_root, tmp_path / "cache", augment={"view_jitter": {"degrees": 3}})
    monkeypatch.setattr(mod, "load_grid_ct", lambda *a, **k: pytest.fail("read the CT again"))
    calls = []
    real = mod.render_views
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    item = ds[0]
    angles = item["geometry"]["angles"]
    assert calls == [1] and not torch.equal(angles, torch.tensor([0.0, 90.0]))
    assert (angles - torch.tensor([0.0, 90.0])).abs().max() <= 3
    assert consistent(item)  # the views are the DRRs of the target at the jittered angles
    assert torch.equal(ds[0]["geometry"]["angles"], angles)  # (seed, epoch, item) decide the draw


def test_the_trainer_tells_the_training_set_its_epoch():
    import types

    from x2ct_framework.training.sampling import StageData

    class Recording(torch.utils.data.Dataset):
        def __init__(self):
            self.epochs = []

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"x": torch.zeros(1)}

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    train = Recording()
    data = StageData(train, Recording(), batch_size=1, num_workers=0, seed=0)
    data.train = types.SimpleNamespace(set_epoch=lambda e: None)  # what accelerate's prepared loader offers
    data.epoch(None, 3)
    assert train.epochs == [3]


def test_ct_folder_finds_a_volume_file_inside_each_case_folder(tmp_path, caplog):
    """case/ct.nii.gz and case/study/ct.nrrd layouts: the case is the folder; a label map beside the CT is no
    candidate; a folder with two CTs is left out with a warning naming both files; a labels folder is no case."""
    import nibabel as nib
    import SimpleITK as sitk

    root = tmp_path / "cases"
    hu, _ = chest_phantom(16, seed=2)
    (root / "LIDC-0001").mkdir(parents=True)
    save_canonical(root / "LIDC-0001" / "ct.nii.gz", hu, 20.0)
    save_canonical(root / "LIDC-0001" / "ct_seg.nii.gz", torch.zeros_like(hu), 20.0, label=True)
    (root / "LIDC-0002" / "study" / ".hidden").mkdir(parents=True)
    image = sitk.GetImageFromArray(hu.numpy().astype(np.int16))  # array [D, H, W] = ITK [k, j, i]
    image.SetSpacing((20.0, 20.0, 20.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # LPS: i Left, j Posterior, k Inferior (as save_canonical)
    sitk.WriteImage(image, str(root / "LIDC-0002" / "study" / "ct.nrrd"))
    hidden = root / "LIDC-0002" / "study" / ".hidden" / "x.nii"  # hidden folders are not entered
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), hidden)
    (root / "notes").mkdir()  # a folder without volumes is not a case
    ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0])
    assert sorted(ds[i]["case_id"] for i in range(len(ds))) == ["LIDC-0001", "LIDC-0002"]
    by_id = {ds[i]["case_id"]: ds[i] for i in range(len(ds))}
    # both files hold the same phantom at the same spacing: the same target either way
    torch.testing.assert_close(by_id["LIDC-0001"]["ct"], by_id["LIDC-0002"]["ct"], atol=1e-4, rtol=0)

    save_canonical(root / "LIDC-0001" / "ct_repeat.nii.gz", hu, 20.0)
    (root / "labels").mkdir()  # a folder of label maps is no case, whatever it holds
    save_canonical(root / "labels" / "LIDC-0002.nii.gz", torch.zeros_like(hu), 20.0, label=True)
    with caplog.at_level(logging.WARNING):
        ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0])  # the manifest sees the new files
    assert [ds[i]["case_id"] for i in range(len(ds))] == ["LIDC-0002"]
    assert "LIDC-0001" in caplog.text and "ct.nii.gz" in caplog.text and "ct_repeat.nii.gz" in caplog.text
    assert "one CT per case folder" in caplog.text and "labels" not in caplog.text.replace("label maps", "")
