"""Built-in validation metrics (registered through the plugin hook like any other plugin).

Every metric takes ``pred`` and ``target`` in [0, 1] (the recipe's HU window) and returns one value
per case, ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hookspecs import hookimpl


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per case with peak ``data_range``, over all voxels."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim3d(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win: int = 11,
           sigma: float = 1.5) -> torch.Tensor:
    """3D SSIM per case with a separable Gaussian window (valid region only)."""
    x, y = pred.float(), target.float()
    g = _gaussian(win, sigma, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t):
        for dim in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = win
            t = F.conv3d(t, g.reshape(shape))
        return t

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


class PSNR:
    def __init__(self, data_range: float = 1.0):
        self.data_range = data_range

    def __call__(self, pred, target, batch):
        return psnr(pred, target, self.data_range)


class SSIM:
    def __init__(self, data_range: float = 1.0):
        self.data_range = data_range

    def __call__(self, pred, target, batch):
        return ssim3d(pred, target, self.data_range)


@hookimpl
def register_metrics(register):
    register("psnr", PSNR)
    register("ssim", SSIM)
