"""From the detector to the volume: back-projecting view features along their rays, sampling them at
projected points (``x2ct_framework.physics.project_points``), detector ray embeddings and Fourier positions.

Parameter shapes do not depend on the output resolution or the number of views, so that a checkpoint of
one stage loads into the next stage's model unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from x2ct_framework.physics import backproject, batched, project_points
from x2ct_framework.physics.drr import detector_rays

__all__ = ["lift", "voxel_centres", "project_points", "sample_views", "sample_volume", "detector_plucker",
           "fourier_features", "FourierPoints", "FourierPositions"]


def lift(feats: torch.Tensor, geometry: dict, size: int) -> torch.Tensor:
    """Back-project per-view 2D features ``[B, V, C, h, w]`` along each view's rays into ``[B, V, C, S, S, S]``.

    Runs in float32 even under autocast: ray coordinates in bfloat16 would be off by a quarter voxel at 128^3.
    """
    with torch.autocast(feats.device.type, enabled=False):
        return backproject(feats.float(), geometry, (size, size, size))


def voxel_centres(volume_mm: torch.Tensor, size: int) -> torch.Tensor:
    """World coordinates (mm, x y z) of the voxel centres of a ``size^3`` grid over ``volume_mm [B, 3]``:
    ``[B, size^3, 3]`` in ``(d h w)`` order (x along W, y along H, z along D)."""
    ax = (torch.arange(size, device=volume_mm.device, dtype=torch.float32) + 0.5) / size - 0.5
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    unit = torch.stack([x, y, z], -1).reshape(1, -1, 3)
    return unit * volume_mm.float()[:, None, :]


def sample_views(feats: list[torch.Tensor], offsets: list[float], image_size: tuple[int, int], uv: torch.Tensor
                 ) -> torch.Tensor:
    """Bilinear samples of every level of per-view feature maps at detector points, summed over levels.

    ``feats`` are ``[B, V, C, h_l, w_l]`` (one C), ``uv [B, V, N, 2]`` from ``project_points``;
    ``offsets[l]`` is level l's centre offset in input pixels (``ViewEncoder.offsets``) over an input
    of ``image_size = (H, W)``: the sample point is shifted by ``2 * offset / W`` so that feature j is
    read where it is centred. Returns ``[B, V, C, N]``; outside the detector the samples are 0.
    """
    b, v = uv.shape[:2]
    h_in, w_in = image_size
    shift_unit = torch.tensor([2.0 / w_in, 2.0 / h_in], device=uv.device)
    grid = rearrange(uv, "b v n two -> (b v) 1 n two")
    out = 0
    with torch.autocast(uv.device.type, enabled=False):
        for f, off in zip(feats, offsets):
            g = grid + off * shift_unit if off else grid
            s = F.grid_sample(rearrange(f.float(), "b v c h w -> (b v) c h w"), g, mode="bilinear",
                              padding_mode="zeros", align_corners=False)
            out = out + s
    return rearrange(out, "(b v) c 1 n -> b v c n", b=b, v=v)


def sample_volume(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``volume [B, C, D, H, W]`` at ``points [B, N, 3]`` in volume coordinates
    (x y z in [-1, 1]: -1 and 1 are the outer faces, so voxel i of n is centred at ``2 (i + 1/2) / n - 1``,
    as ``voxel_centres`` over the volume's size): ``[B, C, N]`` in float32.

    Outside the centres of the outermost voxels the value is held (border padding), so sampling at the
    voxel centres of a finer grid is ``resize3d`` (trilinear, ``align_corners=False``) to that grid.
    """
    grid = points.float()[:, :, None, None, :]                          # [B, N, 1, 1, 3]
    with torch.autocast(points.device.type, enabled=False):
        out = F.grid_sample(volume.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rearrange(out, "b c n 1 1 -> b c n")


def detector_plucker(geometry: dict, batch: int, shape: tuple[int, int], image_size: tuple[int, int] | None = None,
                     offset: float = 0.0, device=None) -> torch.Tensor:
    """Plücker coordinates of the ray through each pixel of an ``h x w`` map over every view's detector:
    ``[B, V, 6, h, w]``: the unit direction ``d`` (source to detector) and the moment ``m = o x d`` of a
    point ``o`` on the ray, divided by half the volume's largest extent so that rays through the
    volume have moments of at most about 1. A ray through the isocentre has zero moment.

    The rays are the DRR projector's (``physics.drr.detector_rays``: cone beam from the source to each
    detector pixel, parallel beam along the central ray through it). Map pixel j is centred
    where ``sample_views`` reads it: at detector grid coordinate ``2 (j + 1/2) / w - 1``, moved back by a
    level's centre ``offset`` (input pixels over an input of ``image_size``, see ``ViewEncoder.offsets``).
    """
    h, w = shape
    g = batched(geometry, batch, device, torch.float32)
    h_in, w_in = image_size or shape
    origin, direction = detector_rays(g, (h, w), (offset / w_in, offset / h_in))
    d = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = (g["volume_mm"].amax(-1) / 2).clamp_min(1e-6)[:, :, None, None, None]
    m = torch.linalg.cross(origin, d, dim=-1) / scale
    return rearrange(torch.cat([d, m], -1), "b v h w c -> b v c h w")


def fourier_features(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[..., A]`` coordinates -> ``[..., 2 A F]``: the sines, then the cosines, of every coordinate times every
    one of the ``F`` frequencies (coordinate-major)."""
    ang = rearrange(coords[..., None] * freqs, "... a f -> ... (a f)")
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class FourierPoints(nn.Module):
    """Fourier features of points in volume coordinates ``[B, N, 3]`` ([-1, 1], as ``sample_volume``):
    ``[B, N, 6 * frequencies]`` (sin and cos of each coordinate at octave-spaced frequencies)."""

    def __init__(self, frequencies: int = 6, max_frequency: float | None = None):
        super().__init__()
        top = max_frequency if max_frequency is not None else 2.0 ** (frequencies - 1)
        freqs = math.pi * torch.logspace(0.0, math.log2(top), frequencies, base=2.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.features = 6 * frequencies

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return fourier_features(points.float(), self.freqs)


class FourierPositions(nn.Module):
    """3D positional encoding of a ``G^3`` grid: sinusoids of the voxel-centre coordinates, projected to ``dim``.

    Coordinates are normalised to [-1, 1], so the same parameters serve any grid size G.
    """

    def __init__(self, dim: int, frequencies: int = 16, max_frequency: float = 32.0):
        super().__init__()
        freqs = math.pi * torch.logspace(0.0, math.log2(max_frequency), frequencies, base=2.0)
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(6 * frequencies, dim)

    def forward(self, g: int) -> torch.Tensor:
        """``[G^3, dim]`` in ``(d h w)`` order."""
        ax = torch.linspace(-1 + 1 / g, 1 - 1 / g, g, device=self.freqs.device)
        zyx = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), dim=-1).reshape(-1, 3)
        return self.proj(fourier_features(zyx, self.freqs).to(self.proj.weight.dtype))


# ---- transformer -------------------------------------------------------------------------------
