"""LIDC-IDRI in X2CT-GAN's layout: geometry that agrees with the CT, the check that proves it, their resampling.

The cases are written here from a phantom as X2CT-GAN's scripts leave them (``CT2XRAY/``,
``3DGAN/lib/dataset``, ``3DGAN/lib/utils/ct.py``, ``3DGAN/visual.py``): ``ct`` is the CT + 1024 with the
head at slice 0; ``xray1`` is the PA DRR of that stored array as it lies (rows follow its slices, head at
row 0); ``xray2`` is the DRR from the patient's left side (gantry 270) mirrored left-right; both 8-bit,
scaled by their maximum. ``head_feet=True`` writes the same case flipped head-feet, CT and both X-rays
together (the layout an earlier reading of their files assumed): consistent views, upside-down anatomy.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from x2ct_framework.datacheck import check_dataset_geometry
from x2ct_framework.physics import ORIENTATIONS, drr, make_geometry
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage

N = 32
WINDOW = (-1024.0, 1476.0)


def stored_drr(stored_hu: torch.Tensor, angle: float, px: int) -> torch.Tensor:
    """The framework's DRR of an array as it lies, [px, px] in [0, 1] scaled by its maximum."""
    g = {k: v[None] for k, v in make_geometry([angle], "x2ctgan").items()}
    ct01 = ((stored_hu.clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))[None, None]
    img = drr(ct01, g, WINDOW, det_shape=(px, px))[0, 0, 0]
    return img / img.max()


def write_case(folder, seed: int, px: int = 48, dtype=np.uint16, head_feet: bool = False):
    import h5py

    # canonical: head at slice 0, as their array. Phantom version 1: its lungs end below the top of the field, so
    # the trachea above them is inside these small volumes (version 2's adult lungs reach the top slice at this
    # size and the head-end check then says "inconclusive", which is not what these layout tests are about)
    hu, _ = chest_phantom(N, seed=seed, version=1)
    stored_hu = hu.flip(0) if head_feet else hu
    xray1 = stored_drr(stored_hu, 0.0, px)
    xray2 = stored_drr(stored_hu, 270.0, px).flip(-1)
    folder.mkdir(parents=True)
    with h5py.File(folder / "ct_xray_data.h5", "w") as f:
        f["ct"] = (stored_hu + 1024).clamp(0, 4095).numpy().astype(dtype)
        f["xray1"] = (xray1 * 255).round().numpy().astype(np.uint8)
        f["xray2"] = (xray2 * 255).round().numpy().astype(np.uint8)
        f["ori_size"] = np.array([320, 320, 320])
        f["spacing"] = np.array([1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def lidc(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidc_x2ctgan")
    names = [f"LIDC-IDRI-{i:04d}.2000" for i in range(1, 5)]
    for i, name in enumerate(names):
        write_case(root / name, seed=300 + i)
    (root / "train.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "test.txt").write_text(names[3] + "\n")
    return root


def create(root, split="train", resolution=N, **options):
    stage = Stage(name="s", index=1, resolution=resolution, options={})
    return get_plugin_manager().registry("dataset").create("x2ctgan_h5", {"root": str(root), "val_fraction": 0.0,
                                                                          **options}, where="recipe.toml: data",
                                                           split=split, stage=stage)


def test_defaults_agree_with_the_ct(lidc):
    result = check_dataset_geometry(create(lidc), cases=2)
    assert result.ok, result.problems
    assert all(f.declared > 0.98 for f in result.fits), result.table()
    assert not result.fixes


@pytest.mark.parametrize("wrong", [c for c in ORIENTATIONS if c != "identity"])
def test_a_wrong_pa_orientation_fails_naming_the_fix(lidc, wrong):
    result = check_dataset_geometry(create(lidc, orientation=[wrong, "fliplr"]), cases=1)
    assert not result.ok
    assert result.fixes == ['data.orientation = ["identity", "fliplr"]'], result.table()


@pytest.mark.parametrize("wrong", ["identity", "rot180", "flipud", "transpose"])
def test_a_wrong_lateral_orientation_fails_naming_the_fix(lidc, wrong):
    result = check_dataset_geometry(create(lidc, orientation=["identity", wrong]), cases=1)
    assert not result.ok
    assert result.fixes == ['data.orientation = ["identity", "fliplr"]'], result.table()


def test_lateral_declared_at_90_fails_naming_270(lidc):
    # the stored lateral mirrored is close to the view from 90 degrees; only the cone beam tells them apart
    result = check_dataset_geometry(create(lidc, views=[0, 90], orientation=["identity", "identity"]), cases=2)
    assert not result.ok
    assert "data.views = [0, 270]" in result.fixes, result.table()
    assert 'data.orientation = ["identity", "fliplr"]' in result.fixes


def test_cli_check_data_exit_status_and_overlay(lidc, tmp_path, capsys):
    from x2ct_framework.cli import main

    recipe = tmp_path / "lidc.toml"
    recipe.write_text(f'''
name = "lidc_check"
output_dir = "{(tmp_path / 'runs').as_posix()}"
[data]
name = "x2ctgan_h5"
root = "{lidc.as_posix()}"
val_fraction = 0.0
[model]
name = "cnn_baseline"
[[stages]]
resolution = {N}
epochs = 1
losses = {{ l1 = 1.0 }}
''')
    assert main(["check-data", str(recipe), "--cases", "1", "--out", str(tmp_path / "chk")]) == 0
    assert (tmp_path / "chk" / "check_data.png").is_file()
    assert "| declared |" in capsys.readouterr().out
    code = main(["check-data", str(recipe), "--cases", "1", "--out", str(tmp_path / "chk"),
                 "--set", 'data.orientation=["flipud", "fliplr"]'])
    err = capsys.readouterr().err
    assert code == 2
    assert 'data.orientation = ["identity", "fliplr"]' in err


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_linear_resize_is_scipy_zoom_order_1(tmp_path, dtype):
    write_case(tmp_path / "c", seed=7, dtype=dtype)
    (tmp_path / "train.txt").write_text("c\n")
    import h5py

    with h5py.File(tmp_path / "c" / "ct_xray_data.h5") as f:
        stored, xray1 = np.asarray(f["ct"]), np.asarray(f["xray1"])
    item = create(tmp_path, resolution=20, image_size=20)[0]
    # X2CT-GAN: zoom(order=1) the stored array, clip to [0, 2500], divide by 2500 (head first as stored)
    ref = np.clip(ndi.zoom(stored, np.array((20, 20, 20)) / np.array(stored.shape), order=1), 0, 2500) / 2500
    np.testing.assert_allclose(item["ct"][0].numpy(), ref, atol=1e-6)
    ref1 = ndi.zoom(xray1, np.array((20, 20)) / np.array(xray1.shape), order=1) / 255.0
    np.testing.assert_allclose(item["xrays"][0, 0].numpy(), ref1, atol=1e-6)  # the PA as it lies
    area = create(tmp_path, resolution=16, image_size=16, resize="area")[0]["ct"]
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(stored.astype(np.float64))[None, None], 2)[0, 0]
    expect = ((pooled.clamp(0, 2500)) / 2500).float()
    torch.testing.assert_close(area[0], expect, atol=1e-5, rtol=0)


def test_validation_is_carved_from_train(lidc, caplog):
    train_names = (lidc / "train.txt").read_text().split()
    train = create(lidc, val_fraction=0.34)
    val = create(lidc, split="val", val_fraction=0.34)
    got_train = {c for c, _ in train.cases}
    got_val = {c for c, _ in val.cases}
    assert got_val and not (got_val & got_train) and got_val | got_train == set(train_names)
    assert {c for c, _ in create(lidc, split="test").cases} == {"LIDC-IDRI-0004.2000"}
    with caplog.at_level(logging.WARNING, logger="x2ct_plugins.datasets"):
        val_on_test = create(lidc, split="val", val_list="test.txt")
    assert [c for c, _ in val_on_test.cases] == ["LIDC-IDRI-0004.2000"]
    assert "chosen on the test set" in caplog.text


def test_training_refuses_data_whose_check_fails_unless_told_to_warn(lidc, caplog):
    from x2ct_framework.datacheck import GeometryMismatch, guard_stored_geometry
    from x2ct_framework.testing import ContractError, check_stored_geometry

    assert guard_stored_geometry(create(lidc)).ok
    assert check_stored_geometry(create(lidc), cases=1)
    wrong = dict(orientation=["flipud", "fliplr"])
    with pytest.raises(GeometryMismatch, match=r'data.orientation = \["identity", "fliplr"\]'):
        guard_stored_geometry(create(lidc, **wrong))
    with caplog.at_level(logging.WARNING, logger="x2ct_framework.datacheck"):
        assert not guard_stored_geometry(create(lidc, check_geometry="warn", **wrong)).ok
    assert "check_geometry" in caplog.text
    assert guard_stored_geometry(create(lidc, check_geometry="off", **wrong)) is None
    with pytest.raises(ContractError, match="data.orientation"):
        check_stored_geometry(create(lidc, **wrong), cases=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x2ctgan_lidc", "vit_cascade_lidc"])
def test_benchmark_recipes_validate(lidc, name, capsys):
    from conftest import REPO
    from x2ct_framework.cli import main
    from x2ct_framework.config.recipe import load_recipe

    path = REPO / "recipes" / "benchmarks" / f"{name}.toml"
    recipe = load_recipe(path)
    assert recipe["data"]["train_list"] == "x2ctgan:train" and recipe["data"]["hu_window"] == [-1024, 1476]
    assert recipe["data"]["resize"] == "linear" and recipe["eval"]["protocols"][0] == "x2ctgan"
    sets = [f'data.root="{lidc.as_posix()}"', 'data.train_list="train.txt"', 'data.test_list="test.txt"',
            "data.val_fraction=0.34", "stages.1.resolution=64"]
    if name == "vit_cascade_lidc":
        sets.append('stages.1.losses.vgg={ weight = 0.1, weights = "random" }')
    assert main(["validate", str(path)] + [a for s in sets for a in ("--set", s)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("ok")


def test_shipped_case_lists_are_x2ctgans_split():
    from x2ct_plugins.datasets._common import read_list_file
    from x2ct_plugins.datasets.x2ctgan_h5 import SHIPPED_LISTS

    train, test = (read_list_file(SHIPPED_LISTS[f"x2ctgan:{s}"]) for s in ("train", "test"))
    assert (len(train), len(test)) == (916, 102) and not set(train) & set(test)
    assert len(set(train)) == 916 and all(n.startswith("LIDC-IDRI-") for n in train + test)


def test_x2ctgan_protocol_names_every_departure_from_their_setting():
    from x2ct_framework.evaluation.protocols import x2ctgan_setting_deviations

    assert x2ctgan_setting_deviations([-1024, 1476], 128, "linear") == []
    notes = x2ctgan_setting_deviations([-1000, 3000], 64, "area")
    assert len(notes) == 3 and all(n.startswith("NOT X2CT-GAN's setting") for n in notes)
    assert "[-1000, 3000]" in notes[0] and "64^3" in notes[1] and "'area'" in notes[2]


@pytest.mark.slow
def test_validate_runs_the_geometry_check(lidc, tmp_path, capsys):
    from x2ct_framework.cli import main

    recipe = tmp_path / "lidc.toml"
    recipe.write_text(f'''
name = "lidc_validate"
output_dir = "{(tmp_path / 'runs').as_posix()}"
[data]
name = "x2ctgan_h5"
root = "{lidc.as_posix()}"
val_fraction = 0.34
[model]
name = "cnn_baseline"
channels = 4
levels = 2
[[stages]]
resolution = {N}
epochs = 1
losses = {{ l1 = 1.0 }}
''')
    assert main(["validate", str(recipe)]) == 0
    assert "stored X-rays agree with the CT" in capsys.readouterr().out
    assert main(["validate", str(recipe), "--set", 'data.orientation=["identity", "identity"]']) == 2
    assert 'data.orientation = ["identity", "fliplr"]' in capsys.readouterr().err


def test_paired_xray_with_a_ct_checks_its_geometry(tmp_path):
    from PIL import Image

    from test_datasets import save_canonical
    from x2ct_framework.datacheck import check_dataset_geometry

    for i in range(2):
        folder = tmp_path / f"p{i}"
        folder.mkdir()
        hu, _ = chest_phantom(N, seed=500 + i)
        pa = stored_drr(hu, 0.0, 40)
        lateral = stored_drr(hu, 90.0, 40).flip(-1)  # a lateral stored mirrored left-right
        for name, img in (("pa.png", pa), ("lat.png", lateral)):
            Image.fromarray((img * 255).round().numpy().astype(np.uint8)).save(folder / name)
        save_canonical(folder / "ct.nii.gz", hu.clamp(-1024, 3000), 320.0 / N)
        (folder / "geometry.toml").write_text('views = [0.0, 90.0]\nfiles = ["pa.png", "lat.png"]\n'
                                              'preset = "x2ctgan"\nct = "ct.nii.gz"\n')

    def make(**options):
        stage = Stage(name="s", index=1, resolution=N, options={})
        return get_plugin_manager().registry("dataset").create(
            "paired_xray", {"root": str(tmp_path), "split_fractions": [1, 0, 0], "hu_window": list(WINDOW),
                            **options}, where="recipe.toml: data", split="train", stage=stage)

    wrong = check_dataset_geometry(make(), cases=2)
    assert not wrong.ok and wrong.fixes == ['data.orientation = ["identity", "fliplr"]'], wrong.table()
    right = make(orientation=["identity", "fliplr"])
    assert right.geometry_check == "warn"
    assert check_dataset_geometry(right, cases=2).ok


# ---- the cache of resized volumes and X-rays ------------------------------------------------------
@pytest.mark.parametrize("dtype,resize,xrays", [(np.uint16, "linear", "stored"), (np.float32, "area", "render"),
                                                (np.float32, "linear", "stored")])
def test_cached_item_equals_the_uncached_item_and_reads_no_h5(tmp_path, monkeypatch, dtype, resize, xrays):
    import x2ct_plugins.datasets.x2ctgan_h5 as mod

    write_case(tmp_path / "c", seed=11, dtype=dtype)
    (tmp_path / "train.txt").write_text("c\n")
    opts = dict(resolution=16, image_size=16, resize=resize, xrays=xrays)
    plain = create(tmp_path, cache=False, **opts)[0]
    cold = create(tmp_path, cache_dir=str(tmp_path / "cache"), **opts)[0]  # reads, resizes, writes the entries
    reads = []
    real_read = mod.X2CTGANH5Dataset._read
    monkeypatch.setattr(mod.X2CTGANH5Dataset, "_read", lambda self, p: reads.append(p) or real_read(self, p))
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: pytest.fail("rendered again"))
    warm = create(tmp_path, cache_dir=str(tmp_path / "cache"), **opts)[0]
    assert reads == []  # served from the cache: the h5 file is not opened
    for item in (cold, warm):
        assert torch.equal(item["ct"], plain["ct"]) and torch.equal(item["xrays"], plain["xrays"])
        assert item["ct"].dtype == plain["ct"].dtype == torch.float32
    assert len(list((tmp_path / "cache" / "volume").glob("*/*/hu.npy"))) == 1
    assert create(tmp_path, cache_dir=str(tmp_path / "cache"), **opts).prepare_case(0) is None  # x2ct prepare: done
    stored = np.load(next((tmp_path / "cache" / "volume").glob("*/*/hu.npy")), mmap_mode="r")
    assert stored.dtype == (np.int16 if resize == "linear" and dtype == np.uint16 else np.float32)


def test_a_replaced_h5_behind_a_warm_cache_gives_the_new_content(tmp_path):
    import shutil

    write_case(tmp_path / "c", seed=21)
    (tmp_path / "train.txt").write_text("c\n")
    opts = dict(resolution=16, image_size=16, cache_dir=str(tmp_path / "cache"))
    old = create(tmp_path, **opts)[0]
    shutil.rmtree(tmp_path / "c")
    write_case(tmp_path / "c", seed=22)  # the same path, another CT and other X-rays
    new = create(tmp_path, **opts)[0]
    fresh = create(tmp_path, resolution=16, image_size=16, cache=False)[0]
    assert torch.equal(new["ct"], fresh["ct"]) and torch.equal(new["xrays"], fresh["xrays"])
    assert not torch.equal(new["ct"], old["ct"]) and not torch.equal(new["xrays"], old["xrays"])


def test_every_option_that_changes_the_volume_changes_its_key(tmp_path):
    write_case(tmp_path / "c", seed=31)
    (tmp_path / "train.txt").write_text("c\n")
    path = tmp_path / "c" / "ct_xray_data.h5"
    base = dict(resolution=16, image_size=16)
    variants = [{}, {"resolution": 20}, {"resize": "area"}, {"hu_offset": 1000.0}, {"flip": ["z"]},
                {"image_size": 20}, {"orientation": ["identity", "rot180"]}]
    volume_keys, xray_keys = [], []
    for v in variants:
        ds = create(tmp_path, **{**base, **v})
        vk = ds._volume_key(path)
        volume_keys.append(vk)
        xray_keys.append(ds._xray_key(vk, None))
    assert len(set(volume_keys[:5])) == 5 and volume_keys[5] == volume_keys[6] == volume_keys[0]
    assert len(set(xray_keys)) == len(variants)  # the X-rays' key holds the volume's and the image options
    # the hu_window only changes the scaling of the cached HU (applied after the cache): same volume entry
    assert create(tmp_path, **base, hu_window=[-1000, 1000])._volume_key(path) == volume_keys[0]


@pytest.fixture(scope="module")
def lidc_head_feet(tmp_path_factory):
    """The same cases flipped head-feet, CT and both X-rays together: the views still fit the CT's DRRs."""
    root = tmp_path_factory.mktemp("lidc_head_feet")
    names = [f"LIDC-IDRI-{i:04d}.2000" for i in range(1, 4)]
    for i, name in enumerate(names):
        write_case(root / name, seed=300 + i, head_feet=True)
    (root / "train.txt").write_text("\n".join(names) + "\n")
    (root / "test.txt").write_text(names[0] + "\n")
    return root


def test_anatomy_puts_the_head_at_slice_0(lidc):
    from x2ct_framework.datacheck import head_end

    result = check_dataset_geometry(create(lidc), cases=2)
    assert [a.verdict for a in result.anatomy] == ["head first"] * 2, result.table()
    for seed in (0, 1, 2):  # the phantom at other sizes; its flip reads the other way
        # version 1: its trachea runs above the lungs inside the field (version 2's apices reach the top of the
        # 320 mm field, where the check says "inconclusive": no verdict, never a wrong one; tested below)
        hu, _ = chest_phantom(48, seed=seed, version=1)
        assert head_end(hu).verdict == "head first"
        assert head_end(hu.flip(0)).verdict == "feet first"
        assert head_end(torch.full((16, 16, 16), 40.0)).verdict == "inconclusive"  # no lungs: no verdict
        v2, _ = chest_phantom(48, seed=seed)
        assert head_end(v2).verdict != "feet first" and head_end(v2.flip(0)).verdict != "head first"


def test_a_head_feet_flipped_dataset_fails_naming_the_fix(lidc_head_feet, tmp_path, capsys):
    from x2ct_framework.cli import main
    from x2ct_framework.datacheck import GeometryMismatch, guard_stored_geometry

    result = check_dataset_geometry(create(lidc_head_feet), cases=2)
    assert all(f.declared > 0.98 for f in result.fits), result.table()  # the DRRs alone cannot see it
    assert not result.ok and "head-feet" in result.problems[0]
    assert result.fixes == ['data.flip = ["z"]', 'data.orientation = ["flipud", "rot180"]']
    with pytest.raises(GeometryMismatch, match=r'data.flip = \["z"\]'):  # training refuses it too
        guard_stored_geometry(create(lidc_head_feet))
    fixed = check_dataset_geometry(create(lidc_head_feet, flip=["z"], orientation=["flipud", "rot180"]), cases=2)
    assert fixed.ok, fixed.table()
    recipe = tmp_path / "flipped.toml"
    recipe.write_text(f'''
name = "lidc_flipped"
output_dir = "{(tmp_path / 'runs').as_posix()}"
[data]
name = "x2ctgan_h5"
root = "{lidc_head_feet.as_posix()}"
val_fraction = 0.0
[model]
name = "cnn_baseline"
[[stages]]
resolution = {N}
epochs = 1
losses = {{ l1 = 1.0 }}
''')
    assert main(["check-data", str(recipe), "--cases", "2", "--out", str(tmp_path / "chk")]) == 2
    captured = capsys.readouterr()
    assert "feet first" in captured.out
    assert 'data.flip = ["z"]' in captured.err and 'data.orientation = ["flipud", "rot180"]' in captured.err
    assert main(["check-data", str(recipe), "--cases", "2", "--out", str(tmp_path / "chk"), "--set", 'data.flip=["z"]',
                 "--set", 'data.orientation=["flipud","rot180"]']) == 0
