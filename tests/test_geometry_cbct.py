"""The circular few-view cone beam of DIF-Net / C²RV (TIGRE conventions) as presets, checked against their convention.

DIF-Net's data loader (xmed-lab/DIF-Net, ``code/dataset.py``, ``Geometry.project``) states where a point of its
volume lands on its projections: array coordinates ``p`` in [0, 1]^3 centred as ``(p0 - 1/2, p1 - 1/2, 1/2 - p2)``
times the volume's size, rotated by minus the gantry angle about the third axis, the source at DSO along the first
axis, magnified by DSD / (DSO - q0); the projection's rows follow the third coordinate, its columns the second. Here
spheres placed off-centre in their array are projected analytically along exactly those rays (chord lengths), and
the framework's DRR of the same spheres, placed in the framework's volume by the mapping docs/models.md states
(their axes 0, 1, 2 = our H, W and D reversed; their angle t = our gantry angle -t), must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from x2ct_framework.physics import make_geometry, project

N, MU = 40, 0.02
# off-centre spheres (their array coordinates in [0, 1], radius as a fraction of the volume): no symmetry
SPHERES = [((0.30, 0.55, 0.35), 0.16), ((0.62, 0.35, 0.70), 0.10), ((0.55, 0.70, 0.25), 0.07)]


def their_projection(angle_deg: float, dso: float, dsd: float, size_mm: float, det_mm: float, px: int):
    """Chord lengths x MU of every detector pixel along DIF-Net's rays (their frame), ``[px, px]``: rows = their
    first detector coordinate (the third volume axis), columns = the second."""
    t = math.radians(angle_deg)
    # detector pixel centres in their normalised coordinates, converted to mm on the detector
    c = ((torch.arange(px, dtype=torch.float64) + 0.5) / px - 0.5) * det_mm
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    # rotated frame q: source at (dso, 0, 0), detector plane q0 = dso - dsd, (q2, q1) = (row, column) in mm
    src_q = torch.tensor([dso, 0.0, 0.0], dtype=torch.float64)
    pix_q = torch.stack([torch.full_like(rows, dso - dsd), cols, rows], -1)
    d_q = pix_q - src_q
    d_q = d_q / d_q.norm(dim=-1, keepdim=True)
    # back to the centred volume frame x': q = R(-t) x'  =>  x' = R(t) q
    rot = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]],
                       dtype=torch.float64)
    src, d = rot @ src_q, d_q @ rot.T
    out = torch.zeros(px, px, dtype=torch.float64)
    for (p0, p1, p2), r in SPHERES:
        centre = torch.tensor([p0 - 0.5, p1 - 0.5, 0.5 - p2], dtype=torch.float64) * size_mm
        oc = src - centre
        along = (d * oc).sum(-1)
        dist2 = (oc * oc).sum() - along ** 2
        out += MU * 2 * ((r * size_mm) ** 2 - dist2).clamp_min(0).sqrt()
    return out


def ours_volume(size_mm: float, flip_d: bool = True) -> torch.Tensor:
    """The same spheres in the framework's canonical volume [D, H, W]: H = their axis 0, W = axis 1, D = axis 2
    reversed (partial-volume edges)."""
    ax = (torch.arange(N, dtype=torch.float64) + 0.5) / N  # voxel centres as fractions of the extent
    d, h, w = torch.meshgrid(ax, ax, ax, indexing="ij")
    a2 = 1.0 - d if flip_d else d
    vol = torch.zeros(N, N, N, dtype=torch.float64)
    for (p0, p1, p2), r in SPHERES:
        dist = ((h - p0) ** 2 + (w - p1) ** 2 + (a2 - p2) ** 2).sqrt() * size_mm
        vol += ((r * size_mm - dist) / (size_mm / N) + 0.5).clamp(0, 1)
    return (MU * vol)[None, None].float()


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten() - a.double().mean(), b.double().flatten() - b.double().mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("preset,dso,dsd,det_mm", [("difnet", 1000.0, 2000.0, 512.0), ("c2rv", 800.0, 1200.0, 614.4)])
def test_preset_drr_matches_their_convention_on_an_analytic_phantom(preset, dso, dsd, det_mm):
    size, px = 204.8, 48
    angles = [0.0, 45.0, 90.0, 135.0]  # 4 views over 180 degrees, as their views are spread
    g = make_geometry([-a % 360.0 for a in angles], preset, volume_mm=size)
    assert g["sid"][0] == dso and g["sdd"][0] == dsd and float(g["detector_mm"][0, 0]) == pytest.approx(det_mm)
    ours = project(ours_volume(size), g, (px, px))[0, :, 0]
    wrong = project(ours_volume(size, flip_d=False), make_geometry(angles, preset, volume_mm=size), (px, px))[0, :, 0]
    for v, a in enumerate(angles):
        theirs = their_projection(a, dso, dsd, size, det_mm, px)
        assert correlation(ours[v], theirs) > 0.99, (a, correlation(ours[v], theirs))
        if a:  # the naive mapping (their angle as ours, D not reversed) does not fit: the test can tell
            assert correlation(wrong[v], theirs) < 0.9
