"""Every recipe in recipes/ and recipes/variants/ builds (``x2ct validate``); the user's plan's numbers hold."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from conftest import REPO
from x2ct_framework.cli import main as x2ct_main
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.config.recipe import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.toml")) + sorted((REPO / "recipes" / "variants").glob("*.toml"))
# Files without a name are fragments that recipes extend (base.toml), not recipes.
RECIPES = [p for p in RECIPES if "name" in tomllib.loads(p.read_text())]
PRETRAINED = {"vgg": "weights", "lpips": "weights"}  # loss plugins whose ImageNet weights are not here offline


def missing_plugins(recipe) -> list[str]:
    """Components a recipe names that no installed plugin registers (computed from the registries)."""
    pm = get_plugin_manager()
    wanted = [("model", recipe["model"]["name"]), ("dataset", recipe["data"]["name"])]
    wanted += [("metric", m) for m in recipe["eval"]["metrics"]]
    for stage in recipe["stages"]:
        wanted += [("loss", t.get("name", n)) for n, t in stage["losses"].items()]
    return sorted({f"{kind} {name!r}" for kind, name in wanted if name not in pm.registry(kind)})


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    """Ten small CT volumes (NIfTI) standing in for data/ct, so ct_folder recipes build their datasets."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("ct")
    for i in range(10):
        hu = np.full((8, 8, 8), -1000, np.int16)
        hu[2:6, 2:6, 2:6] = 40
        nib.save(nib.Nifti1Image(hu, np.diag([40.0, 40.0, 40.0, 1.0])), str(root / f"case{i:02d}.nii.gz"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_validates(path, ct_root, capsys):
    recipe = load_recipe(path)
    missing = missing_plugins(recipe)
    if missing:
        pytest.skip(f"{path.name} needs plugins that are not installed yet: {', '.join(missing)}")
    overrides = []
    if recipe["data"]["name"] == "ct_folder":
        overrides.append(f"data.root=\"{ct_root.as_posix()}\"")
    for i, stage in enumerate(recipe["stages"]):
        for term, table in stage["losses"].items():
            if table.get("name", term) in PRETRAINED:  # random weights: no ImageNet file on this machine
                overrides.append(f"stages.{i + 1}.losses.{term}={{ weight = {table['weight']}, weights = \"random\" }}")
    # --build-only: the contract checks (a forward pass at the recipe's full size) are tests/test_validate.py's.
    args = ["validate", str(path), "--build-only"] + [a for o in overrides for a in ("--set", o)]
    assert x2ct_main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("ok")


def stage(path, name):
    return next(s for s in load_recipe(path)["stages"] if s["name"] == name)


def test_stage2_extended_is_the_seeds_option_a():
    recipe = load_recipe(REPO / "recipes/stage2_extended.toml")
    s = stage(REPO / "recipes/stage2_extended.toml", "stage2")
    assert (s["epochs"], s["lr"], s["min_lr"], s["scheduler"]) == (100, 1e-4, 1e-6, "cosine")
    assert s["checkpoint_every"] == 20 and s["select_best"] == "val/psnr" and s["resolution"] == 128
    assert {k: v["weight"] for k, v in s["losses"].items()} == {"l1": 1.0, "ssim": 0.5, "vgg": 0.1, "gradient": 0.15}
    assert recipe["train"]["gradient_checkpointing"] is True
    assert recipe["train"]["init_from"] == "runs/stage1/stage1/best" and recipe["model"]["tokens"] == 24
    assert len(recipe["stages"]) == 1


def test_full_pipeline_is_the_seeds_option_b():
    recipe = load_recipe(REPO / "recipes/full_pipeline.toml")
    assert [(s["name"], s["resolution"], s["epochs"]) for s in recipe["stages"]] == \
        [("stage1", 64, 100), ("stage2", 128, 100), ("stage3", 256, 100)]
    assert recipe["train"]["start_stage"] == 1 and not recipe["train"]["init_from"]
    assert all(s["checkpoint_every"] == 20 and s["select_best"] == "val/psnr" for s in recipe["stages"])


def test_variants_change_one_thing_each():
    base = load_recipe(REPO / "recipes/stage2_extended.toml")
    v = {p.stem: load_recipe(p) for p in (REPO / "recipes/variants").glob("*.toml")}
    assert v["tokens32"]["model"]["tokens"] == 32 and base["model"]["tokens"] == 24
    assert v["views4"]["data"]["views"] == [0, 45, 90, 135]
    assert {"bone", "vessel"} <= set(v["anatomy"]["stages"][0]["losses"])
    assert "adversarial" in v["adversarial"]["stages"][0]["losses"]
    for name, recipe in v.items():
        assert recipe["train"]["init_from"] == base["train"]["init_from"], name
        assert recipe["stages"][0]["epochs"] == 100, name


def test_quickstart_has_three_stages():
    recipe = load_recipe(REPO / "recipes/quickstart.toml")
    assert [s["name"] for s in recipe["stages"]] == ["stage1", "stage2", "stage3"]
    res = [s["resolution"] for s in recipe["stages"]]
    assert res == sorted(res) and res[-1] <= 32
