"""The spectral X-ray simulator against independent references: xraydb (NIST), spekpy, numeric integrals,
Poisson statistics, the monoenergetic projector, and torch.autograd.gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework.conventions import hu_to_unit
from x2ct_framework.errors import RecipeError
from x2ct_framework.physics import drr, make_geometry
from x2ct_framework.physics.materials import COMPOSITIONS, hu_to_densities, mass_attenuation
from x2ct_framework.physics.spectral import (XRAY_PRESETS, check_style, detect, draw_style, energy_bins,
                                             material_lines, photons_per_pixel, render_lines, resolve_xray,
                                             simulate, tube_spectrum)

TEN_ENERGIES = [15.5, 20.5, 25.5, 30.5, 33.5, 40.5, 50.5, 60.5, 80.5, 120.5]  # 33.5: above iodine's K edge


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_mass_attenuation_equals_xraydb(name):
    xraydb = pytest.importorskip("xraydb")
    composition, _ = COMPOSITIONS[name]
    ref = [sum(w * float(xraydb.mu_elam(el, e * 1000.0)) for el, w in composition.items()) for e in TEN_ENERGIES]
    got = mass_attenuation(name, TEN_ENERGIES)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=0)


def test_water_equals_xraydb_material():
    xraydb = pytest.importorskip("xraydb")
    ref = [float(xraydb.material_mu("water", e * 1000.0)) for e in TEN_ENERGIES]  # 1/cm at 1 g/cm^3
    assert torch.allclose(mass_attenuation("water", TEN_ENERGIES), torch.tensor(ref, dtype=torch.float64),
                          rtol=1e-3)  # xraydb's own water formula vs the NIST mass fractions


@pytest.mark.parametrize("kvp", [60, 120])
def test_spectrum_table_equals_spekpy(kvp):
    spekpy = pytest.importorskip("spekpy")
    from x2ct_framework.physics import _xray_tables as tables

    s = spekpy.Spek(kvp=float(kvp), th=tables.SPECTRUM_ANODE_ANGLE_DEG, dk=1.0)
    s.filter("Al", tables.SPECTRUM_FILTER_AL_MM)
    k, phi = s.get_spectrum()
    ref = {round(float(a), 3): float(b) for a, b in zip(k, phi)}
    e, got = tube_spectrum(kvp)
    expected = torch.tensor([ref.get(round(float(x), 3), 0.0) for x in e], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9 * float(expected.max()))


def _water_slab(size=8, thickness_mm=200.0):
    """A water cube of ``thickness_mm`` side, and a parallel geometry whose central rays cross it fully."""
    ct = torch.full((1, 1, size, size, size), float(hu_to_unit(torch.tensor(0.0))))
    geo = make_geometry([0.0], "parallel", volume_mm=thickness_mm, detector_px=size)
    return ct, geo


def _water_lines(thickness_cm: torch.Tensor, materials=("water",)) -> torch.Tensor:
    return thickness_cm.view(1, -1, 1, 1, 1).expand(1, -1, 1, 4, 4).double()  # g/cm^2 of water


@pytest.mark.parametrize("kvp", [70.0, 120.0])
def test_water_slab_transmission_equals_numeric_integral(kvp):
    """I = int S(E) E exp(-mu(E) t) dE / int S(E) E dE, the spectrum's 1 keV bins and the NIST mu."""
    p = resolve_xray({"kvp": kvp, "bin_kev": 1, "window": "none"})
    e, phi = tube_spectrum(kvp)
    mu = mass_attenuation("water", e)
    t = torch.tensor([5.0, 20.0])
    ref = torch.stack([(phi * e * torch.exp(-mu * x)).sum() / (phi * e).sum() for x in t])
    got = detect(_water_lines(t), make_geometry([0.0, 90.0], "parallel"), p, ["water"])[0, :, 0, 2, 2]
    assert torch.allclose(got, ref, rtol=1e-4)
    # and through the projector: a real 20 cm water cube, the simulator's own materials (soft-tissue scheme)
    ct, geo = _water_slab()
    lines = material_lines(ct.double(), geo)
    assert float(lines.sum(2)[0, 0, 4, 4]) == pytest.approx(20.0 * 1.0 * 1.0 + 0.0, rel=0.06)  # ~1 g/cm^3 at 0 HU


def test_beam_hardening_effective_attenuation_falls_with_thickness():
    p = resolve_xray({"kvp": 120.0, "bin_kev": 1, "window": "none"})
    e, phi = tube_spectrum(120.0)
    mu = mass_attenuation("water", e)
    t = torch.tensor([1.0, 5.0, 10.0, 20.0, 30.0])
    got = detect(_water_lines(t), make_geometry([0.0] * 5, "parallel"), p, ["water"])[0, :, 0, 2, 2]
    mu_eff = -torch.log(got) / t
    ref = torch.stack([-torch.log((phi * e * torch.exp(-mu * x)).sum() / (phi * e).sum()) / x for x in t])
    assert torch.allclose(mu_eff, ref, rtol=1e-4)
    assert bool((mu_eff[1:] < mu_eff[:-1]).all())  # harder beam deeper in
    assert float(mu_eff[0] - mu_eff[-1]) > 0.01  # and by a real amount (1/cm)


def test_flat_field_variance_is_poisson():
    p = resolve_xray({"preset": "chest_pa", "electronic_noise": 0.0, "detector_blur_mm": 0.0, "focal_spot_mm": 0.0,
                      "mas": 0.05})
    geo = make_geometry([0.0], "x2ctgan")
    lines = torch.zeros(1, 1, 6, 256, 256, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    i = detect(lines, geo, p, generator=g)
    pixel = (500.0 / 256) ** 2
    n = photons_per_pixel(p, pixel, 949.0) * 0.7  # after the grid's primary transmission
    _, phi = tube_spectrum(120.0, 0.0, 0.1)
    assert n == pytest.approx(float(phi.sum()) * 0.05 * (1000 / 949.0) ** 2 * pixel / 100 * 0.7)
    counts = i * n  # back to photons
    assert float(counts.mean()) == pytest.approx(n, rel=0.01)
    assert float(counts.var()) == pytest.approx(n, rel=0.05)


@pytest.mark.parametrize("spr,grid", [(1.0, (1.0, 1.0)), (0.6, (0.7, 0.1))])
def test_scatter_to_primary_ratio_on_water_slab(spr, grid):
    p = resolve_xray({"spr": spr, "spr_thickness_cm": 20.0, "grid_primary": grid[0], "grid_scatter": grid[1],
                      "window": "none"})
    lines = torch.zeros(1, 1, 6, 64, 64, dtype=torch.float64)
    lines[:, :, 3] = 20.0  # 20 g/cm^2 of soft tissue everywhere
    parts = detect(lines, make_geometry([0.0], "parallel", detector_px=64), p, return_parts=True)
    ratio = parts["scatter"] / parts["primary"]
    assert float(ratio[0, 0, 0, 32, 32]) == pytest.approx(spr * grid[1] / grid[0], rel=1e-9)
    assert torch.allclose(ratio, torch.full_like(ratio, spr * grid[1] / grid[0]), rtol=1e-9)


@pytest.mark.parametrize("beer", [False, True])
def test_ideal_reproduces_drr(beer):
    from x2ct_framework.phantom import chest_phantom

    hu, _ = chest_phantom(32, seed=3)
    ct = hu_to_unit(hu)[None, None]
    for preset in ("parallel", "x2ctgan"):
        geo = make_geometry([0.0, 90.0], preset)
        ref = drr(ct, geo, det_shape=32, beer_lambert=beer)
        got = simulate(ct, geo, {"preset": "ideal", "beer_lambert": beer}, det_shape=32)
        assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_x2ctgan_preset_divides_by_maximum_and_quantises():
    from x2ct_framework.phantom import chest_phantom

    hu, _ = chest_phantom(32, seed=3)
    ct = hu_to_unit(hu)[None, None]
    geo = make_geometry([0.0, 90.0], "x2ctgan")
    line = drr(ct, geo, det_shape=32, max_path=1e4)  # the line integral, scaled, unclipped
    ref = torch.round(line / line.amax((-1, -2), keepdim=True) * 255) / 255
    assert torch.allclose(simulate(ct, geo, "x2ctgan", det_shape=32), ref, atol=1e-6)


def test_presets_are_valid_and_show_attenuation_bright():
    from x2ct_framework.phantom import chest_phantom

    hu, labels = chest_phantom(32, seed=3)
    ct = hu_to_unit(hu)[None, None]
    geo = make_geometry([0.0], "x2ctgan")
    for name in XRAY_PRESETS:
        img = simulate(ct, geo, name, det_shape=32, labels=labels[None, None],
                       generator=torch.Generator().manual_seed(1))
        assert img.shape == (1, 1, 1, 32, 32) and bool(torch.isfinite(img).all())
        assert 0 <= float(img.min()) and float(img.max()) <= 1
        # the middle of the body (mediastinum, spine) brighter than the air beside it
        assert float(img[0, 0, 0, 12:20, 14:18].mean()) > float(img[0, 0, 0, 12:20, 0:2].mean()), name


def test_unknown_parameter_and_bad_values_are_named():
    with pytest.raises(RecipeError, match="kvpp"):
        resolve_xray({"preset": "chest_pa", "kvpp": 100})
    with pytest.raises(RecipeError, match="kvp"):
        resolve_xray({"kvp": 200})
    with pytest.raises(RecipeError, match="chest_ap"):
        resolve_xray("chest_ap")
    with pytest.raises(RecipeError, match="xray_style -> kvp"):
        check_style({"kvp": [130, 70]})


def test_hu_scheme_is_piecewise_linear():
    hu = torch.tensor([-1000.0, -575.0, 40.0, 800.0]).view(1, 1, 4)
    rho = hu_to_densities(hu)[..., 0, 0, :]  # [M, 4]
    assert float(rho[0, 0]) == pytest.approx(0.001205)  # air
    assert float(rho[1, 1]) == pytest.approx((0.10 + 0.75) / 2)  # lung half-way between its nodes
    assert float(rho[3, 2]) == pytest.approx(1.05)  # soft tissue
    # 800 HU: half-way between soft tissue (100 HU, 1.10) and bone (1500 HU, 1.92), density 1.51
    assert float(rho[3, 3]) == pytest.approx(0.5 * 1.10) and float(rho[4, 3]) == pytest.approx(0.5 * 1.92)
    assert float(hu_to_densities(torch.tensor([2900.0]).view(1, 1, 1))[4]) == pytest.approx(1.92 + 0.82)
    with_contrast = hu_to_densities(torch.tensor([400.0]).view(1, 1, 1), contrast=True)[:, 0, 0, 0]
    assert float(with_contrast[5]) == pytest.approx(1.072) and abs(float(with_contrast[4])) < 1e-6


def test_gradcheck_through_the_whole_chain():
    torch.manual_seed(0)
    ct = (0.2 + 0.1 * torch.rand(1, 1, 4, 4, 4, dtype=torch.float64)).requires_grad_()
    geo = make_geometry([0.0, 90.0], "parallel", volume_mm=200.0, detector_px=6)
    p = {"preset": "chest_pa", "noise": False, "bits": 0, "bin_kev": 10, "scatter_sigma_mm": 60.0,
         "unsharp_sigma_mm": 40.0, "window": [0.0, 8.0]}

    def f(x):
        return simulate(x, geo, p, det_shape=6, prefilter=False)

    assert torch.autograd.gradcheck(f, (ct,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_style_draw_is_deterministic_and_renders_from_lines():
    ranges = check_style({})
    base = resolve_xray("chest_pa")
    a = draw_style(base, ranges, torch.Generator().manual_seed(5))
    b = draw_style(base, ranges, torch.Generator().manual_seed(5))
    c = draw_style(base, ranges, torch.Generator().manual_seed(6))
    assert a == b and a != c
    assert 70 <= a["kvp"] <= 130
    lines = torch.rand(1, 2, 6, 16, 16) * 10
    geo = make_geometry([0.0, 90.0], "x2ctgan")
    img1 = render_lines(lines, geo, a, generator=torch.Generator().manual_seed(1))
    img2 = render_lines(lines, geo, a, generator=torch.Generator().manual_seed(1))
    assert torch.equal(img1, img2) and img1.shape == (1, 2, 1, 16, 16)


def test_energy_bins_cover_the_spectrum():
    p = resolve_xray({"kvp": 90.0, "bin_kev": 5})
    e, w, mu = energy_bins(p, ["water", "bone"])
    assert float(w.sum()) == pytest.approx(1.0) and mu.shape == (e.shape[0], 2)
    assert float(e.max()) < 90.0 and math.isclose(float(e[0] - 10.5) % 5, 2.0)


def _reference_densities(hu: torch.Tensor, nodes, materials) -> torch.Tensor:
    """Each material's density by plain linear interpolation between the scheme's nodes (np.interp style;
    above the top node all of the top node's material, its density going on along the last segment's total
    density slope), written independently of materials.py."""
    out = []
    for name in materials:
        dens = [n[2] if n[1] == name else 0.0 for n in nodes]
        rho = torch.full_like(hu, dens[0])
        for (h0, _, _), (h1, _, _), r0, r1 in zip(nodes[:-1], nodes[1:], dens[:-1], dens[1:]):
            inside = (hu > h0) & (hu <= h1)
            rho = torch.where(inside, r0 + (r1 - r0) * (hu - h0) / (h1 - h0), rho)
        (h0, _, t0), (h1, top, t1) = nodes[-2], nodes[-1]
        rho = torch.where(hu > h1, (t1 + (t1 - t0) * (hu - h1) / (h1 - h0)) * (name == top), rho)
        out.append(rho)
    return torch.stack(out, 1)


@pytest.mark.parametrize("contrast", [False, True])
def test_material_lines_equal_each_material_projected_alone(contrast):
    """All materials as channels of one projection (densities formed a chunk of slices at a time) equal each
    material's density volume, interpolated independently, projected alone; and so do their gradients."""
    from x2ct_framework.conventions import DEFAULT_HU_WINDOW
    from x2ct_framework.physics.drr import project
    from x2ct_framework.physics.materials import HU_NODES, HU_NODES_CONTRAST, scheme_materials

    torch.manual_seed(3)
    ct = torch.rand(1, 1, 12, 12, 12, dtype=torch.float64) * 0.6  # -1000..1400 HU, between the nodes
    geo = make_geometry([0.0, 90.0, 30.0], "x2ctgan")
    materials = scheme_materials(contrast)
    w = torch.randn(1, 3, len(materials), 10, 10, dtype=torch.float64)
    a = ct.clone().requires_grad_()
    got = material_lines(a, geo, det_shape=10, contrast=contrast, materials=materials)
    (got * w).sum().backward()
    b = ct.clone().requires_grad_()
    lo, hi = DEFAULT_HU_WINDOW
    rho = _reference_densities(lo + (hi - lo) * b[:, 0], HU_NODES_CONTRAST if contrast else HU_NODES, materials)
    ref = torch.cat([project(rho[:, m:m + 1], geo, 10) for m in range(len(materials))], 2) * 0.1
    (ref * w).sum().backward()
    assert got.shape == (1, 3, len(materials), 10, 10)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_density_slopes_and_their_value_at_a_node():
    """The fused densities' gradient is each material's slope inside a segment (the reference's autograd),
    and 0 for a value exactly at a node (where the one-sided slopes disagree)."""
    from x2ct_framework.physics.materials import HU_NODES, densities, scheme_materials

    materials = scheme_materials()
    hu = torch.tensor([-1100.0, -950.0, -600.0, -150.0, 0.0, 70.0, 700.0, 2000.0, -900.0, 40.0, 1500.0],
                      dtype=torch.float64)
    for m in range(len(materials)):
        a, b = hu.clone().requires_grad_(), hu.clone().requires_grad_()
        densities(a, materials, dim=0)[m].sum().backward()
        _reference_densities(b[None], HU_NODES, materials)[0, m].sum().backward()
        assert torch.allclose(a.grad[:8], b.grad[:8], rtol=1e-12, atol=0), materials[m]
        assert bool((a.grad[8:] == 0).all()), materials[m]  # -900, 40 and 1500 HU are nodes


def test_projection_through_a_pointwise_map_equals_projecting_the_mapped_volume():
    """``project(..., pointwise=...)`` equals projecting the map's channels, with a prefilter that averages
    voxels (the map first) or none, cases with different geometries, and differentiated twice."""
    from x2ct_framework.physics.drr import project
    from x2ct_framework.physics.materials import DensityMap

    torch.manual_seed(4)
    density = DensityMap(contrast=True, hu_window=(-1000.0, 3000.0))
    ct = torch.rand(2, 1, 16, 16, 16, dtype=torch.float64) * 0.6
    geos = [make_geometry([0.0, 90.0], "x2ctgan"),  # no averaging at 16 px
            make_geometry([0.0, 90.0], "parallel", volume_mm=200.0, detector_px=6)]  # 2x2x2 averaging
    for geo, det in zip(geos, (16, 6)):
        a, b = ct.clone().requires_grad_(), ct.clone().requires_grad_()
        got = project(a, geo, det, pointwise=density)
        ref = project(density(b).flatten(1, 2), geo, det)
        w = torch.randn_like(ref)
        (got * w).sum().backward()
        (ref * w).sum().backward()
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # two cases with different geometries (projected one by one)
    both = {k: torch.cat([torch.as_tensor(geos[0][k])[None], torch.as_tensor(geos[0][k])[None]]) for k in geos[0]}
    both["angles"] = torch.tensor([[0.0, 90.0], [30.0, 120.0]])
    got = project(ct, both, 16, pointwise=density)
    for i in range(2):
        one = {k: t[i:i + 1] for k, t in both.items()}
        assert torch.allclose(got[i:i + 1], project(density(ct[i:i + 1]).flatten(1, 2), one, 16), rtol=1e-12,
                              atol=1e-12)
    small = (0.2 + 0.1 * torch.rand(1, 1, 5, 5, 5, dtype=torch.float64)).requires_grad_()
    geo = make_geometry([0.0, 90.0], "parallel", volume_mm=200.0, detector_px=6)
    assert torch.autograd.gradgradcheck(lambda v: project(v, geo, 6, prefilter=False, pointwise=density), (small,),
                                        fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda v: project(v, geo, 6, prefilter=False), (small,), fast_mode=True)


def _conv_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """The blur as convolutions: edge-replicated padding and a separable normalised Gaussian, run on the
    image area-averaged by sigma // 2 and upsampled bilinearly when that is 2 or more."""
    f = int(sigma // 2)
    h, w = img.shape[-2:]
    if f >= 2 and min(h, w) >= 4 * f:
        small = torch.nn.functional.interpolate(img, size=(h // f, w // f), mode="area")
        return torch.nn.functional.interpolate(_conv_blur(small, sigma / f), size=(h, w), mode="bilinear",
                                               align_corners=False)
    r = math.ceil(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=img.dtype) / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    pad = torch.nn.functional.pad
    out = torch.nn.functional.conv2d(pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                                     groups=c)
    return torch.nn.functional.conv2d(pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                                      groups=c)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.3, 3.9, 6.4, 15.4, 40.0])
def test_blur_equals_its_convolutions(sigma):
    """The blur's stencils and small matrices equal edge-replicated convolutions (and the area-average /
    bilinear detour for wide kernels), on images wider than tall, with channels."""
    from x2ct_framework.physics.spectral import gaussian_blur

    torch.manual_seed(0)
    for shape in [(2, 1, 128, 128), (1, 2, 30, 44)]:
        img = torch.rand(shape, dtype=torch.float64)
        assert torch.allclose(gaussian_blur(img, sigma), _conv_blur(img, sigma), rtol=0, atol=1e-12), shape
    assert torch.equal(gaussian_blur(img, 0.1), img)  # neighbouring taps of exp(-50): below float64 rounding


@pytest.mark.parametrize("q", [0.0, 0.005, 0.25, 0.5, 0.995, 1.0])
def test_percentile_equals_torch_quantile(q):
    from x2ct_framework.physics.spectral import percentile

    torch.manual_seed(1)
    flat = torch.rand(1, 2, 1, 4099, dtype=torch.float64)
    flat[0, 0, 0, :300] = 0.25  # ties
    assert torch.allclose(percentile(flat, q), torch.quantile(flat, q, dim=-1), rtol=0, atol=1e-15)
