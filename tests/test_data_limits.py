"""Data that cannot be physical is refused, messages stay bounded, low findings get a clear status (issue 33)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from test_data_prepare import chest_phantom, create, save, write_series
from test_evaluate import make_run
from test_outputs_stay_inside import TALLY, snapshot
from test_run_safety import QUIET, tiny
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.errors import DataError, RecipeError
from x2ct_framework.plugins import reset_plugin_manager


@pytest.fixture(autouse=True)
def tally():
    TALLY["tried"] += 1
    yield
    TALLY["passed"] += 1


# ---- voxel sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing, ok", [(1e5, False), (1e-4, False), (60.0, False), (0.7, True),
                                         (20.0, True)], ids=["100000mm", "0.0001mm", "60mm", "0.7mm", "20mm"])
def test_implausible_voxel_sizes_are_refused_naming_the_file(spacing, ok, tmp_path):
    root = tmp_path / "cts"
    root.mkdir()
    save(root / "case0.nii.gz", chest_phantom(16, seed=1)[0], spacing=spacing)
    ds = create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, check_hu=False)
    if ok:
        assert ds[0]["ct"].shape == (1, 16, 16, 16)
        return
    with pytest.raises(DataError) as info:
        ds[0]
    msg = str(info.value)
    assert "case0.nii.gz" in msg and "plausible range 0.01 to 50 mm" in msg, msg


@pytest.mark.parametrize("volume_mm", [1e-3, 1e6])
def test_an_implausible_field_of_view_is_refused_at_build(volume_mm, tmp_path):
    root = tmp_path / "cts"
    root.mkdir()
    save(root / "case0.nii.gz", chest_phantom(16, seed=1)[0])
    with pytest.raises(Exception, match="outside the plausible"):
        create("ct_folder", root=str(root), split_fractions=[1, 0, 0], cache=False, volume_mm=volume_mm)


# ---- gantry tilt -------------------------------------------------------------------------------------
def tilt_series(folder, degrees: float, *, consistent: bool = False) -> None:
    """A series whose slices are tilted about x by ``degrees`` while the table (positions) moves along z;
    ``consistent``: the positions move along the tilted normal (an oblique but rectangular grid)."""
    import pydicom

    hu = chest_phantom(16, seed=3)[0][4:12].flip(0).numpy().astype(np.int16)
    write_series(folder, hu, "1.2.9.1")
    t = math.radians(degrees)
    col = [0.0, math.cos(t), math.sin(t)]
    normal = np.cross([1.0, 0.0, 0.0], col)
    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(str(path))
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *col]
        if consistent:
            ds.ImagePositionPatient = [float(v) for v in normal * 20.0 * k]
        ds.GantryDetectorTilt = degrees
        ds.save_as(str(path))


@pytest.mark.parametrize("degrees, consistent, refused", [(15.0, False, True), (3.0, False, True),
                                                          (0.2, False, False), (15.0, True, False)],
                         ids=["tilt-15", "tilt-3", "tilt-0.2-within-tolerance", "oblique-not-tilted"])
def test_gantry_tilt_is_refused_naming_the_tag(degrees, consistent, refused, tmp_path):
    from x2ct_framework.dicom import find_ct_series

    tilt_series(tmp_path / "case0", degrees, consistent=consistent)
    if not refused:
        assert find_ct_series(tmp_path / "case0").slices == 8
        return
    with pytest.raises(DataError) as info:
        find_ct_series(tmp_path / "case0")
    msg = str(info.value)
    assert "gantry tilt" in msg and f"{degrees:.1f} degrees" in msg and "GantryDetectorTilt" in msg, msg
    assert "case0" in msg and "sheared" in msg
    # 7 steps of 20 mm: the rotated placement would be off by 140 mm * sin(tilt)
    assert f"{140 * math.sin(math.radians(degrees)):.0f} mm off" in msg


# ---- caches and manifests --------------------------------------------------------------------------
def test_cache_entries_are_verified_before_use(tmp_path, caplog):
    import os

    from x2ct_plugins.datasets import _common

    cache = _common.ArrayCache(tmp_path / "cache")
    a = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    for damage in ("same-size-corruption", "wrong-shape", "wrong-dtype", "older-entry-without-checks"):
        cache.put("volume", "ab" + damage, {"hu": a}, {"note": 1})
        got, meta = cache.get("volume", "ab" + damage)
        assert np.array_equal(got["hu"], a) and meta["note"] == 1
        entry = cache.entry("volume", "ab" + damage)
        _common._VERIFIED.clear()  # another process: nothing verified yet
        if damage == "same-size-corruption":
            raw = bytearray((entry / "hu.npy").read_bytes())
            raw[-1] ^= 0xFF
            (entry / "hu.npy").write_bytes(bytes(raw))
        elif damage == "wrong-shape":
            np.save(entry / "hu.npy", a.reshape(6, 5, 4))
        elif damage == "wrong-dtype":
            np.save(entry / "hu.npy", a.astype(np.float32))
        else:
            m = json.loads((entry / "meta.json").read_text())
            del m["checks"]
            (entry / "meta.json").write_text(json.dumps(m))
        with caplog.at_level(logging.WARNING):
            assert cache.get("volume", "ab" + damage) is None, damage
        assert "damaged cache entry" in caplog.text and not entry.exists()
    # a full disk names the cache folder
    real = np.save

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    np.save = full
    try:
        with pytest.raises(DataError, match=f"cache folder {tmp_path / 'cache'}.*No space left"):
            cache.put("volume", "abfull", {"hu": a})
    finally:
        np.save = real
    assert not [p for p in (tmp_path / "cache" / "volume" / "ab").iterdir() if p.name.endswith(".tmp")]
    del os


@pytest.mark.parametrize("edit", ["absolute", "parent", "label-outside"])
def test_an_edited_manifest_cannot_point_outside_data_root(edit, tmp_path):
    root = tmp_path / "cts"
    root.mkdir()
    for i in range(2):
        save(root / f"case{i}.nii.gz", chest_phantom(16, seed=i)[0])
    secret = tmp_path / "elsewhere.nii.gz"
    save(secret, chest_phantom(16, seed=9)[0])
    opts = dict(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path / "cache"))
    ds = create("ct_folder", **opts)
    path = ds.manifest_path()
    data = json.loads(path.read_text())
    entry = data["cases"]["case0"]
    if edit == "absolute":
        entry["path"] = str(secret)
    elif edit == "parent":
        entry["path"] = "../elsewhere.nii.gz"
    else:
        entry["label"] = str(secret)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        create("ct_folder", **opts)
    msg = str(info.value)
    assert "case0" in msg and "outside data.root" in msg and "--rescan" in msg and str(path) in msg, msg


def test_an_h5_case_declaring_a_huge_volume_is_refused_before_reading(tmp_path):
    import h5py

    from test_x2ctgan_data import create as create_h5, write_case

    write_case(tmp_path / "big", seed=1)
    with h5py.File(tmp_path / "big" / "ct_xray_data.h5", "a") as f:
        del f["ct"]
        f.create_dataset("ct", shape=(2048, 2048, 1024), dtype=np.float32, chunks=(64, 64, 64))  # 16 GiB, unwritten
    (tmp_path / "train.txt").write_text("big\n")
    with pytest.raises(DataError) as info:
        ds = create_h5(tmp_path, check_geometry="off")
        ds[0]
    msg = str(info.value)
    assert "ct: declares shape (2048, 2048, 1024)" in msg and "big" in msg, msg


# ---- bounded messages --------------------------------------------------------------------------------
def test_recipe_messages_are_bounded(tmp_path, capsys):
    recipe = tiny(tmp_path)
    keys = "\n".join(f"misspelt_key_{i} = 1" for i in range(300_000))
    recipe.write_text(recipe.read_text().replace("[train]\n", f"[train]\n{keys}\n"))
    assert x2ct_main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 60_000 and "more (fix these and run again" in err, len(err)
    huge = tiny(tmp_path, "huge")
    huge.write_text(huge.read_text().replace("seed = 0", f'seed = "{"x" * 1_000_000}"'))
    assert x2ct_main(["validate", str(huge)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 30_000 and "more characters" in err, len(err)
    e = RecipeError([f"p{i}" for i in range(100)])
    assert "and 75 more" in str(e) and "p24" in str(e) and "p25" not in str(e)


# ---- low findings, each with a clear exit status -----------------------------------------------
def test_empty_eval_protocols_are_refused_at_validation(tmp_path, capsys):
    recipe = tiny(tmp_path)
    assert x2ct_main(["validate", str(recipe), "--set", "eval.protocols=[]"]) == 2
    err = capsys.readouterr().err
    assert "eval -> protocols" in err or "eval.protocols" in err
    assert "at least one protocol" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


EXITING = "import sys\nsys.exit(0)\n"
BLOCKING = "import time\ntime.sleep(30)\n"


@pytest.mark.parametrize("body, expect", [(EXITING, "called sys.exit(0) while importing"),
                                          (BLOCKING, "is still importing after 1 s")], ids=["sys-exit", "blocks"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_plugin_that_exits_or_blocks_at_import_is_named(body, expect, command, tmp_path, capsys, monkeypatch):
    import time

    from x2ct_framework.run import main as run_main

    monkeypatch.setenv("X2CT_PLUGIN_IMPORT_TIMEOUT", "1")
    (tmp_path / "badplugin.py").write_text(body)
    recipe = tiny(tmp_path)
    recipe.write_text('plugins = ["badplugin.py"]\n' + recipe.read_text())
    reset_plugin_manager()
    start = time.monotonic()
    code = x2ct_main(["validate", str(recipe)]) if command == "validate" else run_main([str(recipe), *QUIET])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and "badplugin.py" in err and "Traceback" not in err, err
    assert time.monotonic() - start < 20
    assert not (tmp_path / "runs" / "tiny" / "stage1").exists()


def test_an_always_nan_select_best_metric_is_named_not_blamed_on_divergence():
    from x2ct_framework.training.guards import TrainingDiverged, check_validation

    with pytest.raises(TrainingDiverged) as info:
        check_validation("stage1", {"val/loss": 0.2, "val/dice": float("nan")}, "val/dice", "last is kept")
    msg = str(info.value)
    assert "select_best metric val/dice is nan" in msg and "weights are fine" in msg and "diverged" not in msg
    with pytest.raises(TrainingDiverged, match="diverged"):
        check_validation("stage1", {"val/loss": float("nan"), "val/dice": float("nan")}, "val/dice", "x")


def test_an_export_with_a_bad_tensor_names_it(tmp_path, capsys):
    from x2ct_framework.checkpoint import load_weights, save_checkpoint

    run = make_run(tmp_path)
    best = run / "stage1" / "best"
    weights = dict(load_weights(best))
    name = sorted(k for k, v in weights.items() if v.is_floating_point())[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_checkpoint(best, weights, {"stage": "stage1", "epoch": 1, "step": 2, "metrics": {}})
    reset_plugin_manager()
    before = snapshot(tmp_path / "runs")
    assert x2ct_main(["export", str(run), str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert name in err and "1 of" in err and "NaN or infinite" in err and "Traceback" not in err, err
    assert not (tmp_path / "exp").exists() and snapshot(tmp_path / "runs") == before


def test_check_data_on_a_dataset_without_stored_xrays_says_so(tmp_path, capsys):
    recipe = tiny(tmp_path)
    assert x2ct_main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "nothing compared: the dataset stores no X-rays" in out and "ok: the stored X-rays" not in out


def test_a_ct_replaced_with_the_same_size_and_time_is_read_again_in_the_same_process(tmp_path):
    import os

    from x2ct_plugins.datasets._common import file_identity

    path = tmp_path / "case0.nii.gz"
    save(path, chest_phantom(16, seed=1)[0])
    first = file_identity(path)
    st = path.stat()
    other = tmp_path / "other.nii.gz"
    save(other, chest_phantom(16, seed=2)[0])
    data = other.read_bytes()
    data = (data + b"\0" * st.st_size)[:st.st_size]
    replacement = tmp_path / "tmp.bin"
    replacement.write_bytes(data)
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)  # same size, same modification time, another content
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert file_identity(path) != first
