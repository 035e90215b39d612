"""The strengthened vit_cascade: batch-independent normalisation, pixel-aligned sampling (against the
physics back-projection and an analytic strided map), visibility, one X-ray size, the head's first output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from x2ct_framework.physics import backproject, make_geometry
from x2ct_plugins.models.lifting import project_points, sample_views, voxel_centres
from x2ct_plugins.models.vit_cascade import ViTCascade

TINY = dict(tokens=4, dim=16, depth=1, heads=2, channels=4, encoder="test_resnet", xray_size=16, pixel_aligned=True)


def geometry(angles, batch=1, preset="parallel"):
    g = make_geometry(angles, preset)
    return {k: v[None].expand(batch, *v.shape).clone() for k, v in g.items()}


def vit(**kw):
    torch.manual_seed(0)
    return ViTCascade(resolution=8, **{**TINY, **kw})


@pytest.mark.parametrize("norm,independent", [("group", True), ("frozen", True), ("batch", False)])
def test_train_mode_output_of_a_case_does_not_depend_on_its_batch(norm, independent):
    model = vit(norm=norm).train()
    torch.manual_seed(1)
    xrays, g = torch.rand(2, 2, 1, 16, 16), geometry([0, 90], batch=2)
    together = model(xrays, g)
    one = {k: v[:1] for k, v in g.items()}
    apart = torch.cat([model(xrays[i:i + 1], one) for i in range(2)])
    if independent:
        torch.testing.assert_close(apart, together, rtol=1e-5, atol=1e-6)
    else:  # the check can tell: BatchNorm mixes the two cases
        assert (apart - together).abs().max() > 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) or norm == "batch"


@pytest.mark.parametrize("preset", ["parallel", "x2ctgan"])
def test_sampling_at_voxel_projections_matches_the_physics_back_projection(preset):
    g = geometry([0.0, 63.0, 90.0], batch=2, preset=preset)
    images = torch.rand(2, 3, 5, 12, 12)
    size = 6
    ref = backproject(images, g, (size,) * 3)                           # [B, V, C, D, H, W]
    uv, visible = project_points(voxel_centres(g["volume_mm"][:, 0], size), g)
    got = sample_views([images], [0.0], (12, 12), uv).reshape(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the parallel beam's PA and lateral views see every voxel (its 63 degree view misses the corners);
    # the cone beam's 285 mm at the isocentre misses some
    if preset == "parallel":
        assert visible[:, [0, 2]].min() == 1.0 and visible[:, 1].min() == 0.0
    else:
        assert 0.4 < visible.mean().item() < 1.0


def test_centre_offset_reads_a_strided_map_where_each_feature_is_centred():
    # A ramp I(x) = x (x = pixel index); a stride-2 3x3 mean with "same" padding puts f[j] = 2j on pixel 2j.
    w = 32
    ramp = torch.arange(w, dtype=torch.float32).expand(w, w).clone()
    f = F.conv2d(ramp[None, None], torch.full((1, 1, 3, 3), 1 / 9), stride=2, padding=1)
    cols = torch.arange(6, 26, dtype=torch.float32)                     # interior pixels
    u = 2 * (cols + 0.5) / w - 1                                        # grid coordinate of each pixel centre
    uv = torch.stack([u, torch.zeros_like(u)], -1)[None, None]          # [1, 1, N, 2]
    feats = [f[None]]                                                   # [B=1, V=1, C=1, 16, 16]
    right = sample_views(feats, [0.5], (w, w), uv)[0, 0, 0]
    naive = sample_views(feats, [0.0], (w, w), uv)[0, 0, 0]
    torch.testing.assert_close(right, cols, rtol=0, atol=1e-4)
    torch.testing.assert_close(naive, cols - 0.5, rtol=0, atol=1e-4)


def test_encoder_offsets_and_one_xray_size_for_every_stage():
    model = vit(full_resolution=4)
    assert model.encoder.reductions[0] == 1 and model.encoder.offsets[:3] == [0.0, 0.5, 1.5]
    feats16 = model.encoder(torch.rand(1, 2, 1, 12, 12))
    feats64 = model.encoder(torch.rand(1, 2, 1, 48, 48))
    assert [f.shape for f in feats16] == [f.shape for f in feats64]
    assert feats16[0].shape[-1] == 16
    out = vit(xray_size=0)(torch.rand(1, 2, 1, 16, 16), geometry([0, 90]))
    assert out.shape == (1, 1, 8, 8, 8)


def test_small_head_init_starts_near_zero():
    xrays, g = torch.rand(2, 2, 1, 16, 16), geometry([0, 90], batch=2, preset="x2ctgan")
    with torch.no_grad():
        small = vit().eval()(xrays, g)
        default = vit(head_init="default").eval()(xrays, g)
    assert small.std() < 0.5 * default.std() and small.abs().mean() < 0.5 * default.abs().mean()


@pytest.mark.parametrize("options", [dict(pixel_aligned=False), dict(visibility=False), dict(centre_offset=False),
                                     dict(full_resolution=0), dict(norm="batch", head_init="default")])
def test_each_part_switches_off(options):
    model = vit(**options).train()
    out = model(torch.rand(2, 2, 1, 24, 24), geometry([0, 90], batch=2, preset="x2ctgan"))
    assert out.shape == (2, 1, 8, 8, 8) and torch.isfinite(out).all()
    out.mean().backward()


def test_bad_strengthening_options_are_named():
    with pytest.raises(ValueError, match="norm must be one of 'group', 'frozen', 'batch'"):
        vit(norm="layer")
    with pytest.raises(ValueError, match="xray_size must be an integer >= 0"):
        vit(xray_size=-1)
    with pytest.raises(ValueError, match="head_init must be 'small' or 'default'"):
        vit(head_init="zero")
