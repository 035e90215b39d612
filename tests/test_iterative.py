"""SART through the projector and its adjoint (issue 27's analytic reference row)."""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework.physics import drr, make_geometry, project
from x2ct_framework.physics.iterative import SARTReconstruction, line_integrals, sart


def ball(n: int, radius: float = 0.35, hu: float = 0.0) -> torch.Tensor:
    """A water ball (HU ``hu``) in air, as a CT in [0, 1] of the window [-1000, 3000]: [1, 1, n, n, n]."""
    c = (torch.arange(n) + 0.5) / n - 0.5
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    inside = (x ** 2 + y ** 2 + (z / 1.2) ** 2) <= radius ** 2
    out = torch.where(inside, torch.tensor(hu), torch.tensor(-1000.0))
    return ((out + 1000.0) / 4000.0)[None, None]


@pytest.mark.parametrize("beer", [False, True])
def test_line_integrals_invert_drr(beer):
    ct = ball(16, hu=0.0)  # water: the linear DRR's longest path (112 mm x 0.02) stays below its 1.0 clip
    g = make_geometry([0, 90], "parallel", volume_mm=160.0, detector_px=16)
    img = drr(ct, g, (-1000.0, 3000.0), beer_lambert=beer)
    lines = project(0.02 * (1.0 + (ct * 4000.0 - 1000.0) / 1000.0).clamp_min(0.0), g)
    assert torch.allclose(line_integrals(img, g, beer_lambert=beer), lines, rtol=1e-4, atol=1e-5)


def test_sart_recovers_a_volume_from_many_noise_free_views():
    """36 parallel views of a 16^3 ball: SART converges to the ball (PSNR above 35 dB in [0, 1])."""
    ct = ball(16)
    g = make_geometry(list(range(0, 180, 5)), "parallel", volume_mm=160.0, detector_px=16)
    model = SARTReconstruction(16, hu_window=(-1000.0, 3000.0), iterations=20)
    rec = model(drr(ct, g, (-1000.0, 3000.0)), g)
    mse = float(((rec - ct) ** 2).mean())
    assert 10 * math.log10(1.0 / mse) > 35.0


def test_sart_fits_its_views_and_stays_non_negative():
    """Two cone-beam views: every pass lowers the projection residual; the attenuation never goes below 0."""
    ct = ball(16, hu=200.0)
    g = make_geometry([0, 90], "x2ctgan", volume_mm=160.0, detector_px=16)
    lines = line_integrals(drr(ct, g, (-1000.0, 3000.0)), g)
    resid = []
    x = None
    for _ in range(4):
        x = sart(lines, g, (16, 16, 16), iterations=1, init=x)
        resid.append(float(((project(x, g) - lines) ** 2).mean()))
        assert float(x.min()) >= 0.0
    assert all(b < a for a, b in zip(resid, resid[1:])) and resid[-1] < 0.05 * float((lines ** 2).mean())
    with pytest.raises(ValueError, match="relax"):
        sart(lines, g, (16, 16, 16), relax=2.5)
    with pytest.raises(ValueError, match="views"):
        sart(lines[:, :1], g, (16, 16, 16))
