"""Projector and geometry against analytic answers: chord lengths, symmetry, magnification, adjoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from x2ct_framework.errors import RecipeError
from x2ct_framework.physics import (GEOMETRY_PRESETS, backproject, drr, hu_to_mu, magnification, make_geometry,
                                    num_views, project, view_frames)
from x2ct_framework.physics.geometry import batched

MU = 0.02


def centres(n: int, size: float) -> torch.Tensor:
    return ((torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5) * size


def sphere(n: int, size: float, radius: float, centre=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """Uniform sphere with partial-volume edges (occupancy from the signed distance), [1, 1, n, n, n]."""
    ax = centres(n, size)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
    occ = ((radius - r) / (size / n) + 0.5).clamp(0, 1)
    return (MU * occ)[None, None].float()


def detector_pixels(g: dict, det: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origin and unit direction of every pixel, [V, h, w, 3], computed independently of the projector."""
    gb = batched(g, dtype=torch.float64)
    fr = view_frames(gb)
    h, w = det
    cu = ((torch.arange(w, dtype=torch.float64) + 0.5) / w - 0.5)[None, :] * gb["detector_mm"][0, :, 0:1]
    rv = ((torch.arange(h, dtype=torch.float64) + 0.5) / h - 0.5)[None, :] * gb["detector_mm"][0, :, 1:2]
    pix = (fr["center"][0, :, None, None] + cu[:, None, :, None] * fr["u"][0, :, None, None]
           + rv[:, :, None, None] * fr["v"][0, :, None, None])
    if float(gb["cone"][0, 0]) > 0.5:
        src = fr["source"][0, :, None, None].expand_as(pix)
        d = pix - src
        return src, d / d.norm(dim=-1, keepdim=True)
    d = fr["ray"][0, :, None, None].expand_as(pix)
    return pix - 1000.0 * d, d


def box_chords(origin: torch.Tensor, direction: torch.Tensor, half: tuple[float, float, float]) -> torch.Tensor:
    """Exact chord length of each unit-direction ray through the axis-aligned box [-half, half] (slab method)."""
    t_min = torch.full_like(origin[..., 0], -math.inf)
    t_max = torch.full_like(origin[..., 0], math.inf)
    for i in range(3):
        o, d = origin[..., i], direction[..., i]
        moving = d.abs() > 1e-12
        safe_d = torch.where(moving, d, torch.ones_like(d))
        t1, t2 = (-half[i] - o) / safe_d, (half[i] - o) / safe_d
        t_min = torch.where(moving, torch.maximum(t_min, torch.minimum(t1, t2)), t_min)
        t_max = torch.where(moving, torch.minimum(t_max, torch.maximum(t1, t2)), t_max)
        t_max = torch.where(~moving & (o.abs() > half[i]), torch.full_like(t_max, -math.inf), t_max)
    return (t_max - t_min).clamp_min(0)


def sphere_chords(origin: torch.Tensor, direction: torch.Tensor, radius: float, centre=(0.0, 0.0, 0.0)) -> torch.Tensor:
    c = torch.tensor(centre, dtype=torch.float64)
    oc = origin - c
    along = (oc * direction).sum(-1)
    dist2 = (oc * oc).sum(-1) - along**2
    return 2 * (radius**2 - dist2).clamp_min(0).sqrt()


@pytest.mark.parametrize("preset", ["parallel", "x2ctgan"])
def test_sphere_chord_lengths(preset):
    n, size, radius = 48, 240.0, 80.0
    det = (48, 48)
    det_mm = size * (949 / 541 if preset == "x2ctgan" else 1.0)
    g = make_geometry([0, 90, 37], preset, volume_mm=size, detector_mm=det_mm)
    line = project(sphere(n, size, radius), g, det, prefilter=False)[0, :, 0].double()
    origin, direction = detector_pixels(g, det)
    exact = MU * sphere_chords(origin, direction, radius)
    inner = exact > MU * 2 * math.sqrt(radius**2 - (radius - 10.0) ** 2)  # rays > 10 mm inside the rim
    assert inner.sum() > 300
    rel = ((line - exact).abs() / exact)[inner]
    assert rel.max() < 0.02, rel.max()
    # at the rim the chord changes faster than the half-voxel partial-volume edge resolves
    assert (line - exact).abs().mean() < 0.005 * float(exact.max())
    assert (line - exact).abs().max() < MU * 3 * size / n


@pytest.mark.parametrize("preset", ["parallel", "x2ctgan"])
@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_box_chord_lengths(preset, angle):
    n, size = 40, 200.0
    vox = size / n
    half = (15 * vox, 9 * vox, 12 * vox)  # faces on voxel boundaries: a box of 30 x 18 x 24 voxels
    ax = centres(n, size)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    inside = (x.abs() < half[0]) & (y.abs() < half[1]) & (z.abs() < half[2])
    mu = (MU * inside.double())[None, None].float()
    det_mm = size * (1.2 if preset == "x2ctgan" else 1.0) * 1.5
    g = make_geometry([angle], preset, volume_mm=size, detector_mm=det_mm)
    det = (60, 60)
    line = project(mu, g, det, prefilter=False)[0, 0, 0].double()
    origin, direction = detector_pixels(g, det)
    exact = MU * box_chords(origin[0], direction[0], half)
    err = (line - exact).abs()
    assert exact.max() > MU * 80
    assert err.median() < 0.01 * float(exact.max())
    # bilinear sampling blurs each face by at most a voxel of path, tilted faces by 1/cos of the tilt
    assert err.max() < MU * vox * 2.5, float(err.max())
    # rays two pixels or more away from any ray that grazes a face: exact up to rounding
    outside = (exact < 0.9 * exact.max()).double()[None, None]
    core = torch.nn.functional.max_pool2d(outside, 5, stride=1, padding=2)[0, 0] == 0
    assert core.sum() > 100
    assert (err[core] / exact[core]).max() < 0.01


def test_parallel_mass_is_conserved_at_any_angle():
    n, size = 32, 160.0
    torch.manual_seed(0)
    mu = torch.rand(1, 1, n, n, n) * MU
    mu[..., :4, :, :] = 0  # keep the object away from the edges
    angles = [0, 17, 45, 90, 123.5, 200, 311]
    g = make_geometry(angles, "parallel", volume_mm=size, detector_mm=(size * 1.5, size), detector_px=(32, 48))
    line = project(mu, g, prefilter=False)[0, :, 0]
    pixel_area = (size * 1.5 / 48) * (size / 32)
    mass = float(mu.sum()) * (size / n) ** 3
    totals = line.sum((-1, -2)) * pixel_area
    assert line.shape == (len(angles), 32, 48)
    assert torch.allclose(totals, torch.full_like(totals, mass), rtol=0.01), totals / mass


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0])
def test_opposite_parallel_views_mirror(angle):
    torch.manual_seed(1)
    mu = torch.rand(2, 1, 16, 20, 24) * MU
    g = make_geometry([angle, angle + 180.0], "parallel", volume_mm=(120.0, 100.0, 80.0))
    out = project(mu, g, (16, 24), prefilter=False)
    assert torch.allclose(out[:, 0].flip(-1), out[:, 1], atol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)  # the volume is not symmetric itself


def test_cone_beam_magnification():
    """An object at the isocentre appears SDD/SID larger; one nearer the source larger still."""
    n, size, sid, sdd = 48, 240.0, 500.0, 1000.0
    g = make_geometry([0], {"beam": "cone", "sid": sid, "sdd": sdd, "detector_mm": 600.0}, volume_mm=size,
                      detector_px=96)
    cols = ((torch.arange(96, dtype=torch.float64) + 0.5) / 96 - 0.5) * 600.0

    def centroid_u(x0: float, y0: float) -> float:
        img = project(sphere(n, size, 12.0, (x0, y0, 0.0)), g, prefilter=False)[0, 0, 0].double()
        return float((img.sum(0) * cols).sum() / img.sum())

    assert float(magnification(batched(g))) == pytest.approx(sdd / sid)
    assert centroid_u(60.0, 0.0) == pytest.approx(60.0 * sdd / sid, rel=0.01)
    # the PA source sits posterior (+y): an object 50 mm nearer the source magnifies by sdd / (sid - 50)
    assert centroid_u(60.0, 50.0) == pytest.approx(60.0 * sdd / (sid - 50.0), rel=0.01)
    # the shadow of the sphere is wider by the same factor: compare its second moment with a parallel beam
    img = project(sphere(n, size, 40.0), g, prefilter=False)[0, 0, 0].double().sum(0)
    width_cone = float(((img * cols**2).sum() / img.sum()).sqrt())
    gp = make_geometry([0], "parallel", volume_mm=size, detector_mm=600.0, detector_px=96)
    imgp = project(sphere(n, size, 40.0), gp, prefilter=False)[0, 0, 0].double().sum(0)
    width_par = float(((imgp * cols**2).sum() / imgp.sum()).sqrt())
    assert width_cone / width_par == pytest.approx(sdd / sid, rel=0.03)


@pytest.mark.parametrize("preset", ["parallel", "x2ctgan"])
def test_gradcheck(preset):
    torch.manual_seed(0)
    mu = (torch.rand(1, 1, 4, 5, 6, dtype=torch.float64) * MU).requires_grad_(True)
    g = make_geometry([0, 90, 30], preset, volume_mm=60.0, detector_mm=80.0 if preset == "parallel" else 120.0)
    # a coarse detector makes the prefilter average voxels too, so its gradient is checked as well
    assert torch.autograd.gradcheck(lambda m: project(m, g, (3, 4)), (mu,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda m: project(m, g, (5, 6), prefilter=False), (mu,), eps=1e-6, atol=1e-6)


def test_prefilter_preserves_integrals_and_matches_fine_projection():
    n, size = 64, 256.0
    mu = sphere(n, size, 70.0, (20.0, -10.0, 5.0))
    g = make_geometry([0, 90], "x2ctgan", volume_mm=size, detector_mm=250.0, detector_px=32)
    fine = project(mu, g, prefilter=False)
    coarse = project(mu, g)  # footprint 4.45 mm at the isocentre: the 4 mm voxels stay, 2x2x2 at half the detector
    assert torch.allclose(coarse, fine, atol=0.02 * float(fine.max()))
    g16 = make_geometry([0, 90], "x2ctgan", volume_mm=size, detector_mm=250.0, detector_px=16)
    pooled = project(mu, g16)  # 2x2x2 pooling
    ref = torch.nn.functional.avg_pool2d(project(mu, g16, (32, 32), prefilter=False)[0, :, 0], 2)
    assert torch.allclose(pooled[0, :, 0], ref, atol=0.03 * float(ref.max()))


def test_prefilter_equals_padding_with_air_then_averaging():
    """Window averages over the footprint; a partial window at the far edge counts air for the missing voxels."""
    import sys

    prefilter = sys.modules["x2ct_framework.physics.drr"]._prefilter
    torch.manual_seed(4)
    for shape, vol_mm, det_mm, window in [((10, 31, 29), (29.0, 31.0, 40.0), (31.0, 40.0), (1, 3, 3)),  # thick slices
                                          ((13, 11, 10), (20.0, 22.0, 26.0), (44.0, 52.0), (2, 2, 2))]:
        mu = torch.rand(1, 1, *shape, dtype=torch.float64)
        g = batched(make_geometry([0, 90], "parallel", volume_mm=vol_mm, detector_mm=det_mm, detector_px=(10, 10)),
                    dtype=torch.float64)
        vox = torch.tensor(vol_mm, dtype=torch.float64) / torch.tensor(shape[::-1], dtype=torch.float64)
        pooled, new_vox, centre = prefilter(mu, g, (10, 10), vox, 1.0)
        pads = [(-n) % k for n, k in zip(shape, window)]
        ref = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(mu, (0, pads[2], 0, pads[1], 0, pads[0])), window)
        assert torch.allclose(pooled, ref, atol=1e-12)
        assert torch.allclose(new_vox, vox * torch.tensor(window[::-1], dtype=torch.float64))
        assert torch.allclose(centre, torch.tensor(pads[::-1], dtype=torch.float64) * vox / 2)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("angles", [[0, 90], [90, 0], [0, 90, 30]])
def test_views_projected_together_match_views_projected_alone(grad, angles):
    """PA and lateral of a cube share one sampling call; each must equal its own projection."""
    torch.manual_seed(5)
    mu = (torch.rand(2, 1, 12, 12, 12) * MU).requires_grad_(grad)
    g = make_geometry(angles, "x2ctgan", volume_mm=150.0)
    together = project(mu, g, (9, 11))
    alone = torch.cat([project(mu, make_geometry([a], "x2ctgan", volume_mm=150.0), (9, 11)) for a in angles], 1)
    assert torch.allclose(together, alone, atol=1e-6)
    if grad:
        (gt,) = torch.autograd.grad(together.sum(), mu)
        (ga,) = torch.autograd.grad(alone.sum(), mu)
        assert torch.allclose(gt, ga, atol=1e-6)


def test_batch_and_collated_geometry_match_single_cases():
    torch.manual_seed(2)
    mu = torch.rand(2, 1, 12, 12, 12) * MU
    g1 = make_geometry([0, 90], "x2ctgan", volume_mm=150.0)
    g2 = make_geometry([0, 90], "x2ctgan", volume_mm=150.0, sid=600.0)
    both = default_collate([g1, g2])
    assert both["angles"].shape == (2, 2) and both["detector_mm"].shape == (2, 2, 2)
    out = project(mu, both, (10, 10))
    assert torch.allclose(out[0], project(mu[:1], g1, (10, 10))[0], atol=1e-6)
    assert torch.allclose(out[1], project(mu[1:], g2, (10, 10))[0], atol=1e-6)
    # different views per case (e.g. angle jitter) take the per-case path
    g3 = make_geometry([5, 80], "parallel", volume_mm=150.0)
    g4 = make_geometry([50, 140], "parallel", volume_mm=150.0)
    out = project(mu, default_collate([g3, g4]), (10, 10))
    assert torch.allclose(out[1], project(mu[1:], g4, (10, 10))[0], atol=1e-6)


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_any_number_of_views(views):
    angles = [i * 180.0 / views for i in range(views)]
    g = make_geometry(angles, "x2ctgan", volume_mm=200.0)
    assert num_views(g) == views
    ct = torch.rand(1, 1, 16, 16, 16)
    out = drr(ct, default_collate([g]), det_shape=(20, 24))
    assert out.shape == (1, views, 1, 20, 24)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    feats = backproject(torch.rand(1, views, 3, 8, 8), default_collate([g]), (6, 6, 6))
    assert feats.shape == (1, views, 3, 6, 6, 6)


def test_backprojection_locates_a_point_from_two_views():
    n, size = 32, 200.0
    p = (30.0, -40.0, 25.0)  # x, y, z in mm
    blob = sphere(n, size, 8.0, p)
    for preset in ("parallel", "x2ctgan"):
        g = make_geometry([0, 90], preset, volume_mm=size, detector_mm=size * (1.8 if preset == "x2ctgan" else 1.0),
                          detector_px=64)
        img = project(blob, g)
        back = backproject(img, g, (n, n, n))
        joint = back[0, 0, 0] * back[0, 1, 0]
        d, h, w = divmod(int(joint.argmax()), n * n)[0], *divmod(int(joint.argmax()) % (n * n), n)
        ax = centres(n, size)
        assert abs(float(ax[w]) - p[0]) <= size / n and abs(float(ax[h]) - p[1]) <= size / n
        assert abs(float(ax[d]) - p[2]) <= size / n


def test_backprojection_of_a_constant_image_is_constant_inside_the_beam():
    g = make_geometry([0, 90, 45], "parallel", volume_mm=100.0, detector_mm=150.0)
    out = backproject(torch.ones(2, 3, 1, 8, 8), g, (10, 10, 10))
    assert out.shape == (2, 3, 1, 10, 10, 10)
    assert torch.allclose(out, torch.ones_like(out))


def test_adjoint_backprojection_is_the_transpose_of_project():
    torch.manual_seed(3)
    g = make_geometry([0, 60], "x2ctgan", volume_mm=80.0, detector_mm=150.0)
    x = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64)
    y = torch.rand(1, 2, 1, 5, 6, dtype=torch.float64)
    px = project(x, g, (5, 6), prefilter=False)
    aty = backproject(y, g, (6, 7, 8), mode="adjoint")
    assert aty.shape == (1, 2, 1, 6, 7, 8)
    assert float((px * y).sum()) == pytest.approx(float((x[:, None] * aty).sum()), rel=1e-9)
    # the adjoint of a constant image weighs each voxel by the path length through it: about a voxel's size
    flat = backproject(torch.ones(1, 1, 1, 40, 40, dtype=torch.float64),
                       make_geometry([0], "parallel", volume_mm=80.0), (8, 8, 8), mode="adjoint")
    inner = flat[0, 0, 0, 2:-2, 2:-2, 2:-2]
    voxel_volume, pixel_area = 10.0**3, (80.0 / 40) ** 2
    assert torch.allclose(inner, torch.full_like(inner, voxel_volume / pixel_area), rtol=0.05)


def test_drr_intensities():
    g = make_geometry([0, 90], "parallel", volume_mm=100.0)
    air = torch.zeros(1, 1, 8, 8, 8)
    assert float(drr(air, g, det_shape=8).abs().max()) == 0.0
    water = torch.full((1, 1, 8, 8, 8), 1000.0 / 4000.0)  # 0 HU in the [-1000, 3000] window
    line = drr(water, g, det_shape=8, max_path=4.0)
    assert torch.allclose(line, torch.full_like(line, 0.02 * 100.0 / 4.0), rtol=1e-4)
    default = drr(water, g, det_shape=8)  # normalised by water across the volume
    assert torch.allclose(default, torch.ones_like(default), rtol=1e-4)
    bl = drr(water, g, det_shape=8, beer_lambert=True)
    assert torch.allclose(bl, 1 - torch.exp(torch.tensor(-2.0)).expand_as(bl), rtol=1e-4)
    assert float(hu_to_mu(torch.tensor(-1500.0))) == 0.0
    assert float(hu_to_mu(torch.tensor(0.0))) == pytest.approx(0.02)


def test_presets_and_custom_geometry():
    assert {"parallel", "x2ctgan"} <= set(GEOMETRY_PRESETS)
    g = make_geometry([0, 90], "x2ctgan")
    assert g["sid"].tolist() == [541.0, 541.0] and g["sdd"].tolist() == [949.0, 949.0]
    assert g["detector_mm"][0].tolist() == [500.0, 500.0] and g["detector_px"][0].tolist() == [320.0, 320.0]
    assert g["cone"].tolist() == [1.0, 1.0]
    custom = make_geometry([0], {"preset": "x2ctgan", "sid": 600.0})
    assert float(custom["sid"][0]) == 600.0 and float(custom["sdd"][0]) == 949.0
    own = make_geometry([0], {"beam": "cone", "sid": 800, "sdd": 1200, "detector_mm": [400, 300]})
    assert own["detector_mm"][0].tolist() == [400.0, 300.0]
    assert make_geometry([0], "parallel")["cone"].tolist() == [0.0]


@pytest.mark.parametrize("bad, words", [
    ("x2ctgn", ["unknown geometry preset 'x2ctgn'", 'did you mean "x2ctgan"', "parallel"]),
    ({"beam": "cone", "sid": 500}, ["needs sdd", "needs detector_mm"]),
    ({"beam": "cone", "sid": 900, "sdd": 500, "detector_mm": 300}, ["0 < sid < sdd"]),
    ({"beam": "fan"}, ["beam", "parallel"]),
    ({"preset": "x2ctgan", "sdi": 500}, ["sdi", 'did you mean "sid"']),
])
def test_bad_geometry_is_a_clear_error(bad, words):
    with pytest.raises(RecipeError) as exc:
        make_geometry([0, 90], bad)
    for word in words:
        assert word in str(exc.value)


def test_bad_shapes_are_rejected():
    g = make_geometry([0, 90], "parallel")
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        project(torch.zeros(8, 8, 8), g)
    with pytest.raises(ValueError, match="2 views"):
        backproject(torch.zeros(1, 3, 1, 4, 4), g, (4, 4, 4))


def test_make_geometry_takes_every_table_form_of_the_data_docs():
    """``make_geometry(views, **table)`` for the three forms docs/data.md documents: a preset table, a preset with
    overrides, and a custom beam table (the form that failed before 0.2.0)."""
    import torch

    from x2ct_framework.physics import make_geometry

    views = [0.0, 90.0]
    cone = {"beam": "cone", "sid": 800, "sdd": 1200, "detector_mm": [400, 300], "detector_px": 256}
    for table in (cone, {"preset": "x2ctgan"}, {"preset": "x2ctgan", "sid": 600.0}):
        spread, positional = make_geometry(views, **table), make_geometry(views, table)
        assert spread.keys() == positional.keys()
        assert all(torch.equal(spread[k], positional[k]) for k in spread)
    g = make_geometry(views, **cone)
    assert g["cone"].tolist() == [1.0, 1.0] and g["sid"].tolist() == [800.0, 800.0]
    assert g["detector_mm"][0].tolist() == [400.0, 300.0]
    assert make_geometry(views, **{"preset": "x2ctgan", "sid": 600.0})["sid"].tolist() == [600.0, 600.0]
    assert make_geometry(views)["cone"].tolist() == [0.0, 0.0]  # parallel unless told otherwise
    import pytest

    from x2ct_framework.errors import RecipeError

    with pytest.raises(RecipeError, match="a cone-beam geometry needs sdd"):
        make_geometry(views, beam="cone", sid=800, detector_mm=400)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_projection_of_a_low_precision_volume_under_autocast_has_a_gradient(dtype):
    """Mixed precision: a model's bfloat16/float16 output projected under autocast backpropagates (the sampler's
    backward meets a float32 gradient and a low-precision volume)."""
    g = make_geometry([0, 90], "x2ctgan", volume_mm=160.0, detector_px=16)
    x = torch.rand(1, 1, 16, 16, 16).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = project(x, g)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and bool(torch.isfinite(x.grad.float()).all())
    x32 = x.detach().float().requires_grad_(True)
    project(x32, g).sum().backward()
    assert torch.allclose(x.grad.float(), x32.grad, rtol=0.05, atol=0.05 * float(x32.grad.abs().max()))
