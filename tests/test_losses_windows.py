"""Loss options of issue 15: random 2.5D slices and a display window (VGG), SSIM in extra HU windows
(against scikit-image), the vessel map cached per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from x2ct_framework.errors import RecipeError
from x2ct_framework.plugins import get_plugin_manager


def make(name, **options):
    return get_plugin_manager().registry("loss").create(name, options, where="r.toml: losses",
                                                        context={"hu_window": [-1000, 3000]})


def unit(hu):
    return (np.asarray(hu, dtype=np.float64) + 1000.0) / 4000.0


def test_ssim_soft_tissue_window_sees_smoothed_soft_tissue():
    rng = np.random.default_rng(0)
    target = unit(40 + 30 * rng.standard_normal((1, 1, 16, 16, 16)))   # soft tissue texture, +-30 HU
    pred = unit(np.full_like(target, 40.0))                             # all of it smoothed away
    t, p = torch.tensor(target, dtype=torch.float32), torch.tensor(pred, dtype=torch.float32)
    plain = make("ssim")(p, t, {}).item()
    windowed = make("ssim", windows=[[-160, 240]])(p, t, {}).item()

    def sk(a, b, lo, hi):
        a, b = [np.clip((unit_v * 4000.0 - 1000.0 - lo) / (hi - lo), 0, 1) for unit_v in (a, b)]
        return structural_similarity(a[0, 0], b[0, 0], gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    full = sk(pred, target, -1000, 3000)
    soft = sk(pred, target, -160, 240)
    assert plain == pytest.approx(1 - full, abs=1e-4)
    assert windowed == pytest.approx(1 - (full + soft) / 2, abs=1e-4)
    assert soft < full - 0.2                                            # the window shows the loss of texture


def test_vgg_display_window_and_random_slices():
    torch.manual_seed(0)
    target = torch.rand(1, 1, 16, 16, 16) * 0.2 + 0.1
    pred = target.clone()
    pred[:, :, 4:12, 4:12, 4:12] = 0.9                                 # 2600 HU vs 2800 HU: both above 1000
    target[:, :, 4:12, 4:12, 4:12] = 0.95
    windowed = make("vgg", weights="random", slices=2, display_window=[-1000, 1000])
    assert windowed(pred, target, {}).item() == 0.0
    assert make("vgg", weights="random", slices=2)(pred, target, {}).item() > 0
    noisy = target + 0.05 * torch.randn_like(target)
    rnd = make("vgg", weights="random", slices=1, layers=["relu1_2"], random_slices=True)
    values = {round(rnd(noisy, target, {}).item(), 7) for _ in range(6)}
    assert len(values) > 1                                              # training: new slices each step
    rnd.eval()                                                          # evaluation: the bin centres
    at_eval = rnd(noisy, target, {}).item()
    rnd.train()
    rnd.sampler.random = False
    assert rnd(noisy, target, {}).item() == pytest.approx(at_eval, rel=1e-6)


def test_vessel_map_is_cached_per_case_and_recomputed_for_a_changed_target():
    torch.manual_seed(0)
    target, pred = torch.rand(2, 1, 12, 12, 12), torch.rand(2, 1, 12, 12, 12)
    batch = {"case_id": ["a", "b"]}
    cached, fresh = make("vessel", use_labels=False), make("vessel", use_labels=False, cache_size=0)
    first = cached(pred, target, batch)
    again = cached(pred, target, batch)
    assert cached.cache_hits == 2
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, fresh(pred, target, batch), rtol=1e-3, atol=1e-4)   # float16 cache
    flipped = target.flip(-1)                                           # an augmented copy of the same cases
    torch.testing.assert_close(cached(pred, flipped, batch), fresh(pred, flipped, batch), rtol=1e-3, atol=1e-4)
    assert cached.cache_hits == 2


@pytest.mark.parametrize("name,options,match", [("ssim", {"windows": [[240, -160]]}, "windows must be a list"),
                                                ("vgg", {"weights": "random", "display_window": [5]},
                                                 "display_window must be"),
                                                ("vessel", {"cache_size": -1}, "cache_size must be")])
def test_bad_window_options(name, options, match):
    with pytest.raises(RecipeError, match=match):
        make(name, **options)
