"""Differentiable parallel-beam projector and its back-projection (grid_sample based)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MU_WATER = 0.02  # linear attenuation of water per mm at about 60 keV


def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER) -> torch.Tensor:
    """HU -> linear attenuation per mm; air and anything below clamps to 0."""
    return torch.clamp(mu_water * (1.0 + hu / 1000.0), min=0.0)


def _rotation_grid(angle_deg: torch.Tensor, shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """Sampling grid that rotates a [D, H, W] volume about z so the view's rays run along +H."""
    d, h, w = shape
    th = angle_deg * math.pi / 180.0
    c, s = torch.cos(th), torch.sin(th)
    zs = torch.linspace(-1 + 1 / d, 1 - 1 / d, d, device=device, dtype=dtype)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device, dtype=dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device, dtype=dtype)
    z, t, u = torch.meshgrid(zs, ys, xs, indexing="ij")  # t: along the ray, u: detector column
    # world point = u * (cos, -sin) + t * (sin, cos)
    x = u[None] * c[:, None, None, None] + t[None] * s[:, None, None, None]
    y = -u[None] * s[:, None, None, None] + t[None] * c[:, None, None, None]
    return torch.stack([x, y, z[None].expand_as(x)], dim=-1)


def project(mu: torch.Tensor, geometry: dict[str, torch.Tensor], det_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Line integrals of ``mu`` [B, 1, D, H, W] (per mm) for every view: [B, V, 1, h, w]."""
    b, _, d, h, w = mu.shape
    angles = geometry["angles"].to(mu.device, mu.dtype)
    v = angles.shape[1]
    grid = _rotation_grid(angles.reshape(-1), (d, h, w), mu.device, mu.dtype)  # [B*V, D, H, W, 3]
    vol = mu.repeat_interleave(v, dim=0)
    rot = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    step_mm = geometry["volume_mm"].to(mu.device, mu.dtype)[..., 1].reshape(-1, 1, 1, 1) / h
    img = rot.sum(dim=3) * step_mm  # [B*V, 1, D, W]
    if det_shape is not None and tuple(img.shape[-2:]) != tuple(det_shape):
        img = F.interpolate(img, size=det_shape, mode="bilinear", align_corners=False)
    return img.reshape(b, v, 1, *img.shape[-2:])


def backproject(images: torch.Tensor, geometry: dict[str, torch.Tensor], grid_shape: tuple[int, int, int]) -> torch.Tensor:
    """Smear each view's image [B, V, C, h, w] back along its rays into [B, V, C, *grid_shape]."""
    b, v, c, _, _ = images.shape
    d, h, w = grid_shape
    angles = geometry["angles"].to(images.device, images.dtype).reshape(-1)
    th = angles * math.pi / 180.0
    zs = torch.linspace(-1 + 1 / d, 1 - 1 / d, d, device=images.device, dtype=images.dtype)
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=images.device, dtype=images.dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=images.device, dtype=images.dtype)
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    u = x[None] * torch.cos(th)[:, None, None, None] - y[None] * torch.sin(th)[:, None, None, None]
    grid = torch.stack([u, z[None].expand_as(u)], dim=-1).reshape(b * v, d, h * w, 2)
    out = F.grid_sample(images.reshape(b * v, c, *images.shape[-2:]), grid, mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(b, v, c, d, h, w)


def drr(ct01: torch.Tensor, geometry: dict[str, torch.Tensor], hu_window: tuple[float, float] = (-1000.0, 3000.0),
        det_shape: tuple[int, int] | None = None, mu_water: float = MU_WATER, beer_lambert: bool = False,
        max_path: float | None = None) -> torch.Tensor:
    """DRR in [0, 1] from a CT in [0, 1] (after the HU window): [B, V, 1, h, w]."""
    lo, hi = hu_window
    mu = hu_to_mu(ct01 * (hi - lo) + lo, mu_water)
    line = project(mu, geometry, det_shape)
    if beer_lambert:
        return 1.0 - torch.exp(-line)
    scale = max_path if max_path is not None else mu_water * 2.0 * float(geometry["volume_mm"].max())
    return torch.clamp(line / scale, 0.0, 1.0)
