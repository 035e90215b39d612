"""Sharpness, perceptual, distribution and uncertainty metrics against analytic results and independent code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from x2ct_framework.conventions import BONE, SOFT
from x2ct_framework.errors import DataError, PluginError
from x2ct_framework.evaluation.metrics import LPIPS, lpips_trunk_file
from x2ct_framework.evaluation.protocols import build_protocol
from x2ct_framework.evaluation.sharpness_metrics import (LPIPS3, EdgeSharpness, HighFrequencyEnergy, SetDistance,
                                                         UncertaintyCalibration, build_extractor, fid_from_features,
                                                         kid_from_features, radial_frequency, rankdata)
from x2ct_framework.plugins import get_plugin_manager

HU = (-1000.0, 3000.0)


def _to01(hu):
    return ((torch.as_tensor(hu, dtype=torch.float64).clamp(*HU) - HU[0]) / (HU[1] - HU[0]))


def _metric(name, **options):
    return get_plugin_manager().registry("metric").create(name, options, context={"hu_window": list(HU)})


def test_the_names_other_stages_reference_are_registered():
    reg = get_plugin_manager().registry("metric")
    for name in ("hf_energy_ratio", "edge_sharpness", "lpips3", "uncertainty_spearman", "uncertainty_coverage",
                 "fid3d", "kid3d"):
        assert name in reg, name


# ---- high-frequency energy --------------------------------------------------------------------
def _noise(n=32, seed=0):
    return np.random.default_rng(seed).uniform(0.3, 0.7, (n, n, n))


def test_hf_energy_of_the_target_itself_is_one():
    x = torch.tensor(_noise())[None, None]
    assert _metric("hf_energy_ratio")(x, x).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("sigma, cutoff", [(1.0, 0.1), (1.0, 0.25), (1.5, 0.15)])
def test_hf_energy_of_a_gaussian_blur_follows_its_transfer_function(sigma, cutoff):
    # A Gaussian of sigma voxels multiplies the power at frequency f by exp(-4 pi^2 sigma^2 f^2). On this noise
    # volume (white: independent voxels) the ratio is that factor averaged over the bins above the cutoff,
    # weighted by the noise's own power (its spectrum by NumPy's FFT; the blur by scipy).
    x = _noise(seed=int(sigma * 10))
    y = gaussian_filter(x, sigma, mode="wrap", truncate=6.0)
    ours = HighFrequencyEnergy(HU, cutoff=cutoff)(torch.tensor(y)[None, None], torch.tensor(x)[None, None]).item()
    f = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(32)] * 3, indexing="ij")))
    power = np.abs(np.fft.fftn(x)) ** 2
    h2 = np.exp(-4 * math.pi**2 * sigma**2 * f**2)
    keep = f > cutoff
    assert ours == pytest.approx((power * h2)[keep].sum() / power[keep].sum(), rel=0.01)
    # and its expectation for a flat (white) spectrum, which one 32^3 draw meets to about 10 %
    assert ours == pytest.approx(h2[keep].mean(), rel=0.15)
    assert ours < 0.05


def test_radial_frequency_and_bad_cutoff():
    f = radial_frequency((4, 4, 4))
    assert f[0, 0, 0].item() == 0.0 and f[2, 2, 2].item() == pytest.approx(math.sqrt(3) / 2)
    with pytest.raises(ValueError, match="cutoff"):
        HighFrequencyEnergy(HU, cutoff=0.9)


# ---- edge sharpness ---------------------------------------------------------------------------
def _slab(n=16):
    """Bone (1000 HU, label 3) for z >= 8 in soft tissue (0 HU): one plane of boundary."""
    t = torch.zeros(n, n, n, dtype=torch.float64)
    labels = torch.full((n, n, n), SOFT, dtype=torch.uint8)
    t[8:], labels[8:] = 1000.0, BONE
    return t, labels


def test_edge_sharpness_of_a_step_and_a_ramp_is_hand_computed():
    t, labels = _slab()
    batch = {"labels": labels[None, None]}
    # the band is z = 7 and 8; the step's central differences there are (1000 - 0) / 2 = 500 HU/mm
    p = t.clone()
    p[7], p[8] = 250.0, 750.0  # a ramp: (750 - 0) / 2 = 375 and (1000 - 250) / 2 = 375 HU/mm -> 0.75
    m = EdgeSharpness(HU, structures=["bone"])
    assert m(_to01(t)[None, None], _to01(t)[None, None], batch).item() == pytest.approx(1.0, abs=1e-12)
    assert m(_to01(p)[None, None], _to01(t)[None, None], batch).item() == pytest.approx(0.75, abs=1e-6)
    # without labels, the bone threshold (>= 400 HU) inside the body finds the same boundary
    assert m(_to01(p)[None, None], _to01(t)[None, None], {}).item() == pytest.approx(0.75, abs=1e-6)
    # anisotropic voxels: the gradient is in HU/mm, the ratio of this plane's edge is unchanged
    assert m(_to01(p)[None, None], _to01(t)[None, None], {**batch, "spacing": torch.tensor([[1.0, 1.0, 2.0]])}
             ).item() == pytest.approx(0.75, abs=1e-6)


def test_edge_sharpness_reads_finer_bone_codes_from_the_conventions(monkeypatch):
    from x2ct_framework import conventions

    t, labels = _slab()
    t[8:] = 300.0  # below the bone threshold: only a label can make it bone
    labels[8:] = 20
    p = t.clone()
    p[7], p[8] = 75.0, 225.0  # half the step's gradient in the band
    m = EdgeSharpness(HU, structures=["bone"])
    args = (_to01(p)[None, None], _to01(t)[None, None], {"labels": labels[None, None]})
    assert math.isnan(m(*args).item())  # code 20 means nothing yet
    monkeypatch.setattr(conventions, "LABEL_NAMES", {**conventions.LABEL_NAMES, 20: "ribs"})
    assert m(*args).item() == pytest.approx(0.75, abs=1e-6)


def test_edge_sharpness_falls_with_blur_and_scales_with_contrast():
    from x2ct_framework.phantom import chest_phantom

    hu, labels = chest_phantom(32, 1)
    t = _to01(hu)[None, None]
    batch = {"labels": labels[None, None]}
    half = _to01(hu * 0.5)[None, None]  # every HU difference halved: every gradient halved
    assert _metric("edge_sharpness")(half, t, batch).item() == pytest.approx(0.5, abs=1e-5)
    blurred = [_to01(torch.tensor(gaussian_filter(hu.numpy().astype(np.float64), s)))[None, None] for s in (0.7, 1.5)]
    r = [_metric("edge_sharpness")(b, t, batch).item() for b in blurred]
    assert 1.0 > r[0] > r[1] > 0.2


# ---- LPIPS over three axes --------------------------------------------------------------------
@pytest.mark.slow  # builds AlexNet twice (about 10 s on a busy CPU)
def test_lpips3_offline_uses_a_seeded_random_backbone_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no ImageNet weights here
    m = LPIPS3(HU, slices=2)
    assert m.backbone == "random" and m.unit == "random backbone"
    assert str(lpips_trunk_file("alex")) in m.note
    with pytest.raises(PluginError, match="alexnet"):
        LPIPS3(HU, backbone="imagenet")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 1, 16, 16, 16, generator=g)
    p = (t + 0.2 * torch.rand(2, 1, 16, 16, 16, generator=g)).clamp(0, 1)
    # the same numbers as the lpips metric on the same random trunk drawn from the same seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = LPIPS(HU, slices=2, random_backbone=True)
    assert m(p, t).tolist() == pytest.approx(ref(p, t).tolist(), abs=1e-6)
    assert m(t, t).abs().max().item() < 1e-6
    assert LPIPS3(HU, slices=2, seed=1)(p, t).tolist() != pytest.approx(ref(p, t).tolist(), abs=1e-6)
    assert "lpips3" not in build_protocol("default", HU, lpips=False).metrics  # --lpips off: neither LPIPS
    proto = build_protocol("default", HU, lpips="auto")
    assert proto.unit("lpips3") == "random backbone" and any("random-initialised" in n for n in proto.notes)


# ---- FID / KID --------------------------------------------------------------------------------
def _features(n=40, d=8, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_fid_of_a_set_with_itself_is_zero_and_matches_the_formula():
    from scipy.linalg import sqrtm

    a, b = _features(seed=0), _features(seed=1, shift=0.5)
    assert abs(fid_from_features(a, a)) < 1e-6
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    ref = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real))
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid_from_features(a, b) > 8 * 0.25 * 0.5  # at least most of |mu_a - mu_b|^2 = 8 * 0.25


def test_kid_is_the_unbiased_mmd_with_a_cubic_polynomial_kernel():
    a, b = _features(n=30, seed=2), _features(n=30, seed=3, shift=0.3)
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1.0) ** 3

    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    ref = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
           - 2 * kxy.sum() / m**2).item()
    # one subset of all cases: the subset draw is a permutation, which the statistic does not see
    assert kid_from_features(a, b, subset_size=m, subsets=1) == pytest.approx(ref, rel=1e-9)
    # two draws of one distribution score far below draws of shifted ones (the estimator is unbiased: about 0)
    same = kid_from_features(_features(n=30, seed=4), _features(n=30, seed=5), subset_size=m, subsets=1)
    assert abs(same) < 0.5 * ref


def test_set_distance_accumulates_features_over_batches():
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(6, 1, 16, 16, 16, generator=g)
    other = (vols * 0.5 + 0.1).clamp(0, 1)
    m = SetDistance(HU, kind="fid")
    for i in (0, 3):
        assert torch.isnan(m(other[i:i + 3], vols[i:i + 3])).all()  # per case: nothing
    ext = build_extractor("random3d", seed=0)
    ref = fid_from_features(ext(other).double(), ext(vols).double())
    assert m.result() == pytest.approx(ref, rel=1e-6) and ref > 0
    m.reset()
    m(vols, vols)
    assert abs(m.result()) < 1e-6
    assert m.unit == "random features" and "random-initialised" in m.note
    with pytest.raises(ValueError, match="extractor"):
        build_extractor("nonsense")
    with pytest.raises(PluginError, match="weights not found"):
        build_extractor("random3d", weights="/nonexistent/extractor.pt")


def test_a_pluggable_extractor_by_import_path():
    # the tests folder is on sys.path under pytest, so this module imports as test_metrics_sharpness
    m = SetDistance(HU, kind="kid", extractor=f"{__name__}:_mean_extractor", kid_subset_size=4, kid_subsets=3)
    g = torch.Generator().manual_seed(1)
    p, t = torch.rand(4, 1, 8, 8, 8, generator=g), torch.rand(4, 1, 8, 8, 8, generator=g) * 0.5
    m(p, t)
    feats = _MeanFeatures()
    assert m.result() == pytest.approx(kid_from_features(feats(p), feats(t), 4, 3), rel=1e-9)


class _MeanFeatures(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3, 4)), x.std((1, 2, 3, 4))], 1)


def _mean_extractor():
    return _MeanFeatures()


def test_the_evaluation_reports_one_set_value_per_protocol():
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4, 1, 16, 16, 16, generator=g)
    p = (t + 0.1).clamp(0, 1)
    proto = build_protocol("default", HU, lpips=False, anatomy=False)
    proto.reset()
    for i in (0, 2):
        out = proto(p[i:i + 2], t[i:i + 2], {})
        assert torch.isnan(out["default/fid3d"]).all()
    res = proto.set_results()
    ext = build_extractor("random3d", seed=0)
    assert res["default/fid3d"] == pytest.approx(fid_from_features(ext(p).double(), ext(t).double()), rel=1e-6)
    assert set(res) == {"default/fid3d", "default/kid3d"}


# ---- uncertainty ------------------------------------------------------------------------------
def test_rankdata_averages_ties():
    from scipy.stats import rankdata as scipy_rank

    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    assert rankdata(x).tolist() == scipy_rank(x.numpy()).tolist()


def test_uncertainty_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 1, 10, 10, 10, generator=g, dtype=torch.float64) * 0.5 + 0.2
    p = t + 0.05 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    err = (p - t).abs()
    std = torch.round((err + 0.03 * torch.rand(t.shape, generator=g, dtype=torch.float64)) * 50) / 50  # many ties
    m = UncertaintyCalibration(HU, kind="spearman", region="all")
    ours = m(p, t, {"pred_std": std})
    for i in range(2):
        ref = spearmanr(std[i].flatten().numpy(), err[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert 0.3 < ours[0].item() < 1.0
    # the registered metric reads batch["pred_std"] over the body; NaN without one
    assert torch.isnan(_metric("uncertainty_spearman")(p, t, {})).all()


def test_uncertainty_coverage_counts_errors_within_two_std():
    t = torch.full((1, 1, 4, 4, 4), 0.5, dtype=torch.float64)
    p = t.clone()
    p.view(-1)[:16] += 0.1  # 16 of 64 voxels err by 0.1
    std = torch.full_like(t, 0.04)  # 2 std = 0.08 < 0.1: those 16 are outside
    m = UncertaintyCalibration(HU, kind="coverage", region="all")
    assert m(p, t, {"pred_std": std}).item() == pytest.approx(48 / 64)
    assert m(p, t, {"pred_std": std * 2}).item() == pytest.approx(1.0)
    with pytest.raises(DataError, match="pred_std"):
        m(p, t, {"pred_std": torch.zeros(3)})


@pytest.mark.parametrize("k", [4, 8])
def test_a_calibrated_sampler_covers_what_calibrated_coverage_says_not_0954(k):
    """Truth and K samples from the same Gaussian in every voxel, scored as x2ct evaluate scores them (the mean
    of the samples against the truth, their n - 1 std): the coverage at 2 std is the t-distribution's value for
    K samples (0.899 for K = 8), well below the 0.954 of a known std."""
    from x2ct_framework.evaluation.sharpness_metrics import calibrated_coverage
    from x2ct_framework.generative import SampleStats

    g = torch.Generator().manual_seed(k)
    shape = (2, 1, 24, 24, 24)
    centre, spread = 0.5, 0.02
    truth = centre + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    stats = SampleStats()
    for _ in range(k):
        stats.add(centre + spread * torch.randn(shape, generator=g, dtype=torch.float64))
    got = UncertaintyCalibration(HU, kind="coverage", region="all")(stats.mean, truth, {"pred_std": stats.std()})
    assert got.mean().item() == pytest.approx(calibrated_coverage(k), abs=0.01)  # 27,648 voxels
    assert calibrated_coverage(k) < 0.95 - 0.02
    assert calibrated_coverage(10_000) == pytest.approx(0.9545, abs=1e-3)
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        calibrated_coverage(1)


# ---- recipes ----------------------------------------------------------------------------------
def test_recipes_may_name_the_new_metrics_but_not_a_set_metric_for_validation(tiny_recipe):
    from x2ct_framework.config.build import build_metrics
    from x2ct_framework.config.recipe import load_recipe
    from x2ct_framework.errors import RecipeError

    names = ["psnr_lung", "ssim_soft", "contrast_retention", "contrast_chambers", "heldout_view_psnr",
             "hf_energy_ratio", "edge_sharpness", "uncertainty_spearman"]
    built = build_metrics(load_recipe(tiny_recipe, [f"eval.metrics={names!r}".replace("'", '"'),
                                                    'stages.1.select_best="val/psnr_lung"']))
    assert list(built) == names
    with pytest.raises(RecipeError, match="fid3d.*one number for a whole split"):
        build_metrics(load_recipe(tiny_recipe, ['eval.metrics=["psnr", "fid3d"]']))
