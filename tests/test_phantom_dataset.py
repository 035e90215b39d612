"""``synthetic_phantom``'s anatomy version, oversampled rendering and detector options."""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework.errors import RecipeError
from x2ct_framework.phantom import chest_phantom
from x2ct_framework.physics import MU_WATER, drr
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.stage import Stage

HU = (-1000.0, 3000.0)


def create(split: str = "train", resolution: int = 16, **options):
    return get_plugin_manager().registry("dataset").create("synthetic_phantom", options, where="recipe.toml: data",
                                                           split=split, stage=Stage("stage1", 1, resolution))


def drr_of(hu: torch.Tensor, geometry: dict, size: int) -> torch.Tensor:
    ct01 = ((hu.clamp(*HU) - HU[0]) / (HU[1] - HU[0]))[None, None]
    return drr(ct01, {k: v[None] for k, v in geometry.items()}, HU, det_shape=(size, size))[0]


def test_phantom_version_option():
    v1 = create(num_train=1, phantom_version=1)[0]
    v2 = create(num_train=1)[0]
    seed = create(num_train=1).case_seed(0)
    assert torch.equal(v1["labels"][0], chest_phantom(16, seed, version=1)[1])
    assert torch.equal(v2["labels"][0], chest_phantom(16, seed, version=2)[1])
    assert not torch.equal(v1["ct"], v2["ct"])
    with pytest.raises(RecipeError, match="phantom_version"):
        create(phantom_version=7)
    with pytest.raises(RecipeError, match="arms"):
        create(phantom_version=1, arms=True)


def test_defaults_render_from_the_target_without_detector_effects():
    item = create(num_train=1, image_size=20)[0]
    assert torch.allclose(drr_of((item["ct"][0] * 4000.0 - 1000.0), item["geometry"], 20), item["xrays"], atol=1e-4)


def test_render_oversample_renders_the_same_patient_on_a_finer_grid():
    ds = create(num_train=1, image_size=20, render_oversample=2)
    item = ds[0]
    assert item["ct"].shape[-1] == 16
    fine, _ = chest_phantom(32, ds.case_seed(0))
    assert torch.allclose(drr_of(fine, item["geometry"], 20), item["xrays"], atol=1e-4)
    same = create(num_train=1, image_size=20, render_resolution=32)[0]
    assert torch.equal(same["xrays"], item["xrays"])
    with pytest.raises(RecipeError, match="not both"):
        create(render_oversample=2, render_resolution=48)
    with pytest.raises(RecipeError, match="render_oversample"):
        create(render_oversample=0)


def test_xray_noise_follows_photon_statistics_and_is_fixed_per_case():
    clean = create(num_train=2, image_size=64)[0]["xrays"]
    ds = create(num_train=2, image_size=64, xray_noise=0.02)
    noisy = ds[0]["xrays"]
    assert torch.equal(noisy, create(num_train=2, image_size=64, xray_noise=0.02)[0]["xrays"])  # per case and seed
    assert not torch.equal(ds[0]["xrays"], ds[1]["xrays"])
    # the DRR's noise is noise / (sqrt(I) * max_path) where I = exp(-DRR * max_path) is the transmitted fraction
    # (images stay in [0, 1]: in air, I = 1, the negative half is clipped, so it is left out here)
    max_path = MU_WATER * 320.0
    intensity = torch.exp(-clean * max_path)
    for lo, hi in ((0.3, 0.9), (0.02, 0.08)):
        band = (intensity > lo) & (intensity < hi)
        assert int(band.sum()) > 200
        expected = float((0.02 / intensity[band].sqrt() / max_path).pow(2).mean().sqrt())
        assert math.isclose(float((noisy - clean)[band].std()), expected, rel_tol=0.15), (lo, hi)
        assert abs(float((noisy - clean)[band].mean())) < 0.2 * expected


def test_xray_blur_is_a_gaussian_in_transmitted_intensity():
    from scipy.ndimage import gaussian_filter

    clean = create(num_train=1, image_size=64)[0]["xrays"]
    blurred = create(num_train=1, image_size=64, xray_blur_mm=10.0)[0]["xrays"]
    max_path = MU_WATER * 320.0
    pixel_mm = 320.0 / 64
    reference = gaussian_filter(torch.exp(-clean * max_path).numpy(), sigma=(0, 0, 10.0 / pixel_mm, 10.0 / pixel_mm),
                                mode="reflect", truncate=3.0)
    reference = -torch.log(torch.from_numpy(reference).clamp_min(1e-7)) / max_path
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert float((blurred - reference)[inner].abs().max()) < 2e-3
    assert float((blurred - clean).abs().max()) > 0.02  # edges are softened
    with pytest.raises(RecipeError, match="xray_noise"):
        create(xray_blur_mm=-1.0)


def test_detector_options_are_cached(tmp_path, monkeypatch):
    import x2ct_plugins.datasets.synthetic_phantom as mod

    first = create(num_train=1, cache_dir=str(tmp_path), memory_cache_mb=0, xray_noise=0.01, xray_blur_mm=2.0)[0]
    monkeypatch.setattr(mod, "render_views", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    again = create(num_train=1, cache_dir=str(tmp_path), memory_cache_mb=0, xray_noise=0.01, xray_blur_mm=2.0)[0]
    assert torch.equal(first["xrays"], again["xrays"])
    with pytest.raises(pytest.fail.Exception):  # other detector settings are another cache entry
        create(num_train=1, cache_dir=str(tmp_path), memory_cache_mb=0, xray_noise=0.02)[0]


def test_pe_fraction_and_study_labels():
    from torch.utils.data import DataLoader

    from x2ct_framework.phantom import pulmonary_embolism_study

    assert "study" not in create(num_train=1)[0]  # off by default: items as before
    ds = create(num_train=12, resolution=32, pe_fraction=0.5)
    flags = [ds.has_emboli(i) for i in range(12)]
    assert 2 <= sum(flags) <= 10 and flags == [create(num_train=12, pe_fraction=0.5).has_emboli(i) for i in range(12)]
    for i in range(12):
        item = ds[i]
        assert item["study"] == pulmonary_embolism_study(ds.case_seed(i), flags[i])
        assert item["study"]["pe_present"] == int(flags[i])
        if not flags[i]:
            assert not (item["labels"] == 9).any()
    assert any(bool((ds[i]["labels"] == 9).any()) for i in range(12) if flags[i])
    assert all(create(num_train=4, pe_fraction=1.0).has_emboli(i) for i in range(4))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["study"]["pe_present"].shape == (4,) and len(batch["study"]["pe_location"]) == 4
    with pytest.raises(RecipeError, match="pe_fraction"):
        create(pe_fraction=1.5)
    with pytest.raises(RecipeError, match="phantom_version"):
        create(pe_fraction=0.5, phantom_version=1)


def test_xray_ideal_is_todays_drr_and_a_preset_renders_through_the_simulator(tmp_path, monkeypatch):
    """``xray = "ideal"`` (the default) is today's DRR; a realistic preset renders the same CT, geometry and
    label map through ``physics.spectral.simulate``, differs from the ideal DRR, and is the same on every
    call and for the same seed (its noise drawn from the case's seed)."""
    from x2ct_framework.physics.spectral import simulate

    default = create(num_train=2, image_size=20)[0]
    assert torch.equal(create(num_train=2, image_size=20, xray="ideal")[0]["xrays"], default["xrays"])
    table = create(num_train=2, image_size=20, xray={"preset": "ideal"})[0]["xrays"]
    assert torch.allclose(table, default["xrays"], atol=1e-6, rtol=0)
    assert torch.allclose(drr_of(default["ct"][0] * 4000.0 - 1000.0, default["geometry"], 20), table, atol=1e-4)

    ds = create(num_train=2, image_size=20, xray="chest_pa", cache_dir=str(tmp_path), memory_cache_mb=0)
    item = ds[0]
    assert item["xrays"].shape == default["xrays"].shape and item["xrays"].dtype == torch.float32
    assert float((item["xrays"] - default["xrays"]).abs().max()) > 0.1
    assert torch.equal(ds[0]["xrays"], item["xrays"])
    again = create(num_train=2, image_size=20, xray="chest_pa")[0]["xrays"]  # no cache: rendered again
    assert torch.equal(again, item["xrays"])
    assert not torch.equal(ds[1]["xrays"], item["xrays"])
    # noise aside, exactly the simulator on the item's CT, geometry and label map
    quiet = create(num_train=2, image_size=20, xray={"preset": "chest_pa", "noise": False})[0]
    ref = simulate(quiet["ct"][None], {k: v[None] for k, v in quiet["geometry"].items()},
                   {"preset": "chest_pa", "noise": False}, hu_window=HU, det_shape=20, labels=quiet["labels"][None])[0]
    assert torch.allclose(quiet["xrays"], ref, atol=1e-6)
    assert float((quiet["xrays"] - item["xrays"]).abs().mean()) > 0  # the noise is there in the preset

    import x2ct_framework.physics.spectral as spectral

    monkeypatch.setattr(spectral, "simulate", lambda *a, **k: pytest.fail("rendered again despite the cache"))
    assert torch.equal(create(num_train=2, image_size=20, xray="chest_pa", cache_dir=str(tmp_path),
                              memory_cache_mb=0)[0]["xrays"], item["xrays"])
    with pytest.raises(pytest.fail.Exception):  # another preset is another cache entry
        create(num_train=2, image_size=20, xray="portable_ap", cache_dir=str(tmp_path), memory_cache_mb=0)[0]


def test_xray_option_errors_are_named():
    with pytest.raises(RecipeError, match="chest_ap"):
        create(xray="chest_ap")
    with pytest.raises(RecipeError, match="kvpp"):
        create(xray={"preset": "chest_pa", "kvpp": 100})
    with pytest.raises(RecipeError, match="xray_noise"):
        create(xray="chest_pa", xray_noise=0.01)
