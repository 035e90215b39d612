"""The ``xray`` preset and ``augment.style`` of ct_folder: material lines cached once, X-rays made from
them per access, style draws deterministic in (seed, epoch, item)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from x2ct_framework.errors import RecipeError
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage


def create(split: str = "train", **options):
    return get_plugin_manager().registry("dataset").create("ct_folder", options, where="recipe.toml: data",
                                                           split=split, stage=Stage("s", 1, 16))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import nibabel as nib

    folder = tmp_path_factory.mktemp("cts")
    for i in range(2):
        hu, _ = chest_phantom(16, seed=300 + i)
        nib.save(nib.Nifti1Image(hu.permute(2, 1, 0).numpy().astype(np.int16), np.diag([-20.0, -20, -20, 1])),
                 str(folder / f"case{i}.nii.gz"))
    return folder


def test_preset_renders_from_cached_lines(root, tmp_path, monkeypatch):
    import x2ct_framework.physics.spectral as spectral

    ds = create(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path), xray="chest_pa")
    a = ds[0]
    assert a["xrays"].shape == (2, 1, 16, 16) and 0 <= float(a["xrays"].min()) and float(a["xrays"].max()) <= 1
    calls = []
    real = spectral.material_lines
    monkeypatch.setattr(spectral, "material_lines", lambda *x, **k: calls.append(1) or real(*x, **k))
    b = create(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path), xray="chest_pa")[0]
    assert not calls  # the lines came from the cache
    assert torch.equal(a["xrays"], b["xrays"])  # the preset's noise is fixed per case
    ideal = create(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path))[0]
    assert not torch.allclose(ideal["xrays"], a["xrays"], atol=0.05)


def test_style_is_drawn_per_epoch_and_item(root, tmp_path):
    ds = create(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path),
                augment={"style": {"kvp": [70, 130], "grid": 0.5}})
    e0 = ds[0]["xrays"]
    assert torch.equal(e0, ds[0]["xrays"])  # same (seed, epoch, item): same image
    assert not torch.equal(e0, ds[1]["xrays"])
    ds.set_epoch(1)
    assert not torch.allclose(e0, ds[0]["xrays"], atol=1e-3)  # a new epoch draws a new style
    val = create(split="val", root=str(root), split_fractions=[0, 1, 0], cache_dir=str(tmp_path),
                 augment={"style": {}})
    assert torch.equal(val[0]["xrays"], val[0]["xrays"])
    with pytest.raises(RecipeError, match="style -> kvpp"):
        create(root=str(root), split_fractions=[1, 0, 0], augment={"style": {"kvpp": [70, 100]}})
    with pytest.raises(RecipeError, match="unknown X-ray preset"):
        create(root=str(root), split_fractions=[1, 0, 0], xray="chest_ap")


def test_training_makes_the_style_on_the_batch_with_the_items_own_images(root, tmp_path):
    """In training (StageData), items carry cached lines and their draw; the batch's X-rays, made on the batch,
    equal the images the dataset gives item by item (style, image-space augmentations and all)."""
    from accelerate import Accelerator
    from torch.utils.data import default_collate

    from x2ct_framework.training.sampling import StageData

    options = dict(root=str(root), split_fractions=[1, 0, 0], cache_dir=str(tmp_path),
                   augment={"style": {"kvp": [70, 130], "grid": 0.5}, "noise": {"std": 0.01}})
    direct = create(**options)
    direct.set_epoch(3)
    expected = torch.stack([direct[i]["xrays"] for i in range(2)])

    train = create(**options)
    data = StageData(train, create(**options), batch_size=2, num_workers=0, seed=0)
    assert train.render_on_batch
    item = train[0]
    assert "xrays" not in item and item["xray_lines"].shape[:2] == (2, 5)  # lines of 5 materials, no image yet
    train.set_epoch(3)
    batch = default_collate([train[0], train[1]])
    finished = data.finish(batch)
    assert "xray_lines" not in finished and "xray_draw" not in finished
    assert torch.equal(finished["xrays"], expected)
    # the loader path: every batch of an epoch arrives with X-rays, the same as item by item
    acc = Accelerator(cpu=True)
    data.train = acc.prepare(data.train)  # as the trainer does
    (batch,) = [b for b in data.epoch(acc, 3)]
    order = data.sampler.__iter__()
    assert torch.equal(batch["xrays"], torch.stack([direct[i]["xrays"] for i in order]))
    # a batch without deferred items passes unchanged
    plain = {"xrays": expected}
    assert data.finish(plain) is plain
