"""Metrics against independent references (scikit-image, NumPy, analytic answers) and the protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from x2ct_framework.errors import DataError, PluginError, RecipeError
from x2ct_framework.evaluation.metrics import (LABELS, LPIPS, MAE, PSNR, RMSE, SSIM, Cosine, LandmarkDistance,
                                               StructureMetric, load_lpips, to_hu)
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.evaluation.protocols import (PROTOCOL_NAMES, X2CTGANMetric, build_protocol, check_names,
                                                 to_x2ctgan01, x2ctgan_integers)

HU = (-1000.0, 3000.0)


def _pair(shape=(2, 1, 16, 18, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    p = (t + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return p, t


def _phantom(n=24, seed=3):
    from x2ct_framework.phantom import toy_chest as phantom_hu

    hu, labels = phantom_hu(n, seed)
    return hu, labels


def _to01(hu, window=HU):
    lo, hi = window
    return ((hu.clamp(lo, hi) - lo) / (hi - lo)).double()


# ---- global metrics vs scikit-image / NumPy ------------------------------------------------------
def test_psnr_matches_skimage_on_the_same_hu_arrays():
    p, t = _pair()
    ph, th = to_hu(p, HU).numpy(), to_hu(t, HU).numpy()
    ours = PSNR(HU)(p, t)
    for i in range(2):
        ref = peak_signal_noise_ratio(th[i], ph[i], data_range=4000.0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


def test_psnr_with_an_explicit_window_and_peak():
    p, t = _pair(seed=1)
    window, peak = (-1000.0, 1000.0), 2500.0
    ours = PSNR(HU, window=list(window), peak=peak)(p, t)
    ph, th = np.clip(to_hu(p, HU).numpy(), *window), np.clip(to_hu(t, HU).numpy(), *window)
    for i in range(2):
        mse = np.mean((ph[i] - th[i]) ** 2)
        assert ours[i].item() == pytest.approx(10 * np.log10(peak**2 / mse), abs=1e-4)
        # the same number through scikit-image after shifting the window to start at 0
        assert ours[i].item() == pytest.approx(
            peak_signal_noise_ratio(th[i] + 1000, ph[i] + 1000, data_range=peak), abs=1e-4)


def test_slice_psnr_is_the_mean_over_slices_and_axes():
    p, t = _pair(shape=(1, 1, 8, 9, 10), seed=2)
    ours = PSNR(HU, slices=True)(p, t).item()
    a, b = p[0, 0].numpy(), t[0, 0].numpy()
    per_axis = []
    for axis in range(3):
        vals = [peak_signal_noise_ratio(np.take(b, k, axis), np.take(a, k, axis), data_range=1.0)
                for k in range(a.shape[axis])]
        per_axis.append(np.mean(vals))
    assert ours == pytest.approx(np.mean(per_axis), abs=1e-4)


def test_ssim_3d_matches_skimage():
    p, t = _pair(shape=(2, 1, 16, 16, 16), seed=4)
    ours = SSIM(HU, mode="3d")(p, t)
    for i in range(2):
        ref = structural_similarity(t[i, 0].numpy(), p[i, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)


def test_ssim_2d_is_skimage_per_slice_averaged_over_three_axes():
    p, t = _pair(shape=(1, 1, 12, 13, 14), seed=5)
    ours = SSIM(HU, mode="2d")(p, t).item()
    a, b = p[0, 0].numpy(), t[0, 0].numpy()
    per_axis = []
    for axis in range(3):
        per_axis.append(np.mean([structural_similarity(np.take(b, k, axis), np.take(a, k, axis), data_range=1.0,
                                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                                 for k in range(a.shape[axis])]))
    assert ours == pytest.approx(np.mean(per_axis), abs=1e-5)


def test_mae_rmse_cosine_match_numpy():
    p, t = _pair(seed=6)
    ph, th = to_hu(p, HU).numpy(), to_hu(t, HU).numpy()
    mae, rmse, cos = MAE(HU)(p, t), RMSE(HU)(p, t), Cosine(HU)(p, t)
    for i in range(2):
        assert mae[i].item() == pytest.approx(np.abs(ph[i] - th[i]).mean(), rel=1e-5)
        assert rmse[i].item() == pytest.approx(np.sqrt(((ph[i] - th[i]) ** 2).mean()), rel=1e-5)
        a, b = p[i].numpy().ravel(), t[i].numpy().ravel()
        assert cos[i].item() == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)


def test_prediction_is_clipped_to_the_window_before_scoring():
    t = torch.full((1, 1, 12, 12, 12), 0.5)
    p = t.clone()
    p[..., 0, 0, 0] = 1.7  # outside [0, 1]: clipped to 1, an error of 0.5 of the window (2000 HU)
    assert MAE(HU)(p, t).item() == pytest.approx(2000.0 / 12**3, rel=1e-5)


def test_every_builtin_metric_is_registered_through_the_hook_and_returns_one_value_per_case():
    reg = get_plugin_manager().registry("metric")
    for name in ("psnr", "psnr_slices", "ssim", "ssim2d", "mae_hu", "rmse_hu", "cosine", "lpips", "landmark_mm",
                 "bone_psnr", "lung_mae", "vessel_dice", "x2ctgan_psnr", "x2ctgan_ssim"):
        assert name in reg, name
    hu, labels = _phantom(16)
    t = _to01(hu)[None, None].repeat(3, 1, 1, 1, 1).float()
    batch = {"labels": labels[None, None].repeat(3, 1, 1, 1, 1)}
    for name in reg.names():
        if name == "lpips":
            continue
        m = reg.create(name, {}, context={"hu_window": list(HU)})
        out = m(t, t, batch)
        assert out.shape == (3,), name


def test_bad_options_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="hu_window"):
        PSNR([100.0, -100.0])
    with pytest.raises(ValueError, match="structure must be one of"):
        StructureMetric(HU, structure="liver")
    with pytest.raises(ValueError, match="mode"):
        SSIM(HU, mode="4d")
    with pytest.raises(DataError, match="differ in shape"):
        PSNR(HU)(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))
    with pytest.raises(RecipeError, match='unknown protocol "x2ctgn".*did you mean "x2ctgan"'):
        build_protocol("x2ctgn")
    assert check_names(["default"]) is None and "x2ct" in check_names(["x2ct"])
    assert PROTOCOL_NAMES == ("default", "x2ctgan", "sparc", "c2rv")


# ---- per-structure metrics on a phantom with known labels ---------------------------------------
@pytest.mark.parametrize("with_labels", [True, False])
def test_structure_scores_on_a_phantom_with_known_errors(with_labels):
    hu, labels = _phantom(24)
    pred_hu = hu.clone()
    pred_hu[labels == 2] -= 50.0  # lung -850 -> -900: still lung
    pred_hu[labels == 3] += 100.0  # bone 700 -> 800: still bone
    pred_hu[labels == 4] += 60.0  # vessel 350 -> 410: now reads as bone
    t, p = _to01(hu)[None, None], _to01(pred_hu)[None, None]
    batch = {"labels": labels[None, None]} if with_labels else {}
    score = lambda s, k: StructureMetric(HU, structure=s, kind=k)(p, t, batch).item()  # noqa: E731
    assert score("lung", "mae") == pytest.approx(50.0, abs=1e-3)
    assert score("bone", "mae") == pytest.approx(100.0, abs=1e-3)
    assert score("vessel", "mae") == pytest.approx(60.0, abs=1e-3)
    assert score("bone", "psnr") == pytest.approx(20 * math.log10(4000.0 / 100.0), abs=1e-3)
    assert score("lung", "psnr") == pytest.approx(20 * math.log10(4000.0 / 50.0), abs=1e-3)
    nb, nv = int((labels == 3).sum()), int((labels == 4).sum())
    assert nb > 0 and nv > 0
    assert score("lung", "dice") == pytest.approx(1.0)
    assert score("bone", "dice") == pytest.approx(2 * nb / (2 * nb + nv), abs=1e-6)
    assert score("vessel", "dice") == pytest.approx(0.0)


def test_a_scanner_table_is_not_part_of_the_body():
    # body in air, a vessel inside it, and a table slab at 220 HU (the vessel range) below the back
    hu = torch.full((20, 24, 20), -1000.0)
    labels = torch.zeros(hu.shape, dtype=torch.uint8)
    hu[2:18, 3:16, 3:17], labels[2:18, 3:16, 3:17] = 40.0, 1
    hu[5:15, 8:11, 9:12], labels[5:15, 8:11, 9:12] = 250.0, 4
    hu[:, 19:21, :], labels[:, 19:21, :] = 220.0, 8
    t = _to01(hu)[None, None]
    for batch in ({"labels": labels[None, None]}, {}):
        assert StructureMetric(HU, structure="vessel", kind="dice")(t, t, batch).item() == pytest.approx(1.0)


def test_structure_absent_from_a_case_is_nan_not_zero():
    t = torch.full((1, 1, 12, 12, 12), 0.25)  # water everywhere: no lung, bone or vessel
    labels = torch.ones(1, 1, 12, 12, 12, dtype=torch.uint8)
    for kind in ("psnr", "mae", "dice"):
        assert math.isnan(StructureMetric(HU, structure="bone", kind=kind)(t, t, {"labels": labels}).item())


def _blobs(n=32):
    """A body filling the volume with two lungs (away from the midline), a bone and a vessel blob."""
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    hu = torch.full((n, n, n), 40.0)
    labels = torch.ones((n, n, n), dtype=torch.uint8)
    for (cz, cy, cx, r), value, label in [((14, 12, 7, 4), -850.0, 2), ((16, 13, 24, 4), -850.0, 2),
                                          ((10, 22, 15, 3), 700.0, 3), ((20, 8, 16, 2.5), 250.0, 4)]:
        m = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r**2
        hu[m], labels[m] = value, label
    return hu, labels


@pytest.mark.parametrize("dim,shift,mm", [(2, 2, 3.0), (2, -1, 1.5), (1, 2, 4.0), (0, 1, 2.5)])
def test_landmark_distance_of_a_known_shift_in_millimetres(dim, shift, mm):
    hu, labels = _blobs()
    pred_hu = torch.roll(hu, shifts=shift, dims=dim)
    t, p = _to01(hu)[None, None], _to01(pred_hu)[None, None]
    spacing = torch.tensor([[1.5, 2.0, 2.5]])  # x (W), y (H), z (D)
    for batch in ({"labels": labels[None, None], "spacing": spacing}, {"spacing": spacing}):
        d = LandmarkDistance(HU)(p, t, batch).item()
        assert d == pytest.approx(mm, abs=1e-4)


def test_landmark_distance_is_nan_when_nothing_can_be_located():
    t = torch.full((1, 1, 12, 12, 12), 0.25)
    assert math.isnan(LandmarkDistance(HU)(t, t, {}).item())


# ---- LPIPS -------------------------------------------------------------------------------------
def test_lpips_without_weights_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PluginError) as exc:
        LPIPS(HU)
    msg = str(exc.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "backbone_path" in msg
    with pytest.raises(PluginError, match="missing"):
        LPIPS(HU, backbone_path=str(tmp_path / "nope.pth"))
    proto = build_protocol("default", HU)
    if "lpips" not in proto.metrics:
        assert any("lpips left out" in n for n in proto.notes)


def test_lpips_on_25d_slices_matches_the_lpips_package_slice_by_slice():
    torch.manual_seed(0)
    metric = LPIPS(HU, slices=1, min_size=32, random_backbone=True)
    p, t = _pair(shape=(1, 1, 16, 16, 16), seed=7)
    p, t = p.float(), t.float()
    ours = metric(p, t).item()
    net = metric.model
    vals = []
    for axis in range(3):
        for k in torch.linspace(0, 15, 3)[1:-1].round().long():  # one slice per axis, the middle one
            a = p[0, 0].select(axis, int(k))[None, None]
            b = t[0, 0].select(axis, int(k))[None, None]
            a = torch.nn.functional.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=(32, 32), mode="bilinear", align_corners=False)
            vals.append(net(a.repeat(1, 3, 1, 1) * 2 - 1, b.repeat(1, 3, 1, 1) * 2 - 1).item())
    assert ours == pytest.approx(float(np.mean(vals)), rel=1e-5)
    assert metric(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_lpips_loads_a_trunk_from_a_file(tmp_path):
    import torchvision

    state = torchvision.models.squeezenet1_1().state_dict()
    path = tmp_path / "squeeze.pth"
    torch.save(state, path)
    net = load_lpips("squeeze", backbone_path=str(path))
    assert torch.equal(net.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice7, "12").expand3x3.weight, state["features.12.expand3x3.weight"])


# ---- X2CT-GAN protocol vs hand-computed values of its formulas ----------------------------------
X2CT_WINDOW = (-1024.0, 1476.0)  # maps [0, 1] exactly onto X2CT-GAN's HU + 1024 in [0, 2500]


def _x2ct_example():
    real = torch.full((1, 1, 8, 8, 8), 0.4)  # 1000 on the integer scale
    gen = real.clone()
    gen[0, 0, 2, 3, 4] = 0.5  # 1250: an integer error of 250 in one voxel
    gen[0, 0, 6, 6, 6] = 0.40028  # 1000.7 truncates to 1000: an error on [0, 1] only
    return gen, real


def test_x2ctgan_protocol_reproduces_hand_computed_values():
    gen, real = _x2ct_example()
    proto = build_protocol("x2ctgan", X2CT_WINDOW)
    assert proto.notes == []
    v = {k.split("/")[1]: x.item() for k, x in proto(gen, real, {}).items()}
    n = 512
    assert v["mae0"] == pytest.approx((0.1 + 0.00028) / n, rel=1e-4)
    assert v["mse0"] == pytest.approx((0.01 + 0.00028**2) / n, rel=1e-4)
    dot = 0.4 * (0.4 * 510 + 0.5 + 0.40028)
    cos = dot / (0.4 * math.sqrt(n) * math.sqrt(0.16 * 510 + 0.25 + 0.40028**2))
    assert v["cosine"] == pytest.approx(cos, rel=1e-9)
    # integers: one voxel differs by 250 (the 1000.7 voxel truncates to 1000)
    assert v["mae"] == pytest.approx(250 / n)
    assert v["mse"] == pytest.approx(250**2 / n)
    assert v["psnr_3d"] == pytest.approx(20 * math.log10(4095 / math.sqrt(250**2 / n)), rel=1e-9)
    # 2D: per axis, the slice holding the voxel has MSE 250^2 / 64, the 7 others score 100 dB
    slice_psnr = (7 * 100 + 20 * math.log10(4095 / math.sqrt(250**2 / 64))) / 8
    assert v["psnr"] == pytest.approx(slice_psnr, rel=1e-9)
    # SSIM: scikit-image (X2CT-GAN's compare_ssim: 7x7 uniform window, sample covariance) per slice,
    # averaged over the slices of each axis and the three axes
    g, r = to_x2ctgan01(gen, X2CT_WINDOW)[0].double().numpy(), to_x2ctgan01(real, X2CT_WINDOW)[0].double().numpy()
    ref = np.mean([np.mean([structural_similarity(np.take(r, k, ax), np.take(g, k, ax), data_range=1.0, win_size=7,
                                                  gaussian_weights=False, use_sample_covariance=True)
                            for k in range(8)]) for ax in range(3)])
    assert v["ssim"] == pytest.approx(ref, abs=1e-9)


def test_x2ctgan_peak_4095_reads_higher_than_peak_2500():
    gen, real = _x2ct_example()
    ours = X2CTGANMetric(X2CT_WINDOW, "psnr_3d")(gen, real).item()
    ref_2500 = X2CTGANMetric(X2CT_WINDOW, "psnr_3d", peak=2500.0)(gen, real).item()
    assert ours - ref_2500 == pytest.approx(20 * math.log10(4095 / 2500), rel=1e-9)  # about +4.3 dB


def test_x2ctgan_conversion_from_the_recipe_window():
    # HU 2000 clips to X2CT-GAN's top (2500), HU -1000 is 24 on its integer scale
    t = _to01(torch.tensor([2000.0, -1000.0, 0.0]).reshape(1, 1, 3, 1, 1), HU)
    ints = x2ctgan_integers(to_x2ctgan01(t, HU)).flatten().tolist()
    assert ints == [2500, 24, 1024]
    assert any("starts at -1000" in n for n in build_protocol("x2ctgan", HU).notes)
    assert any("does not cover" in n for n in build_protocol("x2ctgan", (-400.0, 500.0)).notes)


def test_x2ctgan_drops_a_case_whose_cosine_is_undefined():
    gen, real = _x2ct_example()
    zero = torch.zeros_like(gen)
    out = build_protocol("x2ctgan", X2CT_WINDOW)(torch.cat([gen, zero]), torch.cat([real, zero]), {})
    assert all(math.isnan(v[1].item()) and not math.isnan(v[0].item()) for v in out.values())


def test_every_number_carries_the_protocol_name():
    hu, labels = _phantom(16)
    t = _to01(hu)[None, None].float()
    for name in PROTOCOL_NAMES:
        proto = build_protocol(name, HU, **({"lpips": False} if name == "default" else {}))
        out = proto(t, t, {"labels": labels[None, None]})
        assert out and all(k.startswith(f"{name}/") for k in out)
    default = build_protocol("default", HU, lpips=False)(t, t, {"labels": labels[None, None]})
    assert set(f"default/{s}_{k}" for s in LABELS for k in ("psnr", "mae", "dice")) <= set(default)


def test_the_documented_metric_example_runs_and_every_builtin_metric_is_documented():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    ns: dict = {}
    exec(re.findall(r"```python\n(.*?)```", doc, re.S)[0], ns)
    t = torch.full((2, 1, 8, 8, 8), 0.25)  # 0 HU
    assert ns["SoftTissueMAE"](list(HU))(t + 0.01, t, {}).tolist() == pytest.approx([40.0, 40.0])
    from x2ct_framework.evaluation.builtin_metrics import BUILTIN

    for name in BUILTIN:
        assert f"`{name}`" in doc or f"`{name.split('_')[0]}_" in doc, name
    assert "`x2ctgan_*`" in doc


def test_the_protocol_computes_the_body_once_and_scores_like_the_single_metrics(monkeypatch):
    import x2ct_framework.evaluation.metrics as M
    import x2ct_framework.evaluation.protocols as P

    hu, labels = _phantom(20)
    t = _to01(hu)[None, None].float()
    p = _to01(torch.roll(hu, 1, dims=2) + 30.0)[None, None].float()
    calls = []
    real = M.body_mask
    monkeypatch.setattr(P, "body_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = build_protocol("default", HU, lpips=False)(p, t, {})
    assert len(calls) == 1
    for s in LABELS:
        for kind in ("psnr", "mae", "dice"):
            single = StructureMetric(HU, structure=s, kind=kind)(p, t, {}).item()
            assert out[f"default/{s}_{kind}"].item() == pytest.approx(single, rel=1e-6, nan_ok=True)
    assert out["default/landmark_mm"].item() == pytest.approx(LandmarkDistance(HU)(p, t, {}).item(), rel=1e-6)
