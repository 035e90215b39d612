"""vit_cascade's implicit point decoder (any output resolution, from points) and its Plücker ray encoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from x2ct_framework import testing
from x2ct_framework.checkpoint import load_into, save_checkpoint
from x2ct_framework.errors import DataError
from x2ct_framework.physics import make_geometry
from x2ct_framework.physics.drr import _rays
from x2ct_framework.physics.geometry import batched
from x2ct_plugins.models.lifting import detector_plucker, project_points, sample_views, voxel_centres
from x2ct_plugins.models.vit_cascade import ViTCascade

TINY = dict(tokens=4, dim=16, depth=1, heads=2, channels=4, encoder="test_resnet", xray_size=16)


def geometry(angles, batch=2, preset="parallel", **kw):
    g = make_geometry(angles, preset, **kw)
    return {k: v[None].expand(batch, *v.shape).clone() for k, v in g.items()}


def vit(resolution=8, **kw):
    torch.manual_seed(0)
    return ViTCascade(resolution=resolution, **{**TINY, "decoder": "implicit", **kw})


def inputs(batch=2, preset="x2ctgan"):
    torch.manual_seed(1)
    return torch.rand(batch, 2, 1, 16, 16), geometry([0.0, 90.0], batch, preset)


def centres(g, size):
    return voxel_centres(g["volume_mm"][:, 0], size)


# ---- implicit point decoder ----------------------------------------------------------------------

@pytest.mark.parametrize("levels", [1, 3])
def test_implicit_output_at_the_stage_resolution_and_dense_levels_below_it(levels):
    model = vit(resolution=12, decoder_levels=levels).train()
    dense = ViTCascade(resolution=12, **{**TINY, "decoder_levels": levels})
    xrays, g = inputs()
    out = model(xrays, g)
    assert out.shape == (2, 1, 12, 12, 12) and torch.isfinite(out).all()
    # the point decoder replaces the finest level only; the coarser levels keep the dense model's sizes
    assert len(model.decoder.levels) == levels - 1 and model.level_sizes == dense.level_sizes
    out.mean().backward()
    assert model.decoder.point.head.weight.grad.abs().sum() > 0


def test_query_at_the_voxel_centres_is_the_dense_output():
    model = vit(point_chunk=100).eval()                                # 512 points: chunks of 100 and one of 12
    xrays, g = inputs()
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        volume = model(xrays, g)
        values = model.query(xrays, g, centres(g, 8)[:, perm])
    torch.testing.assert_close(values, volume.flatten(1)[:, perm], rtol=1e-5, atol=1e-6)


def test_volume_at_another_resolution_is_query_at_its_voxel_centres():
    model = vit(point_chunk=333).eval()
    xrays, g = inputs(preset="parallel")
    with torch.no_grad():
        fine = model.predict_volume(xrays, g, 12)
        values = model.query(xrays, g, centres(g, 12))
        stage = model.predict_volume(xrays, g, 8)
        out = model(xrays, g)
    assert fine.shape == (2, 1, 12, 12, 12)
    torch.testing.assert_close(fine.flatten(1), values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stage, out, rtol=1e-5, atol=1e-6)


def test_point_values_are_the_trilinear_prev_plus_the_mlp_residual():
    """With the MLP's head at zero the output is ``prev`` resampled by torch's trilinear interpolation
    (align_corners=False): the point decoder's voxel-centre convention is the dense decoder's."""
    model = vit(resolution=10).eval()
    with torch.no_grad():
        model.decoder.point.head.weight.zero_()
        model.decoder.point.head.bias.zero_()
    xrays, g = inputs()
    prev = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(xrays, g, prev=prev)
    ref = F.interpolate(prev, size=(10, 10, 10), mode="trilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_chunks_give_the_same_loss_and_gradients_as_one_chunk():
    xrays, g = inputs()
    target = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk in (100, 10**6):
        model = vit(point_chunk=chunk).train()
        x = xrays.clone().requires_grad_(True)
        loss = (model(x, g) - target).abs().mean()
        loss.backward()
        results.append((loss.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, x0, g0), (l1, x1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x1, x0, rtol=1e-4, atol=1e-8)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("options,preset,autocast", [({}, "parallel", ()), ({"pixel_aligned": True}, "x2ctgan", ()),
                                                     ({"ray_encoding": True}, "x2ctgan", (torch.bfloat16,)),
                                                     ({"decoder": "dense", "ray_encoding": True}, "parallel", ())])
def test_check_model_passes(options, preset, autocast):
    # zero_init_last=False: every path of the tiny encoder carries a gradient at step 0
    model = vit(encoder_kwargs={"zero_init_last": False}, point_chunk=200, **options)
    if options.get("ray_encoding"):  # from zero the encoding would not show yet in the outputs' dependence
        torch.nn.init.normal_(model.lift.rays[0].weight, std=0.1)
    testing.check_model(model, resolution=8, image_size=16, geometry=preset, autocast_dtypes=autocast)


def test_stage_checkpoint_loads_across_resolutions(tmp_path):
    save_checkpoint(tmp_path / "ck", vit(resolution=8, ray_encoding=True), {})
    model = vit(resolution=16, ray_encoding=True)
    load_into(model, tmp_path / "ck", strict=True)
    xrays, g = inputs(batch=1)
    assert model(xrays, g).shape == (1, 1, 16, 16, 16)


def test_bad_decoder_options_and_points_are_named():
    with pytest.raises(ValueError, match="decoder must be one of 'dense', 'implicit', got 'sparse'"):
        vit(decoder="sparse")
    with pytest.raises(ValueError, match="point_chunk must be an integer >= 1"):
        vit(point_chunk=0)
    with pytest.raises(ValueError, match="ray_encoding must be true or false"):
        vit(ray_encoding="yes")
    xrays, g = inputs()
    with pytest.raises(DataError, match=r"points must be \[B, N, 3\] .* with B = 2, got \(2, 10, 2\)"):
        vit().query(xrays, g, torch.zeros(2, 10, 2))
    with pytest.raises(ValueError, match='need the implicit point decoder; set model.decoder = "implicit"'):
        vit(decoder="dense").predict_volume(xrays, g, 8)


# ---- Plücker ray encoding ------------------------------------------------------------------------

def test_the_central_ray_through_the_isocentre_has_zero_moment():
    g = geometry([0.0, 30.0, 90.0], batch=1, preset="x2ctgan")
    rays = detector_plucker(g, 1, (5, 5))                              # odd: pixel (2, 2) is the detector centre
    theta = torch.deg2rad(torch.tensor([0.0, 30.0, 90.0]))
    central = torch.stack([torch.sin(theta), -torch.cos(theta), torch.zeros(3)], -1)
    torch.testing.assert_close(rays[0, :, :3, 2, 2], central, rtol=0, atol=1e-6)
    torch.testing.assert_close(rays[0, :, 3:, 2, 2], torch.zeros(3, 3), rtol=0, atol=1e-6)
    assert rays[0, :, 3:, 0, 0].norm(dim=-1).min() > 0.1                # a corner ray misses the isocentre


def test_parallel_beam_rays_match_the_analytic_plucker_coordinates():
    # At 0 degrees the rays run along (0, -1, 0) through the detector point (c_u, 0, c_v): m = (c_v, 0, -c_u).
    g = geometry([0.0], batch=1, preset="parallel", volume_mm=200.0)  # detector 200 x 200 mm
    rays = detector_plucker(g, 1, (4, 8))
    cu = (torch.arange(8) + 0.5 - 4) * 25.0
    cv = (torch.arange(4) + 0.5 - 2) * 50.0
    m = torch.stack([cv[:, None].expand(4, 8), torch.zeros(4, 8), -cu[None].expand(4, 8)]) / 100.0
    torch.testing.assert_close(rays[0, 0, :3], torch.tensor([0.0, -1.0, 0.0])[:, None, None].expand(3, 4, 8))
    torch.testing.assert_close(rays[0, 0, 3:], m, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["x2ctgan", "parallel"])
def test_rays_are_the_projectors_rays(preset):
    g = batched(geometry([10.0, 77.0, 200.0], batch=2, preset=preset))
    origin, direction = _rays(g, (6, 7))
    d = direction / direction.norm(dim=-1, keepdim=True)
    m = torch.linalg.cross(origin, d, dim=-1) / 160.0                 # half the 320 mm volume
    rays = detector_plucker(g, 2, (6, 7)).permute(0, 1, 3, 4, 2)
    torch.testing.assert_close(rays[..., :3], d, rtol=0, atol=1e-6)
    torch.testing.assert_close(rays[..., 3:], m, rtol=0, atol=1e-5)


def test_a_strided_levels_rays_are_read_back_at_each_points_ray():
    """A stride-2 level's ray map, sampled with its centre offset where a point projects, is the point's
    own ray (parallel beam: direction and moment are linear over the detector, so bilinear reads are exact)."""
    g = geometry([35.0], batch=1, preset="parallel")
    rays = detector_plucker(g, 1, (16, 16), image_size=(32, 32), offset=0.5)
    points = (torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 160.0
    uv, visible = project_points(points, g)
    assert visible.min() == 1
    read = sample_views([rays], [0.5], (32, 32), uv)[0, 0].T            # [N, 6]
    d = torch.tensor([math.sin(math.radians(35.0)), -math.cos(math.radians(35.0)), 0.0]).expand(50, 3)
    torch.testing.assert_close(read[:, :3], d, rtol=0, atol=1e-5)
    torch.testing.assert_close(read[:, 3:], torch.linalg.cross(points[0], d, dim=-1) / 160.0, rtol=0, atol=1e-5)
    unshifted = sample_views([detector_plucker(g, 1, (16, 16))], [0.5], (32, 32), uv)[0, 0].T
    assert (unshifted[:, 3:] - read[:, 3:]).abs().max() > 1e-3


def test_ray_encoding_changes_with_the_geometry_and_starts_at_zero():
    model = vit(decoder="dense", ray_encoding=True)
    xrays, g = inputs()
    feats = model.encoder(xrays)
    g_far = geometry([0.0, 90.0], 2, "x2ctgan", sid=700.0)            # same angles, another source distance
    assert model.ray_features(1, feats[1], xrays, g).abs().max() == 0
    for conv in model.lift.rays:
        torch.nn.init.normal_(conv.weight, std=0.1)
    for level, f in enumerate(feats):
        a, b = model.ray_features(level, f, xrays, g), model.ray_features(level, f, xrays, g_far)
        assert a.shape == f.shape and (a - b).abs().max() > 1e-3
    enc, _ = model.encode(xrays, g)
    enc_far, _ = model.encode(xrays, g_far)
    assert (enc[0] - enc_far[0]).abs().max() > 1e-3
    plain = [detector_plucker(x, 2, (8, 8)) for x in (g, g_far)]
    assert (plain[0] - plain[1]).abs().max() > 1e-3


def test_both_options_come_from_the_recipe():
    from x2ct_framework.errors import RecipeError
    from x2ct_framework.plugins import get_plugin_manager

    def create(options):
        return get_plugin_manager().registry("model").create(
            "vit_cascade", {**TINY, **options}, where="r.toml: model",
            context={"resolution": 8, "views": [0, 90], "gradient_checkpointing": False, "seed": 0})

    model = create({"decoder": "implicit", "ray_encoding": True, "point_chunk": 4096})
    assert model.decoder_kind == "implicit" and model.ray_encoding and model.point_chunk == 4096
    assert any(n.startswith("decoder.point.") for n, _ in model.named_parameters())
    assert any(n.startswith("lift.rays.") for n, _ in model.named_parameters())
    with pytest.raises(RecipeError, match=r"r.toml: model: .*decoder must be one of 'dense', 'implicit'"):
        create({"decoder": "points"})
