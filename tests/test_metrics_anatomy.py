"""Window, structure-contrast and held-out-view metrics against scikit-image and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from x2ct_framework import conventions
from x2ct_framework.conventions import BONE, HEART, LUNG, SOFT, VESSEL
from x2ct_framework.evaluation.anatomy_metrics import (CONTRAST_STRUCTURES, ContrastRetention, HeldOutView,
                                                       StructureContrast)
from x2ct_framework.evaluation.metrics import PSNR, SSIM, WINDOWS
from x2ct_framework.evaluation.protocols import build_protocol
from x2ct_framework.physics import drr, make_geometry
from x2ct_framework.plugins import get_plugin_manager

HU = (-1000.0, 3000.0)


def _to01(hu):
    return ((torch.as_tensor(hu, dtype=torch.float64).clamp(*HU) - HU[0]) / (HU[1] - HU[0]))


def _metric(name, **options):
    return get_plugin_manager().registry("metric").create(name, options, context={"hu_window": list(HU)})


# ---- windows ----------------------------------------------------------------------------------
def _hu_pair(seed=0, shape=(2, 1, 16, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    t = -1000.0 + 1700.0 * torch.rand(shape, generator=g, dtype=torch.float64)  # spans both windows
    p = t + 120.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    return p, t


@pytest.mark.parametrize("window", ["lung", "soft"])
def test_windowed_psnr_and_ssim_match_skimage_on_the_rewindowed_volumes(window):
    ph, th = _hu_pair(seed=1)
    p, t = _to01(ph), _to01(th)
    lo, hi = WINDOWS[window]
    psnr, ssim = _metric(f"psnr_{window}")(p, t), _metric(f"ssim_{window}")(p, t)
    # independently: HU as the recipe's window stores it, clipped to the display window, rescaled to [0, 1]
    ph_c = np.clip(ph.clamp(*HU).numpy(), lo, hi)
    th_c = np.clip(th.clamp(*HU).numpy(), lo, hi)
    for i in range(2):
        ref = peak_signal_noise_ratio(th_c[i, 0] - lo, ph_c[i, 0] - lo, data_range=hi - lo)
        assert psnr[i].item() == pytest.approx(ref, abs=1e-4)
        a, b = (ph_c[i, 0] - lo) / (hi - lo), (th_c[i, 0] - lo) / (hi - lo)
        ref = structural_similarity(b, a, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim[i].item() == pytest.approx(ref, abs=1e-5)
    # the named window is the same as its HU range, and differs from the wide window's score
    assert PSNR(HU, window=[lo, hi])(p, t).tolist() == pytest.approx(psnr.tolist())
    assert abs(PSNR(HU)(p, t)[0].item() - psnr[0].item()) > 1.0


def test_an_unknown_window_name_is_a_clear_error():
    with pytest.raises(ValueError, match="'lung', 'soft'"):
        PSNR(HU, window="bone")
    with pytest.raises(ValueError, match="window"):
        SSIM(HU, window=[100.0, -100.0])


# ---- contrast retention -----------------------------------------------------------------------
def _cube_case(inside_t=200.0, inside_p=100.0, label=HEART, background=0.0, n=16):
    """A 4^3 cube of known HU in a uniform background; prediction with another cube value."""
    t = torch.full((n, n, n), background, dtype=torch.float64)
    labels = torch.full((n, n, n), SOFT, dtype=torch.uint8)
    sl = (slice(6, 10),) * 3
    t[sl], labels[sl] = inside_t, label
    p = t.clone()
    p[sl] = inside_p
    return _to01(p)[None, None], _to01(t)[None, None], {"labels": labels[None, None]}


def test_contrast_of_a_cube_with_half_the_contrast_is_one_half():
    p, t, batch = _cube_case(200.0, 100.0)
    values = StructureContrast(HU)(p, t, batch)
    assert values["heart/target"].item() == pytest.approx(200.0, abs=1e-6)  # cube minus background
    assert values["heart/pred"].item() == pytest.approx(100.0, abs=1e-6)
    assert values["heart"].item() == pytest.approx(0.5, abs=1e-9)
    # the heart's voxels at or above 100 HU are its chambers when the conventions have no chamber code
    assert values["chambers"].item() == pytest.approx(0.5, abs=1e-9)
    for s in ("lungs", "great_vessels", "lung_vessels", "spine", "ribs"):  # absent from this case: NaN
        assert math.isnan(values[s].item()), s
    assert _metric("contrast_heart")(p, t, batch).item() == pytest.approx(0.5, abs=1e-6)
    assert _metric("contrast_retention")(p, t, batch).item() == pytest.approx(0.5, abs=1e-6)
    # flat (no contrast left) -> 0; inverted -> negative; all kept -> 1
    for inside_p, expected in ((0.0, 0.0), (-100.0, -0.5), (200.0, 1.0)):
        p, t, batch = _cube_case(200.0, inside_p)
        assert _metric("contrast_heart")(p, t, batch).item() == pytest.approx(expected, abs=1e-6)


def test_contrast_against_a_shell_of_two_voxels_only():
    # a second value far from the cube (outside its 2-voxel shell) does not change the contrast
    p, t, batch = _cube_case(200.0, 100.0)
    far = torch.zeros_like(t, dtype=torch.bool)
    far[..., 0:3, :, :] = True
    t2, p2 = t.clone(), p.clone()
    t2[far], p2[far] = _to01(torch.tensor(-200.0)).item(), _to01(torch.tensor(-200.0)).item()
    assert _metric("contrast_heart")(p2, t2, batch).item() == pytest.approx(0.5, abs=1e-6)
    # with a 4-voxel shell it reaches the far value: hand-computed shell mean and contrast
    values = StructureContrast(HU, shell=4)(p2, t2, batch)
    shell = torch.zeros(16, 16, 16, dtype=torch.bool)
    shell[2:14, 2:14, 2:14] = True
    shell[6:10, 6:10, 6:10] = False
    shell_mean_t = float(torch.where(far[0, 0], -200.0, 0.0)[shell].mean())
    assert values["heart/target"].item() == pytest.approx(200.0 - shell_mean_t, abs=1e-4)
    assert values["heart/pred"].item() == pytest.approx(100.0 - shell_mean_t, abs=1e-4)


def test_contrast_without_labels_uses_hu_thresholds():
    # lungs by threshold: a block of -850 HU in a 0 HU body; the prediction keeps half its contrast
    t = torch.zeros(16, 16, 16, dtype=torch.float64)
    t[4:12, 4:12, 3:7] = -850.0
    p = t.clone()
    p[4:12, 4:12, 3:7] = -425.0
    values = StructureContrast(HU)(_to01(p)[None, None], _to01(t)[None, None], {})
    assert values["lungs"].item() == pytest.approx(0.5, abs=1e-9)
    assert math.isnan(values["heart"].item()) and math.isnan(values["chambers"].item())


def test_lung_vessels_great_vessels_spine_and_ribs_from_generic_labels():
    n = 24
    t = torch.zeros(n, n, n, dtype=torch.float64)
    labels = torch.full((n, n, n), SOFT, dtype=torch.uint8)
    t[4:20, 3:13, 2:9], labels[4:20, 3:13, 2:9] = -850.0, LUNG      # a lung on the right side
    t[8:16, 7:9, 5:7], labels[8:16, 7:9, 5:7] = 300.0, VESSEL       # a vessel inside it
    t[8:16, 7:9, 14:16], labels[8:16, 7:9, 14:16] = 300.0, VESSEL   # a great vessel in the mediastinum
    t[4:20, 18:21, 11:13], labels[4:20, 18:21, 11:13] = 700.0, BONE  # spine: midline, posterior
    t[4:20, 10:12, 21:23], labels[4:20, 10:12, 21:23] = 700.0, BONE  # a rib at the side
    p = t.clone()
    p[8:16, 7:9, 5:7] = -850.0 + 0.5 * 1150.0   # half the lung vessel's contrast against lung
    p[8:16, 7:9, 14:16] = 0.25 * 300.0           # a quarter of the great vessel's against soft tissue
    p[4:20, 18:21, 11:13] = 0.5 * 700.0
    p[4:20, 10:12, 21:23] = 0.75 * 700.0
    values = StructureContrast(HU)(_to01(p)[None, None], _to01(t)[None, None], {"labels": labels[None, None]})
    assert values["lung_vessels/target"].item() == pytest.approx(1150.0, abs=1e-6)
    assert values["lung_vessels"].item() == pytest.approx(0.5, abs=1e-9)
    assert values["great_vessels"].item() == pytest.approx(0.25, abs=1e-9)
    assert values["spine"].item() == pytest.approx(0.5, abs=1e-9)
    assert values["ribs"].item() == pytest.approx(0.75, abs=1e-9)
    # the lung's own contrast: its shell holds soft tissue and the vessels/ribs next to it, unchanged or not
    assert not math.isnan(values["lungs"].item())
    mean = ContrastRetention(HU)(_to01(p)[None, None], _to01(t)[None, None], {"labels": labels[None, None]})
    present = [values[s].item() for s in CONTRAST_STRUCTURES if not math.isnan(values[s].item())]
    assert mean.item() == pytest.approx(float(np.mean(present)), abs=1e-6)


def test_finer_label_codes_in_the_conventions_are_read_at_run_time(monkeypatch):
    n = 24
    t = torch.zeros(n, n, n, dtype=torch.float64)
    labels = torch.full((n, n, n), SOFT, dtype=torch.uint8)
    t[4:20, 18:21, 11:13], labels[4:20, 18:21, 11:13] = 700.0, BONE  # midline bone, coded as ribs below
    p = t.clone()
    p[4:20, 18:21, 11:13] = 350.0
    batch = {"labels": labels[None, None]}
    before = StructureContrast(HU)(_to01(p)[None, None], _to01(t)[None, None], batch)
    assert before["spine"].item() == pytest.approx(0.5) and math.isnan(before["ribs"].item())
    labels2 = labels.clone()
    labels2[labels == BONE] = 20
    monkeypatch.setattr(conventions, "LABEL_NAMES", {**conventions.LABEL_NAMES, 20: "ribs", 21: "spine"})
    after = StructureContrast(HU)(_to01(p)[None, None], _to01(t)[None, None], {"labels": labels2[None, None]})
    assert after["ribs"].item() == pytest.approx(0.5) and math.isnan(after["spine"].item())


def test_contrast_is_nan_when_the_target_has_too_little_contrast():
    p, t, batch = _cube_case(10.0, 5.0)  # 10 HU < min_contrast (20 HU)
    assert math.isnan(_metric("contrast_heart")(p, t, batch).item())
    assert _metric("contrast_heart", min_contrast=5.0)(p, t, batch).item() == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ValueError, match="structure must be"):
        ContrastRetention(HU, structure="liver")


# ---- held-out views ---------------------------------------------------------------------------
def _parallel(views, n=16, mm=320.0):
    return make_geometry(views, "parallel", volume_mm=mm, detector_px=n)


def test_heldout_view_of_the_target_itself_is_perfect():
    g = torch.Generator().manual_seed(0)
    t = (0.2 + 0.1 * torch.rand(2, 1, 16, 16, 16, generator=g))
    geo = {k: v[None].expand(2, *v.shape) for k, v in _parallel([0, 90]).items()}
    batch = {"geometry": geo}
    assert _metric("heldout_view_psnr")(t, t, batch).min().item() > 150.0
    assert _metric("heldout_view_ncc")(t, t, batch).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)


def test_a_prediction_that_matches_the_input_views_but_not_a_new_one_scores_worse():
    # +-200 HU in a checkerboard of 4x4-voxel columns: every row and every column of the pattern sums to 0, so
    # the parallel-beam DRRs at 0 and 90 degrees are unchanged while the diagonal ones are not
    n = 16
    t = torch.zeros(n, n, n, dtype=torch.float64)
    p = t.clone()
    for (ys, xs), sign in (((slice(4, 8), slice(4, 8)), 1), ((slice(8, 12), slice(8, 12)), 1),
                           ((slice(4, 8), slice(8, 12)), -1), ((slice(8, 12), slice(4, 8)), -1)):
        p[:, ys, xs] = 200.0 * sign
    p01, t01 = _to01(p)[None, None].float(), _to01(t)[None, None].float()
    seen = _parallel([0, 90])
    batch = {"geometry": seen}
    d_p, d_t = drr(p01, seen, HU, det_shape=n), drr(t01, seen, HU, det_shape=n)
    assert (d_p - d_t).abs().max().item() < 1e-6  # the input views cannot tell them apart
    perfect = _metric("heldout_view_psnr")(t01, t01, batch).item()
    worse = _metric("heldout_view_psnr")(p01, t01, batch).item()
    assert worse < 60.0 < perfect
    assert _metric("heldout_view_ncc")(p01, t01, batch).item() < 0.999


def test_heldout_view_psnr_of_a_uniform_offset_in_parallel_beam_is_hand_computed():
    # a cube of -500 HU (mu = 0.01/mm) across 320 mm: line integral 3.2, over max_path 0.02 * 320 = 6.4 -> 0.5;
    # the prediction at -400 HU reads 0.6 in every pixel of the views from behind (180) and the right (270):
    # MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    t01 = _to01(torch.full((1, 1, 16, 16, 16), -500.0)).float()
    p01 = _to01(torch.full((1, 1, 16, 16, 16), -400.0)).float()
    batch = {"geometry": _parallel([0, 90])}
    m = HeldOutView(HU, angles=[180.0, 270.0], det_size=16)
    pred_views, target_views = m.views(p01, t01, batch)[0]
    assert target_views.flatten().tolist() == pytest.approx([0.5] * target_views.numel(), abs=1e-5)
    assert pred_views.flatten().tolist() == pytest.approx([0.6] * pred_views.numel(), abs=1e-5)
    assert m(p01, t01, batch).item() == pytest.approx(20.0, abs=1e-3)


def test_seen_angles_are_skipped_and_missing_geometry_is_nan():
    t = _to01(torch.zeros(1, 1, 16, 16, 16)).float()
    m = HeldOutView(HU, angles=[0.0, 90.0, 450.0, 45.0])
    assert m.held_out(torch.tensor([0.0, 90.0])) == [45.0]  # 450 = 90 modulo 360
    assert math.isnan(HeldOutView(HU, angles=[360.0, 90.2])(t, t, {"geometry": _parallel([0, 90])}).item())
    assert math.isnan(m(t, t, {}).item())
    with pytest.raises(ValueError, match="angles"):
        HeldOutView(HU, angles=[])


def test_heldout_view_in_a_cone_beam_batch_uses_the_batch_geometry_and_xray_size():
    from x2ct_framework.phantom import toy_chest

    hu, _ = toy_chest(16, 1)
    t = _to01(hu)[None, None].float()
    p = _to01(hu + 80.0)[None, None].float()
    geo = make_geometry([0, 90], "x2ctgan")
    batch = {"geometry": geo, "xrays": torch.zeros(1, 2, 1, 20, 20)}
    m = HeldOutView(HU)
    views = m.views(p, t, batch)[0]
    assert views[0].shape == (2, 1, 20, 20)
    d_ref = drr(torch.cat([p, t]), {**{k: v[:1].expand(2, *v.shape[1:]).clone() for k, v in geo.items()},
                                     "angles": torch.tensor([45.0, 135.0])}, HU, det_shape=(20, 20))
    assert torch.allclose(views[0], d_ref[0], atol=1e-6) and torch.allclose(views[1], d_ref[1], atol=1e-6)
    mse = float(((d_ref[0] - d_ref[1]).double() ** 2).mean())
    assert m(p, t, batch).item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)


# ---- the default protocol -----------------------------------------------------------------------
def test_the_default_protocol_names_the_new_metrics():
    from x2ct_framework.phantom import toy_chest

    hu, labels = toy_chest(16, 2)
    t = _to01(hu)[None, None].float()
    p = _to01(hu * 0.8)[None, None].float()
    batch = {"labels": labels[None, None], "geometry": make_geometry([0, 90], "parallel", detector_px=16)}
    out = build_protocol("default", HU, lpips=False)(p, t, batch)
    for name in ("psnr_lung", "ssim_lung", "psnr_soft", "ssim_soft", "contrast_retention", "heldout_view_psnr",
                 "heldout_view_ncc", *[f"contrast_{s}" for s in CONTRAST_STRUCTURES]):
        assert f"default/{name}" in out, name
    assert out["default/psnr_soft"].item() == pytest.approx(PSNR(HU, window="soft")(p, t, batch).item(), rel=1e-6)
    assert out["default/contrast_spine"].item() == pytest.approx(
        ContrastRetention(HU, "spine")(p, t, batch).item(), rel=1e-6)
    assert math.isfinite(out["default/heldout_view_psnr"].item())
    lean = build_protocol("default", HU, lpips=False, anatomy=False, sharpness=False)(p, t, batch)
    assert "default/psnr_lung" not in lean and "default/psnr" in lean


def test_the_protocol_computes_the_regions_once_per_batch_and_never_reuses_another_batch(monkeypatch):
    import x2ct_framework.evaluation.anatomy_metrics as A

    calls = []
    real = A.structure_regions
    monkeypatch.setattr(A, "structure_regions", lambda *a, **k: calls.append(1) or real(*a, **k))
    proto = build_protocol("default", HU, lpips=False, sharpness=False)
    results = []
    for inside_p in (100.0, 50.0):  # two batches in a row, as an evaluation scores them
        p, t, batch = _cube_case(200.0, inside_p)
        results.append(proto(p.float(), t.float(), batch)["default/contrast_heart"].item())
        del p, t, batch
    assert len(calls) == 2  # once per batch for all eight contrast columns
    assert results == pytest.approx([0.5, 0.25], abs=1e-5)
    # changed in place: computed again
    p, t, batch = _cube_case(200.0, 100.0)
    m = ContrastRetention(HU, "heart")
    assert m(p, t, batch).item() == pytest.approx(0.5, abs=1e-6)
    p[..., 6:10, 6:10, 6:10] = _to01(torch.tensor(0.0)).item()
    assert m(p, t, batch).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dilation_and_erosion_match_scipy_with_a_cube(k):
    from scipy.ndimage import binary_dilation, binary_erosion

    from x2ct_framework.evaluation.anatomy_metrics import dilate, erode

    m = torch.rand(1, 1, 13, 14, 15, generator=torch.Generator().manual_seed(k)) > 0.9
    cube = np.ones((2 * k + 1,) * 3, dtype=bool)
    assert np.array_equal(dilate(m, k)[0, 0].numpy(), binary_dilation(m[0, 0].numpy(), cube))
    m = ~m  # mostly inside: erosion, outside the volume counting as inside
    assert np.array_equal(erode(m, k)[0, 0].numpy(), binary_erosion(m[0, 0].numpy(), cube, border_value=1))
