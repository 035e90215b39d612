"""Analytic (model-free) reconstruction from the views: SART through the framework's projector and its adjoint.

The matrices' reference row for few-view data (issue 27): what the X-rays determine with no learning at all.
``sart`` runs the simultaneous algebraic reconstruction technique (Andersen and Kak 1984) in its ordered-subset
form, one view per sub-iteration::

    x <- clamp(x + relax * A_v^T [(p_v - A_v x) / A_v 1] / A_v^T 1, 0)

where ``A_v`` is ``project`` for view ``v`` (the same ray model, prefilter included, that renders the data),
``A_v^T`` its exact adjoint (the gradient of ``project``), ``A_v 1`` the rays' path lengths through the grid and
``A_v^T 1`` the voxels' total ray weight. Attenuation is kept non-negative. ``line_integrals`` undoes the DRR's
intensity mapping (``drr``: linear, or Beer-Lambert), so a dataset's X-rays can be reconstructed as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..conventions import DEFAULT_HU_WINDOW, hu_to_unit
from .drr import MU_WATER, project
from .geometry import batched


def line_integrals(xrays: torch.Tensor, geometry: Mapping[str, torch.Tensor], *, mu_water: float = MU_WATER,
                   beer_lambert: bool = False, max_path: float | None = None) -> torch.Tensor:
    """Invert ``drr``'s intensity mapping: X-rays in [0, 1] ``[B, V, 1, h, w]`` -> line integrals of mu (per mm).

    Linear DRRs were clipped to [0, 1] after division by ``max_path`` (water across the largest extent of
    ``volume_mm`` by default); Beer-Lambert DRRs are ``1 - exp(-line)``, clamped here below 1 - 1e-6.
    """
    if beer_lambert:
        return -torch.log1p(-xrays.clamp(0.0, 1.0 - 1e-6))
    if max_path is None:
        vol = batched(geometry, xrays.shape[0])["volume_mm"]
        max_path = mu_water * vol.amax(dim=(1, 2)).to(xrays)  # [B]
        return xrays * max_path.view(-1, 1, 1, 1, 1)
    return xrays * float(max_path)


def _single_view(g: Mapping[str, torch.Tensor], v: int) -> dict[str, torch.Tensor]:
    return {k: t[:, v:v + 1] for k, t in g.items()}


@torch.no_grad()
def sart(lines: torch.Tensor, geometry: Mapping[str, torch.Tensor], grid_shape: tuple[int, int, int], *,
         iterations: int = 20, relax: float = 1.0, init: torch.Tensor | None = None,
         nonnegative: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """SART (ordered subsets of one view) from line integrals ``[B, V, 1, h, w]``: mu ``[B, 1, D, H, W]`` per mm.

    ``iterations`` full passes over the views; ``relax`` the relaxation factor (0 < relax < 2);
    ``init`` a starting volume (zeros by default). Cases with different geometries run one by one.
    """
    if lines.dim() != 5 or lines.shape[2] != 1:
        raise ValueError(f"sart expects line integrals [B, V, 1, h, w], got shape {tuple(lines.shape)}")
    if not 0.0 < relax < 2.0:
        raise ValueError(f"sart: relax must lie in (0, 2), got {relax}")
    b, nv, _, h, w = lines.shape
    g = batched(geometry, b, lines.device, lines.dtype)
    if g["angles"].shape[1] != nv:
        raise ValueError(f"sart: the images hold {nv} views but the geometry has {g['angles'].shape[1]}")
    if b > 1:
        return torch.cat([sart(lines[i:i + 1], {k: t[i:i + 1] for k, t in g.items()}, grid_shape,
                               iterations=iterations, relax=relax,
                               init=None if init is None else init[i:i + 1], nonnegative=nonnegative, eps=eps)
                          for i in range(b)])
    shape = (1, 1, *(int(s) for s in grid_shape))
    x = torch.zeros(shape, dtype=lines.dtype, device=lines.device) if init is None else init.to(lines).clone()

    def forward(vol: torch.Tensor, gv: dict) -> torch.Tensor:
        return project(vol, gv, (h, w))[:, 0]  # [1, 1, h, w]

    def adjoint(img: torch.Tensor, gv: dict) -> torch.Tensor:
        with torch.enable_grad():
            probe = torch.zeros(shape, dtype=lines.dtype, device=lines.device, requires_grad=True)
            (grad,) = torch.autograd.grad(forward(probe, gv), probe, grad_outputs=img)
        return grad

    views = [_single_view(g, v) for v in range(nv)]
    ones = torch.ones(shape, dtype=lines.dtype, device=lines.device)
    row = [forward(ones, gv) for gv in views]  # path length of every ray through the grid
    col = [adjoint(torch.ones_like(r), gv) for r, gv in zip(row, views)]  # total ray weight of every voxel
    for _ in range(int(iterations)):
        for v, gv in enumerate(views):
            resid = (lines[:, v] - forward(x, gv)) / row[v].clamp_min(eps)
            resid = torch.where(row[v] > eps, resid, torch.zeros_like(resid))
            x = x + relax * adjoint(resid, gv) / col[v].clamp_min(eps)
            if nonnegative:
                x = x.clamp_min(0.0)
    return x


class SARTReconstruction:
    """A model-free predictor for the evaluation loop: the dataset's X-rays -> SART -> CT in [0, 1].

    Called like a model, ``(xrays, geometry, prev=None) -> [B, 1, D, H, W]``; the intensity mapping
    (``mu_water``, ``beer_lambert``) and the HU window are the dataset's, so the X-rays are inverted exactly
    as they were rendered.
    """

    def __init__(self, resolution: int, *, hu_window: tuple[float, float] = DEFAULT_HU_WINDOW,
                 mu_water: float = MU_WATER, beer_lambert: bool = False, iterations: int = 20, relax: float = 1.0):
        self.resolution, self.hu_window = int(resolution), (float(hu_window[0]), float(hu_window[1]))
        self.mu_water, self.beer_lambert = float(mu_water), bool(beer_lambert)
        self.iterations, self.relax = int(iterations), float(relax)

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, xrays: torch.Tensor, geometry: Mapping[str, torch.Tensor], prev=None) -> torch.Tensor:
        lines = line_integrals(xrays.float(), geometry, mu_water=self.mu_water, beer_lambert=self.beer_lambert)
        r = self.resolution
        mu = sart(lines, geometry, (r, r, r), iterations=self.iterations, relax=self.relax)
        hu = (mu / self.mu_water - 1.0) * 1000.0
        return hu_to_unit(hu, self.hu_window).clamp(0.0, 1.0)
