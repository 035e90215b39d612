"""``bone``, ``vessel``, ``landmark`` and ``reprojection``: analytic cases and the physics they rely on."""

import pytest
import torch

from x2ct_framework.physics import drr
from x2ct_framework.plugins import get_plugin_manager
from x2ct_framework.testing import make_batch
from x2ct_plugins.losses.vessel import eigvalsh3, gaussian_blur3d, vesselness

HU = (-1000.0, 3000.0)


def make(name, **options):
    return get_plugin_manager().registry("loss").create(name, options, where="r.toml: losses -> t",
                                                         context={"hu_window": list(HU)})


def ct01(hu):
    return (hu.clamp(*HU) - HU[0]) / (HU[1] - HU[0])


def block_volume(size=16, bone_hu=700.0, start=(5, 5, 5), extent=4):
    """Soft tissue (40 HU) with one bone cube; its label map (1 soft, 3 bone)."""
    hu = torch.full((1, 1, size, size, size), 40.0)
    labels = torch.ones(1, 1, size, size, size, dtype=torch.uint8)
    z, y, x = start
    hu[..., z:z + extent, y:y + extent, x:x + extent] = bone_hu
    labels[..., z:z + extent, y:y + extent, x:x + extent] = 3
    return ct01(hu), labels


# ---- bone ---------------------------------------------------------------------------------------
def test_bone_l1_is_the_mean_error_inside_the_bone_label():
    target, labels = block_volume()
    pred = target.clone()
    bone = labels == 3
    pred[bone] += 0.05
    pred[~bone] += 0.2  # errors outside bone do not count in the L1 part
    loss = make("bone", dice_weight=0.0)
    assert loss(pred, target, {"labels": labels}).item() == pytest.approx(0.05, rel=1e-5)


def test_bone_without_labels_uses_the_soft_threshold_and_dice_sees_missing_bone():
    target, labels = block_volume()
    erased = target.clone()
    erased[labels == 3] = target[0, 0, 0, 0, 0]  # the prediction misses the bone entirely
    only_dice = make("bone", l1_weight=0.0)
    assert only_dice(erased, target, {}).item() > 0.9  # Dice ~ 0
    # a copy with the bone only slightly darker keeps a high Dice
    darker = target.clone()
    darker[labels == 3] -= 50.0 / (HU[1] - HU[0])
    assert only_dice(darker, target, {}).item() < 0.05
    # the threshold region and the label region agree on this clean volume
    soft, lab = make("bone", dice_weight=0.0), make("bone", dice_weight=0.0)
    pred = target + 0.01
    assert soft(pred, target, {}).item() == pytest.approx(lab(pred, target, {"labels": labels}).item(), rel=1e-3)
    assert make("bone", use_labels=False).masks(pred, target, {"labels": labels})[0].max() < 1.0  # soft


# ---- vessel -------------------------------------------------------------------------------------
def test_closed_form_eigenvalues_match_linalg():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, 3, dtype=torch.float64, generator=g)
    sym = a + a.transpose(1, 2)
    sym[:5] = torch.diag_embed(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))  # repeated eigenvalues
    ours = eigvalsh3(sym[:, 0, 0], sym[:, 1, 1], sym[:, 2, 2], sym[:, 0, 1], sym[:, 0, 2], sym[:, 1, 2])
    assert torch.allclose(ours, torch.linalg.eigvalsh(sym), atol=1e-8)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_gaussian_smoothing_matches_scipy(sigma):
    from scipy.ndimage import gaussian_filter

    x = torch.rand(1, 1, 14, 17, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = gaussian_filter(x[0, 0].numpy(), sigma, mode="nearest", truncate=3.0)
    assert torch.allclose(gaussian_blur3d(x, sigma)[0, 0], torch.from_numpy(ref), atol=1e-12)


def shapes(size=24):
    """A bright tube along z, a plate and a ball, centred on grid points."""
    ax = torch.arange(size, dtype=torch.float32) - size // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    tube = (y**2 + (x - 5) ** 2 <= 2.0**2).float()  # axis at y = 0, x = 5
    plate = ((x + 6).abs() <= 1.0).float() * ((y.abs() <= 8) & (z.abs() <= 8)).float()  # mid-plane x = -6
    ball = ((z**2 + (y - 7) ** 2 + x**2) <= 3.0**2).float()  # centre (0, 7, 0)
    return tube, plate, ball


def test_vesselness_prefers_tubes_over_plates_and_blobs():
    tube, plate, ball = shapes()
    vol = (0.3 + 0.1 * (tube + plate + ball).clamp(max=1))[None, None]
    v = vesselness(vol, [1.0, 2.0])[0, 0]
    c = 12
    assert v.max() == pytest.approx(1.0)
    axis = v[4:-4, c, c + 5].mean()  # along the tube's axis, away from the volume's faces
    assert axis > 0.9
    assert v[c, c + 7, c] < 0.4 * axis  # the ball's centre: all eigenvalues alike (Rb ~ 1)
    assert v[c - 4:c + 4, c - 4:c + 4, c - 6].mean() < 0.05 * axis  # the plate: one large eigenvalue (Ra ~ 0)
    dark = vesselness((0.4 - 0.1 * tube)[None, None], [1.0, 2.0])[0, 0]  # dark tubes are not vessels
    assert dark.abs().max() == 0


def test_vessel_loss_weights_errors_on_vessels():
    tube, plate, _ = shapes()
    target = (0.3 + 0.1 * (tube + plate).clamp(max=1))[None, None]
    on_tube, on_plate = target.clone(), target.clone()
    on_tube[0, 0, 4:20, 12, 17] -= 0.05  # 16 voxels along the tube's axis
    on_plate[0, 0, 4:20, 12, 6] -= 0.05  # 16 voxels in the plate's mid-plane
    loss = make("vessel", use_labels=False)
    assert loss(on_tube, target, {}) > 5 * loss(on_plate, target, {})
    labels = (tube * 4).to(torch.uint8)[None, None]
    labelled = make("vessel")
    assert labelled(on_plate, target, {"labels": labels}).item() == 0.0
    assert labelled(on_tube, target, {"labels": labels}).item() == pytest.approx(0.05 * 16 / tube.sum().item(),
                                                                                 rel=1e-4)
    with_base = make("vessel", base_weight=1.0)
    assert 0 < with_base(on_plate, target, {"labels": labels}).item() < 0.05


# ---- landmark -----------------------------------------------------------------------------------
def shift_x(vol, voxels, fill):
    out = torch.full_like(vol, fill)
    out[..., voxels:] = vol[..., :-voxels]
    return out


def test_landmark_bone_slabs_measure_a_shift_in_millimetres():
    target, _ = block_volume(size=16, start=(2, 5, 4), extent=10)
    pred = shift_x(target, 2, target[0, 0, 0, 0, 0].item())
    spacing = torch.tensor([[1.5, 0.8, 2.0]])  # x, y, z mm per voxel
    loss = make("landmark", slabs=4, eps=1e-8)
    assert loss(pred, target, {"spacing": spacing}).item() == pytest.approx(3.0, rel=1e-3)  # 2 voxels x 1.5 mm
    assert loss(pred, target, {}).item() == pytest.approx(2.0, rel=1e-3)  # 1 mm when spacing is absent
    # slabs without bone in the target are skipped, not counted as zero
    value = make("landmark", slabs=16, eps=1e-8)(pred, target, {"spacing": spacing}).item()
    assert value == pytest.approx(3.0, rel=1e-3)


def test_landmark_uses_labelled_structures_when_present():
    target, labels = block_volume(size=20, start=(6, 6, 6), extent=5)
    labels = labels.clone()
    labels[labels == 3] = 7  # say, a vertebra with its own id
    pred = shift_x(target, 1, target[0, 0, 0, 0, 0].item())
    batch = {"labels": labels, "spacing": torch.tensor([[2.0, 2.0, 2.0]])}
    loss = make("landmark", eps=1e-8, margin=3, landmark_labels=[7])
    got = loss(pred, target, batch).item()
    assert got == pytest.approx(2.0, rel=0.05)
    pairs = loss.landmark_pairs(pred, target, batch)
    assert pairs[0].shape == (1, 1, 3) and bool(pairs[2].all())  # one structure: id 7
    # the default ids ([5], the heart) are absent from this map, and use_labels off: both fall back to bone slabs
    assert make("landmark").landmark_pairs(pred, target, batch)[0].shape[1] == 8
    assert make("landmark", use_labels=False).landmark_pairs(pred, target, batch)[0].shape[1] == 8
    # an explicitly listed id that the map lacks is ignored
    assert make("landmark", landmark_labels=[9, 7]).landmark_pairs(pred, target, batch)[0].shape[1] == 1


# ---- reprojection ------------------------------------------------------------------------------
def test_reprojection_is_zero_for_the_ct_that_made_the_views_and_sees_projection_errors():
    batch = make_batch(2, resolution=16, image_size=12)
    ct = batch["ct"]
    loss = make("reprojection")
    assert loss(ct, ct, batch).item() < 1e-6
    # an error that every view sees (denser bone) raises it; gradients reach every voxel column
    pred = ct.clone().requires_grad_()
    denser = pred + 0.05 * (batch["labels"] == 3)
    value = loss(denser, ct, batch)
    expected = (drr(ct + 0.05 * (batch["labels"] == 3), batch["geometry"], HU, det_shape=(12, 12))
                - batch["xrays"]).abs().mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 1e-4
    value.backward()
    assert pred.grad.abs().sum() > 0


def test_reprojection_must_use_the_datasets_drr_options():
    batch = make_batch(1, resolution=16)
    batch["xrays"] = drr(batch["ct"], batch["geometry"], HU, det_shape=(16, 16), beer_lambert=True)
    ct = batch["ct"]
    assert make("reprojection")(ct, ct, batch).item() > 1e-3  # mismatched DRR model
    assert make("reprojection", drr_options={"beer_lambert": True})(ct, ct, batch).item() < 1e-6
    with pytest.raises(KeyError, match=r"needs \['xrays'\] in the batch"):
        make("reprojection")(ct, ct, {"geometry": batch["geometry"]})
