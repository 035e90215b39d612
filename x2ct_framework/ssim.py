"""Structural similarity (SSIM) of volumes: full 3D and 2D slice-wise, matching scikit-image.

One implementation serves the ``ssim`` loss and the evaluation metrics, so a number means the same
thing in both places.

Conventions (those of ``skimage.metrics.structural_similarity`` with ``gaussian_weights=True,
sigma=1.5, use_sample_covariance=False``): local means and (co)variances come from a separable
window of ``win_size`` taps; the SSIM map is averaged over the *valid* region only, i.e. scikit-image's
``pad = (win_size - 1) // 2`` border is cropped along every filtered axis (pytorch_msssim's valid
convolution gives the same region). ``C1 = (k1 * data_range)^2`` and ``C2 = (k2 * data_range)^2``.
scikit-image derives its Gaussian window from sigma (``2 * int(3.5 * sigma + 0.5) + 1`` taps, 11 for
sigma 1.5); keep ``win_size`` at that value to agree with it.

Modes for a volume ``[B, C, D, H, W]``:
- ``"3d"``: one 3D SSIM over the volume (DIF-Net's protocol);
- ``"2d"``: a 2D SSIM of every slice, averaged over the slices of each axis and then over the axes
  (X2CT-GAN's protocol, which also uses a uniform 7-tap window and sample covariance:
  ``window="uniform", win_size=7, sample_covariance=True``).

Filtering is done as a product with a banded matrix per axis (``x @ M.T``), which BLAS runs several
times faster on CPU than a 1-tap-wide ``conv3d``; autograd's backward of a matrix product is again
a matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

WINDOWS = ("gaussian", "uniform")
MODES = ("3d", "2d")


def window_1d(win_size: int = 11, sigma: float = 1.5, window: str = "gaussian", *,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1D window of ``win_size`` taps (Gaussian with ``sigma``, or uniform)."""
    check_window(win_size, sigma, window)
    if window == "uniform":
        return torch.full((win_size,), 1.0 / win_size, dtype=dtype, device=device)
    x = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def check_window(win_size: int, sigma: float, window: str) -> None:
    """Raise ValueError for an unusable window (even or non-positive size, sigma <= 0, unknown kind)."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(map(repr, WINDOWS))}, got {window!r}")
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd positive integer, got {win_size!r}")
    if window == "gaussian" and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")


def _band(n: int, taps: torch.Tensor) -> torch.Tensor:
    """[n - k + 1, n] matrix whose rows are ``taps`` shifted by one: valid 1D filtering as a product."""
    k = taps.numel()
    rows = torch.arange(n - k + 1, device=taps.device)[:, None] + torch.arange(k, device=taps.device)[None]
    band = torch.zeros(n - k + 1, n, dtype=taps.dtype, device=taps.device)
    return band.scatter_(1, rows, taps.expand(n - k + 1, k).contiguous())


def filter_valid(x: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Filter ``x`` along ``axis`` (-1, -2 or -3) with ``taps``, keeping only the valid region."""
    if axis == -1:
        return x @ _band(x.shape[-1], taps).T
    if axis == -2:
        return _band(x.shape[-2], taps) @ x
    if axis == -3:
        d, h, w = x.shape[-3:]
        flat = x.reshape(*x.shape[:-3], d, h * w)
        return (_band(d, taps) @ flat).reshape(*x.shape[:-3], -1, h, w)
    raise ValueError(f"axis must be -1, -2 or -3, got {axis}")


def _filter(x: torch.Tensor, taps: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    for axis in axes:
        x = filter_valid(x, taps, axis)
    return x


def _ssim_from_moments(mx, my, exx, eyy, exy, c1: float, c2: float, cov_norm: float) -> torch.Tensor:
    sxx = cov_norm * (exx - mx * mx)
    syy = cov_norm * (eyy - my * my)
    sxy = cov_norm * (exy - mx * my)
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def _local_means(x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor,
                 axis_sets: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
    """For each set of axes, the local means of x, y, x^2, y^2 and xy filtered along those axes."""
    maps = [x, y, x * x, y * y, x * y]
    needs = [torch.is_grad_enabled() and m.requires_grad for m in maps]
    groups = [[i for i in range(5) if needs[i]], [i for i in range(5) if not needs[i]]]
    out: list[list[torch.Tensor | None]] = [[None] * 5 for _ in axis_sets]
    for idx in groups:
        if not idx:
            continue
        stack = torch.stack([maps[i] for i in idx])
        cache: dict[tuple[int, ...], torch.Tensor] = {}
        for s, axes in enumerate(axis_sets):
            # share the first filtering pass between axis sets that start with the same axis
            first = (axes[0],)
            if first not in cache:
                cache[first] = filter_valid(stack, taps, axes[0])
            filtered = _filter(cache[first], taps, axes[1:])
            for j, i in enumerate(idx):
                out[s][i] = filtered[j]
    return out  # type: ignore[return-value]


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, win_size: int, mode: str, data_range: float) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"SSIM needs pred and target of the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if pred.dim() not in (4, 5):
        raise ValueError(f"SSIM expects images [B, C, H, W] or volumes [B, C, D, H, W], got shape {tuple(pred.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range!r}")
    spatial = pred.shape[2:]
    if min(spatial) < win_size:
        raise ValueError(f"SSIM window of {win_size} taps does not fit spatial size {tuple(spatial)}; "
                         f"use a smaller win_size or a larger volume")


def ssim(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0, mode: str = "3d",
         win_size: int = 11, sigma: float = 1.5, window: str = "gaussian", k1: float = 0.01, k2: float = 0.03,
         sample_covariance: bool = False, slice_axes: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """SSIM per case, ``[B]``, averaged over channels and the valid region.

    ``pred``/``target``: ``[B, C, D, H, W]`` volumes (or ``[B, C, H, W]`` images, for which both modes
    are the plain 2D SSIM). ``slice_axes`` (``"2d"`` mode) picks the slicing axes, 0 = D (axial),
    1 = H (coronal), 2 = W (sagittal); the result is their mean. Computed in float32, or float64
    when an input is float64.
    """
    check_window(win_size, sigma, window)
    _check_inputs(pred, target, win_size, mode, data_range)
    with torch.autocast(pred.device.type, enabled=False):  # E[x^2] - mu^2 needs float32 or better
        return _ssim(pred, target, data_range, mode, win_size, sigma, window, k1, k2, sample_covariance, slice_axes)


def _ssim(pred, target, data_range, mode, win_size, sigma, window, k1, k2, sample_covariance, slice_axes):
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    x, y = pred.to(dtype), target.to(dtype)
    taps = window_1d(win_size, sigma, window, dtype=dtype, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    if x.dim() == 4:
        axis_sets: list[tuple[int, ...]] = [(-1, -2)]
    elif mode == "3d":
        axis_sets = [(-1, -2, -3)]
    else:
        axes = sorted(set(int(a) for a in slice_axes))
        if not axes or any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"slice_axes must be a non-empty subset of 0 (D), 1 (H), 2 (W), got {list(slice_axes)}")
        # slicing along axis a means filtering along the two others (as negative axes, W first)
        axis_sets = [tuple(ax - 3 for ax in (2, 1, 0) if ax != a) for a in axes]
    values = []
    for axes, (mx, my, exx, eyy, exy) in zip(axis_sets, _local_means(x, y, taps, axis_sets)):
        n = win_size ** len(axes)
        cov_norm = n / (n - 1.0) if sample_covariance else 1.0
        smap = _ssim_from_moments(mx, my, exx, eyy, exy, c1, c2, cov_norm)
        values.append(smap.flatten(1).mean(1))
    return torch.stack(values).mean(0)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0, win_size: int = 11,
             sigma: float = 1.5, window: str = "gaussian", k1: float = 0.01, k2: float = 0.03,
             sample_covariance: bool = False) -> torch.Tensor:
    """The 3D (or, for images, 2D) SSIM map over the valid region, ``[B, C, D-w+1, H-w+1, W-w+1]``."""
    check_window(win_size, sigma, window)
    _check_inputs(pred, target, win_size, "3d", data_range)
    with torch.autocast(pred.device.type, enabled=False):
        return _ssim_map(pred, target, data_range, win_size, sigma, window, k1, k2, sample_covariance)


def _ssim_map(pred, target, data_range, win_size, sigma, window, k1, k2, sample_covariance):
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    x, y = pred.to(dtype), target.to(dtype)
    taps = window_1d(win_size, sigma, window, dtype=dtype, device=x.device)
    axes = (-1, -2) if x.dim() == 4 else (-1, -2, -3)
    (mx, my, exx, eyy, exy), = _local_means(x, y, taps, [axes])
    n = win_size ** len(axes)
    return _ssim_from_moments(mx, my, exx, eyy, exy, (k1 * data_range) ** 2, (k2 * data_range) ** 2,
                              n / (n - 1.0) if sample_covariance else 1.0)


__all__ = ["ssim", "ssim_map", "window_1d", "filter_valid", "check_window", "WINDOWS", "MODES"]
